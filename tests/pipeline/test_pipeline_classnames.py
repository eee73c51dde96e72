"""Issue 24 item 3 and issue 25 items 2, 9 (split files, folder names) and 12 (one class): class names
that are empty, or that the model would read as one class, are refused up front with one error line
naming them, in train and eval, from folders and split files."""
import json
import os

import pytest
from helpers import one_error, one_thread

from ladder_clip.cli import main
from ladder_clip.synthetic import make_imagefolder


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _data(root, classes):
    make_imagefolder(str(root), classes, train_per_class=1, test_per_class=1, size=36, seed=3)
    return str(root)


def _argv(data, out, *extra, method="coop"):
    return ["train", "--model", "tiny", "--data", str(data), "--method", method, "--shots", "1", "--epochs", "1",
            "--batch-size", "2", "--lr", "0.01", "--out", str(out), "--quiet", *extra]


LONG = "a very long class name that goes on and on past the context of the tiny model "
FOLDERS = [  # (class folders, words the error must hold)
    (["_", "blue_square"], ["'_'", "empty class name"]),
    (["__ _", "blue_square"], ["'__ _'", "empty"]),
    (["red_circle", "red circle"], ["'red circle'", "'red_circle'", "same class name"]),
    (["Cat", "cat"], ["'Cat'", "'cat'", "letter case"]),
    ([LONG + "one", LONG + "two"], ["context length"]),
]


@pytest.mark.parametrize("classes,needles", FOLDERS, ids=["underscore", "blank", "space", "case", "long"])
@pytest.mark.parametrize("method", ["coop", "zeroshot"])
def test_colliding_or_empty_class_folders(tmp_path, capsys, classes, needles, method):
    data = _data(tmp_path / "d", classes)
    one_error(capsys, main(_argv(data, tmp_path / "o", method=method)), *needles)
    assert not (tmp_path / "o" / "state").exists()


def test_a_truncated_name_warns(tmp_path, capsys):
    data = _data(tmp_path / "d", [LONG + "one", "cat"])
    assert main(_argv(data, tmp_path / "o", method="zeroshot")) == 0
    assert "fills the model's 64-token context" in capsys.readouterr().err


def test_eval_refuses_colliding_classes(tmp_path, capsys):
    good = _data(tmp_path / "good", ["red_circle", "blue_square"])
    assert main(_argv(good, tmp_path / "o")) == 0
    bad = _data(tmp_path / "bad", ["Dog", "dog"])
    capsys.readouterr()
    code = main(["eval", "--model", "tiny", "--data", bad, "--checkpoint", str(tmp_path / "o" / "prompt.safetensors"),
                 "--other-classes"])
    one_error(capsys, code, "'Dog'", "'dog'", "letter case")


def _split(tmp_path, train, test=None):
    data = _data(tmp_path / "d", ["red_circle", "blue_square"])
    rel = lambda c: os.path.join("train", c, "0000.png")  # noqa: E731
    default = [[rel("red_circle"), 0, "red_circle"], [rel("blue_square"), 1, "blue_square"]]
    path = tmp_path / "split.json"
    path.write_text(train if isinstance(train, str) else json.dumps({"train": train, "test": test or default}))
    return data, str(path)


def _ok_items():
    return [[os.path.join("train", "red_circle", "0000.png"), 0, "red_circle"],
            [os.path.join("train", "blue_square", "0000.png"), 1, "blue_square"]]


SPLITS = [  # (train list or raw text, words the error must hold)
    (lambda: 7, ["--split-json", "'train'", "7"]),
    (lambda: [], ["--split-json", "'train'", "non-empty"]),
    (lambda: [[1, 0, "red"], _ok_items()[1]], ["--split-json", "[1, 0, 'red']"]),
    (lambda: [[_ok_items()[0][0], 0, 5], _ok_items()[1]], ["--split-json", "5"]),
    (lambda: [[_ok_items()[0][0], 0, ""], _ok_items()[1]], ["--split-json", "''", "empty"]),
    (lambda: [_ok_items()[0], [_ok_items()[1][0], 1, "RED_CIRCLE"]], ["'red circle'", "'RED CIRCLE'"]),
    (lambda: "[" * 100000 + "]" * 100000, ["--split-json", "nested too deeply"]),
]


@pytest.mark.parametrize("make,needles", SPLITS, ids=["int", "empty", "path", "name", "blank", "case", "deep"])
def test_bad_split_json(tmp_path, capsys, make, needles):
    train = make()
    data, split = _split(tmp_path, train, train if isinstance(train, list) else _ok_items())
    one_error(capsys, main(_argv(data, tmp_path / "o", "--split-json", split)), *needles)


def test_non_utf8_class_folder(tmp_path, capsys):
    data = _data(tmp_path / "d", ["red_circle", "blue_square"])
    for split in ("train", "test"):
        os.rename(os.path.join(data, split, "blue_square"), os.path.join(data, split, "blue\udcff"))
    one_error(capsys, main(_argv(data, tmp_path / "o")), "not UTF-8", "\\xff")


def test_one_class_warns_and_base_to_new_names_itself(tmp_path, capsys):
    data = _data(tmp_path / "d", ["red_circle"])
    assert main(_argv(data, tmp_path / "o")) == 0
    assert "only one class" in capsys.readouterr().err
    one_error(capsys, main(_argv(data, tmp_path / "o2", "--base-to-new")), "--base-to-new", "2 classes")
