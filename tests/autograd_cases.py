"""The ops as functions of float64 tensors only, beside their references, and the differentiation paths
the package claims for them (docs/design.md, "Differentiation paths"), each checked against the
reference: shared by test_autograd_paths.py and test_autograd_property.py.

OP_BACKENDS is every (op, backend) of the dispatch table, not a list written here: a backend added to
ladder_kernels.backends.TABLE is checked on every path (or skipped with its reason) with no edit here.
"""
from typing import Callable, NamedTuple

import torch
from torch.autograd import forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import ladder_kernels as lk
from ladder_kernels import reference
from ladder_kernels.backends import TABLE

OP_BACKENDS = [(op, backend) for op in TABLE for backend in TABLE[op]]
F64 = dict(rtol=1e-7, atol=1e-9)


class Case(NamedTuple):
    op: str
    inputs: tuple  # float64 tensors, none requiring grad
    call: Callable  # call(backend) -> f(*inputs), the lk op on that backend
    ref: Callable  # the reference, f(*inputs)


def _maker(g, device):
    def t(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device)
    return t


def gated_fusion(g, device="cpu", lead=(5,), D=6, d=4, scalar_gate=False, temperature=0.7) -> Case:
    t = _maker(g, device)
    inputs = (t(*lead, d), t(*lead, D), t(d, D, scale=D ** -0.5), t(d), t(*(() if scalar_gate else (d,))))

    def call(backend):
        return lambda s, x, w, b, a: lk.gated_fusion(s, x, w, b, gate=a, temperature=temperature, backend=backend)

    return Case("gated_fusion", inputs, call,
                lambda s, x, w, b, a: reference.gated_fusion(s, x, w, b, a, temperature))


def assemble_prompts(g, device="cpu", C=3, a=1, n=2, s=3, D=5, r=1, per_class_a=False, per_class_base=False,
                     scale=0.5) -> Case:
    t = _maker(g, device)
    base = t(C, n, D) if per_class_base else t(n, D)
    low_a = t(C, n, r) if per_class_a else t(n, r)
    inputs = (t(C, a, D), t(C, s, D), base, low_a, t(r, D), t(a + n + s, D))

    def call(backend):
        return lambda pre, suf, p0, la, lb, pos: lk.assemble_prompts(pre, suf, p0, la, lb, scale=scale, pos=pos,
                                                                     backend=backend)

    return Case("assemble_prompts", inputs, call,
                lambda pre, suf, p0, la, lb, pos: reference.assemble_prompts(pre, suf, p0, la, lb, scale, pos))


def apt_diffusion(g, device="cpu", lead=(5,), D=6, p=3, r=2) -> Case:
    t = _maker(g, device)
    inputs = (t(*lead, D), t(*lead, D), t(p, D), t(r, D), t(D, r, scale=0.3), t(scale=0.3))

    def call(backend):
        return lambda h, y, pr, w1, w2, s: lk.apt_diffusion(h, y, pr, w1, w2, s, backend=backend)

    return Case("apt_diffusion", inputs, call, reference.apt_diffusion)


MAKERS = {"gated_fusion": gated_fusion, "assemble_prompts": assemble_prompts, "apt_diffusion": apt_diffusion}


def like(g, tensors):
    """Random tensors shaped like `tensors` (tangents, cotangents), from generator g."""
    return tuple(torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) for x in tensors)


def close(got, want, what: str):
    got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"{what}[{i}]: None where the reference has a value"
        torch.testing.assert_close(a, b, **F64, msg=lambda m: f"{what}[{i}]: {m}")


# The paths. Each takes (case, backend, g) and asserts against the reference.

def reverse(case, backend, g):
    xs = [x.clone().requires_grad_() for x in case.inputs]
    rs = [x.clone().requires_grad_() for x in case.inputs]
    out, want = case.call(backend)(*xs), case.ref(*rs)
    close(out, want, f"{case.op}/{backend} output")
    cot = like(g, (want,))[0]
    close(torch.autograd.grad(out, xs, cot), torch.autograd.grad(want, rs, cot), f"{case.op}/{backend} reverse")


