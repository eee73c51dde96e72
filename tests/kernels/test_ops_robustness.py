"""Each op against the defects found by trying to break it (issue 13): every case here crashed, hung or
answered wrongly before its fix. The CPU backends are checked; Triton runs under the interpreter."""
import math

import pytest
import torch
from helpers import backend_or_skip

import ladder_kernels as lk
from ladder_kernels import reference

CPU_BACKENDS = ["cpu", "torch", "triton"]


def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def test_gated_fusion_tap_requiring_grad_on_several_threads():
    """C++ backend, tap requiring grad, M > one row block, 2+ threads: mm_out in a worker thread with grad
    mode on raised 'functions with out=... arguments don't support automatic differentiation'."""
    backend_or_skip("gated_fusion", "cpu", "cpu")
    old = _threads(2)
    try:
        side = torch.randn(300, 4, dtype=torch.float64)
        tap = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
        out = lk.gated_fusion(side, tap, weight, backend="cpu")
        ref = reference.gated_fusion(side, tap, weight)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (tap, weight), g)
        want = torch.autograd.grad(ref, (tap, weight), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apt_dropout_keeps_nan(backend):
    """A NaN row of hidden gives NaN out with dropout > 0 on every backend (the C++ kernel's kept/relu
    test dropped it and answered exactly exp(s) Y)."""
    backend_or_skip("apt_diffusion", backend, "cpu")
    hidden, attn_out = torch.randn(6, 16), torch.randn(6, 16)
    hidden[2] = float("nan")
    prompts, w1, w2 = torch.randn(5, 16), torch.randn(2, 16) * 0.1, torch.randn(16, 2) * 0.1
    out = lk.apt_diffusion(hidden, attn_out, prompts, w1, w2, 0.0, dropout=0.2, backend=backend)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apt_w_is_the_row_max_after_dropout(backend):
    """With a single prompt, out = exp(s) (Y + w a P) and a = w when kept: out - Y = w^2 P along the
    prompt, so w is recovered from the output alone and must be the dropped-and-scaled max."""
    backend_or_skip("apt_diffusion", backend, "cpu")
    torch.manual_seed(3)
    M, D, p = 64, 8, 1
    hidden = torch.rand(M, D, dtype=torch.float64) + 0.1
    prompts = torch.rand(p, D, dtype=torch.float64) + 0.1  # S > 0 everywhere
    zero = torch.zeros(M, D, dtype=torch.float64)
    w1, w2 = torch.zeros(1, D, dtype=torch.float64), torch.zeros(D, 1, dtype=torch.float64)
    if backend == "triton":
        hidden, prompts, zero, w1, w2 = (t.float() for t in (hidden, prompts, zero, w1, w2))
    dropout = 0.5
    out = lk.apt_diffusion(hidden, zero, prompts, w1, w2, 0.0, dropout=dropout, backend=backend)
    s = (hidden @ prompts.t())[:, 0]
    w_sq = (out[:, 0] / prompts[0, 0])  # = w * a = w^2 when kept, 0 when dropped
    kept = w_sq > 0
    assert 0 < kept.sum() < M  # some of each
    expected = (s / (1 - dropout))[kept] ** 2  # after dropout: the scaled activation, squared
    torch.testing.assert_close(w_sq[kept], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M,D,d", [(5, 0, 3), (5, 4, 0), (0, 4, 3), (0, 0, 0)])
def test_gated_fusion_zero_width(backend, M, D, d):
    backend_or_skip("gated_fusion", backend, "cpu")
    side = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    tap = torch.randn(M, D, dtype=torch.float64)
    weight = torch.randn(d, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True)
    alpha = torch.zeros(d, dtype=torch.float64, requires_grad=True) if d else 0.3
    out = lk.gated_fusion(side, tap, weight, bias, gate=alpha, backend=backend)
    ref = reference.gated_fusion(side, tap, weight, bias, alpha)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert weight.grad.shape == (d, D) and side.grad.shape == (M, d) and bias.grad.shape == (d,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apt_zero_width_and_no_rows(backend):
    backend_or_skip("apt_diffusion", backend, "cpu")
    for M, D in [(4, 0), (0, 6)]:
        h = torch.randn(M, D, requires_grad=True)
        y = torch.randn(M, D, requires_grad=True)
        p, w1, w2 = torch.randn(3, D, requires_grad=True), torch.randn(2, D), torch.randn(D, 2)
        out = lk.apt_diffusion(h, y, p, w1, w2, 0.5, backend=backend)
        torch.testing.assert_close(out, reference.apt_diffusion(h, y, p, w1, w2, 0.5))
        out.sum().backward()
        assert h.grad.shape == (M, D) and p.grad.shape == (3, D)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_assemble_rank_zero_backward(backend):
    backend_or_skip("assemble_prompts", backend, "cpu")
    pre, suf, base = torch.randn(3, 1, 8), torch.randn(3, 5, 8), torch.randn(2, 8)
    a = torch.randn(2, 0, requires_grad=True)
    b = torch.randn(0, 8, requires_grad=True)
    out = lk.assemble_prompts(pre, suf, base, a, b, backend=backend)
    torch.testing.assert_close(out, reference.assemble_prompts(pre, suf, base, a, b))
    out.sum().backward()
    assert a.grad.shape == (2, 0) and b.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_assemble_reads_strided_prefix_and_suffix(backend):
    """The pipeline passes slices of a cached (C, L, D) layout; they are read in place, with any class
    and token strides, and give the same E as contiguous copies."""
    backend_or_skip("assemble_prompts", backend, "cpu")
    layout = torch.randn(7, 13, 16)
    prefix, suffix = layout[:, :1], layout[:, 5:]
    base, a, b = torch.randn(4, 16), torch.randn(4, 2), torch.randn(2, 16)
    assert not prefix.is_contiguous() and not suffix.is_contiguous()
    got = lk.assemble_prompts(prefix, suffix, base, a, b, backend=backend)
    want = lk.assemble_prompts(prefix.contiguous(), suffix.contiguous(), base, a, b, backend=backend)
    assert torch.equal(got, want)
    every_other = torch.randn(7, 26, 16)[:, ::2]  # a token stride of 2 rows
    got = lk.assemble_prompts(every_other[:, :2], every_other[:, 6:], base, a, b, backend=backend)
    want = reference.assemble_prompts(every_other[:, :2], every_other[:, 6:], base, a, b)
    torch.testing.assert_close(got, want)


def _double_backward(op_call):
    out = op_call()
    grads = torch.autograd.grad(out.sum(), op_call.inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):  # e.g. a gradient penalty's backward
        sum((g ** 2).sum() for g in grads).backward()


class _Call:
    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs

    def __call__(self):
        return self.fn(*self.inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_says_unsupported(backend):
    for op in ("gated_fusion", "apt_diffusion"):
        backend_or_skip(op, backend, "cpu")
    side, tap = torch.randn(5, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)
    _double_backward(_Call(lambda s, x, w: lk.gated_fusion(s, x, w, backend=backend), (side, tap, weight)))
    h, y, p = (torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True),
               torch.randn(3, 4, requires_grad=True))
    w1, w2 = torch.randn(2, 4), torch.randn(4, 2)
    _double_backward(_Call(lambda h, y, p: lk.apt_diffusion(h, y, p, w1, w2, 0.0, backend=backend), (h, y, p)))
    if backend != "triton":
        pre, suf = torch.randn(2, 1, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
        a, b = torch.randn(2, 1, requires_grad=True), torch.randn(1, 4, requires_grad=True)
        base = torch.randn(2, 4)
        _double_backward(_Call(lambda pre, suf, a, b: lk.assemble_prompts(pre, suf, base, a, b, backend=backend),
                               (pre, suf, a, b)))


def test_bad_numbers_and_types_name_the_argument():
    pre, suf, base = torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 4)
    for scale in (float("inf"), -float("inf"), float("nan")):
        with pytest.raises(ValueError, match="'scale'"):
            lk.assemble_prompts(pre, suf, base, scale=scale)
    side, tap, weight = torch.randn(3, 2), torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(TypeError, match="'bias'.*list"):
        lk.gated_fusion(side, tap, weight, [0.0, 0.0])
    for t in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="'temperature'"):
            lk.nn.GatedLadderFusion(4, 2, temperature=t)
    with pytest.raises(TypeError, match="'temperature'.*str"):
        lk.nn.GatedLadderFusion(4, 2, temperature="0.1")


def test_apt_module_under_autocast():
    """bf16 activations with fp32 parameters (CPU autocast): the module casts to the activations' dtype
    (was: "argument 'prompts' must have the dtype of 'hidden'"), and gradients reach the fp32 parameters."""
    m = lk.nn.APTPrompt(16, num_prompts=5, rank=2)
    hidden, attn_out = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    out = m(hidden, attn_out)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.prompts.grad is not None and m.prompts.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ops_inside_cpu_autocast(dtype):
    """Inside torch.autocast the C++ kernels compute as outside it: they pick their own precision (was: the
    gated fusion's GEMM came back in fp16 under CPU fp16 autocast, "expected scalar type Float"). (The
    plain-PyTorch backend's matmuls follow autocast like any torch code.)"""
    backend_or_skip("gated_fusion", "cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    side, tap, weight, bias = (torch.randn(*s, generator=g) for s in ((9, 4), (9, 6), (4, 6), (4,)))
    h, y, p = (torch.randn(*s, generator=g) for s in ((7, 8), (7, 8), (3, 8)))
    # APT's Kt = P + (P W1^T) W2^T is torch code before the kernel, which autocast would round: W1 = 0
    # makes Kt = P exactly, so what is compared is the kernel alone
    w1, w2 = torch.zeros(2, 8), torch.randn(8, 2, generator=g)
    calls = [lambda: lk.gated_fusion(side, tap, weight, bias, gate=0.3, backend="cpu"),
             lambda: lk.apt_diffusion(h, y, p, w1, w2, 0.1, backend="cpu")]
    for call in calls:
        want = call()
        with torch.autocast("cpu", dtype=dtype):
            got = call()
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_training_after_a_first_call_under_inference_mode():
    """The ops share one zero seed per device for calls without dropout, made on first use: when that use
    is under torch.inference_mode (an evaluation before training) it must still be a normal tensor, which
    a later training call can save for backward (was: "Inference tensors cannot be saved for backward")."""
    import ladder_kernels._dropout as drop

    drop._NO_SEEDS.clear()  # the first use is the one below, whatever ran before in this process
    g = torch.Generator().manual_seed(0)
    h, y, p, w1, w2 = (torch.randn(*s, generator=g) for s in ((5, 8), (5, 8), (3, 8), (2, 8), (8, 2)))
    with torch.inference_mode():
        lk.apt_diffusion(h, y, p, w1, w2, 0.0)
        lk.assemble_prompts(torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 4))
    p.requires_grad_()
    lk.apt_diffusion(h, y, p, w1, w2, 0.0).sum().backward()
    a, b = torch.zeros(2, 1, requires_grad=True), torch.randn(1, 4, requires_grad=True)
    lk.assemble_prompts(torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 4), a, b).sum().backward()
    assert p.grad is not None and b.grad is not None and not drop.no_seed().is_inference()
