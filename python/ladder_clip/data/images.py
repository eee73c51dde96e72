"""What an image must be before it is decoded and resized, and its 8-bit RGB form.

Bounds: the eval transform scales the short side to the model's size first, so a thin image grows by
its aspect ratio (a 1 x 200000 PNG of 858 bytes became 32 x 6.4M pixels); a huge pixel count costs its
decode. Both are read from the header, before any pixel is decoded, and such an image is skipped.

High bit depth: PIL's convert("RGB") clips 16- and 32-bit integer and float pixels to 0..255 (a 16-bit
PNG comes out nearly white, a float TIFF in 0..1 black); they are rescaled from their own range instead.
"""
from PIL import Image

MAX_ASPECT = 100  # longer side / shorter side; panoramas are within it, a 1-pixel-wide strip is not
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold, enforced before decoding


def size_problem(im: Image.Image):
    """Why the header's size is refused, or None."""
    w, h = im.size
    if w < 1 or h < 1:
        return f"{w} x {h} pixels"
    if w * h > MAX_PIXELS:
        return f"{w} x {h} = {w * h} pixels, more than the {MAX_PIXELS} allowed"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"{w} x {h} pixels, aspect ratio {max(w, h) / min(w, h):.0f}:1, more than the {MAX_ASPECT}:1 allowed"
    return None


def _bits(im: Image.Image) -> int:
    """The nominal bits of a 32-bit integer image: TIFF records them; else the values decide."""
    tag = getattr(im, "tag_v2", None)
    bits = tag.get(258) if tag is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return bits if isinstance(bits, int) and 8 <= bits <= 32 else 0


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit, 32-bit integer and float grey images rescaled from their range, not clipped."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im.convert("RGB")
    import numpy as np

    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0 if a.max(initial=0.0) <= 255.0 else a.max()
    else:
        a = a.astype(np.float64)
        bits = 16 if im.mode.startswith("I;16") else _bits(im) or (16 if a.max(initial=0) <= 65535 else 32)
        top = float(2 ** bits - 1) if bits < 32 else float(2 ** 31 - 1)  # mode I holds signed 32-bit values
    grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
