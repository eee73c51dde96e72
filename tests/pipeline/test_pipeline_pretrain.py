"""`--model tiny-pretrained` (pretrain.py): the tiny CLIP pretrained on generated pairs, cached, rebuilt
when missing, and zero-shot clearly above chance on classes it never saw (pairings left out)."""
import json
import os

import pytest
import torch

from ladder_clip import pretrain as P
from ladder_clip.cli import main
from ladder_clip.synthetic import make_imagefolder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pretraining for the module (15 s on 2 cores, more when loaded), in a cache of its own."""
    root = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("LADDER_CLIP_CACHE")
    os.environ["LADDER_CLIP_CACHE"] = root
    try:
        P.pretrained_tiny()
        yield root
    finally:
        if old is None:
            os.environ.pop("LADDER_CLIP_CACHE", None)
        else:
            os.environ["LADDER_CLIP_CACHE"] = old


def test_unseen_classes_are_pairings_never_captioned():
    assert len(P.UNSEEN) == 4 and not set(P.UNSEEN) & set(P.SEEN) and len(P.SEEN) == 12
    words = {w for n in P.SEEN for w in n.split()}
    assert all(w in words for n in P.UNSEEN for w in n.split())  # each word seen, never the pairing


def test_zero_shot_on_unseen_classes_is_clearly_above_chance(cache, tmp_path):
    data = tmp_path / "d"
    make_imagefolder(str(data), [n.replace(" ", "_") for n in P.UNSEEN], train_per_class=1, test_per_class=12,
                     size=40, seed=21)
    out = tmp_path / "zs"
    assert main(["train", "--model", "tiny-pretrained", "--data", str(data), "--method", "zeroshot", "--shots",
                 "1", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] >= 0.6, m["accuracy"]  # chance is 0.25
    assert m["model"] == os.path.join(cache, P.VERSION)


def test_cached_model_is_reused_and_rebuilt_when_missing(cache, monkeypatch, tmp_path):
    def fail(*a, **k):
        raise AssertionError("pretrained again although cached")

    monkeypatch.setattr(P, "pretrain", fail)
    assert P.pretrained_tiny() == os.path.join(cache, P.VERSION)
    monkeypatch.setenv("LADDER_CLIP_CACHE", str(tmp_path / "fresh"))
    from ladder_clip.backbone import tiny_clip

    calls = []
    monkeypatch.setattr(P, "pretrain", lambda: calls.append(1) or tiny_clip())
    path = P.pretrained_tiny()
    assert calls == [1] and os.path.isfile(os.path.join(path, "config.json"))
    assert not [f for f in os.listdir(tmp_path / "fresh") if f.startswith(".tmp-")]


def test_pretraining_gives_the_same_model_every_run():
    """v1 did not (all threads, no clipping: its zero-shot on the unseen classes went from 0.25 to 1.0
    between runs of one seed); a short run twice must give the same weights, bit for bit."""
    a, _ = P.pretrain(steps=6)
    b, _ = P.pretrain(steps=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
