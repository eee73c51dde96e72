"""A procedurally generated ImageFolder (coloured shapes on noise) for the demo and the tests: no downloads."""
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(rng: random.Random, colour, shape: str, size: int, background=(0, 90)) -> Image.Image:
    """One image: a shape of `colour` (each channel jittered) on noise of `background`'s channel range."""
    im = Image.new("RGB", (size, size))
    im.putdata([tuple(rng.randint(*background) for _ in range(3)) for _ in range(size * size)])
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    c = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in colour)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    else:
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=c)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=c)
    return im


def make_imagefolder(root: str, classes=None, train_per_class: int = 16, test_per_class: int = 8,
                     size: int = 40, seed: int = 0, background=(0, 90)) -> list:
    """Writes root/{train,test}/<class>/*.png (noise of `background`'s channel range behind each shape);
    returns the folder names. A class named <colour>_<shape> is
    drawn as such; any other name gets a distinct colour and shape of its own (16 combinations)."""
    rng = random.Random(seed)
    classes = classes or [f"{c}_{s}" for c, s in zip(COLOURS, SHAPES)]
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for i, name in enumerate(classes):
            colour, _, shape = name.partition("_")
            if colour not in COLOURS or shape not in SHAPES:  # any other name: a distinct colour x shape
                colour, shape = list(COLOURS)[i % 4], SHAPES[(i + i // 4) % 4]
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                draw_shape(rng, COLOURS[colour], shape, size, background).save(os.path.join(folder, f"{i:04d}.png"))
    return classes
