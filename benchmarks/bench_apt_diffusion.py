"""lk.apt_diffusion vs the eager reference and torch.compile of it, and the attention sub-layer it serves.

Op cases: ViT-B/16 (B=32, N=197, D=768, p in {10, 50, 200}) and METER-like long sequences (B=8, N=1024,
D=768, p=200); forward alone and forward + backward of classic APT (H, Y, P, W1, W2, s all get gradients:
the backward flows on into the frozen backbone). Sub-layer cases (fwd+bwd): multi-head SDPA over the N
tokens followed by APT ("lk": lk.apt_diffusion, "eager"/"compiled": the reference), against deep prompt
tuning, SDPA over the N tokens' queries with the p prompts concatenated to keys and values ("concat").
On CPU, test_cpu_peak_memory measures the allocator's peak during one fwd+bwd step (torch.profiler). Run:
    python -m pytest benchmarks/bench_apt_diffusion.py --benchmark-json=bench-results/apt_diffusion.json
"""
import pytest
import torch
import torch.nn.functional as F

import ladder_kernels as lk
from ladder_kernels import reference

from .conftest import SMOKE, annotate_floor, compiled, compiled_case, dtype_name, peak_memory, run, saved_bytes, step_of

# name: (B, N, D, p)
CASES = {f"vit_b16 B=32 N=197 D=768 p={p}": (32, 197, 768, p) for p in (10, 50, 200)}
CASES["meter B=8 N=1024 D=768 p=200"] = (8, 1024, 768, 200)
ATTN_CASES = {f"attn+apt vit_b16 B=32 N=197 D=768 p={p}": (32, 197, 768, p) for p in (10, 50, 200)}
ATTN_CASES["attn+apt meter B=8 N=1024 D=768 p=200"] = (8, 1024, 768, 200)
if SMOKE:
    CASES = {"smoke B=2 N=9 D=24 p=5": (2, 9, 24, 5)}
    ATTN_CASES = {"attn+apt smoke B=2 N=9 D=24 p=5": (2, 9, 24, 5)}
RANK, HEADS = 4, 12
_compiled_ref = compiled(reference.apt_diffusion)


def dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


