"""The static GPU gate, and the Triton launchers' shapes that no CPU run can see.

The gate compiles every Triton launch of the two Triton-backed ops for sm_80 and sm_90, in fp32, bf16 and
fp16, with the specialisation a real launch binds (tests/triton_compile.py): at the benchmark shapes (ViT-B/16
APT with p = 10, 50, 200; the benchmarks' vision and text taps for the gated fusion), at the pipeline's own
ViT-B/16 launches (the ladder's fusions at d = 192 with a scalar gate, ladder+apt's APT on the side blocks),
with the gated fusion's launches as the op makes them (mu formed in the forward kernel; the backward's rows,
finish, dW and the (1 - mu)-scaled fold cast to the gradient's dtype), and APT at every prompt width it
accepts (p up to 256, one p per padded width; bf16 and fp32). It fails on a register spill, on shared
memory over the per-block opt-in limit (227 KB sm_90, 163 KB sm_80), and on any bf16/fp16 dot that is not a
wgmma on sm_90 (counted per dot). fp64 is not compiled: on CUDA it runs the plain-PyTorch backend.
benchmarks/static_gate.py prints the same table.

The rest runs the kernels under the interpreter on the launch paths the GPU takes and small CPU shapes
do not: prompt groups (sm_80), p > 256 (the plain-PyTorch fallback), int64 row offsets, the fold of dW.
"""
import pytest
import torch
from tolerance import assert_within_rule

import ladder_kernels as lk
from ladder_kernels import reference

triton = pytest.importorskip("triton")
tc = pytest.importorskip("triton_compile")
from ladder_kernels.backends.triton._jit import rows64  # noqa: E402

# The interpreter on CPU tensors here (conftest sets TRITON_INTERPRET=1 without a GPU); the GPU otherwise.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def gate_rows(request):
    return request.param, tc.static_rows(archs=(request.param,))


def test_static_gate(gate_rows):
    arch, rows = gate_rows
    failed = [r for r in rows if r["problems"]]
    assert not failed, "static GPU gate:\n" + tc.markdown(failed)
    kernels = {(r["op"], r["kernel"]) for r in rows}
    assert kernels == {("apt_diffusion", "_fwd_kernel"), ("apt_diffusion", "_bwd_rows_kernel"),
                       ("gated_fusion", "_fwd_kernel"), ("gated_fusion", "_grad_rows_kernel"),
                       ("gated_fusion", "_finish_kernel"), ("gated_fusion", "_grad_weight_kernel"),
                       ("gated_fusion", "_fold_kernel")}
    shapes = {r["shape"] for r in rows}
    assert {s for s in shapes if s.startswith("pipeline")} >= {
        "pipeline vision M=32x197 D=768 d=192", "pipeline text M=100x77 D=512 d=192",
        "pipeline ladder+apt M=32x201 D=192 p=16 dropout=0"}
    # the fold the backward launches: (1 - mu) row scale and the cast to the gradient's dtype
    folds = {(r["dtype"], r["constexprs"].get("HAS_ROW_SCALE"), r["constexprs"].get("ONE_MINUS"))
             for r in rows if r["kernel"] == "_fold_kernel"}
    assert ("bfloat16", True, True) in folds and ("float32", False, False) in folds
    # the forward as the op launches it: mu from the gate logits (scalar and per channel)
    fwd = {(r["constexprs"].get("MU_GIVEN"), r["constexprs"].get("GATE_VEC"))
           for r in rows if r["op"] == "gated_fusion" and r["kernel"] == "_fwd_kernel"}
    assert {(False, False), (False, True), (True, False)} <= fwd
    # The launches were specialised as a GPU launch is: aligned pointers and 16-divisible sizes.
    assert all(r["divisible_args"] > 0 for r in rows)
    assert "| kernel | shape |" in tc.markdown(rows)


def test_static_gate_grids_fill_an_h100(gate_rows):
    """The vision-shape kernels make at least one full wave of 132 SMs (bf16: 64-row wgmma tiles of which
    each program owns 48 rows); APT at ViT-B/16 as well; d = 96 is one N block (X read once)."""
    arch, rows = gate_rows
    # (The pipeline's own shapes are not held to it: ladder+apt's side APT, M = 32 x 201 = 6432, makes
    # 101 programs of 64 rows, since rows_per_program rounds 6432 / 132 = 48.7 rows up to 64, and 48-row
    # programs would make 134, two more than one wave.)
    for r in rows:
        if r["dtype"] == "bfloat16" and r["kernel"] not in ("_fold_kernel", "_finish_kernel") and \
                not r["shape"].startswith("pipeline") and (
                r["op"] == "apt_diffusion" or r["shape"].startswith("vision")):
            assert r["grid"] >= tc.H100_SMS, r
    fwd = [r for r in rows if r["op"] == "gated_fusion" and r["kernel"] in ("_fwd_kernel", "_grad_weight_kernel")]
    assert all(r["constexprs"]["BLOCK_N"] == 128 for r in fwd if r["shape"].startswith("vision"))
    # the pipeline's d = 192: one 256-wide N block, so the tap is read once (two 128-wide ones read it twice)
    pipeline = [r for r in fwd if r["shape"].startswith("pipeline")]
    assert pipeline and all(r["constexprs"]["BLOCK_N"] == 256 and r["num_warps"] == 8 for r in pipeline)


