"""Issue 24's reproductions (forward-mode AD, torch.func transforms) and issue 25's vmap warning, per op
and backend, against the float64 reference; plus what the composite route must not change: the
ordinary eager path keeps the kernels (docs/design.md, "Differentiation paths")."""
import math
import warnings

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import autograd_cases as cases
import ladder_kernels as lk
from helpers import backend_or_skip
from ladder_kernels import reference
from ladder_kernels.ops import _autograd


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("op,backend", cases.OP_BACKENDS)
@pytest.mark.parametrize("path", cases.PATHS, ids=lambda p: p.__name__)
def test_path_on_device(op, backend, path, device):
    backend_or_skip(op, backend, device)
    g = _gen()
    path(cases.MAKERS[op](g, device), backend, g)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_jvp_of_gated_fusion_is_mu(backend):
    """The issue's case: the side tangent is mu = sigmoid(3) = 0.9526 everywhere, not zero."""
    backend_or_skip("gated_fusion", backend, "cpu")
    side, tap, weight = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64), \
        torch.randn(4, 6, dtype=torch.float64)
    _, tangent = jvp(lambda s: lk.gated_fusion(s, tap, weight, gate=3.0, temperature=1.0, backend=backend),
                     (side,), (torch.ones_like(side),))
    torch.testing.assert_close(tangent, torch.full_like(side, 1 / (1 + math.exp(-3.0))))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dual_prefix_gives_assemble_prompts_a_tangent(backend):
    """The issue's case: a dual prefix on the C++ backend gave an output with no tangent at all."""
    backend_or_skip("assemble_prompts", backend, "cpu")
    prefix, suffix, base = (torch.randn(3, 1, 6, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64),
                            torch.randn(2, 6, dtype=torch.float64))
    tangent = torch.randn_like(prefix)
    with fwAD.dual_level():
        out = lk.assemble_prompts(fwAD.make_dual(prefix, tangent), suffix, base, backend=backend)
        got = fwAD.unpack_dual(out).tangent
    assert got is not None
    torch.testing.assert_close(got, torch.cat((tangent, torch.zeros(3, 4, 6, dtype=torch.float64)), dim=1))


def _is_eager_function(out) -> bool:
    return type(out.grad_fn).__name__ == "EagerBackward"


@pytest.mark.parametrize("op,backend", cases.OP_BACKENDS)
def test_ordinary_calls_keep_the_kernels(op, backend):
    """Only tangents or transforms take the composite: a training call, also inside a dual level with no
    dual input, still runs the kernels through the eager Function (the host-cost path)."""
    backend_or_skip(op, backend, "cpu")
    case = cases.MAKERS[op](_gen())
    xs = [x.clone().requires_grad_() for x in case.inputs]
    assert not _autograd.needs_composite(xs)
    assert _is_eager_function(case.call(backend)(*xs))
    with fwAD.dual_level():
        assert not _autograd.needs_composite(xs)
        assert _is_eager_function(case.call(backend)(*xs))
        assert _autograd.needs_composite([fwAD.make_dual(case.inputs[0], case.inputs[0])])


@pytest.mark.parametrize("op,backend", cases.OP_BACKENDS)
def test_vmap_without_grad_is_silent_and_correct(op, backend, capfd):
    """Issue 25: vmap of a kernel with no batching rule warned once per op (and looped per sample)."""
    backend_or_skip(op, backend, "cpu")
    g = _gen()
    case = cases.MAKERS[op](g)
    torch.set_warn_always(True)  # a once-per-process warning must not hide behind an earlier test's
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cases.func_vmap(case, backend, g)
    finally:
        torch.set_warn_always(False)
    assert "batching rule" not in capfd.readouterr().err


