"""Every method trains on the tiny CLIP and its loss falls; the ladder keeps CLIP off the autograd tape;
the methods call the fused ops."""

import pytest
import torch
from torch.nn import functional as F


import ladder_kernels as lk
from ladder_clip import METHODS, build_method, load_backbone

NAMES = ["red circle", "blue square", "green triangle"]
SMALL = {"apt": {"num_prompts": 5}, "ladder+apt": {"apt_prompts": 5}, "coop": {"n_ctx": 4}}


def _train(method, x, y, steps):
    """AdamW steps on one batch; the losses."""
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(method(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "zeroshot"])
def test_loss_falls(name):
    b = load_backbone("tiny")
    clip_params = list(b.parameters())  # before APT hooks its prompts into the backbone
    method = build_method(name, b, NAMES, **SMALL.get(name, {}))
    params = method.trainable_parameters()
    assert params and all(not p.requires_grad for p in clip_params)
    x, y = _batch()
    losses = _train(method, x, y, 6)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(p.grad is None for p in clip_params)


def test_zeroshot_is_clip():
    b = load_backbone("tiny")
    m = build_method("zeroshot", b, NAMES)
    assert m.trainable_parameters() == []
    x, _ = _batch()
    with torch.no_grad():
        t = F.normalize(b.encode_text(b.tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1)
        ref = b.logit_scale * F.normalize(b.encode_image(x), dim=-1) @ t.t()
        torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("name", ["ladder", "ladder+apt"])
def test_ladder_keeps_clip_off_the_tape(name):
    b = load_backbone("tiny")
    method = build_method(name, b, NAMES, **SMALL.get(name, {}))
    inside = []
    b.clip.register_forward_pre_hook(lambda *_: inside.append(torch.is_grad_enabled()))
    for layer in list(b.clip.text_model.encoder.layers) + list(b.clip.vision_model.encoder.layers):
        layer.register_forward_pre_hook(lambda *_: inside.append(torch.is_grad_enabled()))
    in_clip = [False]
    packed_in_clip = []
    for enc in (b.clip.text_model.encoder, b.clip.vision_model.encoder, b.clip.vision_model.embeddings):
        enc.register_forward_pre_hook(lambda *_: in_clip.__setitem__(0, True))
        enc.register_forward_hook(lambda *_: in_clip.__setitem__(0, False))
    x, y = _batch()
    for step in range(2):  # the second step uses the cached text taps
        with lk.SavedTensors(keep=True) as saved, torch.autograd.graph.saved_tensors_hooks(
                lambda t: (packed_in_clip.append(t) if in_clip[0] else None) or t, lambda t: t):
            loss = F.cross_entropy(method(x), y)
        loss.backward()
        assert packed_in_clip == [], "the frozen encoders saved tensors for backward"
        assert inside and not any(inside), "a frozen CLIP layer ran with grad enabled"
        clip_ptrs = {p.data_ptr() for p in b.parameters()}
        assert not any(t.data_ptr() in clip_ptrs for t in saved.tensors), "a CLIP weight was saved"
        assert not any(t.requires_grad and t.grad_fn is not None and "clip" in str(t.grad_fn) for t in saved.tensors)
        inside.clear()
    assert all(p.grad is None for p in b.parameters())
    assert all(p.grad is not None for p in method.trainable_parameters())


def test_ladder_caches_text_taps_and_truncates():
    b = load_backbone("tiny")
    m = build_method("ladder", b, NAMES + ["a very long name of a class that goes on"])
    calls = []
    b.clip.text_model.encoder.layers[0].register_forward_pre_hook(lambda mod, a: calls.append(a[0].shape))
    x, _ = _batch()
    m(x)
    m(x)
    assert len(calls) == 1, "text taps were not cached"
    assert calls[0][1] == int(m.layout.eot.max()) + 1  # cut at the longest end token
    m.set_classnames(NAMES)  # a new class set recomputes them
    m(x)
    assert len(calls) == 2


def test_methods_call_the_fused_ops(monkeypatch):
    import ladder_kernels.nn.apt_prompt as apt_mod
    import ladder_kernels.nn.low_rank_prompt as lrp_mod

    seen = set()
    # the ladder calls lk.nn.GatedLadderFusion itself (its forward is the fused op), never the op around it
    for mod, op in ((lk, "assemble_prompts"), (lk.nn.GatedLadderFusion, "forward"), (lrp_mod, "assemble_prompts"),
                    (apt_mod, "apt_diffusion")):
        if hasattr(mod, op):
            real = getattr(mod, op)
            monkeypatch.setattr(mod, op, lambda *a, _r=real, _n=op, **k: (seen.add(_n), _r(*a, **k))[1])
    x, _ = _batch()
    uses = {"coop": {"assemble_prompts"}, "vpt": {"assemble_prompts"}, "maple": {"assemble_prompts"},
            "rlp": {"assemble_prompts"}, "ladder": {"assemble_prompts", "forward"},
            "apt": {"apt_diffusion"}, "ladder+apt": {"assemble_prompts", "forward", "apt_diffusion"}}
    for name, ops in uses.items():
        seen.clear()
        m = build_method(name, load_backbone("tiny"), NAMES, **SMALL.get(name, {}))
        m(x).sum().backward()
        assert ops <= seen, (name, seen)


def test_rlp_uses_low_rank_prompt():
    m = build_method("rlp", load_backbone("tiny"), NAMES)
    assert isinstance(m.prompt, lk.nn.LowRankPrompt)
    n, d = m.prompt.base.shape
    assert sum(p.numel() for p in m.trainable_parameters()) == n * 1 + 1 * d


def test_ladder_side_blocks_are_pruned_clip_layers():
    b = load_backbone("tiny")
    m = build_method("ladder", b, NAMES, reduction=4)
    d = b.vision_width // 4
    for blk, i in zip(m.blocks, m.v_layers):
        src = b.clip.vision_model.encoder.layers[i]
        assert blk.self_attn.embed_dim == d and blk.mlp.fc1.out_features == src.mlp.fc1.out_features // 4
        # every kept weight is a weight of the CLIP layer (structured pruning, not a fresh init)
        assert torch.isin(blk.mlp.fc1.weight.flatten(), src.mlp.fc1.weight.flatten()).all()
        # magnitude importance: the kept MLP neurons are the ones with the largest weights
        score = src.mlp.fc1.weight.abs().sum(1) + src.mlp.fc2.weight.abs().sum(0)
        kept = score.topk(blk.mlp.fc1.out_features).indices.sort().values
        torch.testing.assert_close(blk.mlp.fc1.bias, src.mlp.fc1.bias[kept])


def test_ladder_fisher_importance():
    b = load_backbone("tiny")
    mag = build_method("ladder", b, NAMES)
    fis = build_method("ladder", b, NAMES, importance="fisher")
    x, y = _batch()
    fis.calibrate([(x[:3], y[:3]), (x[3:], y[3:])])
    assert all(not p.requires_grad and p.grad is None for p in b.parameters())
    assert not torch.equal(mag.blocks[0].mlp.fc1.weight, fis.blocks[0].mlp.fc1.weight)
    losses = _train(fis, x, y, 5)
    assert losses[-1] < losses[0]


def _logits_and_grads(m, x, y):
    m.zero_grad(set_to_none=True)
    logits = m(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["ladder", "ladder+apt"])
def test_ladder_checkpoint_and_chunks_change_memory_not_results(name):
    """Checkpointed side blocks and a chunked frozen forward compute the same logits and gradients as the
    plain run (the same kernels on the same rows), and checkpointing keeps fewer bytes for backward."""
    b = load_backbone("tiny")
    x, y = _batch()
    ref = build_method(name, b, NAMES, checkpoint=False, frozen_chunk=0, **SMALL.get(name, {}))
    want = _logits_and_grads(ref, x, y)
    for opts in ({"checkpoint": True, "frozen_chunk": 0}, {"checkpoint": False, "frozen_chunk": 4},
                 {"checkpoint": True, "frozen_chunk": 1}, {"checkpoint": True, "recompute": "mlp"}):
        m = build_method(name, b, NAMES, **opts, **SMALL.get(name, {}))
        m.load_state_dict(ref.state_dict())
        got = _logits_and_grads(m, x, y)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=str(opts))
        assert got[1].keys() == want[1].keys()
        for k in want[1]:
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=f"{opts} {k}")
    saved = {}
    for ck, rec in ((False, "auto"), (True, "auto"), (True, "mlp")):
        m = build_method(name, b, NAMES, checkpoint=ck, recompute=rec, **SMALL.get(name, {}))
        m(x)  # the text taps are cached by the first call
        with lk.SavedTensors(m.trainable_parameters()) as s:
            m(x)
        saved[ck, rec] = s.bytes
    # fp32's auto is the whole block; its MLP half alone keeps the attention half's activations
    assert 0 < saved[True, "auto"] < saved[True, "mlp"] < saved[False, "auto"], saved
    assert saved[True, "auto"] < 0.7 * saved[False, "auto"], saved


