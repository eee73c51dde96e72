"""assemble_prompts' dropout seed is a one-element int64 tensor on the inputs' device (as APT's is): a CUDA
graph that captures the op replays the seed's draw too, so every replay drops a new mask. The CPU tests
check that the tensor seed gives the mask the int seed gave (the stream every backend shares)."""
import pytest
import torch

import ladder_kernels as lk
from ladder_kernels import _dropout
from ladder_kernels.ops import assemble_prompts as ap_module

from helpers import backend_or_skip

OP = "assemble_prompts"


def test_tensor_seed_gives_the_int_seeds_mask():
    """flat_keep(shape, tensor seed) == flat_keep(shape, int seed), for seeds across the int64 draw's range
    (the op draws in [0, 2^31 - 1)), and a wrong seed gives another mask (the test can tell them apart)."""
    for value in (0, 1, 12345, 2 ** 31 - 2):
        want = _dropout.flat_keep((3, 4, 40), value, 0.3)
        got = _dropout.flat_keep((3, 4, 40), torch.tensor([value], dtype=torch.int64), 0.3)
        assert torch.equal(got, want), value
    assert not torch.equal(_dropout.flat_keep((3, 4, 40), torch.tensor([7]), 0.3),
                           _dropout.flat_keep((3, 4, 40), 8, 0.3))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_masks_as_before(backend):
    """On a CPU tensor the op draws its seed from the CPU generator exactly as before the seed moved to the
    inputs' device (the same call on the same generator): the same mask as the int seed's, forward and
    backward (dA from the regenerated mask), and the seed the op saves is that CPU tensor."""
    backend_or_skip(OP, backend, "cpu")
    C, n, D, r, p = 3, 4, 32, 2, 0.4
    zeros = torch.zeros(C, 1, D), torch.zeros(C, 2, D), torch.zeros(n, D)
    a = (torch.rand(C, n, r) + 0.5).requires_grad_()
    b = torch.rand(r, D) + 0.5
    torch.manual_seed(11)
    want_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # the pre-issue-23 draw: CPU, int64
    torch.manual_seed(11)
    with lk.SavedTensors(keep=True) as saved:
        out = lk.assemble_prompts(*zeros, a, b, 1.0, None, p, backend=backend)
    seeds = [t for t in saved.tensors if t is not None and t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].device.type == "cpu" and int(seeds[0]) == want_seed
    keep = ap_module.dropout_keep((C, n, D), want_seed, p)
    assert torch.equal(out[:, 1:1 + n] != 0, keep)
    g = torch.randn_like(out)
    (da,) = torch.autograd.grad(out, (a,), g)
    dq = g[:, 1:1 + n].double() * keep.double() / (1 - p)
    torch.testing.assert_close(da.double(), dq @ b.double().t(), rtol=1e-5, atol=1e-6)


def _replay_masks(backend, replays=3):
    """E's dropout mask (its zeros: A B > 0) after each replay of a CUDA graph that captured one call."""
    C, n, D = 4, 3, 64
    dev = "cuda"
    zeros = (torch.zeros(C, 1, D, device=dev), torch.zeros(C, 2, D, device=dev), torch.zeros(n, D, device=dev))
    a, b = torch.rand(n, 1, device=dev) + 0.5, torch.rand(1, D, device=dev) + 0.5

    def call():
        return lk.assemble_prompts(*zeros, a, b, 1.0, None, 0.5, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (first-use allocations, dispatch caches)
        call()
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    masks = []
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        masks.append((out[:, 1:1 + n] != 0).clone())
    return masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to capture a CUDA graph")
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cuda_graph_replays_draw_new_masks(backend):
    """Captured once, replayed three times: three different masks, each dropping about half of A B (the
    seed's draw is in the graph; a CPU seed read at capture replayed one mask forever)."""
    backend_or_skip(OP, backend, "cuda")
    masks = _replay_masks(backend)
    for m in masks:
        assert 0.35 < m.float().mean().item() < 0.65
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
