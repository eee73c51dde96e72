"""Shared pieces of the pytest-benchmark suites.

Every case times the ladder_kernels op, the eager plain-PyTorch reference and torch.compile of that
reference on the same inputs in the same run, then prints the ratios at the end of the session (and
stores them in each benchmark's extra_info, so `--benchmark-json` keeps them with the device name,
library versions and shapes). LADDER_BENCH_SMOKE=1 shrinks every shape so CI can run the suite in
seconds, to keep it from rotting; its timings mean nothing.
"""
import os
import platform
from collections import defaultdict

# Inductor compiles in a pool of worker processes by default; on a 2-core machine their background
# activity lands in the timings of whatever runs next. One in-process compile thread keeps runs quiet.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Compile warm-up is reported as a first run sees it: Inductor's on-disk caches would make the second
# compile of the same graph (e.g. in the memory-measuring subprocess's twin) look almost free.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import ladder_kernels as lk  # noqa: E402

SMOKE = os.environ.get("LADDER_BENCH_SMOKE") == "1"
_RESULTS = defaultdict(dict)  # case -> variant -> (median seconds, extra_info)


def _devices() -> list:
    """The devices the suites run on: LADDER_BENCH_DEVICES (a comma list, e.g. "cuda": gpu_check.sh spends
    a lent GPU's minutes on the GPU cases only), else the CPU and the GPU when there is one. Naming a device
    this machine lacks is an error, not an empty run."""
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = [d.strip() for d in os.environ.get("LADDER_BENCH_DEVICES", "").split(",") if d.strip()]
    missing = [d for d in wanted if d not in have]
    if missing:
        raise pytest.UsageError(f"LADDER_BENCH_DEVICES names {', '.join(missing)}, which this machine lacks "
                                f"(it has: {', '.join(have)})")
    return wanted or have


