"""The pipeline's own calls through the Triton kernels: a few training steps of the tiny model's ladder and
ladder+apt with the Triton backend (under the interpreter on CPU tensors: every launch as the pipeline
makes it, with its shapes, strides, scalar gates and autocast-free fp32) against the same steps on the C++
backend. The kernel tests check each op at shapes of their own choosing; this checks the pipeline's.

The ops that have Triton kernels (gated_fusion, apt_diffusion) take them; assemble_prompts, which has none,
keeps its C++ kernel: the automatic order for CPU tensors is set to (triton, cpu, torch) for the run."""
import pytest
import torch
from torch.nn import functional as F

from ladder_kernels import _dispatch

from helpers import backend_or_skip

NAMES = ["red circle", "blue square", "green triangle"]
SMALL = {"ladder+apt": {"apt_prompts": 5}}
STEPS = 3


def _train(name, order, monkeypatch):
    """(losses, trained parameters by name, Triton kernels launched) of STEPS AdamW steps on one batch."""
    from ladder_clip import build_method, load_backbone

    folders = _dispatch._backends  # the backends package (lk.backends is the status function)
    real_order = folders.auto_order
    monkeypatch.setattr(folders, "auto_order", lambda device_type: order if device_type == "cpu"
                        else real_order(device_type))
    monkeypatch.setattr(_dispatch, "_CHOSEN", {})
    launched = []
    if order[0] == "triton":
        import triton.runtime.interpreter as interp

        run = interp.InterpretedFunction.run

        def counted(fn, *args, **kwargs):
            launched.append(fn.fn.__name__)
            return run(fn, *args, **kwargs)

        monkeypatch.setattr(interp.InterpretedFunction, "run", counted)
    torch.manual_seed(0)
    method = build_method(name, load_backbone("tiny"), NAMES, **SMALL.get(name, {}))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    # SGD, not Adam: Adam turns a gradient that is rounding noise (k_proj's bias: softmax ignores it) into a
    # full lr-sized step of either sign, which no backend comparison survives; SGD keeps noise noise-sized.
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = F.cross_entropy(method(x), y)
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    return losses, first_grads, params, launched


@pytest.mark.parametrize("name", ["ladder", "ladder+apt"])
def test_pipeline_on_triton_matches_cpp(name, monkeypatch):
    backend_or_skip("gated_fusion", "triton", "cpu")
    backend_or_skip("gated_fusion", "cpu", "cpu")
    if torch.cuda.is_available():
        pytest.skip("runs the Triton kernels through the interpreter on CPU tensors")
    want_losses, want_grads, want, none = _train(name, ("cpu", "torch"), monkeypatch)
    got_losses, got_grads, got, launched = _train(name, ("triton", "cpu", "torch"), monkeypatch)
    assert none == []
    # The pipeline's training path launched the fused kernels: forward with mu formed inside, the backward's
    # rows, finish, dW GEMM and fold (trainable fusion weights), and APT's two kernels for ladder+apt.
    kernels = set(launched)
    assert {"_fwd_kernel", "_grad_rows_kernel", "_finish_kernel", "_grad_weight_kernel", "_fold_kernel"} <= kernels
    if name == "ladder+apt":
        assert "_bwd_rows_kernel" in kernels
    assert len(want_losses) == STEPS and want_losses[-1] < want_losses[0]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-4, atol=1e-6)
    # fp32 everywhere: the first step's gradients within 1e-4 of the gradient's own scale, then the weights
    # after STEPS steps
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for n, w in want_grads.items():
        torch.testing.assert_close(got_grads[n], w, rtol=1e-4, atol=1e-4 * float(w.abs().max()) + 1e-9,
                                   msg=lambda m: f"d {n}: {m}")
    assert got.keys() == want.keys() and len(got) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
