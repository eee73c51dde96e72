"""The ladder's ablations (--opt share / init / fusion), the `lst` method (the plain LST peer) and the
`linear-probe` baseline (issue 21, item 5): each trains and evaluates through the CLI, checkpoints record
the options and refuse a config their tensors do not fit, and each computes what it says it computes."""
import json
import math
import os
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

import helpers
from ladder_clip import build_method, load_backbone
from ladder_clip import pretrain as P
from ladder_clip.cli import main
from ladder_clip.engine.checkpoint import load_into, read_checkpoint
from ladder_clip.methods import linear_probe as LP
from ladder_clip.synthetic import make_imagefolder

# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square", "green_triangle"), train_per_class=2, test_per_class=2, seed=4)
NAMES = ["red circle", "blue square", "green triangle"]


def _train(data, out, method, *extra, model="tiny"):
    return main(["train", "--model", model, "--data", data, "--method", method, "--shots", "2", "--epochs", "1",
                 "--batch-size", "3", "--out", str(out), "--seed", "3", "--quiet", *extra])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One 1-epoch ladder run per ablation option, trained on first use: {opt: run folder}."""
    root, done = tmp_path_factory.mktemp("ablations"), {}

    def get(opt):
        if opt not in done:
            out = root / opt.replace("=", "-")
            assert _train(data, out, "ladder", "--opt", opt) == 0
            done[opt] = out
        return done[opt]
    return get


@pytest.mark.parametrize("opt", ["share=false", "init=random", "fusion=sum"])
def test_ablation_trains_evaluates_and_round_trips(data, runs, capsys, opt):
    out = runs(opt)
    key, value = opt.split("=")
    value = {"true": True, "false": False}.get(value, value)
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"][key] == value and m["trainable_parameters"] > 0
    path = str(out / "prompt.safetensors")
    header, tensors = read_checkpoint(path)
    assert header["config"][key] == value  # the checkpoint records the option
    b = load_backbone("tiny")
    method = build_method("ladder", b, header["classnames"], **header["config"])
    load_into(method, tensors, path)
    back = method.state_to_save()
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    if key == "share":  # the text side's own blocks and LayerNorm, at the text width / reduction
        assert tensors["ln_t.weight"].shape == (b.text_width // 4,) and "blocks_t.0.mlp.fc1.weight" in tensors
        assert tensors["txt_b"].shape[1] == b.text_width // 4 and tensors["ln.weight"].shape == (b.vision_width // 4,)
    if key == "fusion":
        assert not any(k.startswith("fuse_") and k.endswith(".gate") for k in tensors)
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--data", data, "--checkpoint", path]) == 0
    assert f"ladder: accuracy {m['accuracy']:.4f}" in capsys.readouterr().out


def _relabelled(src, dst, **config):
    """A copy of checkpoint `src` whose header claims other options."""
    with safe_open(src, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["ladder_clip"])
    header["config"].update(config)
    save_file(tensors, dst, metadata={"ladder_clip": json.dumps(header)})
    return dst


def test_checkpoint_refuses_the_other_share(data, runs, capsys, tmp_path):
    separate = _relabelled(str(runs("share=false") / "prompt.safetensors"), str(tmp_path / "a.safetensors"),
                           share=True)
    helpers.one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", separate]),
                      "does not fit method 'ladder'", "blocks_t.")
    shared = _relabelled(str(runs("init=random") / "prompt.safetensors"), str(tmp_path / "b.safetensors"),
                         share=False)
    helpers.one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", shared]),
                      "share=False needs ln_t.weight", "no such tensor")


def test_sum_fusion_is_side_plus_linear_tap():
    b = load_backbone("tiny")
    m = build_method("ladder", b, NAMES, fusion="sum")
    f = m.fuse_t[1]
    assert [n for n, _ in f.named_parameters()] == ["weight", "bias"]  # no gate
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        f.weight.copy_(torch.randn(f.weight.shape, generator=g))
        f.bias.copy_(torch.randn(f.bias.shape, generator=g))
    s = torch.randn(2, 3, f.side_dim, generator=g, requires_grad=True)
    tap = torch.randn(2, 3, f.tap_dim, generator=g, requires_grad=True)
    out = m.fuse(f, s, tap)
    w, bias = f.weight.detach().tolist(), f.bias.detach().tolist()
    sv, tv, ov = s[1, 2].tolist(), tap[1, 2].tolist(), out[1, 2].tolist()
    for j in range(f.side_dim):  # one token by hand: s + sum_k W[j, k] tap[k] + b[j]
        want = sv[j] + sum(w[j][k] * tv[k] for k in range(f.tap_dim)) + bias[j]
        assert ov[j] == pytest.approx(want, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(out, s + tap @ f.weight.t() + f.bias)  # and every token
    out.sum().backward()
    assert tap.grad is None  # the tap is detached: nothing goes back into CLIP
    torch.testing.assert_close(s.grad, torch.ones_like(s))  # no gate: the side state passes through whole
    torch.testing.assert_close(f.bias.grad, torch.full_like(f.bias, 6.0))
    lst = build_method("lst", b, NAMES, fusion="sum")
    torch.testing.assert_close(lst.fuse(f, s, tap), out)


def test_random_init_differs_from_pruned_and_is_seeded():
    b = load_backbone("tiny")

    def state(seed, **opts):
        torch.manual_seed(seed)
        return build_method("ladder", b, NAMES, **opts).state_to_save()

    r1, r2, r3, p = state(5, init="random"), state(5, init="random"), state(6, init="random"), state(5)
    assert r1.keys() == p.keys() and all(r1[k].shape == p[k].shape for k in p)  # the same shapes
    assert all(torch.equal(r1[k], r2[k]) for k in r1)  # seeded
    for k in ("blocks.0.self_attn.q_proj.weight", "blocks.1.mlp.fc1.weight", "down_v.weight", "down_t.weight",
              "fuse_v.0.weight", "fuse_t.1.bias"):
        assert not torch.equal(r1[k], p[k]), k  # not pruned CLIP
        assert not torch.equal(r1[k], r3[k]), k  # another seed, other weights
    assert set(p["down_v.weight"].unique().tolist()) == {0.0, 1.0}  # pruned: a channel selection
    assert r1["down_v.weight"].unique().numel() > 2
    for k in ("ln.weight", "blocks.0.layer_norm1.weight"):  # fresh LayerNorms start at one and zero
        assert torch.equal(r1[k], torch.ones_like(r1[k])) and not r1[k.replace("weight", "bias")].any()
    assert not r1["up_v.weight"].any() and not r1["up_t.weight"].any()  # training starts at zero-shot CLIP
    with pytest.raises(ValueError, match="importance=fisher .* needs init=pruned"):
        build_method("ladder", b, NAMES, init="random", importance="fisher")
    with pytest.raises(ValueError, match="tap_dtype .* needs fusion=gated"):
        build_method("ladder", b, NAMES, fusion="sum", tap_dtype="e4m3")


@pytest.mark.parametrize("opts", [{}, {"share": False, "fusion": "sum"}])
def test_lst_computes_the_ladders_logits(opts):
    """Same weights in, same logits and gradients out (tests/benchmarks/test_bench_train_step.py's check,
    through the package's method and with the ablations)."""
    b = load_backbone("tiny")
    ladder, lst = build_method("ladder", b, NAMES, **opts), build_method("lst", b, NAMES, **opts)
    assert lst.cfg["checkpoint"] is False and lst.cfg["frozen_chunk"] == 0  # LST keeps activations
    lst.load_state_dict(ladder.state_dict())
    with torch.no_grad():  # a non-zero low-rank term and side output, so every path carries signal
        for m in (ladder, lst):
            m.txt_a.fill_(0.3)
            m.visual.lowrank_a.fill_(-0.2)
            m.up_v.weight.fill_(0.01)
            m.up_t.weight.fill_(0.02)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1])
    out = {}
    for name, m in (("ladder", ladder), ("lst", lst)):
        logits = m(x)
        F.cross_entropy(logits, y).backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["lst"][0], out["ladder"][0], rtol=1e-5, atol=1e-5)
    assert out["lst"][1].keys() == out["ladder"][1].keys()
    for k, g in out["ladder"][1].items():
        torch.testing.assert_close(out["lst"][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_lst_trains_with_its_recipe(data, tmp_path, capsys):
    assert _train(data, tmp_path, "lst") == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["recipe"]["name"] == "lst" and m["recipe"]["optimizer"] == "adamw" and m["recipe"]["lr"] == 3e-3
    assert "Ladder-Side-Tuning" in m["recipe"]["source"] and len(m["loss_curve"]) == 2
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--data", data, "--checkpoint", str(tmp_path / "prompt.safetensors")]) == 0
    assert f"lst: accuracy {m['accuracy']:.4f}" in capsys.readouterr().out


# ---- linear-probe ----------------------------------------------------------------------------------------

def test_logistic_fit_is_the_penalised_optimum_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(24, 8, generator=g, dtype=torch.float64), dim=-1)
    y = torch.arange(24) % 3
    w, b = LP.fit_logistic(x, y, 3, 0.5)
    w2, b2 = LP.fit_logistic(x, y, 3, 0.5)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    # the objective's gradient vanishes there: mean CE + ||W||^2 / (2 C n), the bias not penalised
    wv, bv = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ wv.t() + bv, y) + wv.pow(2).sum() / (2 * 0.5 * 24)
    gw, gb = torch.autograd.grad(loss, (wv, bv))
    assert gw.abs().max() < LP.TOL and gb.abs().max() < LP.TOL
    assert LP.fit_logistic(x, y, 3, 50.0)[0].norm() > w.norm() > LP.fit_logistic(x, y, 3, 0.005)[0].norm()


