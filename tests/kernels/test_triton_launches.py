"""What a Triton-backed op call launches: every Triton kernel and every torch kernel around them (issue 23:
at the ladder's sizes each small torch kernel costs as much as the fused ones). Counted under the
interpreter on CPU tensors: the launches are the ones a GPU call makes, at the host's calls.

A torch "kernel" is any aten op that computes (views and empty allocations excluded); the interpreter's
own copies of the arguments in and out of a launch are not the op's and are not counted."""
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ladder_kernels as lk
from ladder_kernels import reference

from helpers import backend_or_skip
from tolerance import assert_within_rule

_FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape", "detach",
         "alias", "as_strided", "t", "expand", "select", "slice", "unsqueeze", "squeeze", "transpose", "permute",
         "lift_fresh"}


class _Launches(TorchDispatchMode):
    """Records Triton launches (by kernel name) and the torch ops made outside them."""

    def __init__(self):
        super().__init__()
        self.triton, self.torch, self._inside = [], [], False

    def __enter__(self):
        import triton.runtime.interpreter as interp

        self._interp, self._run = interp, interp.InterpretedFunction.run
        mode = self

        def run(fn, *args, **kwargs):
            mode.triton.append(fn.fn.__name__)
            mode._inside = True
            try:
                return mode._run(fn, *args, **kwargs)
            finally:
                mode._inside = False

        interp.InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        self._interp.InterpretedFunction.run = self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and name not in _FREE:
            self.torch.append(name)
        return func(*args, **(kwargs or {}))


def _interpreter_only():
    if torch.cuda.is_available():
        pytest.skip("counts launches through Triton's interpreter (CPU tensors)")
    backend_or_skip("gated_fusion", "triton", "cpu")


def _ladder_call(dtype, gate_shape, temperature=0.1):
    """The ladder's call: trainable side, W, b and gate; the tap detached."""
    M, D, d = 96, 64, 24
    side = torch.randn(M, d, dtype=dtype, requires_grad=True)
    tap = torch.randn(M, D, dtype=dtype)
    weight = (torch.randn(d, D) / D ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(d, dtype=dtype, requires_grad=True)
    gate = (0.1 * torch.randn(gate_shape)).requires_grad_()
    return side, tap, weight, bias, gate, torch.randn(M, d, dtype=dtype), temperature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_shape", [(), (24,)], ids=["scalar_gate", "channel_gate"])
def test_gated_fusion_launches(dtype, gate_shape):
    """Forward: one Triton launch (mu = sigmoid(alpha / T) formed inside it), no torch kernel (before
    issue 23: mul and sigmoid around it). Backward: rows, finish, dW GEMM and fold, no torch kernel
    (before: 1 - mu, 3 sums and 4-5 multiplies and casts). And the results still match float64."""
    _interpreter_only()
    side, tap, weight, bias, gate, g, t = _ladder_call(dtype, gate_shape)
    lk.gated_fusion(side, tap, weight, bias, gate, t, backend="triton")  # first call: imports, caches
    with _Launches() as fwd:
        out = lk.gated_fusion(side, tap, weight, bias, gate, t, backend="triton")
    with _Launches() as bwd:
        got = torch.autograd.grad(out, (side, weight, bias, gate), g)
    assert fwd.triton == ["_fwd_kernel"] and fwd.torch == []
    assert bwd.triton == ["_grad_rows_kernel", "_finish_kernel", "_grad_weight_kernel", "_fold_kernel"]
    assert bwd.torch == []
    f64 = [x.detach().double().requires_grad_() for x in (side, weight, bias, gate)]
    truth_out = reference.gated_fusion(f64[0], tap.double(), f64[1], f64[2], f64[3], t)
    truth = torch.autograd.grad(truth_out, f64, g.double())
    plain_out = reference.gated_fusion(side, tap, weight, bias, gate, t)
    plain = torch.autograd.grad(plain_out, (side, weight, bias, gate), g)
    assert_within_rule("out", out, plain_out, truth_out, dtype)
    for name, a, p, w in zip(("d_side", "d_weight", "d_bias", "d_gate"), got, plain, truth):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        assert_within_rule(name, a, p, w, dtype)


def test_gated_fusion_frozen_weight_launches():
    """A frozen W (the ladder's text side with frozen projections, and every eval): the backward is the rows
    and finish kernels only; a side-only gradient skips the finish kernel and the column sums."""
    _interpreter_only()
    side, tap, weight, bias, gate, g, t = _ladder_call(torch.float32, ())
    weight.requires_grad_(False)
    out = lk.gated_fusion(side, tap, weight, bias, gate, t, backend="triton")
    with _Launches() as bwd:
        torch.autograd.grad(out, (side, bias, gate), g)
    assert bwd.triton == ["_grad_rows_kernel", "_finish_kernel"] and bwd.torch == []
    out = lk.gated_fusion(side, tap, weight, None, gate.detach(), t, backend="triton")
    with _Launches() as bwd:
        (ds,) = torch.autograd.grad(out, (side,), g)
    assert bwd.triton == ["_grad_rows_kernel"] and bwd.torch == []
    mu = torch.sigmoid(gate.detach().double() / t)
    torch.testing.assert_close(ds.double(), mu * g.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 5.0])
