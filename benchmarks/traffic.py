"""The traffic model: for each kernel launch of an op at the benchmark shapes (the Triton kernels and the
torch / cuBLAS kernels around them), the bytes it must move to and from HBM, the bytes its programs re-read
from L2, and the flops it must do, and so its floor time on an H100 and an H200.

    floor(kernel) = max(HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, flops / rate, KERNEL_MIN)
    floor(op call) = sum of its launches' floors (they run one after another on one stream)
    host floor(op call) = launches x LAUNCH_HOST (the host-bound path: each launch's Python and launcher)

Numbers used (vendor peak figures, SXM parts): H100 SXM 3.35 TB/s HBM3, H200 4.8 TB/s HBM3e, both 989
TFLOP/s dense bf16/fp16 (fp32 without TF32 is not a tensor-core rate: its flops are counted at 67 TFLOP/s,
the H100/H200 FP32 CUDA-core peak). Assumptions, not vendor figures: L2 to SM bandwidth 7 TB/s on both
(the same GH100 die; microbenchmarks of an H100 PCIe read about 5.5 TB/s, scaled to the SXM clocks);
KERNEL_MIN = 2 us, the launch-to-launch time of dependent kernels on one stream (a kernel that moves a few
KB still costs it); LAUNCH_HOST = 4 us, the host's cost per launch on the eager path (Python dispatch plus
the Triton / torch launcher: 3-5 us measured per launch, benchmarks/bench_host_cost.py).

Bytes: every (M, .) tensor a launch reads or writes crosses HBM once; the (p, D), (d, D) operands (prompts,
Kt, W) cross HBM once per launch (they stay in L2), but every program reads them from L2: those re-reads
are the L2 bytes (APT at p = 200: 2.7x the forward's HBM bytes, 4x the backward rows kernel's), as are the
dW GEMM's re-reads of G, once per D tile. Accumulators and the (M, p) scratch of the APT backward are
counted in their own dtype. The model is what the kernels *as designed* must move; `ideal` also gives the
op's lower bound for any implementation (APT backward: read H, G, out and write dH, dY, nothing of size
(M, p); gated fusion: two reads of X, for the forward's GEMM and for dW, plus the (M, d) traffic).

The non-Triton launches are the ones tests/kernels/test_triton_launches.py counts under the interpreter (that
test checks the counts here against them): APT forms Kt = P + (P W1^T) W2^T in torch (2 GEMMs and an add)
and its backward sums ds's partials, runs dKt and dP on cuBLAS and back-propagates Kt's low-rank chain
(4 GEMMs, 2 adds); the gated fusion has none in the ladder's training case (mu, db, dalpha and the (1 - mu)
scale are inside its Triton kernels).

    python -m benchmarks.traffic [OUT.md]     # the table at the benchmark shapes

The GPU benchmarks call `over_floor(...)` to report measured / floor beside their timings.
"""
import sys
from typing import Dict, List, NamedTuple

GPUS = {"H100": dict(bw=3.35e12, tc=989e12, fp32=67e12, l2=7e12),
        "H200": dict(bw=4.8e12, tc=989e12, fp32=67e12, l2=7e12)}
SMS = 132
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KERNEL_MIN = 2e-6   # s: launch-to-launch of dependent kernels on one stream (assumption, module docstring)
LAUNCH_HOST = 4e-6  # s: the host's cost of one launch on the eager path (assumption, module docstring)

# The benchmark shapes (benchmarks/bench_apt_diffusion.py, bench_gated_fusion.py).
APT_CASES = {f"vit_b16 B=32 N=197 D=768 p={p}": (32 * 197, 768, p) for p in (10, 50, 200)}
APT_CASES["meter B=8 N=1024 D=768 p=200"] = (8 * 1024, 768, 200)
GATED_CASES = {"vit_b16 M=32x197 D=768 d=96": (32 * 197, 768, 96), "text M=1000x77 D=512 d=64": (1000 * 77, 512, 64)}


