"""CoOp's 11 datasets and the four ImageNet variants, read from the folders CoOp's DATASETS.md and its
Dassl readers (CoOp's datasets/*.py) lay out, by CoOp's config names (configs/datasets/<name>.yaml).

--data is the dataset's own folder (DIR/split_zhou_OxfordPets.json + DIR/images/) or the folder holding
it under CoOp's folder name ($DATA/oxford_pets/). ImageNet's labels are its wnids sorted (CoOp's reader
enumerates the sorted train/ folders), its names from classnames.txt, val/ its test split. The variants
are test-only; each class is an ImageNet class, so each also records its ImageNet label (the wnid's rank
in classnames.txt, sorted): a checkpoint trained on imagenet scores them with its own class names."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..base.errors import UserError
from . import datasets
from .datasets import Item, check_names, load_split_json

LINE = "lines 'n01440764 tench'"


@dataclass(frozen=True)
class Spec:
    name: str            # CoOp's config name
    folder: str          # CoOp's folder under $DATA
    coop: str            # CoOp's dataset class: the key of its template (methods/prompts.py TEMPLATES)
    kind: str            # split (a split_zhou file), aircraft, imagenet, v2 (numbered folders), variant (wnids)
    images: str          # the image folder in the dataset folder ("" : the folder itself)
    split_file: str = ""

    @property
    def test_only(self) -> bool:
        return self.kind in ("v2", "variant")

    def layout(self) -> str:
        """What the dataset folder holds, in one clause."""
        img = f"{self.images}/" if self.images else "the image folders"
        if self.kind == "split":
            return f"{self.split_file} and {img} (its paths are relative to {img})"
        if self.kind == "aircraft":
            return "variants.txt, images_variant_train.txt, images_variant_test.txt and images/<id>.jpg"
        if self.kind == "imagenet":
            return f"classnames.txt ({LINE}), images/train/<wnid>/ and images/val/<wnid>/"
        if self.kind == "v2":
            return f"{img}<0..999>/ (ImageNet's class indices) and classnames.txt ({LINE})"
        return f"{img}<wnid>/ and classnames.txt ({LINE})"


SPECS = {s.name: s for s in (
    Spec("imagenet", "imagenet", "ImageNet", "imagenet", "images"),
    Spec("caltech101", "caltech-101", "Caltech101", "split", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    Spec("oxford_pets", "oxford_pets", "OxfordPets", "split", "images", "split_zhou_OxfordPets.json"),
    Spec("stanford_cars", "stanford_cars", "StanfordCars", "split", "", "split_zhou_StanfordCars.json"),
    Spec("oxford_flowers", "oxford_flowers", "OxfordFlowers", "split", "jpg", "split_zhou_OxfordFlowers.json"),
    Spec("food101", "food-101", "Food101", "split", "images", "split_zhou_Food101.json"),
    Spec("fgvc_aircraft", "fgvc_aircraft", "FGVCAircraft", "aircraft", "images"),
    Spec("sun397", "sun397", "SUN397", "split", "SUN397", "split_zhou_SUN397.json"),
    Spec("dtd", "dtd", "DescribableTextures", "split", "images", "split_zhou_DescribableTextures.json"),
    Spec("eurosat", "eurosat", "EuroSAT", "split", "2750", "split_zhou_EuroSAT.json"),
    Spec("ucf101", "ucf101", "UCF101", "split", "UCF-101-midframes", "split_zhou_UCF101.json"),
    Spec("imagenetv2", "imagenetv2", "ImageNetV2", "v2", "imagenetv2-matched-frequency-format-val"),
    Spec("imagenet_sketch", "imagenet-sketch", "ImageNetSketch", "variant", "images"),
    Spec("imagenet_a", "imagenet-adversarial", "ImageNetA", "variant", "imagenet-a"),
    Spec("imagenet_r", "imagenet-rendition", "ImageNetR", "variant", "imagenet-r"),
)}
DATASETS = tuple(SPECS)
TEST_ONLY = tuple(n for n, s in SPECS.items() if s.test_only)
# other spellings users write: the papers' names, CoOp's class and folder names, the release names
_ALIASES = {
    "pets": "oxford_pets", "oxfordpets": "oxford_pets", "flowers": "oxford_flowers",
    "flowers102": "oxford_flowers", "oxford_flowers102": "oxford_flowers", "oxfordflowers": "oxford_flowers",
    "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft", "cars": "stanford_cars",
    "stanfordcars": "stanford_cars", "caltech": "caltech101", "caltech_101": "caltech101", "food": "food101",
    "food_101": "food101", "sun": "sun397", "describabletextures": "dtd", "textures": "dtd",
    "ucf": "ucf101", "ucf_101": "ucf101", "imagenet_v2": "imagenetv2", "imagenetsketch": "imagenet_sketch",
    "sketch": "imagenet_sketch", "imageneta": "imagenet_a", "imagenet_adversarial": "imagenet_a",
    "imagenetr": "imagenet_r", "imagenet_rendition": "imagenet_r",
}


def canonical(name: str, where: str = "--dataset") -> str:
    """CoOp's config name of `name` (case-insensitive, '-' or ' ' for '_', the aliases above)."""
    key = "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())
    key = key if key in SPECS else _ALIASES.get(key, "")
    if not key:
        raise UserError(f"{where} {name!r}: unknown dataset; known: {', '.join(DATASETS)}")
    return key


