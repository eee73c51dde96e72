"""Data as CoOp reads it: split-json class names with spaces, short classes kept whole, the saved few-shot
file relative to the data folder; and the one-command base-to-new protocol with its harmonic mean."""
import json
import os

import pytest

from ladder_clip import data as D
from ladder_clip.base.errors import UserError
from ladder_clip.checkpoint import read_checkpoint
from ladder_clip.cli import main
from ladder_clip.report import harmonic_mean
from ladder_clip.synthetic import make_imagefolder

CLASSES = ["red_circle", "blue_square", "green_triangle", "yellow_cross"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An image folder plus a CoOp split file for it, where the last class has a single training image."""
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(str(root), CLASSES, train_per_class=3, test_per_class=2, size=36, seed=4)
    split = {}
    for part in ("train", "test"):
        split[part] = [[f"{part}/{c}/{f}", label, c] for label, c in enumerate(CLASSES)
                       for f in sorted(os.listdir(root / part / c))
                       if not (part == "train" and label == 3 and f != "0000.png")]
    split["val"] = []
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def test_split_json_class_names_get_spaces(data):
    names, splits = D.load_split_json(str(data), str(data / "split_zhou_OxfordPets.json"))
    assert names == ["red circle", "blue square", "green triangle", "yellow cross"]
    assert len(splits["train"]) == 10


def test_split_json_val_is_read_when_present(data, tmp_path):
    """CoOp's 'val' list (the linear probe's C search) is kept when the file has one; an empty one is absent,
    and a val label that train lacks is one error."""
    assert "val" not in D.load_split_json(str(data), str(data / "split_zhou_OxfordPets.json"))[1]
    split = json.loads((data / "split_zhou_OxfordPets.json").read_text())
    split["val"] = split["test"][:2]
    (tmp_path / "s.json").write_text(json.dumps(split))
    assert D.load_split_json(str(data), str(tmp_path / "s.json"))[1]["val"] == \
        [(os.path.join(str(data), p), label) for p, label, _ in split["test"][:2]]
    split["train"] = [e for e in split["train"] if e[1] != split["val"][0][1]]
    split["test"] = [e for e in split["test"] if e[1] != split["val"][0][1]]
    (tmp_path / "s.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match="'val' has labels"):
        D.load_split_json(str(data), str(tmp_path / "s.json"))


def test_short_class_is_kept_whole_with_a_warning(data):
    names, splits = D.load_split_json(str(data), str(data / "split_zhou_OxfordPets.json"))
    with pytest.warns(UserWarning, match="yellow cross"):
        items = D.few_shot(splits["train"], 2, 1, names)
    counts = [sum(1 for _, l in items if l == c) for c in range(4)]
    assert counts == [2, 2, 2, 1]


def test_saved_fewshot_paths_are_relative_to_the_data_folder(data, tmp_path, monkeypatch):
    items = [(str(data / "train" / "red_circle" / "0001.png"), 0)]
    text = D.fewshot_json(items, str(data))
    assert json.loads(text)["items"] == [[os.path.join("train", "red_circle", "0001.png"), 0]]
    monkeypatch.chdir(tmp_path)  # read back from elsewhere: still the data folder's file
    assert D.parse_fewshot(text, str(data), 1, "x") == items


def test_base_to_new_in_one_command(data, tmp_path, capsys):
    out = tmp_path / "b2n"
    code = main(["train", "--model", "tiny", "--data", str(data), "--split-json",
                 str(data / "split_zhou_OxfordPets.json"), "--method", "coop", "--shots", "2", "--epochs", "1",
                 "--out", str(out), "--quiet", "--opt", "n_ctx=2", "--base-to-new"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["classnames"] == ["red circle", "blue square"]
    assert m["new_classnames"] == ["green triangle", "yellow cross"]
    assert m["test_images"] == 4 and m["new_test_images"] == 4 and m["train_images"] == 4
    assert m["harmonic_mean"] == pytest.approx(harmonic_mean(m["base_accuracy"], m["new_accuracy"]))
    assert m["accuracy"] == m["base_accuracy"]
    header, _ = read_checkpoint(str(out / "prompt.safetensors"))
    assert header["classnames"] == ["red circle", "blue square"]
    printed = capsys.readouterr().out
    assert f"harmonic mean {m['harmonic_mean']:.4f}" in printed and f"new accuracy {m['new_accuracy']:.4f}" in printed
    assert os.path.isfile(out / "fewshot_base_2shot_seed1.json")


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4) and harmonic_mean(0.0, 0.0) == 0.0


@pytest.mark.parametrize("extra,needle", [(["--subsample", "base"], "--base-to-new"),
                                          (["--opt", "csc=true"], "csc")])
def test_base_to_new_conflicts_are_one_error(data, tmp_path, capsys, extra, needle):
    code = main(["train", "--model", "tiny", "--data", str(data), "--method", "coop", "--out", str(tmp_path),
                 "--base-to-new", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err
