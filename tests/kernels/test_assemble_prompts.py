"""lk.assemble_prompts and lk.nn.LowRankPrompt against the float64 reference (docs/design.md, section 2)."""
import pytest
import torch

import ladder_kernels as lk
import ladder_kernels.ops.assemble_prompts as ap_module
from ladder_kernels import reference
from ladder_kernels._dropout import fmix32
from ladder_kernels.ops.assemble_prompts import dropout_keep

from helpers import backend_or_skip, one_thread
from tolerance import assert_within_rule, max_err

OP = "assemble_prompts"
BACKENDS = ["cuda", "cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("prefix", "suffix", "base", "lowrank_a", "lowrank_b", "pos")


def make(C, a, n, s, D, r, dtype=torch.float32, device="cpu", *, base_per_class=False, a_per_class=False,
         pos=True, lowrank=True, grads=("base", "lowrank_a", "lowrank_b", "pos")):
    """prefix, suffix, base, A, B, pos; `grads` names the ones that require grad."""
    def t(name, *shape, std=1.0):
        x = (torch.randn(*shape, device=device) * std).to(dtype)
        return x.requires_grad_(name in grads)

    lead = (C,) if base_per_class else ()
    tensors = [t("prefix", C, a, D), t("suffix", C, s, D), t("base", *lead, n, D)]
    if lowrank:
        tensors += [t("lowrank_a", *((C,) if a_per_class else ()), n, r), t("lowrank_b", r, D, std=0.5)]
    else:
        tensors += [None, None]
    tensors.append(t("pos", a + n + s, D, std=0.1) if pos else None)
    return tensors


def wanted(tensors):
    return [x for x in tensors if x is not None and x.requires_grad]


def seed(value):
    """The op's seed argument: a one-element int64 CPU tensor."""
    return torch.tensor([value], dtype=torch.int64)


def seed_drawn_after(torch_seed, device="cpu"):
    """The dropout seed assemble_prompts draws right after torch.manual_seed(torch_seed): from the generator
    of the inputs' device (a device tensor: graph-safe)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2 ** 31 - 1, (1,), device=device).item())


def run_checked(backend, tensors, scale=0.7, dropout=0.0):
    """Forward and backward of `backend` within the tolerance rule of the float64 truth."""
    prefix, suffix, base, a, b, pos = tensors
    dtype = prefix.dtype
    torch.manual_seed(1234)
    out = lk.assemble_prompts(prefix, suffix, base, a, b, scale, pos, dropout, backend=backend)
    keep = None
    if dropout > 0:
        q_shape = (*a.shape[:-1], b.shape[1])
        keep = dropout_keep(q_shape, seed_drawn_after(1234, a.device), dropout, a.device).double() / (1 - dropout)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, wanted(tensors), g) if wanted(tensors) else ()
    plain_out = reference.assemble_prompts(prefix, suffix, base, a, b, scale, pos,
                                           None if keep is None else keep.to(dtype))
    plain = torch.autograd.grad(plain_out, wanted(tensors), g) if wanted(tensors) else ()
    f64 = [x.detach().double().requires_grad_(x.requires_grad) if x is not None else None for x in tensors]
    truth_out = reference.assemble_prompts(*f64[:5], scale, f64[5], keep)
    truth = torch.autograd.grad(truth_out, wanted(f64), g.double()) if wanted(f64) else ()
    assert out.dtype == dtype and out.shape == truth_out.shape and out.device == prefix.device
    assert_within_rule("out", out, plain_out, truth_out, dtype)
    names = [nm for nm, x in zip(NAMES, tensors) if x is not None and x.requires_grad]
    for name, x, p, t in zip(names, got, plain, truth):
        assert x.dtype == dtype and x.shape == t.shape, name
        assert_within_rule(f"d_{name}", x, p, t, dtype)
    return out


LAYOUTS = {  # C, a, n, s, D, r, options
    "text_shared": (6, 1, 4, 9, 40, 1, {}),
    "text_class_specific": (5, 1, 3, 6, 24, 2, dict(base_per_class=True, a_per_class=True)),
    "vision": (3, 1, 5, 16, 48, 2, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(backend, dtype, layout, device):
    backend_or_skip(OP, backend, device)
    C, a, n, s, D, r, opts = LAYOUTS[layout]
    run_checked(backend, make(C, a, n, s, D, r, dtype, device, **opts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,a,n,s,D,r,opts", [
    (1, 1, 1, 1, 1, 1, {}),                                   # everything 1
    (1, 2, 1, 3, 7, 3, {}),                                   # C=1, n=1, D not a multiple of 8
    (7, 2, 5, 0, 13, 1, dict(a_per_class=True)),              # no suffix, 2-token prefix, class-specific A
    (3, 0, 2, 4, 17, 2, dict(base_per_class=True)),           # no prefix, class-specific base, shared A
    (11, 1, 4, 66, 16, 4, dict(pos=False)),                   # text-like, no pos
    (2, 1, 3, 5, 8, 1, dict(lowrank=False)),                  # no low-rank term
    (0, 1, 2, 3, 8, 1, {}),                                   # no classes
])
def test_odd_shapes(backend, C, a, n, s, D, r, opts, device):
    backend_or_skip(OP, backend, device)
    grads = NAMES if C > 0 else ("base", "lowrank_a", "lowrank_b", "pos")
    run_checked(backend, make(C, a, n, s, D, r, torch.float32, device, grads=grads, **opts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_misaligned_inputs(backend, device):
    backend_or_skip(OP, backend, device)
    C, a, n, s, D, r = 4, 1, 3, 5, 16, 2
    prefix = torch.randn(D, a, C, device=device).permute(2, 1, 0).requires_grad_()    # permuted
    suffix = torch.randn(C, s, 2 * D, device=device)[..., ::2].requires_grad_()       # strided
    base = torch.randn(n * D + 1, device=device)[1:].view(n, D).requires_grad_()        # contiguous, misaligned
    lowrank_a = torch.randn(r, n, device=device).t().requires_grad_()                   # column-major
    lowrank_b = torch.randn(r * D + 3, device=device)[3:].view(r, D).requires_grad_()   # misaligned
    pos = torch.randn(D, a + n + s, device=device).t().requires_grad_()
    assert not (prefix.is_contiguous() or suffix.is_contiguous() or lowrank_a.is_contiguous())
    assert base.data_ptr() % 16 != 0
    run_checked(backend, [prefix, suffix, base, lowrank_a, lowrank_b, pos])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_class", [False, True])
def test_gradcheck_float64(backend, per_class, device):
    backend_or_skip(OP, backend, device)
    tensors = make(3, 2, 2, 3, 5, 2, torch.float64, device, base_per_class=per_class, a_per_class=per_class,
                   grads=NAMES)

    def fn(*ts):
        return lk.assemble_prompts(*ts[:5], 0.6, ts[5], backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(tensors))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_class", [False, True])
def test_dropout_forward_and_backward(backend, per_class, device):
    backend_or_skip(OP, backend, device)
    tensors = make(4, 1, 4, 3, 32, 2, torch.float32, device, base_per_class=per_class, a_per_class=per_class)
    run_checked(backend, tensors, dropout=0.3)


def test_dropout_mask_same_in_every_backend_and_seeded(device):
    usable = [b for b in BACKENDS if ap_module._dispatch.why_not(OP, b, torch.device(device).type) is None]
    C, n, D, r = 3, 4, 64, 1
    zeros = torch.zeros(C, 1, D, device=device), torch.zeros(C, 2, D, device=device), torch.zeros(n, D, device=device)
    a = torch.rand(C, n, r, device=device) + 0.5  # A B > 0: a zero in E is a dropped element
    b = torch.rand(r, D, device=device) + 0.5
    outs = {}
    for backend in usable:
        torch.manual_seed(7)
        outs[backend] = lk.assemble_prompts(*zeros, a, b, 1.0, None, 0.4, backend=backend)
    keep = dropout_keep((C, n, D), seed_drawn_after(7, device), 0.4, device)
    for backend, out in outs.items():
        assert torch.equal(out[:, 1:1 + n] != 0, keep), backend
        torch.testing.assert_close(out, outs["torch"], rtol=1e-6, atol=1e-6)
    assert 0.5 < keep.float().mean().item() < 0.7  # P(keep) = 0.6
    torch.manual_seed(8)
    other = lk.assemble_prompts(*zeros, a, b, 1.0, None, 0.4, backend="torch")
    assert not torch.equal(other != 0, outs["torch"] != 0)  # a new seed per call
    torch.manual_seed(9)  # dropout=0 does not draw from the generator
    lk.assemble_prompts(*zeros, a, b, 1.0, None, 0.0)
    assert int(torch.randint(0, 2 ** 31 - 1, (1,), device=device).item()) == seed_drawn_after(9, device)


def test_dropout_stream_constants():
    """Pins the hash so a change in any backend's copy of it shows up (values from the C++ kernel)."""
    keep = dropout_keep((16,), 12345, 0.5)
    key = fmix32((12345 ^ 0x9E3779B9) & 0xFFFFFFFF)
    idx = torch.arange(16)
    h = fmix32((fmix32(idx ^ key) + key) & 0xFFFFFFFF)
    assert torch.equal(keep, (h >> 8) >= 8388608)
    # fmix32 against a direct uint32 computation in Python ints
    def fmix_int(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)
    vals = torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF, 123456789])
    assert fmix32(vals).tolist() == [fmix_int(int(v)) for v in vals]


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_contract(backend, device):
    """Nothing the size of E (or of P expanded, or the dropout mask) is kept: only A and B, when trained."""
    backend_or_skip(OP, backend, device)
    C, a, n, s, D, r = 16, 1, 4, 12, 64, 2
    tensors = make(C, a, n, s, D, r, torch.float32, device)
    with lk.SavedTensors(keep=True) as saved:
        lk.assemble_prompts(*tensors[:5], 1.0, tensors[5], 0.2, backend=backend)
    seeds = [t for t in saved.tensors if t is not None and t.dtype == torch.int64]
    # dropout's seed, on the inputs' device (graph-safe: test_assemble_prompts_seed.py)
    assert len(seeds) == 1 and seeds[0].numel() == 1 and seeds[0].device == tensors[0].device
    rest = [t for t in saved.tensors if t is not None and t.dtype != torch.int64]
    assert sum(t.numel() for t in rest) <= n * r + r * D
    assert {t.data_ptr() for t in rest} <= {tensors[3].data_ptr(), tensors[4].data_ptr()}
    frozen = [t.detach() if i in (3, 4) else t for i, t in enumerate(tensors)]
    with lk.SavedTensors(keep=True) as saved:
        lk.assemble_prompts(*frozen[:5], 1.0, frozen[5], backend=backend)
    assert saved.bytes == 0 and all(t is None for t in saved.tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_required(backend, device, monkeypatch):
    backend_or_skip(OP, backend, device)
    calls = []
    real = ap_module._gradients  # the eager path's backward: None where a gradient is not needed

    def spy(*args):
        result = real(*args)
        calls.append((args[9:15], [0 if r is None else r.numel() for r in result]))
        return result

    monkeypatch.setattr(ap_module, "_gradients", spy)
    C, a, n, s, D, r = 3, 1, 2, 4, 8, 1
    tensors = make(C, a, n, s, D, r, torch.float32, device, grads=("lowrank_b",))
    lk.assemble_prompts(*tensors[:5], 1.0, tensors[5], backend=backend).sum().backward()
    assert calls[-1] == ((False, False, False, False, True, False), [0, 0, 0, 0, r * D, 0])
    assert tensors[0].grad is None and tensors[2].grad is None and tensors[4].grad is not None
    tensors = make(C, a, n, s, D, r, torch.float32, device, grads=NAMES)
    lk.assemble_prompts(*tensors[:5], 1.0, tensors[5], backend=backend).sum().backward()
    assert calls[-1] == ((True,) * 6, [C * a * D, C * s * D, n * D, n * r, r * D, (a + n + s) * D])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_class", [False, True])
def test_backward_is_deterministic(backend, per_class, device):
    backend_or_skip(OP, backend, device)
    tensors = make(300, 1, 4, 20, 72, 2, torch.float32, device, base_per_class=per_class, a_per_class=per_class)
    g = torch.randn(300, 25, 72, device=device)

    def run():
        torch.manual_seed(3)
        out = lk.assemble_prompts(*tensors[:5], 0.5, tensors[5], 0.1, backend=backend)
        return torch.autograd.grad(out, wanted(tensors), g)

    first = run()
    for x, y in zip(first, run()):
        assert torch.equal(x, y)
    if backend == "cpu":  # the class sums split elements over threads, never classes: same bits on 1 thread
        with one_thread():
            single = run()
        for x, y in zip(first, single):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_matches(backend, device):
    backend_or_skip(OP, backend, device)
    tensors = make(4, 1, 3, 5, 12, 2, torch.float32, device)
    with torch.no_grad():
        out = lk.assemble_prompts(*tensors[:5], 2.0, tensors[5], backend=backend)
    assert not out.requires_grad
    truth = reference.assemble_prompts(*[t.double() for t in tensors[:5]], 2.0, tensors[5].double())
    assert max_err(out, truth) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_class", [False, True])
def test_opcheck(backend, per_class, device):
    backend_or_skip(OP, backend, device)
    C, a, n, s, D, r = 3, 1, 2, 4, 8, 2
    prefix, suffix, base, la, lb, pos = make(C, a, n, s, D, r, torch.float32, device, base_per_class=per_class,
                                             a_per_class=per_class, grads=NAMES)
    op = torch.ops.ladder_kernels.assemble_prompts_core.default
    torch.library.opcheck(op, (prefix, suffix, base, la, lb, pos, 0.5, 0.0, seed(0), backend))
    torch.library.opcheck(op, (prefix, suffix, base, la, lb, pos, 0.5, 0.25, seed(99), backend))
    torch.library.opcheck(op, (prefix, suffix, base, None, None, None, 1.0, 0.0, seed(0), backend))
    grad = torch.randn(C, a + n + s, D, device=device)
    back = torch.ops.ladder_kernels.assemble_prompts_core_backward.default
    torch.library.opcheck(back, (grad, la.detach(), lb.detach(), a, n, per_class, 0.5, 0.25, seed(99),
                                 True, True, True, True, True, True, backend))
    torch.library.opcheck(back, (grad, None, None, a, n, per_class, 0.5, 0.0, seed(0),
                                 False, False, True, False, False, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    backend_or_skip(OP, backend, device)
    torch._dynamo.reset()
    tensors = make(5, 1, 4, 6, 16, 1, torch.float32, device, grads=("lowrank_a", "lowrank_b", "pos"))

    def fn(*ts):
        return torch.tanh(lk.assemble_prompts(*ts[:5], 0.5, ts[5], backend=backend))

    compiled = torch.compile(fn, fullgraph=True)
    out, eager = compiled(*tensors), fn(*tensors)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.sum(), wanted(tensors))
    want = torch.autograd.grad(eager.sum(), wanted(tensors))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_dropout(backend, device):
    """The seed draw stays in the graph (a tensor, no .item(), so no capture_scalar_outputs needed): a new
    mask per call, and the backward regenerates the forward's mask (checked from E's zeros, A B > 0 here)."""
    backend_or_skip(OP, backend, device)
    torch._dynamo.reset()
    C, n, D = 3, 4, 16
    zeros = torch.zeros(C, 1, D, device=device), torch.zeros(C, 2, D, device=device), torch.zeros(n, D, device=device)
    a = (torch.rand(n, 1, device=device) + 0.5).requires_grad_()
    b = (torch.rand(1, D, device=device) + 0.5).requires_grad_()

    def fn(la, lb):
        return lk.assemble_prompts(*zeros, la, lb, 2.0, None, 0.5, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    out1, out2 = compiled(a, b), compiled(a, b)
    assert not torch.equal(out1 != 0, out2 != 0)
    g = torch.randn_like(out1)
    da, db = torch.autograd.grad(out1, (a, b), g)
    keep = (out1[:, 1:1 + n] != 0).double()  # the mask the forward used, the same for every class
    assert torch.equal(keep[0], keep[-1])
    dq = 2.0 * 2.0 * keep[0] * g[:, 1:1 + n].double().sum(0)  # scale / (1 - p) = 4
    torch.testing.assert_close(da.double(), dq @ b.detach().double().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), a.detach().double().t() @ dq, rtol=1e-5, atol=1e-5)


def test_automatic_dispatch():
    from ladder_kernels import _dispatch

    expected = "cpu" if lk.backends()["cpu"].available else "torch"
    assert _dispatch.resolve(OP, torch.device("cpu"), None) == expected
    if torch.cuda.is_available() and lk.backends()["cuda"].available:
        assert _dispatch.resolve(OP, torch.device("cuda"), None) == "cuda"


class TestBadInput:
    def args(self, **over):
        prefix, suffix, base, a, b, pos = make(3, 1, 4, 5, 8, 2)
        kw = dict(prefix=prefix, suffix=suffix, base=base, lowrank_a=a, lowrank_b=b, scale=1.0, pos=pos)
        kw.update(over)
        return kw

    @pytest.mark.parametrize("over,exc,words", [
        (dict(suffix=torch.randn(4, 5, 8)), ValueError, ["'suffix'", "(3, *, 8)", "(4, 5, 8)"]),
        (dict(suffix=torch.randn(3, 5, 9)), ValueError, ["'suffix'", "(3, *, 8)", "(3, 5, 9)"]),
        (dict(base=torch.randn(4, 9)), ValueError, ["'base'", "(*, 8)", "(4, 9)"]),
        (dict(base=torch.randn(2, 4, 8)), ValueError, ["'base'", "(3, *, 8)", "(2, 4, 8)"]),
        (dict(pos=torch.randn(11, 8)), ValueError, ["'pos'", "(10, 8)", "(11, 8)"]),
        (dict(pos=torch.randn(10, 7)), ValueError, ["'pos'", "(10, 8)", "(10, 7)"]),
        (dict(lowrank_a=torch.randn(5, 2)), ValueError, ["'lowrank_a'", "(4, 2)", "(5, 2)"]),
        (dict(lowrank_b=torch.randn(2, 9)), ValueError, ["'lowrank_b'", "(*, 8)", "(2, 9)"]),
        (dict(lowrank_b=None), ValueError, ["'lowrank_b'"]),
        (dict(lowrank_a=None), ValueError, ["'lowrank_a'"]),
        (dict(prefix=torch.randn(3, 8)), ValueError, ["'prefix'", "3 dimensions", "(3, 8)"]),
        (dict(base=torch.randn(8)), ValueError, ["'base'", "2 or 3 dimensions"]),
        (dict(suffix=torch.randn(3, 5, 8, dtype=torch.float64)), TypeError, ["'suffix'", "float64", "float32"]),
        (dict(pos=torch.randn(10, 8, dtype=torch.float16)), TypeError, ["'pos'", "float16", "float32"]),
        (dict(base=torch.randint(0, 3, (4, 8))), TypeError, ["'base'", "int64"]),
        (dict(lowrank_b=torch.randn(2, 8, device="meta")), ValueError, ["'lowrank_b'", "meta", "cpu"]),
        (dict(prefix=[[1.0]]), TypeError, ["'prefix'", "list"]),
        (dict(scale="1"), TypeError, ["'scale'", "str"]),
        (dict(scale=float("nan")), ValueError, ["'scale'"]),
    ])
    def test_rejected_with_named_argument(self, over, exc, words):
        with pytest.raises(exc) as info:
            lk.assemble_prompts(**self.args(**over))
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"

    @pytest.mark.parametrize("p", [1.0, -0.1, 2])
    def test_bad_dropout(self, p):
        with pytest.raises(ValueError, match="'dropout'"):
            lk.assemble_prompts(**self.args(), dropout=p)

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="'backend'"):
            lk.assemble_prompts(**self.args(), backend="nope")
        with pytest.raises(ValueError, match="backend 'cuda' cannot run here"):
            lk.assemble_prompts(**self.args(), backend="cuda")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="'base'.*cuda"):
            lk.assemble_prompts(**self.args(base=torch.randn(4, 8, device="cuda")))