def test_c_search_follows_coops(monkeypatch):
    """The grid, then 8 rounds halving a log10 interval towards the better end: with a validation accuracy
    peaked at log10(C) = 0.3 it ends within the last interval's width of it."""
    tried = []
    monkeypatch.setattr(LP, "fit_logistic", lambda x, y, k, c: (tried.append(c) or c, None))
    monkeypatch.setattr(LP, "accuracy", lambda x, y, c, b: -abs(math.log10(c) - 0.3))
    c = LP.search_c((None, None), (None, None), 3)
    assert tried[:7] == list(LP.C_GRID) and len(tried) == 7 + 2 * 8
    assert tried[7:9] == pytest.approx([0.1, 10.0])  # a decade either side of the grid's best (1)
    assert abs(math.log10(c) - 0.3) < 2 / 2 ** 8 + 1e-9


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """tiny-pretrained (built in a cache of the module's own) and the four classes it never saw captioned,
    drawn on the shifted background (tests/pipeline/test_pipeline_learning.py's set), 4 shots."""
    root = tmp_path_factory.mktemp("probe")
    old = os.environ.get("LADDER_CLIP_CACHE")
    os.environ["LADDER_CLIP_CACHE"] = str(root / "cache")
    try:
        data = str(root / "data")
        make_imagefolder(data, [n.replace(" ", "_") for n in P.UNSEEN], train_per_class=4, test_per_class=8,
                         background=P.SHIFTED_BACKGROUND)
        yield data, root
    finally:
        if old is None:
            os.environ.pop("LADDER_CLIP_CACHE", None)
        else:
            os.environ["LADDER_CLIP_CACHE"] = old