def test_gated_fusion_extreme_temperatures(temperature):
    """T outside fp32's normal range (1e-39: a subnormal) forms mu and divides by T in torch instead of in
    the kernel (a Triton float argument is fp32); in range, the kernel divides (never multiplies by 1 / T,
    which overflows at T = 1e-39). Both match the reference, gradients included."""
    _interpreter_only()
    side, tap, weight, bias, gate, g, _ = _ladder_call(torch.float32, (24,))
    out = lk.gated_fusion(side, tap, weight, bias, gate, temperature, backend="triton")
    got = torch.autograd.grad(out, (side, weight, bias, gate), g)
    want_out = reference.gated_fusion(side, tap, weight, bias, gate, temperature)
    want = torch.autograd.grad(want_out, (side, weight, bias, gate), g)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_gated_fusion_imports_no_other_backend():
    """The Triton module has its own backward (it used to borrow backends/torch's compose_backward)."""
    from ladder_kernels.backends.triton import gated_fusion

    src = inspect.getsource(gated_fusion)
    assert "from ..torch" not in src and "backends.torch" not in src and "backends.cpu" not in src


def _apt_call(M=40, D=32, p=20, r=4):
    """APT as the pipeline calls it in training: H and Y from a trainable network, P, W1, W2 and s trained."""
    make = lambda *shape: torch.randn(*shape, requires_grad=True)  # noqa: E731
    return make(M, D), make(M, D), make(p, D), make(r, D), make(D, r), torch.zeros(1, requires_grad=True)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_traffic_model_counts_the_launches(dropout):
    """benchmarks/traffic.py's launches per call (Triton and not) are the ones an op call makes: APT's forward
    (Kt's low-rank chain: 2 GEMMs and an add, the seed's draw with dropout, one Triton kernel) and backward
    (rows kernel, ds's sum, dKt and dP GEMMs, the chain's 4 GEMMs and 2 adds); the gated fusion's 1 + 4
    Triton launches and nothing else."""
    _interpreter_only()
    from benchmarks import traffic

    inputs = _apt_call()
    lk.apt_diffusion(*inputs, dropout, backend="triton")
    with _Launches() as fwd:
        out = lk.apt_diffusion(*inputs, dropout, backend="triton")
    g = torch.randn_like(out)
    with _Launches() as bwd:
        torch.autograd.grad(out, inputs, g)
    model_fwd = traffic.apt(40, 32, 20, "float32", "fwd", rank=4, dropout=dropout)
    model_all = traffic.apt(40, 32, 20, "float32", "fwd+bwd", rank=4, dropout=dropout)
    assert [x.kind == "triton" for x in model_fwd].count(True) == len(fwd.triton) == 1
    assert len(model_fwd) == len(fwd.triton) + len(fwd.torch)
    assert len(model_all) == len(fwd.triton + fwd.torch + bwd.triton + bwd.torch)
    assert sum(x.kind == "triton" for x in model_all) == len(fwd.triton + bwd.triton) == 2
    # the GEMMs the model names as cuBLAS are the matmuls counted
    gemms = [op for op in fwd.torch + bwd.torch if op in ("mm", "addmm", "bmm", "matmul")]
    assert sum(x.kind == "cublas" for x in model_all) == len(gemms)

    side, tap, weight, bias, gate, g, t = _ladder_call(torch.float32, ())
    lk.gated_fusion(side, tap, weight, bias, gate, t, backend="triton")
    with _Launches() as gfwd:
        out = lk.gated_fusion(side, tap, weight, bias, gate, t, backend="triton")
    with _Launches() as gbwd:
        torch.autograd.grad(out, (side, weight, bias, gate), g)
    model = traffic.gated(96, 64, 24, "float32", "fwd+bwd")
    assert len(model) == len(gfwd.triton + gbwd.triton) and gfwd.torch + gbwd.torch == []
    assert all(x.kind == "triton" for x in model)


def test_gated_e4m3_tap_before_sm89_dequantised_in_torch(monkeypatch):
    """Before sm_89 (no e4m3 in Triton) dW of an e4m3 tap is dequantised in torch, 8192 rows at a time,
    then folded by the Triton fold kernel with the (1 - mu) scale and cast: dW against float64 (that path
    runs only on an sm_80 GPU; forced here on CPU tensors), and the Triton GEMM's path within bf16's error."""
    _interpreter_only()
    from ladder_kernels.backends.triton import gated_fusion

    g = torch.Generator().manual_seed(3)
    M, D, d = 9000, 24, 8  # more than one 8192-row chunk
    grad = torch.randn(M, d, generator=g).to(torch.bfloat16)
    tap = (torch.randn(M, D, generator=g) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(M, generator=g) + 0.5
    mu = torch.rand(d, generator=g)
    want = gated_fusion.grad_weight(grad, tap, scale, mu, torch.float32, True)
    monkeypatch.setattr(gated_fusion, "_e4m3_in_torch", lambda tap, grad: True)
    with _Launches() as run:
        got = gated_fusion.grad_weight(grad, tap, scale, mu, torch.float32, True)
    assert run.triton == ["_fold_kernel"] and run.torch.count("addmm_") == 2  # two 8192-row chunks
    truth = (1 - mu.double())[:, None] * (grad.double().t() @ (tap.double() * scale.double()[:, None]))
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-3)  # fp32 dequantisation: ~exact
    # the Triton GEMM rounds the dequantised tap to G's dtype (bf16) in registers: within bf16's error
    torch.testing.assert_close(want.double(), truth, rtol=0, atol=1e-2 * float(truth.abs().max()))
