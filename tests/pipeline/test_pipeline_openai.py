"""OpenAI / open_clip checkpoint files as --model: a tiny CLIP converted to OpenAI's layout, saved as a plain
state dict, as open_clip wraps it and as a TorchScript archive, loads back with the same logits; files that
hold more than weights are refused unrun; CLIP's vocabulary is found in an installed package."""
import gzip
import json
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from ladder_clip import openai_clip
from ladder_clip.backbone import OPENAI_MEAN, OPENAI_STD, load_backbone, tiny_clip
from ladder_clip.cli import main
from ladder_clip.errors import UserError
from ladder_clip.synthetic import make_imagefolder
from ladder_clip.tokenizer import bpe_tokenizer, byte_level_tokenizer, find_clip_merges

FP32 = dict(rtol=1e-5, atol=1e-5)


def _pooled(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output


def _clip(seed: int = 0, act: str = "quick_gelu"):
    """A small CLIP whose head counts follow OpenAI's 64-channels-a-head rule (the weights do not say)."""
    from transformers import CLIPConfig, CLIPModel

    tok = byte_level_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=256, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, hidden_act=act),
        vision_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        for p in model.parameters():  # LayerNorms and biases away from their 1 / 0 init, so a swap shows
            p.data.add_(torch.randn_like(p) * 0.02)
    return model, tok


