"""`ladder-clip` end to end on generated image folders: train, eval, prompt-only checkpoints, resume, and
bad input (one line on stderr, non-zero exit, no traceback)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ladder_clip import METHODS
from ladder_clip.checkpoint import read_checkpoint
from ladder_clip.cli import main


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square", "green_triangle"),
            train_per_class=4, test_per_class=3, seed=5)


def _train(data, out, method="coop", *extra, epochs=1):
    return main(["train", "--model", "tiny", "--data", data, "--method", method, "--shots", "2",
                 "--epochs", str(epochs), "--batch-size", "3", "--lr", "0.01", "--out", str(out),
                 "--seed", "3", "--quiet", *extra])


def _one_error_line(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if "error" in l]
    assert code != 0 and len(errors) == 1 and needle in errors[0], err
    assert not any("Traceback" in l for l in err)


SMALL = {"coop": ["--opt", "n_ctx=4"], "apt": ["--opt", "num_prompts=5"], "ladder+apt": ["--opt", "apt_prompts=5"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_train_then_eval(data, tmp_path, capsys, method):
    extra = SMALL.get(method, [])
    assert _train(data, tmp_path, method, *extra) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "loss_curve", "peak_memory_bytes", "images_per_s", "trainable_parameters"):
        assert key in m
    assert 0.0 <= m["accuracy"] <= 1.0 and m["test_images"] == 9
    header, tensors = read_checkpoint(str(tmp_path / "prompt.safetensors"))
    assert header["method"] == method and header["config"] and header["epoch"] == (0 if method == "zeroshot" else 1)
    assert sum(t.numel() for t in tensors.values()) >= m["trainable_parameters"]
    assert not any(k.startswith("backbone.") for k in tensors)  # prompt-only
    if method != "zeroshot":
        assert len(m["loss_curve"]) == 2 and m["trainable_parameters"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--data", data, "--checkpoint", str(tmp_path / "prompt.safetensors")]) == 0
    assert f"accuracy {m['accuracy']:.4f}" in capsys.readouterr().out


def test_resume_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    import ladder_clip.state as S

    assert _train(data, tmp_path / "full", "coop", "--opt", "n_ctx=4", epochs=2) == 0
    real_commit = S.commit

    def killed_after_first_epoch(*args):
        real_commit(*args)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's commit

    monkeypatch.setattr(S, "commit", killed_after_first_epoch)
    assert _train(data, tmp_path / "part", "coop", "--opt", "n_ctx=4", epochs=2) == 130
    monkeypatch.setattr(S, "commit", real_commit)
    assert read_checkpoint(str(tmp_path / "part" / "prompt.safetensors"))[0]["epoch"] == 1
    assert _train(data, tmp_path / "part", "coop", "--opt", "n_ctx=4", "--resume", epochs=2) == 0
    (h1, a), (h2, b) = (read_checkpoint(str(tmp_path / d / "prompt.safetensors")) for d in ("full", "part"))
    assert h1["epoch"] == h2["epoch"] == 2
    assert torch.equal(a["ctx"], b["ctx"])  # bit for bit (tests/pipeline/test_pipeline_resume.py kills harder)
    fs = sorted(p for p in os.listdir(tmp_path / "full") if p.startswith("fewshot_"))
    assert fs and (tmp_path / "full" / fs[0]).read_text() == (tmp_path / "part" / fs[0]).read_text()


def test_no_temp_files_left(data, tmp_path):
    assert _train(data, tmp_path, "rlp") == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_split_json_and_subsample(data, tmp_path, capsys):
    split = {s: [[os.path.relpath(os.path.join(dp, f), data), i, name.replace("_", " ")]
                 for i, name in enumerate(sorted(os.listdir(os.path.join(data, s))))
                 for dp, _, fs in [next(os.walk(os.path.join(data, s, name)))] for f in sorted(fs)]
             for s in ("train", "test")}
    split["val"] = []
    path = tmp_path / "split_toy.json"
    path.write_text(json.dumps(split))
    assert _train(data, tmp_path / "o", "coop", "--opt", "n_ctx=4", "--split-json", str(path),
                  "--subsample", "base") == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["classnames"] == ["blue square", "green triangle"] and m["test_images"] == 6
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--data", data, "--split-json", str(path), "--subsample", "new",
                 "--checkpoint", str(tmp_path / "o" / "prompt.safetensors")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_bad_input(data, tmp_path, capsys):
    _one_error_line(capsys, _train(str(tmp_path / "nope"), tmp_path / "o"), "no such folder")
    (tmp_path / "empty").mkdir()
    _one_error_line(capsys, _train(str(tmp_path / "empty"), tmp_path / "o"), "does not exist")
    bad = tmp_path / "mismatch"
    shutil.copytree(data, bad)
    shutil.move(str(bad / "test" / "red_circle"), str(bad / "test" / "red_disc"))
    _one_error_line(capsys, _train(str(bad), tmp_path / "o"), "differ between train and test")
    assert _train(data, tmp_path / "c", "rlp") == 0
    ck = str(tmp_path / "c" / "prompt.safetensors")
    _one_error_line(capsys, _train(data, tmp_path / "c", "coop", "--resume"), "is for method 'rlp'")
    other = tmp_path / "other_model"
    from ladder_clip.backbone import tiny_clip
    model, tok = tiny_clip(seed=9)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    _one_error_line(capsys, main(["eval", "--model", str(other), "--data", data, "--checkpoint", ck]),
                    "another model")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    _one_error_line(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint",
                                  str(tmp_path / "junk.safetensors")]), "not a readable safetensors")
    _one_error_line(capsys, main(["train", "--model", "tiny"]), "required")


def test_unreadable_image_is_skipped_with_a_warning(data, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    (d / "test" / "blue_square" / "broken.png").write_bytes(b"\x89PNG garbage")
    assert _train(str(d), tmp_path / "o", "rlp") == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["test_images"] == 9


def test_module_entry_point(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ladder_clip", "eval", "--model", "tiny", "--data", data,
                        "--checkpoint", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("does not exist") and "Traceback" not in r.stderr
