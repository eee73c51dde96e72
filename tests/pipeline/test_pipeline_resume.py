"""The epoch commit (state.py): a run killed at any instant and resumed with --resume ends with the same
weights as an uninterrupted run, bit for bit on CPU, with its whole loss curve; a non-finite loss stops
training and keeps the last good epoch; a damaged commit is one error line; --resume works from another
working directory."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import one_thread
from safetensors.torch import load_file

from ladder_clip import files
from ladder_clip.cli import main

EPOCHS = 2


class Killed(BaseException):
    """What the fault hook raises in-process instead of os._exit: like a SIGKILL, no `except Exception`
    cleanup runs on the way out (temp files stay, as a real kill leaves them)."""




def _argv(data, out, *extra, method="rlp"):
    # rlp with dropout: the resumed run must also restore the RNG for the dropout draws to match
    return ["train", "--model", "tiny", "--data", str(data), "--method", method, "--shots", "2", "--epochs",
            str(EPOCHS), "--batch-size", "2", "--lr", "0.05", "--out", str(out), "--seed", "4", "--quiet",
            "--opt", "dropout=0.3", *extra]


@pytest.fixture(autouse=True)
def _one_thread():
    # bits equal whatever the thread count (the kernels are tested for it); one thread is 10x faster
    # on a loaded 2-core machine, and the subprocesses below get one too
    with one_thread():
        yield


def _weights(out):
    return load_file(os.path.join(out, "prompt.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_clean(out):
    names = [f for _, ds, fs in os.walk(out) for f in ds + fs]
    assert not [n for n in names if n.startswith(files.TMP_PREFIX)], names
    assert len(os.listdir(os.path.join(out, "state"))) == 1


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main(_argv(data, out)) == 0
    return out, _weights(out), json.loads((out / "metrics.json").read_text()), list(files._ops)


def _killed_after_first_epoch(argv, monkeypatch, ops):
    """Runs argv in-process and stops it right after epoch 1 is committed (`ops`: the reference run's
    file operations, which a fresh run of the same arguments repeats)."""
    def die():
        raise Killed

    monkeypatch.setattr(files, "_die", die)
    monkeypatch.setenv(files.FAULT_ENV, str(ops.index("fsync state folder") + 2))
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.delenv(files.FAULT_ENV)
    assert files._ops[-2:] == ["fsync state folder", "create temp for prompt.safetensors"], files._ops


def test_kill_at_every_file_operation(data, reference, tmp_path, monkeypatch):
    """In-process: the fault hook stops the run right before each of its file operations in turn."""
    ref_out, ref_w, ref_m, ops = reference
    n_ops = len(ops)
    assert ops.count("commit epoch-000001") == 1 and n_ops > 2 * 9  # each commit's operations are counted

    def die():
        raise Killed

    monkeypatch.setattr(files, "_die", die)
    for n in range(1, n_ops + 1):
        out = tmp_path / f"k{n}"
        monkeypatch.setenv(files.FAULT_ENV, str(n))
        with pytest.raises(Killed):
            main(_argv(data, out))
        point = files._ops[-1]
        monkeypatch.delenv(files.FAULT_ENV)
        assert main(_argv(data, out, "--resume")) == 0, point
        assert _same(_weights(out), ref_w), f"other weights after a kill before {n}: {point}"
        m = json.loads((out / "metrics.json").read_text())
        assert m["loss_curve"] == ref_m["loss_curve"], point
        _check_clean(out)
        shutil.rmtree(out)


def test_kill_in_every_training_step(data, reference, tmp_path, monkeypatch):
    """In-process: the run stops inside each training step in turn (in the loss, between forward and
    backward), then resumes."""
    ref_out, ref_w, ref_m, _ = reference
    real = torch.nn.functional.cross_entropy
    for n in range(1, 2 * EPOCHS + 1):  # 2 steps per epoch
        calls = []

        def loss_then_kill(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise Killed
            return real(*a, **k)

        out = tmp_path / f"s{n}"
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss_then_kill)
        with pytest.raises(Killed):
            main(_argv(data, out))
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
        assert main(_argv(data, out, "--resume")) == 0
        assert _same(_weights(out), ref_w), n
        assert json.loads((out / "metrics.json").read_text())["loss_curve"] == ref_m["loss_curve"]


def test_resumed_runs_killed_again(data, reference, tmp_path, monkeypatch):
    """Kills in the first run and again in its resumed runs (random points, fixed seed), then a resume."""
    ref_out, ref_w, ref_m, ops = reference

    def die():
        raise Killed

    monkeypatch.setattr(files, "_die", die)
    rng = random.Random(1)
    for i in range(6):
        out = tmp_path / f"k{i}"
        argv = _argv(data, out)
        for n in sorted(rng.sample(range(1, len(ops) + 1), 3)):
            monkeypatch.setenv(files.FAULT_ENV, str(n))
            try:
                main(argv)
            except Killed:
                pass
            argv = _argv(data, out, "--resume")
        monkeypatch.delenv(files.FAULT_ENV)
        assert main(argv) == 0
        assert _same(_weights(out), ref_w), i
        assert json.loads((out / "metrics.json").read_text())["loss_curve"] == ref_m["loss_curve"]
        _check_clean(out)


def test_kill_while_a_fresh_run_clears_an_old_one(data, reference, tmp_path, monkeypatch):
    """A fresh run over a finished one first deletes the old run's files: a kill at each of those steps
    (and the first ones after) still resumes to the same weights."""
    ref_out, ref_w, ref_m, _ = reference

    def die():
        raise Killed

    monkeypatch.setattr(files, "_die", die)
    for n in range(1, 10):
        out = tmp_path / f"k{n}"
        shutil.copytree(ref_out, out)
        monkeypatch.setenv(files.FAULT_ENV, str(n))
        with pytest.raises(Killed):
            main(_argv(data, out))
        point = files._ops[-1]
        monkeypatch.delenv(files.FAULT_ENV)
        assert main(_argv(data, out, "--resume")) == 0, point
        assert _same(_weights(out), ref_w), point
        _check_clean(out)


def test_resume_refuses_a_folder_without_state(data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "prompt.safetensors").write_bytes(b"from an older version")
    assert main(_argv(data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no OUT/state" in err


def test_sigkill_of_a_real_process(data, reference, tmp_path):
    """Real processes (each costs seconds of imports, so few): os._exit(137) at the first commit's rename,
    and SIGKILLs at random instants after the first commit (in epoch 2's steps or its commit); each
    resumed in-process. The in-process test above covers every hook point."""
    ref_out, ref_w, ref_m, ops = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    cases = [("fault", ops.index("commit epoch-000001") + 1)] + [("sigkill", rng.uniform(0.0, 0.02)) for _ in range(2)]
    for i, (kind, value) in enumerate(cases):
        out = tmp_path / f"p{i}"
        argv = [sys.executable, "-m", "ladder_clip", *_argv(data, out)]
        if kind == "fault":
            r = subprocess.run(argv, env={**env, files.FAULT_ENV: str(value)}, capture_output=True, timeout=300)
            assert r.returncode == 137, r.stderr[-2000:]
        else:
            p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while not os.path.isdir(out / "state" / "epoch-000001") and p.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(value)
            p.send_signal(signal.SIGKILL)
            assert p.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill: kill sooner"
        assert main(_argv(data, out, "--resume")) == 0, (kind, value)
        assert _same(_weights(out), ref_w), (kind, value)
        assert json.loads((out / "metrics.json").read_text())["loss_curve"] == ref_m["loss_curve"]
        _check_clean(out)


def test_metrics_keep_the_epochs_before_a_resume(data, reference, tmp_path, monkeypatch):
    ref_out, ref_w, ref_m, _ = reference
    out = tmp_path / "o"
    _killed_after_first_epoch(_argv(data, out), monkeypatch, reference[3])
    assert main(_argv(data, out, "--resume")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["loss_curve"] == ref_m["loss_curve"] and len(m["loss_curve"]) == 2 * EPOCHS
    assert m["images_per_s"] > 0


def test_resume_from_another_working_directory(data, reference, tmp_path, monkeypatch):
    ref_out, ref_w, _, _ = reference
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    _killed_after_first_epoch(_argv(os.path.relpath(data), "run"), monkeypatch, reference[3])
    monkeypatch.chdir(tmp_path / "b" / "deeper")
    assert main(_argv(os.path.relpath(data), os.path.join("..", "..", "a", "run"), "--resume")) == 0
    assert _same(_weights(tmp_path / "a" / "run"), ref_w)


def test_non_finite_loss_stops_and_keeps_the_last_good_epoch(data, reference, tmp_path, monkeypatch, capsys):
    ref_out, _, _, _ = reference
    real = torch.nn.functional.cross_entropy
    calls = []

    def nan_in_epoch_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss  # 2 steps per epoch: step 1 of epoch 2

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_in_epoch_2)
    out = tmp_path / "o"
    assert main(_argv(data, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "non-finite loss" in err[0] and "epoch 2, step 1 of 2" in err[0], err
    assert "epoch-000001" in err[0]
    one_epoch = load_file(str(out / "state" / "epoch-000001" / "prompt.safetensors"))
    assert _same(_weights(out), one_epoch)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    assert main(_argv(data, out, "--resume")) == 0  # and the run goes on from it
    assert _same(_weights(out), _weights(ref_out))


def test_lr_that_blows_up_is_an_error(data, tmp_path, capsys):
    argv = _argv(data, tmp_path / "o")
    argv[argv.index("--lr") + 1] = "1e30"
    assert main(argv) == 2
    err = capsys.readouterr().err
    # epoch 1 is the recipe's warm-up at a constant 1e-5: the lr takes effect from epoch 2
    assert err.count("error:") == 1 and "non-finite" in err and "at epoch 2, step 2" in err
    assert "epoch-000001" in err


@pytest.mark.parametrize("name,damage", [
    ("train_state.pt", b"not a torch file"),
    ("history.json", b"{"),
    ("history.json", b'{"epoch": 1}'),
    ("fewshot.json", b"[1, 2]"),
    ("fewshot.json", b'{"items": [["../x.png", 99]]}'),
    ("prompt.safetensors", b"\x00" * 16),
])
def test_damaged_commit_is_one_error(data, tmp_path, capsys, name, damage):
    out = tmp_path / "o"
    argv = _argv(data, out)
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0
    (out / "state" / "epoch-000001" / name).write_bytes(damage)
    capsys.readouterr()
    assert main(_argv(data, out, "--resume")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ladder-clip: error:") and name in err[0], err


def test_damaged_derived_files_are_recreated(data, reference, tmp_path, monkeypatch):
    """metrics.json, the few-shot json and prompt.safetensors in OUT are copies: a damaged one does not
    stop a resume, which writes it again."""
    ref_out, ref_w, _, _ = reference
    out = tmp_path / "o"
    _killed_after_first_epoch(_argv(data, out), monkeypatch, reference[3])
    (out / "metrics.json").write_text("{}")
    fewshot = [f for f in os.listdir(out) if f.startswith("fewshot_")]
    for name in ["metrics.json", "prompt.safetensors", *fewshot]:
        (out / name).write_bytes(b"{damaged")
    assert main(_argv(data, out, "--resume")) == 0
    assert _same(_weights(out), ref_w)
    json.loads((out / "metrics.json").read_text())


def test_resume_with_other_settings_is_refused(data, tmp_path, capsys):
    out = tmp_path / "o"
    argv = _argv(data, out)
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0
    changed = _argv(data, out, "--resume")
    changed[changed.index("--lr") + 1] = "0.01"
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "lr 0.05 -> 0.01" in err