@dataclass
class CoopDataset:
    name: str
    root: str                              # the dataset's folder
    classnames: List[str]
    splits: Dict[str, List[Item]]          # "train" and "test", or "test" alone (a test-only set)
    imagenet_labels: Optional[List[int]] = None  # variants: each class's ImageNet label
    imagenet_names: Optional[List[str]] = None  # variants: classnames.txt's names by ImageNet label
    imagenet_size: int = 0                 # variants: the classes of classnames.txt (ImageNet's 1000)


def load_dataset(name: str, data: str,
                 classnames_file: Optional[str] = None) -> Tuple[List[str], Dict[str, List[Item]]]:
    """(class names, {"train": [(path, label)], "test": [...]}) of CoOp's dataset `name` under `data`
    (the dataset folder or its parent); a test-only set has no "train"."""
    d = read_dataset(name, data, classnames_file)
    return d.classnames, d.splits


def load_data(data: str, split_json: Optional[str] = None, dataset: Optional[str] = None,
              classnames_file: Optional[str] = None) -> Tuple[List[str], Dict[str, List[Item]]]:
    """(classnames, splits) of --data: CoOp's dataset `dataset` (its splits may lack "train"), else a CoOp
    split file or an ImageFolder (datasets.load_data)."""
    if dataset:
        return load_dataset(dataset, data, classnames_file)
    return datasets.load_data(data, split_json)


def read_dataset(name: str, data: str, classnames_file: Optional[str] = None) -> CoopDataset:
    spec = SPECS[canonical(name)]
    where = f"--data {data!r}"
    root = find_root(spec, data)
    if spec.kind == "split":
        images = _folder(os.path.join(root, spec.images), where, spec, "the images its split file names")
        names, splits = load_split_json(images, os.path.join(root, spec.split_file),
                                        where=f"{where}: {os.path.join(root, spec.split_file)}")
        first = splits["train"][0][0]
        if not os.path.exists(first):  # a wrong image folder: one line, not a warning per image
            raise UserError(f"{where}: {first} does not exist (expected the {spec.name} images of "
                            f"{spec.split_file} under {images})")
        return CoopDataset(spec.name, root, names, {k: splits[k] for k in ("train", "test")})
    if spec.kind == "aircraft":
        return _aircraft(spec, root, where)
    wnids = _read_classnames(spec, root, data, classnames_file)
    if spec.kind == "imagenet":
        return _imagenet(spec, root, where, wnids)
    return _variant(spec, root, where, wnids)


