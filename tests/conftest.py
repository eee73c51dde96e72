"""Shared fixtures. Without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU tensors,
which must be switched on before any kernel module is imported."""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ladder_kernels as lk  # noqa: E402  (after TRITON_INTERPRET is decided)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def backend_or_skip(op: str, backend: str, device: str) -> str:
    """`backend` if it can run `op` on `device` here; a skip naming the reason otherwise. CI lists the
    backends it must have in LADDER_KERNELS_EXPECT_BACKENDS and test_backends_expected fails if one is
    missing, so these skips cannot hide a broken build."""
    from ladder_kernels import _dispatch

    reason = _dispatch.why_not(op, backend, torch.device(device).type)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} on {device}: {reason}")
    return backend


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: the C++ kernels' bits must not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lk_module():
    return lk
