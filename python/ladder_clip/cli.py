"""`ladder-clip train | eval | demo`. argparse parses, one TrainConfig / EvalConfig / DemoConfig (config.py)
validates every field, then the command runs. Bad input ends with one line on stderr and exit status 2;
set LADDER_CLIP_DEBUG=1 to see the traceback of an unexpected error. Only the standard library is imported
before main() is running, so a Ctrl-C during the (seconds-long) torch/transformers import is one line."""
import argparse
import json
import os
import signal
import sys
import warnings

from .errors import UserError


def _method_options(pairs):
    """--opt key=value (value parsed as JSON when it can be: numbers, true/false; else the string)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--opt {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
        except RecursionError:  # "[[[[..." deeper than the JSON parser goes
            raise UserError(f"--opt {k}: the value is nested too deeply")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input ("ladder-clip train: error:" otherwise)
        self.exit(2, f"ladder-clip: error: {message} (see {self.prog} --help)\n")


METHOD_NAMES = ("zeroshot", "coop", "vpt", "maple", "rlp", "apt", "ladder", "ladder+apt")  # methods.METHODS


def _parser():
    p = _Parser(prog="ladder-clip", description="CLIP prompt tuning on ladder_kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="few-shot prompt tuning; writes OUT/prompt.safetensors and OUT/metrics.json")
    t.add_argument("--model", required=True, help="'tiny' (random, built in code) or a save_pretrained folder")
    t.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and test/<class>/")
    t.add_argument("--split-json", help="CoOp split_*.json with paths relative to --data")
    t.add_argument("--method", required=True, choices=METHOD_NAMES)
    t.add_argument("--shots", type=int, default=16, help="images per class (0: all)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=32, help="global batch, split over DDP processes")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--resume", action="store_true", help="continue from OUT's last finished epoch (OUT/state)")
    t.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    t.add_argument("--workers", type=int, default=0, help="data-loading processes")
    t.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, e.g. n_ctx=4, reduction=8")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    t.add_argument("--quiet", action="store_true")
    e = sub.add_parser("eval", help="accuracy of a checkpoint on the test split")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split-json")
    e.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--other-classes", action="store_true",
                   help="evaluate on classes other than the checkpoint's (cross-dataset transfer)")
    e.add_argument("--frozen", help="ladder methods: run the frozen CLIP in fp32 or int8 (CPU int8), whichever "
                   "the checkpoint was trained with (default: as it was trained)")
    d = sub.add_parser("demo", help="coop vs ladder on the tiny random model and generated images (CPU, minutes)")
    d.add_argument("--out", default=None, help="keep the demo's data and runs here (default: a temp folder)")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p


def _run(args) -> int:
    from .config import DemoConfig, EvalConfig, TrainConfig

    if args.cmd == "train":
        cfg = TrainConfig(model=args.model, data=args.data, method=args.method, out=args.out, shots=args.shots,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                          seed=args.seed, precision=args.precision, resume=args.resume,
                          split_json=args.split_json, subsample=args.subsample, workers=args.workers,
                          method_options=_method_options(args.opt), quiet=args.quiet,
                          optimizer=args.optimizer)
        from . import ddp
        from .train import train

        try:
            r = train(cfg)
        finally:
            ddp.teardown()
        if r:
            print(f"{args.method}: test accuracy {r['accuracy']:.4f} on {r['test_images']} images; "
                  f"checkpoint {os.path.join(args.out, 'prompt.safetensors')}")
        return 0
    if args.cmd == "eval":
        cfg = EvalConfig(model=args.model, data=args.data, checkpoint=args.checkpoint, split_json=args.split_json,
                         subsample=args.subsample, device=args.device, precision=args.precision,
                         batch_size=args.batch_size, workers=args.workers, other_classes=args.other_classes,
                         frozen=args.frozen)
        from .evaluate import evaluate_checkpoint

        print(f"accuracy {evaluate_checkpoint(cfg):.4f}")
        return 0
    cfg = DemoConfig(out=args.out, epochs=args.epochs, device=args.device)
    from .demo import demo

    return demo(cfg.out, cfg.epochs, cfg.device)


def _warning_line(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"ladder-clip: warning: {message}\n")


def _interrupted(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        hint = "" if "--resume" in argv else " with --resume"
        print(f"ladder-clip: interrupted; run the same command{hint} to continue from the last finished "
              "epoch", file=sys.stderr)
    else:
        print("ladder-clip: interrupted", file=sys.stderr)
    return 130


_sigint = {"seen": False}


def _on_sigint(signum, frame):
    # transformers' lazy import turns a KeyboardInterrupt raised inside it into another exception: the
    # flag lets main() recognise a Ctrl-C whatever it became on the way up
    _sigint["seen"] = True
    raise KeyboardInterrupt


def main(argv=None) -> int:
    _sigint["seen"] = False
    try:
        old = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread: signals stay as they are
        old = None
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # also while torch / transformers are being imported
        code = 130
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return _interrupted(argv) if code == 130 or _sigint["seen"] else code


def _main(argv) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (already printed as one line)
        return int(exc.code or 0)
    warnings.showwarning = _warning_line
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return _run(args)
    except UserError as exc:  # one line, whatever a wrapped library message held
        print(f"ladder-clip: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # an unexpected failure still gets one line, unless debugging
        if _sigint["seen"]:
            return 130
        if os.environ.get("LADDER_CLIP_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()
        print(f"ladder-clip: error: {type(exc).__name__}: {msg[0] if msg else ''} "
              "(LADDER_CLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
