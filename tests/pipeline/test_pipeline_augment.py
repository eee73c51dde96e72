"""Dassl's training augmentation (data.Augment: random resized crop + flip, seeded per image and epoch) and
the training peak-memory figure (peak.PeakMeter: above what was resident, training steps only)."""
import json

import pytest
import torch
from PIL import Image

from ladder_clip import data as D
from ladder_clip.backbone import preprocess_config
from ladder_clip.cli import main
from ladder_clip.peak import PeakMeter

CFG = preprocess_config(None, 32)


def _image(w=48, h=40):
    x = torch.arange(w * h * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(h, w, 3)
    return Image.fromarray(x.numpy())


def test_augment_is_seeded_by_seed_epoch_and_index():
    im = _image()
    a = D.Augment(CFG, seed=1, epoch=0)
    x = a(im, 5)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, D.Augment(CFG, seed=1, epoch=0)(im, 5))  # the same whatever ran before
    torch.manual_seed(123)  # the global RNG plays no part (resume and workers stay exact)
    assert torch.equal(x, a(im, 5))
    others = [D.Augment(CFG, 1, 1)(im, 5), D.Augment(CFG, 2, 0)(im, 5), a(im, 6)]
    assert all(not torch.equal(x, o) for o in others)


def test_augment_crops_within_scale_and_ratio_and_flips_half_the_time():
    a = D.Augment(CFG, seed=0, epoch=0)
    flips = 0
    for i in range(200):
        g = a._gen(i)
        left, top, w, h = a.box(48, 40, g)
        assert 0 <= left and left + w <= 48 and 0 <= top and top + h <= 40
        assert 0.08 * 48 * 40 * 0.9 <= w * h <= 48 * 40
        flips += torch.rand(1, generator=g).item() < 0.5
    assert 60 < flips < 140
    # a strip-shaped image falls back to the largest centre crop within the aspect range
    left, top, w, h = a.box(400, 4, torch.Generator().manual_seed(0))
    assert h == 4 and 4 <= w <= round(4 * 4 / 3) + 1


def test_augment_flip_mirrors_the_crop():
    im = _image(32, 32)
    a = D.Augment(CFG, seed=0, epoch=0)
    a.SCALE = (1.0, 1.0)  # the crop is the whole image: only the flip varies
    a.RATIO = (1.0, 1.0)
    plain = D.Preprocess(CFG)(im)
    outs = [a(im, i) for i in range(8)]
    assert any(torch.allclose(o, plain, atol=1e-5) for o in outs)
    assert any(torch.allclose(o, plain.flip(-1), atol=1e-5) for o in outs)


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square"),
            train_per_class=2, test_per_class=2, seed=3)


def _train(data, out, *extra):
    return main(["train", "--model", "tiny", "--data", data, "--method", "coop", "--shots", "2", "--epochs", "1",
                 "--batch-size", "4", "--lr", "0.01", "--warmup-epochs", "0", "--out", str(out), "--quiet",
                 "--opt", "n_ctx=2", *extra])


def test_training_augments_by_default_and_no_augment_turns_it_off(data, tmp_path):
    runs = {}
    for name, extra in (("aug", []), ("aug2", []), ("plain", ["--no-augment"])):
        assert _train(data, tmp_path / name, *extra) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["aug"]["augment"] is True and runs["plain"]["augment"] is False
    assert runs["aug"]["loss_curve"] == runs["aug2"]["loss_curve"]  # seeded
    assert runs["aug"]["loss_curve"] != runs["plain"]["loss_curve"]
    # evaluation is unchanged by the flag (the eval transform): zero-shot accuracy of the same start
    assert runs["aug"]["test_images"] == runs["plain"]["test_images"] == 4


def test_peak_meter_counts_above_the_resident_set():
    m = PeakMeter(torch.device("cpu"))
    keep = torch.ones(64 << 20, dtype=torch.uint8)  # resident before the start: not counted
    m.start()
    if "VmHWM" not in m.kind:
        pytest.skip("no /proc/self/clear_refs here")
    m.reset()
    x = torch.ones(48 << 20, dtype=torch.uint8)
    m.read()
    del x
    peak = m.peak()
    assert 40 << 20 <= peak < 100 << 20, peak
    assert keep.sum() > 0


def test_metrics_peak_is_training_steps_only(data, tmp_path):
    assert _train(data, tmp_path / "o") == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert isinstance(m["peak_memory_bytes"], int) and m["peak_memory_bytes"] >= 0
    assert m["peak_memory_kind"] == "peak RSS (VmHWM)" and "training steps only" in m["peak_memory_rule"]
    assert m["saved_activation_bytes"] > 0
    # far below the whole process (torch, transformers, the model: hundreds of MiB)
    assert m["peak_memory_bytes"] < 100 << 20


def test_demo_shows_zero_shot_and_the_ladders_saving(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LADDER_CLIP_CACHE", str(tmp_path / "cache"))  # the pretrained model, built here
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\nzeroshot " in out and "\ncoop " in out and "\nladder " in out and "vs zero-shot" in out
    assert "ladder / coop: " in out and "of the bytes kept for backward" in out and "training steps only" in out
    m = json.loads((tmp_path / "ladder" / "metrics.json").read_text())
    assert m["recipe"]["name"] == "coop" and m["model"].endswith("tiny-pretrained-v2")


def test_follow_live_memory_hands_freed_tensors_back():
    import subprocess
    import sys

    # in a fresh process: mallopt changes the allocator for the rest of the process
    code = """
import torch
from ladder_clip.peak import proc_status, follow_live_memory
assert follow_live_memory()
x = torch.ones(1 << 20) * 2  # warm-up: torch's lazily made CPU state stays resident, not what is measured
del x
before = proc_status("VmRSS")
for _ in range(3):
    x = torch.ones(1 << 20)  # 4 MiB: from the heap once glibc's dynamic threshold has grown, unless mmapped
    del x
print((proc_status("VmRSS") - before) >> 20)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "libc.so.6" in r.stderr:
        pytest.skip("no glibc here")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) < 2  # MiB still resident after the frees
