"""The side blocks' speed path (methods/ladder/side.py): QuickGELU computes HF's quick_gelu and its gradient,
and the pruned blocks use it and torch's SDPA attention."""
import torch
from transformers.activations import ACT2FN

from ladder_clip import build_method, load_backbone
from ladder_clip.methods.ladder.side import QuickGELU


def test_quick_gelu_matches_hf_value_and_gradient():
    x = (torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    g = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    want = ACT2FN["quick_gelu"](x)
    got = QuickGELU()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(QuickGELU(), (x[0, :2, :8].double().detach().requires_grad_(True),))


def test_side_blocks_run_the_fast_paths():
    m = build_method("ladder", load_backbone("tiny"), ["red circle", "blue square"])
    for blk in m.blocks:
        assert isinstance(blk.mlp.activation_fn, QuickGELU)
        assert blk.self_attn.config._attn_implementation == "sdpa"
