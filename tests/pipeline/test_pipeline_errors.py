"""Issue 13 items 6-9 and 11: every bad input of the CLI gives one `ladder-clip: error:` line naming the
argument and exit status 2 (never a traceback, never a silent run); unreadable images are skipped with a
warning; written files honour the umask and no stale temp file survives."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import one_thread
from safetensors.torch import load_file, save_file

from ladder_clip.cli import main
from ladder_clip.synthetic import make_imagefolder

CLASSES = ["red_circle", "blue_square", "green_triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # several times faster on a loaded 2-core machine
        yield


# the module's image folder (tests/pipeline/conftest.py)
DATA = dict(classes=CLASSES,
            train_per_class=3, test_per_class=2, seed=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 1-epoch coop run: its folder."""
    out = tmp_path_factory.mktemp("run")
    assert main(_train_argv(data, out)) == 0
    return out


def _train_argv(data, out, *extra, method="coop", epochs=1):
    return ["train", "--model", "tiny", "--data", str(data), "--method", method, "--shots", "2", "--epochs",
            str(epochs), "--batch-size", "3", "--lr", "0.01", "--out", str(out), "--seed", "3", "--quiet",
            "--opt", "n_ctx=2", *extra]


def one_error(capsys, code, *needles):
    """Exactly one stderr line, `ladder-clip: error: ...` holding every needle; status 2."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("ladder-clip: error:")]
    assert code == 2 and len(errors) == 1, (code, err)
    assert all(n in errors[0] for n in needles), (needles, errors[0])
    assert not any("Traceback" in line for line in err), err


TRAIN_ARGS = [  # (replaced argument, value, words the error must hold)
    ("--lr", "nan", ["--lr", "nan"]),
    ("--lr", "inf", ["--lr", "inf"]),
    ("--lr", "0", ["--lr", "> 0"]),
    ("--epochs", "-1", ["--epochs", "-1"]),
    ("--batch-size", "0", ["--batch-size", "0"]),
    ("--workers", "-1", ["--workers", "-1"]),
    ("--shots", "-2", ["--shots", "-2"]),
]


@pytest.mark.parametrize("arg,value,needles", TRAIN_ARGS)
def test_bad_train_number(data, tmp_path, capsys, arg, value, needles):
    argv = _train_argv(data, tmp_path / "o", "--workers", "0")
    argv[argv.index(arg) + 1] = value
    one_error(capsys, main(argv), *needles)
    assert not (tmp_path / "o").exists()  # nothing is written for a run that cannot start


METHOD_OPTS = [  # (method, option, words the error must hold)
    ("coop", "n_ctx=0", ["n_ctx", "0"]),
    ("coop", "n_ctx=-1", ["n_ctx", "-1"]),
    ("coop", "n_ctx=abc", ["n_ctx", "'abc'"]),
    ("coop", "n_ctx=2.5", ["n_ctx", "2.5"]),
    ("coop", "n_ctx=100000", ["n_ctx", "100000"]),
    ("coop", "nope=1", ["nope"]),
    ("coop", "n_ctx", ["n_ctx", "key=value"]),
    ("ladder", "reduction=0", ["reduction", "0"]),
    ("ladder", "reduction=abc", ["reduction", "'abc'"]),
    ("ladder", "reduction=5", ["reduction", "5"]),
    ("ladder", "tap_dtype=fp8", ["tap_dtype", "'fp8'"]),
    ("ladder", "checkpoint=maybe", ["checkpoint", "'maybe'"]),
    ("ladder", "blocks=99", ["blocks", "99"]),
    ("rlp", "dropout=1.5", ["dropout", "1.5"]),
    ("rlp", "scale=NaN", ["scale"]),
    ("vpt", "n_prompts=0", ["n_prompts", "0"]),
    ("zeroshot", "template=a {} {}", ["template"]),
]


@pytest.mark.parametrize("method,opt,needles", METHOD_OPTS)
def test_bad_method_option(data, tmp_path, capsys, method, opt, needles):
    argv = _train_argv(data, tmp_path / "o", method=method)
    argv[argv.index("n_ctx=2")] = opt
    one_error(capsys, main(argv), "--opt", *needles)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_eval_batch_size(data, run, capsys, value):
    one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint",
                            str(run / "prompt.safetensors"), "--batch-size", value]), "--batch-size", value)


def test_eval_workers_and_demo_epochs(data, run, capsys):
    one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint",
                            str(run / "prompt.safetensors"), "--workers", "-1"]), "--workers", "-1")
    one_error(capsys, main(["demo", "--epochs", "-1"]), "--epochs", "-1")
    one_error(capsys, main(["demo", "--epochs", "0"]), "--epochs", "0")


def test_data_naming_a_file(data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_error(capsys, main(_train_argv(f, tmp_path / "o")), "--data", "is a file, not a folder")


def test_out_naming_a_file(data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_error(capsys, main(_train_argv(data, f)), "--out", "is a file, not a folder")
    assert f.read_text() == "x"


def test_out_in_a_folder_nobody_can_write(data, capsys):
    # root ignores permission bits, so the test needs a folder even root cannot write in: /proc is one
    for folder in ("/sys", "/proc/self"):
        probe = os.path.join(folder, ".ladder-clip-probe")
        try:
            with open(probe, "x"):
                pass
            os.remove(probe)
        except OSError:
            break
    else:
        pytest.fail("no read-only folder found on this machine")
    one_error(capsys, main(_train_argv(data, os.path.join(folder, "run"))), "--out", "cannot")
    one_error(capsys, main(_train_argv(data, folder)), "--out", "cannot write")


def test_read_only_folder_as_a_user(data, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    real_open = os.open

    def as_a_user(path, flags, *a, **k):  # what a non-root user gets in a 0555 folder
        if os.path.dirname(os.fspath(path)) == str(ro) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", as_a_user)
    one_error(capsys, main(_train_argv(data, ro)), "--out", "cannot write")


def test_test_class_folder_without_images(data, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    for f in (d / "test" / "blue_square").iterdir():
        f.unlink()
    one_error(capsys, main(_train_argv(d, tmp_path / "o")), "test/", "blue_square", "no images")


def test_eval_on_other_classes(data, run, tmp_path, capsys):
    d = tmp_path / "d"
    make_imagefolder(str(d), ["red_circle", "blue_square", "yellow_cross"], train_per_class=1,
                     test_per_class=1, size=36)
    ck = str(run / "prompt.safetensors")
    one_error(capsys, main(["eval", "--model", "tiny", "--data", str(d), "--checkpoint", ck]),
              "classes", "yellow cross", "--other-classes")
    assert main(["eval", "--model", "tiny", "--data", str(d), "--checkpoint", ck, "--other-classes"]) == 0
    assert "accuracy" in capsys.readouterr().out


def _with_header(src, dst, header_text):
    tensors = load_file(str(src))
    save_file(tensors, str(dst), metadata={"ladder_clip": header_text})
    return str(dst)


def _header(run):
    from safetensors import safe_open
    with safe_open(str(run / "prompt.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["ladder_clip"])


BAD_HEADERS = [
    ("not json", lambda h: "{not json", "not valid JSON"),
    ("a list", lambda h: "[1, 2]", "JSON object"),
    ("no method", lambda h: json.dumps({k: v for k, v in h.items() if k != "method"}), "'method'"),
    ("no backbone", lambda h: json.dumps({k: v for k, v in h.items() if k != "backbone"}), "'backbone'"),
    ("no config", lambda h: json.dumps({k: v for k, v in h.items() if k != "config"}), "'config'"),
    ("config a list", lambda h: json.dumps({**h, "config": [1]}), "'config'"),
    ("unknown method", lambda h: json.dumps({**h, "method": "nope"}), "'nope'"),
    ("huge n_ctx", lambda h: json.dumps({**h, "config": {**h["config"], "n_ctx": 20000000}}), "n_ctx"),
    ("n_ctx 2e7", lambda h: json.dumps({**h, "config": {**h["config"], "n_ctx": 2e7}}), "n_ctx"),
    ("n_ctx vs tensor", lambda h: json.dumps({**h, "config": {**h["config"], "n_ctx": 3}}), "ctx"),
    ("classnames", lambda h: json.dumps({**h, "classnames": "abc"}), "'classnames'"),
]


@pytest.mark.parametrize("name,make,needle", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_crafted_checkpoint_header(data, run, tmp_path, capsys, name, make, needle):
    ck = _with_header(run / "prompt.safetensors", tmp_path / "c.safetensors", make(_header(run)))
    one_error(capsys, main(["eval", "--model", "tiny", "--data", data, "--checkpoint", ck]), ck, needle)


def test_truncated_jpeg_is_skipped_with_a_warning(data, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "d"
    shutil.copytree(data, d)
    for split in ("train", "test"):
        jpg = d / split / "red_circle" / "cut.jpg"
        Image.new("RGB", (64, 64), (200, 10, 10)).save(jpg, quality=95)
        raw = jpg.read_bytes()
        jpg.write_bytes(raw[:raw.index(b"\xff\xda") + 40])  # headers whole, scan cut: verify() passes
    argv = _train_argv(d, tmp_path / "o")
    argv[argv.index("--shots") + 1] = "0"  # every training image, the cut one included
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("cut.jpg") == 2 and "warning" in err and "Traceback" not in err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["test_images"] == 6 and m["train_images"] == 9


def test_files_honour_the_umask_and_no_temp_file_survives(data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".tmp-abcprompt.safetensors").write_bytes(b"left by a killed write")
    old = os.umask(0o027)
    try:
        assert main(_train_argv(data, out)) == 0
    finally:
        os.umask(old)
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs]
    assert files and not [f for f in files if ".tmp" in os.path.basename(f)]
    assert {oct(os.stat(f).st_mode & 0o777) for f in files} == {oct(0o640)}, files


def test_ctrl_c_while_importing_prints_one_line(data, tmp_path):
    """SIGINT at several instants of start-up (the transformers import takes seconds): one line that says
    how to resume, status 130, never a traceback."""
    argv = [sys.executable, "-m", "ladder_clip", *_train_argv(data, tmp_path / "o")]
    interrupted = 0
    # 0.9-1.1 s lands in torch's import on a 2-core CPU, where the status once became -2 (cli.run_and_exit)
    for delay in (0.3, 0.9, 1.0, 1.1, 2.0):
        p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=120)[1]
        if p.returncode == 0:  # it finished first: nothing to check at this instant
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert p.returncode == 130 and len(lines) == 1 and "--resume" in lines[0], (delay, p.returncode, err)
        interrupted += 1
    assert interrupted >= 2  # torch and transformers take seconds to import: the early signals land there


def test_nothing_to_train_is_an_error(data, tmp_path, capsys, monkeypatch):
    from ladder_clip.methods.coop import CoOp

    monkeypatch.setattr(CoOp, "trainable_parameters", lambda self: [])
    one_error(capsys, main(_train_argv(data, tmp_path / "o")), "nothing to train")


def test_fp16_skipped_steps_give_no_scheduler_warning(data, tmp_path, capsys):
    # the GradScaler skips overflowing fp16 steps; the scheduler's warning about it is expected noise
    argv = _train_argv(data, tmp_path / "o", method="ladder")[:-2] + ["--precision", "fp16"]  # no n_ctx
    assert main(argv) == 0
    assert "lr_scheduler" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["coop", "vpt", "rlp", "apt", "ladder", "ladder+apt"])
def test_checkpoint_config_is_checked_against_its_tensors(name):
    """Each option that sizes a saved tensor is checked against it: the method's own checkpoint passes,
    and the same checkpoint claiming one more of that option is refused before anything is built."""
    from ladder_clip import build_method, load_backbone
    from ladder_clip.checkpoint import checkpoint_contents, check_sizes
    from ladder_clip.errors import UserError

    small = {"apt": {"num_prompts": 5}, "ladder+apt": {"apt_prompts": 5}, "coop": {"n_ctx": 4}}.get(name, {})
    method = build_method(name, load_backbone("tiny"), ["red circle", "blue square"], **small)
    tensors, header = checkpoint_contents(method, {"epoch": 1})
    check_sizes(header, tensors, "c")
    cls = type(method)
    checked = [(t, d, o) for t, d, o in cls.sized_by if cls.expected_size(header["config"], o, header["backbone"])]
    assert checked
    for tensor, dim, option in checked:
        bumped = {**header, "config": {**header["config"], option: header["config"][option] + 1}}
        with pytest.raises(UserError, match=f"{option}="):
            check_sizes(bumped, tensors, "c")


def test_missing_pipeline_package_names_the_extra():
    """A kernels-only install (no `clip` extra): one error line saying what to install, status 2. A fresh
    process, so that no earlier test has the package imported already."""
    code = ("import sys; sys.modules['PIL'] = None\n"  # `import PIL` now fails as if it were not installed
            "from ladder_clip.cli import main; sys.exit(main(['demo', '--epochs', '1']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and "ladder_kernels[clip]" in err[0], out.stderr


def test_class_difference_names_what_is_not_shared():
    from ladder_clip.evaluate import class_difference
    assert class_difference(["a", "b", "c"], ["a", "b", "c", "d"]) == \
        "its 3 classes differ from the checkpoint's 4 (not in the data: 'd')"
    assert "not in the checkpoint: 'c', 'd', 'e' ..." in class_difference(list("abcdefg"), ["a", "b"])
    assert class_difference(["b", "a"], ["a", "b"]) == "its class 0 is 'b', the checkpoint's class 0 is 'a'"