def find_root(spec: Spec, data: str) -> str:
    """The dataset folder: `data` itself when it holds the dataset's marker file or folder, else
    data/<CoOp's folder name>."""
    where = f"--data {data!r}"
    if os.path.exists(data) and not os.path.isdir(data):
        raise UserError(f"{where} is a file, not a folder (expected the {spec.name} folder: {spec.layout()})")
    if not os.path.isdir(data):
        raise UserError(f"{where}: no such folder")
    marker = {"split": spec.split_file, "aircraft": "variants.txt", "imagenet": "classnames.txt"}.get(
        spec.kind, spec.images)
    for root in (data, os.path.join(data, spec.folder)):
        if os.path.exists(os.path.join(root, marker)) or (spec.kind == "imagenet" and _imagenet_images(root)):
            return root
    raise UserError(f"{where}: expected {os.path.join(data, marker)} for {spec.name} (the {spec.name} folder "
                    f"holds {spec.layout()}), or {os.path.join(data, spec.folder)}/ holding them, as CoOp's "
                    "DATASETS.md lays it out")


def _folder(path: str, where: str, spec: Spec, what: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"{where}: expected {path}/ ({what}) for {spec.name}")
    return path


def _class_folders(path: str, where: str, spec: Spec, what: str) -> Dict[str, List[str]]:
    """{sub folder: its files, sorted}, sub folders sorted; files beside them (README.txt) are skipped."""
    _folder(path, where, spec, what)
    out = {}
    # scandir's entries know their type without a stat per file: ImageNet's train/ has 1.28M of them
    with os.scandir(path) as entries:
        folders = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    for d in folders:
        with os.scandir(os.path.join(path, d)) as entries:
            out[d] = sorted(e.path for e in entries if not e.name.startswith(".") and e.is_file())
    if not out:
        raise UserError(f"{where}: {path}/ has no class folders (expected {what}) for {spec.name}")
    empty = [d for d, fs in out.items() if not fs]
    if empty:
        raise UserError(f"{where}: class folder(s) {empty[:5]} of {path}/ have no images")
    return out


def _read_classnames(spec: Spec, root: str, data: str, given: Optional[str]) -> Dict[str, str]:
    """classnames.txt as {wnid: name} in its order: --classnames, else the dataset folder's, else (a
    variant) the one in the imagenet folder beside it, which DATASETS.md says to copy."""
    where = f"--data {data!r}"
    tried = [given] if given else [os.path.join(root, "classnames.txt")]
    if not given and spec.kind != "imagenet":
        tried.append(os.path.join(os.path.dirname(os.path.abspath(root)), "imagenet", "classnames.txt"))
    path = next((p for p in tried if os.path.isfile(p)), None)
    if path is None:
        if given:
            raise UserError(f"--classnames {given!r}: no such file (expected {LINE})")
        also = f" or {tried[1]}" if len(tried) > 1 else ""
        raise UserError(f"{where}: expected {tried[0]} ({LINE}) for {spec.name}{also}, or pass --classnames FILE")
    out: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise UserError(f"{path}: line {i} {line.strip()[:40]!r} has no class name (expected {LINE})")
        if wnid in out:
            raise UserError(f"{path}: line {i}: {wnid} is listed twice")
        out[wnid] = name.strip()
    if not out:
        raise UserError(f"{path}: no classes (expected {LINE})")
    return out


def _imagenet_images(root: str) -> Optional[str]:
    """Where train/ and val/ are: root/images (DATASETS.md) or root itself (an ImageNet as extracted)."""
    for base in (os.path.join(root, "images"), root):
        if os.path.isdir(os.path.join(base, "train")):
            return base
    return None


