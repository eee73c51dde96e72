"""`ladder-clip export` and `predict` (engine/bundle.py, apps/export.py, apps/predict.py): a bundle scores
as its checkpoint does (eval's accuracy, the logits), predict reads images, folders and globs, a bundle
runs without transformers, and bad or foreign files are one error line, never a half-written bundle."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import one_error
from ladder_clip.apps.cli import main
from ladder_clip.data.transforms import Preprocess
from ladder_clip.engine import bundle as B

DATA = dict(classes=("red_circle", "blue_square", "green_triangle"), train_per_class=2, test_per_class=2)
CASES = {"coop": ["--opt", "n_ctx=4"], "rlp": [], "ladder": [], "ladder-int8": ["--opt", "frozen=int8"]}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """{case: (checkpoint, bundle)}: one epoch of each method on the tiny CLIP, exported."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for case, extra in CASES.items():
        ckpt, bundle = str(root / case / "prompt.safetensors"), str(root / f"{case}.safetensors")
        assert main(["train", "--model", "tiny", "--data", data, "--method", case.split("-")[0], "--shots", "2",
                     "--epochs", "1", "--out", str(root / case), "--quiet", *extra]) == 0
        assert main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", bundle]) == 0
        out[case] = (ckpt, bundle)
    return out


def _images(data):
    return sorted(os.path.join(r, f) for r, _, names in os.walk(os.path.join(data, "test")) for f in names)


def _pixels(paths, preprocess):
    from PIL import Image

    pre = Preprocess(preprocess)
    return torch.stack([pre(Image.open(p)) for p in paths])


def _accuracy(capsys, argv) -> float:
    capsys.readouterr()
    assert main(argv) == 0
    return float(re.search(r"accuracy (\d\.\d+) on", capsys.readouterr().out).group(1))


@pytest.mark.parametrize("case", list(CASES))
def test_bundle_scores_as_its_checkpoint(runs, data, capsys, case):
    ckpt, bundle = runs[case]
    acc = _accuracy(capsys, ["eval", "--model", "tiny", "--data", data, "--checkpoint", ckpt])
    assert _accuracy(capsys, ["eval", "--data", data, "--bundle", bundle]) == acc
    assert _accuracy(capsys, ["eval", "--data", data, "--checkpoint", bundle]) == acc  # told by its header
    method, _ = B.load_method(ckpt, "tiny", "cpu")
    model = B.load_bundle(bundle)
    assert model.frozen == ("int8" if case.endswith("int8") else "fp32")
    x = _pixels(_images(data), model.preprocess)
    with torch.no_grad():
        want, got = method(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_export_with_data_prints_both_accuracies_bytes_and_time(runs, data, tmp_path, capsys):
    ckpt, _ = runs["rlp"]
    out = tmp_path / "rlp.safetensors"
    capsys.readouterr()
    assert main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(out), "--data", data]) == 0
    text = capsys.readouterr().out
    assert re.search(r"accuracy on 6 test images: checkpoint (\S+), bundle \1 \(the same\)", text), text
    assert f"{os.path.getsize(out) / 1e3:.1f} kB" in text and "time per image" in text