def _draw_seed(device="cpu"):
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dual_tensors_with_dropout_replay_the_kernels_mask(backend):
    """Under forward AD the composite draws the seed the kernels would: the same output, and the
    reference's tangent with that seed's mask."""
    backend_or_skip("assemble_prompts", backend, "cpu")
    backend_or_skip("apt_diffusion", backend, "cpu")
    case = cases.assemble_prompts(_gen(), C=2, n=3, D=7, r=2)
    pre, suf, base, a, b, pos = case.inputs
    tangents = cases.like(_gen(1), case.inputs)
    torch.manual_seed(5)
    kernel = lk.assemble_prompts(pre, suf, base, a, b, 0.5, pos, dropout=0.4, backend=backend)
    torch.manual_seed(5)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(case.inputs, tangents)]
        out = lk.assemble_prompts(*duals[:5], 0.5, duals[5], dropout=0.4, backend=backend)
        primal, tangent = fwAD.unpack_dual(out)
    torch.manual_seed(5)
    keep = lk.ops.assemble_prompts.dropout_keep((3, 7), _draw_seed(), 0.4).double() / 0.6
    want = jvp(lambda *xs: reference.assemble_prompts(*xs[:5], 0.5, xs[5], keep), case.inputs, tangents)
    cases.close((primal, tangent), (kernel, want[1]), "assemble_prompts dropout forward_ad")
    cases.close(primal, want[0], "assemble_prompts dropout primal")

    case = cases.apt_diffusion(_gen(), lead=(6,), p=4)
    tangents = cases.like(_gen(1), case.inputs)
    torch.manual_seed(5)
    kernel = lk.apt_diffusion(*case.inputs, dropout=0.3, backend=backend)
    torch.manual_seed(5)
    primal, tangent = jvp(lambda *xs: lk.apt_diffusion(*xs, dropout=0.3, backend=backend), case.inputs, tangents)
    torch.manual_seed(5)
    keep = lk.ops.apt_diffusion.dropout_keep(_draw_seed(), 0, 6, 4, 0.3).double() / 0.7
    want = jvp(lambda *xs: reference.apt_diffusion(*xs, keep), case.inputs, tangents)
    cases.close((primal, tangent), (kernel, want[1]), "apt_diffusion dropout torch.func.jvp")
    cases.close(primal, want[0], "apt_diffusion dropout primal")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_vmap_dropout_randomness(backend):
    """randomness="same": one seed, the kernels' mask in every sample; "different": a mask per sample;
    "error" (vmap's default): torch's own error, which names the two flags."""
    backend_or_skip("assemble_prompts", backend, "cpu")
    pre, suf, base, a, b, _ = cases.assemble_prompts(_gen(), C=2, n=4, D=8, r=2).inputs

    def f(x):
        return lk.assemble_prompts(x, suf, base, a, b, dropout=0.5, backend=backend)

    batch = torch.stack([pre, pre])
    torch.manual_seed(2)
    want = f(pre)
    torch.manual_seed(2)
    same = vmap(f, randomness="same")(batch)
    # close, not equal: the kernels' bits may differ from the composite's, a mask could not
    cases.close((same[0], same[1]), (want, want), "randomness='same'")
    different = vmap(f, randomness="different")(batch)
    assert not torch.equal(different[0], different[1])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(f)(batch)


