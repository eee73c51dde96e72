"""The training loop: few-shot data with Dassl's augmentation, the recipe's optimizer (recipes.py: SGD or
AdamW, a constant warm-up then a cosine per epoch), autocast precision, DDP, one atomic commit per epoch
(state.py), --resume, a tqdm bar and one summary line per epoch, OUT/metrics.json (metrics.py).

Resume is exact on CPU: the data order depends only on (seed, epoch), and the RNG states (python, torch,
CUDA) are committed with the weights and the optimizer, so a run killed at any instant and resumed ends
with the same weights as an uninterrupted one, bit for bit.
"""
import contextlib
import gc
import math
import os
import random
import re
import time
import warnings

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ladder_kernels import SavedTensors

from .. import data as D
from ..base import ddp, files
from ..base.errors import UserError
from ..base.lock import OutLock
from ..base.peak import PeakMeter
from ..base.runtime import autocast, bar_off, check_device
from ..data.loader import loader
from ..methods import build_method
from ..methods.prompts import check_distinct
from ..model.load import load_backbone
from . import checkpoint as ckpt
from . import state, tapcache
from .config import TrainConfig
from .evaluate import evaluate
from .metrics import epoch_line, finish

CALIBRATION_BATCHES = 4


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def global_batches(n: int, batch: int, seed: int, epoch: int, world: int):
    """The same shuffled global batches on every rank; a last batch smaller than the world is dropped."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    out = [order[i:i + batch] for i in range(0, n, batch)]
    return [b for b in out if len(b) >= world]


def load_classes(cfg: TrainConfig):
    """(all class names, all splits, the classes trained on): the folder listing, no image read yet."""
    all_names, all_splits = D.load_data(cfg.data, cfg.split_json, cfg.dataset, cfg.classnames_file)
    if cfg.base_to_new and len(all_names) < 2:
        raise UserError(f"--base-to-new: needs at least 2 classes (base and new), the data has {len(all_names)}")
    return all_names, all_splits, D.subsample(all_names, all_splits, "base" if cfg.base_to_new else cfg.subsample)[0]


def prepare_data(cfg: TrainConfig, rank: int, last, all_names=None, all_splits=None):
    """classnames, training items (the commit's few-shot selection on resume), readable test items."""
    if all_names is None:
        all_names, all_splits, _ = load_classes(cfg)
    classnames, splits = D.subsample(all_names, all_splits, "base" if cfg.base_to_new else cfg.subsample)
    if last is not None:
        if classnames != last.header["classnames"]:
            raise UserError(f"--resume: the classes of --data {cfg.data!r} differ from the run's "
                            f"{last.header['classnames'][:5]}")
        train = D.parse_fewshot(last.fewshot, cfg.data, len(classnames), os.path.join(last.path, "fewshot.json"))
        # an exact resume needs every image the run trained on: a missing one is an error, not a skip
        gone = sorted({p for p, _ in train} - {p for p, _ in D.readable(train)})
        if gone:
            raise UserError(f"--resume: {len(gone)} training image(s) of the run's few-shot selection are missing or "
                            f"unreadable now ({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}); restore them, "
                            "or train again without --resume")
    elif cfg.shots:
        train = D.few_shot(splits["train"], cfg.shots, cfg.seed, classnames)
    else:
        train = D.readable(splits["train"], classnames, f"--data {cfg.data!r} train/")
    test = D.readable(splits["test"], classnames, f"--data {cfg.data!r} test/")
    new = None
    if cfg.base_to_new:  # CoOp's protocol: the new classes are never seen in training
        new_names, new_splits = D.subsample(all_names, all_splits, "new")
        new = (new_names, D.readable(new_splits["test"], new_names, f"--data {cfg.data!r} test/ (new classes)"))
    if rank == 0:  # a derived copy for the user; the commit holds the one a resume reads
        which = "base" if cfg.base_to_new else cfg.subsample
        D.save_fewshot(D.fewshot_file(cfg.out, cfg.shots, cfg.seed, which), train, cfg.data)
    return classnames, train, test, new


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """Dassl's schedule, stepped once per epoch: `warmup_epochs` at the constant warm-up lr, then a cosine
    over --epochs (its T_max) started at the full lr, as Dassl's ConstantWarmupScheduler wraps
    CosineAnnealingLR (so the last epoch's lr is small but not zero)."""
    r = cfg.recipe_values
    if epoch < cfg.warmup_epochs:
        return r["warmup_lr"] / cfg.lr
    return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max(1, cfg.epochs)))


