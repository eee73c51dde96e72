"""Datasets: ImageFolder (`train/<class>/*`, `test/<class>/*`) or a CoOp split_*.json, few-shot sampling saved
for reproducibility, the base-to-new class split (the transforms: transforms.py; the loader: loader.py)."""
import json
import math
import os
import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ..base import files
from ..base.errors import UserError
from .images import size_problem

Item = Tuple[str, int]


def _classname(folder: str) -> str:
    return folder.replace("_", " ").strip()


def check_names(raw: Sequence[str], where: str, what: str = "class folder") -> List[str]:
    """The class names of `raw` (folder names or a split file's names): underscores become spaces, as
    CoOp reads them. A name left empty, or two raw names giving one class name, is an error naming them
    (one class could never be predicted); the tokenizer's own folding is checked with the model
    (prompts.check_distinct)."""
    names, seen = [], {}
    for r in raw:
        try:
            r.encode("utf-8")
        except UnicodeEncodeError:  # os.listdir's surrogate escapes: bytes that are not UTF-8
            raise UserError(f"{where}: {what} {r.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text; "
                            "rename it") from None
        name = _classname(r)
        key = " ".join(name.split())  # the tokenizer splits at white space, however much
        if not key:
            raise UserError(f"{where}: {what} {r!r} gives an empty class name (underscores become spaces); "
                            "rename it")
        if key in seen:
            raise UserError(f"{where}: {what}s {seen[key]!r} and {r!r} are the same class name {key!r} "
                            "(underscores become spaces); rename or merge them")
        seen[key] = r
        names.append(name)
    return names


def _readable(path: str) -> bool:
    """Whether the image decodes completely, within the size bounds (images.py, read from the header
    before decoding): verify() checks the container only (a JPEG cut in its scan data passes it), so
    the image is opened again and decoded."""
    try:
        with Image.open(path) as im:
            problem = size_problem(im)
            if problem is None:
                im.verify()
        if problem is not None:
            warnings.warn(f"skipping image {path}: {problem}", stacklevel=2)
            return False
        with Image.open(path) as im:
            im.load()
        return True
    except Exception as exc:  # PIL raises many types for a bad file; each is a skipped image
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=2)
        return False


