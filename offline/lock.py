"""One writer per output: an exclusive flock on `OUT.lock`, held for the whole run.

Two runs appending to one output (a wrapper killed while its child runs on, a job started twice)
would each write every sample, and their resume records would disagree. The second run fails at
once instead, naming the first one's pid. The kernel drops a flock when its holder exits however
it exits (SIGKILL and crashes included), so a stale lock file never blocks the next run; the file
is only where the lock lives and who holds it, not the lock itself.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lstmgen.offline.resume import ResumeError


class OutputBusy(ResumeError):
    """Another process holds the output's lock (exit 2, as any other refused --out)."""


def lock_path(out: str) -> Path:
    return Path(str(Path(out)) + ".lock")  # `OUT/` and `OUT` are one output, one lock


class OutputLock:
    """`with OutputLock(out):` holds the lock on `out` (and on its journal and resume record)."""

    def __init__(self, out: str):
        self.out, self.path = out, lock_path(out)
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            self._fd = self._try_once()
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def _try_once(self) -> int | None:
        """The locked fd of the lock file now at `path`, or None when it was replaced meanwhile."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(f"{self.out} is being written by another lstmgen sample (pid {holder}; lock "
                             f"{self.path}): two writers would duplicate samples. Wait for it to end or stop "
                             "it, then rerun with --resume") from None
        except OSError as e:
            os.close(fd)
            raise ResumeError(f"cannot lock {self.path} ({e}): the output's file system has no locks") from e
        # The holder we waited on removes the file as it ends: a lock on that unlinked file guards
        # nothing, so take the file that is at the path now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        return None

    def __exit__(self, *exc) -> None:
        # Removed while still held: whoever opened this file meanwhile sees it gone and retries.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
