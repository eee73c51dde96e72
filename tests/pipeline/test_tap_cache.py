"""The frozen-tap cache (engine/tapcache.py): without augmentation and with one view, training on the
cache ends with the uncached run's weights bit for bit; a cache made from other inputs is rebuilt; a
resumed run reuses it; a kill while building leaves no cache, and --resume then builds it and ends as
an uninterrupted run; `auto` prints its budget and says why it does not cache."""
import json
import os

import pytest
import torch
from helpers import one_thread
from safetensors.torch import load_file

from ladder_clip import files
from ladder_clip.cli import main
from ladder_clip.engine import tapcache

DATA = {"train_per_class": 3, "test_per_class": 1}


class Killed(BaseException):
    """Raised by the fault hook in-process instead of os._exit: no `except Exception` cleanup runs."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # module-wide: the uncached reference (a module fixture) runs with the same thread count
    with one_thread():
        yield


def _argv(data, out, *extra, epochs=3):
    return ["train", "--model", "tiny", "--data", str(data), "--method", "ladder", "--shots", "3", "--epochs",
            str(epochs), "--batch-size", "4", "--lr", "0.05", "--out", str(out), "--seed", "3", *extra]


def _weights(out):
    return load_file(os.path.join(out, "prompt.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _meta(out):
    return json.loads((out / tapcache.FOLDER / "meta.json").read_text())


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    assert main(_argv(data, out, "--no-augment", "--quiet")) == 0
    return _weights(out)


def test_no_augment_one_view_is_bit_exact(data, plain, tmp_path, capsys):
    out = tmp_path / "cached"
    assert main(_argv(data, out, "--no-augment", "--opt", "tap_cache=1")) == 0
    printed = capsys.readouterr().out
    assert "tap cache: built 1 view(s) x 6 images" in printed and "epoch(s) at" in printed, printed
    meta = _meta(out)
    assert meta["layout"]["dtype"] == "fp32" and meta["layout"]["views"] == 1
    assert _same(plain, _weights(out))
    assert not _same(plain, {k: torch.zeros_like(v) for k, v in plain.items()})  # training moved the weights


def test_augmented_views_train_and_stale_cache_is_rebuilt(data, tmp_path, capsys):
    out = tmp_path / "aug"
    assert main(_argv(data, out, "--opt", "tap_cache=2", "--epochs", "2")) == 0
    meta = _meta(out)
    assert meta["layout"]["views"] == 2 and meta["layout"]["dtype"] == "bf16"
    tap0 = out / tapcache.FOLDER / "tap-0.bf16"
    assert tap0.stat().st_size == 2 * 6 * 2 * meta["layout"]["taps"][0][0] * meta["layout"]["taps"][0][1]
    capsys.readouterr()
    # the same inputs: reused, not rebuilt
    assert main(_argv(data, out, "--opt", "tap_cache=2", "--epochs", "2")) == 0
    assert "tap cache: reusing" in capsys.readouterr().out
    # another seed: other views, so the cache is stale
    argv = _argv(data, out, "--opt", "tap_cache=2", "--epochs", "2")
    argv[argv.index("--seed") + 1] = "4"
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "was made from other inputs (seed differ); rebuilding it" in said, said
    assert _meta(out)["key"]["seed"] == 4
    # a damaged file (here truncated): rebuilt, not mapped
    with open(out / tapcache.FOLDER / "tap-1.bf16", "r+b") as f:
        f.truncate(10)
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "is damaged or incomplete; rebuilding it" in said, said
    # int8 storage: a scale per token row, and a run without the cache removes it
    assert main(_argv(data, out, "--opt", "tap_cache=2", "--opt", "tap_cache_dtype=int8", "--epochs", "1")) == 0
    assert (out / tapcache.FOLDER / "tap-0.scale").is_file()
    assert main(_argv(data, out, "--epochs", "1", "--quiet")) == 0
    assert not (out / tapcache.FOLDER).exists()


def test_kill_while_building_then_resume(data, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    assert main(_argv(data, ref, "--opt", "tap_cache=2", "--quiet")) == 0
    ops = list(files._ops)
    want = _weights(ref)

    def die():
        raise Killed

    out = tmp_path / "killed"
    monkeypatch.setattr(files, "_die", die)
    monkeypatch.setenv(files.FAULT_ENV, str(ops.index("commit tap cache") + 1))  # right before the rename
    with pytest.raises(Killed):
        main(_argv(data, out, "--opt", "tap_cache=2"))
    monkeypatch.delenv(files.FAULT_ENV)
    assert not (out / tapcache.FOLDER).exists() and (out / tapcache.TMP).is_dir()
    capsys.readouterr()
    assert main(_argv(data, out, "--opt", "tap_cache=2", "--resume", epochs=1)) == 0
    said = capsys.readouterr()
    assert "no finished epoch yet" in said.err and "tap cache: built 2 view(s)" in said.out, said
    assert not (out / tapcache.TMP).exists() and (out / tapcache.FOLDER).is_dir()
    assert main(_argv(data, out, "--opt", "tap_cache=2", "--resume")) == 0  # on to the third epoch
    said = capsys.readouterr().out
    assert "tap cache: reusing" in said and "built 2" not in said, said
    assert _same(want, _weights(out))


def test_auto_prints_its_budget(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "auto"
    assert main(_argv(data, out, "--opt", "tap_cache=auto", "--epochs", "1")) == 0
    said = capsys.readouterr().out
    assert f"tap cache: auto: caching {tapcache.AUTO_VIEWS} view(s) x 6 images" in said, said
    assert "half the free disk under --out" in said and "half the available memory" in said
    files_ = [f for f in (out / tapcache.FOLDER).iterdir() if f.name != "meta.json"]
    per_view = sum(f.stat().st_size for f in files_) // tapcache.AUTO_VIEWS
    # room for one view only (half the memory): fewer views, not none
    monkeypatch.setattr(tapcache, "available_memory", lambda: 3 * per_view)
    assert main(_argv(data, out, "--opt", "tap_cache=auto", "--epochs", "1")) == 0
    said = capsys.readouterr().out
    assert f"caching 1 view(s) x 6 images, {per_view / 1024:.1f} KiB in bf16 (fewer than {tapcache.AUTO_VIEWS}" \
        in said, said
    assert _meta(out)["layout"]["views"] == 1
    monkeypatch.setattr(tapcache, "available_memory", lambda: 1000)
    assert main(_argv(data, out, "--opt", "tap_cache=auto", "--epochs", "1")) == 0
    said = capsys.readouterr().out
    assert "tap cache: auto: not caching" in said and "exceeds the memory budget" in said, said
    assert not (out / tapcache.FOLDER).exists()
