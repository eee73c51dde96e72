"""Drawn inputs (odd shapes, float64) through every differentiation path the package claims, on every
backend of the dispatch table, against lk.reference: a backend or op that gives a None or zero tangent,
or breaks under a torch.func transform, fails here (docs/design.md, "Differentiation paths").
Shapes stay tiny: Triton runs under its interpreter on a CPU."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autograd_cases as cases
from helpers import backend_or_skip

dims = st.integers(1, 4)
leads = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)


@st.composite
def gated_fusion_args(draw):
    return dict(lead=draw(leads), D=draw(dims), d=draw(dims), scalar_gate=draw(st.booleans()),
                temperature=draw(st.floats(0.2, 3.0)))


@st.composite
def assemble_prompts_args(draw):
    return dict(C=draw(dims), a=draw(st.integers(0, 2)), n=draw(dims), s=draw(st.integers(0, 3)), D=draw(dims),
                r=draw(st.integers(1, 3)), per_class_a=draw(st.booleans()), per_class_base=draw(st.booleans()),
                scale=draw(st.floats(-2.0, 2.0)))


@st.composite
def apt_diffusion_args(draw):
    return dict(lead=draw(leads), D=draw(dims), p=draw(dims), r=draw(st.integers(1, 3)))


STRATEGIES = {"gated_fusion": gated_fusion_args, "assemble_prompts": assemble_prompts_args,
              "apt_diffusion": apt_diffusion_args}


def test_every_op_has_a_strategy():
    assert set(STRATEGIES) == {op for op, _ in cases.OP_BACKENDS} == set(cases.MAKERS)


@pytest.mark.parametrize("op,backend", cases.OP_BACKENDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=st.integers(0, 2 ** 31 - 1))
def test_every_path_matches_the_reference(op, backend, data, seed):
    backend_or_skip(op, backend, "cpu")
    g = torch.Generator().manual_seed(seed)
    case = cases.MAKERS[op](g, **data.draw(STRATEGIES[op]()))
    for path in cases.PATHS:
        path(case, backend, g)
