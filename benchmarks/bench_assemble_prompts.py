"""lk.assemble_prompts vs the eager reference (expand + cat + add) and torch.compile of it.

CoOp text layout (C classes x 77 tokens, D=512, start token + n prompts + class name/padding) and the
vision layout (batch 32 x [CLS, n prompts, 196 patches], D=768), with a shared rank-1 RLP prompt and a
positional embedding; prefix and suffix fresh and contiguous (lk) or slices of a cached layout as the
pipeline passes them (lk-slices: read in place through their strides). Forward alone and forward +
backward of the RLP training case (only A and B train).
The copy baseline clones a tensor of E's size: the forward moves about as many bytes. Run:
    python -m pytest benchmarks/bench_assemble_prompts.py --benchmark-json=bench-results/assemble_prompts.json
"""
import pytest
import torch

import ladder_kernels as lk
from ladder_kernels import reference

from .conftest import SMOKE, compiled, compiled_case, dtype_name, peak_memory, run, saved_bytes, step_of

# name: (C, prefix tokens, n, suffix tokens, D)
CASES = {f"text C={c} L=77 D=512 n={n}": (c, 1, n, 76 - n, 512) for c in (100, 1000) for n in (4, 16)}
CASES.update({f"vision B=32 1+{n}+196 D=768": (32, 1, n, 196, 768) for n in (4, 16)})
if SMOKE:
    CASES = {"smoke C=5 L=12 D=24 n=4": (5, 1, 4, 7, 24)}
# lk-slices: the pipeline's own call, prefix and suffix as slices of a cached (C, L, D) token layout
VARIANTS = ["lk", "lk-slices", "eager", "compiled", "copy"]
RANK, SCALE = 1, 1.0
_compiled_ref = compiled(reference.assemble_prompts)


def make(C, a, n, s, D, dtype, device):
    prefix = torch.randn(C, a, D, dtype=dtype, device=device)
    suffix = torch.randn(C, s, D, dtype=dtype, device=device)
    base = torch.randn(n, D, dtype=dtype, device=device)
    lowrank_a = torch.randn(n, RANK, dtype=dtype, device=device, requires_grad=True)
    lowrank_b = torch.randn(RANK, D, dtype=dtype, device=device, requires_grad=True)
    pos = torch.randn(a + n + s, D, dtype=dtype, device=device)
    return prefix, suffix, base, lowrank_a, lowrank_b, pos



@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_assemble_prompts(benchmark, device, case, mode, variant, dtype):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 is timed on CUDA only: CPUs without bf16 units make it a different workload")
    if variant == "copy" and mode != "fwd":
        pytest.skip("the copy baseline is a forward-only bandwidth reference")
    if variant == "compiled":
        compiled_case(case, CASES)
    C, a, n, s, D = CASES[case]
    L = a + n + s
    prefix, suffix, base, la, lb, pos = make(C, a, n, s, D, dtype, device)
    grad_out = torch.randn(C, L, D, dtype=dtype, device=device)
    layout = torch.cat((prefix, base.expand(C, n, D), suffix), dim=1)  # what the pipeline caches per class set
    fn = {"lk": lambda: lk.assemble_prompts(prefix, suffix, base, la, lb, SCALE, pos),
          "lk-slices": lambda: lk.assemble_prompts(layout[:, :a], layout[:, a + n:], base, la, lb, SCALE, pos),
          "eager": lambda: reference.assemble_prompts(prefix, suffix, base, la, lb, SCALE, pos),
          "compiled": lambda: _compiled_ref(prefix, suffix, base, la, lb, SCALE, pos),
          "copy": lambda: grad_out.clone()}[variant]
    elem = prefix.element_size()
    # Fewest bytes the forward must move: read prefix, suffix, pos and the prompt's factors; write E.
    bytes_fwd = (C * (a + s) * D + L * D + n * D + RANK * (n + D) + C * L * D) * elem
    name = f"{case} {dtype_name(dtype)} {mode}"
    if variant == "copy":
        run(benchmark, name, "copy", fn, device, bytes_moved=2 * C * L * D * elem)
        return
    step = step_of(fn, mode, (la, lb), grad_out)
    info = {"shape (C, a, n, s, D)": (C, a, n, s, D), "dtype": dtype_name(dtype), "rank": RANK}
    if variant.startswith("lk"):
        info["backend"] = lk.backend_for("assemble_prompts", prefix.device)
        info["saved MB"] = round(saved_bytes(fn) / 2 ** 20, 3)
    peak = peak_memory(step, device)
    if peak >= 0:
        info["peak MB"] = round(peak / 2 ** 20, 2)
    run(benchmark, name, variant, step, device, bytes_moved=bytes_fwd if mode == "fwd" else 0, **info)