def _predict(capsys, *argv):
    capsys.readouterr()
    assert main(["predict", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_image_folder_and_glob(runs, data, capsys):
    ckpt, bundle = runs["ladder"]
    images = _images(data)
    method, _ = B.load_method(ckpt, "tiny", "cpu")
    with torch.no_grad():
        logits = method(_pixels(images, method.backbone.preprocess))
    one = _predict(capsys, "--bundle", bundle, images[0])
    assert [p["image"] for p in one["predictions"]] == [images[0]] and one["classes"] == 3
    folder = _predict(capsys, "--bundle", bundle, os.path.join(data, "test"), "--topk", "2")
    assert [p["image"] for p in folder["predictions"]] == images
    for p, row in zip(folder["predictions"], logits):
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert p["top"][0]["index"] == row.argmax().item()
        assert p["top"][0]["class"] == method.classnames[row.argmax().item()]
    globbed = _predict(capsys, "--bundle", bundle, os.path.join(data, "test", "*", "0000.png"))
    assert sorted(p["image"] for p in globbed["predictions"]) == [i for i in images if i.endswith("0000.png")]
    from_ckpt = _predict(capsys, "--checkpoint", ckpt, "--model", "tiny", os.path.join(data, "test"))
    assert [p["top"][0]["index"] for p in from_ckpt["predictions"]] == logits.argmax(-1).tolist()
    capsys.readouterr()
    assert main(["predict", "--bundle", bundle, os.path.join(data, "test")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability"] and len(lines) == 1 + 3 * len(images)
    assert lines[1].startswith(images[0]) and lines[2].split()[0] == "2"


def test_unreadable_images_are_reported_and_skipped(runs, data, tmp_path, capsys):
    _, bundle = runs["coop"]
    shutil.copy(_images(data)[0], tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    out = _predict(capsys, "--bundle", bundle, str(tmp_path))
    assert [p["image"] for p in out["predictions"]] == [str(tmp_path / "good.png")]
    assert [s["image"] for s in out["skipped"]] == [str(tmp_path / "broken.png")]
    os.remove(tmp_path / "good.png")
    capsys.readouterr()
    err = one_error(capsys, main(["predict", "--bundle", bundle, str(tmp_path)]), "none of the 1 images")
    assert "warning: skipped" in err and "broken.png" in err


def test_bundle_runs_without_transformers(runs, data):
    _, bundle = runs["ladder-int8"]
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of it fails
            "from ladder_clip.apps.cli import main\n"
            f"assert main(['eval', '--bundle', {bundle!r}, '--data', {data!r}]) == 0\n"
            f"sys.exit(main(['predict', '--bundle', {bundle!r}, {os.path.join(data, 'test')!r}, '--json']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ladder: accuracy")
    assert len(json.loads("\n".join(lines[1:]))["predictions"]) == len(_images(data))


def _rewrite(src, dst, header=None, drop=None):
    with safe_open(src, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    h = json.loads(meta[B.META_KEY])
    h.update(header or {})
    if drop:
        tensors[drop] = tensors[drop][:-1]
    save_file(tensors, dst, metadata={B.META_KEY: json.dumps(h)})
    return dst


def test_bad_bundles_are_one_error_line(runs, data, tmp_path, capsys):
    ckpt, bundle = runs["coop"]
    img = _images(data)[0]
    other = _rewrite(bundle, str(tmp_path / "v2.safetensors"), {"version": 2})
    one_error(capsys, main(["predict", "--bundle", other, img]), "version 2", "export it again")
    one_error(capsys, main(["eval", "--bundle", other, "--data", data]), "version 2")
    short = _rewrite(bundle, str(tmp_path / "short.safetensors"), drop="class_features")
    one_error(capsys, main(["predict", "--bundle", _rewrite(bundle, str(tmp_path / "info.safetensors"),
                                                            {"kind": "deep_prompts"}), img]), "damaged")
    one_error(capsys, main(["predict", "--bundle", _rewrite(runs["ladder"][1], str(tmp_path / "l.safetensors"),
                                                            {"info": {"v_layers": [99]}}), img]), "ladder info")
    one_error(capsys, main(["predict", "--bundle", short, img]), "class_features")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(bundle, "rb").read()[:-1000])
    one_error(capsys, main(["predict", "--bundle", str(cut), img]), "damaged")
    one_error(capsys, main(["predict", "--checkpoint", ckpt, img]), "--model")  # a checkpoint needs its CLIP
    (tmp_path / "junk").write_bytes(b"junk")
    one_error(capsys, main(["predict", "--checkpoint", str(tmp_path / "junk"), "--model", "tiny", img]),
              "not a readable safetensors")


def test_bad_input_is_one_error_line(runs, data, tmp_path, capsys):
    ckpt, bundle = runs["coop"]
    img = _images(data)[0]
    one_error(capsys, main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(tmp_path / "b"),
                            "--frozen", "int8"]), "--frozen")
    one_error(capsys, main(["export", "--checkpoint", bundle, "--model", "tiny", "--out", str(tmp_path / "b")]),
              "already a bundle")
    one_error(capsys, main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(tmp_path)]), "folder")
    one_error(capsys, main(["predict", "--bundle", bundle, img, "--topk", "0"]), "--topk")
    one_error(capsys, main(["predict", "--bundle", bundle, str(tmp_path / "nothing*.png")]), "matches no file")
    one_error(capsys, main(["predict", "--bundle", bundle, str(tmp_path / "missing.png")]), "missing.png")
    one_error(capsys, main(["eval", "--data", data]), "--checkpoint")
    one_error(capsys, main(["eval", "--data", data, "--checkpoint", ckpt]), "--model")
    # train shares eval's --model argument, which a bundle made optional for eval only
    one_error(capsys, main(["train", "--data", data, "--method", "coop", "--out", str(tmp_path / "o")]), "--model")
    two = tmp_path / "two"
    shutil.copytree(data, two)
    shutil.rmtree(two / "train" / "green_triangle")
    shutil.rmtree(two / "test" / "green_triangle")
    one_error(capsys, main(["eval", "--bundle", bundle, "--data", str(two)]), "exported with")
    assert not os.path.exists(tmp_path / "b")


