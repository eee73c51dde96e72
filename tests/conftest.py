"""Fixtures shared by every test group (kernels/, pipeline/, benchmarks/; helpers.py holds the shared
functions). Without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU tensors,
which must be switched on before any kernel module is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ladder_kernels as lk  # noqa: E402  (after TRITON_INTERPRET is decided)
from helpers import backend_or_skip, one_thread  # noqa: E402,F401  (tests may import them from here too)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


# LADDER_TESTS_GPU_QUICK=1 (benchmarks/gpu_check.sh): on a lent GPU with minutes to spare, only these tests
# run, on CUDA tensors and with backends that launch GPU code. Together they launch every kernel in every
# dtype (the reference checks), the backward and dropout paths, the memory contract, opcheck and one
# compiled graph per op; the odd shapes (each a cold Triton compile) on the GPU kernels only.
GPU_QUICK = ("test_matches_reference", "test_backward_is_deterministic", "test_memory_contract",
             "test_dropout_forward_and_backward", "test_dropout_mask_same_in_forward_and_backward",
             "test_dropout_mask_same_in_every_backend_and_seeded", "test_dropout_mask_identical_across_backends",
             "test_non_contiguous_inputs", "test_opcheck", "test_compile_fullgraph", "test_gradcheck_float64",
             "test_cuda_graph", "test_odd_shapes")
_GPU_BACKENDS = ("triton", "cuda", "torch")


def _gpu_quick(item) -> bool:
    name = getattr(item, "originalname", item.name)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if not any(name.startswith(q) for q in GPU_QUICK):
        return False
    if params.get("device", "cuda" if name.startswith("test_cuda_graph") else None) != "cuda":
        return False  # (the CUDA-graph tests are CUDA-only and take no device parameter)
    backend = params.get("backend")
    if name.startswith(("test_opcheck", "test_compile_fullgraph", "test_gradcheck", "test_odd_shapes")):
        return backend in ("triton", "cuda")  # the slow ones once per op, on its GPU kernel
    return backend is None or backend in _GPU_BACKENDS


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LADDER_TESTS_GPU_QUICK") != "1":
        return
    keep = [i for i in items if _gpu_quick(i)]
    config.hook.pytest_deselected(items=[i for i in items if not _gpu_quick(i)])
    items[:] = keep


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lk_module():
    return lk