def dual_tensors(case, backend, g):
    tangents = like(g, case.inputs)
    with fwAD.dual_level():
        out = case.call(backend)(*(fwAD.make_dual(x, t) for x, t in zip(case.inputs, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
    want, want_tangent = jvp(case.ref, case.inputs, tangents)
    assert tangent is not None, f"{case.op}/{backend}: dual inputs gave an output without a tangent"
    close((primal, tangent), (want, want_tangent), f"{case.op}/{backend} forward_ad")


def func_jvp(case, backend, g):
    tangents = like(g, case.inputs)
    close(jvp(case.call(backend), case.inputs, tangents), jvp(case.ref, case.inputs, tangents),
          f"{case.op}/{backend} torch.func.jvp")


def _all(case):
    return tuple(range(len(case.inputs)))


def func_grad(case, backend, g):
    cot = like(g, (case.ref(*case.inputs),))[0]

    def loss(f):
        return lambda *xs: (f(*xs) * cot).sum()

    close(grad(loss(case.call(backend)), argnums=_all(case))(*case.inputs),
          grad(loss(case.ref), argnums=_all(case))(*case.inputs), f"{case.op}/{backend} torch.func.grad")


def func_vjp(case, backend, g):
    out, pullback = vjp(case.call(backend), *case.inputs)
    want, want_pullback = vjp(case.ref, *case.inputs)
    cot = like(g, (want,))[0]
    close((out,) + pullback(cot), (want,) + want_pullback(cot), f"{case.op}/{backend} torch.func.vjp")


def forward_jacobian(case, backend, g):
    """torch.autograd.functional.jacobian's forward-mode strategy: dual tensors under the legacy vmap."""
    def jacobian(f):
        return torch.autograd.functional.jacobian(f, case.inputs, vectorize=True, strategy="forward-mode")

    close(jacobian(case.call(backend)), jacobian(case.ref), f"{case.op}/{backend} forward-mode jacobian")


def func_jacrev(case, backend, g):
    close(jacrev(case.call(backend), argnums=_all(case))(*case.inputs),
          jacrev(case.ref, argnums=_all(case))(*case.inputs), f"{case.op}/{backend} torch.func.jacrev")


def func_jacfwd(case, backend, g):
    close(jacfwd(case.call(backend), argnums=_all(case))(*case.inputs),
          jacfwd(case.ref, argnums=_all(case))(*case.inputs), f"{case.op}/{backend} torch.func.jacfwd")


def func_vmap(case, backend, g, batch=3):
    """Every input batched, against the reference on each sample."""
    stacked = tuple(torch.stack([x] + list(like(g, [x] * (batch - 1)))) for x in case.inputs)
    got = vmap(case.call(backend))(*stacked)
    want = torch.stack([case.ref(*(x[i] for x in stacked)) for i in range(batch)])
    close(got, want, f"{case.op}/{backend} torch.func.vmap")


def per_sample_grads(case, backend, g, batch=2):
    """vmap(grad): the first input batched, the gradient of every input for each sample."""
    first = torch.stack([case.inputs[0]] + list(like(g, [case.inputs[0]] * (batch - 1))))
    in_dims = (0,) + (None,) * (len(case.inputs) - 1)

    def loss(f):
        return lambda *xs: f(*xs).square().sum()

    got = vmap(grad(loss(case.call(backend)), argnums=_all(case)), in_dims=in_dims)(first, *case.inputs[1:])
    want = vmap(grad(loss(case.ref), argnums=_all(case)), in_dims=in_dims)(first, *case.inputs[1:])
    close(got, want, f"{case.op}/{backend} vmap(grad)")


def vmap_then_backward(case, backend, g, batch=2):
    """vmap with the other inputs trainable outside it (issue 24's trainable weight), then a backward
    through the vmapped output."""
    first = torch.stack([case.inputs[0]] + list(like(g, [case.inputs[0]] * (batch - 1))))
    in_dims = (0,) + (None,) * (len(case.inputs) - 1)
    results = []
    for fn in (case.call(backend), case.ref):
        rest = [x.clone().requires_grad_() for x in case.inputs[1:]]
        out = vmap(fn, in_dims=in_dims)(first, *rest)
        results.append((out,) + torch.autograd.grad(out.square().sum(), rest))
    close(results[0], results[1], f"{case.op}/{backend} vmap with trainable inputs, then backward")


def dual_with_requires_grad(case, backend, g):
    """The first input dual, the others requiring grad: the tangent, and then the reverse gradients."""
    tangent = like(g, case.inputs[:1])[0]
    rest = [x.clone().requires_grad_() for x in case.inputs[1:]]
    with fwAD.dual_level():
        out = case.call(backend)(fwAD.make_dual(case.inputs[0], tangent), *rest)
        primal, got_tangent = fwAD.unpack_dual(out)
    want, want_tangent = jvp(lambda x: case.ref(x, *case.inputs[1:]), case.inputs[:1], (tangent,))
    assert got_tangent is not None, f"{case.op}/{backend}: dual + requires_grad gave no tangent"
    close((primal, got_tangent), (want, want_tangent), f"{case.op}/{backend} dual + requires_grad")
    ref_rest = [x.clone().requires_grad_() for x in case.inputs[1:]]
    cot = like(g, (want,))[0]
    close(torch.autograd.grad(primal, rest, cot),
          torch.autograd.grad(case.ref(case.inputs[0], *ref_rest), ref_rest, cot),
          f"{case.op}/{backend} reverse after dual")


PATHS = (reverse, dual_tensors, func_jvp, func_vjp, func_grad, func_jacrev, func_jacfwd, func_vmap,
         per_sample_grads, vmap_then_backward, dual_with_requires_grad, forward_jacobian)
