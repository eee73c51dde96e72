"""Recipes (recipes.py): each method's defaults are its authors' recipe, overridable flag by flag, written
into metrics.json and the checkpoint; Dassl's per-epoch schedule (constant warm-up, then cosine)."""
import json
import math

import pytest
import torch

from ladder_clip.checkpoint import read_checkpoint
from ladder_clip.cli import main
from ladder_clip.config import TrainConfig
from ladder_clip.train import lr_factor


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square"),
            train_per_class=3, test_per_class=2, seed=2)


def _cfg(method="coop", **kw):
    return TrainConfig(model="tiny", data="d", method=method, out="o", **kw)


@pytest.mark.parametrize("shots,epochs", [(16, 200), (0, 200), (8, 100), (4, 100), (2, 50), (1, 50)])
def test_coop_epochs_by_shots(shots, epochs):
    c = _cfg(shots=shots)
    assert c.epochs == epochs and c.recipe == "coop"


@pytest.mark.parametrize("method", ["coop", "rlp", "apt", "ladder", "ladder+apt"])
def test_coop_recipe_for_the_coop_family(method):
    c = _cfg(method)
    assert (c.optimizer, c.lr, c.batch_size, c.weight_decay, c.warmup_epochs) == ("sgd", 0.002, 32, 5e-4, 1)
    assert c.recipe_values["momentum"] == 0.9 and c.recipe_values["warmup_lr"] == 1e-5


def test_maple_and_vpt_recipes():
    m, v = _cfg("maple"), _cfg("vpt")
    assert (m.optimizer, m.lr, m.batch_size, m.epochs) == ("sgd", 0.0035, 4, 5)
    assert m.method_options["n_ctx"] == 2 and m.method_options["depth"] == 9
    assert (v.optimizer, v.lr, v.batch_size, v.epochs) == ("sgd", 0.0025, 4, 5)
    assert v.method_options["n_prompts"] == 8 and v.method_options["depth"] == 0  # every layer


def test_explicit_flags_win_one_by_one():
    c = _cfg("coop", recipe="maple", epochs=3, optimizer="adamw")
    assert (c.recipe, c.epochs, c.optimizer, c.lr, c.batch_size) == ("maple", 3, "adamw", 0.0035, 4)
    assert c.recipe_values["overridden"] == ["epochs", "optimizer"]
    c = _cfg("maple", lr=0.1, batch_size=7, weight_decay=0.0, warmup_epochs=0)
    assert (c.lr, c.batch_size, c.weight_decay, c.warmup_epochs, c.epochs) == (0.1, 7, 0.0, 0, 5)


def test_schedule_is_dassls_warmup_then_cosine_per_epoch():
    c = _cfg(epochs=10)
    lrs = [c.lr * lr_factor(e, c) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-5)  # the constant warm-up epoch
    assert lrs[1] == pytest.approx(0.002)  # then the cosine starts at the full lr
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[9] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 8 / 10)))
    c = _cfg(epochs=4, warmup_epochs=0)
    assert c.lr * lr_factor(0, c) == pytest.approx(0.002)


def test_unknown_recipe_is_one_error_line(data, tmp_path, capsys):
    code = main(["train", "--model", "tiny", "--data", data, "--method", "coop", "--out", str(tmp_path),
                 "--recipe", "nope"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "--recipe" in err[0] and "nope" in err[0], err


def test_recipe_in_metrics_checkpoint_and_optimizer(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--model", "tiny", "--data", data, "--method", "coop", "--shots", "2", "--epochs", "2",
                 "--batch-size", "2", "--out", str(out), "--opt", "n_ctx=2", "--no-augment"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    r = m["recipe"]
    assert r["name"] == "coop" and r["optimizer"] == "sgd" and r["lr"] == 0.002 and r["epochs"] == 2
    assert r["weight_decay"] == 5e-4 and r["overridden"] == ["batch_size", "epochs"] and "CoOp" in r["source"]
    header, _ = read_checkpoint(str(out / "prompt.safetensors"))
    assert header["recipe"] == r
    ts = torch.load(out / "state" / "epoch-000002" / "train_state.pt", weights_only=True)
    group = ts["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4 and group["nesterov"] is False
    assert ts["scheduler"]["last_epoch"] == 2  # stepped once per epoch, not per step
    assert group["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 1 / 2)))
    out_lines = capsys.readouterr().out.splitlines()
    # one summary line per epoch (the bar is cleared), readable in a log file
    lines = [line for line in out_lines if line.startswith("coop epoch ")]
    assert len(lines) == 2 and "loss " in lines[0] and "train accuracy " in lines[0] and " s, peak " in lines[0]
    assert "lr 1.00e-05" in lines[0] and "MiB" in lines[1]


def test_help_shows_defaults_recipes_and_method_options(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in out and "(default: cpu)" in out
    assert "maple sgd lr 0.0035, batch 4, epochs 5" in out and "coop: n_ctx [16]" in out
    assert "csc [false]" in out and "class_token_position [\"end\"]" in out and "maple: ctx_init" in out


def test_eval_prints_method_images_and_accuracy(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--model", "tiny", "--data", data, "--method", "rlp", "--shots", "1", "--epochs", "1",
                 "--out", str(out), "--quiet"]) == 0
    acc = json.loads((out / "metrics.json").read_text())["accuracy"]
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--data", data, "--checkpoint", str(out / "prompt.safetensors")]) == 0
    assert capsys.readouterr().out.strip() == f"rlp: accuracy {acc:.4f} on 4 test images (2 classes)"
