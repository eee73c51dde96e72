"""How an op's pieces become one autograd op, registered once and called two ways.

Each op supplies its forward body, `setup_context` (what is kept for backward) and `backward`. They are
registered as the torch.library custom op `ladder_kernels::<op>_core` (fake kernel, opcheck,
torch.compile(fullgraph=True)); in eager mode the same three run as a torch.autograd.Function instead,
because a custom op's Python dispatch costs about twice the whole eager reference on small tensors,
while an autograd.Function costs a few microseconds. Both paths run the very same code, so the memory
contract and the gradients cannot differ. With no gradient needed, the forward body runs alone.

Forward-mode AD and torch.func transforms take a third way: the op's composite, its maths in plain
differentiable PyTorch, which autograd differentiates in every mode and functorch batches. Neither of
the others can serve them: the kernels see no tangents and no batch dimension (a dual input would get
no tangent, or a zero one under torch.func.jvp), and the eager Function has no jvp and no
setup_context. See docs/design.md, "Differentiation paths".
"""
import torch
from torch._C import _functions
from torch.autograd import forward_ad

_transforms_active = torch._C._are_functorch_transforms_active
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def needs_composite(args) -> bool:
    """True when a torch.func transform is active or an argument carries a forward-mode tangent. One C
    call and an attribute read on the ordinary path; the per-tensor look happens only inside a dual level."""
    if _transforms_active():
        return True
    if forward_ad._current_level < 0:
        return False
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def register(qualname: str, forward, setup_context, backward, composite):
    """(custom op, apply): apply(needs_grad, *args) runs the op the cheapest correct way and returns its
    first output (the others exist for backward only). composite(*args) is that first output in plain
    differentiable PyTorch, run under forward-mode AD and torch.func transforms."""
    name = qualname.split("::")[-1].removesuffix("_core")
    op = torch.library.custom_op(qualname, forward, mutates_args=())
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        # forward(ctx, ...) rather than the setup_context style: that style binds the arguments with
        # inspect.signature on every call, which alone costs more than a small eager reference. Only the
        # op's first output leaves the Function: the others (kept for backward, never differentiated)
        # stay on ctx, so autograd wraps one tensor, not four.
        @staticmethod
        def forward(ctx, *args):
            output = forward(*args)
            ctx.eager = True  # backward calls the backward body directly (no custom op)
            setup_context(ctx, args, output)
            if isinstance(output, tuple):
                ctx.extra_outputs = len(output) - 1
                return output[0]
            ctx.extra_outputs = 0
            return output

        @staticmethod
        def backward(ctx, grad):
            if grad is not None and _legacy_batched(grad):  # None: an unused output, grads not materialised
                raise batched_backward_error(name, ctx.backend)
            return backward(ctx, grad, *([None] * ctx.extra_outputs))

    def apply(needs_grad: bool, *args):
        """The op's first output."""
        # First, also while torch.compile traces: in a compiled torch.func.jvp the custom op (no jvp)
        # gave a zero tangent, and a compiled torch.func.grad failed in its fake kernel.
        if needs_composite(args):
            return composite(*args)
        if torch.compiler.is_compiling():
            output = op(*args)
        elif needs_grad:
            return Eager.apply(*args)
        else:
            output = forward(*args)
        return output[0] if isinstance(output, tuple) else output

    return op, apply


def batched_backward_error(op: str, backend: str) -> RuntimeError:
    """A backward with a batch of cotangents (the legacy vmap of is_grads_batched) reaches kernels that
    know no batch dimension: some backends failed inside torch, others looped per sample. Refused on
    every backend alike, naming what works."""
    return RuntimeError(
        f"{op}: batched gradients (torch.autograd.grad(..., is_grads_batched=True), "
        f"torch.autograd.functional.jacobian/hessian(..., vectorize=True)) are not supported through the "
        f"kernels of backend {backend!r}; torch.func.jacrev or torch.func.vmap over torch.func.vjp run the "
        f"op's plain-PyTorch composite instead, and vectorize=False works")


def eager(ctx) -> bool:
    """True in the eager path's backward: the backward body is called directly."""
    return getattr(ctx, "eager", False)


def once_differentiable(op: str, backend: str, compute) -> tuple:
    """compute() -> the input gradients. Under create_graph=True they are made the end of the graph: a
    second backward through them raises an error naming the op, the backend and what works instead
    (none of the kernels has a double backward) rather than torch's generic one, and the first backward
    builds no graph."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return compute()
    with torch.no_grad():
        grads = compute()
    live = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not live:
        return grads
    message = (f"{op}: double backward (create_graph=True through this op) is not supported on backend "
               f"{backend!r}; torch.func (grad of grad, jacfwd(jacrev(f)), hessian) and forward-mode AD "
               f"(torch.func.jvp, dual tensors) differentiate the op's plain-PyTorch composite instead")
    err = _functions.DelayedError(message, len(live))
    wrapped = err(*(grads[i].detach().requires_grad_() for i in live))
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, g in zip(live, wrapped):
        out[i] = g
    return tuple(out)
