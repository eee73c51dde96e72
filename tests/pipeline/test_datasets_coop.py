"""CoOp's 15 datasets by name (`--dataset`), each laid out in miniature as CoOp's DATASETS.md and its readers
expect (the real folder and file names, 2-3 classes, a few generated images): class names, labels and
splits as read; the test-only ImageNet variants scored by a checkpoint trained on `imagenet` (domain
generalisation); cross-dataset transfer; and one error line naming the expected path for a bad layout."""
import json
import os
import random
import re
import shutil
import zlib

import pytest

from helpers import one_error
from ladder_clip import data as D
from ladder_clip.base.errors import UserError
from ladder_clip.cli import main
from ladder_clip.data.coop_datasets import SPECS
from ladder_clip.data.synthetic import COLOURS, draw_shape
from ladder_clip.engine.config import TrainConfig
from ladder_clip.methods.prompts import coop_template

# ImageNet's first wnids with names the tiny pretrained CLIP can read (a colour and a shape)
WNIDS = {"n01440764": "red square", "n01443537": "blue circle", "n01484850": "green triangle"}
SUBSET = {"imagenet_a": ["n01443537", "n01484850"], "imagenet_r": ["n01440764", "n01484850"]}


def _image(path, name, seed):
    colour, _, shape = name.replace("_", " ").partition(" ")
    colour, shape = (colour, shape) if colour in COLOURS else ("yellow", "cross")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    draw_shape(random.Random(seed), COLOURS[colour], shape, 32).save(path, format="JPEG" if path.lower().endswith(
        (".jpg", ".jpeg")) else "PNG")


def _seed(*parts) -> int:  # the same images in every run (hash() of a str is salted per process)
    return zlib.crc32(repr(parts).encode())


def _classnames(path, order=None):
    with open(path, "w") as f:
        f.writelines(f"{w} {WNIDS[w]}\n" for w in order or WNIDS)


def make_imagenet(root, train=3, val=3):
    """ROOT/imagenet/{classnames.txt, images/train/<wnid>/, images/val/<wnid>/} as DATASETS.md has it."""
    d = os.path.join(root, "imagenet")
    os.makedirs(d, exist_ok=True)
    _classnames(os.path.join(d, "classnames.txt"))
    for k, (w, name) in enumerate(WNIDS.items()):
        for i in range(train):
            _image(os.path.join(d, "images", "train", w, f"{w}_{i}.JPEG"), name, 100 * k + i)
        for i in range(val):
            _image(os.path.join(d, "images", "val", w, f"ILSVRC2012_val_{10 * k + i:08d}.JPEG"), name, 99 + 10 * k + i)
    return d