def _scan_folder(split_dir: str) -> Tuple[List[str], Dict[str, List[str]]]:
    if not os.path.isdir(split_dir):
        raise UserError(f"data folder {split_dir!r} does not exist (expected DIR/train/<class>/<image> and "
                        "DIR/test/<class>/<image>)")
    folders = sorted(d for d in os.listdir(split_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
    if not folders:
        raise UserError(f"data folder {split_dir!r} has no class folders (expected {split_dir}/<class>/<image>)")
    files = {}
    for d in folders:
        root = os.path.join(split_dir, d)
        files[d] = sorted(os.path.join(root, f) for f in os.listdir(root)
                          if not f.startswith(".") and os.path.isfile(os.path.join(root, f)))
    return folders, files


def load_imagefolder(data_dir: str) -> Tuple[List[str], Dict[str, List[Item]]]:
    """classnames and {"train": [(path, label)], "test": [...]}; files are checked lazily (see `readable`)."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir!r} is a file, not a folder (expected DIR with train/ and test/)")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir!r}: no such folder")
    splits, names = {}, None
    for split in ("train", "test"):
        folders, files = _scan_folder(os.path.join(data_dir, split))
        if names is None:
            names = folders
        elif folders != names:
            only_train, only_test = sorted(set(names) - set(folders)), sorted(set(folders) - set(names))
            raise UserError(f"--data {data_dir!r}: class folders differ between train and test "
                            f"(only in train: {only_train}, only in test: {only_test})")
        empty = [d for d in folders if not files[d]]  # a class without test images skews the accuracy
        if empty:
            raise UserError(f"--data {data_dir!r}: {split}/ class folder(s) {empty} have no images")
        splits[split] = [(f, label) for label, d in enumerate(folders) for f in files[d]]
        if not splits[split]:
            raise UserError(f"--data {data_dir!r}: {split}/ has class folders but no files")
    return check_names(names, f"--data {data_dir!r}"), splits


def load_split_json(data_dir: str, split_json: str,
                    where: Optional[str] = None) -> Tuple[List[str], Dict[str, List[Item]]]:
    """CoOp's split file: {"train"|"val"|"test": [[relpath, label, classname], ...]} relative to data_dir;
    `where` names it in errors (default: the --split-json argument)."""
    where = where or f"--split-json {split_json!r}"
    try:
        with open(split_json, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read it ({exc})")
    except RecursionError:
        raise UserError(f"{where}: cannot read it (JSON nested too deeply)") from None
    if not isinstance(raw, dict) or "train" not in raw or "test" not in raw:
        raise UserError(f"{where}: expected an object with 'train' and 'test' lists")
    names: Dict[int, str] = {}
    splits = {}
    # CoOp's "val" (model selection: the linear probe's C search) is read when the file has one
    for split in ("train", "test") + (("val",) if raw.get("val") else ()):
        if not isinstance(raw[split], list) or not raw[split]:
            raise UserError(f"{where}: {split!r} must be a non-empty list of [relpath, label, classname], got "
                            f"{_short(raw[split])}")
        items = []
        for entry in raw[split]:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
                raise UserError(f"{where}: {split} entries must be [relpath, label, classname] (a path, an "
                                f"integer, a name), got {_short(entry)}")
            rel, label, name = entry
            if names.setdefault(label, name) != name:
                raise UserError(f"{where}: label {label} is both {names[label]!r} and {name!r}")
            items.append((os.path.join(data_dir, rel), label))
        splits[split] = items
    train_labels, test_labels = {l for _, l in splits["train"]}, {l for _, l in splits["test"]}
    if train_labels != test_labels:
        raise UserError(f"{where}: class labels differ between train and test")
    if not {l for _, l in splits.get("val", ())} <= train_labels:
        raise UserError(f"{where}: 'val' has labels that 'train' has not")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{where}: labels must be 0..C-1")
    # CoOp's datasets write class names with underscores (american_bulldog); its trainers read them
    # with name.replace("_", " "), as the ImageFolder names are
    return check_names([names[i] for i in range(len(names))], where, "class name"), splits


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_data(data_dir: str, split_json: Optional[str] = None):
    """A CoOp split file or an ImageFolder (`ladder_clip.data.load_data` also reads CoOp's datasets by name)."""
    return load_split_json(data_dir, split_json) if split_json else load_imagefolder(data_dir)


def readable(items: Sequence[Item], classnames: Optional[Sequence[str]] = None, split: str = "") -> List[Item]:
    """The items whose image decodes; the others are skipped with a warning naming the file. With
    `classnames`, a class left with no readable image is an error (it would count for nothing)."""
    out = [it for it in items if _readable(it[0])]
    if classnames is not None:
        missing = sorted(set(range(len(classnames))) - {label for _, label in out})
        if missing:
            raise UserError(f"{split}: class(es) {[classnames[i] for i in missing]} have no readable images")
    return out


def subsample(classnames: List[str], splits: Dict[str, List[Item]], which: str):
    """CoOp's base-to-new protocol: base = the first ceil(C/2) labels, new = the rest, relabelled from 0."""
    if which == "all":
        return classnames, splits
    m = math.ceil(len(classnames) / 2)
    keep = list(range(m)) if which == "base" else list(range(m, len(classnames)))
    if not keep:
        raise UserError(f"--subsample {which}: there are no {which} classes among {len(classnames)}")
    relabel = {old: new for new, old in enumerate(keep)}
    out = {s: [(p, relabel[l]) for p, l in items if l in relabel] for s, items in splits.items()}
    return [classnames[i] for i in keep], out


def few_shot(items: Sequence[Item], shots: int, seed: int, classnames: Sequence[str]) -> List[Item]:
    """`shots` readable images per class, drawn with `seed`; unreadable files are skipped and replaced. A
    class with fewer readable images is kept whole, with a warning (Dassl's generate_fewshot_dataset
    does the same with repeat=False)."""
    rng = random.Random(seed)
    by_class: Dict[int, List[str]] = {}
    for p, l in items:
        by_class.setdefault(l, []).append(p)
    out, short = [], []
    for label in sorted(by_class):
        pool = list(by_class[label])
        rng.shuffle(pool)
        chosen = []
        for p in pool:
            if len(chosen) == shots:
                break
            if _readable(p):
                chosen.append(p)
        if not chosen:
            raise UserError(f"--shots {shots}: class {classnames[label]!r} has no readable training images")
        if len(chosen) < shots:
            short.append(f"{classnames[label]!r} ({len(chosen)})")
        out += [(p, label) for p in sorted(chosen)]
    if short:
        warnings.warn(f"--shots {shots}: {len(short)} class(es) have fewer training images and are used "
                      f"whole: {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}", stacklevel=2)
    return out


def fewshot_file(out_dir: str, shots: int, seed: int, subsample_: str) -> str:
    return os.path.join(out_dir, f"fewshot_{subsample_}_{shots}shot_seed{seed}.json")


def fewshot_json(items: Sequence[Item], data_dir: str) -> str:
    """The selection as JSON, paths relative to the data folder (so a run resumes from any working
    directory, and with the data folder moved)."""
    root = os.path.abspath(data_dir)
    rel = [[os.path.relpath(os.path.abspath(p), root), label] for p, label in items]
    return json.dumps({"format": "ladder_clip/fewshot/1", "items": rel}, indent=0)


def save_fewshot(path: str, items: Sequence[Item], data_dir: str) -> None:
    text = fewshot_json(items, data_dir)
    files.atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def parse_fewshot(text: str, data_dir: str, n_classes: int, where: str) -> List[Item]:
    """The selection written by fewshot_json; a UserError naming `where` if it is not one."""
    try:
        raw = json.loads(text)
        items = raw["items"]
        out = []
        for p, label in items:
            if not isinstance(p, str) or isinstance(label, bool) or not isinstance(label, int) \
                    or not 0 <= label < n_classes:
                raise ValueError(f"bad entry {[p, label]!r}")
            out.append((os.path.join(data_dir, p), label))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{where} is not a few-shot selection written by ladder-clip ({exc}); "
                        "delete the run folder and train again")
    if not out:
        raise UserError(f"{where}: the few-shot selection is empty")
    return out
