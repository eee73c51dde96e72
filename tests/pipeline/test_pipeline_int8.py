"""The ladder's frozen CLIP in int8 (`frozen='int8'`, ladder_clip/quantize.py): what is quantised, that the
taps stay close to fp32 and predictions with them, that training and checkpoints work as with fp32, and
that bad input is one error line. The accuracy figures themselves: `python -m ladder_clip.quantize report`."""
import copy
import gc
import os
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ladder_clip import build_method, load_backbone
from ladder_clip import quantize as Q
from ladder_clip.checkpoint import read_checkpoint
from ladder_clip.cli import main

NAMES = ["red circle", "blue square", "green triangle", "yellow cross"]


def _pixels(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _linears(backbone):
    return [L.get_submodule(name) for L in Q.layers(backbone) for name in Q.LINEARS]


def test_quantize_backbone_replaces_every_layer_linear_and_the_token_embedding():
    b = load_backbone("tiny")
    fp32_bytes, sig = Q.weight_bytes(b), b.signature()
    Q.quantize_backbone(b)
    lins = _linears(b)
    assert len(lins) == 4 * (b.text_layers + b.vision_layers)  # q, k and v as one (quantize.FusedAttention)
    assert all(type(m).__name__ == "Linear" and m.weight().dtype == torch.qint8 for m in lins)
    assert all(m.weight().qscheme() == torch.per_channel_affine for m in lins)  # a scale per output channel
    assert b.clip.text_model.embeddings.token_embedding.weight().dtype == torch.quint8
    assert type(b.clip.visual_projection) is nn.Linear and type(b.clip.text_projection) is nn.Linear
    assert b.signature() == sig  # the checkpoint signature hashes an fp32 projection: fp32 and int8 alike
    assert Q.is_int8(b) and Q.weight_bytes(b) < 0.5 * fp32_bytes
    before = [id(m) for m in _linears(b)]
    Q.quantize_backbone(b)  # idempotent: a second ladder's first step leaves it as it is
    assert [id(m) for m in _linears(b)] == before


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization, called here directly
def test_fused_qkv_changes_nothing():
    """q, k, v quantised as one Linear give what three int8 Linears give (same per-channel weight scales,
    same input scale), bit for bit."""
    b = load_backbone("tiny")
    ref = Q.int8_copy(b)
    quantize_dynamic, qconfigs = Q.quantizer()
    separate = load_backbone("tiny")
    for layer in Q.layers(separate):
        Q.fold_quick_gelu(layer.mlp)
    emb = separate.clip.text_model.embeddings
    holder = nn.Sequential(*Q.layers(separate), emb.token_embedding)
    quantize_dynamic(holder, {nn.Linear: qconfigs[nn.Linear], nn.Embedding: qconfigs[nn.Embedding]}, inplace=True)
    emb.token_embedding = holder[-1]
    assert type(separate.clip.vision_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear"
    x, ids = _pixels(4), b.tokenize([f"a photo of a {c}." for c in NAMES])
    with torch.no_grad():
        for enc, arg in (("encode_image", x), ("encode_text", ids)):
            (f, taps), (rf, rtaps) = getattr(ref, enc)(arg, taps=True), getattr(separate, enc)(arg, taps=True)
            assert torch.equal(f, rf) and all(torch.equal(t, r) for t, r in zip(taps, rtaps))


def test_folded_quick_gelu_is_the_same_mlp():
    """fc2(quick_gelu(fc1 x)) == fc2'(silu(fc1' x)) to fp32 rounding, with and without grad; in place only
    where nothing records for backward; MLPs of another activation are left alone."""
    b = load_backbone("tiny")
    mlp = b.clip.vision_model.encoder.layers[0].mlp
    folded = copy.deepcopy(mlp)
    Q.fold_quick_gelu(folded)
    assert type(folded.activation_fn) is Q.SiLUInPlace
    x = torch.randn(2, 7, mlp.fc1.in_features)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), mlp(x), rtol=1e-5, atol=1e-6)
    h = torch.randn(3, 5, requires_grad=True)
    out = folded.activation_fn(h)  # with grad: out of place
    torch.testing.assert_close(out, F.silu(h.detach()))
    out.sum().backward()
    assert h.grad is not None
    gelu = copy.deepcopy(mlp)
    gelu.activation_fn = nn.GELU()
    w = gelu.fc1.weight.clone()
    Q.fold_quick_gelu(gelu)
    assert type(gelu.activation_fn) is nn.GELU and torch.equal(gelu.fc1.weight, w)


