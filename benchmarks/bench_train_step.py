"""One optimizer step of every prompt-tuning method, side by side: peak memory above what was resident,
step time, images/s, trainable parameters and the first step's time (compile warm-up for the
torch.compile variants). Model and step: benchmarks/train_step.py.

CUDA: CLIP with ViT-B/16 dimensions, batch 32, bf16 autocast, memory from torch.cuda.max_memory_allocated.
CPU: a smaller CLIP (width 256, 6 layers per encoder, 197 image tokens), batch 32, fp32, memory measured
in a fresh process per method (resident: the model's, above the warmed runtime; peak: VmHWM above it; see
train_step.py); the +int8 variants run the frozen CLIP in int8 (CPU only). LK_BENCH_THREADS=N sets the
intra-op threads of every variant. Step-time ratios on a shared machine: `python -m benchmarks.train_step
compare` alternates the variants' steps in one process. LADDER_BENCH_VITB16=1 adds the ViT-B/16 cases on the
CPU (C = 100, batch 8), with the side network's step on given taps (the `-side` variants).
Run, then turn the JSON into tables and charts:
    python -m pytest benchmarks/bench_train_step.py --benchmark-json=bench-results/train.json
    python -m benchmarks.report bench-results/train.json --out bench-results/report
"""
import gc
import os

import pytest
import torch

from . import train_step as T
from .conftest import DEVICES, SMOKE, annotate, run

CLASSES = [8] if SMOKE else [100, 1000]
BATCH = 4 if SMOKE else 32
SIZE = {"cpu": "small", "cuda": "vit_b16"}
# Smoke runs compile one variant only: enough to keep the compiled path from rotting, in a minute.
# The -side variants (the side network alone, on given taps) are the ViT-B/16 case's (below).
VARIANTS = [v for v in T.VARIANTS if not (SMOKE and v == "coop+compile") and v not in T.SIDE]


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device, variant, classes):
    _case(benchmark, device, variant, classes, "tiny" if SMOKE else SIZE[device], BATCH)


# ViT-B/16 on the CPU: minutes on 2 cores (its table: docs/benchmarks/2026-12-04-cpu-2core/vit_b16.md), so
# only when asked. On CUDA test_train_step already runs at this size; here only the side-network steps
# (the taps given, as a tap cache gives them) are added there. gpu_check.sh sets it on a GPU.
VITB16 = os.environ.get("LADDER_BENCH_VITB16") == "1"
VITB16_VARIANTS = ["coop", "lst", "ladder", "ladder+int8", "ladder+apt+int8", "ladder-side", "ladder+int8-side"]


@pytest.mark.skipif(not VITB16, reason="ViT-B/16 training steps take minutes on a small CPU: "
                    "LADDER_BENCH_VITB16=1 runs them (gpu_check.sh does on a GPU)")
@pytest.mark.parametrize("variant", VITB16_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_vit_b16(benchmark, device, variant):
    if device == "cuda" and variant not in T.SIDE:
        pytest.skip("on CUDA test_train_step runs this variant at ViT-B/16 size already")
    # the target case on the CPU (C = 100, batch 8); a GPU's batch as in test_train_step
    _case(benchmark, device, variant, 8 if SMOKE else 100, "tiny" if SMOKE else "vit_b16",
          BATCH if device == "cuda" or SMOKE else 8)


def _case(benchmark, device, variant, classes, size, batch):
    T.set_threads()  # LK_BENCH_THREADS, for every variant alike
    if device == "cuda" and T.parse_variant(variant)[1].get("frozen") == "int8":
        pytest.skip("frozen='int8' is CPU only: no int8 GPU path is wired (ladder_clip/model/int8.py)")
    case = f"train step {device} {size} C={classes} batch={batch}"
    if device == "cpu":  # the resident set only grows within a process: one fresh process per method
        mem = T.measure_in_subprocess(variant, size, classes, device, batch)
    setup = T.build(variant, size, classes, device, batch)
    compiled = T.VARIANTS[T.parse_variant(variant)[0]][1]
    try:
        first = T.first_step_seconds(setup)
        if device == "cuda":
            mem = T.measure_memory(setup, warmup=1)
        mb = lambda key: round(mem[key] / 2 ** 20, 1)  # noqa: E731
        # resident: the model's (weights, side network, caches, optimizer state); total = resident + peak
        # above it (train_step.py's docstring); the process figures include the runtime, labelled apart
        info = {"suite": "train_step", "size": size, "shapes": T.shapes(size, classes, batch, setup.text_tokens),
                "classes": classes, "batch": batch, "precision": setup.precision, "trainable": setup.trainable,
                "peak MB": mb("peak_above_resident_bytes"), "resident MB": mb("resident_bytes"),
                "total MB": mb("total_bytes"), "counted MB": mb("counted_bytes"),
                "process resident MB": mb("process_resident_bytes"), "process peak MB": mb("process_peak_bytes"),
                "memory kind": mem["memory_kind"], "saved MB": mb("saved_bytes"), "first step s": round(first, 2),
                "weights MB": mb("weights_bytes"), "threads": torch.get_num_threads()}
        if mem.get("runtime_bytes"):  # CPU: the warmed runtime (Python, torch, transformers, thread pools)
            info["runtime MB"] = mb("runtime_bytes")
        run(benchmark, case, variant, setup.step, device, rounds=5 if device == "cpu" else 10, **info)
        if not benchmark.disabled:
            median = benchmark.stats.stats.median
            more = {"images/s": round(batch / median, 1)}
            if compiled:
                more["compile warm-up s"] = round(max(0.0, first - median), 2)
            annotate(benchmark, case, variant, **more)
        assert mem["peak_above_resident_bytes"] > 0 and setup.trainable > 0
    finally:
        del setup
        gc.collect()
        if compiled:
            torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
