"""Fuzzing the three ops' argument handling (hypothesis): any shapes, dtypes, strides and numbers give
either the reference's answer or a ValueError / TypeError that names an argument; never another
exception, a crash or a wrong answer. On every CPU backend (Triton is covered by its own tests)."""
import pytest
import torch
from helpers import backend_or_skip

import ladder_kernels as lk
from ladder_kernels import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# Mostly valid draws (so that the answer is checked often), with every kind of bad one mixed in.
DTYPES = st.sampled_from([torch.float32] * 4 + [torch.float64, torch.bfloat16, torch.int64, None])
NUMBERS = st.one_of(st.floats(0.05, 3.0), st.floats(0.05, 3.0), st.floats(allow_nan=True, allow_infinity=True,
                    width=32), st.integers(-3, 3), st.sampled_from(["0.5", None, True, [1.0]]))
SIZES = st.integers(0, 6)
OFF = st.sampled_from([0] * 6 + [1, -1])  # how far a size is from the one that fits


def _tensor(shape, dtype, strided):
    if dtype is None:
        return shape  # not a tensor at all
    g = torch.Generator().manual_seed(sum(shape) * 31 + len(shape))  # the same values when hypothesis replays
    t = torch.randn(*shape, 2, generator=g) if strided else torch.randn(*shape, generator=g)
    t = t[..., 0] if strided else t  # a non-contiguous view of the same shape
    return t.to(dtype)


CHECKED = {"answers": 0, "errors": 0}


def _outcome(fn, ref):
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        assert "'" in str(exc), f"error names no argument: {exc}"
        CHECKED["errors"] += 1
        return
    CHECKED["answers"] += 1
    want = ref()
    # bf16 rounds each input and product to 8 bits: judged against the answer's own scale
    tol = {torch.bfloat16: 5e-2}.get(out.dtype, 1e-4)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@SETTINGS
@given(m=SIZES, big_d=SIZES, d=SIZES, d_side=OFF, dtypes=st.tuples(DTYPES, DTYPES, DTYPES),
       strided=st.booleans(), bias=st.booleans(), gate=NUMBERS, temperature=NUMBERS)
def test_gated_fusion_arguments(backend, m, big_d, d, d_side, dtypes, strided, bias, gate, temperature):
    backend_or_skip("gated_fusion", backend, "cpu")
    side = _tensor((m, max(0, d + d_side)), dtypes[0], strided)
    tap = _tensor((m, big_d), dtypes[1], strided)
    weight = _tensor((d, big_d), dtypes[2], False)
    b = _tensor((d,), dtypes[0], False) if bias else None
    _outcome(lambda: lk.gated_fusion(side, tap, weight, b, gate=gate, temperature=temperature, backend=backend),
             lambda: reference.gated_fusion(side.double(), tap.double(), weight.double(),
                                            None if b is None else b.double(), gate, temperature))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@SETTINGS
@given(m=SIZES, big_d=SIZES, p=SIZES, r=SIZES, dtypes=st.tuples(DTYPES, DTYPES), strided=st.booleans(),
       log_scale=NUMBERS, dropout=st.one_of(st.just(0.0), NUMBERS), off=OFF)
def test_apt_diffusion_arguments(backend, m, big_d, p, r, dtypes, strided, log_scale, dropout, off):
    backend_or_skip("apt_diffusion", backend, "cpu")
    h = _tensor((m, max(0, big_d + off)), dtypes[0], strided)
    y = _tensor((m, big_d), dtypes[1], strided)
    prompts = _tensor((p, big_d), dtypes[0], False)
    w1, w2 = _tensor((r, big_d), dtypes[0], False), _tensor((big_d, r), dtypes[0], False)
    if isinstance(dropout, float) and 0 < dropout < 1:
        dropout = 0.0  # the mask makes the reference another function; its replay is tested elsewhere
    _outcome(lambda: lk.apt_diffusion(h, y, prompts, w1, w2, log_scale, dropout=dropout, backend=backend),
             lambda: reference.apt_diffusion(h.double(), y.double(), prompts.double(), w1.double(),
                                             w2.double(), float(log_scale)))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@SETTINGS
@given(c=SIZES, a=SIZES, s=SIZES, n=SIZES, big_d=SIZES, r=SIZES, dtypes=st.tuples(DTYPES, DTYPES),
       strided=st.booleans(), lowrank=st.booleans(), scale=NUMBERS, dropout=st.one_of(st.just(0.0), NUMBERS),
       off=OFF)
def test_assemble_prompts_arguments(backend, c, a, s, n, big_d, r, dtypes, strided, lowrank, scale, dropout, off):
    backend_or_skip("assemble_prompts", backend, "cpu")
    prefix = _tensor((c, a, max(0, big_d + off)), dtypes[0], strided)
    suffix = _tensor((c, s, big_d), dtypes[1], strided)
    base = _tensor((n, big_d), dtypes[0], False)
    la, lb = (_tensor((n, r), dtypes[0], False), _tensor((r, big_d), dtypes[0], False)) if lowrank else (None, None)
    if isinstance(dropout, float) and 0 < dropout < 1:
        dropout = 0.0  # the mask's replay is tested elsewhere
    _outcome(lambda: lk.assemble_prompts(prefix, suffix, base, la, lb, scale=scale, dropout=dropout,
                                         backend=backend),
             lambda: reference.assemble_prompts(prefix.double(), suffix.double(), base.double(),
                                                None if la is None else la.double(),
                                                None if lb is None else lb.double(), float(scale)))


def test_fuzzing_checked_answers_and_errors_alike():
    """The draws above are not all rejected up front: both outcomes were exercised (runs after them)."""
    if CHECKED["answers"] + CHECKED["errors"] == 0:
        pytest.skip("run with the fuzz tests above")
    assert CHECKED["answers"] >= 20 and CHECKED["errors"] >= 20, CHECKED
