"""The images of a split as batches: the dataset over (path, label) items and its DataLoader."""
from typing import Sequence

import torch
from PIL import Image

from ..base.errors import UserError
from .datasets import Item
from .images import size_problem
from .transforms import Preprocess


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Item], preprocess: Preprocess):
        self.items, self.preprocess = list(items), preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                problem = size_problem(im)
                if problem is None:
                    return self.preprocess(im, i), label
        except OSError as exc:  # it decoded in the up-front check: the file changed during the run
            raise UserError(f"image {path} became unreadable during the run ({exc})") from None
        raise UserError(f"image {path} was replaced during the run by one of {problem}")


def loader(items, backbone, batches, workers, transform=None):
    """Eval transform unless `transform` (training's transforms.Augment) is given."""
    ds = ImageDataset(items, transform or Preprocess(backbone.preprocess))
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)
