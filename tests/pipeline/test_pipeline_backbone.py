"""The HF CLIP adapter: text forward from embeddings == HF's get_text_features, image taps, and loading a
save_pretrained folder (model + a tokenizer built in code) offline."""

import pytest
import torch


from ladder_clip.backbone import load_backbone, tiny_clip
from ladder_clip.errors import UserError


def _pooled(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_text_forward_from_embeddings_matches_hf(tiny):
    ids = tiny.tokenize(["a photo of a cat.", "x", "a much longer class name with many bytes"])
    hf = _pooled(tiny.clip.get_text_features(input_ids=ids))
    mine = tiny.encode_text_embeds(tiny.token_embedding(ids), tiny.eot_index(ids))
    torch.testing.assert_close(mine, hf, rtol=1e-5, atol=1e-6)
    # with the positions added by the caller (as lk.assemble_prompts does) it is the same function
    pre = tiny.token_embedding(ids) + tiny.text_pos[: ids.shape[1]]
    torch.testing.assert_close(tiny.encode_text_embeds(pre, tiny.eot_index(ids), add_pos=False), hf,
                               rtol=1e-5, atol=1e-6)


def test_text_taps_are_hf_hidden_states(tiny):
    ids = tiny.tokenize(["red circle", "blue square."])
    _, taps = tiny.encode_text(ids, taps=True)
    hs = tiny.clip.text_model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(taps) == len(hs) == tiny.text_layers + 1
    for a, b in zip(taps, hs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_image_forward_and_taps_match_hf(tiny):
    px = torch.randn(3, 3, 32, 32)
    feats, taps = tiny.encode_image(px, taps=True)
    torch.testing.assert_close(feats, _pooled(tiny.clip.get_image_features(pixel_values=px)), rtol=1e-5, atol=1e-6)
    hs = tiny.clip.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    assert len(taps) == len(hs)
    for a, b in zip(taps, hs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loads_save_pretrained_folder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_clip(seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = load_backbone(str(tmp_path))
    assert type(b.tokenizer).__name__.startswith("CLIPTokenizer")
    ids = b.tokenize(["green triangle", "a"])
    hf = _pooled(model.get_text_features(input_ids=ids))
    torch.testing.assert_close(b.encode_text(ids), hf, rtol=1e-5, atol=1e-6)
    assert b.signature() != load_backbone("tiny").signature()  # other weights: another model


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        load_backbone(str(tmp_path))
    model, _ = tiny_clip()
    model.save_pretrained(tmp_path)  # weights without tokenizer files
    with pytest.raises(UserError, match="tokenizer"):
        load_backbone(str(tmp_path))