def make(B, N, D, p, dtype, device):
    g = dict(dtype=dtype, device=device)
    hidden = torch.randn(B, N, D, **g).requires_grad_()
    attn_out = torch.randn(B, N, D, **g).requires_grad_()
    prompts = (0.02 * torch.randn(p, D, **g)).requires_grad_()
    w1 = torch.randn(RANK, D, **g).requires_grad_()
    w2 = (0.01 * torch.randn(D, RANK, **g)).requires_grad_()
    s = torch.zeros((), **g).requires_grad_()
    return hidden, attn_out, prompts, w1, w2, s


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["lk", "eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apt_diffusion(benchmark, device, case, mode, variant, dtype):
    if dtype not in dtypes(device):
        pytest.skip("bf16 is timed on CUDA only: CPUs without bf16 units make it a different workload")
    if variant == "compiled":
        compiled_case(case, CASES)
    B, N, D, p = CASES[case]
    inputs = make(B, N, D, p, dtype, device)
    grad_out = torch.randn(B, N, D, dtype=dtype, device=device)
    fn = {"lk": lambda: lk.apt_diffusion(*inputs),
          "eager": lambda: reference.apt_diffusion(*inputs),
          "compiled": lambda: _compiled_ref(*inputs)}[variant]
    step = step_of(fn, mode, inputs, grad_out)
    elem = inputs[0].element_size()
    info = {"shape (B, N, D, p)": (B, N, D, p), "dtype": dtype_name(dtype),
            "saved MB": round(saved_bytes(fn) / 2 ** 20, 2)}
    if variant == "lk":
        info["backend"] = lk.backend_for("apt_diffusion", inputs[0].device)
    peak = peak_memory(step, device)
    if peak >= 0:
        info["peak MB"] = round(peak / 2 ** 20, 2)
    # Fewest bytes the forward must move: read H and Y, write out (P, Kt are small).
    run(benchmark, f"{case} {dtype_name(dtype)} {mode}", variant, step, device,
        bytes_moved=3 * B * N * D * elem if mode == "fwd" else 0, **info)
    if variant == "lk":  # measured / the traffic model's floor (CUDA only)
        annotate_floor(benchmark, f"{case} {dtype_name(dtype)} {mode}", variant, device, "apt_diffusion",
                       (B * N, D, p), dtype, mode)


def make_attention(D, dtype, device):
    g = dict(dtype=dtype, device=device)
    return [(torch.randn(D, D, **g) / D ** 0.5) for _ in range(4)]  # Wq, Wk, Wv, Wo (frozen)


def attention(h, weights, prompts=None):
    """Multi-head SDPA over h's tokens; with `prompts`, they join the keys and values (deep prompts)."""
    wq, wk, wv, wo = weights
    B, N, D = h.shape
    kv = h if prompts is None else torch.cat((h, prompts.expand(B, -1, -1)), dim=1)

    def heads(x):
        return x.reshape(B, x.shape[1], HEADS, D // HEADS).transpose(1, 2)
    o = F.scaled_dot_product_attention(heads(h @ wq.t()), heads(kv @ wk.t()), heads(kv @ wv.t()))
    return o.transpose(1, 2).reshape(B, N, D) @ wo.t()


_compiled_attn_apt = compiled(lambda h, ws, p, a, b, s: reference.apt_diffusion(h, attention(h, ws), p, a, b, s))


@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("variant", ["lk", "eager", "compiled", "concat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_sublayer(benchmark, device, case, variant, dtype):
    if dtype not in dtypes(device):
        pytest.skip("bf16 is timed on CUDA only")
    if variant == "compiled":
        compiled_case(case, ATTN_CASES)
    B, N, D, p = ATTN_CASES[case]
    if D % HEADS:
        D = HEADS * max(1, D // HEADS)
    hidden, _, prompts, w1, w2, s = make(B, N, D, p, dtype, device)
    ws = make_attention(D, dtype, device)
    grad_out = torch.randn(B, N, D, dtype=dtype, device=device)
    if variant == "concat":
        fn, wanted = (lambda: attention(hidden, ws, prompts)), (hidden, prompts)
    else:
        apt = {"lk": lk.apt_diffusion, "eager": reference.apt_diffusion}.get(variant)

        def fn():
            if apt is None:
                return _compiled_attn_apt(hidden, ws, prompts, w1, w2, s)
            return apt(hidden, attention(hidden, ws), prompts, w1, w2, s)
        wanted = (hidden, prompts, w1, w2, s)

    def step():
        return torch.autograd.grad(fn(), wanted, grad_out)

    info = {"shape (B, N, D, p)": (B, N, D, p), "dtype": dtype_name(dtype),
            "saved MB": round(saved_bytes(fn) / 2 ** 20, 2)}
    peak = peak_memory(step, device)
    if peak >= 0:
        info["peak MB"] = round(peak / 2 ** 20, 2)
    run(benchmark, f"{case} {dtype_name(dtype)} fwd+bwd", variant, step, device, **info)


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes the CPU allocator holds during `fn()`, above what it held before: allocations and
    frees recorded by torch.profiler (profile_memory=True), added up in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_peak_memory(case, device):
    """Peak CPU memory of one fwd+bwd step (classic APT, all inputs trainable), lk vs the eager reference."""
    if device != "cpu":
        pytest.skip("the CUDA peaks are measured by the timed cases")
    B, N, D, p = CASES[case]
    inputs = make(B, N, D, p, torch.float32, device)
    g = torch.randn(B, N, D)
    peaks = {}
    for variant, fn in (("lk", lk.apt_diffusion), ("eager", reference.apt_diffusion)):
        def step(fn=fn):
            return torch.autograd.grad(fn(*inputs), inputs, g)
        step()  # warm-up
        peaks[variant] = cpu_peak_bytes(step)
    print(f"\n{case}: CPU peak above inputs, fwd+bwd: lk {peaks['lk'] / 2 ** 20:.1f} MB, "
          f"eager {peaks['eager'] / 2 ** 20:.1f} MB")
    assert peaks["lk"] > 0 and peaks["eager"] > 0