def test_linear_probe_learns_is_deterministic_and_eval_agrees(learnable, capsys, monkeypatch):
    data, root = learnable
    out = root / "probe"
    assert main(["train", "--model", "tiny-pretrained", "--data", data, "--method", "linear-probe", "--shots", "4",
                 "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] >= 0.75, m["accuracy"]  # measured 0.969 (31 of 32); zero-shot 0.75, chance 0.25
    assert m["recipe"]["name"] == "linear-probe" and m["config"]["C"] == LP.DEFAULT_C  # no validation split
    assert m["loss_curve"][0] == pytest.approx(math.log(4)) and m["loss_curve"][1] < m["loss_curve"][0]
    path = str(out / "prompt.safetensors")
    header, tensors = read_checkpoint(path)
    assert header["epoch"] == 1 and tensors["weight"].shape[0] == 4 and tensors["bias"].any()
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-pretrained", "--data", data, "--checkpoint", path]) == 0
    assert f"linear-probe: accuracy {m['accuracy']:.4f}" in capsys.readouterr().out
    # a second fit of the same few-shot images gives the same weights, bit for bit
    from ladder_clip import data as D

    names, splits = D.load_data(data)
    train_items = D.parse_fewshot((out / "state" / "epoch-000001" / "fewshot.json").read_text(), data, len(names), "")
    probe = build_method("linear-probe", load_backbone("tiny-pretrained"), names)
    cfg = types.SimpleNamespace(base_to_new=False, recipe_values={"overridden": []}, batch_size=64, workers=0,
                                shots=4, seed=1)
    probe.fit(cfg, train_items)
    assert torch.equal(probe.weight.detach(), tensors["weight"]) and torch.equal(probe.bias.detach(), tensors["bias"])
    # with a validation split, C comes from the search (test_c_search_follows_coops) on min(shots, 4)
    # validation images per class, drawn with the seed; the weights are the fit at that C
    seen = []
    monkeypatch.setattr(LP, "search_c", lambda train, val, k, quiet=True: seen.append((train, val, k)) or 2.5)
    probe.fit(types.SimpleNamespace(**{**vars(cfg), "shots": 2}), train_items, splits["test"])
    (train, val, k), = seen
    assert k == 4 and len(train[0]) == 16 and val[1].bincount().tolist() == [2, 2, 2, 2]
    assert torch.equal(val[0], probe.features(D.few_shot(splits["test"], 2, 1, names), 64)[0])
    assert probe.fitted_c == 2.5 and probe.config() == {"C": 2.5}
    torch.testing.assert_close(probe.weight.detach(), LP.fit_logistic(*train, 4, 2.5)[0].float(), rtol=0, atol=0)


def test_linear_probe_refuses_other_classes(data, capsys, tmp_path):
    helpers.one_error(capsys, _train(data, tmp_path / "b2n", "linear-probe", "--base-to-new"),
                      "--base-to-new: a linear probe")
    assert _train(data, tmp_path / "run", "linear-probe") == 0
    other = helpers.image_folder(tmp_path / "other", classes=("red_square", "blue_circle", "green_circle"),
                                 train_per_class=1, test_per_class=1)
    helpers.one_error(capsys, main(["eval", "--model", "tiny", "--data", other, "--checkpoint",
                                    str(tmp_path / "run" / "prompt.safetensors"), "--other-classes"]),
                      "learned class weights for its own classes; it cannot score other classes")