def test_export_is_atomic(runs, tmp_path, capsys, monkeypatch):
    """A failed write leaves no bundle and no temp file; over an existing bundle, the old one whole."""
    import safetensors.torch

    ckpt, _ = runs["coop"]
    out = tmp_path / "b.safetensors"

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", half_written)
        one_error(capsys, main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(out)]), str(out))
    assert os.listdir(tmp_path) == []
    assert main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(out)]) == 0
    before = out.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", half_written)
        one_error(capsys, main(["export", "--checkpoint", ckpt, "--model", "tiny", "--out", str(out)]), str(out))
    assert os.listdir(tmp_path) == ["b.safetensors"] and out.read_bytes() == before


def test_weights_exact_in_fp16_are_stored_in_fp16(tmp_path):
    """As OpenAI's fp16 checkpoints load: CLIP's image weights take half the bytes and give the same logits."""
    from ladder_clip import build_method, load_backbone

    names = ["red circle", "blue square"]
    b = load_backbone("tiny")
    with torch.no_grad():
        for p in b.clip.parameters():
            p.copy_(p.half().float())
    method = build_method("coop", b, names, n_ctx=4).eval()
    half, full = str(tmp_path / "half.safetensors"), str(tmp_path / "full.safetensors")
    assert B.write_bundle(half, method, {})["precision"]["weights"] == "fp16"
    assert B.write_bundle(full, build_method("coop", load_backbone("tiny"), names, n_ctx=4), {})["precision"] == \
        {"weights": "fp32", "frozen": "fp32"}
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(B.load_bundle(half)(x), method(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["zeroshot", "vpt", "maple", "apt", "ladder+apt"])
def test_every_image_side_exports(tmp_path, name):
    """The other methods' image sides (deep prompts, APT, the ladder's APT), their learned tensors moved off
    their initial values so that a tensor the bundle dropped would show in the logits."""
    from ladder_clip import build_method, load_backbone

    torch.manual_seed(0)
    method = build_method(name, load_backbone("tiny"), ["red circle", "blue square", "green triangle"])
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "b.safetensors")
    B.write_bundle(path, method.eval(), {})
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = method(x), B.load_bundle(path)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_killed_after_writing_leaves_no_bundle(runs, tmp_path):
    """Killed (as SIGKILL leaves it: base/files.py's fault injection) between writing the temp file and
    renaming it: no bundle under the name, only the temp file a kill leaves."""
    ckpt, _ = runs["coop"]
    out = tmp_path / "b.safetensors"
    r = subprocess.run([sys.executable, "-m", "ladder_clip", "export", "--checkpoint", ckpt, "--model", "tiny",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LADDER_CLIP_FAULT_AT": "2"})  # 1: create the temp file, 2: fsync it
    assert r.returncode == 137, r.stderr
    left = os.listdir(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".tmp-"), left
