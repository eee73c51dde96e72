"""The frozen-tap cache (ladder methods, `--opt tap_cache=off|auto|V`): the frozen image encoder never
changes during training, so what it gives the side network (CLIP's image feature and the taps) is
computed once per training image and augmented view, stored under OUT, and every epoch then runs the
side network alone, on one stored view per image.

    OUT/tapcache/  meta.json             the key (what the cache was made from), shapes, dtype, build time
                   feat.f32              CLIP's image features, [V, N, E] float32
                   tap-K.<dtype>         tap K, [V, N, T, W] in fp32, bf16 or int8 (raw, memory-mapped)
                   tap-K.scale           int8 only: one float32 scale per row (per token), [V, N, T]

View v of image i is the augmentation that uncached training draws for image i at epoch v (data.Augment
with (seed, v)); epoch e trains on view views(seed, e)[i], drawn from its own generator (not the global
RNG), so a resumed run samples what an uninterrupted one does. With augmentation off there is one view
(the eval transform), and `tap_cache_dtype=auto` stores fp32 then: training on it gives the uncached
run's weights bit for bit (tests/pipeline/test_tap_cache.py). With augmentation `auto` stores bf16.

The key hashes the model (its frozen weights' signature and preprocessing), the few-shot images (labels
and contents, in order), the seed, V, the augment flag, the dtype, the precision and device type, and
the method's tap identity (tapped layers, frozen fp32/int8, chunking); a cache whose key differs is
rebuilt, with a message. A build goes into OUT/.tmp-tapcache, every file fsynced, then one rename: a
kill leaves the old cache or none, and the next start removes the temp folder (`clean`).

`auto` caches AUTO_VIEWS views (1 without augmentation) when the cache fits both budgets it prints: half
the free disk under OUT, and half the available memory (the page cache keeps the mapped files, so an
epoch reads memory, not disk); if not, half as many views, down to 1; if even 1 view exceeds a budget it
says which and trains uncached. A number V always caches (if it fits the free disk at all).
"""
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .. import data as D
from ..base import ddp, files
from ..base.errors import UserError
from ..base.runtime import autocast
from ..data.loader import loader

FOLDER = "tapcache"
TMP = files.TMP_PREFIX + FOLDER
FORMAT = 1
AUTO_VIEWS = 8  # the fewest views within 1 point of uncached training at 1, 2, 4 and 16 shots (tap_cache_views*.md)
DISK_SHARE = MEMORY_SHARE = 0.5
BUILD_BATCH = 32  # images per frozen forward while building (the method chunks them further)
_NP = {"fp32": np.float32, "bf16": np.uint16, "int8": np.int8}  # bf16: raw bits, numpy has no bf16
_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def active(method) -> bool:
    return hasattr(method, "frozen_image") and method.cfg.get("tap_cache", "off") != "off"


