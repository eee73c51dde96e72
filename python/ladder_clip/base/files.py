"""Files that are whole or absent: atomic writes (temp file, fsync, rename, fsync of the folder), the
user's umask on everything written, stale temp files of a killed run removed, and the fault-injection
hook of the kill tests.

Fault injection: with LADDER_CLIP_FAULT_AT=n the process dies as SIGKILL would leave it (os._exit(137):
no cleanup, no flush) right before the n-th file operation of the run (counted from 1 over the whole
run), so "before operation n + 1" is "after operation n". tests/pipeline/test_pipeline_resume.py kills a run at
every such point and checks that --resume ends with the same weights as an uninterrupted run.
"""
import os
import re
import shutil
import tempfile

from .errors import UserError

TMP_PREFIX = ".tmp-"
FAULT_ENV = "LADDER_CLIP_FAULT_AT"
_ops = []  # the names of this process's file operations so far (the kill tests read them)


def _die() -> None:
    os._exit(137)


def op(name: str) -> None:
    """Marks the file operation `name`, which comes next; dies here if LADDER_CLIP_FAULT_AT says so."""
    _ops.append(name)
    at = os.environ.get(FAULT_ENV)
    if at and at.isdigit() and int(at) == len(_ops):
        _die()


def reset_ops() -> None:
    _ops.clear()


def file_mode() -> int:
    """0o666 less the umask: what open() gives a new file, and what mkstemp's 0600 files are set to."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_folder(folder: str) -> None:
    """Makes a rename or a new entry in `folder` durable (POSIX wants the directory itself synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename over `path`: a killed run leaves the old file or the new one, whole, and
    at most a `.tmp-*` file that the next run removes (remove_stale)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    op(f"create temp for {base}")
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + base, dir=folder)
    os.close(fd)
    try:
        _written(path, write, tmp, mark=True)
        op(f"rename {base}")
        os.replace(tmp, path)
        op(f"fsync folder of {base}")
        fsync_folder(folder)
    except Exception:  # not BaseException: a kill leaves its temp file, as a real SIGKILL does
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_synced(path: str, write) -> None:
    """write(path) into a folder that is not visible yet (an epoch commit's), then fsync, with the umask."""
    op(f"write {os.path.basename(path)}")
    _written(path, write, path)


def _written(path: str, write, where: str, mark: bool = False) -> None:
    """write(where), fsync, the umask's mode. A failed write (a full disk: ENOSPC, or torch.save's
    "unexpected pos"; safetensors' own error type) is a UserError naming `path`: the last commit is intact."""
    try:
        write(where)
        if mark:  # the atomic write's kill point between its write and its fsync
            op(f"fsync {os.path.basename(path)}")
        with open(where, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(where, file_mode())
    except UserError:
        raise
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise UserError(f"cannot write {path} ({reason}); is the disk full? What was committed before is "
                        "kept: free space, then run the same command with --resume") from None


def remove_tree(path: str) -> None:
    """Renames `path` aside (one atomic step, so it never looks half-deleted under its name), then deletes."""
    parent, name = os.path.split(path)
    aside = os.path.join(parent, f"{TMP_PREFIX}old-{name.lstrip('.')}")
    shutil.rmtree(aside, ignore_errors=True)  # a leftover of an earlier kill
    op(f"rename {name} aside")
    os.replace(path, aside)
    op(f"delete {name}")
    shutil.rmtree(aside, ignore_errors=True)


# What our own writes leave when killed, by name: the temp file of an atomic write ends with the name it
# replaces, commit folders and their deleted-aside copies are `epoch-` folders. A user's own `.tmp-*`
# file or folder in OUT is none of these, and stays.
OUR_FILES = re.compile(r"\.tmp-.*(prompt\.safetensors|metrics\.json|fewshot_\w+\.json|probe-\w+)")
OUR_FOLDERS = re.compile(r"\.tmp-(old-)?epoch-\d+")


def remove_stale(folder: str, folders: bool = False) -> None:
    """Deletes what a killed write of ours left in `folder`: temp files named as OUR_FILES, and with
    `folders` (the state folder, which is ours) temp folders named as OUR_FOLDERS."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        is_dir = os.path.isdir(p) and not os.path.islink(p)
        if is_dir and folders and OUR_FOLDERS.fullmatch(name):
            shutil.rmtree(p, ignore_errors=True)
        elif not is_dir and OUR_FILES.fullmatch(name):
            os.remove(p)


def check_out_folder(out: str) -> None:
    """--out must be a folder we can create and write in; checked by creating a file there, since root
    ignores permission bits and a read-only mount refuses everyone."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is a file, not a folder (expected a folder for the run's outputs)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out!r}: cannot create this folder ({exc.strerror or exc})")
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"--out {out!r}: cannot write in this folder ({exc.strerror or exc})")