def test_tap_errors_are_small_and_not_zero():
    """Every tap of both encoders within a few percent of fp32 (measured: vision 0.5..1.2 %, text 3 %, the
    text model being 32 wide); not zero, so the int8 path really ran."""
    b = load_backbone("tiny")
    q = Q.int8_copy(b)
    errs = Q.tap_errors(b, q, _pixels(16), b.tokenize([f"a photo of a {c}." for c in NAMES]))
    assert len(errs["vision"]) == b.vision_layers + 1 and len(errs["text"]) == b.text_layers + 1
    assert all(0 < e < 0.03 for e in errs["vision"]), errs
    assert all(0 < e < 0.08 for e in errs["text"]), errs
    assert Q.weight_bytes(b) > Q.weight_bytes(q)  # the copy was quantised, the original was not


def _fit(method, x, y, steps=15):
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(method(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_ladder_trains_on_int8_and_its_prompts_move_between_backbones():
    x, y = _pixels(8), torch.arange(8) % 4
    ladder = build_method("ladder", load_backbone("tiny"), NAMES, frozen="int8")
    first = F.cross_entropy(ladder(x), y).item()
    assert Q.is_int8(ladder.backbone)  # quantised by the first forward
    assert _fit(ladder, x, y) < 0.8 * first  # measured: 0.60 of the first loss
    state = ladder.state_to_save()
    assert state and not any(k.startswith("backbone.") for k in state)  # prompt-only, as with fp32
    assert all(p.grad is None for p in ladder.backbone.parameters())  # nothing flows into CLIP
    # the same prompts in an fp32 ladder: logits within the taps' error, the same predictions
    fp32 = build_method("ladder", load_backbone("tiny"), NAMES)
    assert fp32.state_to_save().keys() == state.keys()
    fp32.load_state_dict(state, strict=False)
    with torch.no_grad():
        xt = _pixels(32, seed=1)
        a, b = ladder(xt), fp32(xt)
    assert ((a - b).norm() / b.norm()).item() < 0.12  # measured: 0.061
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_int8_ladder_under_cpu_bf16_autocast_and_with_fisher_pruning():
    x, y = _pixels(4), torch.arange(4)
    # (ladder+apt fails under CPU bf16 autocast in fp32 too: APT's prompts stay fp32, outside this change)
    ladder = build_method("ladder", load_backbone("tiny"), NAMES, frozen="int8", importance="fisher")
    ladder.calibrate([(x, y)])  # back-propagates through the fp32 CLIP: before the quantisation
    assert not Q.is_int8(ladder.backbone)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision bf16 on CPU: the frozen part stays int8
        loss = F.cross_entropy(ladder(x).float(), y)
    loss.backward()
    assert Q.is_int8(ladder.backbone) and torch.isfinite(loss)
    assert all(p.grad is not None for p in ladder.trainable_parameters())


def test_refusals():
    b = load_backbone("tiny")
    build_method("ladder", b, NAMES, frozen="int8")(_pixels(2))
    with pytest.raises(ValueError, match="already int8"):  # its side network needs the fp32 weights
        build_method("ladder", b, NAMES)
    with pytest.raises(ValueError, match="frozen: method 'ladder' expects one of 'fp32', 'int8', got 'int4'"):
        build_method("ladder", load_backbone("tiny"), NAMES, frozen="int4")
    with pytest.raises(ValueError, match="no such option"):
        build_method("coop", load_backbone("tiny"), NAMES, frozen="int8")
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="runs on CPU only.*no int8 GPU path is wired for cuda"):
        Q.check_available(cuda)
    with pytest.raises(ValueError, match="no int8 GPU path"):
        Q.quantize_backbone(cuda)


def test_a_torch_without_its_int8_path_is_one_clear_error(monkeypatch):
    """torch marks torch.ao.quantization deprecated: where it is gone, building the option says so."""
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # `import` of it raises ImportError
    with pytest.raises(ValueError, match="needs torch.ao.quantization.quantize_dynamic, which torch .* does not"):
        build_method("ladder", load_backbone("tiny"), NAMES, frozen="int8")


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square", "green_triangle"),
            train_per_class=4, test_per_class=3, seed=5)


