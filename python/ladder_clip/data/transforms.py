"""CLIP's eval transform and Dassl's training transform, with PIL + torch only."""
import math

import torch
from PIL import Image

from .images import to_rgb


class Preprocess:
    """CLIP's eval transform: resize the short side (bicubic), centre crop, [0, 1], normalise."""

    def __init__(self, cfg: dict):
        self.size, self.crop = int(cfg["size"]), int(cfg["crop"])
        self.mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(3, 1, 1)

    def __call__(self, im: Image.Image, index: int = 0) -> torch.Tensor:
        im = to_rgb(im)
        w, h = im.size
        scale = self.size / min(w, h)
        im = im.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        return self.to_tensor(im.crop((left, top, left + self.crop, top + self.crop)))

    def to_tensor(self, im: Image.Image) -> torch.Tensor:
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.crop, self.crop, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


class Augment(Preprocess):
    """Dassl's training transform (INPUT.TRANSFORMS random_resized_crop, random_flip, normalize):
    a random crop of 8-100% of the area and aspect 3/4..4/3 resized to the model's size (bicubic), a
    horizontal flip with probability 1/2, then CLIP's normalisation; torchvision's RandomResizedCrop
    algorithm (10 tries, then a centre crop). Every draw comes from a generator seeded by (seed, epoch,
    image index), not from the global RNG: an image gets the same crop whatever the worker, the order,
    or a resume in between, so a resumed run stays bit-exact."""

    SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)

    def __init__(self, cfg: dict, seed: int, epoch: int):
        super().__init__(cfg)
        self.seed, self.epoch = seed, epoch

    def _gen(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1000003 + self.epoch) * 1000000007 + index) % (1 << 62))

    def box(self, w: int, h: int, g: torch.Generator):
        """(left, top, width, height) of the crop."""
        area = w * h
        log_r = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        for _ in range(10):
            u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            target = area * (self.SCALE[0] + u[0] * (self.SCALE[1] - self.SCALE[0]))
            aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                return left, top, cw, ch
        ratio = w / h  # fallback: the largest centre crop within the aspect range
        if ratio < self.RATIO[0]:
            cw, ch = w, round(w / self.RATIO[0])
        elif ratio > self.RATIO[1]:
            cw, ch = round(h * self.RATIO[1]), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, im: Image.Image, index: int = 0) -> torch.Tensor:
        g = self._gen(index)
        im = to_rgb(im)
        left, top, cw, ch = self.box(*im.size, g)
        im = im.resize((self.crop, self.crop), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if torch.rand(1, generator=g).item() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(im)
