"""CoOp's class-specific context and class-token positions, MaPLe's n_ctx (the rest of the init text stays
frozen), and CoOp's per-dataset zero-shot templates."""
import pytest
import torch

from ladder_clip.backbone import load_backbone
from ladder_clip.cli import main
from ladder_clip.config import TrainConfig
from ladder_clip.errors import UserError
from ladder_clip.methods import build_method
from ladder_clip.prompts import TEMPLATES, dataset_template
from ladder_clip.synthetic import make_imagefolder

NAMES = ["red circle", "blue square", "green big triangle"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny")


def test_csc_learns_one_context_per_class(backbone):
    m = build_method("coop", backbone, NAMES, n_ctx=3, csc=True)
    assert m.ctx.shape == (3, 3, backbone.text_width)
    m.text_features().sum().backward()
    assert m.ctx.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every class's context gets a gradient
    with pytest.raises(ValueError, match="csc"):
        m.set_classnames(NAMES[:2])
    shared = build_method("coop", backbone, NAMES, n_ctx=3)
    assert shared.ctx.shape == (3, backbone.text_width)


@pytest.mark.parametrize("position", ["front", "middle"])
def test_class_token_position(backbone, position):
    m = build_method("coop", backbone, NAMES, n_ctx=4, class_token_position=position)
    lay, x = m.layout, backbone.token_ids("X")[0]
    name = backbone.token_ids(NAMES[2])
    row = lay.ids[2].tolist()
    ctx_at = lay.ctx_pos[2].tolist()
    assert all(row[p] == x for p in ctx_at)
    if position == "front":
        assert row[1:1 + len(name)] == name and ctx_at == list(range(1 + len(name), 5 + len(name)))
    else:
        assert ctx_at[:2] == [1, 2] and row[3:3 + len(name)] == name and ctx_at[2] == 3 + len(name)
    assert row[ctx_at[-1] + 1:ctx_at[-1] + 2] == backbone.token_ids(".")
    assert int(lay.eot[2]) == ctx_at[-1] + 2
    feats = m.text_features()
    assert feats.shape == (3, backbone.embed_dim) and torch.isfinite(feats).all()
    feats.sum().backward()
    assert m.ctx.grad.abs().sum() > 0


def test_placed_prompt_at_the_end_equals_the_fused_assembly(backbone):
    from dataclasses import replace

    from ladder_clip.prompts import place

    m = build_method("coop", backbone, NAMES, n_ctx=3)
    with torch.no_grad():
        m.ctx.normal_()
    lay = m.layout
    pos = torch.arange(1, 4).expand(3, 3)
    x = place(replace(lay, ctx_pos=pos), m.embeds, m.ctx)
    via_place = backbone.encode_text_embeds(x, lay.eot)
    torch.testing.assert_close(via_place, m.text_features(), rtol=1e-5, atol=1e-5)


def test_maple_learns_n_ctx_init_tokens_and_keeps_the_rest_as_text(backbone):
    m = build_method("maple", backbone, NAMES)  # ctx_init 'a photo of a', n_ctx 2
    ids = backbone.token_ids("a photo of a")
    assert m.ctx.shape == (2, backbone.text_width) and m.deep_text.shape[1] == 2
    torch.testing.assert_close(m.ctx.detach(), backbone.token_embedding(torch.tensor(ids[:2])).float())
    assert m.layout.n_ctx == 2
    assert m.layout.ids[0, 1:1 + len(ids)].tolist() == ids  # the frozen rest stays in the text
    _, learned, suffix = m.layout.split(m.embeds)
    assert learned.shape[1] == 2
    frozen = backbone.token_embedding(torch.tensor(ids[2:])).expand(3, -1, -1)
    torch.testing.assert_close(suffix[:, :len(ids) - 2], frozen)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_maple_without_init_is_n_ctx_gaussian_tokens(backbone):
    torch.manual_seed(0)
    m = build_method("maple", backbone, NAMES, ctx_init="", n_ctx=48)
    assert m.ctx.shape == (48, backbone.text_width)
    assert 0.015 < float(m.ctx.detach().std()) < 0.025 and abs(float(m.ctx.detach().mean())) < 0.005
    with pytest.raises(ValueError, match="n_ctx"):
        build_method("maple", backbone, NAMES, ctx_init="ab", n_ctx=3)  # 'ab' is 2 byte tokens here


def test_templates_by_split_file_name():
    assert dataset_template("/x/split_zhou_OxfordPets.json") == "a photo of a {}, a type of pet."
    assert dataset_template("split_zhou_DescribableTextures.json") == "{} texture."
    assert dataset_template("split_zhou_EuroSAT.json") == "a centered satellite photo of {}."
    assert dataset_template("split_fgvcaircraft.json") == "a photo of a {}, a type of aircraft."
    assert dataset_template("my_split.json") is None
    assert len(TEMPLATES) == 11


def test_template_goes_to_the_methods_that_use_one():
    kw = dict(model="tiny", data="d", out="o", split_json="/s/split_zhou_Food101.json")
    assert TrainConfig(method="zeroshot", **kw).method_options["template"] == "a photo of {}, a type of food."
    assert TrainConfig(method="vpt", **kw, template="{} !").method_options["template"] == "{} !"
    given = TrainConfig(method="apt", **kw, method_options={"template": "a {}."})
    assert given.method_options["template"] == "a {}."  # an explicit --opt wins
    with pytest.raises(UserError, match="--template"):
        TrainConfig(method="coop", model="tiny", data="d", out="o", template="{}")


def test_csc_checkpoint_on_other_classes_is_one_error(tmp_path, capsys):
    data, other = tmp_path / "d", tmp_path / "e"
    make_imagefolder(str(data), ["red_circle", "blue_square"], train_per_class=1, test_per_class=1, size=36)
    make_imagefolder(str(other), ["green_triangle", "blue_square", "red_circle"], train_per_class=1,
                     test_per_class=1, size=36)
    assert main(["train", "--model", "tiny", "--data", str(data), "--method", "coop", "--shots", "1",
                 "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet", "--opt", "n_ctx=2",
                 "--opt", "csc=true", "--opt", "class_token_position=middle"]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", "tiny", "--data", str(other), "--other-classes", "--checkpoint",
                 str(tmp_path / "o" / "prompt.safetensors")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "class-specific" in err[0], err
