"""What the frozen CLIP in int8 (ladder_clip/model/int8.py) costs: tap errors and accuracy against fp32.

    python -m ladder_clip.quantize report [--epochs N] [--seeds S ...]
    (or python -m ladder_clip.apps.int8_report report ...)

prints the relative error of every tap against fp32, per layer, and the zero-shot and few-shot accuracy
of fp32 and int8 on the learning demo's model (tiny-pretrained) and images (tests/pipeline/test_pipeline_int8.py
asserts the bounds).
"""
import argparse
import os
import sys
import tempfile
from typing import Dict, List

import torch

from .. import data as D
from ..data.synthetic import make_imagefolder
from ..engine import checkpoint as ckpt
from ..engine.config import TrainConfig
from ..engine.evaluate import evaluate
from ..engine.train import train
from ..methods import build_method
from ..model import pretrain as P
from ..model.int8 import FROZEN, int8_copy, weight_bytes
from ..model.load import load_backbone


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@torch.no_grad()
def tap_errors(fp32, int8, pixels: torch.Tensor, ids: torch.Tensor) -> Dict[str, List[float]]:
    """Relative L2 error ||int8 - fp32|| / ||fp32|| of every layer's output (the taps) and of the projected
    features, for each encoder: {"vision": [layer 1, .., layer L, features], "text": [...]}."""
    out = {}
    (f, t), (qf, qt) = fp32.encode_image(pixels, taps=True), int8.encode_image(pixels, taps=True)
    out["vision"] = [_rel(q, r) for q, r in zip(qt[1:], t[1:])] + [_rel(qf, f)]
    (f, t), (qf, qt) = fp32.encode_text(ids, taps=True), int8.encode_text(ids, taps=True)
    out["text"] = [_rel(q, r) for q, r in zip(qt[1:], t[1:])] + [_rel(qf, f)]
    return out


def measure(epochs: int = 8, test_per_class: int = 64, seeds=(1, 2, 3), out: str = None) -> dict:
    """Tap errors on the learning demo's model (tiny-pretrained), and accuracy of fp32 vs int8 on its few-shot set:
    zero-shot CLIP; per seed, the ladder trained with an fp32 backbone and evaluated on fp32 and on int8
    (the same checkpoint), and the ladder trained and evaluated with frozen='int8'."""
    tmp = tempfile.TemporaryDirectory(prefix="ladder-clip-int8-") if out is None else None
    root = tmp.name if tmp else out
    try:
        data = os.path.join(root, "data")
        # the learning demo's set: tiny-pretrained's four unseen classes, on the shifted background
        make_imagefolder(data, [n.replace(" ", "_") for n in P.UNSEEN], train_per_class=16,
                         test_per_class=test_per_class, background=P.SHIFTED_BACKGROUND)
        fp32 = load_backbone("tiny-pretrained")
        int8 = int8_copy(fp32)
        classnames, splits = D.load_data(data, None)
        test = D.readable(splits["test"], classnames, "test/")
        images = D.ImageDataset(test[::max(1, len(test) // 16)], D.Preprocess(fp32.preprocess))
        pixels = torch.stack([images[i][0] for i in range(len(images))])  # 16 test images of every class
        errors = tap_errors(fp32, int8, pixels, fp32.tokenize([f"a photo of a {c}." for c in classnames]))
        dev = torch.device("cpu")
        zero = {name: evaluate(build_method("zeroshot", b, classnames), test, dev)
                for name, b in (("fp32", fp32), ("int8", int8))}
        runs = []
        for seed in seeds:
            acc = {}
            for frozen in FROZEN:  # the ladder's default recipe (CoOp's), `epochs` of it, as the demo runs it
                run = os.path.join(root, f"{frozen}-{seed}")
                cfg = TrainConfig(model="tiny-pretrained", data=data, method="ladder", out=run, shots=16,
                                  epochs=epochs, seed=seed, quiet=True, method_options={"frozen": frozen})
                acc[frozen] = train(cfg)["accuracy"]
            # the fp32-trained prompts, loaded into an int8 backbone: what `eval --frozen int8` does
            header, tensors = ckpt.read_checkpoint(os.path.join(root, f"fp32-{seed}", "prompt.safetensors"))
            method = build_method("ladder", load_backbone("tiny-pretrained"), classnames,
                                  **{**header["config"], "frozen": "int8"})
            ckpt.load_into(method, tensors, "the fp32 checkpoint")
            acc["fp32 checkpoint on int8"] = evaluate(method, test, dev)
            runs.append({"seed": seed, **acc})
        return {"tap_errors": errors, "zero_shot": zero, "ladder": runs, "test_images": len(test), "epochs": epochs,
                "weight_bytes": {"fp32": weight_bytes(fp32), "int8": weight_bytes(int8)}}
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_report(r: dict) -> str:
    pts = lambda a, b: f"{100 * (a - b):+.2f}"  # noqa: E731
    lines = ["relative error of each tap (layer output) and of the features against fp32, frozen CLIP in int8:"]
    for enc, errs in r["tap_errors"].items():
        cells = " ".join(f"L{i + 1}={e:.4f}" for i, e in enumerate(errs[:-1]))
        lines.append(f"  {enc:<6} {cells} features={errs[-1]:.4f}")
    z = r["zero_shot"]
    lines.append(f"accuracy (%) on {r['test_images']} generated test images (tiny-pretrained, its unseen classes "
                 "on a shifted background: the learning demo's set):")
    lines.append(f"  zero-shot: fp32 {100 * z['fp32']:.2f}, int8 {100 * z['int8']:.2f} "
                 f"({pts(z['int8'], z['fp32'])} points)")
    lines.append(f"  ladder, {r['epochs']} epochs   fp32   trained int8 (change)   fp32 checkpoint on int8 (change)")
    for run in r["ladder"]:
        lines.append(f"  seed {run['seed']:<14} {100 * run['fp32']:6.2f}   {100 * run['int8']:6.2f} "
                     f"({pts(run['int8'], run['fp32'])})        {100 * run['fp32 checkpoint on int8']:6.2f} "
                     f"({pts(run['fp32 checkpoint on int8'], run['fp32'])})")
    keys = ("fp32", "int8", "fp32 checkpoint on int8")
    mean = {k: sum(run[k] for run in r["ladder"]) / len(r["ladder"]) for k in keys}
    lines.append(f"  mean {'':<14} {100 * mean['fp32']:6.2f}   {100 * mean['int8']:6.2f} "
                 f"({pts(mean['int8'], mean['fp32'])})        {100 * mean['fp32 checkpoint on int8']:6.2f} "
                 f"({pts(mean['fp32 checkpoint on int8'], mean['fp32'])})")
    w = r["weight_bytes"]
    lines.append(f"backbone weights: fp32 {w['fp32'] / 2**20:.2f} MiB, int8 {w['int8'] / 2**20:.2f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ladder_clip.quantize", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="tap errors and accuracy change of the int8 frozen CLIP (CPU, minutes)")
    rp.add_argument("--epochs", type=int, default=8, help="ladder training epochs per run (default: %(default)s)")
    rp.add_argument("--test-per-class", type=int, default=64, help="generated test images per class")
    rp.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default: 1 2 3)")
    a = ap.parse_args(argv)
    print(format_report(measure(a.epochs, a.test_per_class, a.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