def _optimizer(cfg: TrainConfig, params):
    if not params:
        return None, None
    # SGD with momentum and weight decay is the authors' recipe (CoOp, MaPLe, VPT); AdamW stays an option
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw" \
        else torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.recipe_values["momentum"],
                             weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, cfg))


def _resume(last, cfg, method, opt, sched, scaler, device) -> state.History:
    """The committed epoch's weights, optimizer, scheduler, scaler and RNG states, and its history."""
    path = os.path.join(last.path, "prompt.safetensors")
    ckpt.check_compatible(last.header, path, method.backbone, cfg.method)
    old, new = last.history.settings, cfg.run_settings()
    if old != new:
        flat_old = {**old, **{f"--opt {k}": v for k, v in (old.get("method_options") or {}).items()}}
        flat_new = {**new, **{f"--opt {k}": v for k, v in new["method_options"].items()}}
        diff = [f"{k.replace('_', '-') if not k.startswith('--') else k} {flat_old.get(k)!r} -> {v!r}"
                for k, v in flat_new.items() if k != "method_options" and flat_old.get(k) != v]
        raise UserError(f"--resume: {cfg.out!r} was trained with other settings ({'; '.join(diff) or old}); "
                        "repeat the first run's arguments (only paths, --epochs, --workers, --device, --quiet "
                        "may change)")
    ckpt.load_into(method, last.tensors, path)
    ts = last.train_state
    try:
        if opt is not None:
            opt.load_state_dict(ts["optimizer"])
            sched.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts.get("scaler") or {})
        state.set_rng_state(ts["rng"], device)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"--resume: {os.path.join(last.path, 'train_state.pt')} does not fit this run "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "train again without --resume")
    return last.history


def _train_state(opt, sched, scaler, device) -> dict:
    out = {"scaler": scaler.state_dict(), "rng": state.rng_state(device)}
    if opt is not None:
        out.update(optimizer=opt.state_dict(), scheduler=sched.state_dict())
    return out


def _non_finite(what: str, epoch: int, step: int, steps: int, out: str):
    kept = state.committed(out)
    keep = f"{kept[-1]} (epoch {int(os.path.basename(kept[-1])[len(state.PREFIX):])})" if kept else "nothing"
    return UserError(f"{what} at epoch {epoch + 1}, step {step + 1} of {steps}: training stopped; the last "
                     f"good commit is kept: {keep} (try a lower --lr)")


def train(cfg: TrainConfig) -> dict:
    check_device(cfg.device)
    rank, world, device = ddp.setup(cfg.device)
    if cfg.batch_size < world:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes")
    files.reset_ops()
    if rank == 0:
        files.check_out_folder(cfg.out)
    with OutLock(cfg.out) if rank == 0 else contextlib.nullcontext(), _gc_frozen():
        return _train(cfg, rank, world, device)