def test_ladder_frozen_chunk_checked():
    with pytest.raises(ValueError, match="frozen_chunk"):
        build_method("ladder", load_backbone("tiny"), NAMES, frozen_chunk=-1)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_ladder_fusion_module_matches_the_op_call(precision, monkeypatch):
    """The ladder calls GatedLadderFusion itself; logits and gradients are those of calling lk.gated_fusion
    with the module's fields in the state's dtype (as before), in fp32 and under bf16 autocast."""
    from ladder_clip.methods.ladder import Ladder

    def op_call(self, f, s, tap):
        dt = s.dtype
        return lk.gated_fusion(s, tap.detach().to(dt), f.weight.to(dt), f.bias.to(dt), gate=f.gate,
                               temperature=f.temperature, tap_dtype=f.tap_dtype)

    b, (x, _) = load_backbone("tiny"), _batch()
    results = []
    for fuse in (Ladder.fuse, op_call):
        monkeypatch.setattr(Ladder, "fuse", fuse)
        torch.manual_seed(0)
        m = build_method("ladder", b, NAMES)
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            out = m(x)
        out.float().sum().backward()
        results.append((out.detach(), [p.grad for p in m.trainable_parameters()]))
    (a, ga), (b_, gb) = results
    assert a.dtype == b_.dtype and torch.equal(a, b_)
    assert all(torch.equal(g, h) for g, h in zip(ga, gb))


