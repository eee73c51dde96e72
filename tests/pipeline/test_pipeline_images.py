"""Issue 25 items 3, 5 and 10 (images): image sizes bounded from the header before decoding (the
warning that skips one names its size), high-bit-depth images rescaled to 8 bits rather than clipped,
and an image gone before --resume named up front, also with data-loading workers."""
import os

import numpy as np
import pytest
import torch
from helpers import one_thread
from PIL import Image

from ladder_clip import data as D
from ladder_clip.cli import main
from ladder_clip.images import to_rgb
from ladder_clip.synthetic import make_imagefolder


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _argv(data, out, *extra):
    return ["train", "--model", "tiny", "--data", str(data), "--method", "coop", "--shots", "2", "--epochs", "1",
            "--batch-size", "2", "--lr", "0.01", "--out", str(out), "--quiet", "--opt", "n_ctx=2", *extra]


@pytest.mark.parametrize("size,needle", [((1, 200000), "aspect ratio 200000:1"), ((12000, 8000), "96000000 pixels")])
def test_thin_or_huge_images_are_skipped_before_decoding(tmp_path, size, needle, monkeypatch):
    path = str(tmp_path / "x.png")
    Image.new("L", size).save(path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.warns(UserWarning, match=f"skipping image {path}: .*{needle}"):
        assert D.readable([(path, 0)]) == []


def test_a_thin_image_in_the_data_is_skipped(tmp_path, capsys):
    data = tmp_path / "d"
    make_imagefolder(str(data), ["red_circle", "blue_square"], train_per_class=3, test_per_class=1, size=36)
    Image.new("RGB", (1, 200000)).save(data / "train" / "red_circle" / "thin.png")
    assert main(_argv(data, tmp_path / "o")) == 0
    assert "thin.png: 1 x 200000 pixels, aspect ratio" in capsys.readouterr().err


def _grey(tmp_path, name, array, mode=None):
    path = str(tmp_path / name)
    Image.fromarray(array, mode).save(path)
    with Image.open(path) as im:
        return im.mode, np.asarray(to_rgb(im))[..., 0]


def test_high_bit_depth_images_are_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float64).reshape(8, 8)
    want = np.rint(ramp * 255)
    cases = [("png16.png", (ramp * 65535).astype(np.uint16)), ("int32.tif", (ramp * (2 ** 31 - 1)).astype(np.int32)),
             ("float.tif", ramp.astype(np.float32))]
    for name, array in cases:
        mode, got = _grey(tmp_path, name, array)
        assert np.abs(got.astype(float) - want).max() <= 1, (name, mode, got)


def test_the_transform_gets_the_rescaled_pixels(tmp_path):
    path = str(tmp_path / "mid.png")
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(path)
    pre = D.Preprocess({"size": 32, "crop": 32, "mean": (0, 0, 0), "std": (1, 1, 1)})
    with Image.open(path) as im:
        x = pre(im)
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_image_deleted_before_resume_is_named(tmp_path, capsys, workers):
    data = tmp_path / "d"
    make_imagefolder(str(data), ["red_circle", "blue_square"], train_per_class=2, test_per_class=1, size=36)
    out = tmp_path / "o"
    assert main(_argv(data, out)) == 0
    gone = data / "train" / "red_circle" / "0000.png"
    os.remove(gone)
    capsys.readouterr()
    code = main(_argv(data, out, "--resume", "--epochs", "2", "--workers", workers))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ladder-clip: error:")]
    assert code == 2 and len(errors) == 1 and str(gone) in errors[0] and "--resume" in errors[0], errors
    assert len(errors[0]) < 400 and "Traceback" not in errors[0]


def test_a_workers_error_is_its_own_line(tmp_path):
    from ladder_clip.cli import _user_message
    from ladder_clip.errors import UserError

    path = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(path)
    pre = D.Preprocess({"size": 32, "crop": 32, "mean": (0, 0, 0), "std": (1, 1, 1)})
    ds = D.ImageDataset([(str(path), 0)], pre)
    os.remove(path)  # gone after the up-front check: during the run
    with pytest.raises(UserError) as info:
        next(iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)))
    assert "Traceback" in str(info.value)  # torch wraps the worker's error in its traceback
    msg = _user_message(info.value)
    assert msg.startswith(f"image {path} became unreadable during the run") and "Traceback" not in msg, msg