def make_variants(root):
    """The four test-only sets under ROOT as their releases and DATASETS.md lay them out: -Sketch and -V2
    hold copies of ImageNet's val images (so they must score exactly as val does), -A and -R two of the
    three classes, with a README.txt beside the class folders as released."""
    val = os.path.join(root, "imagenet", "images", "val")
    for k, w in enumerate(sorted(WNIDS)):
        shutil.copytree(os.path.join(val, w), os.path.join(root, "imagenet-sketch", "images", w))
        shutil.copytree(os.path.join(val, w),
                        os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val", str(k)))
    for name, folder, images in (("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                 ("imagenet_r", "imagenet-rendition", "imagenet-r")):
        for w in SUBSET[name]:
            for i in range(3):
                _image(os.path.join(root, folder, images, w, f"{i}.jpg"), WNIDS[w], _seed(name, w, i))
        with open(os.path.join(root, folder, images, "README.txt"), "w") as f:
            f.write("released with the images\n")
    for folder in ("imagenet-sketch", "imagenetv2", "imagenet-adversarial", "imagenet-rendition"):
        shutil.copy(os.path.join(root, "imagenet", "classnames.txt"), os.path.join(root, folder))


SPLIT_CLASSES = ["american_bulldog", "abyssinian", "beagle"]  # CoOp's split files write underscores


def make_split_dataset(root, spec):
    """ROOT/<CoOp's folder>/{<split file>, <image folder>/...} with train, val and test entries."""
    d = os.path.join(root, spec.folder)
    split = {}
    for part, n in (("train", 3), ("val", 1), ("test", 2)):
        split[part] = []
        for label, c in enumerate(SPLIT_CLASSES):
            for i in range(n):
                rel = f"{c}/{part}_{i}.jpg" if spec.images else f"cars_{part}/{label}_{i}.jpg"
                _image(os.path.join(d, spec.images, rel), c, _seed(spec.name, part, c, i))
                split[part].append([rel, label, c])
    with open(os.path.join(d, spec.split_file), "w") as f:
        json.dump(split, f)
    return d


def make_aircraft(root):
    d = os.path.join(root, "fgvc_aircraft")
    variants = ["707-320", "A300B4", "F-16A/B"]
    os.makedirs(os.path.join(d, "images"))
    with open(os.path.join(d, "variants.txt"), "w") as f:
        f.writelines(v + "\n" for v in variants)
    for part, n in (("train", 2), ("val", 1), ("test", 2)):
        with open(os.path.join(d, f"images_variant_{part}.txt"), "w") as f:
            for k, v in enumerate(variants):
                for i in range(n):
                    image = f"{len(part)}{k}{i:05d}"
                    _image(os.path.join(d, "images", image + ".jpg"), "blue square", k * 10 + i)
                    f.write(f"{image} {v}\n")
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("DATA"))
    make_imagenet(r)
    make_variants(r)
    for spec in SPECS.values():
        if spec.kind == "split":
            make_split_dataset(r, spec)
    make_aircraft(r)
    return r


def test_names_are_coops_config_names_with_aliases():
    assert D.DATASETS == ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
                          "imagenet_a", "imagenet_r")
    assert set(D.TEST_ONLY) == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    for alias, name in (("ImageNet-A", "imagenet_a"), ("imagenet-r", "imagenet_r"), ("Flowers102", "oxford_flowers"),
                        ("pets", "oxford_pets"), ("aircraft", "fgvc_aircraft"), ("cars", "stanford_cars"),
                        ("OXFORD-PETS", "oxford_pets"), ("imagenet-sketch", "imagenet_sketch"),
                        ("ImageNetV2", "imagenetv2"), ("caltech-101", "caltech101"), ("food-101", "food101")):
        assert D.canonical(alias) == name
    with pytest.raises(UserError, match="unknown dataset; known: imagenet, caltech101, .*imagenet_r$"):
        D.canonical("cifar10")


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.kind == "split"])
def test_split_file_datasets(root, name):
    spec = SPECS[name]
    folder = os.path.join(root, spec.folder)
    for data in (root, folder):  # the parent $DATA, or the dataset's folder itself
        names, splits = D.load_dataset(name, data)
        assert names == ["american bulldog", "abyssinian", "beagle"]
        assert set(splits) == {"train", "test"}  # CoOp's val is not used
        assert [len(splits["train"]), len(splits["test"])] == [9, 6]
        assert sorted({label for _, label in splits["test"]}) == [0, 1, 2]
        for path, label in splits["train"] + splits["test"]:
            assert os.path.isfile(path) and path.startswith(os.path.join(folder, spec.images))
            if spec.images:
                assert os.path.basename(os.path.dirname(path)) == SPLIT_CLASSES[label]


def test_fgvc_aircraft_reads_the_variant_files(root):
    names, splits = D.load_dataset("fgvc_aircraft", root)
    assert names == ["707-320", "A300B4", "F-16A/B"]
    assert [len(splits["train"]), len(splits["test"])] == [6, 6]
    assert all(os.path.isfile(p) and p.endswith(".jpg") for p, _ in splits["train"] + splits["test"])


def test_imagenet_wnid_folders_and_classnames(root, tmp_path):
    names, splits = D.load_dataset("imagenet", root)
    assert names == list(WNIDS.values())
    assert set(splits) == {"train", "test"}
    for split, folder in (("train", "train"), ("test", "val")):  # val/ is the test split
        assert len(splits[split]) == 9
        for path, label in splits[split]:
            assert path.split(os.sep)[-3:-1] == [folder, sorted(WNIDS)[label]]
    # classnames.txt in another order: labels stay the wnids sorted (CoOp's sorted folders); an ImageNet
    # extracted as DIR/train + DIR/val (no images/) is read too
    d = tmp_path / "imagenet"
    shutil.copytree(os.path.join(root, "imagenet", "images"), d)
    _classnames(d / "classnames.txt", order=list(reversed(WNIDS)))
    assert D.load_dataset("imagenet", str(d)) == (names, {s: [(p.replace(os.path.join(root, "imagenet", "images"),
                                                                       str(d)), l) for p, l in items]
                                                          for s, items in splits.items()})