def test_ladder_text_centre_is_a_running_mean_fixed_in_eval():
    """The pooled text state is centred by its mean over the classes at the first training step, then by
    a moving average; eval uses the buffer as it is (a class's feature does not depend on the other classes
    evaluated with it); a checkpoint written before the centre existed loads with a zero centre."""
    from ladder_clip import checkpoint as ckpt
    b = load_backbone("tiny")
    m = build_method("ladder", b, NAMES)
    x, y = _batch()
    seen = []
    orig = m._blend
    m._blend = lambda clip, pooled, up, gate: (up is m.up_t and seen.append(pooled.detach()),
                                               orig(clip, pooled, up, gate))[1]
    m.train()
    F.cross_entropy(m(x), y).backward()
    assert int(m.txt_center_steps) == 1
    assert len(seen) == 1  # the text side's input to its up-projection, centred over the classes
    torch.testing.assert_close(seen[0].mean(0), torch.zeros_like(m.txt_center), atol=1e-5, rtol=0)
    m.eval()
    with torch.no_grad():
        full = m.text_features()
        m.set_classnames(NAMES[:2])  # a feature depends on its own class only
        torch.testing.assert_close(m.text_features(), full[:2])
        m.set_classnames(NAMES)
    assert int(m.txt_center_steps) == 1  # eval leaves the buffer alone
    old = {k: v for k, v in m.state_to_save().items() if not k.startswith("txt_center")}
    fresh = build_method("ladder", b, NAMES)
    ckpt.load_into(fresh, old, "old.safetensors")
    assert int(fresh.txt_center_steps) == 0 and not fresh.txt_center.any()
