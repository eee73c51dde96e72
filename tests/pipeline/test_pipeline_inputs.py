"""Issue 25 items 9-11: each listed input is one `error:` line with exit 2 naming it (huge --lr, deep
checkpoint metadata, a full disk, an unusable LADDER_CLIP_CACHE, demo --out FILE, a bad
LADDER_KERNELS_BACKEND), messages that say what happened (eval --checkpoint DIR, a damaged cache rebuilt,
SIGTERM), and --opt taking several key=value pairs, a repeated key an error."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import one_error, one_thread
from safetensors.torch import load_file, save_file

from ladder_clip import pretrain as P
from ladder_clip import state
from ladder_clip.cli import _method_options, main


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square"),
            train_per_class=2, test_per_class=1, seed=0)


def _argv(data, out, *extra, epochs=1):
    return ["train", "--model", "tiny", "--data", str(data), "--method", "coop", "--shots", "2", "--epochs",
            str(epochs), "--batch-size", "2", "--out", str(out), "--quiet", "--opt", "n_ctx=2", *extra]


@pytest.mark.parametrize("arg", ["--lr", "--weight-decay"])
def test_huge_step_sizes(data, tmp_path, capsys, arg):
    one_error(capsys, main(_argv(data, tmp_path / "o", arg, "1e300", epochs=3)), arg, "1e+300")


def test_an_adamw_step_past_float32(data, tmp_path, capsys):
    code = main(_argv(data, tmp_path / "o", "--lr", "1e38", "--optimizer", "adamw", epochs=3))
    one_error(capsys, code, "overflowed float32", "--lr 1e+38", "epoch-000001")


def test_deeply_nested_checkpoint_metadata(data, tmp_path, capsys):
    assert main(_argv(data, tmp_path / "o")) == 0
    bad = tmp_path / "deep.safetensors"
    save_file(load_file(str(tmp_path / "o" / "prompt.safetensors")), str(bad),
              metadata={"ladder_clip": "[" * 100000 + "]" * 100000})
    capsys.readouterr()
    one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", str(bad)]), "nested too deeply")
    code = main(["eval", "--model", "tiny", "--data", data, "--checkpoint", str(tmp_path / "o")])
    one_error(capsys, code, "is a folder", "prompt.safetensors")


def _full(*a, **k):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target,fail,needles", [("torch.save", _full, ["train_state.pt", "unexpected pos"]),
                                                 ("save_file", _no_space, ["prompt.safetensors", "No space left"])])
def test_a_full_disk(data, tmp_path, capsys, monkeypatch, target, fail, needles):
    if target == "torch.save":
        monkeypatch.setattr(state.torch, "save", fail)
    else:
        monkeypatch.setattr(state, "save_file", fail)
    one_error(capsys, main(_argv(data, tmp_path / "o")), *needles, "disk full")


def _no_pretraining(*a, **k):
    raise AssertionError("pretrained although the cache cannot be written")


def test_an_unusable_cache(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "pretrain", _no_pretraining)
    (tmp_path / "file").write_text("x")
    for cache, needle in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot write")):
        monkeypatch.setenv("LADDER_CLIP_CACHE", str(cache))
        argv = _argv(data, tmp_path / "o")
        argv[argv.index("tiny")] = "tiny-pretrained"
        one_error(capsys, main(argv), "LADDER_CLIP_CACHE", needle)


def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    from ladder_clip.backbone import tiny_clip

    monkeypatch.setenv("LADDER_CLIP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(P, "pretrain", lambda: calls.append(1) or tiny_clip())
    path = P.pretrained_tiny()
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.warns(UserWarning, match="damaged or incomplete; rebuilding"):
        assert P.pretrained_tiny() == path
    assert calls == [1, 1] and os.path.isfile(os.path.join(path, "tokenizer.json"))
    assert P.pretrained_tiny() == path and calls == [1, 1]


def test_demo_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_error(capsys, main(["demo", "--out", str(tmp_path / "f")]), "--out", "is a file")


def test_a_bad_backend_variable(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "nope")
    err = one_error(capsys, main(_argv(data, tmp_path / "o")), "LADDER_KERNELS_BACKEND='nope'")
    assert "argument 'backend'" not in err


def test_opt_takes_several_pairs_and_refuses_a_repeated_key(data, tmp_path, capsys):
    assert _method_options(["reduction=4", "blocks=2", "template=a photo of a {}, x=1."]) == \
        {"reduction": 4, "blocks": 2, "template": "a photo of a {}, x=1."}
    assert main(_argv(data, tmp_path / "o", "--opt", "csc=true", "class_token_position=front")) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["config"]["csc"] is True and m["config"]["class_token_position"] == "front"
    one_error(capsys, main(_argv(data, tmp_path / "o2", "--opt", "n_ctx=4")), "n_ctx", "twice")
    one_error(capsys, main(_argv(data, tmp_path / "o2", "--opt", "csc=true", "csc=false")), "csc", "twice")


def test_sigterm_says_how_to_continue(data, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ladder_clip", *_argv(data, out, epochs=100000)],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not state.committed(str(out)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); run the same command with --resume" in err, err
