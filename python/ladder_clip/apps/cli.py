"""`ladder-clip train | eval | demo`. argparse parses, one TrainConfig / EvalConfig / DemoConfig (engine/config.py)
validates every field, then the command runs. Bad input ends with one line on stderr and exit status 2;
set LADDER_CLIP_DEBUG=1 to see the traceback of an unexpected error. Only the standard library is imported
before main() is running, so a Ctrl-C during the (seconds-long) torch/transformers import is one line."""
import argparse
import errno
import json
import os
import signal
import sys
import warnings

from ..base.errors import UserError


def _method_options(pairs):
    """--opt key=value [key=value ...], --opt may repeat (values parsed as JSON when they can be: numbers,
    true/false; else the string, spaces and all); a key given twice is an error (a dict would silently
    keep the last)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--opt {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        if k in out:
            raise UserError(f"--opt {k}: given twice ({json.dumps(out[k])} and {v}); give each key once")
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


METHOD_NAMES = ("zeroshot", "coop", "vpt", "maple", "rlp", "apt", "ladder", "ladder+apt", "lst", "linear-probe")


def _method_help() -> str:
    """Each method's --opt keys and defaults (imports the methods, so only built when --help is asked)."""
    from ..methods import METHODS

    lines = ["method options (--opt KEY=VALUE; default in brackets):"]
    for name, m in METHODS.items():
        opts = ", ".join(f"{k} [{json.dumps(v)}]" for k, v in m.defaults.items()) or "none"
        lines.append(f"  {name}: {opts}")
    return "\n".join(lines)


def _common_arguments(model_required: bool = True) -> argparse.ArgumentParser:
    """The arguments train and eval share: the model, the data and where it runs (eval of a bundle needs no
    --model: apps/export.py's bundle_eval_wanted checks it)."""
    from ..engine.config import ACTIVATIONS, DEVICES, PRECISIONS, SUBSAMPLES

    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--model", required=model_required, help=("" if model_required else "(required but for a "
                   "bundle) ") + "'tiny' (random, built in code), 'tiny-pretrained' (pretrained "
                   "on generated data in seconds, cached), a save_pretrained folder, or an OpenAI / open_clip "
                   "ViT checkpoint file (ViT-B-16.pt, open_clip_pytorch_model.bin)")
    c.add_argument("--tokenizer", help="tokenizer folder or CLIP's bpe_simple_vocab_16e6.txt.gz, for a --model "
                   "checkpoint file (default: the one an installed open_clip or clip package ships)")
    c.add_argument("--activation", choices=ACTIVATIONS,
                   help="MLP activation of a --model checkpoint file, which its weights do not record: "
                   "quick_gelu (OpenAI's CLIPs and open_clip's -quickgelu models; the default) or gelu (most "
                   "LAION-trained open_clip models)")
    c.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and test/<class>/; with "
                   "--dataset, the dataset's folder as CoOp's DATASETS.md lays it out (e.g. DIR/images/ + "
                   "DIR/split_zhou_OxfordPets.json), or the folder holding it under CoOp's name (DIR/oxford_pets/)")
    c.add_argument("--split-json", help="CoOp split_*.json with paths relative to --data")
    c.add_argument("--dataset", metavar="NAME", help="read --data as CoOp's reader of NAME does, with its template: "
                   "imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, "
                   "sun397, dtd, eurosat, ucf101, or the test-only imagenetv2, imagenet_sketch, imagenet_a, "
                   "imagenet_r (eval only: a checkpoint trained on imagenet); '-' for '_' and any case "
                   "(default: none, --data is an ImageFolder)")
    c.add_argument("--classnames", metavar="FILE", help="ImageNet's classnames.txt ('n01440764 tench' lines) for "
                   "imagenet and its variants (default: DIR/classnames.txt; for a variant also "
                   "DIR/../imagenet/classnames.txt)")
    c.add_argument("--subsample", default="all", choices=SUBSAMPLES, help="(default: all)")
    c.add_argument("--device", default="cpu", choices=DEVICES, help="(default: cpu)")
    c.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default: fp32)")
    c.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    return c