def _one_error_line(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ladder-clip: error:") and needle in err[0], err


def test_cli_train_int8_then_eval_on_either_backbone(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--data", data, "--method", "ladder", "--shots", "2", "--epochs", "1",
                 "--batch-size", "3", "--out", str(out), "--quiet", "--opt", "frozen=int8"]) == 0
    header, tensors = read_checkpoint(str(out / "prompt.safetensors"))
    assert header["config"]["frozen"] == "int8" and not any(k.startswith("backbone.") for k in tensors)
    ckpt = str(out / "prompt.safetensors")
    accs = {}
    for frozen in (None, "fp32", "int8"):
        capsys.readouterr()
        extra = [] if frozen is None else ["--frozen", frozen]
        assert main(["eval", "--model", "tiny", "--data", data, "--checkpoint", ckpt, *extra]) == 0
        line = capsys.readouterr().out  # "<method>: accuracy 0.1234 on N test images (C classes)"
        accs[frozen] = float(line.split("accuracy", 1)[1].split()[0])
    assert accs[None] == accs["int8"] and all(0 <= a <= 1 for a in accs.values())
    # bad input: one line, status 2, through the option's declared type
    _one_error_line(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", ckpt, "--frozen",
                                  "int4"]), "--frozen must be one of 'fp32', 'int8', got 'int4'")
    _one_error_line(capsys, main(["train", "--model", "tiny", "--data", data, "--method", "ladder+apt", "--out",
                                  str(tmp_path / "bad"), "--opt", "frozen=int4"]),
                    "--opt frozen: method 'ladder+apt' expects one of 'fp32', 'int8', got 'int4'")


def test_cli_eval_frozen_needs_a_ladder_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "coop"
    assert main(["train", "--model", "tiny", "--data", data, "--method", "coop", "--shots", "1", "--epochs", "1",
                 "--batch-size", "3", "--out", str(out), "--quiet", "--opt", "n_ctx=2"]) == 0
    capsys.readouterr()
    _one_error_line(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint",
                                  str(out / "prompt.safetensors"), "--frozen", "int8"]),
                    "--frozen: method 'coop' has no frozen-backbone option")


def test_report_runs_and_prints_every_figure(capsys, tmp_path, monkeypatch):
    """The report end to end at its smallest (one epoch, one test image a class): every figure is printed,
    and zero-shot accuracy does not move (the report's real run: 8 epochs, 3 seeds, on tiny-pretrained)."""
    monkeypatch.setenv("LADDER_CLIP_CACHE", str(tmp_path / "cache"))  # tiny-pretrained, built here
    assert Q.main(["report", "--epochs", "1", "--test-per-class", "1", "--seeds", "2"]) == 0
    text = capsys.readouterr().out
    assert "vision L1=" in text and "text   L1=" in text and "features=" in text
    assert "(+0.00 points)" in text.split("zero-shot: ")[1].splitlines()[0]
    assert "seed 2" in text and "mean" in text and "backbone weights: fp32" in text


