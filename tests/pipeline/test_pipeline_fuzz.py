"""Fuzzing the CLI (hypothesis): random argv values, --opt pairs, crafted checkpoint headers and damaged
run files give either a correct run (status 0, no error line) or exactly one `ladder-clip: error:` line
and status 2; never a traceback, never status 1. In-process through cli.main for speed; few examples."""
import json
import os
import shutil
import tempfile

import pytest
import torch
from helpers import one_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ladder_clip import METHODS, cli
from ladder_clip.cli import main

# CI: 25 fixed examples per test; LADDER_CLIP_FUZZ_EXAMPLES=500 hunts with fresh random ones
HUNT = int(os.environ.get("LADDER_CLIP_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=HUNT or 25, deadline=None, derandomize=not HUNT,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ODD = ["-1", "0", "1", "2", "3", "nan", "inf", "-inf", "1e400", "1e-30", "abc", "", " ", "0x10", "2.5", "-0",
       "9" * 30, "--quiet", "é", "\t1"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats() | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # the same bits, ten times faster on a loaded machine
        yield


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=("red_circle", "blue_square"),
            train_per_class=2, test_per_class=1, seed=3)


def _argv(data, out, *extra):
    return ["train", "--model", "tiny", "--data", data, "--method", "coop", "--shots", "1", "--epochs", "1",
            "--batch-size", "2", "--lr", "0.01", "--out", out, "--quiet", "--opt", "n_ctx=2", *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert main(_argv(data, out)) == 0
    return out


def outcome(capsys, code):
    """0 and no error line, or 2 and exactly one error line; nothing else, and never a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ladder-clip: error:")]
    assert "Traceback" not in err, err
    assert (code == 0 and not errors) or (code == 2 and len(errors) == 1), (code, err[-3000:])
    return code


def test_the_cli_knows_every_method():
    assert set(cli.METHOD_NAMES) == set(METHODS)  # the CLI lists them without importing torch


def test_every_method_option_has_a_declared_type():
    for m in METHODS.values():
        assert set(m.options) == set(m.defaults), m.name


ARGS = ["--shots", "--epochs", "--batch-size", "--lr", "--seed", "--workers", "--precision", "--subsample",
        "--optimizer", "--method", "--device"]


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(ARGS), st.sampled_from(ODD + ["sgd", "bf16", "base", "zeroshot"])),
                        max_size=3))
def test_fuzz_train_arguments(data, capsys, changes):
    with tempfile.TemporaryDirectory() as out:
        argv = _argv(data, out)
        for arg, value in changes:
            argv += [arg, value]  # argparse keeps the last occurrence
        outcome(capsys, main(argv))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(["--batch-size", "--workers", "--subsample", "--precision",
                                                   "--device", "--split-json", "--model", "--other-classes"]),
                                  st.sampled_from(ODD + ["new", "bf16", "tiny", "/", "/nonexistent"])), max_size=3))
def test_fuzz_eval_arguments(data, run, capsys, changes):
    argv = ["eval", "--model", "tiny", "--data", data, "--checkpoint", os.path.join(run, "prompt.safetensors")]
    for arg, value in changes:
        argv += [arg] if arg == "--other-classes" else [arg, value]
    outcome(capsys, main(argv))


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(sorted({k for m in METHODS.values() for k in m.defaults})),
                                st.one_of(st.sampled_from(ODD + ["true", "false", "null", "[1]", '{"a": 1}', "NaN",
                                                                 '"auto"', "e4m3", "fisher", "svd"]),
                                          JSON.map(json.dumps))), max_size=3),
       method=st.sampled_from(["coop", "rlp", "vpt", "ladder", "zeroshot"]))
def test_fuzz_method_options(data, capsys, pairs, method):
    with tempfile.TemporaryDirectory() as out:
        argv = _argv(data, out)
        argv[argv.index("--method") + 1] = method
        argv = argv[:-2] + [x for k, v in pairs for x in ("--opt", f"{k}={v}")]
        outcome(capsys, main(argv))


def _header(path):
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["ladder_clip"])


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["format", "method", "config", "backbone", "classnames", "epoch",
                                                 "config.n_ctx", "config.ctx_init", "extra"]),
                                st.one_of(st.just("<drop>"), JSON)), min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=20).map(lambda b: b.decode("latin-1"))))
def test_fuzz_checkpoint_header(data, run, capsys, edits, raw):
    src = os.path.join(run, "prompt.safetensors")
    header = _header(src)
    for key, value in edits:
        target, _, sub = key.partition(".")
        obj = header.get("config") if sub and isinstance(header.get("config"), dict) else header
        name = sub or target
        if value == "<drop>":
            obj.pop(name, None)
        else:
            obj[name] = value
    text = raw if raw is not None else json.dumps(header)
    with tempfile.TemporaryDirectory() as d:
        ck = os.path.join(d, "c.safetensors")
        save_file(load_file(src), ck, metadata={"ladder_clip": text})
        outcome(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", ck]))


DAMAGE = st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1)),
                   st.tuples(st.just("flip"), st.floats(0, 1)),
                   st.tuples(st.just("replace"), JSON.map(lambda v: json.dumps(v).encode())))


def _damage(path, how):
    kind, arg = how
    raw = open(path, "rb").read()
    if kind == "truncate":
        raw = raw[:int(len(raw) * arg)]
    elif kind == "flip" and raw:
        i = min(len(raw) - 1, int(len(raw) * arg))
        raw = raw[:i] + bytes([raw[i] ^ 0x20]) + raw[i + 1:]
    else:
        raw = arg
    with open(path, "wb") as f:
        f.write(raw)


@FUZZ
@given(target=st.sampled_from(["state/train_state.pt", "state/history.json", "state/fewshot.json",
                               "state/prompt.safetensors", "state/manifest.json", "metrics.json",
                               "prompt.safetensors", "fewshot"]),
       how=DAMAGE)
def test_fuzz_damaged_run_files_on_resume(data, run, capsys, target, how):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "o")
        shutil.copytree(run, out)
        if target.startswith("state/"):
            path = os.path.join(out, "state", "epoch-000001", target[len("state/"):])
        elif target == "fewshot":
            path = os.path.join(out, next(f for f in os.listdir(out) if f.startswith("fewshot_")))
        else:
            path = os.path.join(out, target)
        _damage(path, how)
        argv = _argv(data, out, "--resume")
        argv[argv.index("--epochs") + 1] = "2"
        if outcome(capsys, main(argv)) == 0:  # a derived file, or damage that changed nothing: a whole run
            ok = load_file(os.path.join(out, "prompt.safetensors"))
            assert all(torch.isfinite(v).all() for v in ok.values())
            assert json.load(open(os.path.join(out, "metrics.json")))["epochs"] == 2