class _Tree(nn.Module):
    """Modules nested by the dotted names of a state dict, its tensors as parameters: what a TorchScript
    archive of OpenAI's model holds, without OpenAI's code."""

    def __init__(self, tensors: dict):
        super().__init__()
        children = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = t
            elif t.is_floating_point():
                self.register_parameter(head, nn.Parameter(t.clone(), requires_grad=False))
            else:
                self.register_buffer(head, t.clone())
        for head, sub in children.items():
            self.add_module(head, _Tree(sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript(sd: dict, path) -> None:
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; OpenAI's files are still archives
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_Tree(sd)), str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny model, its OpenAI-layout weights, and a folder with its tokenizer."""
    model, tok = _clip()
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return model, openai_clip.to_openai_state_dict(model), str(folder)


def test_openai_layout_names_and_shapes(converted):
    model, sd, _ = converted
    assert sd["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape == (512, 128)
    assert sd["visual.proj"].shape == (128, 48) and sd["text_projection"].shape == (64, 48)
    assert sd["visual.conv1.weight"].shape == (128, 3, 8, 8) and sd["visual.positional_embedding"].shape == (17, 128)
    config = openai_clip.clip_config(sd, 512, 513)
    assert (config.vision_config.image_size, config.vision_config.num_attention_heads,
            config.text_config.num_attention_heads, config.text_config.max_position_embeddings) == (32, 2, 1, 32)


def _write(sd, path, fmt):
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "open_clip":  # a training checkpoint of a DistributedDataParallel model
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "torchscript":  # with the non-weights OpenAI's archives carry, and a text attention mask
        extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
                 "vocab_size": torch.tensor(514), "transformer.resblocks.0.attn_mask": torch.ones(32, 32)}
        _torchscript({**sd, **extra}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))


@pytest.mark.parametrize("fmt,name", [("plain", "ViT-B-16.pt"), ("open_clip", "epoch_3.pt"),
                                      ("torchscript", "ViT-B-16.pt"), ("safetensors", "m.safetensors")])
def test_round_trip_same_logits(converted, tmp_path, fmt, name):
    model, sd, tok_dir = converted
    path = tmp_path / name
    _write(sd, path, fmt)
    b = load_backbone(str(path), tokenizer=tok_dir)
    assert b.name == os.path.abspath(path)
    assert b.preprocess == {"size": 32, "crop": 32, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    assert b.clip.config.text_config.hidden_act == b.clip.config.vision_config.hidden_act == "quick_gelu"
    ids = b.tokenize(["a photo of a red circle.", "blue", "a green triangle on noise"])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=px)
        got = b.clip(input_ids=ids, pixel_values=px)
        torch.testing.assert_close(b.encode_image(px), _pooled(model.get_image_features(pixel_values=px)), **FP32)
        torch.testing.assert_close(b.encode_text(ids), _pooled(model.get_text_features(input_ids=ids)), **FP32)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, **FP32)
    torch.testing.assert_close(got.logits_per_text, want.logits_per_text, **FP32)
    back = openai_clip.to_openai_state_dict(b.clip)
    assert back.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


def _openai_forward(sd, ids, px, text_heads, vision_heads):
    """OpenAI's ViT CLIP forward written straight against the OpenAI-layout weights, with torch's own
    multi-head attention on the fused in_proj: checks the renaming and transposes against the layout's
    meaning, not only against their own inverse."""
    F = torch.nn.functional

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def blocks(x, prefix, heads, mask=None):  # x (L, N, D), sequence first as OpenAI's model runs it
        i = 0
        while f"{prefix}{i}.ln_1.weight" in sd:
            p = f"{prefix}{i}."
            h = ln(x, p + "ln_1")
            x = x + F.multi_head_attention_forward(
                h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None,
                None, False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
                need_weights=False, attn_mask=mask)[0]
            h = F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
            x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
            i += 1
        return x

    w = sd["visual.conv1.weight"]
    x = F.conv2d(px, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (N, grid², width)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre").transpose(0, 1), "visual.transformer.resblocks.", vision_heads).transpose(0, 1)
    image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    length = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = ln(blocks(x.transpose(0, 1), "transformer.resblocks.", text_heads, causal).transpose(0, 1), "ln_final")
    text = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # the end token has the top id
    return image, text


def test_converted_model_computes_openais_forward(converted, tmp_path):
    _, sd, tok_dir = converted
    torch.save(sd, tmp_path / "ViT.pt")
    b = load_backbone(str(tmp_path / "ViT.pt"), tokenizer=tok_dir)
    ids, px = b.tokenize(["a red circle", "the blue square on noise"]), torch.randn(3, 3, 32, 32)
    image, text = _openai_forward(sd, ids, px, text_heads=1, vision_heads=2)
    with torch.no_grad():
        torch.testing.assert_close(b.encode_image(px), image, **FP32)
        torch.testing.assert_close(b.encode_text(ids), text, **FP32)


def test_other_head_counts_by_override():
    model, tok = tiny_clip()  # widths 32 / 48 with 2 heads each: not OpenAI's rule
    sd = openai_clip.to_openai_state_dict(model)
    config = openai_clip.clip_config(sd, tok.bos_token_id, tok.eos_token_id, heads=(2, 2))
    again = openai_clip.from_openai_state_dict(sd, config)
    ids, px = torch.tensor([[512, 70, 80, 513]]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px).logits_per_image,
                                   model(input_ids=ids, pixel_values=px).logits_per_image, **FP32)


def test_torchscript_reader_reads_every_tensor(tmp_path):
    """fp16 weights (as OpenAI ships them), integer buffers, a transposed view, an empty tensor."""
    base = torch.randn(6, 4)
    sd = {"visual.conv1.weight": torch.randn(8, 3, 2, 2).half(), "a.b.c.d": torch.arange(5),
          "proj": base.t(), "ln.bias": torch.zeros(0), "flag": torch.tensor([True, False])}
    _torchscript(sd, tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as z:  # the layout the reader relies on
        names = z.namelist()
    assert "m/data.pkl" in names and "m/constants.pkl" in names and any(n.startswith("m/data/") for n in names)
    got = openai_clip.read_state_dict(str(tmp_path / "m.pt"))
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_file_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"visual.proj": torch.zeros(2, 2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused.*system"):
        load_backbone(str(tmp_path / "evil.pt"))
    # the same payload as a TorchScript archive's data.pkl (for the restricted unpickler, not torch.load)
    with zipfile.ZipFile(tmp_path / "evil_ts.pt", "w") as z:
        z.writestr("evil_ts/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        z.writestr("evil_ts/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil_ts/version", "3\n")
    with pytest.raises(UserError, match="refusing to load .*system"):
        load_backbone(str(tmp_path / "evil_ts.pt"))
    assert not marker.exists()


def test_bad_checkpoint_files(converted, tmp_path):
    _, sd, tok_dir = converted
    resnet = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(1),
              "visual.attnpool.positional_embedding": torch.zeros(50, 64), **{k: v for k, v in sd.items()
                                                                                if not k.startswith("visual.")}}
    torch.save(resnet, tmp_path / "RN50.pt")
    with pytest.raises(UserError, match="ResNet.*only ViT"):
        load_backbone(str(tmp_path / "RN50.pt"), tokenizer=tok_dir)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.bin.*not a checkpoint"):
        load_backbone(str(tmp_path / "junk.bin"))
    torch.save({**sd, "visual.ls_1.gamma": torch.ones(128)}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="does not use: visual.ls_1.gamma"):
        load_backbone(str(tmp_path / "extra.pt"), tokenizer=tok_dir)
    torch.save({k: v for k, v in sd.items() if k != "ln_final.bias"}, tmp_path / "short.pt")
    with pytest.raises(UserError, match="lacks 'ln_final.bias'"):
        load_backbone(str(tmp_path / "short.pt"), tokenizer=tok_dir)
    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(UserError, match="514 rows but the tokenizer has 49408|no CLIP vocabulary"):
        load_backbone(str(tmp_path / "ok.pt"))  # no tokenizer given, and none installed here


MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"]


@pytest.fixture
def fake_open_clip(tmp_path, monkeypatch):
    """An `open_clip` package that fails if imported, shipping a 6-merge vocabulary file."""
    pkg = tmp_path / "site" / "open_clip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the vocabulary finder must not import open_clip')\n")
    with gzip.open(pkg / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2"] + MERGES) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return str(pkg / "bpe_simple_vocab_16e6.txt.gz")


def test_vocabulary_from_an_installed_package(fake_open_clip):
    assert find_clip_merges() == fake_open_clip
    tok = bpe_tokenizer(fake_open_clip)
    # 256 bytes, 256 end-of-word bytes, one token per merge (512..517), then start 518 and end 519
    assert len(tok) == 520 and (tok.bos_token_id, tok.eos_token_id) == (518, 519)
    b_end = 256 + (ord("b") - ord("!"))  # "b</w>": byte symbols start at "!"
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("cat") == [513] and ids("Dog") == [515] and ids("the cat") == [517, 513]
    assert ids("cab") == [512, b_end]  # "c a" merges, "ca b</w>" is no merge
    assert tok("cat")["input_ids"] == [518, 513, 519]


def test_checkpoint_uses_the_found_vocabulary(fake_open_clip, tmp_path):
    model, _ = _clip()
    from transformers import CLIPModel

    config = model.config
    config.text_config.vocab_size = 520
    config.text_config.bos_token_id, config.text_config.eos_token_id = 518, 519
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = CLIPModel(config).eval()
    torch.save(openai_clip.to_openai_state_dict(model), tmp_path / "ViT.pt")
    b = load_backbone(str(tmp_path / "ViT.pt"))
    assert len(b.tokenizer) == 520 and b.token_ids("the cat") == [517, 513]
    ids = b.tokenize(["the cat", "dog"])
    with torch.no_grad():
        torch.testing.assert_close(b.encode_text(ids), _pooled(model.get_text_features(input_ids=ids)), **FP32)


def test_cli_zeroshot_on_a_checkpoint_file(converted, tmp_path, capsys):
    _, sd, tok_dir = converted
    torch.save(sd, tmp_path / "ViT-B-16.pt")
    data = tmp_path / "data"
    make_imagefolder(str(data), ["red_circle", "blue_square"], train_per_class=2, test_per_class=2, size=36, seed=1)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tmp_path / "ViT-B-16.pt"), "--tokenizer", tok_dir, "--data", str(data),
                 "--method", "zeroshot", "--shots", "1", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert main(["eval", "--model", str(tmp_path / "ViT-B-16.pt"), "--tokenizer", tok_dir, "--data", str(data),
                 "--checkpoint", str(out / "prompt.safetensors")]) == 0
    capsys.readouterr()
    code = main(["train", "--model", str(tmp_path / "ViT-B-16.pt"), "--data", str(data), "--method", "zeroshot",
                 "--out", str(tmp_path / "out2"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--tokenizer" in err[0], err


def test_gelu_checkpoint_needs_its_activation(converted, tmp_path, capsys):
    """The weights do not record the MLP activation: a GELU model (most LAION open_clip ones) is only right
    with --activation gelu, which the CLI takes for a checkpoint file and refuses for anything else."""
    _, _, tok_dir = converted
    model, _ = _clip(seed=1, act="gelu")
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openai_clip.to_openai_state_dict(model), path)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _pooled(model.get_image_features(pixel_values=px))
        good = load_backbone(str(path), tokenizer=tok_dir, activation="gelu")
        assert good.clip.config.vision_config.hidden_act == "gelu"
        torch.testing.assert_close(good.encode_image(px), want, **FP32)
        assert not torch.allclose(load_backbone(str(path), tokenizer=tok_dir).encode_image(px), want, **FP32)
    data = tmp_path / "data"
    make_imagefolder(str(data), ["red_circle", "blue_square"], train_per_class=2, test_per_class=2, size=36, seed=1)
    assert main(["train", "--model", str(path), "--tokenizer", tok_dir, "--activation", "gelu", "--data", str(data),
                 "--method", "zeroshot", "--shots", "1", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["train", "--model", "tiny", "--activation", "gelu", "--data", str(data), "--method", "zeroshot",
                 "--out", str(tmp_path / "out2"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--activation" in err[0], err