DEVICES = _devices()
# LADDER_BENCH_COMPILE: "all" (default) times torch.compile of the reference in every case; "first" only in
# each suite's first case (every dtype and mode), the others skip saying so; "none" in no case. A cold
# Inductor compile costs 10-30 s: gpu_check.sh's minutes cannot pay for one per case.
COMPILE = os.environ.get("LADDER_BENCH_COMPILE", "all")
if COMPILE not in ("all", "first", "none"):
    raise pytest.UsageError(f"LADDER_BENCH_COMPILE must be all, first or none, got {COMPILE!r}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device: str) -> int:
    """Bytes allocated at the peak of one call, above what was resident before it (CUDA only; the
    suites report saved-activation bytes on both)."""
    if device != "cuda":
        return -1
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward during `fn()` (each storage counted once)."""
    with lk.SavedTensors() as saved:
        fn()
    return saved.bytes


def run(benchmark, case: str, variant: str, fn, device: str, *, bytes_moved: int = 0, rounds: int = 10,
        **info):
    """Time `fn` (synchronised on CUDA), record it under `case`/`variant`, and return its result."""

    def timed():
        out = fn()
        sync(device)
        return out

    benchmark.group = case  # before the run: pytest-benchmark files the result under it
    fn()  # warm-up: compilation and caches stay out of the numbers
    sync(device)
    result = benchmark.pedantic(timed, rounds=1 if SMOKE else rounds, iterations=1,
                                warmup_rounds=0 if SMOKE else min(2, rounds))
    benchmark.extra_info.update(info, device=device_name(device), torch=torch.__version__, variant=variant)
    if device == "cuda" and not benchmark.disabled:
        # Three clocks: pytest-benchmark's wall time of the whole call (host path, launches, sync); CUDA
        # events around it (the stream's span: still host-bound when launches come slower than kernels
        # end); and the kernels' own durations from the profiler, which no host cost can inflate.
        benchmark.extra_info["gpu ms (events)"] = round(_event_ms(fn, 1 if SMOKE else rounds), 4)
        kernel = _kernel_ms(fn, 1 if SMOKE else min(rounds, 5))
        if kernel is not None:
            benchmark.extra_info["kernel ms"], benchmark.extra_info["kernels per call"] = kernel
    if not benchmark.disabled:
        median = benchmark.stats.stats.median
        if bytes_moved:
            benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        _RESULTS[case][variant] = (median, dict(benchmark.extra_info))
    return result


def _event_ms(fn, rounds: int) -> float:
    """Median GPU time of fn() in ms, between CUDA events recorded on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _kernel_ms(fn, rounds: int):
    """(ms, launches) per call of fn(): the summed durations of the GPU kernels (and memcpy/memset) it ran,
    from torch.profiler's CUDA activity; None where the profiler sees no GPU activity (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(rounds):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as exc:  # a profiler that cannot start must not cost the run its timings
        print(f"kernel time unavailable: {type(exc).__name__}: {exc}")
        return None
    if not events:
        return None
    total_us = sum(e.time_range.elapsed_us() for e in events)
    return round(total_us / 1e3 / rounds, 4), round(len(events) / rounds, 1)


def annotate_floor(benchmark, case: str, variant: str, device: str, op: str, shape, dtype, mode: str) -> None:
    """On CUDA, add the traffic model's floor (benchmarks/traffic.py) and measured / floor to a recorded
    ladder_kernels case. Only the ops it models, at the shapes it was given."""
    if device != "cuda" or benchmark.disabled or SMOKE:
        return
    from . import traffic

    info = benchmark.extra_info
    wall = traffic.over_floor(op, shape, dtype_name(dtype), mode, benchmark.stats.stats.median, device_name(device))
    figures = {"floor us": wall["floor us"], "wall x floor": wall["x floor"]}
    if info.get("kernel ms"):  # the kernels' own time, apart from the host path's
        figures["x floor"] = traffic.over_floor(op, shape, dtype_name(dtype), mode, info["kernel ms"] / 1e3,
                                                device_name(device))["x floor"]
    annotate(benchmark, case, variant, **figures)


def compiled_case(case: str, cases) -> None:
    """Skip a compile variant that LADDER_BENCH_COMPILE leaves out (see above)."""
    if COMPILE == "none" or (COMPILE == "first" and case != next(iter(cases))):
        pytest.skip(f"torch.compile timed only in {'no case' if COMPILE == 'none' else 'the first case'} "
                    f"(LADDER_BENCH_COMPILE={COMPILE})")


def annotate(benchmark, case: str, variant: str, **info) -> None:
    """Add figures known only after the timing (e.g. images/s) to a recorded case."""
    benchmark.extra_info.update(info)
    if variant in _RESULTS.get(case, {}):
        _RESULTS[case][variant][1].update(info)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The report needs the device and the library versions beside the figures."""
    import ladder_kernels as lk

    machine_info["torch"] = torch.__version__
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cpu_model"] = _cpu_model()
    machine_info["ladder_kernels_backends"] = sorted(k for k, v in lk.backends().items() if v.available)
    machine_info["smoke"] = SMOKE


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def step_of(fn, mode: str, wrt, grad_out):
    """The timed step: fn() without autograd for "fwd", fn() and its gradients wrt `wrt` otherwise."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
    else:
        def step():
            return torch.autograd.grad(fn(), wrt, grad_out)
    return step


class compiled:
    """torch.compile of a reference, compiled afresh (after torch._dynamo.reset()) whenever the inputs'
    shapes, dtypes or devices change: each case times a static graph of its own (the grad mode, which
    differs between a case's memory probe and its timed step, is one more guard, not a new compile). One
    compiled function shared across cases would recompile with dynamic shapes, and past dynamo's recompile
    limit (8) silently run eager while the report still says "compiled"."""

    def __init__(self, fn):
        self.fn, self.key, self.compiled = fn, None, None

    def __call__(self, *args):
        key = _describe(args)
        if key != self.key:
            torch._dynamo.reset()
            self.key, self.compiled = key, torch.compile(self.fn, dynamic=False)
        return self.compiled(*args)


def _describe(a):
    """What a compiled graph specialises on: tensors by shape, dtype, device and requires_grad."""
    if isinstance(a, torch.Tensor):
        return tuple(a.shape), a.dtype, str(a.device), a.requires_grad
    if isinstance(a, (list, tuple)):
        return tuple(_describe(x) for x in a)
    return a


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("ladder_kernels: ratios against the eager reference and torch.compile (same run)")
    for case, variants in sorted(_RESULTS.items()):
        if case.startswith("train step"):
            for v, (t, info) in variants.items():
                tr.write_line(f"{case:<48} {v:<13} {t * 1e3:9.1f} ms  {info.get('images/s')} img/s  "
                              f"peak {info.get('peak MB')} MB above {info.get('resident MB')} MB resident  "
                              f"{info.get('trainable')} trainable  first step {info.get('first step s')} s")
            continue
        ours = {v: t for v, t in variants.items() if v.startswith("lk")}
        eager_k = variants.get("eager", (None, {}))[1].get("kernel ms")
        eager = variants.get("eager", (None,))[0]
        comp = variants.get("compiled", (None,))[0]
        concat = variants.get("concat", (None,))[0]  # deep prompt tuning: SDPA over N + p tokens
        copy_gbs = variants.get("copy", (None, {}))[1].get("GB/s")
        for v, (t, info) in ours.items():
            parts = [f"{case:<48} {v:<12} {t * 1e3:9.3f} ms"]
            if eager:
                parts.append(f"x{eager / t:5.2f} vs eager")
            if "eager/lk alternated" in info:  # the host-cost cases' robust figure (bench_host_cost.py)
                parts.append(f"(x{info['eager/lk alternated']:.2f} alternated)")
            if comp:
                parts.append(f"x{comp / t:5.2f} vs compile")
            if concat:
                parts.append(f"x{concat / t:5.2f} vs concatenated-prompt SDPA")
            if "GB/s" in info:
                parts.append(f"{info['GB/s']} GB/s")
                if copy_gbs:
                    parts.append(f"({info['GB/s'] / copy_gbs:.0%} of a copy's {copy_gbs} GB/s)")
            if "kernel ms" in info:
                parts.append(f"kernels {info['kernel ms']:.3f} ms ({info.get('kernels per call')} launches)")
                if eager_k:
                    parts.append(f"kernels x{eager_k / info['kernel ms']:5.2f} vs eager's")
            for key in ("x floor", "wall x floor", "saved MB", "peak MB"):
                if key in info:
                    parts.append(f"{key} {info[key]}")
            tr.write_line("  ".join(parts))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