def test_static_gate_every_prompt_width():
    """APT at every prompt width the Triton kernels take (p = 1 .. 256, one p per padded width, both sides
    of the 201..256 edge), bf16 and fp32, with dropout, on sm_90 and sm_80: no spills, shared memory in the
    limit, every half-precision dot on wgmma on sm_90."""
    rows = tc.static_rows(dtypes=tc.SWEEP_DTYPES, calls=tc.sweep_calls)
    failed = [r for r in rows if r["problems"]]
    assert not failed, "static GPU gate (prompt widths):\n" + tc.markdown(failed)
    widths = {r["shape"] for r in rows}
    assert len(widths) == len([p for p in tc.APT_P_SWEEP if p not in (10, 50, 200)]) and \
        "sweep M=6304 D=768 p=256 dropout=0.1" in widths and "sweep M=6304 D=768 p=1 dropout=0.1" in widths
    # every padded width 16 .. 256 is compiled (with the benchmark shapes' 10, 50, 200)
    chunks = _apt().prompt_chunks
    assert {sum(chunks(p)) for p in tc.APT_P_SWEEP + [10, 50, 200]} == set(range(16, 257, 16))


def test_apt_scratch_stores_are_vectors(gate_rows):
    """The backward's (M, p) scratch rows are padded to 16 elements and stored unmasked along prompts: its
    bf16 / fp16 stores are 128-bit vectors at every benchmark p (p = 200's rows were scalar 16-bit stores)."""
    arch, rows = gate_rows
    bwd = [r for r in rows if r["kernel"] == "_bwd_rows_kernel" and r["dtype"] in ("bfloat16", "float16")]
    assert bwd
    for r in bwd:
        assert "st.global.b16" not in r["stores"] and r["stores"].get("st.global.v4.b32", 0) > 0, r


def test_gate_limits_are_the_per_block_maxima():
    """cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on sm_90 and 163 KB on sm_80 (the SM's 228 / 164 KB
    less the 1 KB the system reserves per block)."""
    assert tc.SMEM_LIMIT == {90: 232448, 80: 166912}
    assert tc.problems(dict(spills=0, smem=232448, half_dots=0), torch.bfloat16, 90) == []
    assert tc.problems(dict(spills=0, smem=232449, half_dots=0), torch.bfloat16, 90) != []
    assert tc.problems(dict(spills=0, smem=166913, half_dots=0), torch.float32, 80) != []


def test_problems_are_reported():
    row = dict(spills=8, smem=300 * 1024, half_dots=3, wgmma_dots=2, half_dots_off_wgmma=1)
    found = tc.problems(row, torch.bfloat16, 90)
    assert len(found) == 3 and "spills 8 B" in found[0] and "1 of 3 bf16/fp16 dots not on wgmma" in found[2]
    # one wgmma somewhere is not enough: every half dot must be one
    assert tc.problems(dict(row, spills=0, smem=0, half_dots_off_wgmma=0, wgmma_dots=1), torch.float16, 90) == \
        ["2 of 3 bf16/fp16 dots not on wgmma"]
    assert tc.problems(dict(row, spills=0, smem=0), torch.bfloat16, 80) == []
    assert tc.problems(dict(row, spills=0, smem=0, half_dots=0), torch.float32, 90) == []


def test_dot_counts_read_the_ir():
    """The per-dot check's parser: half dots in the TTIR, warp-group dots and leftover half tt.dot in the TTGIR."""
    ttir = ("%a = tt.dot %x, %y, %c : tensor<64x64xbf16> * tensor<64x16xbf16> -> tensor<64x16xf32>\n"
            "%b = tt.dot %x, %y, %c, inputPrecision = ieee : tensor<32x16xf32> * tensor<16x32xf32> -> t\n"
            "%d = tt.dot %p, %q, %c : tensor<64x16xf16> * tensor<16x64xf16> -> tensor<64x64xf32>")
    ttgir = ("%a = ttng.warp_group_dot %x, %y, %c {isAsync = true} : !ttg.memdesc<64x64xbf16, #s> * !ttg.memdesc<>\n"
             "%w:2 = ttng.warp_group_dot_wait %a {pendings = 0 : i32} : tensor<64x16xf32, #mma>\n"
             "%d = tt.dot %p, %q, %c : tensor<64x16xf16, #ttg.dot_op<{opIdx = 0}>> * tensor<16x64xf16, #b> -> t")
    assert tc._dot_counts(ttir, ttgir) == {"dots_n": 3, "half_dots": 2, "wgmma_dots": 1, "half_dots_off_wgmma": 1}


