"""Flash-attention's accuracy rule: a kernel in a given dtype may be off the float64 truth by at most
twice what the same maths written in plain PyTorch in that dtype is off, plus a small atol. The atol is
relative to the largest true value, so that a reduction (a gate's gradient summed over thousands of
terms) where plain PyTorch happens to round luckily is judged on the same footing as an O(1) output."""
import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), "non-finite values"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(name: str, got: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    err, plain_err = max_err(got, truth), max_err(plain, truth)
    atol = ATOL[dtype] * max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    bound = 2 * plain_err + atol
    assert err <= bound, f"{name}: error {err:.3g} > 2 x plain-PyTorch error {plain_err:.3g} + atol {atol:.3g}"
