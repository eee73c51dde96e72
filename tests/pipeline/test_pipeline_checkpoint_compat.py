"""Issue 25 item 7: the backbone signature covers every frozen weight (a checkpoint trained on one vision
tower is refused on another), and a checkpoint from before that hash still loads, with a warning."""
import json

import pytest
import torch
from helpers import one_thread
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ladder_clip.backbone import tiny_clip
from ladder_clip.cli import main
from ladder_clip.synthetic import make_imagefolder


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    make_imagefolder(str(root / "d"), ["red_circle", "blue_square"], train_per_class=2, test_per_class=1, size=36)
    model, tok = tiny_clip()
    for name, change in (("same", None), ("vision", "vision_model.post_layernorm.weight")):
        if change:
            with torch.no_grad():
                model.get_parameter(change).mul_(1.5)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    argv = ["train", "--model", str(root / "same"), "--data", str(root / "d"), "--method", "coop", "--shots", "2",
            "--epochs", "1", "--batch-size", "2", "--out", str(root / "o"), "--quiet", "--opt", "n_ctx=2"]
    assert main(argv) == 0
    return root


def _eval(root, model, ckpt):
    return main(["eval", "--model", str(root / model), "--data", str(root / "d"), "--checkpoint", str(ckpt)])


def test_another_vision_tower_is_refused(run, capsys):
    assert _eval(run, "same", run / "o" / "prompt.safetensors") == 0
    capsys.readouterr()
    assert _eval(run, "vision", run / "o" / "prompt.safetensors") == 2
    err = capsys.readouterr().err
    assert "trained on another model" in err and "frozen_weights" in err, err


def test_a_checkpoint_without_the_full_hash_loads_with_a_warning(run, capsys):
    src = run / "o" / "prompt.safetensors"
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["ladder_clip"])
    del header["backbone"]["frozen_weights"]
    old = run / "old.safetensors"
    save_file(load_file(str(src)), str(old), metadata={"ladder_clip": json.dumps(header)})
    capsys.readouterr()
    assert _eval(run, "same", old) == 0
    assert "older ladder-clip" in capsys.readouterr().err
