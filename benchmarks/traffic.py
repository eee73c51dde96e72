"""The traffic model: for each Triton kernel launch of an op at the benchmark shapes, the bytes it must move
to and from HBM and the flops it must do, and so its floor time on an H100 and an H200.

    floor(kernel) = max(bytes / HBM bandwidth, flops / dense tensor-core rate)
    floor(op call) = sum of its launches' floors (they run one after another)

Numbers used (vendor peak figures, SXM parts): H100 SXM 3.35 TB/s HBM3, H200 4.8 TB/s HBM3e, both 989
TFLOP/s dense bf16/fp16 (fp32 without TF32 is not a tensor-core rate: its flops are counted at 67 TFLOP/s,
the H100/H200 FP32 CUDA-core peak). Bytes: every (M, .) tensor a launch reads or writes crosses HBM once;
the (p, D), (d, D) operands (prompts, Kt, W) count once per launch (they stay in L2 across programs);
accumulators and the (M, p) scratch of the APT backward are counted in their own dtype. The model is
what the kernels *as designed* must move; `ideal` also gives the op's lower bound for any implementation
(APT backward: read H, G, out and write dH, dY, nothing of size (M, p); gated fusion: two reads of X, for
the forward's GEMM and for dW, plus the (M, d) traffic).

    python -m benchmarks.traffic [OUT.md]     # the table at the benchmark shapes

The GPU benchmarks call `over_floor(...)` to report measured / floor beside their timings.
"""
import sys
from typing import Dict, List, NamedTuple

GPUS = {"H100": dict(bw=3.35e12, tc=989e12, fp32=67e12), "H200": dict(bw=4.8e12, tc=989e12, fp32=67e12)}
SMS = 132
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The benchmark shapes (benchmarks/bench_apt_diffusion.py, bench_gated_fusion.py).
APT_CASES = {f"vit_b16 B=32 N=197 D=768 p={p}": (32 * 197, 768, p) for p in (10, 50, 200)}
APT_CASES["meter B=8 N=1024 D=768 p=200"] = (8 * 1024, 768, 200)
GATED_CASES = {"vit_b16 M=32x197 D=768 d=96": (32 * 197, 768, 96), "text M=1000x77 D=512 d=64": (1000 * 77, 512, 64)}


class Launch(NamedTuple):
    kernel: str
    bytes: float
    flops: float

    def floor(self, gpu: str, dtype: str) -> float:
        g = GPUS[gpu]
        rate = g["tc"] if dtype in ("bfloat16", "float16") else g["fp32"]
        return max(self.bytes / g["bw"], self.flops / rate)


def apt(M: int, D: int, p: int, dtype: str, mode: str) -> List[Launch]:
    """APT's launches (dropout or not: the mask is a hash, no traffic): forward = one kernel; backward
    (H, Y, P, Kt, s all trainable) = the rows kernel and the two cuBLAS GEMMs dKt = dS^T H, dP = (ew A)^T G."""
    e, acc = BYTES[dtype], 4
    fwd = Launch("apt fwd", e * (3 * M * D + 2 * p * D) + acc * M, 4.0 * M * D * p)
    if mode == "fwd":
        return [fwd]
    rows = Launch("apt bwd rows", e * (5 * M * D + 2 * p * D + 2 * M * p) + acc * M, 6.0 * M * D * p)
    d_kt = Launch("apt bwd dKt GEMM", e * (M * p + M * D + p * D), 2.0 * M * D * p)
    d_p = Launch("apt bwd dP GEMM", e * (M * p + M * D + p * D), 2.0 * M * D * p)
    return [fwd, rows, d_kt, d_p]


def apt_ideal(M: int, D: int, p: int, dtype: str, mode: str) -> Launch:
    """Any implementation's lower bound: forward reads H, Y, writes out; backward reads H, G, out and writes
    dH, dY (nothing of size (M, p)); flops as above (the backward's S is recomputed: 5 GEMMs of M D p)."""
    e = BYTES[dtype]
    if mode == "fwd":
        return Launch("apt fwd (ideal)", e * 3 * M * D, 4.0 * M * D * p)
    return Launch("apt fwd+bwd (ideal)", e * 8 * M * D, 14.0 * M * D * p)


def gated(M: int, D: int, d: int, dtype: str, mode: str, splits: int = 0) -> List[Launch]:
    """The gated fusion's launches in the ladder's training case (side, W, b, gate trainable; tap frozen):
    forward writes out and s - Z; backward = grad_rows (G, s - Z -> ds, column sums) and dW = G^T X in
    `splits` fp32 partials (the launcher's choice for 132 SMs unless given) folded by one small kernel."""
    e, acc = BYTES[dtype], 4
    if mode == "fwd":  # no autograd: s - Z is not written
        return [Launch("gated fwd", e * (M * D + 2 * M * d + d * D), 2.0 * M * D * d)]
    fwd = Launch("gated fwd", e * (M * D + 3 * M * d + d * D), 2.0 * M * D * d)
    if not splits:
        splits = _gated_splits(M, D, d, dtype)
    rows = Launch("gated bwd rows", e * 3 * M * d, 3.0 * M * d)
    dw = Launch("gated bwd dW", e * (M * d + M * D) + acc * splits * d * D, 2.0 * M * D * d)
    fold = Launch("gated bwd fold", acc * splits * d * D + e * d * D, float(splits * d * D))
    return [fwd, rows, dw] + ([fold] if splits > 1 else [])


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
    """The floor of one op call: its launches' floors, added."""
    return sum(launch.floor(gpu, dtype) for launch in launches(op, shape, dtype, mode))


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
                    for launch in launches(op, shape, dtype, mode) + [ideal(*shape, dtype, mode)]:
                        if mode == "fwd+bwd" and launch.kernel.endswith("fwd"):
                            continue  # (its fwd+bwd variant, which also writes what backward keeps, is in the total)
                        out.append(dict(op=op, case=case, dtype=dtype, mode=mode, kernel=launch.kernel,
                                        MB=launch.bytes / 1e6, GFLOP=launch.flops / 1e9,
                                        **{f"{g} us": launch.floor(g, dtype) * 1e6 for g in GPUS}))
                    out.append(dict(op=op, case=case, dtype=dtype, mode=mode, kernel="op total (as designed)",
                                    MB=sum(x.bytes for x in launches(op, shape, dtype, mode)) / 1e6,
                                    GFLOP=sum(x.flops for x in launches(op, shape, dtype, mode)) / 1e9,
                                    **{f"{g} us": floor_seconds(op, shape, dtype, mode, g) * 1e6 for g in GPUS}))
    return out


def markdown() -> str:
    lines = ["Floors: max(bytes / HBM bandwidth, flops / peak) per launch, added per call. H100 SXM: 3.35 TB/s, "
             "H200: 4.8 TB/s; 989 TFLOP/s dense bf16 (fp32 rows at 67 TFLOP/s, no TF32).", "",
             "| op | case | dtype | mode | launch | MB | GFLOP | H100 floor (us) | H200 floor (us) |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows():
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['kernel']} | {r['MB']:.2f} | "
                     f"{r['GFLOP']:.2f} | {r['H100 us']:.1f} | {r['H200 us']:.1f} |")
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
