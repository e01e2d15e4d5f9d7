"""The supervisor lock: an exclusive flock held for the supervisor's whole life.

Whether a supervisor runs is decided only by this lock, never by a saved pid, so a
reused pid cannot fool anyone. The holder writes its pid into the lock file so that
others can name and signal it. The file is never deleted (deleting lock files races).

Readers probe with a shared non-blocking flock. A starting supervisor that finds the
lock busy checks whether the holder is exclusive (another supervisor) or only a
reader's momentary shared probe, and in the latter case tries again.
"""

import fcntl
import os
import time
from pathlib import Path
from typing import NamedTuple

from agent.errors import AgentError, AlreadyRunning, PermissionDenied

READER_RETRY_SECONDS = 2.0
PID_READ_SECONDS = 1.0


class LockProbe(NamedTuple):
    held: bool
    pid: int | None


class SupervisorLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, pid: int | None = None) -> None:
        """Take the lock and record our pid, or raise AlreadyRunning naming the holder."""
        assert self._fd is None, "lock already acquired by this object"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _lock_exclusive_past_readers(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid or os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _lock_exclusive_past_readers(fd: int, path: Path) -> None:
    deadline = time.monotonic() + READER_RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if _exclusively_held(path):
            raise AlreadyRunning(read_holder_pid(path))
        if time.monotonic() > deadline:
            raise AgentError(f"{path}: lock stayed busy with readers for {READER_RETRY_SECONDS}s")
        time.sleep(0.002)  # a reader's shared probe lasts microseconds


def _exclusively_held(path: Path) -> bool:
    return not _shared_probe(path)


def _shared_probe(path: Path) -> bool:
    """True if a shared lock could be taken right now (no exclusive holder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except PermissionError:
        raise PermissionDenied(
            f"{path}: permission denied; the agent's state is readable by root and its own "
            "user (e.g. sudo agentctl ...)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def probe(path: Path) -> LockProbe:
    """Is a supervisor holding the lock, and which pid does it say it is?"""
    if _shared_probe(path):
        return LockProbe(held=False, pid=None)
    return LockProbe(held=True, pid=read_holder_pid(path))


def read_holder_pid(path: Path) -> int | None:
    """The pid the holder wrote; waits briefly for a holder that has just taken the lock."""
    deadline = time.monotonic() + PID_READ_SECONDS
    while True:
        pid = _read_pid(path)
        if pid is not None and _alive(pid):
            return pid
        if time.monotonic() > deadline:
            return pid
        time.sleep(0.005)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
