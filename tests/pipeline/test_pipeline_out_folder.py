"""Issue 25 items 1, 4 and 6: one run per OUT at a time (a clear error naming the other run, never stuck
after a kill), nothing in OUT deleted that a run did not write, and --resume refusing fewer epochs than
already trained."""
import json
import os
import subprocess
import sys

import pytest
from helpers import one_thread

from ladder_clip.cli import main
from ladder_clip.lock import OutLock


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield




def _argv(data, out, *extra, epochs=1):
    return ["train", "--model", "tiny", "--data", str(data), "--method", "coop", "--shots", "2", "--epochs",
            str(epochs), "--batch-size", "2", "--lr", "0.01", "--out", str(out), "--quiet", "--opt", "n_ctx=2",
            *extra]


def _errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ladder-clip: error:")]


HOLD = ("import sys, time\nfrom ladder_clip.lock import OutLock\nwith OutLock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n    time.sleep(120)\n")


def test_a_second_run_on_the_same_out_is_refused_and_a_kill_frees_it(data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        code = main(_argv(data, out))
        errors = _errors(capsys)
        assert code == 2 and len(errors) == 1, errors
        assert "in use by another ladder-clip run" in errors[0] and f"pid {other.pid}" in errors[0], errors
        assert not (out / "state").exists()  # the refused run touched nothing
    finally:
        other.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        other.wait()
    assert main(_argv(data, out)) == 0


def test_in_process_lock_conflict_keeps_the_first_runs_files(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(data, out)) == 0
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in ("prompt.safetensors", "metrics.json")}
    with OutLock(str(out)):
        assert main(_argv(data, out, "--seed", "2")) == 2
        assert main(_argv(data, out, "--resume", epochs=2)) == 2
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in before} == before
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1


def test_the_users_tmp_files_stay(data, tmp_path):
    out = tmp_path / "o"
    (out / ".tmp-build-cache" / "sub").mkdir(parents=True)
    (out / ".tmp-build-cache" / "sub" / "notes.txt").write_text("mine")
    (out / ".tmp-notes.txt").write_text("mine too")
    (out / ".tmp-x1y2z3ab-prompt.safetensors").write_bytes(b"left by a killed write of ours")
    for extra in ((), ("--resume",)):
        assert main(_argv(data, out, *extra, epochs=1 + len(extra))) == 0
        assert (out / ".tmp-build-cache" / "sub" / "notes.txt").read_text() == "mine"
        assert (out / ".tmp-notes.txt").read_text() == "mine too"
        assert not (out / ".tmp-x1y2z3ab-prompt.safetensors").exists()


def test_resume_with_fewer_epochs_than_trained_is_refused(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(data, out, epochs=2)) == 0
    capsys.readouterr()
    assert main(_argv(data, out, "--resume", epochs=1)) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "2 epochs trained" in errors[0] and "--epochs 1" in errors[0], errors
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    assert main(_argv(data, out, "--resume", epochs=2)) == 0