def test_text_encoder_is_on_disk_between_text_cache_builds():
    """After the text taps are cached the int8 text encoder (most of the int8 weights) leaves memory; a new
    class set reads it back, with the same taps as an encoder that never left."""
    x = _pixels(4)
    ladder = build_method("ladder", load_backbone("tiny"), NAMES, frozen="int8")
    ladder(x)
    b = ladder.backbone
    path = b._text_file
    stay = Q.int8_copy(load_backbone("tiny"))  # the same weights, quantised the same way, never offloaded
    assert Q.weight_bytes(b) < Q.weight_bytes(stay)
    with pytest.raises(RuntimeError, match="on disk between the ladder's text-cache builds"):
        b.encode_text(b.tokenize(["a photo of a red circle."]))
    other = ["purple star", "orange ring"]
    ladder.set_classnames(other)
    with torch.no_grad():
        ladder(x)
        ids = ladder.layout.ids
        want = stay.encode_text(ids, taps=[0] + [i + 1 for i in ladder.t_layers])
    got = ladder._text_cache[1]
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
    with Q.text_encoder(b):  # what the ladder does: in memory for the duration
        assert b.encode_text(ids).shape == (2, b.embed_dim)
    assert b._text_file == path  # written once
    del ladder, b
    gc.collect()
    assert not os.path.exists(path)


def test_int8_taps_kept_for_backward_in_bf16(monkeypatch):
    """The image taps autograd keeps for the side network's weight gradients are kept in bf16 (half the
    bytes): the loss is the same, the gradients within bf16's rounding of the taps."""
    x, y = _pixels(4), torch.arange(4)
    ladder = build_method("ladder", load_backbone("tiny"), NAMES, frozen="int8")
    with torch.no_grad():
        ladder.up_v.weight.fill_(0.01)
    grads, losses = {}, {}
    packed_in_bf16 = Q.saved_in_bf16
    for packed in (True, False):
        if not packed:  # the same step, nothing packed
            monkeypatch.setattr(Q, "saved_in_bf16", lambda taps: packed_in_bf16(()))
        ladder.zero_grad()
        loss = F.cross_entropy(ladder(x), y)
        loss.backward()
        losses[packed] = loss.item()
        grads[packed] = {n: p.grad.clone() for n, p in ladder.named_parameters() if p.grad is not None}
    assert losses[True] == losses[False]
    flat = {k: torch.cat([g.flatten() for g in grads[k].values()]) for k in grads}
    assert ((flat[True] - flat[False]).norm() / flat[False].norm()).item() < 1e-2
    assert any(not torch.equal(grads[True][n], g) for n, g in grads[False].items())  # the packing did act


def test_frozen_chunks_on_threads_match_the_loop_and_restore_the_pool():
    """quantize.map_chunks: the int8 image forward's chunks on threads give the sequential loop's features
    and taps bit for bit, in order; torch's intra-op thread count is what it was, also after an error."""
    b = load_backbone("tiny")
    m = build_method("ladder", b, NAMES, frozen="int8", frozen_chunk=3)
    x = _pixels(8)  # chunks of 3, 3, 2
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feats, taps = m._frozen_image(x)
        assert torch.get_num_threads() == 2
        with torch.no_grad():
            ref = [b.encode_image(c, taps=[0] + [i + 1 for i in m.v_layers]) for c in x.split(3)]
        assert torch.equal(feats, torch.cat([r[0] for r in ref]))
        assert all(torch.equal(t, torch.cat([r[1][i] for r in ref])) for i, t in enumerate(taps))

        chunks = list(x.split(3))
        for bad in (1, 2):  # a worker's chunk, this thread's chunk
            def fail(c, bad=bad):
                if c.data_ptr() == chunks[bad].data_ptr():
                    raise RuntimeError(f"chunk {bad} failed")
                return c
            with torch.no_grad(), pytest.raises(RuntimeError, match=f"chunk {bad} failed"):
                Q.map_chunks(fail, chunks)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_recompute_auto_is_the_mlp_half_for_int8_only():
    b = load_backbone("tiny")
    assert build_method("ladder", b, NAMES)._recompute() == "block"
    assert build_method("ladder", b, NAMES, frozen="int8")._recompute() == "mlp"
    assert build_method("ladder", b, NAMES, frozen="int8", recompute="block")._recompute() == "block"
    with pytest.raises(ValueError, match="recompute"):
        build_method("ladder", b, NAMES, recompute="all")
