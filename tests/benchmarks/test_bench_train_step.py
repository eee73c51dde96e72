"""The training-step benchmark's pieces: the plain-PyTorch LST peer computes what the ladder computes,
the word tokenizer, and the per-process memory measurement (no timing here: that is the benchmark's job)."""
import pytest
import torch
from torch.nn import functional as F

from benchmarks import train_step as T
from benchmarks.lst_peer import LSTPeer
from ladder_clip import build_method, load_backbone

NAMES = ["red circle", "blue square", "green triangle"]


def test_lst_peer_matches_the_ladder():
    """Same parameters in, same logits and gradients out: the peer differs in how, not in what."""
    b = load_backbone("tiny")
    ladder = build_method("ladder", b, NAMES)
    peer = LSTPeer(b, NAMES)
    peer.load_state_dict(ladder.state_dict())
    with torch.no_grad():  # a non-zero low-rank term and side output, so every path carries signal
        for m in (ladder, peer):
            m.txt_a.fill_(0.3)
            m.visual.lowrank_a.fill_(-0.2)
            m.up_v.weight.fill_(0.01)
            m.up_t.weight.fill_(0.02)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1, 0])
    out = {}
    for name, m in (("ladder", ladder), ("peer", peer)):
        logits = m(x)
        F.cross_entropy(logits, y).backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["peer"][0], out["ladder"][0], rtol=1e-5, atol=1e-5)
    assert out["peer"][1].keys() == out["ladder"][1].keys()
    for k, g in out["ladder"][1].items():
        torch.testing.assert_close(out["peer"][1][k], g, rtol=1e-4, atol=1e-6, msg=k)
    assert sum(p.numel() for p in peer.trainable_parameters()) == sum(
        p.numel() for p in ladder.trainable_parameters())


def test_lst_peer_runs_the_text_encoder_every_step():
    b = load_backbone("tiny")
    peer = LSTPeer(b, NAMES)
    calls = []
    b.clip.text_model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    peer(x)
    peer(x)
    assert len(calls) == 2


def test_word_tokenizer_and_class_names():
    tok = T.WordTokenizer()
    ids = tok("a photo of a w1x0 w1x1.", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and all(0 <= i < T.VOCAB - 2 for i in ids)
    assert tok("a b", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
    names = T.class_names(1000)
    assert len(set(names)) == 1000
    lengths = [len(n.split()) for n in names]
    assert min(lengths) == 1 and max(lengths) == 6


def test_build_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        T.build("nope", "tiny", 4, "cpu", 2)


def test_memory_measured_in_a_fresh_process():
    out = T.measure_in_subprocess("ladder", "tiny", 4, "cpu", 2)
    assert out["variant"] == "ladder" and out["memory_kind"].startswith("peak RSS")
    assert out["peak_above_resident_bytes"] > 0 and out["resident_bytes"] > 0
    assert out["total_bytes"] == out["resident_bytes"] + out["peak_above_resident_bytes"]
    # the model's resident set is the process's less the warmed runtime and the input batch
    assert out["resident_bytes"] == out["process_resident_bytes"] - out["runtime_bytes"] - out["batch_bytes"]
    assert out["process_peak_bytes"] == out["process_resident_bytes"] + out["peak_above_resident_bytes"]
    assert out["saved_bytes"] > 0 and out["trainable"] > 0 and out["text_tokens"] > 1 and out["threads"] >= 1


def test_counted_bytes_are_the_weights_and_what_the_method_keeps():
    """The counted check adds every resident tensor once: the backbone's weights, the side network and its
    optimizer state (two moments a parameter for AdamW), the cached text taps."""
    setup = T.build("ladder", "tiny", 4, "cpu", 2)
    setup.step()
    params = sum(p.numel() * 4 for p in setup.method.trainable_parameters())
    weights = T.counted_bytes(setup) - params * 3  # params, exp_avg, exp_avg_sq
    b = setup.method.backbone
    backbone = sum(t.numel() * 4 for t in list(b.parameters()) + list(b.buffers()))
    feats, taps = setup.method._text_cache[1]
    cache = sum(t.untyped_storage().nbytes() for t in [feats, *taps])
    assert backbone + cache <= weights < backbone + cache + 64 * 1024  # + layout ids, step counters, frozen inits


def test_compare_alternates_and_reports_ratios():
    rows = T.compare(["coop", "ladder+int8"], [4], size="tiny", batch=2, repeats=2)
    assert [r["variant"] for r in rows] == ["coop", "ladder+int8"] and all(len(r["times"]) == 2 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["total_share"] == 1.0 and rows[1]["total_bytes"] > 0
    assert rows[0]["cpu_speedup"] == 1.0 and all(r["cpu_s"] > 0 and len(r["cpu_times"]) == 2 for r in rows)
    assert len(rows[0]["loadavg"]) == 2 and all(r["classes"] == 4 for r in rows)
    text = T.format_compare(rows)
    assert "ladder+int8" in text and "speedup" in text


def test_variant_options_after_at():
    assert T.parse_variant("ladder+int8@recompute=block@checkpoint=false@blocks=3") == (
        "ladder+int8", {"frozen": "int8", "recompute": "block", "checkpoint": False, "blocks": 3})
    for bad in ("ladder@recompute", "ladder@x=a b", "nope@blocks=2"):
        with pytest.raises(ValueError, match="variant must be one of"):
            T.parse_variant(bad)
    assert T.build("ladder@blocks=1", "tiny", 4, "cpu", 2).method.cfg["blocks"] == 1


def test_side_variant_steps_the_side_network_on_given_taps():
    """ladder-side runs the frozen image encoder once, at build time, and its step is then the ladder's own
    on those taps: same loss, same gradients as the full ladder's step on the same batch."""
    full, side = T.build("ladder", "tiny", 4, "cpu", 2), T.build("ladder-side", "tiny", 4, "cpu", 2)
    assert side.inputs_bytes > 0 and full.inputs_bytes == 0
    calls = []
    side.method.backbone.clip.vision_model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    side.method.load_state_dict(full.method.state_dict())
    for s in (full, side):
        s.opt.zero_grad()
        F.cross_entropy(s.forward(s.x), s.y).backward()
    assert calls == []
    for (name, p), q in zip(full.method.named_parameters(), side.method.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert torch.isfinite(side.step())


def test_profile_lists_the_top_ops():
    """The profile alternates its variants; side_act=hf puts transformers' quick_gelu back (no silu kernel)."""
    setups = {v: T.build(v, "tiny", 4, "cpu", 2) for v in ("ladder-side", "ladder-side@side_act=hf")}
    res = T.profile(setups, rounds=2, top=500)
    for r in res.values():
        rows = r["top"]
        assert all(o["self_ms"] >= 0 and o["calls"] >= 1 for o in rows) and r["step_s"] > 0 and r["cpu_s"] > 0
        assert rows[0]["self_ms"] >= rows[-1]["self_ms"] and 0.95 <= sum(o["share"] for o in rows) <= 1.05
    ops = {v: {o["op"] for o in r["top"]} for v, r in res.items()}
    assert "aten::silu" in ops["ladder-side"] and "aten::silu" not in ops["ladder-side@side_act=hf"]
