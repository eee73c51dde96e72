"""One training run per --out at a time: an advisory flock on OUT/.ladder-clip.lock, held for the whole
run. The kernel releases a flock when its process ends, however it ends, so a killed run never leaves
OUT locked; the file itself stays (deleting a lock file races with a run that has just opened it) and
records who holds it, for the error the next run prints."""
import errno
import fcntl
import os
import socket
import sys
import time
import warnings

from .errors import UserError

NAME = ".ladder-clip.lock"


class OutLock:
    def __init__(self, out: str):
        self.out, self.path, self.fd = out, os.path.join(out, NAME), None

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"--out {self.out!r}: cannot create its lock file {NAME} ({exc.strerror or exc})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"--out {self.out!r} is in use by another ladder-clip run "
                                f"({holder or 'its process is starting'}); wait for it to end or pass "
                                "another --out") from None
            # a file system without flock (some network mounts): running unlocked beats not running
            warnings.warn(f"--out {self.out!r}: cannot lock it ({exc.strerror or exc}); make sure no other "
                          "run writes there")
            return self
        self.fd = fd
        note = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}: {' '.join(sys.argv)}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode("utf-8", "replace"), 0)
        except OSError:  # only the next run's message needs it
            pass
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
        return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