def _parser(help_wanted: bool = False):
    from ..engine.config import DEVICES, OPTIMIZERS
    from ..engine.recipes import describe

    p = _Parser(prog="ladder-clip", description="CLIP prompt tuning on ladder_kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = _common_arguments()
    epilog = describe() + ("\n\n" + _method_help() if help_wanted else "")
    t = sub.add_parser("train", help="few-shot prompt tuning; writes OUT/prompt.safetensors and OUT/metrics.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog, parents=[common])
    t.add_argument("--method", required=True, choices=METHOD_NAMES)
    t.add_argument("--shots", type=int, default=16, help="images per class (0: all) (default: 16)")
    t.add_argument("--recipe", help="training recipe (below; default: the method's own)")
    t.add_argument("--epochs", type=int, help="default: the recipe's (CoOp: 200 / 100 / 50 for 16 / 4-8 / 1-2 shots)")
    t.add_argument("--batch-size", type=int, help="global batch, split over DDP processes (default: the recipe's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    t.add_argument("--weight-decay", type=float, help="default: the recipe's")
    t.add_argument("--warmup-epochs", type=int,
                   help="epochs at the recipe's constant warm-up lr (default: the recipe's)")
    t.add_argument("--no-augment", action="store_true",
                   help="train on the eval transform (default: Dassl's random resized crop + flip)")
    t.add_argument("--template", help="zero-shot template with one {} (default: CoOp's for the --split-json "
                   "dataset, else 'a photo of a {}.'); for zeroshot, vpt, apt")
    t.add_argument("--base-to-new", action="store_true",
                   help="train on the base classes, evaluate base and new, report their harmonic mean")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=1, help="(default: 1)")
    t.add_argument("--resume", action="store_true", help="continue from OUT's last finished epoch (OUT/state)")
    t.add_argument("--opt", action="append", nargs="+", metavar="KEY=VALUE",
                   help="method options, e.g. --opt n_ctx=4, --opt reduction=4 blocks=2 (each method's keys "
                   "below with --help)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the recipe's (sgd)")
    t.add_argument("--quiet", action="store_true")
    e = sub.add_parser("eval", help="accuracy of a checkpoint or a bundle on the test split",
                       parents=[_common_arguments(model_required=False)])
    e.add_argument("--checkpoint", help="a prompt checkpoint (OUT/prompt.safetensors), or a bundle from "
                   "`ladder-clip export` (told by its header); required unless --bundle")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--other-classes", action="store_true",
                   help="evaluate on classes other than the checkpoint's (cross-dataset transfer)")
    e.add_argument("--frozen", help="ladder methods: run the frozen CLIP in fp32 or int8 (CPU int8), whichever "
                   "the checkpoint was trained with (default: as it was trained)")
    from . import export, predict  # predict / export, and eval of a bundle: their arguments live in their modules
    export.add_bundle_eval(e)
    predict.add_arguments(sub.add_parser("predict", help=predict.HELP, description=predict.HELP))
    export.add_arguments(sub.add_parser("export", help=export.HELP, description=export.HELP))
    d = sub.add_parser("demo", help="every method vs zero-shot, tiny pretrained CLIP, generated images (CPU, minutes)")
    d.add_argument("--out", default=None, help="keep the demo's data and runs here (default: a temp folder)")
    d.add_argument("--epochs", type=int, default=8, help="epochs of each method at most (default 8)")
    d.add_argument("--device", default="cpu", choices=DEVICES)
    from . import summarize, sweep

    sweep.add_arguments(sub.add_parser("sweep", help="datasets x methods x shots x seeds, one train process a run"))
    summarize.add_arguments(sub.add_parser("summarize", help="the papers' tables (markdown, CSV) and accuracy vs "
                                           "shots (PNG) from the metrics.json files under a folder"))
    return p


def _run(args) -> int:
    from ..engine.config import DemoConfig, EvalConfig, TrainConfig

    if args.cmd == "train":
        cfg = TrainConfig(model=args.model, data=args.data, method=args.method, out=args.out, shots=args.shots,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                          seed=args.seed, precision=args.precision, resume=args.resume,
                          split_json=args.split_json, subsample=args.subsample, workers=args.workers,
                          method_options=_method_options([a for group in args.opt or [] for a in group]),
                          quiet=args.quiet,
                          optimizer=args.optimizer, recipe=args.recipe, weight_decay=args.weight_decay,
                          warmup_epochs=args.warmup_epochs, augment=not args.no_augment,
                          template=args.template, base_to_new=args.base_to_new, tokenizer=args.tokenizer,
                          activation=args.activation, dataset=args.dataset, classnames_file=args.classnames)
        from ..base import ddp
        from ..engine.train import train

        try:
            r = train(cfg)
        finally:
            ddp.teardown()
        if r and "harmonic_mean" in r:
            print(f"{args.method}: base accuracy {r['base_accuracy']:.4f} on {r['test_images']} images, new "
                  f"accuracy {r['new_accuracy']:.4f} on {r['new_test_images']} images, harmonic mean "
                  f"{r['harmonic_mean']:.4f}; checkpoint {os.path.join(args.out, 'prompt.safetensors')}")
        elif r:
            print(f"{args.method}: test accuracy {r['accuracy']:.4f} on {r['test_images']} images; "
                  f"checkpoint {os.path.join(args.out, 'prompt.safetensors')}")
        return 0
    if args.cmd in ("predict", "export", "eval"):  # and eval of a bundle (apps/export.py); of a checkpoint below
        from . import export, predict

        if args.cmd != "eval" or export.bundle_eval_wanted(args):
            return {"predict": predict.run, "export": export.run, "eval": export.run_eval}[args.cmd](args)
    if args.cmd == "eval":
        cfg = EvalConfig(model=args.model, data=args.data, checkpoint=args.checkpoint, split_json=args.split_json,
                         subsample=args.subsample, device=args.device, precision=args.precision,
                         batch_size=args.batch_size, workers=args.workers, other_classes=args.other_classes,
                         frozen=args.frozen, tokenizer=args.tokenizer, activation=args.activation,
                         dataset=args.dataset, classnames_file=args.classnames)
        from ..engine.evaluate import evaluate_checkpoint

        info = {}
        acc = evaluate_checkpoint(cfg, info)
        print(f"{info['method']}: accuracy {acc:.4f} on {info['images']} test images ({info['classes']} classes)")
        return 0
    if args.cmd in ("sweep", "summarize"):
        from . import summarize, sweep

        return (sweep if args.cmd == "sweep" else summarize).run(args)
    cfg = DemoConfig(out=args.out, epochs=args.epochs, device=args.device)
    from .demo import demo

    return demo(cfg.out, cfg.epochs, cfg.device)


def _warning_line(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"ladder-clip: warning: {message}\n")


def _interrupted(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    what = "terminated (SIGTERM)" if _sigint["term"] else "interrupted"
    if argv[:1] == ["train"]:
        hint = "" if "--resume" in argv else " with --resume"
        print(f"ladder-clip: {what}; run the same command{hint} to continue from the last finished "
              "epoch", file=sys.stderr)
    else:
        print(f"ladder-clip: {what}", file=sys.stderr)
    return 143 if _sigint["term"] else 130


_sigint = {"seen": False, "term": False}


def _on_sigint(signum, frame):
    # transformers' lazy import turns a KeyboardInterrupt raised inside it into another exception: the
    # flag lets main() recognise a Ctrl-C whatever it became on the way up. SIGTERM (a scheduler, kill)
    # ends the same way, with its own status: silent death left no word of how to continue.
    _sigint["seen"] = True
    _sigint["term"] = _sigint["term"] or signum == signal.SIGTERM
    raise KeyboardInterrupt


def main(argv=None) -> int:
    _sigint["seen"] = _sigint["term"] = False
    try:
        old = {s: signal.signal(s, _on_sigint) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        old = {}
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # also while torch / transformers are being imported
        code = 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return _interrupted(argv) if code == 130 or _sigint["seen"] else code


def _main(argv) -> int:
    try:
        args = _parser(any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))).parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (already printed as one line)
        return int(exc.code or 0)
    warnings.showwarning = _warning_line
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return _run(args)
    except UserError as exc:  # one line, whatever a wrapped library message held
        print(f"ladder-clip: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if _sigint["seen"]:  # transformers turns a Ctrl-C during its imports into this
            return 130
        if exc.name in _PIPELINE_PACKAGES:  # a kernels-only install: the pipeline's packages are an extra
            print(f"ladder-clip: error: the pipeline needs the package {exc.name!r}, which this install lacks: "
                  "pip install 'ladder_kernels[clip]'", file=sys.stderr)
            return 2
        return _unexpected(exc)
    except OSError as exc:
        if exc.errno in _IO_ERRNOS and not _sigint["seen"]:  # the machine's, not ours: say which file
            print(f"ladder-clip: error: {exc.strerror}: {exc.filename!r}"
                  f"{'; is the disk full?' if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ''}", file=sys.stderr)
            return 2
        return _unexpected(exc)
    except Exception as exc:
        forced = os.environ.get("LADDER_KERNELS_BACKEND")
        if forced and isinstance(exc, ValueError) and "cannot run here" in str(exc):  # evaluate.check_backend_env
            print(f"ladder-clip: error: LADDER_KERNELS_BACKEND={forced!r}: {' '.join(str(exc).split())}; unset it "
                  "to let each op choose", file=sys.stderr)
            return 2
        return _unexpected(exc)


_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM)


def _user_message(exc: Exception) -> str:
    """The message on one line; a data-loading worker's error arrives inside its traceback (torch's
    "Caught UserError in DataLoader worker process 0. Original Traceback ..."): its last line is ours."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("UserError: ", 1)[-1]
    return " ".join(text.split())


# import names of the `clip` extra's packages (setup.py)
_PIPELINE_PACKAGES = ("transformers", "safetensors", "tqdm", "PIL")


def _unexpected(exc: Exception) -> int:
    """An unexpected failure still gets one line, unless debugging."""
    if _sigint["seen"]:
        return 130
    if os.environ.get("LADDER_CLIP_DEBUG"):
        raise exc
    msg = str(exc).strip().splitlines()
    print(f"ladder-clip: error: {type(exc).__name__}: {msg[0] if msg else ''} "
          "(LADDER_CLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
    return 1


def run_and_exit(argv=None) -> None:
    """main(), then the process's exit. Interrupted, it leaves without the interpreter's finalisation:
    when a library's C code ran Python (PyRun_*) as the Ctrl-C landed, CPython keeps a global "unhandled
    KeyboardInterrupt" flag set although main() handled it, and finalisation then turns status 130 into
    death by SIGINT (-2). The line is printed and every commit is whole by then."""
    code = main(argv)
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_and_exit()