class TestLowRankPrompt:
    def test_516_trainable_numbers_and_state_dict(self):
        init = torch.randn(4, 512)
        m = lk.nn.LowRankPrompt(init, rank=1)
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == 516
        assert set(m.state_dict()) == {"base", "lowrank_a", "lowrank_b"}
        torch.testing.assert_close(m.merge(), init)  # zero init: P starts at P0
        with torch.no_grad():
            m.lowrank_a.normal_()
        clone = lk.nn.LowRankPrompt(torch.zeros(4, 512), rank=1)
        clone.load_state_dict(m.state_dict())
        assert torch.equal(clone.merge(), m.merge())

    @pytest.mark.parametrize("mode", ["zero", "svd"])
    @pytest.mark.parametrize("shape", [(4, 32), (3, 4, 32)])
    def test_init_modes(self, mode, shape):
        init = torch.randn(*shape)
        m = lk.nn.LowRankPrompt(init, rank=2, scale=0.5, init_mode=mode)
        torch.testing.assert_close(m.merge(), init, atol=1e-5, rtol=1e-5)  # P starts at P0 either way
        assert m.lowrank_a.shape == (*shape[:-1], 2) and m.lowrank_b.shape == (2, 32)
        C = shape[0] if len(shape) == 3 else 5
        prefix, suffix = torch.randn(C, 1, 32), torch.randn(C, 6, 32)
        m(prefix, suffix).pow(2).sum().backward()
        assert m.lowrank_a.grad.abs().sum() > 0  # a non-zero gradient from the first step
        if mode == "svd":
            assert m.lowrank_b.grad.abs().sum() > 0
            q = (m.lowrank_a @ m.lowrank_b).detach().reshape(-1, 32)
            u, s, vh = torch.linalg.svd(init.reshape(-1, 32).double())
            best = (u[:, :2] * s[:2]) @ vh[:2]
            torch.testing.assert_close(q.double(), best, atol=1e-4, rtol=1e-4)

    def test_forward_merge_dropout_and_eval(self):
        init = torch.randn(4, 16)
        m = lk.nn.LowRankPrompt(init, rank=2, scale=0.5, dropout=0.5)
        with torch.no_grad():
            m.lowrank_a.normal_()
        prefix, suffix, pos = torch.randn(3, 1, 16), torch.randn(3, 5, 16), torch.randn(10, 16)
        m.eval()
        out = m(prefix, suffix, pos)
        torch.testing.assert_close(out, reference.assemble_prompts(prefix, suffix, m.merge(), pos=pos))
        m.train()
        train = m(prefix, suffix, pos)
        assert not torch.allclose(train[:, 1:5], out[:, 1:5])  # dropout on the low-rank branch
        torch.testing.assert_close(train[:, :1], out[:, :1])
        torch.testing.assert_close(train[:, 5:], out[:, 5:])

    def test_casts_to_the_sequence_dtype(self):
        m = lk.nn.LowRankPrompt(torch.randn(2, 8))
        out = m(torch.randn(2, 1, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and out.shape == (2, 6, 8)
        out.float().sum().backward()
        assert m.lowrank_a.grad.dtype == torch.float32

    @pytest.mark.parametrize("kw,word", [
        (dict(init=torch.randn(8)), "'init'"), (dict(rank=0), "'rank'"), (dict(dropout=1.0), "'dropout'"),
        (dict(init_mode="pca"), "'init_mode'"), (dict(init_mode="svd", rank=5), "'rank'"),
    ])
    def test_bad_arguments(self, kw, word):
        args = dict(init=torch.randn(4, 8))
        args.update(kw)
        with pytest.raises(ValueError, match=word):
            lk.nn.LowRankPrompt(**args)
