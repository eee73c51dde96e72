"""`ladder-clip sweep`: the papers' grid (datasets x methods x shots x seeds, or base-to-new), one
`python -m ladder_clip train` subprocess per run so that a failing run is reported and the sweep goes on.

Layout: OUT/<dataset>/<method>/<shots>shot/seed<seed> (OUT/base2new/... with --base-to-new); zeroshot
trains nothing, so it runs once per dataset, in OUT/<dataset>/zeroshot. Each run folder gets the child's
output in train.log and, once the child succeeded, sweep-run.json: the settings that made its
metrics.json. A run is finished (skipped) when both are there and agree with the planned run; a folder
with committed epochs (OUT/.../state) is continued with --resume; anything else trains from scratch.
Runs go one after another on CPU (--jobs N: N at a time), or one process per visible GPU
(CUDA_VISIBLE_DEVICES set per child)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

from ..base import files
from ..base.errors import UserError
from ..base.lock import OutLock

RECORD = "sweep-run.json"
LOG = "train.log"
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
B2N_SHOTS = (16,)  # CoCoOp's base-to-new protocol: 16 shots of the base classes
DEFAULT_SEEDS = (1, 2, 3)
STOP_WAIT_S = 60  # a child stops at its next instruction, committing nothing half-written; then SIGKILL
# train flags passed to every child as given (argparse dest, flag, takes a value)
PASS = (("epochs", "--epochs", True), ("recipe", "--recipe", True), ("lr", "--lr", True),
        ("batch_size", "--batch-size", True), ("optimizer", "--optimizer", True),
        ("weight_decay", "--weight-decay", True), ("warmup_epochs", "--warmup-epochs", True),
        ("precision", "--precision", True), ("workers", "--workers", True),
        ("tokenizer", "--tokenizer", True), ("activation", "--activation", True),
        ("no_augment", "--no-augment", False))


def add_arguments(p) -> None:
    from ..engine.config import ACTIVATIONS, DEVICES, OPTIMIZERS, PRECISIONS

    p.add_argument("--model", required=True, help="as train's --model (tiny, tiny-pretrained, a folder, a file)")
    p.add_argument("--datasets", required=True, nargs="+", metavar="DIR|NAME=DIR|NAME",
                   help="DIR: an ImageFolder root (train/<class>/, test/<class>/), named by its folder's name; "
                   "NAME=DIR: one of CoOp's datasets (train's --dataset NAME --data DIR, DIR its folder or the "
                   "folder holding it under CoOp's folder name); NAME alone: NAME=ROOT, with --data ROOT")
    p.add_argument("--classnames", metavar="FILE", help="ImageNet's classnames.txt, for the imagenet runs "
                   "(default: train's, the one in imagenet's folder)")
    p.add_argument("--data", metavar="ROOT", help="with --data, every --datasets entry is a dataset NAME under ROOT "
                   "(CoOp's $DATA: ROOT/oxford_pets/, ROOT/dtd/, ...)")
    p.add_argument("--methods", required=True, nargs="+", metavar="METHOD", help="train's --method names")
    p.add_argument("--shots", type=int, nargs="+", metavar="K",
                   help=f"(default: {' '.join(map(str, DEFAULT_SHOTS))}; with --base-to-new: 16)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), metavar="S",
                   help=f"(default: {' '.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--base-to-new", action="store_true",
                   help="every run trains on the base classes and reports base, new and their harmonic mean")
    p.add_argument("--out", required=True, help="the sweep's folder (one run folder per run under it)")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="cpu: runs one after another; cuda: one run per visible GPU at a time (default: cpu)")
    p.add_argument("--gpus", type=int, help="with --device cuda: use this many of the visible GPUs (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="with --device cpu: runs at a time, each child's torch "
                   "threads set to the cores / JOBS (default: 1, one after another)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (each run, its state, its command)")
    p.add_argument("--verbose", action="store_true", help="children print their epoch lines into train.log "
                   "(default: --quiet)")
    g = p.add_argument_group("passed to every run's train (default: train's own, e.g. the method's recipe)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--recipe")
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--precision", choices=PRECISIONS)
    g.add_argument("--template")
    g.add_argument("--workers", type=int)
    g.add_argument("--tokenizer")
    g.add_argument("--activation", choices=ACTIVATIONS)
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--opt", action="append", nargs="+", metavar="[METHOD:]KEY=VALUE",
                   help="method options; METHOD: limits one to that method (e.g. ladder:reduction=8)")


@dataclass
class Run:
    dataset: str
    data_args: List[str]
    method: str
    shots: int
    seed: int
    base_to_new: bool
    folder: str
    name: str  # the folder under --out, for progress lines
    settings: List[str] = field(default_factory=list)  # train's arguments, less the per-attempt ones
    state: str = "new"  # new | finished | resume

    def argv(self, device: str, quiet: bool) -> List[str]:
        return [sys.executable, "-m", "ladder_clip", "train", *self.settings, "--out", self.folder,
                "--device", device] + (["--quiet"] if quiet else []) + (["--resume"] if self.state == "resume" else [])


def _datasets(entries, root=None, classnames=None) -> List[tuple]:
    """[(label, train's data arguments)], labels unique and usable as folder names; a CoOp dataset's name
    and layout are checked here (train would refuse them in every run of the sweep)."""
    from ..data.coop_datasets import SPECS, canonical, find_root

    out, seen = [], {}
    for e in entries:
        name, sep, path = e.partition("=")
        if root is not None and not sep:
            sep, path = "=", root
        if not sep:
            path = e
        if not os.path.isdir(path):
            raise UserError(f"--datasets {e!r}: no folder {path!r} (expected an ImageFolder root with train/ and "
                            "test/, NAME=DIR for one of CoOp's datasets, or NAME with --data ROOT)")
        if sep:
            name = canonical(name, "--datasets")
            if SPECS[name].test_only:
                raise UserError(f"--datasets {e!r}: {name} is test-only (nothing to train on); score a checkpoint "
                                f"trained on imagenet with `ladder-clip eval --dataset {name}`")
            find_root(SPECS[name], path)
            args = ["--dataset", name, "--data", os.path.abspath(path)]
            if classnames is not None and name == "imagenet":  # train takes it for imagenet alone
                args += ["--classnames", os.path.abspath(classnames)]
        else:
            name = os.path.basename(os.path.normpath(path))
            args = ["--data", os.path.abspath(path)]  # absolute: the record stays the same from any folder
            lacks = [d for d in ("train", "test") if not os.path.isdir(os.path.join(path, d))]
            if lacks:
                raise UserError(f"--datasets {e!r}: no {' and no '.join(lacks)} folder in {path!r} (expected an "
                                "ImageFolder root with train/<class>/ and test/<class>/)")
        if name in seen:
            raise UserError(f"--datasets: two datasets named {name!r} ({seen[name]!r} and {e!r}); each needs a "
                            "run folder of its own (an ImageFolder is named by its folder's name)")
        seen[name] = e
        out.append((name, args))
    return out


def _options(groups, methods) -> dict:
    """{method: [--opt arguments]} from --opt [METHOD:]KEY=VALUE, each method's keys checked by the
    method's declared options before anything runs (a bad key would otherwise fail every run of it)."""
    from ..methods import METHODS

    per = {m: {} for m in methods}
    for pair in [a for g in groups or [] for a in g]:
        target, colon, rest = pair.partition(":")
        if colon and target in METHODS and "=" not in target:
            if target not in methods:
                raise UserError(f"--opt {pair!r}: method {target!r} is not in --methods")
            aims, pair = [target], rest
        else:
            aims = [m for m in methods if m != "zeroshot"] or list(methods)
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"--opt {pair!r}: expected KEY=VALUE or METHOD:KEY=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        for m in aims:
            if key in per[m]:
                raise UserError(f"--opt {key}: given twice for method {m!r}")
            per[m][key] = (parsed, f"{key}={value}")
    for m, opts in per.items():
        try:
            METHODS[m].check_options({k: v for k, (v, _) in opts.items()})
        except ValueError as exc:
            raise UserError(f"--opt for method {m!r}: {exc}")
    return {m: [a for _, (_, text) in sorted(opts.items()) for a in ("--opt", text)] for m, opts in per.items()}


def plan(args) -> List[Run]:
    from ..methods import METHODS

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise UserError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    methods = list(dict.fromkeys(args.methods))
    shots = sorted(set(args.shots or (B2N_SHOTS if args.base_to_new else DEFAULT_SHOTS)))
    seeds = list(dict.fromkeys(args.seeds))
    if any(k < 0 for k in shots) or any(s < 0 for s in seeds):
        raise UserError(f"--shots and --seeds must be integers >= 0, got {shots} and {seeds}")
    if args.classnames is not None and not os.path.isfile(args.classnames):
        raise UserError(f"--classnames {args.classnames!r}: no such file (expected ImageNet's classnames.txt)")
    datasets = _datasets(args.datasets, args.data, args.classnames)
    opts = _options(args.opt, methods)
    common = ["--model", os.path.abspath(args.model) if os.path.exists(args.model) else args.model]
    for dest, flag, valued in PASS:
        v = getattr(args, dest)
        if valued and v is not None:
            common += [flag, str(v)]
        elif not valued and v:
            common.append(flag)
    # --template only where train takes one (a method that learns its prompt refuses it)
    template = {m: ["--template", args.template] if args.template is not None and "template" in METHODS[m].defaults
                else [] for m in methods}
    root = os.path.join(args.out, "base2new") if args.base_to_new else args.out
    runs = []
    for label, data_args in datasets:
        for m in methods:
            # zero-shot trains nothing: shots and seed do not change it; one run (1 shot: few images to read)
            grid = [(1, seeds[0])] if m == "zeroshot" else [(k, s) for k in shots for s in seeds]
            for k, s in grid:
                folder = os.path.join(root, label, m) if m == "zeroshot" else \
                    os.path.join(root, label, m, f"{k}shot", f"seed{s}")
                settings = common + data_args + ["--method", m, "--shots", str(k), "--seed", str(s)] + opts[m] + \
                    template[m] + (["--base-to-new"] if args.base_to_new else [])
                runs.append(Run(label, data_args, m, k, s, args.base_to_new, folder,
                                os.path.relpath(folder, args.out), settings))
    for r in runs:
        r.state = _state(r)
    return runs


def _record(r: Run) -> dict:
    return {"dataset": r.dataset, "method": r.method, "shots": r.shots, "seed": r.seed,
            "base_to_new": r.base_to_new, "train": r.settings}


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _state(r: Run) -> str:
    """finished: its metrics.json and the record of the settings that made it agree with this run;
    resume: it has committed epochs (an interrupted run, or one to finish with other --epochs); else new."""
    m, rec = _load(os.path.join(r.folder, "metrics.json")), _load(os.path.join(r.folder, RECORD))
    if isinstance(m, dict) and rec == _record(r) and m.get("method") == r.method and m.get("shots") == r.shots \
            and m.get("seed") == r.seed and ("harmonic_mean" in m) == r.base_to_new:
        return "finished"
    sdir = os.path.join(r.folder, "state")
    if os.path.isdir(sdir) and any(n.startswith("epoch-") and n[6:].isdigit() for n in os.listdir(sdir)):
        return "resume"
    return "new"


def _gpus(args) -> List[str]:
    if args.device != "cuda":
        if args.gpus is not None:
            raise UserError("--gpus: only with --device cuda (on CPU, --jobs sets the runs at a time)")
        return []
    if args.jobs != 1:
        raise UserError("--jobs: only with --device cpu (on GPUs, one run per GPU at a time; --gpus)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        raise UserError("--device cuda: no GPU is visible here (CUDA_VISIBLE_DEVICES, torch.cuda.device_count())")
    if args.gpus is not None:
        if not 1 <= args.gpus <= len(ids):
            raise UserError(f"--gpus must be in 1..{len(ids)} (the visible GPUs), got {args.gpus}")
        ids = ids[:args.gpus]
    return ids


def _result(folder: str) -> str:
    m = _load(os.path.join(folder, "metrics.json"))
    try:
        if "harmonic_mean" in m:
            return f"base {m['base_accuracy']:.4f}, new {m['new_accuracy']:.4f}, HM {m['harmonic_mean']:.4f}"
        return f"accuracy {m['accuracy']:.4f}"
    except (KeyError, TypeError, ValueError):  # a metrics.json of no run of ours: summarize will list it
        return "no accuracy in its metrics.json"


def _last_error(log: str) -> str:
    """The last attempt's last error line (its last line if none)."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(empty log)"])[-1]


def _write_record(r: Run) -> None:
    text = json.dumps(_record(r), indent=2)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    files.atomic_write(os.path.join(r.folder, RECORD), write)


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.failed, self.skipped, self.started = total, 0, 0, 0, 0

    def counts(self) -> str:
        left = self.total - self.done - self.failed - self.skipped
        return f"{self.done} done, {self.failed} failed, {self.skipped} skipped, {left} left"

    def say(self, text: str) -> None:
        print(f"sweep: {text}", flush=True)


def run(args) -> int:
    runs = plan(args)
    if not 1 <= args.jobs <= 256:
        raise UserError(f"--jobs must be an integer in 1..256, got {args.jobs}")
    gpus = _gpus(args)
    if args.dry_run:
        for r in runs:
            what = {"finished": "finished, skipped", "resume": "resumes (--resume)", "new": "trains"}[r.state]
            print(f"{r.folder}: {what}\n    {shlex.join(r.argv(args.device, not args.verbose))}")
        todo = sum(r.state != "finished" for r in runs)
        print(f"sweep: {len(runs)} runs, {todo} to run, {len(runs) - todo} finished (dry run: nothing ran)")
        return 0
    files.check_out_folder(args.out)
    with OutLock(args.out):
        return _sweep(runs, args, gpus)


def _sweep(runs: List[Run], args, gpus: List[str]) -> int:
    p = _Progress(len(runs))
    where = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(gpus)})" if gpus else \
        "CPU, one at a time" if args.jobs == 1 else f"CPU, {args.jobs} at a time"
    p.say(f"{len(runs)} runs on {where}; out {args.out}")
    queue, failed = [], []
    for r in runs:
        if r.state == "finished":
            p.skipped += 1
            p.say(f"skip {r.name}: finished ({_result(r.folder)}); {p.counts()}")
        else:
            queue.append(r)
    slots = list(enumerate(gpus or [None] * args.jobs))
    running = {}  # slot -> (run, Popen, start time, log file)
    try:
        while queue or running:
            for slot in slots:
                if slot not in running and queue:
                    running[slot] = _start(queue.pop(0), slot[1], args, p)
            time.sleep(0.1)
            for slot, (r, proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                _finished(r, proc.returncode, time.monotonic() - t0, p, failed)
    except BaseException:
        _stop(running, p)
        raise
    p.say(f"{len(runs)} runs: {p.done} trained, {p.skipped} skipped, {p.failed} failed; tables: "
          f"ladder-clip summarize {args.out}")
    for r in failed:
        p.say(f"failed: {r.name} (log {os.path.join(r.folder, LOG)})")
    return 1 if failed else 0


def _start(r: Run, slot, args, p: _Progress):
    os.makedirs(r.folder, exist_ok=True)
    argv = r.argv(args.device, not args.verbose)
    log = open(os.path.join(r.folder, LOG), "a", encoding="utf-8")  # attempts accumulate, each with its command
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
    log.flush()
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    elif args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # JOBS runs share the cores, not each all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    # its own session: a Ctrl-C reaches the sweep alone, which stops each child once (a second signal could
    # land inside the child's own shutdown); on Linux a child also gets SIGTERM if the sweep dies (SIGKILL)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    p.started += 1
    on = f" on GPU {slot}" if slot is not None else ""
    p.say(f"start {r.name}{' (--resume)' if r.state == 'resume' else ''}{on} [{p.started} of "
          f"{p.total - p.skipped} to run]")
    return r, proc, time.monotonic(), log


def _die_with_parent() -> None:
    """In the child before exec: prctl(PR_SET_PDEATHSIG, SIGTERM), so that no run outlives a killed sweep."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _finished(r: Run, code: int, seconds: float, p: _Progress, failed: list) -> None:
    if code == 0 and os.path.isfile(os.path.join(r.folder, "metrics.json")):
        _write_record(r)
        p.done += 1
        p.say(f"done {r.name}: {_result(r.folder)} in {seconds:.1f} s; {p.counts()}")
        return
    p.failed += 1
    failed.append(r)
    p.say(f"FAILED {r.name} (exit {code}) after {seconds:.1f} s: {_last_error(os.path.join(r.folder, LOG))}; "
          f"{p.counts()}")


def _stop(running: dict, p: _Progress) -> None:
    """Stops the running children (SIGTERM: each stops where it is, its commits whole) and waits for them;
    a second interrupt, or STOP_WAIT_S, kills them (their committed epochs are whole all the same)."""
    if not running:
        return
    p.say(f"stopping {len(running)} running run(s); the same command resumes them")
    for r, proc, _, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        for r, proc, _, log in running.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    except BaseException:
        for r, proc, _, log in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        raise
