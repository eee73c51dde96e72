"""`ladder-clip export`: a prompt checkpoint and its CLIP -> one bundle file (engine/bundle.py) that predict
and eval run without transformers; with --data, the checkpoint and the bundle are both evaluated and their
accuracy, bytes and time per image printed. Also `eval` of a bundle (`--bundle B` or `--checkpoint B`),
which needs no --model. Standard library only at import (cli.py builds the parser before torch)."""
import os
import sys
import time

from ..base.errors import UserError

HELP = "one file with all inference needs (bundle), from a checkpoint and its CLIP"


def add_arguments(p) -> None:
    from ..engine.config import ACTIVATIONS, DEVICES, PRECISIONS, SUBSAMPLES

    p.add_argument("--checkpoint", required=True, help="the prompt checkpoint (OUT/prompt.safetensors of train)")
    p.add_argument("--model", required=True, help="the CLIP it was trained on (as train's --model)")
    p.add_argument("--tokenizer", help="as train's --tokenizer")
    p.add_argument("--activation", choices=ACTIVATIONS, help="as train's --activation")
    p.add_argument("--out", required=True, help="the bundle file to write (e.g. model.safetensors), atomically")
    p.add_argument("--frozen", choices=("fp32", "int8"),
                   help="ladder methods: store the frozen image encoder's layer Linears in int8 (CPU; "
                   "docs/int8.md) or fp32 (default: as the checkpoint was trained)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the class features are computed "
                   "and --data evaluated (default: cpu)")
    p.add_argument("--data", help="evaluate the checkpoint and the bundle on this data's test split and print "
                   "both accuracies, bytes and time per image (as eval's --data)")
    p.add_argument("--split-json", help="as eval's --split-json")
    p.add_argument("--subsample", default="all", choices=SUBSAMPLES, help="as eval's --subsample (default: all)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="of the --data evaluation (default: fp32)")
    p.add_argument("--batch-size", type=int, default=64, help="of the --data evaluation (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_bundle_eval(e) -> None:
    """eval takes a bundle: --bundle B, or --checkpoint B (recognised by its header); eval's --model and
    --checkpoint are optional in argparse and checked in bundle_eval_wanted."""
    e.add_argument("--bundle", help="a bundle from `ladder-clip export` (instead of --checkpoint and --model)")


def bundle_eval_wanted(args) -> bool:
    """True when eval is given a bundle; otherwise the checkpoint path's required arguments are checked."""
    from ..engine.bundle_file import is_bundle

    if args.bundle is not None:
        if args.checkpoint is not None:
            raise UserError("give --bundle or --checkpoint, not both")
        return True
    if args.checkpoint is None:
        raise UserError("the following arguments are required: --checkpoint (or --bundle)")
    if is_bundle(args.checkpoint):
        return True
    if args.model is None:
        raise UserError("the following arguments are required: --model (a bundle from ladder-clip export needs none)")
    return False


def run_eval(args) -> int:
    from ..engine.bundle import evaluate_bundle
    from ..engine.config import EvalConfig

    path = args.bundle if args.bundle is not None else args.checkpoint
    for flag in ("model", "tokenizer", "activation"):
        if getattr(args, flag) is not None:
            print(f"ladder-clip: warning: --{flag} is not used: bundle {path!r} holds its model", file=sys.stderr)
    cfg = EvalConfig(model=path, data=args.data, checkpoint=path, split_json=args.split_json,
                     subsample=args.subsample, device=args.device, precision=args.precision,
                     batch_size=args.batch_size, workers=args.workers, other_classes=args.other_classes,
                     frozen=args.frozen, dataset=args.dataset, classnames_file=args.classnames)
    info = {}
    acc = evaluate_bundle(cfg, info)
    print(f"{info['method']}: accuracy {acc:.4f} on {info['images']} test images ({info['classes']} classes)")
    return 0


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, names in os.walk(path) for f in names)


def model_bytes(backbone) -> int:
    """What the checkpoint path loads besides the checkpoint: the --model file or folder on disk; for the
    'tiny' model (built in code) its weights' bytes in memory."""
    if os.path.exists(backbone.name):
        return disk_bytes(backbone.name)
    return sum(t.numel() * t.element_size() for t in backbone.clip.state_dict().values())


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def run(args) -> int:
    import torch

    from ..base.runtime import check_device
    from ..engine import bundle
    from ..engine.bundle_file import is_bundle
    from ..engine.config import EvalConfig

    if is_bundle(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint!r} is already a bundle; give the prompt checkpoint")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a folder; give the bundle's file name (e.g. model.safetensors)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    eval_cfg = None
    if args.data is not None:  # checked before minutes of work, not after
        eval_cfg = EvalConfig(model=args.model, data=args.data, checkpoint=args.checkpoint,
                              split_json=args.split_json, subsample=args.subsample, device=args.device,
                              precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                              quiet=args.quiet, frozen=args.frozen, tokenizer=args.tokenizer,
                              activation=args.activation)
    check_device(args.device)
    print(f"export: loading {args.checkpoint} on --model {args.model}", file=sys.stderr)
    method, header = bundle.load_method(args.checkpoint, args.model, torch.device(args.device), args.tokenizer,
                                        args.activation, args.frozen)
    backbone_bytes = model_bytes(method.backbone)  # before an int8 export quantises it in place
    print("export: computing the class features and writing the bundle", file=sys.stderr)
    written = bundle.write_bundle(args.out, method, {"checkpoint": os.path.basename(args.checkpoint),
                                                     "epoch": header.get("epoch")})
    size, ckpt_size = os.path.getsize(args.out), os.path.getsize(args.checkpoint)
    print(f"{header['method']}: bundle {args.out}: {mb(size)} ({written['precision']['frozen']} image encoder, "
          f"{len(written['classnames'])} classes' text features) against checkpoint {mb(ckpt_size)} + model "
          f"{mb(backbone_bytes)} = {mb(ckpt_size + backbone_bytes)} ({size / (ckpt_size + backbone_bytes):.0%})")
    if eval_cfg is None:
        return 0
    from dataclasses import replace

    from ..engine.evaluate import evaluate_checkpoint

    print("export: evaluating the checkpoint, then the bundle", file=sys.stderr)
    del method
    info_c, info_b = {}, {}
    acc_c = evaluate_checkpoint(eval_cfg, info_c)
    acc_b = bundle.evaluate_bundle(replace(eval_cfg, checkpoint=args.out), info_b)
    same = "the same" if acc_b == acc_c else "DIFFERENT"
    print(f"accuracy on {info_b['images']} test images: checkpoint {acc_c:.4f}, bundle {acc_b:.4f} ({same})")
    print("export: timing both paths", file=sys.stderr)
    t = timing(args, eval_cfg)
    n, (load_c, per_c), (load_b, per_b) = t["images"], t["checkpoint"], t["bundle"]
    print(f"startup (load, class features): checkpoint + model {load_c:.2f} s, bundle {load_b:.2f} s; time per "
          f"image (batch of {n}, median of {ROUNDS} alternated): checkpoint {per_c * 1e3:.2f} ms, bundle "
          f"{per_b * 1e3:.2f} ms")
    if acc_b != acc_c:
        print("ladder-clip: error: the bundle's accuracy differs from the checkpoint's (a bug: please report it)",
              file=sys.stderr)
        return 1
    return 0


ROUNDS = 3


def timing(args, cfg) -> dict:
    """Each path's startup (what it loads and computes before its first image: CLIP, the method and the
    class features, or the bundle) and its time per image on a batch of test images, the two paths'
    forwards alternated ROUNDS times (this machine's load varies), medians."""
    import statistics

    import torch

    from .. import data as D
    from ..base.runtime import autocast
    from ..data.transforms import Preprocess
    from ..engine import bundle

    dev = torch.device(cfg.device)
    classnames, splits = D.subsample(*D.load_data(cfg.data, cfg.split_json), cfg.subsample)
    items = D.readable(splits["test"], classnames, f"--data {cfg.data!r} test/")[: cfg.batch_size]
    t0 = time.perf_counter()
    method, _ = bundle.load_method(args.checkpoint, args.model, dev, args.tokenizer, args.activation, args.frozen)
    ckpt = bundle.MethodPredictor(method)
    with torch.no_grad(), autocast(dev, cfg.precision):
        ckpt.prepare()
    load_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = bundle.load_bundle(args.out, dev)
    load_b = time.perf_counter() - t0
    pre = Preprocess(model.preprocess)
    from PIL import Image

    x = torch.stack([pre(Image.open(path)) for path, _ in items]).to(dev)
    times = {"checkpoint": [], "bundle": []}
    with torch.no_grad(), autocast(dev, cfg.precision):
        for _ in range(ROUNDS):
            for name, run in (("checkpoint", ckpt), ("bundle", model)):
                t0 = time.perf_counter()
                run(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / len(x))
    return {"images": len(x), "checkpoint": (load_c, statistics.median(times["checkpoint"])),
            "bundle": (load_b, statistics.median(times["bundle"]))}
