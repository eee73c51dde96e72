"""ladder-kernels-demo: the gated-fusion op on CLIP text-tap shapes, on this machine, in seconds.

Checks the automatically chosen backend against the float64 reference, times forward + backward against
the eager plain-PyTorch reference, and shows what each configuration keeps for backward. The numbers
are this machine's; the benchmarks (benchmarks/) are the place for careful ones.
"""
import argparse
import statistics
import time

import torch

import ladder_kernels as lk
from ladder_kernels import reference


def _median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _saved_mb(fn):
    with lk.SavedTensors() as saved:
        fn()
    return saved.bytes / 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ladder-kernels-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200, help="text sequences (classes); M = classes x tokens")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--tap-dim", type=int, default=512, help="D, the CLIP text width")
    parser.add_argument("--side-dim", type=int, default=64, help="d, the side network width (D / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("classes", "tokens", "tap_dim", "side_dim", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    torch.manual_seed(0)
    dev = torch.device(args.device)
    M, D, d = args.classes * args.tokens, args.tap_dim, args.side_dim
    print(f"ladder_kernels {lk.__version__} on {dev}: backends")
    for name, status in lk.backends().items():
        print(f"  {name:<7} {'yes' if status.available else 'no ':<4} {status.detail}")
    backend = lk.backend_for("gated_fusion", dev)
    print(f"\ngated fusion, M = {args.classes} x {args.tokens} = {M} rows, D = {D}, d = {d}, backend '{backend}'")

    fusion = lk.nn.GatedLadderFusion(D, d, per_channel_gate=True).to(dev)
    side = torch.randn(M, d, device=dev, requires_grad=True)
    tap = torch.randn(M, D, device=dev)  # a detached CLIP activation
    grad = torch.randn(M, d, device=dev)
    params = (side, fusion.weight, fusion.bias, fusion.gate)

    out = fusion(side, tap)
    got = torch.autograd.grad(out, params, grad)
    f64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference.gated_fusion(f64[0], tap.double(), f64[1], f64[2], f64[3], fusion.temperature)
    want = torch.autograd.grad(ref, f64, grad.double())
    errs = [(out.double() - ref).abs().max().item()] + [(a.double() - b).abs().max().item() for a, b in zip(got, want)]
    print(f"  max |error| vs float64: out {errs[0]:.1e}, d_side {errs[1]:.1e}, d_weight {errs[2]:.1e}, "
          f"d_bias {errs[3]:.1e}, d_gate {errs[4]:.1e}")

    def step_lk():
        return torch.autograd.grad(fusion(side, tap), params, grad)

    def step_eager():
        eager = reference.gated_fusion(side, tap, fusion.weight, fusion.bias, fusion.gate, fusion.temperature)
        return torch.autograd.grad(eager, params, grad)

    t_lk, t_eager = _median_ms(step_lk, args.repeats), _median_ms(step_eager, args.repeats)
    print(f"  forward + backward: ladder_kernels {t_lk:.1f} ms, eager PyTorch {t_eager:.1f} ms "
          f"(x{t_eager / t_lk:.2f})")

    print("\n  kept for backward (MB)            ladder_kernels   eager PyTorch")
    rows = [("W trainable", None, True), ("W trainable, float8 tap", torch.float8_e4m3fn, True),
            ("W frozen", None, False)]
    for label, tap_dtype, train_w in rows:
        fusion.weight.requires_grad_(train_w)
        fusion.tap_dtype = tap_dtype
        mb_lk = _saved_mb(lambda: fusion(side, tap))
        mb_eager = _saved_mb(lambda: reference.gated_fusion(side, tap, fusion.weight, fusion.bias, fusion.gate, 0.1))
        print(f"  {label:<33} {mb_lk:>14.2f} {mb_eager:>15.2f}")
    print(f"\n  (the tap itself is {M * D * 4 / 2 ** 20:.2f} MB; figures are this machine's, one run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