@pytest.mark.parametrize("op,backend", cases.OP_BACKENDS)
def test_batched_gradients_are_refused_naming_what_works(op, backend):
    """A batch of cotangents through the kernels' backward: torch's internal errors on some backends, a
    silent per-sample loop on others; now one error on all, naming torch.func.jacrev (a path above)."""
    backend_or_skip(op, backend, "cpu")
    case = cases.MAKERS[op](_gen())
    xs = [x.clone().requires_grad_() for x in case.inputs]
    out = case.call(backend)(*xs)
    message = rf"{op}: batched gradients .* backend '{backend}'.*torch\.func\.jacrev"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(out, xs, torch.randn(2, *out.shape, dtype=out.dtype), is_grads_batched=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.functional.jacobian(case.call(backend), case.inputs, vectorize=True)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_double_backward_error_names_what_works_and_it_does(backend):
    """Reverse over reverse through the kernels is refused with the backend and the alternative named;
    the named alternative (torch.func) gives the reference's second derivatives."""
    backend_or_skip("gated_fusion", backend, "cpu")
    case = cases.gated_fusion(_gen(), lead=(3,), D=3, d=2)
    f = case.call(backend)
    xs = [x.clone().requires_grad_() for x in case.inputs]
    (d_side,) = torch.autograd.grad(f(*xs).square().sum(), xs[:1], create_graph=True)
    with pytest.raises(RuntimeError, match=rf"gated_fusion: double backward .* backend '{backend}'.*torch\.func"):
        d_side.sum().backward()
    for second in (hessian, lambda fn, argnums: jacfwd(jacrev(fn, argnums=argnums), argnums=argnums)):
        got = second(lambda *x: f(*x).square().sum(), argnums=(0, 2, 4))(*case.inputs)
        want = second(lambda *x: case.ref(*x).square().sum(), argnums=(0, 2, 4))(*case.inputs)
        cases.close([h for row in got for h in row], [h for row in want for h in row], f"{backend} hessian")


def test_modules_under_functional_call():
    """Per-sample gradients of a module's parameters, torch.func's canonical use."""
    fusion = lk.nn.GatedLadderFusion(6, 4, per_channel_gate=True).double()
    params = {k: v.detach() for k, v in fusion.named_parameters()}
    side, tap = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)

    def loss(p, s, x):
        return torch.func.functional_call(fusion, p, (s, x)).square().sum()

    def ref_loss(p, s, x):
        return reference.gated_fusion(s, x, p["weight"], p["bias"], p["gate"], fusion.temperature).square().sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, side, tap)
    want = vmap(grad(ref_loss), in_dims=(None, 0, 0))(params, side, tap)
    assert set(got) == set(params)
    cases.close([got[k] for k in params], [want[k] for k in params], "GatedLadderFusion per-sample grads")


@pytest.mark.parametrize("op,backend", [(op, b) for op, b in cases.OP_BACKENDS if b in ("cpu", "torch")])
def test_transforms_under_torch_compile(op, backend):
    """torch.compile traces torch.func transforms itself, so the op takes its composite there too (the
    custom op, which has no jvp, gave a zero tangent in a compiled jvp); a graph compiled without a
    transform is not reused under one. aot_eager: the choice is made while tracing, before Inductor."""
    backend_or_skip(op, backend, "cpu")
    torch._dynamo.reset()
    g = _gen()
    case = cases.MAKERS[op](g)
    f, every = case.call(backend), tuple(range(len(case.inputs)))
    tangents = cases.like(g, case.inputs)

    def loss(fn):
        return lambda *xs: fn(*xs).square().sum()

    got = torch.compile(lambda *xs: jvp(f, xs, tangents), backend="aot_eager")(*case.inputs)
    cases.close(got, jvp(case.ref, case.inputs, tangents), f"{op}/{backend} compiled jvp")
    got = torch.compile(lambda *xs: grad(loss(f), argnums=every)(*xs), backend="aot_eager")(*case.inputs)
    cases.close(got, grad(loss(case.ref), argnums=every)(*case.inputs), f"{op}/{backend} compiled grad")
    got = torch.compile(lambda *xs: vmap(f, in_dims=(0,) + (None,) * (len(xs) - 1))(*xs),
                        backend="aot_eager")(torch.stack([case.inputs[0]] * 2), *case.inputs[1:])
    cases.close(got, torch.stack([case.ref(*case.inputs)] * 2), f"{op}/{backend} compiled vmap")
    compiled = torch.compile(f, backend="aot_eager")
    cases.close(compiled(*case.inputs), case.ref(*case.inputs), f"{op}/{backend} compiled")
    cases.func_jvp(case._replace(call=lambda _: compiled), backend, g)
    cases.func_vmap(case._replace(call=lambda _: compiled), backend, g)
