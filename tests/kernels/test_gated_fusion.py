"""lk.gated_fusion against its float64 reference (docs/design.md, section 1), per backend and device."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ladder_kernels as lk
from ladder_kernels import reference
import ladder_kernels.ops.gated_fusion as gf_module

from helpers import backend_or_skip
from tolerance import assert_within_rule, max_err

OP = "gated_fusion"
BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(M, D, d, dtype, device, *, gate="channel", bias=True, lead=None, train_weight=True):
    lead = lead or (M,)
    side = torch.randn(*lead, d, dtype=dtype, device=device, requires_grad=True)
    tap = torch.randn(*lead, D, dtype=dtype, device=device)
    weight = (torch.randn(d, D, device=device) / D ** 0.5).to(dtype).requires_grad_(train_weight)
    b = torch.randn(d, dtype=dtype, device=device, requires_grad=True) if bias else None
    shape = (d,) if gate == "channel" else ()
    alpha = (0.1 * torch.randn(shape, device=device)).requires_grad_()
    return side, tap, weight, b, alpha


def grads_of(out, inputs, g):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, g)


def check_against_reference(backend, side, tap, weight, bias, alpha, temperature=0.1, **kw):
    dtype = side.dtype
    out = lk.gated_fusion(side, tap, weight, bias, gate=alpha, temperature=temperature, backend=backend, **kw)
    g = torch.randn_like(out)
    inputs = (side, weight, bias, alpha)
    got = grads_of(out, inputs, g)
    plain_out = reference.gated_fusion(side, tap, weight, bias, alpha, temperature)
    plain = grads_of(plain_out, inputs, g)
    f64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    truth_out = reference.gated_fusion(f64[0], tap.double(), f64[1], f64[2], f64[3], temperature)
    truth = grads_of(truth_out, f64, g.double())
    assert out.dtype == dtype and out.shape == side.shape
    assert_within_rule("out", out, plain_out, truth_out, dtype)
    names = [n for n, t in zip(("d_side", "d_weight", "d_bias", "d_gate"), inputs) if t is not None and t.requires_grad]
    for name, a, p, t in zip(names, got, plain, truth):
        assert a.dtype == p.dtype, name
        assert_within_rule(name, a, p, t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_matches_reference(backend, dtype, gate, device):
    backend_or_skip(OP, backend, device)
    check_against_reference(backend, *make(70, 96, 24, dtype, device, gate=gate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,D,d", [(1, 1, 1), (1, 7, 3), (13, 29, 5), (67, 97, 131), (130, 64, 16), (0, 8, 4)])
def test_odd_shapes(backend, M, D, d, device):
    backend_or_skip(OP, backend, device)
    check_against_reference(backend, *make(M, D, d, torch.float32, device))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 40), D=st.integers(1, 70), d=st.integers(1, 40), bias=st.booleans(),
       gate=st.sampled_from(["channel", "scalar"]), temperature=st.floats(0.05, 3.0))
def test_random_shapes(backend, M, D, d, bias, gate, temperature):
    backend_or_skip(OP, backend, "cpu")
    check_against_reference(backend, *make(M, D, d, torch.float32, "cpu", gate=gate, bias=bias), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_no_bias_frozen_weight(backend, device):
    backend_or_skip(OP, backend, device)
    side, tap, weight, _, alpha = make(0, 40, 12, torch.float32, device, lead=(3, 5), bias=False, train_weight=False)
    check_against_reference(backend, side, tap, weight, None, alpha, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    backend_or_skip(OP, backend, device)
    M, D, d = 33, 48, 20
    side = torch.randn(d, M, device=device).t().requires_grad_()          # transposed
    tap = torch.randn(M, 2 * D, device=device)[:, ::2]                       # strided columns
    weight = torch.randn(D, d, device=device).div(D ** 0.5).t().requires_grad_()  # column-major
    bias = torch.randn(2 * d, device=device)[::2].requires_grad_()           # strided
    alpha = torch.randn(d, device=device).requires_grad_()
    assert not (side.is_contiguous() or tap.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    check_against_reference(backend, side, tap, weight, bias, alpha)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, device):
    backend_or_skip(OP, backend, device)
    side, tap, weight, bias, alpha = make(9, 11, 6, torch.float64, device)
    tap.requires_grad_()  # also checks the dX path

    def fn(s, x, w, b, a):
        return lk.gated_fusion(s, x, w, b, gate=a, temperature=0.3, backend=backend)

    assert torch.autograd.gradcheck(fn, (side, tap, weight, bias, alpha.double().detach().requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_float8_tap_weight_grad_error(backend, dtype, device):
    """The float8 tap adds this much error to dW (relative Frobenius norm; docs/design.md quotes it)."""
    backend_or_skip(OP, backend, device)
    side, tap, weight, bias, alpha = make(200, 64, 16, dtype, device)
    g = torch.randn(200, 16, dtype=dtype, device=device)
    exact = torch.autograd.grad(lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend), weight, g)[0]
    for fp8, bound in ((torch.float8_e4m3fn, 0.04), (torch.float8_e5m2, 0.08)):
        out = lk.gated_fusion(side, tap, weight, bias, alpha, tap_dtype=fp8, backend=backend)
        dw = torch.autograd.grad(out, weight, g)[0]
        rel = ((dw.double() - exact.double()).norm() / exact.double().norm()).item()
        assert 0 < rel < bound, f"{fp8}: relative dW error {rel:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_contract(backend, device):
    backend_or_skip(OP, backend, device)
    M, D, d = 256, 96, 16
    side, tap, weight, bias, alpha = make(M, D, d, torch.bfloat16, device, train_weight=False)
    small = 64 * d * 8  # the gate's (d,) vectors and such

    # Frozen W, trainable gate: only s - Z (M, d) in the side dtype.
    with lk.SavedTensors(keep=True) as saved:
        lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend)
    assert all(t.numel() < M * D for t in saved.tensors)
    assert saved.bytes <= M * d * 2 + small

    # Frozen W and gate: nothing of size M.
    with lk.SavedTensors(keep=True) as saved:
        lk.gated_fusion(side, tap, weight, bias, alpha.detach(), backend=backend)
    assert saved.bytes <= small

    # Trainable W: the tap once, as is ...
    weight.requires_grad_()
    with lk.SavedTensors(keep=True) as saved:
        lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend)
    big = [t for t in saved.tensors if t.numel() >= M * D]
    assert len(big) == 1 and big[0].dtype == tap.dtype
    assert saved.bytes <= M * D * 2 + M * d * 2 + small

    # ... or as float8 with one fp32 scale per row.
    with lk.SavedTensors(keep=True) as saved:
        lk.gated_fusion(side, tap, weight, bias, alpha, tap_dtype=torch.float8_e4m3fn, backend=backend)
    big = [t for t in saved.tensors if t.numel() >= M * D]
    assert len(big) == 1 and big[0].dtype == torch.float8_e4m3fn
    assert saved.bytes <= M * D * 1 + M * 4 + M * d * 2 + small


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tap_gradient_gemm_unless_asked(backend, device, monkeypatch):
    backend_or_skip(OP, backend, device)
    calls = []
    real = gf_module._backward_body

    def spy(*args):
        result = real(*args)
        calls.append((args[9], result[1].numel()))  # need_tap, size of d_tap
        return result

    monkeypatch.setattr(gf_module, "_backward_body", spy)
    side, tap, weight, bias, alpha = make(20, 30, 8, torch.float32, device)
    lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend).sum().backward()
    assert calls == [(False, 0)]
    tap.requires_grad_()
    lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend).sum().backward()
    assert calls[1] == (True, 20 * 30) and tap.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend, device):
    backend_or_skip(OP, backend, device)
    side, tap, weight, bias, alpha = make(700, 80, 24, torch.float32, device)
    g = torch.randn(700, 24, device=device)

    def run():
        out = lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend)
        return torch.autograd.grad(out, (side, weight, bias, alpha), g)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_saves_nothing_and_matches(backend, device):
    backend_or_skip(OP, backend, device)
    side, tap, weight, bias, alpha = make(10, 12, 4, torch.float32, device)
    with torch.no_grad():
        out = lk.gated_fusion(side, tap, weight, bias, alpha, backend=backend)
    assert not out.requires_grad
    truth = reference.gated_fusion(side.double(), tap.double(), weight.double(), bias.double(), alpha.double())
    assert max_err(out, truth) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    backend_or_skip(OP, backend, device)
    side, tap, weight, bias, alpha = make(17, 24, 8, torch.float32, device)
    mu = torch.sigmoid(alpha.detach() / 0.1)
    op = torch.ops.ladder_kernels.gated_fusion_core.default
    for save_diff, keep_tap in ((True, True), (False, False), (True, False)):
        torch.library.opcheck(op, (side, tap, weight, bias, alpha, 0.1, save_diff, keep_tap, "", backend))
    # opcheck's schema check does arithmetic on every intermediate, and CPU float8 has none; the other
    # checks (fake tensor, autograd registration, AOT dispatch) still run on the float8 path.
    torch.library.opcheck(op, (side, tap, weight, bias, alpha, 0.1, True, True, "e4m3", backend),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    grad = torch.randn(17, 8, device=device)
    diff = torch.randn(17, 8, device=device)
    # The backward op has no derivative of its own (no double backward), so its inputs do not require grad.
    backward = torch.ops.ladder_kernels.gated_fusion_core_backward.default
    for scalar_gate in (False, True):
        torch.library.opcheck(backward, (grad, diff, tap, None, weight.detach(), mu.detach(), 0.1, scalar_gate,
                                         True, True, True, True, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    backend_or_skip(OP, backend, device)
    torch._dynamo.reset()
    side, tap, weight, bias, alpha = make(19, 40, 8, torch.float32, device)

    def fn(s, x, w, b, a):
        return torch.tanh(lk.gated_fusion(s, x, w, b, gate=a, temperature=0.2, backend=backend))

    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(side, tap, weight, bias, alpha)
    eager = fn(side, tap, weight, bias, alpha)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (side, weight, bias, alpha))
    want = torch.autograd.grad(eager.sum(), (side, weight, bias, alpha))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_automatic_dispatch_and_env_override(monkeypatch):
    side, tap, weight, bias, alpha = make(4, 6, 3, torch.float32, "cpu")
    from ladder_kernels import _dispatch

    expected = "cpu" if lk.backends()["cpu"].available else "torch"
    assert _dispatch.resolve(OP, side.device, None) == expected
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "torch")
    assert _dispatch.resolve(OP, side.device, None) == "torch"
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        lk.gated_fusion(side, tap, weight, bias, alpha)


class TestBadInput:
    def args(self, **over):
        side, tap, weight, bias, alpha = make(5, 8, 4, torch.float32, "cpu")
        kw = dict(side=side, tap=tap, weight=weight, bias=bias, gate=alpha, temperature=0.1)
        kw.update(over)
        return kw

    @pytest.mark.parametrize("over,exc,words", [
        (dict(tap=torch.randn(5, 9)), ValueError, ["'tap'", "(5, 8)", "(5, 9)"]),
        (dict(side=torch.randn(6, 4)), ValueError, ["'side'", "(6, 4)"]),
        (dict(side=torch.randn(5, 3)), ValueError, ["'side'", "(5, 4)", "(5, 3)"]),
        (dict(weight=torch.randn(4, 8, 1)), ValueError, ["'weight'", "2 dimensions"]),
        (dict(bias=torch.randn(5)), ValueError, ["'bias'", "(4)", "(5,)"]),
        (dict(gate=torch.randn(3)), ValueError, ["'gate'", "(4)", "(3,)"]),
        (dict(gate="0.5"), TypeError, ["'gate'", "str"]),
        (dict(temperature=0.0), ValueError, ["'temperature'", "> 0", "0.0"]),
        (dict(temperature=-1.0), ValueError, ["'temperature'"]),
        (dict(temperature=float("nan")), ValueError, ["'temperature'"]),
        (dict(side=torch.randn(5, 4, dtype=torch.float64)), TypeError, ["'tap'", "float64", "float32"]),
        (dict(tap=torch.randint(0, 3, (5, 8))), TypeError, ["'tap'", "int64"]),
        (dict(weight=torch.randn(4, 8, device="meta")), ValueError, ["'weight'", "meta", "cpu"]),
        (dict(tap=[[1.0]]), TypeError, ["'tap'", "list"]),
    ])
    def test_rejected_with_named_argument(self, over, exc, words):
        with pytest.raises(exc) as info:
            lk.gated_fusion(**self.args(**over))
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"

    def test_bad_tap_dtype_and_backend(self):
        with pytest.raises(TypeError, match="'tap_dtype'"):
            lk.gated_fusion(**self.args(), tap_dtype=torch.int8)
        with pytest.raises(ValueError, match="'backend'.*'cuda_please'"):
            lk.gated_fusion(**self.args(), backend="cuda_please")
        with pytest.raises(ValueError, match="has no cuda implementation"):
            lk.gated_fusion(**self.args(), backend="cuda")


def test_module_defaults_and_detached_tap():
    m = lk.nn.GatedLadderFusion(tap_dim=12, side_dim=5)
    assert m.gate.shape == () and m.temperature == 0.1
    torch.testing.assert_close(m.mu, torch.tensor(0.5))
    side = torch.randn(2, 3, 5, requires_grad=True)
    tap = torch.randn(2, 3, 12, requires_grad=True)
    out = m(side, tap)
    out.sum().backward()
    assert tap.grad is None  # backward never enters the backbone
    assert all(p.grad is not None for p in m.parameters())
    ref = reference.gated_fusion(side, tap, m.weight, m.bias, m.gate, 0.1)
    torch.testing.assert_close(out, ref)
    per_channel = lk.nn.GatedLadderFusion(12, 5, per_channel_gate=True, bias=False)
    assert per_channel.gate.shape == (5,) and per_channel.bias is None
    with pytest.raises(ValueError, match="'temperature'"):
        lk.nn.GatedLadderFusion(12, 5, temperature=0)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_triton_kernels_compile_for_gpu(arch, dtype):
    """Every launch of the three primitives compiles for sm_80 / sm_90 with the specialisation a real
    launch binds, at an odd shape (the generic binary), with float8 taps for dW; the benchmark shapes are
    gated in test_triton_static.py."""
    tc = pytest.importorskip("triton_compile")
    module = "ladder_kernels.backends.triton.gated_fusion"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    M, D, d = 301, 29, 5
    side, tap, weight, vec = tc.meta((M, d), dtype), tc.meta((M, D), dtype), tc.meta((d, D), dtype), tc.meta((d,), acc)
    fwd = tc.compile_launches(module, "forward", [side, tap, weight, tc.meta((d,), dtype), vec, True], arch)
    if arch == 90 and dtype in (torch.bfloat16, torch.float16):
        assert fwd[0]["mma"] == "wgmma"  # the Hopper tensor-core path, not a fallback
    tc.compile_launches(module, "grad_rows", [side, side, vec, True], arch)
    fp8 = [torch.float8_e5m2] + ([torch.float8_e4m3fn] if arch >= 89 else [])  # Triton has e4m3 from sm_89 on
    for tap_dtype in [None] + (fp8 if dtype != torch.float64 else []):
        x = tc.meta((M, D), tap_dtype) if tap_dtype else tap
        scale = tc.meta((M,), torch.float32) if tap_dtype else None
        rows = tc.compile_launches(module, "grad_weight", [side, x, scale, vec, dtype], arch)
        assert [r["kernel"] for r in rows] == ["_grad_weight_kernel", "_fold_kernel"]
