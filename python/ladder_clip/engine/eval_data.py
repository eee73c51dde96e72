"""The data `eval` scores a checkpoint or a bundle on: a folder, a split file, or a dataset by name, where an
ImageNet variant's classes are those of a checkpoint trained on imagenet (apart from evaluate.py so that a
bundle's eval imports neither the methods nor transformers)."""
from .. import data as D
from ..base.errors import UserError
from .config import EvalConfig


def same_classes(own, imagenet) -> bool:
    """Whether a checkpoint's classes are classnames.txt's, by label: as many, and most names the same
    (a checkpoint trained with another edition of the names still maps by label)."""
    def key(n):
        return " ".join(n.replace("_", " ").lower().split())
    return len(own) == len(imagenet) and 2 * sum(key(a) == key(b) for a, b in zip(own, imagenet)) > len(own)


def eval_data(cfg: EvalConfig, own):
    """(class names, splits, whether the names are the checkpoint's): an ImageNet variant's classes
    are ImageNet classes, scored by a checkpoint trained on imagenet with its own names for them (CoOp's
    domain generalisation; -A and -R: 200 of the 1000)."""
    if not cfg.dataset:
        names, splits = D.load_data(cfg.data, cfg.split_json)
        return (*D.subsample(names, splits, cfg.subsample), False)
    ds = D.read_dataset(cfg.dataset, cfg.data, cfg.classnames_file)
    if ds.imagenet_labels is None or cfg.other_classes:
        return (*D.subsample(ds.classnames, ds.splits, cfg.subsample), False)
    if same_classes(own, ds.imagenet_names):  # trained on imagenet: its labels are the wnids sorted, as here
        return [own[label] for label in ds.imagenet_labels], ds.splits, True
    if set(ds.classnames) <= set(own):  # a checkpoint of other ImageNet classes (a subset) that holds these
        return ds.classnames, ds.splits, True
    missing = ", ".join(repr(c) for c in [c for c in ds.classnames if c not in own][:3])
    raise UserError(f"--dataset {cfg.dataset}: its {len(ds.classnames)} classes are ImageNet classes (of the "
                    f"{ds.imagenet_size} in classnames.txt), the checkpoint has {len(own)} classes, without "
                    f"{missing} ...; evaluate a "
                    "checkpoint trained on --dataset imagenet, or pass --other-classes to score this one on "
                    f"{cfg.dataset}'s class names")