def _imagenet(spec: Spec, root: str, where: str, wnids: Dict[str, str]) -> CoopDataset:
    base = _imagenet_images(root)
    if base is None:
        raise UserError(f"{where}: expected {os.path.join(root, 'images', 'train')}/<wnid>/ and "
                        f"{os.path.join(root, 'images', 'val')}/<wnid>/ for imagenet")
    train = _class_folders(os.path.join(base, "train"), where, spec, "train/<wnid>/<image>")
    test = _class_folders(os.path.join(base, "val"), where, spec,
                          "val/<wnid>/<image>: the validation images in wnid folders, as train/")
    unknown = [w for w in train if w not in wnids]
    if unknown:
        raise UserError(f"{where}: {os.path.join(base, 'train')}/ folder(s) {unknown[:3]} are not in classnames.txt "
                        f"({len(wnids)} wnids)")
    if list(test) != list(train):
        only_train, only_val = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise UserError(f"{where}: wnid folders differ between train/ and val/ (only in train: {only_train[:3]}, "
                        f"only in val: {only_val[:3]})")
    folders = list(train)
    splits = {s: [(f, label) for label, w in enumerate(folders) for f in files[w]]
              for s, files in (("train", train), ("test", test))}
    names = check_names([wnids[w] for w in folders], f"{where}: classnames.txt", "class name")
    return CoopDataset(spec.name, root, names, splits)


def _variant(spec: Spec, root: str, where: str, wnids: Dict[str, str]) -> CoopDataset:
    """A test-only set whose classes are ImageNet classes: -Sketch, -A, -R by wnid folders, V2 by
    ImageNet's class index (its folders 0..999); CoOp's readers keep only the classes present (-A and
    -R: 200), labelled 0.. in ImageNet's order."""
    order = sorted(wnids)  # ImageNet's class indices: the wnids sorted
    images = os.path.join(root, spec.images)
    if spec.kind == "v2":
        folders = _class_folders(images, where, spec, "<0..999>/<image>")
        bad = [d for d in folders if not (d.isdigit() and int(d) < len(order))]
        if bad:
            raise UserError(f"{where}: {images}/ folder(s) {bad[:3]} are not class indices 0..{len(order) - 1} "
                            f"(classnames.txt has {len(order)} classes)")
        by_label = {int(d): files for d, files in folders.items()}
    else:
        folders = _class_folders(images, where, spec, "<wnid>/<image>")
        bad = [d for d in folders if d not in wnids]
        if bad:
            raise UserError(f"{where}: {images}/ folder(s) {bad[:3]} are not in classnames.txt ({len(wnids)} wnids)")
        rank = {w: i for i, w in enumerate(order)}
        by_label = {rank[d]: files for d, files in folders.items()}
    labels = sorted(by_label)
    test = [(f, i) for i, label in enumerate(labels) for f in by_label[label]]
    names = check_names([wnids[order[label]] for label in labels], f"{where}: classnames.txt", "class name")
    return CoopDataset(spec.name, root, names, {"test": test}, labels, [wnids[w] for w in order], len(order))


def _aircraft(spec: Spec, root: str, where: str) -> CoopDataset:
    """FGVC-Aircraft as released: variants.txt (one class a line) and images_variant_<split>.txt
    ('<image id> <variant>' lines) beside images/<id>.jpg; CoOp reads the 100 variants."""
    def lines(name: str) -> List[str]:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise UserError(f"{where}: expected {path} for fgvc_aircraft ({spec.layout()})")
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]

    classes = lines("variants.txt")
    label = {c: i for i, c in enumerate(classes)}
    images = _folder(os.path.join(root, "images"), where, spec, "<id>.jpg")
    splits = {}
    for split in ("train", "test"):
        name = f"images_variant_{split}.txt"
        items = []
        for line in lines(name):
            image, _, variant = line.partition(" ")
            if variant not in label:
                raise UserError(f"{where}: {name}: {line[:60]!r}: variant {variant!r} is not in variants.txt")
            items.append((os.path.join(images, image + ".jpg"), label[variant]))
        splits[split] = items
    return CoopDataset(spec.name, root, check_names(classes, f"{where}: variants.txt", "class name"), splits)
