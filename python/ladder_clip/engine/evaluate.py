"""Accuracy on the test split: of a method in memory (end of training) or of a checkpoint (`eval`), also on
a test-only set (an ImageNet variant) with a checkpoint trained on imagenet."""
import torch

from .. import data as D
from ..base.errors import UserError
from ..base.runtime import check_device
from ..methods import build_method
from ..methods.prompts import check_distinct
from ..model.load import load_backbone
from . import checkpoint as ckpt
from .config import EvalConfig
from .eval_data import accuracy, eval_data


def evaluate(method, items, device, precision="fp32", batch_size=64, workers=0, quiet=True) -> float:
    return accuracy(method, method.backbone, items, device, precision, batch_size, workers, quiet)


def class_difference(data, ckpt_names) -> str:
    """How the data's classes differ from a checkpoint's, in one clause: counts, then what is not shared
    (three of each at most), or the first class out of order."""
    def few(names):
        return ", ".join(repr(c) for c in names[:3]) + (" ..." if len(names) > 3 else "")
    extra, missing = [c for c in data if c not in ckpt_names], [c for c in ckpt_names if c not in data]
    parts = ([f"not in the checkpoint: {few(extra)}"] if extra else []) + \
        ([f"not in the data: {few(missing)}"] if missing else [])
    if parts:
        return f"its {len(data)} classes differ from the checkpoint's {len(ckpt_names)} ({'; '.join(parts)})"
    i = next(i for i, (a, b) in enumerate(zip(data, ckpt_names)) if a != b)
    return f"its class {i} is {data[i]!r}, the checkpoint's class {i} is {ckpt_names[i]!r}"


def evaluate_checkpoint(cfg: EvalConfig, info: dict = None) -> float:
    """The checkpoint's test accuracy; `info`, when given, receives the method and the image count."""
    from .bundle import evaluate_bundle, is_bundle

    if is_bundle(cfg.checkpoint):  # an export (engine/bundle.py): it holds its model; cfg.model is not used
        return evaluate_bundle(cfg, info)
    check_device(cfg.device)
    dev = torch.device(cfg.device)
    path = cfg.checkpoint
    header, tensors = ckpt.read_checkpoint(path)  # header and method config checked before anything is built
    backbone = load_backbone(cfg.model, dev, cfg.tokenizer, cfg.activation)
    ckpt.check_compatible(header, path, backbone)
    classnames, splits, mapped = eval_data(cfg, header["classnames"])
    if not mapped and classnames != header["classnames"] and cfg.subsample != "new" and not cfg.other_classes:
        raise UserError(f"--data {cfg.data!r}: {class_difference(classnames, header['classnames'])}; pass "
                        "--subsample base or new for a base-to-new checkpoint, or --other-classes to evaluate "
                        "on other classes")
    if classnames != header["classnames"] and (header["config"].get("csc") or header["method"] == "linear-probe"):
        what = "class weights" if header["method"] == "linear-probe" else "a class-specific context (csc)"
        raise UserError(f"checkpoint {path!r} learned {what} for its own classes; it cannot score other classes")
    config = header["config"]
    if cfg.frozen is not None:  # prompts are all a checkpoint holds: they load into either backbone
        if "frozen" not in config:
            raise UserError(f"--frozen: method {header['method']!r} has no frozen-backbone option (the ladder "
                            "methods have)")
        config = {**config, "frozen": cfg.frozen}
    try:
        method = build_method(header["method"], backbone, classnames, **config)
    except ValueError as exc:
        raise UserError(f"checkpoint {path!r}: config: {exc}")
    check_distinct(method, classnames, f"--split-json {cfg.split_json!r}" if cfg.split_json else f"--data {cfg.data!r}")
    ckpt.load_into(method, tensors, path)
    test = D.readable(splits["test"], classnames, f"--data {cfg.data!r} test/")
    if info is not None:
        info.update(method=header["method"], images=len(test), classes=len(classnames))
    return evaluate(method, test, dev, cfg.precision, cfg.batch_size, cfg.workers, cfg.quiet)
