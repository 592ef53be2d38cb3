"""One process owns a state dir: `drawbot run` holds an exclusive lock on `<state_dir>/drawbot.lock` while it runs.

Two bots on one state dir would each take the other's running job for a crash leftover and draw it again. The lock is
`fcntl.flock` on an open file: the kernel drops it when the process ends however it ends (SIGKILL, OOM kill, power
cut), so a killed bot never blocks the next start and there is no stale-lock cleanup to get wrong. The file holds the
owner's pid, so the second instance can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = "drawbot.lock"


class StateDirBusy(Exception):
    """Another process holds the lock. `pid` is the holder's (None when the file does not say)."""

    def __init__(self, state_dir: Path, pid: int | None):
        self.state_dir, self.pid = state_dir, pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"another drawbot ({holder}) is already running on the state dir {state_dir}; stop it first, "
                         "or give this one its own [storage] state_dir")


class StateDirUnusable(Exception):
    """The state dir cannot be created or written. The message names the folder and the fix."""


class StateLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateDirUnusable(unusable(self.state_dir, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirBusy(self.state_dir, holder(self.path)) from None
            raise StateDirUnusable(unusable(self.state_dir, exc)) from None
        try:
            # Best effort: on a full disk the pid cannot be written, but the lock itself still holds.
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder(lock_path: Path) -> int | None:
    """The pid written in the lock file (None when it is missing or not a number)."""
    try:
        text = Path(lock_path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def held_by(state_dir: Path) -> int | None:
    """Whether a running bot holds `state_dir` (for `drawbot doctor`): its pid, 0 if unknown, None when free."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return holder(path) or 0
    finally:
        os.close(fd)
    return None


def unusable(state_dir: Path, exc: OSError) -> str:
    """One line for an owner: which folder, what the system said, how to fix it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (f"make it writable by the user the bot runs as (`sudo chown -R $USER {state_dir}`), or point "
               "[storage] state_dir elsewhere")
    elif exc.errno == errno.EROFS:
        fix = "it is on a read-only file system: point [storage] state_dir at a writable folder"
    elif exc.errno == errno.ENOSPC:
        fix = "the disk is full: free some space there"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file is in the way: point [storage] state_dir at a folder"
    else:
        fix = "point [storage] state_dir at a writable folder"
    return f"cannot use the state dir {state_dir} ({reason}): {fix}"