@pytest.mark.parametrize("name", ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_imagenet_variants_are_test_only_and_map_to_imagenet(root, name):
    ds = D.read_dataset(name, root)
    assert set(ds.splits) == {"test"} and ds.imagenet_size == 3
    wnids = SUBSET.get(name, sorted(WNIDS))
    assert ds.classnames == [WNIDS[w] for w in wnids]
    assert ds.imagenet_labels == [sorted(WNIDS).index(w) for w in wnids]
    assert sorted({label for _, label in ds.splits["test"]}) == list(range(len(wnids)))
    for path, label in ds.splits["test"]:
        folder = os.path.basename(os.path.dirname(path))
        assert folder == (str(ds.imagenet_labels[label]) if name == "imagenetv2" else wnids[label])


def test_variant_finds_imagenets_classnames_beside_it_or_given(root, tmp_path):
    d = tmp_path / "imagenet-sketch"
    shutil.copytree(os.path.join(root, "imagenet-sketch", "images"), d / "images")
    with pytest.raises(UserError, match=re.escape(f"expected {d / 'classnames.txt'} (lines 'n01440764 tench')")):
        D.load_dataset("imagenet-sketch", str(d))
    assert D.load_dataset("imagenet-sketch", str(d), os.path.join(root, "imagenet", "classnames.txt"))[0] == \
        list(WNIDS.values())
    shutil.copytree(os.path.join(root, "imagenet"), tmp_path / "imagenet")  # DATASETS.md's $DATA/imagenet
    assert D.load_dataset("imagenet_sketch", str(tmp_path))[0] == list(WNIDS.values())


def test_dataset_picks_coops_template():
    def template(name):
        cfg = TrainConfig(model="tiny", data="x", method="zeroshot", out="o", dataset=name)
        return cfg.method_options["template"]
    assert template("oxford-pets") == "a photo of a {}, a type of pet."
    assert template("eurosat") == "a centered satellite photo of {}."
    assert template("dtd") == "{} texture."
    assert template("ImageNet") == "a photo of a {}."
    assert {coop_template(s.coop) for s in SPECS.values() if s.test_only} == {"a photo of a {}."}


def _accuracy(capsys):
    out = capsys.readouterr().out
    m = re.search(r"accuracy ([0-9.]+) on (\d+) test images \((\d+) classes\)", out)
    assert m, out
    return float(m.group(1)), int(m.group(2)), int(m.group(3))


def test_domain_generalisation_and_cross_dataset(root, tmp_path, capsys):
    """Train on imagenet, score the same checkpoint on the four variants (no training split) and, with
    --other-classes, on another dataset."""
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-pretrained", "--dataset", "imagenet", "--data", root, "--method", "coop",
                 "--shots", "2", "--epochs", "1", "--batch-size", "3", "--out", str(out), "--quiet",
                 "--opt", "n_ctx=2"]) == 0
    capsys.readouterr()
    ckpt = ["--model", "tiny-pretrained", "--checkpoint", str(out / "prompt.safetensors")]
    assert main(["eval", "--dataset", "imagenet", "--data", os.path.join(root, "imagenet"), *ckpt]) == 0
    acc, images, classes = _accuracy(capsys)
    assert (images, classes) == (9, 3) and acc > 0.5  # the pretrained model reads colour x shape names
    for name in ("imagenet-sketch", "imagenetv2"):  # the val images again: the same accuracy exactly
        assert main(["eval", "--dataset", name, "--data", root, *ckpt]) == 0
        assert _accuracy(capsys) == (acc, 9, 3)
    subset = {}
    for name in ("imagenet-a", "imagenet-r"):  # two of the three classes, scored over those two
        assert main(["eval", "--dataset", name, "--data", root, *ckpt]) == 0
        subset[name] = _accuracy(capsys)
        assert subset[name][1:] == (6, 2) and subset[name][0] > 0.5
    # another edition of the names in the variant's classnames.txt: the checkpoint's names score it
    renamed = tmp_path / "imagenet-adversarial"
    shutil.copytree(os.path.join(root, "imagenet-adversarial"), renamed)
    (renamed / "classnames.txt").write_text((renamed / "classnames.txt").read_text().replace("blue circle", "goldfish"))
    assert D.load_dataset("imagenet_a", str(renamed))[0] == ["goldfish", "green triangle"]
    assert main(["eval", "--dataset", "imagenet_a", "--data", str(renamed), *ckpt]) == 0
    assert _accuracy(capsys) == subset["imagenet-a"]
    # an export of the imagenet checkpoint scores the variants alike, from its stored text features
    bundle = str(tmp_path / "in.bundle")
    assert main(["export", *ckpt, "--out", bundle]) == 0
    for name in ("imagenet-a", "imagenet-sketch"):
        assert main(["eval", "--dataset", name, "--data", root, "--bundle", bundle]) == 0
        assert _accuracy(capsys) == (subset[name] if name in subset else (acc, 9, 3))
    assert main(["eval", "--dataset", "pets", "--data", root, "--other-classes", *ckpt]) == 0
    assert _accuracy(capsys)[1:] == (6, 3)
    # a test-only set cannot be trained on
    code = main(["train", "--model", "tiny", "--dataset", "imagenet_a", "--data", root, "--method", "coop",
                 "--out", str(tmp_path / "no")])
    one_error(capsys, code, "--dataset imagenet_a is test-only", "train on --dataset imagenet")