class Launch(NamedTuple):
    kernel: str
    bytes: float
    flops: float
    l2_bytes: float = 0.0  # re-reads from L2 beyond the HBM bytes (operands every program reads)
    kind: str = "triton"   # "triton", "torch" (an elementwise / reduction kernel) or "cublas"

    def roofline(self, gpu: str, dtype: str) -> float:
        g = GPUS[gpu]
        rate = g["tc"] if dtype in ("bfloat16", "float16") else g["fp32"]
        return max(self.bytes / g["bw"], self.l2_bytes / g["l2"], self.flops / rate)

    def floor(self, gpu: str, dtype: str) -> float:
        return max(self.roofline(gpu, dtype), KERNEL_MIN)


def _programs(M: int, block_m: int) -> int:
    """Programs of a rows launch: the launchers' rule (backends/triton/_launch.rows_per_program) for 132 SMs:
    whole BLOCK_M tiles when they make a wave, else rows in multiples of 16 so that the grid makes one."""
    want = -(-(-(-max(M, 1) // SMS)) // 16) * 16
    rows = max(16, min(block_m, want))
    return -(-M // rows)


def apt(M: int, D: int, p: int, dtype: str, mode: str, rank: int = 4, dropout: float = 0.0) -> List[Launch]:
    """APT's launches (the mask is a hash, no traffic; dropout adds the seed's draw): forward = Kt's low-rank
    chain in torch and one kernel; backward (H, Y, P, W1, W2, s all trainable) = the rows kernel, the sum
    of ds's partials, the two cuBLAS GEMMs dKt = dS^T H, dP = (ew A)^T G and Kt's chain back-propagated."""
    e, acc, r = BYTES[dtype], 4, rank
    block_m = 64 if dtype in ("bfloat16", "float16") else 32
    progs = _programs(M, block_m)
    kt = [Launch("apt Kt: P W1^T", e * (p * D + r * D + p * r), 2.0 * p * D * r, kind="cublas"),
          Launch("apt Kt: (P W1^T) W2^T", e * (p * r + D * r + p * D), 2.0 * p * D * r, kind="cublas"),
          Launch("apt Kt: P + ..", e * 3 * p * D, float(p * D), kind="torch")]
    seed = [Launch("apt dropout seed", 8.0, 0.0, kind="torch")] if dropout > 0 else []
    # Each program reads all of Kt (scores) and P (E = A P) from L2.
    fwd = Launch("apt fwd", e * (3 * M * D + 2 * p * D) + acc * M, 4.0 * M * D * p, progs * 2 * p * D * e)
    if mode == "fwd":
        return seed + kt + [fwd]
    pad = -(-p // 16) * 16  # the scratch rows, padded to 16 elements
    # Kt and P for S and G P^T, Kt again for dH = dS Kt.
    rows = Launch("apt bwd rows", e * (5 * M * D + 2 * p * D + 2 * M * pad) + acc * M, 6.0 * M * D * p,
                  progs * 3 * p * D * e)
    part = Launch("apt bwd ds sum", acc * progs, float(progs), kind="torch")
    d_kt = Launch("apt bwd dKt GEMM", e * (M * p + M * D + p * D), 2.0 * M * D * p, kind="cublas")
    d_p = Launch("apt bwd dP GEMM", e * (M * p + M * D + p * D), 2.0 * M * D * p, kind="cublas")
    chain = [Launch("apt bwd dP += dKt", e * 3 * p * D, float(p * D), kind="torch"),
             Launch("apt bwd dW2 GEMM", e * (p * D + p * r + D * r), 2.0 * p * D * r, kind="cublas"),
             Launch("apt bwd d(P W1^T) GEMM", e * (p * D + D * r + p * r), 2.0 * p * D * r, kind="cublas"),
             Launch("apt bwd dW1 GEMM", e * (p * r + p * D + r * D), 2.0 * p * D * r, kind="cublas"),
             Launch("apt bwd dP chain GEMM", e * (p * r + r * D + p * D), 2.0 * p * D * r, kind="cublas"),
             Launch("apt bwd dP += chain", e * 3 * p * D, float(p * D), kind="torch")]
    return seed + kt + [fwd, rows, part, d_kt, d_p] + chain


def apt_ideal(M: int, D: int, p: int, dtype: str, mode: str) -> Launch:
    """Any implementation's lower bound: forward reads H, Y, writes out; backward reads H, G, out and writes
    dH, dY (nothing of size (M, p)); flops as above (the backward's S is recomputed: 5 GEMMs of M D p)."""
    e = BYTES[dtype]
    if mode == "fwd":
        return Launch("apt fwd (ideal)", e * 3 * M * D, 4.0 * M * D * p)
    return Launch("apt fwd+bwd (ideal)", e * 8 * M * D, 14.0 * M * D * p)


def gated(M: int, D: int, d: int, dtype: str, mode: str, splits: int = 0) -> List[Launch]:
    """The gated fusion's launches in the ladder's training case (side, W, b, gate trainable; tap frozen):
    forward (mu formed in the kernel) writes out, s - Z and mu; backward = grad_rows (G, s - Z -> ds,
    per-block column sums), finish (the sums folded into db and dalpha), dW = G^T X in `splits` fp32
    partials (the launcher's choice for 132 SMs unless given) folded with the (1 - mu) scale by one small
    kernel. No torch kernel around them."""
    e, acc = BYTES[dtype], 4
    half = dtype in ("bfloat16", "float16")
    block_n = max(16, min(256, 1 << (d - 1).bit_length()))  # the launchers' N block (d <= 256: one)
    d_pad = -(-d // block_n) * block_n  # W's rows as the N blocks read them
    progs = _programs(M, 64 if half else 32)
    w_l2 = progs * d_pad * D * e  # every row program reads its N block of W from L2
    if mode == "fwd":  # no autograd: s - Z is not written
        return [Launch("gated fwd", e * (M * D + 2 * M * d + d * D) + acc * d, 2.0 * M * D * d, w_l2)]
    fwd = Launch("gated fwd", e * (M * D + 3 * M * d + d * D) + acc * d, 2.0 * M * D * d, w_l2)
    if not splits:
        splits = _gated_splits(M, D, d, dtype)
    blocks = -(-M // (32 if -(-M // 64) < SMS else 64))
    rows = Launch("gated bwd rows", e * 3 * M * d + acc * 2 * blocks * d, 3.0 * M * d)
    finish = Launch("gated bwd finish", acc * 2 * blocks * d + e * d + acc * d, 2.0 * blocks * d)
    block_k = 64 if half else 32
    k_tiles = -(-D // block_k)
    # dW: G (M, d) is read once per D tile of its programs; X once per N block.
    dw = Launch("gated bwd dW", e * (M * d + M * D) + acc * splits * d * D, 2.0 * M * D * d,
                e * M * d * (k_tiles - 1) + e * M * D * (d_pad // block_n - 1))
    fold = Launch("gated bwd fold", acc * splits * d * D + e * d * D + acc * d, float(splits * d * D))
    return [fwd, rows, finish, dw, fold]


def gated_ideal(M: int, D: int, d: int, dtype: str, mode: str) -> Launch:
    """Lower bound: X read once per GEMM that needs it (forward's Z and dW), plus the (M, d) tensors."""
    e = BYTES[dtype]
    if mode == "fwd":
        return Launch("gated fwd (ideal)", e * (M * D + 2 * M * d), 2.0 * M * D * d)
    return Launch("gated fwd+bwd (ideal)", e * (2 * M * D + 6 * M * d), 4.0 * M * D * d)


def _gated_splits(M, D, d, dtype) -> int:
    try:
        import torch

        from ladder_kernels.backends.triton.gated_fusion import grad_weight_config

        return grad_weight_config(M, d, D, getattr(torch, dtype), SMS)[3]
    except ImportError:  # triton missing: the launcher's rule, restated
        return max(1, SMS // (12 if D == 768 else 8))


def launches(op: str, shape, dtype: str, mode: str) -> List[Launch]:
    return apt(*shape, dtype, mode) if op == "apt_diffusion" else gated(*shape, dtype, mode)


def floor_seconds(op: str, shape, dtype: str, mode: str, gpu: str) -> float:
    """The device floor of one op call: its launches' floors (each at least KERNEL_MIN), added."""
    return sum(launch.floor(gpu, dtype) for launch in launches(op, shape, dtype, mode))


def host_floor_seconds(op: str, shape, dtype: str, mode: str) -> float:
    """The host-bound path's floor of one op call: LAUNCH_HOST per launch."""
    return LAUNCH_HOST * len(launches(op, shape, dtype, mode))


def gpu_of(name: str) -> str:
    """"H200" or "H100" from a device name (torch.cuda.get_device_name()); the model has nothing else."""
    return "H200" if "H200" in name.upper() else "H100"


def over_floor(op: str, shape, dtype: str, mode: str, seconds: float, device_name: str) -> Dict[str, float]:
    """{"floor us": .., "x floor": measured / floor} for a measured call on the named device."""
    floor = floor_seconds(op, shape, dtype, mode, gpu_of(device_name))
    return {"floor us": round(floor * 1e6, 2), "x floor": round(seconds / floor, 2)}


def rows() -> List[dict]:
    out = []
    for op, cases in (("apt_diffusion", APT_CASES), ("gated_fusion", GATED_CASES)):
        ideal = apt_ideal if op == "apt_diffusion" else gated_ideal
        for case, shape in cases.items():
            for dtype in ("bfloat16", "float32"):
                for mode in ("fwd", "fwd+bwd"):
                    calls = launches(op, shape, dtype, mode)
                    for launch in calls + [ideal(*shape, dtype, mode)]:
                        if mode == "fwd+bwd" and launch.kernel.endswith("fwd"):
                            continue  # (its fwd+bwd variant, which also writes what backward keeps, is in the total)
                        out.append(dict(op=op, case=case, dtype=dtype, mode=mode, kernel=launch.kernel,
                                        kind=launch.kind if "ideal" not in launch.kernel else "-",
                                        MB=launch.bytes / 1e6, L2_MB=launch.l2_bytes / 1e6, GFLOP=launch.flops / 1e9,
                                        **{f"{g} us": (launch.roofline(g, dtype) if "ideal" in launch.kernel
                                                       else launch.floor(g, dtype)) * 1e6 for g in GPUS}))
                    out.append(dict(op=op, case=case, dtype=dtype, mode=mode,
                                    kernel=f"op total (as designed): {len(calls)} launches, host floor "
                                           f"{host_floor_seconds(op, shape, dtype, mode) * 1e6:.0f} us",
                                    kind=f"{sum(c.kind == 'triton' for c in calls)} triton",
                                    MB=sum(x.bytes for x in calls) / 1e6, L2_MB=sum(x.l2_bytes for x in calls) / 1e6,
                                    GFLOP=sum(x.flops for x in calls) / 1e9,
                                    **{f"{g} us": floor_seconds(op, shape, dtype, mode, g) * 1e6 for g in GPUS}))
    return out


def markdown() -> str:
    lines = ["Floors: max(HBM bytes / HBM bandwidth, L2 re-read bytes / L2 bandwidth, flops / peak, 2 us) per launch, "
             "added per call. H100 SXM: 3.35 TB/s, H200: 4.8 TB/s; L2 7 TB/s (an estimate); 989 TFLOP/s dense bf16 "
             "(fp32 rows at 67 TFLOP/s, no TF32). Host floor: 4 us per launch (the eager path's launch cost). "
             "Ideal rows: the roofline of any implementation, without the per-launch minimum.", "",
             "| op | case | dtype | mode | launch | kind | HBM MB | L2 re-read MB | GFLOP | H100 floor (us) | "
             "H200 floor (us) |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows():
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['kernel']} | {r['kind']} | "
                     f"{r['MB']:.2f} | {r['L2_MB']:.2f} | {r['GFLOP']:.2f} | {r['H100 us']:.1f} | {r['H200 us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = markdown()
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            f.write("# Traffic model\n\n" + text)
        print(f"wrote {argv[0]}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
