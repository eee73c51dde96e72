"""The pieces of the host path and the benchmark harness that a GPU run depends on, checked without one:
device properties asked once per device, fp64 kept off Triton on a GPU, the backend variable named in its
error, and the benchmarks' device filter, compile capping and fresh compile per case."""
import os
import subprocess
import sys

import pytest
import torch

import ladder_kernels as lk
from ladder_kernels import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/ -> the repository


def test_device_properties_asked_once_per_device(monkeypatch):
    pytest.importorskip("triton")
    from ladder_kernels.backends.triton import _launch

    calls = []

    class Props:
        multi_processor_count, major, minor = 132, 9, 0

    def props(index):
        calls.append(index)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _launch._gpu.cache_clear()
    try:
        for _ in range(3):
            assert _launch.num_programs_target(torch.device("cuda", 0), waves=1) == 132
            assert _launch.device_arch(torch.device("cuda")) == 90
        assert _launch.num_programs_target(torch.device("cuda", 1)) == 264
        assert calls == [0, 1]
    finally:
        _launch._gpu.cache_clear()


def test_float64_on_a_gpu_goes_to_plain_pytorch(monkeypatch):
    """The automatic choice on CUDA skips Triton for fp64 (its tiles spill there); a forced Triton and
    every other dtype are unchanged. Availability is faked: this machine has no GPU."""
    monkeypatch.setattr(_dispatch, "why_not", lambda op, backend, device_type: None)
    monkeypatch.setattr(_dispatch, "_CHOSEN", {})
    cuda = torch.device("cuda")
    assert _dispatch.resolve("gated_fusion", cuda, None, torch.float64) == "torch"
    assert _dispatch.resolve("apt_diffusion", cuda, None, torch.float64) == "torch"
    assert _dispatch.resolve("assemble_prompts", cuda, None, torch.float64) == "cuda"  # CUDA C++, not Triton
    for dtype in (torch.float32, torch.bfloat16, None):
        assert _dispatch.resolve("gated_fusion", cuda, None, dtype) == "triton"
    assert _dispatch.resolve("gated_fusion", cuda, "triton", torch.float64) == "triton"
    assert _dispatch.resolve("gated_fusion", torch.device("cpu"), None, torch.float64) == "cpu"


def test_bad_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "nonsense")
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="LADDER_KERNELS_BACKEND must name a backend"):
        lk.gated_fusion(torch.randn(3, 2), x, torch.randn(2, 4))
    monkeypatch.delenv("LADDER_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        lk.gated_fusion(torch.randn(3, 2), x, torch.randn(2, 4), backend="nonsense")


def test_compiled_reference_is_compiled_afresh_per_case(monkeypatch):
    """One torch.compile per distinct input signature, each after a dynamo reset: past dynamo's recompile
    limit a shared compiled function would silently run eager."""
    from benchmarks import conftest as bc

    resets, compiles = [], []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))

    def fake_compile(fn, dynamic=None):
        compiles.append(dynamic)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    f = bc.compiled(lambda a, ws, t: a.sum() + ws[0].sum() * t)
    a, b, w = torch.ones(2, 3), torch.ones(4, 3), [torch.ones(2)]
    assert float(f(a, w, 0.5)) == 7.0
    f(a, w, 0.5)
    with torch.no_grad():
        f(a, w, 0.5)  # the grad mode is a dynamo guard, not a new case
    f(b, w, 0.5)
    f(b, [torch.ones(3)], 0.5)
    assert len(resets) == len(compiles) == 3 and set(compiles) == {False}


def _pytest(args, **env):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("LADDER_")}, **env})


def test_benchmark_device_filter_and_compile_cap():
    listed = _pytest(["benchmarks/bench_gated_fusion.py", "--collect-only"], LADDER_BENCH_DEVICES="cpu",
                     LADDER_BENCH_SMOKE="1")
    assert listed.returncode == 0 and "cuda" not in listed.stdout and "cpu" in listed.stdout, listed.stdout
    if not torch.cuda.is_available():
        refused = _pytest(["benchmarks/bench_gated_fusion.py", "--collect-only"], LADDER_BENCH_DEVICES="cuda")
        assert refused.returncode != 0 and "LADDER_BENCH_DEVICES names cuda" in refused.stdout + refused.stderr
    capped = _pytest(["benchmarks/bench_gated_fusion.py", "-k", "compiled and fwd and not bwd", "-rs"],
                     LADDER_BENCH_DEVICES="cpu", LADDER_BENCH_SMOKE="1", LADDER_BENCH_COMPILE="none")
    assert capped.returncode == 0 and "LADDER_BENCH_COMPILE=none" in capped.stdout, capped.stdout[-2000:]


def test_gpu_quick_selection_runs_every_kernel_in_every_dtype():
    """LADDER_TESTS_GPU_QUICK=1 keeps CUDA cases only, of every op's reference check in every dtype, and
    drops the CPU-only and the odd-shape cases of the plain-PyTorch backend."""
    res = _pytest(["tests/kernels/test_gated_fusion.py", "tests/kernels/test_apt_diffusion.py",
                   "tests/kernels/test_assemble_prompts.py",
                   "--collect-only"], LADDER_TESTS_GPU_QUICK="1")
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert res.returncode == 0 and ids, res.stdout[-2000:]
    assert all("[cuda-" in i or i.endswith("[cuda]") for i in ids)
    for op in ("gated_fusion", "apt_diffusion", "assemble_prompts"):
        refs = [i for i in ids if f"test_{op}.py::test_matches_reference" in i]
        dtypes = {"dtype0", "dtype1", "dtype2"}
        assert {d for d in dtypes if any(d in i for i in refs)} == dtypes
    assert not any("test_odd_shapes" in i and i.endswith("-torch]") for i in ids)
    assert not any("[cpu-" in i for i in ids)
