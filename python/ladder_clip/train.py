"""Training and evaluation loops: few-shot data, AdamW with a cosine schedule, autocast precision, DDP,
atomic checkpoints every epoch, --resume, tqdm progress, OUT/metrics.json."""
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ladder_kernels import SavedTensors

from . import checkpoint as ckpt
from . import data as D
from . import ddp
from .backbone import load_backbone
from .errors import UserError
from .peak import peak_bytes, reset_peak
from .methods import build_method

CALIBRATION_BATCHES = 4
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    model: str
    data: str
    method: str
    out: str
    shots: int = 16
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    device: str = "cpu"
    seed: int = 1
    precision: str = "fp32"
    resume: bool = False
    split_json: Optional[str] = None
    subsample: str = "all"
    workers: int = 0
    eval_batch_size: int = 64
    method_options: dict = field(default_factory=dict)
    quiet: bool = False
    optimizer: str = "adamw"


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA GPU")


def autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def loader(items, backbone, batches, workers):
    ds = D.ImageDataset(items, D.Preprocess(backbone.preprocess))
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)


def global_batches(n: int, batch: int, seed: int, epoch: int, world: int):
    """The same shuffled global batches on every rank; a last batch smaller than the world is dropped."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    out = [order[i:i + batch] for i in range(0, n, batch)]
    return [b for b in out if len(b) >= world]


@torch.no_grad()
def evaluate(method, items, device, precision="fp32", batch_size=64, workers=0, quiet=True) -> float:
    method.eval()
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    correct = 0
    with autocast(device, precision):
        text = method.text_features()
        for x, y in tqdm(loader(items, method.backbone, batches, workers), desc="eval", disable=quiet,
                         leave=False):
            logits = method(x.to(device), text)
            correct += (logits.argmax(-1).cpu() == y).sum().item()
    return correct / max(1, len(items))


def prepare_data(cfg: TrainConfig, rank: int):
    classnames, splits = D.load_data(cfg.data, cfg.split_json)
    classnames, splits = D.subsample(classnames, splits, cfg.subsample)
    if cfg.shots < 0:
        raise UserError(f"--shots must be >= 0 (0 = all training images), got {cfg.shots}")
    path = D.fewshot_file(cfg.out, cfg.shots, cfg.seed, cfg.subsample)
    if cfg.resume and os.path.isfile(path):
        train = D.load_fewshot(path)
    else:
        if cfg.shots:
            train = D.few_shot(splits["train"], cfg.shots, cfg.seed, classnames)
        else:
            train = D.readable(splits["train"])
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            D.save_fewshot(path, train)
    test = D.readable(splits["test"])
    if not train or not test:
        raise UserError(f"--data {cfg.data!r}: no readable {'training' if not train else 'test'} images")
    return classnames, train, test


def _paths(out):
    return os.path.join(out, "prompt.safetensors"), os.path.join(out, "optimizer.pt"), os.path.join(out, "metrics.json")


def train(cfg: TrainConfig) -> dict:
    check_device(cfg.device)
    if cfg.precision not in DTYPES:
        raise UserError(f"--precision must be one of {', '.join(DTYPES)}, got {cfg.precision!r}")
    rank, world, device = ddp.setup(cfg.device)
    if cfg.batch_size < world:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes")
    quiet = cfg.quiet or rank != 0
    seed_all(cfg.seed)
    backbone = load_backbone(cfg.model, device)
    classnames, train_items, test_items = prepare_data(cfg, rank)
    try:
        method = build_method(cfg.method, backbone, classnames, **cfg.method_options)
    except ValueError as exc:
        raise UserError(str(exc))
    ck_path, opt_path, metrics_path = _paths(cfg.out)
    start_epoch, curve = 0, []
    if hasattr(method, "calibrate") and not cfg.resume:  # Fisher pruning: the same global batches on every rank
        first = global_batches(len(train_items), cfg.batch_size, cfg.seed, -1, 1)[:CALIBRATION_BATCHES]
        method.calibrate(loader(train_items, backbone, first, cfg.workers))
    params = method.trainable_parameters()
    steps_per_epoch = len(global_batches(len(train_items), cfg.batch_size, cfg.seed, 0, world))
    total = max(1, steps_per_epoch * cfg.epochs)
    if cfg.optimizer not in ("adamw", "sgd"):
        raise UserError(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    opt = None
    if params:  # SGD with momentum is CoOp's choice; AdamW suits the ladder's many small tensors
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if cfg.optimizer == "adamw" \
            else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine) if opt else None
    if cfg.resume:
        if not os.path.isfile(ck_path):
            raise UserError(f"--resume: {ck_path!r} does not exist (nothing to resume)")
        header, tensors = ckpt.read_checkpoint(ck_path)
        ckpt.check_compatible(header, ck_path, backbone, cfg.method)
        ckpt.load_into(method, tensors, ck_path)
        start_epoch = int(header.get("epoch", 0))
        if opt is not None and os.path.isfile(opt_path):
            state = torch.load(opt_path, map_location=device, weights_only=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        if os.path.isfile(metrics_path):
            with open(metrics_path, encoding="utf-8") as f:
                curve = json.load(f).get("loss_curve", [])[: start_epoch * steps_per_epoch]
    model = ddp.wrap(method, device) if world > 1 and params else method
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    # fp16: the scaler skips steps whose gradients overflow, and the scheduler then warns; that is expected
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
    reset_peak(device)
    images, train_time, saved_bytes, last_acc = 0, 0.0, None, None
    for epoch in range(start_epoch, cfg.epochs if params else 0):
        method.train()
        batches = global_batches(len(train_items), cfg.batch_size, cfg.seed, epoch, world)
        local = [b[rank::world] for b in batches]
        bar = tqdm(zip(batches, loader(train_items, backbone, local, cfg.workers)), total=len(batches),
                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=quiet)
        for gb, (x, y) in bar:
            t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            with SavedTensors(params) as saved, autocast(device, cfg.precision):
                logits = model(x)
                # sum / (global batch / world): DDP's mean over ranks then gives the global-batch mean
                loss = F.cross_entropy(logits.float(), y, reduction="sum") * world / len(gb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            images += len(gb)
            saved_bytes = saved.bytes if saved_bytes is None else max(saved_bytes, saved.bytes)
            curve.append(loss.item() * len(gb) / world / len(y))
            last_acc = (logits.argmax(-1) == y).float().mean().item()
            bar.set_postfix(loss=f"{curve[-1]:.3f}", acc=f"{last_acc:.2f}", peak=f"{peak_bytes(device) / 2**20:.0f}MiB")
        if rank == 0:
            _save(cfg, method, opt, sched, epoch + 1, classnames)
        ddp.barrier()
    result = {}
    if rank == 0:
        if not params or not os.path.isfile(ck_path) or start_epoch >= cfg.epochs:
            _save(cfg, method, opt, sched, cfg.epochs if params else 0, classnames)
        acc = evaluate(method, test_items, device, cfg.precision, cfg.eval_batch_size, cfg.workers, quiet)
        result = {
            "method": cfg.method, "model": backbone.name, "accuracy": acc, "test_images": len(test_items),
            "train_images": len(train_items), "shots": cfg.shots, "epochs": cfg.epochs, "seed": cfg.seed,
            "precision": cfg.precision, "world_size": world, "loss_curve": curve,
            "peak_memory_bytes": peak_bytes(device), "peak_memory_kind":
                "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "saved_activation_bytes": saved_bytes, "images_per_s": images / train_time if train_time else None,
            "trainable_parameters": sum(p.numel() for p in params), "classnames": classnames,
            "config": method.config(),
        }
        ckpt.atomic_write(metrics_path, lambda tmp: _write_json(tmp, result))
    ddp.barrier()
    return result


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _save(cfg, method, opt, sched, epoch, classnames):
    ck_path, opt_path, _ = _paths(cfg.out)
    ckpt.save_checkpoint(ck_path, method, {"epoch": epoch, "seed": cfg.seed, "shots": cfg.shots})
    if opt is not None:
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        ckpt.atomic_write(opt_path, lambda tmp: torch.save(state, tmp))


def evaluate_checkpoint(model: str, data: str, checkpoint: str, device="cpu", split_json=None,
                        subsample="all", batch_size=64, precision="fp32", workers=0, quiet=False) -> float:
    check_device(device)
    dev = torch.device(device)
    backbone = load_backbone(model, dev)
    header, tensors = ckpt.read_checkpoint(checkpoint)
    ckpt.check_compatible(header, checkpoint, backbone)
    classnames, splits = D.load_data(data, split_json)
    classnames, splits = D.subsample(classnames, splits, subsample)
    try:
        method = build_method(header["method"], backbone, classnames, **header["config"])
    except ValueError as exc:
        raise UserError(f"checkpoint {checkpoint!r}: {exc}")
    ckpt.load_into(method, tensors, checkpoint)
    test = D.readable(splits["test"])
    if not test:
        raise UserError(f"--data {data!r}: no readable test images")
    return evaluate(method, test, dev, precision, batch_size, workers, quiet)
