"""lk.apt_diffusion against its float64 reference (docs/design.md, section 3), per backend and device; the
memory contract (no (M, p) tensor saved), dropout, and lk.nn.APTPrompt / attach_apt."""
import pytest
import torch
from helpers import backend_or_skip, one_thread
from tolerance import assert_within_rule, max_err

import ladder_kernels as lk
import ladder_kernels.ops.apt_diffusion as apt_module
from ladder_kernels import reference


def draw_seed(device):
    """The seed lk.apt_diffusion draws from torch's generator when dropout > 0."""
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)

OP = "apt_diffusion"
BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("d_hidden", "d_attn_out", "d_prompts", "d_w1", "d_w2", "d_log_scale")


def make(M, D, p, r, dtype, device, *, lead=None, log_scale=0.2):
    lead = lead or (M,)
    hidden = torch.randn(*lead, D, dtype=dtype, device=device, requires_grad=True)
    attn_out = torch.randn(*lead, D, dtype=dtype, device=device, requires_grad=True)
    prompts = (torch.randn(p, D, device=device) / D ** 0.5).to(dtype).requires_grad_()
    w1 = torch.randn(r, D, device=device).to(dtype).requires_grad_()
    w2 = (0.1 * torch.randn(D, r, device=device) / D ** 0.5).to(dtype).requires_grad_()
    s = torch.tensor(log_scale, device=device, requires_grad=True)
    return hidden, attn_out, prompts, w1, w2, s


def f64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


def grads_of(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g, allow_unused=True)


def check_against_reference(backend, *inputs, dropout=0.0, seed=1234):
    hidden = inputs[0]
    dtype = hidden.dtype
    torch.manual_seed(seed)
    out = lk.apt_diffusion(*inputs, dropout=dropout, backend=backend)
    mask = None
    if dropout > 0:  # replay the generator: the wrapper draws its seed first
        torch.manual_seed(seed)
        keep = apt_module.dropout_keep(draw_seed(hidden.device), 0, hidden.numel() // hidden.shape[-1],
                                       inputs[2].shape[0], dropout)
        mask = keep.reshape(*hidden.shape[:-1], -1).double() / (1 - dropout)
    g = torch.randn_like(out)
    got = grads_of(out, inputs, g)
    plain_out = reference.apt_diffusion(*inputs, dropout_mask=mask)
    plain = grads_of(plain_out, inputs, g)
    truth_in = f64(inputs)
    truth_out = reference.apt_diffusion(*truth_in, dropout_mask=mask)
    truth = grads_of(truth_out, truth_in, g.double())
    assert out.dtype == dtype and out.shape == hidden.shape
    assert_within_rule("out", out, plain_out, truth_out, dtype)
    names = [n for n, t in zip(NAMES, inputs) if t.requires_grad]
    for name, a, p, t, x in zip(names, got, plain, truth, [t for t in inputs if t.requires_grad]):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert_within_rule(name, a, p.to(x.dtype) if p.dtype != x.dtype else p, t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, device):
    backend_or_skip(OP, backend, device)
    check_against_reference(backend, *make(0, 48, 20, 4, dtype, device, lead=(2, 35)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,D,p,r", [(1, 1, 1, 1), (1, 7, 1, 2), (13, 29, 5, 1), (67, 97, 17, 3),
                                     (130, 64, 65, 4), (0, 8, 3, 2), (9, 16, 512, 4), (4099, 8, 3, 2)])
def test_odd_shapes(backend, M, D, p, r, device):
    backend_or_skip(OP, backend, device)
    check_against_reference(backend, *make(M, D, p, r, torch.float32, device))


