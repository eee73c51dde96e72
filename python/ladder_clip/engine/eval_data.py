"""What `eval` scores a checkpoint or a bundle on (a folder, a split file, or a dataset by name, where an
ImageNet variant's classes are those of a checkpoint trained on imagenet), and the scoring loop; apart
from evaluate.py so that a bundle's eval imports neither the methods nor transformers."""
import torch
from tqdm import tqdm

from .. import data as D
from ..base.errors import UserError
from ..base.runtime import autocast, bar_off
from ..data.loader import loader
from .config import EvalConfig


@torch.no_grad()
def accuracy(model, source, items, device, precision="fp32", batch_size=64, workers=0, quiet=True) -> float:
    """Top-1 accuracy of `model` (a method or a bundle: text_features(), and logits of (pixels, text)) on
    (path, label) items, preprocessed as `source.preprocess` says (a method's backbone, or the bundle)."""
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    correct = 0
    with autocast(device, precision):
        text = model.text_features()
        for x, y in tqdm(loader(items, source, batches, workers), desc="eval", disable=bar_off(quiet), leave=False):
            correct += (model(x.to(device), text).argmax(-1).cpu() == y).sum().item()
    return correct / max(1, len(items))


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