@pytest.fixture(scope="module")
def pets(root, tmp_path_factory):
    """A checkpoint trained on oxford_pets (3 classes, not ImageNet's)."""
    out = tmp_path_factory.mktemp("pets")
    assert main(["train", "--model", "tiny", "--dataset", "oxford_pets", "--data", root, "--method", "coop",
                 "--shots", "1", "--epochs", "1", "--out", str(out), "--quiet", "--opt", "n_ctx=2"]) == 0
    return str(out / "prompt.safetensors")


def test_variant_needs_an_imagenet_checkpoint(root, pets, capsys):
    capsys.readouterr()
    code = main(["eval", "--model", "tiny", "--dataset", "imagenet_r", "--data", root, "--checkpoint", pets])
    one_error(capsys, code, "--dataset imagenet_r", "checkpoint trained on --dataset imagenet", "--other-classes")


def _bad(tmp_path, build):
    d = tmp_path / "bad"
    d.mkdir()
    build(d)
    return str(d)


@pytest.mark.parametrize("name,build,expected", [
    ("imagenet", lambda d: (d / "images" / "train" / "n01440764").mkdir(parents=True),
     "{d}/classnames.txt (lines 'n01440764 tench') for imagenet"),
    ("imagenet", lambda d: _classnames(d / "classnames.txt"),
     "expected {d}/images/train/<wnid>/ and {d}/images/val/<wnid>/ for imagenet"),
    ("imagenet", lambda d: (_classnames(d / "classnames.txt"),
                            _image(str(d / "images" / "train" / "n01440764" / "a.JPEG"), "red square", 1)),
     "expected {d}/images/val/ (val/<wnid>/<image>"),
    ("oxford_pets", lambda d: (d / "images").mkdir(),
     "expected {d}/split_zhou_OxfordPets.json for oxford_pets (the oxford_pets folder holds "
     "split_zhou_OxfordPets.json and images/ (its paths are relative to images/)), or {d}/oxford_pets/"),
    ("eurosat", lambda d: (d / "split_zhou_EuroSAT.json").write_text("{}"), "expected {d}/2750/"),
    ("imagenet-a", lambda d: ((d / "imagenet-a").mkdir(), _classnames(d / "classnames.txt")),
     "{d}/imagenet-a/ has no class folders"),
    ("imagenet-a", lambda d: (d / "imagenet-a" / "n01440764").mkdir(parents=True),
     "expected {d}/classnames.txt (lines 'n01440764 tench') for imagenet_a or "),
    ("imagenetv2", lambda d: (_classnames(d / "classnames.txt"), _image(
        str(d / "imagenetv2-matched-frequency-format-val" / "7" / "a.jpg"), "red square", 1)),
     "folder(s) ['7'] are not class indices 0..2"),
    ("imagenet-r", lambda d: None, "expected {d}/imagenet-r for imagenet_r"),
    ("fgvc_aircraft", lambda d: (d / "variants.txt").write_text("707-320\n"),
     "expected {d}/images/ (<id>.jpg) for fgvc_aircraft"),
    ("cifar10", lambda d: None, "--dataset 'cifar10': unknown dataset; known: imagenet, caltech101"),
])
def test_bad_layout_is_one_error_line_naming_the_expected_path(tmp_path, pets, capsys, name, build, expected):
    d = _bad(tmp_path, build)
    capsys.readouterr()
    code = main(["eval", "--model", "tiny", "--dataset", name, "--data", d, "--checkpoint", pets])
    one_error(capsys, code, expected.format(d=d))


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_lists_every_dataset(capsys, command):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in D.DATASETS) and "--classnames FILE" in text
    assert "the folder holding it under CoOp's name" in text