def test_cpu_wide_prompts_one_block_at_a_time(device):
    """p = 512, D = 2053: one block's dKt and dP partials (8.4 MB) exceed the C++ backward's 8 MB scratch
    budget, so it steps one 256-row block at a time (BLAS threads the GEMMs): same answers, same bits."""
    backend_or_skip(OP, "cpu", device)
    inputs = make(520, 2053, 512, 2, torch.float32, device)
    check_against_reference("cpu", *inputs)
    g = torch.randn(520, 2053, device=device)
    grads = [torch.autograd.grad(lk.apt_diffusion(*inputs, backend="cpu"), inputs, g) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    backend_or_skip(OP, backend, device)
    M, D, p, r = 33, 40, 12, 3
    hidden = torch.randn(D, M, device=device).t().requires_grad_()               # transposed
    attn_out = torch.randn(M, 2 * D, device=device)[:, ::2].requires_grad_()       # strided columns
    prompts = (torch.randn(D, p, device=device) / D ** 0.5).t().requires_grad_()    # column-major
    w1 = torch.randn(D, r, device=device).t().requires_grad_()
    w2 = (0.1 * torch.randn(r, D, device=device)).t().requires_grad_()
    s = torch.tensor([[-0.3]], device=device, requires_grad=True)
    assert not any(t.is_contiguous() for t in (hidden, attn_out, prompts, w1, w2))
    check_against_reference(backend, hidden, attn_out, prompts, w1, w2, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, device):
    """w is a stop-gradient, so finite differences of `out` see dw/dH that autograd does not. Dividing
    (out - exp(s) Y) by the detached w leaves exp(s) A P, whose full derivative is what the op returns."""
    backend_or_skip(OP, backend, device)
    hidden, attn_out, prompts, w1, w2, s = f64(make(7, 9, 5, 2, torch.float64, device))
    with torch.no_grad():  # every row needs w > 0 to divide by, and no score near the relu kink
        prompts[0] = hidden.mean(0) * 3
        kt = prompts + (prompts @ w1.t()) @ w2.t()
        scores = hidden @ kt.t()
        assert (scores.amax(1) > 0.1).all() and (scores.abs() > 1e-4).all()

    def without_w(h, y, p, a, b, ls):
        kt = p + (p @ a.t()) @ b.t()
        w = torch.relu(h @ kt.t()).amax(-1, keepdim=True).detach()
        return (lk.apt_diffusion(h, y, p, a, b, ls, backend=backend) - torch.exp(ls) * y) / w

    fast = backend == "triton" and device == "cpu"  # the interpreter is slow: random projections only
    assert torch.autograd.gradcheck(without_w, (hidden, attn_out, prompts, w1, w2, s), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda y: lk.apt_diffusion(hidden.detach(), y, prompts.detach(), w1.detach(),
                                                               w2.detach(), s.detach(), backend=backend),
                                    (attn_out,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_zero_rows_in_row_max(backend, device):
    backend_or_skip(OP, backend, device)
    hidden, attn_out, prompts, w1, w2, s = make(20, 16, 6, 2, torch.float32, device)
    with torch.no_grad():
        prompts[3] = prompts[1]           # two prompts tie for the max in every row where they lead
        hidden[5] = -hidden[6]
        hidden[7] = 0.0                   # relu(S) = 0 on the whole row: w = 0
        w2.zero_()
    torch.manual_seed(0)
    kt = prompts + (prompts @ w1.t()) @ w2.t()
    act = torch.relu(hidden @ kt.t())
    assert (act[:, 1] == act[:, 3]).all() and act[7].max() == 0
    check_against_reference(backend, hidden, attn_out, prompts, w1, w2, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [19, 40])
def test_dropout_mask_same_in_forward_and_backward(backend, dtype, p, device):
    """The backward recomputes A, so its gradients only match the reference with the forward's mask if
    the mask is regenerated exactly (the reference gets the mask from the documented hash)."""
    backend_or_skip(OP, backend, device)
    check_against_reference(backend, *make(70, 24, p, 2, dtype, device), dropout=0.3)


def test_dropout_stream_statistics_and_seeding():
    keep = apt_module.dropout_keep(torch.tensor([77]), 0, 400, 50, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    assert torch.equal(apt_module.dropout_keep(torch.tensor([77]), 100, 300, 50, 0.25), keep[100:])
    assert not torch.equal(apt_module.dropout_keep(torch.tensor([78]), 0, 400, 50, 0.25), keep)
    assert apt_module.dropout_keep(torch.tensor([77]), 0, 10, 10, 0.0).all()
    inputs = make(30, 16, 8, 2, torch.float32, "cpu")
    a = lk.apt_diffusion(*inputs, dropout=0.5, backend="torch")
    b = lk.apt_diffusion(*inputs, dropout=0.5, backend="torch")
    assert not torch.equal(a, b)  # a fresh seed per call
    torch.manual_seed(3)
    c = lk.apt_diffusion(*inputs, dropout=0.5, backend="torch")
    torch.manual_seed(3)
    assert torch.equal(c, lk.apt_diffusion(*inputs, dropout=0.5, backend="torch"))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_dropout_mask_identical_across_backends(backend, device):
    backend_or_skip(OP, backend, device)
    inputs = make(50, 20, 70, 2, torch.float64, device)
    outs = []
    for b in (backend, "torch"):
        torch.manual_seed(9)
        outs.append(lk.apt_diffusion(*inputs, dropout=0.4, backend=b))
    assert max_err(outs[0], outs[1]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_contract(backend, device):
    backend_or_skip(OP, backend, device)
    M, D, p, r = 96, 40, 24, 4
    hidden, attn_out, prompts, w1, w2, s = make(M, D, p, r, torch.bfloat16, device)
    small = (2 * p * D + 2 * r * D + 2 * p * r) * 4 + 64
    with lk.SavedTensors(keep=True) as saved:
        out = lk.apt_diffusion(hidden, attn_out, prompts, w1, w2, s, backend=backend)
    assert not any({M, p} <= set(t.shape) or t.numel() == M * p for t in saved.tensors), "an (M, p) tensor was saved"
    big = [t for t in saved.tensors if t.numel() >= M * D]
    # H (the caller's own tensor, not a copy) and out (for ds), and w: M fp32 numbers.
    assert len(big) == 2 and any(t.data_ptr() == hidden.data_ptr() for t in big)
    assert any(t.data_ptr() == out.data_ptr() for t in big)
    assert saved.bytes <= 2 * M * D * 2 + M * 4 + small
    # Frozen log-scale: out is not kept.
    with lk.SavedTensors(keep=True) as saved:
        lk.apt_diffusion(hidden, attn_out, prompts, w1, w2, s.detach(), backend=backend)
    assert sum(t.numel() >= M * D for t in saved.tensors) == 1
    # Only Y and s trainable: nothing needs A, so neither H nor w is kept.
    with lk.SavedTensors(keep=True) as saved:
        lk.apt_diffusion(hidden.detach(), attn_out, prompts.detach(), w1.detach(), w2.detach(), s, backend=backend)
    assert not any(t.data_ptr() == hidden.data_ptr() for t in saved.tensors)
    assert not any(t.numel() == M for t in saved.tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [30, 40])
def test_backward_is_deterministic(backend, p, device):
    backend_or_skip(OP, backend, device)
    inputs = make(600, 48, p, 4, torch.float32, device)  # several row blocks of every backend
    g = torch.randn(600, 48, device=device)

    def run():
        torch.manual_seed(1)
        return torch.autograd.grad(lk.apt_diffusion(*inputs, dropout=0.2, backend=backend), inputs, g)

    first = run()
    for a, b in zip(first, run()):
        assert torch.equal(a, b)
    if backend == "cpu" and torch.get_num_threads() > 1:  # row blocks summed in block order, not per thread
        with one_thread():
            single = run()
        for a, b in zip(first, single):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_matches(backend, device):
    backend_or_skip(OP, backend, device)
    inputs = make(10, 12, 4, 2, torch.float32, device)
    with torch.no_grad():
        out = lk.apt_diffusion(*inputs, backend=backend)
    assert not out.requires_grad
    assert max_err(out, reference.apt_diffusion(*f64(inputs))) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_log_scale_and_frozen_inputs(backend, device):
    backend_or_skip(OP, backend, device)
    hidden, attn_out, prompts, w1, w2, _ = make(0, 16, 5, 2, torch.float32, device, lead=(3, 4))
    hidden, w1, w2 = hidden.detach(), w1.detach(), w2.detach()
    out = lk.apt_diffusion(hidden, attn_out, prompts, w1, w2, -0.5, backend=backend)
    truth_in = f64((hidden, attn_out, prompts, w1, w2))
    truth = reference.apt_diffusion(*truth_in, -0.5)
    assert max_err(out, truth) < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (attn_out, prompts), g)
    want = torch.autograd.grad(truth, (truth_in[1], truth_in[2]), g.double())
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    backend_or_skip(OP, backend, device)
    hidden, attn_out, prompts, w1, w2, s = make(17, 24, 6, 2, torch.float32, device)
    kt = (prompts + (prompts @ w1.t()) @ w2.t()).detach().requires_grad_()
    ls = s.detach().reshape(1).requires_grad_()
    seed = torch.tensor([42], device=device)
    op = torch.ops.ladder_kernels.apt_diffusion_core.default
    for dropout in (0.0, 0.25):
        torch.library.opcheck(op, (hidden, attn_out, prompts, kt, ls, seed, dropout, backend))
    with torch.no_grad():
        out, w = op(hidden, attn_out, prompts, kt, ls, seed, 0.25, backend)
    grad = torch.randn(17, 24, device=device)
    bwd = torch.ops.ladder_kernels.apt_diffusion_core_backward.default
    d = [t.detach() for t in (hidden, prompts, kt, ls)]
    args = (grad, d[0], out, d[1], d[2], d[3], w, seed, 0.25, True, True, True, True, True, backend)
    torch.library.opcheck(bwd, args)
    torch.library.opcheck(bwd, (grad, None, out, d[1], d[2], d[3], None, seed, 0.0, False, True, False, False, True,
                                backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compile_fullgraph(backend, dropout, device):
    backend_or_skip(OP, backend, device)
    torch._dynamo.reset()
    inputs = make(19, 24, 7, 2, torch.float32, device)

    def fn(h, y, p, a, b, ls):
        return torch.tanh(lk.apt_diffusion(h, y, p, a, b, ls, dropout=dropout, backend=backend))

    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(*inputs)
    got = torch.autograd.grad(out.sum(), inputs)
    assert out.shape == inputs[0].shape and all(torch.isfinite(g).all() for g in got)
    if dropout == 0:
        eager = fn(*inputs)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        want = torch.autograd.grad(eager.sum(), inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_automatic_dispatch_and_env_override(monkeypatch):
    from ladder_kernels import _dispatch

    inputs = make(4, 6, 3, 2, torch.float32, "cpu")
    expected = "cpu" if lk.backends()["cpu"].available else "torch"
    assert _dispatch.resolve(OP, inputs[0].device, None) == expected
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "torch")
    assert _dispatch.resolve(OP, inputs[0].device, None) == "torch"
    monkeypatch.setenv("LADDER_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        lk.apt_diffusion(*inputs)


class TestBadInput:
    def args(self, **over):
        hidden, attn_out, prompts, w1, w2, s = make(5, 8, 3, 2, torch.float32, "cpu")
        kw = dict(hidden=hidden, attn_out=attn_out, prompts=prompts, w1=w1, w2=w2, log_scale=s)
        kw.update(over)
        return kw

    @pytest.mark.parametrize("over,exc,words", [
        (dict(attn_out=torch.randn(5, 9)), ValueError, ["'attn_out'", "(5, 8)", "(5, 9)"]),
        (dict(hidden=torch.randn(2, 5, 8)), ValueError, ["'attn_out'", "(2, 5, 8)", "(5, 8)"]),
        (dict(prompts=torch.randn(3, 7)), ValueError, ["'prompts'", "(*, 8)", "(3, 7)"]),
        (dict(prompts=torch.randn(0, 8)), ValueError, ["'prompts'", "at least 1", "(0, 8)"]),
        (dict(prompts=torch.randn(8)), ValueError, ["'prompts'", "2 dimensions"]),
        (dict(w1=torch.randn(2, 9)), ValueError, ["'w1'", "(2, 8)", "(2, 9)"]),
        (dict(w2=torch.randn(8, 3)), ValueError, ["'w2'", "(8, 2)", "(8, 3)"]),
        (dict(log_scale=torch.zeros(2)), ValueError, ["'log_scale'", "one element", "(2,)"]),
        (dict(log_scale="0"), TypeError, ["'log_scale'", "str"]),
        (dict(log_scale=torch.zeros(1, dtype=torch.int64)), TypeError, ["'log_scale'", "int64"]),
        (dict(hidden=torch.randn(5, 8, dtype=torch.float64)), TypeError, ["'attn_out'", "float64", "float32"]),
        (dict(prompts=torch.randint(0, 3, (3, 8))), TypeError, ["'prompts'", "int64"]),
        (dict(w2=torch.randn(8, 2, device="meta")), ValueError, ["'w2'", "meta", "cpu"]),
        (dict(hidden=[[1.0]]), TypeError, ["'hidden'", "list"]),
    ])
    def test_rejected_with_named_argument(self, over, exc, words):
        with pytest.raises(exc) as info:
            lk.apt_diffusion(**self.args(**over))
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"

    @pytest.mark.parametrize("dropout,exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                             ("0.1", TypeError), (True, TypeError)])
    def test_bad_dropout(self, dropout, exc):
        with pytest.raises(exc, match="'dropout'"):
            lk.apt_diffusion(**self.args(), dropout=dropout)

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="'backend'.*'gpu'"):
            lk.apt_diffusion(**self.args(), backend="gpu")
        with pytest.raises(ValueError, match="has no cuda implementation"):
            lk.apt_diffusion(**self.args(), backend="cuda")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_triton_kernels_compile_for_gpu(arch, dtype):
    """Every launch of the forward and the backward compiles for sm_80 / sm_90 with the specialisation a
    real launch binds, at an odd shape (nothing divisible by 16: the generic binary) and with p = 200 (three
    prompt chunks; two prompt groups on sm_80). The benchmark shapes are gated in test_triton_static.py."""
    tc = pytest.importorskip("triton_compile")
    module = "ladder_kernels.backends.triton.apt_diffusion"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    M, D, p = 13, 29, 200
    h, pr, ls, seed = tc.meta((M, D), dtype), tc.meta((p, D), dtype), tc.meta((1,), acc), tc.meta((1,), torch.int64)
    rows = tc.compile_launches(module, "forward", [h, h, pr, pr, ls, seed, 0.1], arch)
    rows += tc.compile_launches(module, "backward", [h, h, h, pr, pr, ls, tc.meta((M,), acc), seed, 0.1,
                                                     True, True, True, True, True], arch)
    assert [r["kernel"] for r in rows] == ["_fwd_kernel"] + ["_bwd_rows_kernel"] * (2 if arch == 80 else 1)
    if arch == 90 and dtype in (torch.bfloat16, torch.float16):
        assert all(r["mma"] == "wgmma" for r in rows)  # the Hopper tensor-core path, not a fallback


# ---- lk.nn.APTPrompt and attach_apt ---------------------------------------------------------------

def test_module_init_and_dropout_only_in_training():
    torch.manual_seed(0)
    m = lk.nn.APTPrompt(64, num_prompts=200, rank=4, dropout=0.5, backend="torch")
    assert m.prompts.shape == (200, 64) and m.w1.shape == (4, 64) and m.w2.shape == (64, 4)
    assert abs(m.prompts.std().item() - 0.02) < 0.002 and abs(m.w1.std().item() - 1.0) < 0.1
    assert (m.w2 == 0).all() and m.log_scale.item() == 0
    hidden, attn_out = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    m.eval()
    ref = reference.apt_diffusion(hidden, attn_out, m.prompts, m.w1, m.w2, m.log_scale)
    torch.testing.assert_close(m(hidden, attn_out), ref)
    m.train()
    assert not torch.allclose(m(hidden, attn_out), ref)
    out = m(hidden, attn_out)
    out.sum().backward()
    assert m.prompts.grad is not None and m.w2.grad.abs().sum() > 0 and m.log_scale.grad is not None
    with pytest.raises(ValueError, match="'num_prompts'"):
        lk.nn.APTPrompt(8, num_prompts=0)
    with pytest.raises(ValueError, match="'dropout'"):
        lk.nn.APTPrompt(8, dropout=1.5)


def tiny_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8, projection_dim=16),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def clip_logits(model, ids, pixels):
    return model(input_ids=ids, pixel_values=pixels).logits_per_image


def test_attach_apt_to_hugging_face_clip():
    torch.manual_seed(0)
    model = tiny_clip()
    ids, pixels = torch.randint(0, 100, (3, 7)), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = clip_logits(model, ids, pixels)
    apts = lk.nn.attach_apt(model, num_prompts=5, rank=2)
    assert len(apts) == 4 and all(n.endswith("self_attn") for n in apts.names)
    assert {id(p) for p in apts.parameters()} <= {id(p) for p in model.parameters()}
    assert any(k.startswith("apt_prompts.0.prompts") for k in model.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in apts.parameters():
        p.requires_grad_(True)
    logits = clip_logits(model, ids, pixels)
    assert not torch.allclose(logits, plain)
    logits.sum().backward()
    assert all(a.prompts.grad is not None and a.prompts.grad.abs().sum() > 0 for a in apts)

    # One attention module, hidden_states positional and as keyword: its output is APT(H, attention(H)).
    attn = model.vision_model.encoder.layers[0].self_attn
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        got_kw = attn(hidden_states=h)[0]
        got_pos = attn(h)[0]
        apts.remove()
        y = attn(h)[0]
    assert not hasattr(model, "apt_prompts")
    a = apts[apts.names.index("vision_model.encoder.layers.0.self_attn")]
    want = reference.apt_diffusion(h, y, a.prompts, a.w1, a.w2, a.log_scale)
    torch.testing.assert_close(got_kw, want)
    torch.testing.assert_close(got_pos, want)
    with torch.no_grad():
        torch.testing.assert_close(clip_logits(model, ids, pixels), plain)  # detached: the original model


def test_attach_apt_to_plain_module_with_predicate():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.proj(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Attn(), Attn()

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    model = Net()
    with pytest.raises(ValueError, match="no module"):
        lk.nn.attach_apt(model)
    with pytest.raises(ValueError, match="width"):
        lk.nn.attach_apt(model, predicate=lambda m: isinstance(m, Attn))
    model.first.embed_dim = model.second.embed_dim = 6
    apts = lk.nn.attach_apt(model, num_prompts=3, rank=1, predicate=lambda m: isinstance(m, Attn))
    assert len(apts) == 2
    x = torch.randn(4, 6)
    y1 = apts[0](x, model.first.proj(x))
    want = apts[1](torch.relu(y1), model.second.proj(torch.relu(y1)))
    torch.testing.assert_close(model(x), want)
    with pytest.raises(ValueError, match="apt_prompts"):
        lk.nn.attach_apt(model, predicate=lambda m: isinstance(m, Attn))
