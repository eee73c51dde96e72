"""Issue 25 items 8 and 12 (ops): the gate's sigmoid and gradient stay finite-or-infinite, never NaN, for
every accepted temperature; sparse inputs are refused with the package's TypeError; the torch backend's
APT gradients have the same bits on 1 and 2 threads."""
import pytest
import torch
from helpers import backend_or_skip, one_thread

import ladder_kernels as lk
from ladder_kernels import reference


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 2e-38])
@pytest.mark.parametrize("gate_shape", [(1,), (4,)])
def test_tiny_temperature_gate_zero(backend, temperature, gate_shape):
    backend_or_skip("gated_fusion", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    side, tap, weight = torch.randn(3, 4, generator=g), torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    gate = torch.zeros(gate_shape, requires_grad=True)
    out = lk.gated_fusion(side, tap, weight, None, gate, temperature=temperature, backend=backend)
    want = 0.5 * side + 0.5 * (tap @ weight.t())  # mu = sigmoid(0) = 1/2 for any T > 0
    torch.testing.assert_close(out, want)
    out.backward(torch.ones_like(out))
    assert not gate.grad.isnan().any(), gate.grad
    # the true derivative, mu (1 - mu) / T times sum G (s - Z), overflows float32: +-inf by its sign
    per_channel = (side - tap @ weight.t()).sum(0).double()
    want = (per_channel.sum().reshape(1) if gate_shape == (1,) else per_channel).sign()
    assert torch.equal(gate.grad.sign().double(), want), (gate.grad, want)
    assert gate.grad.isinf().all() or temperature > 1e-39


def test_the_reference_gives_one_half_too():
    side, tap, weight = torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3)
    out = reference.gated_fusion(side, tap, weight, None, 0.0, 1e-40)
    torch.testing.assert_close(out, 0.5 * side + 0.5 * tap @ weight.t())


def _sparse_calls():
    s, x, w = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    yield "side", lambda: lk.gated_fusion(s.to_sparse(), x, w)
    yield "tap", lambda: lk.gated_fusion(s, x.to_sparse(), w)
    yield "weight", lambda: lk.gated_fusion(s, x, w.to_sparse_csr())
    h, y, p = torch.randn(6, 8), torch.randn(6, 8), torch.randn(3, 8)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    yield "hidden", lambda: lk.apt_diffusion(h.to_sparse(), y, p, w1, w2, 0.0)
    yield "prompts", lambda: lk.apt_diffusion(h, y, p.to_sparse(), w1, w2, 0.0)
    pre, suf, base = torch.randn(2, 1, 8), torch.randn(2, 4, 8), torch.randn(3, 8)
    yield "base", lambda: lk.assemble_prompts(pre, suf, base.to_sparse())
    yield "prefix", lambda: lk.assemble_prompts(pre.to_sparse(), suf, base)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
@pytest.mark.parametrize("name,call", list(_sparse_calls()), ids=[n for n, _ in _sparse_calls()])
def test_sparse_inputs_are_a_type_error(name, call):
    with pytest.raises(TypeError, match=f"argument '{name}' must be a dense"):
        call()


def test_torch_backend_apt_gradients_do_not_depend_on_the_thread_count():
    if torch.get_num_threads() < 2 and torch.get_num_interop_threads() < 1:
        pytest.skip("one thread only")

    def run(threads, M):
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(M, 64, generator=g), torch.randn(M, 64, generator=g), torch.randn(40, 64, generator=g),
                  0.1 * torch.randn(4, 64, generator=g), 0.1 * torch.randn(64, 4, generator=g), torch.zeros(1)]
        inputs = [t.requires_grad_() for t in inputs]
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(1)
            out = lk.apt_diffusion(*inputs, dropout=0.2, backend="torch")
            return [out] + list(torch.autograd.grad(out, inputs, torch.randn(M, 64, generator=g)))
        finally:
            torch.set_num_threads(old)

    for M in (600, 4500):  # one chunk and two
        with one_thread():
            single = run(1, M)
        for a, b in zip(single, run(2, M)):
            assert torch.equal(a, b)
