"""One optimizer step of every prompt-tuning method, side by side: peak memory above what was resident,
step time, images/s, trainable parameters and the first step's time (compile warm-up for the
torch.compile variants). Model and step: benchmarks/train_step.py.

CUDA: CLIP with ViT-B/16 dimensions, batch 32, bf16 autocast, memory from torch.cuda.max_memory_allocated.
CPU: a smaller CLIP (width 256, 6 layers per encoder, 197 image tokens), batch 32, fp32, memory as the
peak RSS of a fresh process per method; the +int8 variants run the frozen CLIP in int8 (CPU only).
Run, then turn the JSON into tables and charts:
    python -m pytest benchmarks/bench_train_step.py --benchmark-json=bench-results/train.json
    python -m benchmarks.report bench-results/train.json --out bench-results/report
"""
import gc

import pytest
import torch

from . import train_step as T
from .conftest import DEVICES, SMOKE, annotate, run

CLASSES = [8] if SMOKE else [100, 1000]
BATCH = 4 if SMOKE else 32
SIZE = {"cpu": "small", "cuda": "vit_b16"}
# Smoke runs compile one variant only: enough to keep the compiled path from rotting, in a minute.
VARIANTS = [v for v in T.VARIANTS if not (SMOKE and v == "coop+compile")]


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device, variant, classes):
    if device == "cuda" and T.OPTIONS.get(variant, {}).get("frozen") == "int8":
        pytest.skip("frozen='int8' is CPU only: no int8 GPU path is wired (ladder_clip/quantize.py)")
    size = "tiny" if SMOKE else SIZE[device]
    case = f"train step {device} {size} C={classes} batch={BATCH}"
    if device == "cpu":  # the resident set only grows within a process: one fresh process per method
        mem = T.measure_in_subprocess(variant, size, classes, device, BATCH)
    setup = T.build(variant, size, classes, device, BATCH)
    try:
        first = T.first_step_seconds(setup)
        if device == "cuda":
            mem = T.measure_memory(setup, warmup=1)
        info = {"suite": "train_step", "size": size, "shapes": T.shapes(size, classes, BATCH, setup.text_tokens),
                "classes": classes, "batch": BATCH, "precision": setup.precision, "trainable": setup.trainable,
                "peak MB": round(mem["peak_above_resident_bytes"] / 2 ** 20, 1),
                "resident MB": round(mem["resident_bytes"] / 2 ** 20, 1),
                "peak total MB": round(mem["peak_total_bytes"] / 2 ** 20, 1), "memory kind": mem["memory_kind"],
                "saved MB": round(mem["saved_bytes"] / 2 ** 20, 1), "first step s": round(first, 2),
                "weights MB": round(mem["weights_bytes"] / 2 ** 20, 1)}
        if mem.get("runtime_bytes"):  # CPU: the process before any model (Python, torch, transformers)
            info["runtime MB"] = round(mem["runtime_bytes"] / 2 ** 20, 1)
        run(benchmark, case, variant, setup.step, device, rounds=3 if device == "cpu" else 20, **info)
        if not benchmark.disabled:
            median = benchmark.stats.stats.median
            more = {"images/s": round(BATCH / median, 1)}
            if T.VARIANTS[variant][1]:
                more["compile warm-up s"] = round(max(0.0, first - median), 2)
            annotate(benchmark, case, variant, **more)
        assert mem["peak_above_resident_bytes"] > 0 and setup.trainable > 0
    finally:
        del setup
        gc.collect()
        if T.VARIANTS[variant][1]:
            torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