@contextlib.contextmanager
def _gc_frozen():
    """The objects alive at the start (torch's, transformers', ...) left out of the garbage collector's
    passes until the run ends: the peak meter's gc.collect() before every epoch walked all of them, 0.5 s
    an epoch on this 2-core machine, most of an epoch of a small model (benchmarks/recipe.py)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train(cfg: TrainConfig, rank: int, world: int, device) -> dict:
    if rank == 0:
        state.clean(cfg.out, fresh=not cfg.resume)
    ddp.barrier()
    quiet = cfg.quiet or rank != 0
    seed_all(cfg.seed)
    backbone = load_backbone(cfg.model, device, cfg.tokenizer, cfg.activation)
    last = state.load(cfg.out, device) if cfg.resume else None
    if cfg.resume and last is None:
        if os.path.isfile(os.path.join(cfg.out, "prompt.safetensors")):  # no run of this version leaves that
            raise UserError(f"--resume: {cfg.out!r} has a prompt.safetensors but no OUT/state folder (written "
                            "by an older ladder-clip?); train again without --resume")
        if rank == 0:
            warnings.warn(f"--resume: {cfg.out!r} holds no finished epoch yet; starting from the first")
    if last is not None and cfg.epochs < last.history.epoch:
        raise UserError(f"--resume: {cfg.out!r} has {last.history.epoch} epochs trained already, more than --epochs "
                        f"{cfg.epochs}; pass --epochs {last.history.epoch} or more (a run does not go back)")
    all_names, all_splits, classnames = load_classes(cfg)
    try:
        method = build_method(cfg.method, backbone, classnames, **cfg.method_options)
    except ValueError as exc:
        raise UserError(f"--opt: {exc}")
    # before any image is read: names the model cannot tell apart (base and new classes alike)
    where = f"--split-json {cfg.split_json!r}" if cfg.split_json else f"--data {cfg.data!r}"
    check_distinct(method, all_names if cfg.base_to_new else classnames, where)
    classnames, train_items, test_items, new = prepare_data(cfg, rank, last, all_names, all_splits)
    if len(classnames) == 1 and rank == 0:
        warnings.warn(f"{where}: only one class ({classnames[0]!r}): every image is predicted as it, so the "
                      "accuracy is 1.0 whatever is learned")
    if hasattr(method, "calibrate") and last is None:  # Fisher pruning: the same global batches on every rank
        first = global_batches(len(train_items), cfg.batch_size, cfg.seed, -1, 1)[:CALIBRATION_BATCHES]
        method.calibrate(loader(train_items, backbone, first, cfg.workers))
    params = method.trainable_parameters()
    if not params and cfg.method != "zeroshot":
        raise UserError(f"--method {cfg.method}: nothing to train with these --opt values (0 trainable "
                        "parameters)")
    opt, sched = _optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    history = _resume(last, cfg, method, opt, sched, scaler, device) if last else state.History(cfg.run_settings())
    if hasattr(method, "fit") and last is None and cfg.epochs:  # linear-probe: one full-batch fit, no SGD epochs
        t0, val = time.perf_counter(), D.subsample(all_names, all_splits, cfg.subsample)[1].get("val")
        history.loss_curve = method.fit(cfg, train_items, val, quiet)
        history.epoch, history.images, history.train_time = cfg.epochs, len(train_items), time.perf_counter() - t0
    fewshot = D.fewshot_json(train_items, cfg.data)
    # the frozen image forward once per image and view, before the first epoch (tapcache.py)
    cache, built = tapcache.setup(cfg, method, train_items, device, rank, print if not quiet else lambda s: None,
                                  quiet)
    history.tap_cache_seconds += built
    meta = {"seed": cfg.seed, "shots": cfg.shots, "recipe": cfg.recipe_values, "augment": cfg.augment}
    if rank == 0:
        state.publish(cfg.out)  # a kill between a commit and its derived copy left the copy behind
    model = ddp.wrap(method, device) if world > 1 and params else method
    # fp16: the scaler skips steps whose gradients overflow, and the scheduler then warns; that is expected
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
    meter = PeakMeter(device)
    meter.start()
    commits = []  # this process's epoch commits, in seconds (not part of the epochs' times)
    for epoch in range(history.epoch, cfg.epochs if params else 0):
        method.train()
        batches = global_batches(len(train_items), cfg.batch_size, cfg.seed, epoch, world)
        local = [b[rank::world] for b in batches]
        augment = D.Augment(backbone.preprocess, cfg.seed, epoch) if cfg.augment else None
        source = cache.batches(local, epoch) if cache is not None else \
            loader(train_items, backbone, local, cfg.workers, augment)
        bar = tqdm(zip(batches, source), total=len(batches),
                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=bar_off(quiet), leave=False)
        t_epoch, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        meter.reset()
        for step, (gb, (x, y)) in enumerate(bar):
            t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            with SavedTensors(params) as saved, autocast(device, cfg.precision):
                logits = model(x)
                # sum / (global batch / world): DDP's mean over ranks then gives the global-batch mean
                loss = F.cross_entropy(logits.float(), y, reduction="sum") * world / len(gb)
            value = loss.item() * len(gb) / world / len(y)
            if not ddp.everywhere(math.isfinite(value), device):
                raise _non_finite(f"non-finite loss ({value} here, or on another process)" if world > 1 else
                                  f"non-finite loss ({value})", epoch, step, len(batches), cfg.out)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            try:
                scaler.step(opt)
            except RuntimeError as exc:  # AdamW's lr / (1 - beta1^t) past float32, for one
                if "without overflow" not in str(exc):
                    raise
                raise _non_finite(f"the optimizer's step overflowed float32 (--lr {cfg.lr:g}, --weight-decay "
                                  f"{cfg.weight_decay:g})", epoch, step, len(batches), cfg.out) from None
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            history.train_time += time.perf_counter() - t0
            history.images += len(gb)
            history.saved_bytes = saved.bytes if history.saved_bytes is None else max(history.saved_bytes, saved.bytes)
            history.loss_curve.append(value)
            seen, loss_sum = seen + len(y), loss_sum + value * len(y)
            correct += (logits.detach().argmax(-1) == y).sum().item()
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{correct / seen:.2f}")
        total = meter.read()  # before the commit: the peak of this epoch's training steps only
        peak = max(0, total - meter.resident)
        history.peak_bytes = peak if history.peak_bytes is None else max(history.peak_bytes, peak)
        if not all(torch.isfinite(p).all() for p in params):
            raise _non_finite("non-finite weights", epoch, len(batches) - 1, len(batches), cfg.out)
        lr = opt.param_groups[0]["lr"]  # this epoch's
        sched.step()  # per epoch, as Dassl
        history.epoch_seconds.append(time.perf_counter() - t_epoch)
        if not quiet:
            tqdm.write(epoch_line(cfg, epoch, loss_sum / max(1, seen), correct / max(1, seen),
                                  history.epoch_seconds[-1], peak, lr))
        history.epoch = epoch + 1
        t_commit = time.perf_counter()
        if rank == 0:
            state.commit(cfg.out, epoch + 1, method, meta, _train_state(opt, sched, scaler, device), fewshot,
                         history)
        ddp.barrier()
        commits.append(time.perf_counter() - t_commit)
    if cache is not None and not quiet and commits:
        ran = history.epoch_seconds[-len(commits):]
        print(f"tap cache: built in {history.tap_cache_seconds:.1f} s, then {len(ran)} epoch(s) at "
              f"{sum(ran) / len(ran):.3f} s each (+ {sum(commits) / len(commits):.3f} s each for the epoch commit)")
    result = {}
    if rank == 0:
        if not state.committed(cfg.out):  # nothing to train (zeroshot, --epochs 0): the initial state
            state.commit(cfg.out, history.epoch, method, meta, _train_state(opt, sched, scaler, device), fewshot,
                         history)
        acc, new_acc = _test(cfg, method, test_items, new, device, quiet)
        result = finish(cfg, method, backbone, world, history, meter, params, train_items, test_items, acc, new,
                        new_acc)
        result.update(tap_cache_seconds=history.tap_cache_seconds, epoch_seconds=history.epoch_seconds,
                      commit_seconds=commits)
    ddp.barrier()
    return result


def _test(cfg: TrainConfig, method, test_items, new, device, quiet):
    """(test accuracy, None), or with --base-to-new (base classes' accuracy, new classes' accuracy); the
    method's class set is put back after the new classes'."""
    acc = evaluate(method, test_items, device, cfg.precision, cfg.eval_batch_size, cfg.workers, quiet)
    if new is None:
        return acc, None
    base_names = list(method.classnames)
    new_names, new_items = new
    method.set_classnames(new_names)
    new_acc = evaluate(method, new_items, device, cfg.precision, cfg.eval_batch_size, cfg.workers, quiet)
    method.set_classnames(base_names)
    return acc, new_acc