# ---- launch paths under the interpreter --------------------------------------------------------------

def _apt():
    from ladder_kernels.backends.triton import apt_diffusion

    return apt_diffusion


def test_prompt_chunks():
    chunks = _apt().prompt_chunks
    assert chunks(10) == (16, 0, 0, 0) and chunks(50) == (64, 0, 0, 0) and chunks(200) == (128, 64, 16, 0)
    assert chunks(240) == (128, 64, 32, 16) and chunks(256) == (256, 0, 0, 0) and chunks(1) == (16, 0, 0, 0)
    assert _apt().prompt_groups(200, 80) == [(0, 128), (128, 200)] and _apt().prompt_groups(200, 90) == [(0, 200)]
    assert _apt().prompt_groups(120, 80) == [(0, 120)]


def _check_apt(backend, M, D, p, dtype=torch.float32, dropout=0.0):
    from test_apt_diffusion import check_against_reference, make

    check_against_reference(backend, *make(M, D, p, 3, dtype, DEV), dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_apt_prompt_groups_as_on_sm80(monkeypatch, dropout):
    """sm_80 runs the backward rows kernel over prompt groups of 128 (dH accumulated in place; the dropout
    stream and the scratch columns offset by the group's first prompt)."""
    monkeypatch.setattr(_apt(), "device_arch", lambda device: 80)
    _check_apt("triton", 37, 24, 200, dropout=dropout)


def test_apt_wide_prompts_fall_back_to_plain_pytorch():
    """p > 256 does not fit one program's registers: the plain-PyTorch primitives, same bits as backend="torch"."""
    from test_apt_diffusion import make

    inputs = make(21, 16, 300, 2, torch.float32, DEV)
    g = torch.randn(21, 16, device=DEV)
    got = []
    for backend in ("triton", "torch"):
        torch.manual_seed(5)
        out = lk.apt_diffusion(*inputs, dropout=0.2, backend=backend)
        got.append((out, *torch.autograd.grad(out, inputs, g)))
    for a, b in zip(*got):
        assert torch.equal(a, b)
    _check_apt("triton", 21, 16, 257)


def test_apt_three_chunks_dropout_deterministic():
    """p = 200 (chunks 128 + 64 + 16) with dropout against the reference, and two runs give the same bits."""
    from test_apt_diffusion import make

    _check_apt("triton", 70, 20, 200, dropout=0.25)
    inputs = make(70, 20, 200, 2, torch.float32, DEV)
    g = torch.randn(70, 20, device=DEV)

    def run():
        torch.manual_seed(1)
        return torch.autograd.grad(lk.apt_diffusion(*inputs, dropout=0.25, backend="triton"), inputs, g)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@triton.jit
def _offsets_kernel(out_ptr, wide_ptr, base, stride):
    rm = base + triton.language.arange(0, 16)
    triton.language.store(out_ptr + triton.language.arange(0, 16), rows64(rm, stride))
    triton.language.store(wide_ptr + triton.language.arange(0, 16), (rm * stride).to(triton.language.int64))


def test_row_offsets_are_64_bit():
    """Every kernel forms its row offsets through rows64 (both modules; checked in their source below): row
    3,000,000 of a 768-wide matrix is element 2.3e9 > 2^31. int32 arithmetic wraps there, rows64 does not."""
    import inspect

    from ladder_kernels.backends.triton import apt_diffusion, gated_fusion

    base, stride = 3_000_000, 768
    out, wide = torch.empty(16, dtype=torch.int64, device=DEV), torch.empty(16, dtype=torch.int64, device=DEV)
    _offsets_kernel[(1,)](out, wide, base, stride)
    want = (torch.arange(16, dtype=torch.int64, device=DEV) + base) * stride
    assert torch.equal(out, want) and want.max() > 2 ** 31
    assert not torch.equal(wide, want)  # the int32 product wraps: the test can tell the two apart
    for module in (apt_diffusion, gated_fusion):
        for name, fn in vars(module).items():
            if name.endswith("_kernel"):
                src = inspect.getsource(fn.fn)
                assert "rm[:, None] *" not in src and "rm[:, None]*" not in src, name


def _gated(M, N, K, dtype, **kw):
    from ladder_kernels.backends.torch import gated_fusion as torch_kernels
    from ladder_kernels.backends.triton import gated_fusion

    g, x = torch.randn(M, N, dtype=dtype, device=DEV), torch.randn(M, K, dtype=dtype, device=DEV)
    return gated_fusion.grad_weight(g, x, None, **kw), torch_kernels.grad_weight(g, x, None), g, x


@pytest.mark.parametrize("M", [1, 13, 301])
def test_gated_grad_weight_fold(M):
    """dW's row splits folded in order by the fold kernel, optionally with the (1 - mu) row scale and the
    cast: against float64, under the flash-attention rule, and the same bits twice."""
    one_minus_mu = torch.rand(5, device=DEV)
    got, plain, g, x = _gated(M, 5, 37, torch.bfloat16, row_scale=one_minus_mu, out_dtype=torch.bfloat16)
    truth = one_minus_mu.double()[:, None] * (g.double().t() @ x.double())
    assert got.dtype == torch.bfloat16 and got.shape == (5, 37)
    assert_within_rule("dW", got, (one_minus_mu[:, None] * plain).to(torch.bfloat16), truth, torch.bfloat16)
    from ladder_kernels.backends.triton import gated_fusion

    twice = gated_fusion.grad_weight(g, x, None, row_scale=one_minus_mu, out_dtype=torch.bfloat16)
    assert torch.equal(got, twice)
    plain_only, _, _, _ = _gated(M, 5, 37, torch.float32)
    assert plain_only.dtype == torch.float32


def test_gated_grid_owns_rows_per_program():
    """Small grids take the ROWS < BLOCK_M path on CPU too (4 programs under the interpreter): M = 130 makes
    48-row programs of a 64-row tile; the op still matches float64."""
    from ladder_kernels.backends.triton import gated_fusion

    tiles, _, _ = gated_fusion.forward_config(130, 7, 33, torch.bfloat16, 4)
    assert tiles["ROWS"] == 48 and tiles["BLOCK_M"] == 64
    side = torch.randn(130, 7, device=DEV, requires_grad=True)
    tap, weight = torch.randn(130, 33, device=DEV), torch.randn(7, 33, device=DEV, requires_grad=True)
    out = lk.gated_fusion(side, tap, weight, None, gate=0.3, backend="triton")
    truth = reference.gated_fusion(side.double(), tap.double(), weight.double(), None, 0.3, 0.1)
    plain = reference.gated_fusion(side, tap, weight, None, 0.3, 0.1)
    assert_within_rule("out", out, plain, truth, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 29, 5), (67, 97, 131), (2, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gated_op_launches_compile_at_odd_shapes(shape, dtype):
    """The gated fusion's launches as the op makes them (forward_gate with a scalar and a per-channel gate;
    rows + finish with a scalar gate; the (1 - mu)-scaled fold) compile for sm_90 at degenerate and odd
    shapes, as a GPU launch binds them (a size of 1 is a compile-time constant there; tests/
    test_triton_odd_launches.py covers the interface's launchers)."""
    M, D, d = shape
    acc = torch.float32
    side, tap, weight = tc.meta((M, d), dtype), tc.meta((M, D), dtype), tc.meta((d, D), dtype)
    vec, bias = tc.meta((d,), acc), tc.meta((d,), dtype)
    module = "ladder_kernels.backends.triton.gated_fusion"
    rows = []
    for gate in (tc.meta((1,), acc), vec):
        rows += tc.compile_launches(module, "forward_gate", [side, tap, weight, bias, gate, 0.1, True], 90)
    rows += tc.compile_launches(module, "grad_rows", [side, side, vec, True, 0.1, True, True], 90)
    rows += tc.compile_launches(module, "grad_weight", [side, tap, None, vec, dtype, True], 90)
    kernels = [r["kernel"] for r in rows]
    assert kernels.count("_fwd_kernel") == 2 and "_finish_kernel" in kernels and "_fold_kernel" in kernels
    assert all(r["regs"] > 0 for r in rows)
    # The streaming kernels stay spill-free at any shape. (The GEMMs' generic binaries at widths that are not
    # multiples of 16, e.g. D = 97, do spill: the bf16 forward 144 B with mu given, 248 B forming mu; those
    # widths are not the ladder's, whose shapes the gate holds to no spills.)
    assert all(r["spills"] == 0 for r in rows if r["kernel"] in ("_grad_rows_kernel", "_finish_kernel",
                                                                 "_fold_kernel"))