def clean(out: str, keep: bool = True) -> None:
    """Removes a killed build's temp folder (and a stale cache's aside copy); without `keep` (a run that
    caches nothing) the cache itself too: it is derived data, rebuilt on demand."""
    for name in (TMP, f"{files.TMP_PREFIX}old-{FOLDER}"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    if not keep and os.path.isdir(os.path.join(out, FOLDER)):
        files.remove_tree(os.path.join(out, FOLDER))


def _mib(n: int) -> str:
    if n < 2 ** 20:
        return f"{n / 2 ** 10:.1f} KiB"
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def available_memory() -> int:
    """MemAvailable (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Layout:
    views: int
    images: int
    dtype: str
    feat_dim: int
    taps: List[List[int]]  # [tokens, width] of each tap
    tap_dtype: str         # the frozen forward's output dtype, given back on reading

    def row_bytes(self) -> int:
        per = self.feat_dim * 4
        for t, w in self.taps:
            per += t * w * _BYTES[self.dtype] + (t * 4 if self.dtype == "int8" else 0)
        return per

    def nbytes(self) -> int:
        return self.views * self.images * self.row_bytes()


def _image_hash(items) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path, label in items:
        with open(path, "rb") as f:
            h.update(f"{label}:{os.fstat(f.fileno()).st_size};".encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _key(cfg, method, items, layout: Layout, device) -> dict:
    b = method.backbone
    return _plain({"format": FORMAT, "model": b.signature(), "preprocess": b.preprocess, "images": _image_hash(items),
            "count": len(items), "seed": cfg.seed, "views": layout.views, "augment": cfg.augment,
            "dtype": layout.dtype, "precision": cfg.precision, "device": device.type, **method.tap_identity()})


def _plain(key: dict) -> dict:
    """As meta.json gives it back (tuples as lists), so that a field-by-field comparison names what differs."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _probe(method, cfg, device):
    """The frozen forward of one blank image: the shapes and dtype of what is stored."""
    crop = int(method.backbone.preprocess["crop"])
    with torch.no_grad(), autocast(device, cfg.precision):
        out = method.frozen_image(torch.zeros(1, 3, crop, crop, device=device))
    return out.feat.shape[-1], [list(t.shape[1:]) for t in out.taps], str(out.taps[0].dtype).replace("torch.", "")


def plan(cfg, method, n: int, device, say) -> Optional[Layout]:
    """The cache's layout for this run, or None when `auto` decides against caching (said why)."""
    option = method.cfg["tap_cache"]
    views = (AUTO_VIEWS if option == "auto" else option) if cfg.augment else 1
    if not cfg.augment and option not in ("auto", 1):
        say(f"tap cache: --no-augment: every view of an image is the same, so 1 view is stored, not {option}")
    dtype = method.cfg["tap_cache_dtype"]
    if dtype == "auto":  # exact without augmentation (the uncached run's bits); half the bytes with it
        dtype = "bf16" if cfg.augment else "fp32"
    feat_dim, taps, tap_dtype = _probe(method, cfg, device)
    layout = Layout(views, n, dtype, feat_dim, taps, tap_dtype)
    os.makedirs(cfg.out, exist_ok=True)
    disk = shutil.disk_usage(cfg.out).free
    existing = os.path.join(cfg.out, FOLDER)
    if os.path.isdir(existing):  # rebuilding in place frees the old one's space
        disk += sum(e.stat().st_size for e in os.scandir(existing) if e.is_file())
    mem = available_memory()

    def what(lay):
        return f"{lay.views} view(s) x {n} images, {_mib(lay.nbytes())} in {dtype}"
    if option != "auto":
        if layout.nbytes() > disk:
            raise UserError(f"--opt tap_cache={option}: the cache ({what(layout)}) does not fit the {_mib(disk)} "
                            f"free under --out {cfg.out!r}; free space, or pass --opt tap_cache=off (or auto)")
        return layout
    budget = f"budget: half the free disk under --out ({_mib(disk)} free) and half the available memory " \
             f"({_mib(mem)})"

    def over(lay):
        return [w for w, free, share in (("disk", disk, DISK_SHARE), ("memory", mem, MEMORY_SHARE))
                if lay.nbytes() > free * share]
    first = layout
    while over(layout) and layout.views > 1:  # fewer views before none: 1 view is still the frozen forward saved
        layout = Layout(layout.views // 2, n, dtype, feat_dim, taps, tap_dtype)
    if over(layout):
        say(f"tap cache: auto: not caching: {what(layout)} exceeds the {' and the '.join(over(layout))} {budget}; "
            "pass --opt tap_cache=V to cache V views anyway")
        return None
    fewer = f" (fewer than {first.views}: those, {_mib(first.nbytes())}, exceed it)" if layout is not first else ""
    say(f"tap cache: auto: caching {what(layout)}{fewer} ({budget})")
    return layout


def _files(layout: Layout):
    """(name, numpy dtype, shape) of each file of the cache."""
    v, n = layout.views, layout.images
    out = [("feat.f32", np.float32, (v, n, layout.feat_dim))]
    for k, (t, w) in enumerate(layout.taps):
        out.append((f"tap-{k}.{layout.dtype}", _NP[layout.dtype], (v, n, t, w)))
        if layout.dtype == "int8":
            out.append((f"tap-{k}.scale", np.float32, (v, n, t)))
    return out


def _encode(t: torch.Tensor, dtype: str):
    """A tap's rows as stored: fp32 exactly, bf16's bits, or int8 with a per-row (per-token) absmax scale."""
    t = t.detach().float().cpu()
    if dtype == "fp32":
        return [t.numpy()]
    if dtype == "bf16":
        return [t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)]
    scale = t.abs().amax(-1).clamp_min(1e-12) / 127
    return [torch.round(t / scale[..., None]).clamp(-127, 127).to(torch.int8).numpy(), scale.numpy()]


class TapCache:
    """The stored views, memory-mapped read-only; `batches` gives the training loop's inputs."""

    def __init__(self, folder: str, layout: Layout, labels: List[int], seed: int):
        self.layout, self.labels, self.seed = layout, torch.tensor(labels), seed
        self.maps = {name: np.memmap(os.path.join(folder, name), dtype=dt, mode="r", shape=shape)
                     for name, dt, shape in _files(layout)}

    def views(self, epoch: int) -> torch.Tensor:
        """The stored view each image trains on at `epoch`: drawn from (seed, epoch) alone."""
        if self.layout.views == 1:
            return torch.zeros(self.layout.images, dtype=torch.long)
        g = torch.Generator().manual_seed((self.seed * 1000003 + epoch) * 7919 + 17)
        return torch.randint(self.layout.views, (self.layout.images,), generator=g)

    def rows(self, index: List[int], views: torch.Tensor):
        from ..methods.ladder.ladder import FrozenImage  # engine may import methods; only the ladder uses it
        i, v = np.asarray(index, dtype=np.int64), views[index].numpy()
        out_dtype = getattr(torch, self.layout.tap_dtype)
        feat = torch.from_numpy(np.ascontiguousarray(self.maps["feat.f32"][v, i]))  # [B, E]: cheap to read
        taps = []
        for k in range(len(self.layout.taps)):
            raw = np.ascontiguousarray(self.maps[f"tap-{k}.{self.layout.dtype}"][v, i])
            if self.layout.dtype == "fp32":
                t = torch.from_numpy(raw)
            elif self.layout.dtype == "bf16":
                t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
            else:
                scale = torch.from_numpy(np.ascontiguousarray(self.maps[f"tap-{k}.scale"][v, i]))
                t = torch.from_numpy(raw).float() * scale[..., None]
            taps.append(t.to(out_dtype))
        # fp32: the feature is computed from the last tap on the training batch, as uncached training does
        # (its bits depend on the batch's size); otherwise the stored one, not one from a rounded tap
        return FrozenImage(None if self.layout.dtype == "fp32" else feat.to(out_dtype), taps), self.labels[index]

    def batches(self, local: List[List[int]], epoch: int):
        views = self.views(epoch)
        for b in local:
            yield self.rows(b, views)


def _build(cfg, method, items, layout: Layout, key: dict, device, quiet: bool) -> float:
    """Writes the cache into OUT/.tmp-tapcache, then renames it to OUT/tapcache; returns the seconds."""
    from tqdm import tqdm

    from ..base.runtime import bar_off
    t0 = time.perf_counter()
    tmp, final = os.path.join(cfg.out, TMP), os.path.join(cfg.out, FOLDER)
    shutil.rmtree(tmp, ignore_errors=True)
    files.op("mkdir tap cache temp")
    os.mkdir(tmp)
    maps = {name: np.memmap(os.path.join(tmp, name), dtype=dt, mode="w+", shape=shape)
            for name, dt, shape in _files(layout)}
    order = list(range(len(items)))
    batches = [order[i:i + BUILD_BATCH] for i in range(0, len(order), BUILD_BATCH)]
    was = method.training
    method.eval()
    bar = tqdm(total=layout.views * len(batches), desc="tap cache", disable=bar_off(quiet), leave=False)
    for v in range(layout.views):  # view v: the augmentation uncached training draws at epoch v
        augment = D.Augment(method.backbone.preprocess, cfg.seed, v) if cfg.augment else None
        for b, (x, _) in zip(batches, loader(items, method.backbone, batches, cfg.workers, augment)):
            with torch.no_grad(), autocast(device, cfg.precision):
                out = method.frozen_image(x.to(device))
            sl = slice(b[0], b[-1] + 1)
            maps["feat.f32"][v, sl] = out.feat.detach().float().cpu().numpy()
            for k, t in enumerate(out.taps):
                parts = _encode(t, layout.dtype)
                maps[f"tap-{k}.{layout.dtype}"][v, sl] = parts[0]
                if layout.dtype == "int8":
                    maps[f"tap-{k}.scale"][v, sl] = parts[1]
            bar.update()
    bar.close()
    method.train(was)
    for name, m in maps.items():
        m.flush()
        files.write_synced(os.path.join(tmp, name), lambda p: None)  # fsync and the umask's mode
    seconds = time.perf_counter() - t0
    meta = json.dumps({"key": key, "digest": _digest(key), "layout": layout.__dict__, "build_seconds": seconds},
                      indent=1)
    files.write_synced(os.path.join(tmp, "meta.json"), lambda p: _write_text(p, meta))
    files.fsync_folder(tmp)
    if os.path.isdir(final):
        files.remove_tree(final)
    files.op("commit tap cache")  # the commit point: before it no cache, after it a whole one
    os.rename(tmp, final)
    files.fsync_folder(cfg.out)
    return seconds


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _meta(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _whole(folder: str, layout: Layout) -> bool:
    """Every file of the layout there, at its size (a file truncated since would not map)."""
    for name, dt, shape in _files(layout):
        try:
            if os.path.getsize(os.path.join(folder, name)) != np.dtype(dt).itemsize * int(np.prod(shape)):
                return False
        except OSError:
            return False
    return True


def setup(cfg, method, items, device, rank: int, say, quiet: bool):
    """(the TapCache, seconds spent building it: 0 when reused) or (None, 0) when not caching."""
    if rank == 0:
        clean(cfg.out, keep=active(method))
    if not active(method):
        return None, 0.0
    layout = plan(cfg, method, len(items), device, say if rank == 0 else (lambda s: None))
    if layout is None:
        if rank == 0:  # not used by this run: its disk space back
            clean(cfg.out, keep=False)
        return None, 0.0
    folder = os.path.join(cfg.out, FOLDER)
    key = _key(cfg, method, items, layout, device)
    meta = _meta(folder)
    seconds = 0.0
    if meta is not None and meta.get("digest") == _digest(key) and meta.get("layout") == layout.__dict__ \
            and _whole(folder, layout):
        say(f"tap cache: reusing {folder} (built in {meta.get('build_seconds', 0):.1f} s)")
    elif rank == 0:
        if meta is not None or os.path.isdir(folder):
            diff = sorted(k for k in key if (meta or {}).get("key", {}).get(k) != key[k])
            why = f"was made from other inputs ({', '.join(diff)} differ)" if diff else "is damaged or incomplete"
            say(f"tap cache: {folder} {why}; rebuilding it")
        seconds = _build(cfg, method, items, layout, key, device, quiet)
        say(f"tap cache: built {layout.views} view(s) x {len(items)} images ({_mib(layout.nbytes())}, "
            f"{layout.dtype}) in {seconds:.1f} s at {folder}")
    ddp.barrier()
    return TapCache(folder, layout, [y for _, y in items], cfg.seed), seconds
