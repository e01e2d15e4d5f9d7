"""The supervisor lock: exclusive flocks held for the supervisor's whole life.

Whether a supervisor runs is decided only by kernel locks, never by a saved pid.
Invariants:
- A supervisor holds two flocks: `state_dir/agent.lock` (the documented lock; the file
  holds its pid, for people) and `state_dir` itself (the guard: a directory that holds
  files cannot be deleted, nor replaced by a file, so deleting or replacing agent.lock
  never admits a second supervisor). It takes the file first, then the directory, and
  lets go in the opposite order, so "directory held, file free" means only a lost file.
- After each flock the path must still name the locked inode (fstat of the descriptor
  against lstat of the path); otherwise the lock is worthless and acquiring tries again.
- Files are opened with O_NOFOLLOW and created 0640: a symlink planted at agent.lock is
  never followed, its target never truncated.
- Who holds the lock is asked of the kernel (/proc/locks), never read from the file: only
  a process proven to hold it is ever signalled (see agent.control.stop_standalone).
- A running supervisor whose agent.lock path no longer names its lock says so
  (`SupervisorLock.lost()`); it stays the one supervisor, by the directory lock.

Readers probe with shared non-blocking flocks. A starting supervisor that finds a lock
busy checks whether the holder is exclusive (another supervisor) or only a reader's
momentary shared probe, and in the latter case tries again. The files are never deleted
(deleting lock files races).
"""

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import NamedTuple

from agent.errors import AgentError, AlreadyRunning, PermissionDenied

READER_RETRY_SECONDS = 2.0
LOCK_FILE_MODE = 0o640
PROC_LOCKS = "/proc/locks"


class LockProbe(NamedTuple):
    held: bool
    pid: int | None
    problem: str | None = None  # held, but agent.lock no longer names the holder's lock


class SupervisorLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, pid: int | None = None) -> None:
        """Take both locks and record our pid, or raise AlreadyRunning naming the holder."""
        assert self._fd is None, "lock already acquired by this object"
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = _open_locked(self.path, directory=False)
        try:
            dir_fd = _open_locked(self.path.parent, directory=True)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid or os.getpid()}\n".encode(), 0)
        self._fd, self._dir_fd = fd, dir_fd

    def lost(self) -> str | None:
        """Why agent.lock no longer names our lock (deleted, replaced), or None."""
        if self._fd is None:
            return None
        if _same_file(self._fd, self.path):
            return None
        return lock_lost_reason(self.path)

    def release(self) -> None:
        # The directory first: a moment with only it held would look like a lost file.
        for fd in (self._dir_fd, self._fd):
            if fd is not None:
                os.close(fd)  # closing the only descriptor drops the flock
        self._fd = self._dir_fd = None


def lock_lost_reason(path: Path) -> str:
    return (
        f"{path} no longer names the running supervisor's lock (deleted or replaced); "
        "it stays the only supervisor by its lock on the state directory; restart the "
        "agent to restore the file"
    )


def _open_locked(path: Path, directory: bool) -> int:
    """Open path without following a symlink and lock it exclusively, past readers."""
    deadline = time.monotonic() + READER_RETRY_SECONDS
    while True:
        fd = _open(path, directory)
        try:
            if _lock_exclusive_past_readers(fd, path, directory, deadline):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the path was replaced while we locked it: try the new file


def _open(path: Path, directory: bool) -> int:
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDONLY | os.O_DIRECTORY if directory else os.O_RDWR | os.O_CREAT | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, LOCK_FILE_MODE)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
            raise _not_ours(path, directory) from None
        raise
    if not directory and os.fstat(fd).st_mode & 0o170000 != 0o100000:
        os.close(fd)
        raise _not_ours(path, directory)
    return fd


def _not_ours(path: Path, directory: bool) -> AgentError:
    return AgentError(f"{path}: is a symlink or not a {_kind(directory)}; refusing to use it")


def _kind(directory: bool) -> str:
    return "directory" if directory else "regular file"


def _lock_exclusive_past_readers(fd: int, path: Path, directory: bool, deadline: float) -> bool:
    """True once locked; False when the path no longer names fd's file (retry)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return _same_file(fd, path)
        except BlockingIOError:
            pass
        if not _shared_probe(path, directory):
            raise AlreadyRunning(holder_pid(path))
        if time.monotonic() > deadline:
            raise AgentError(f"{path}: lock stayed busy with readers for {READER_RETRY_SECONDS}s")
        time.sleep(0.002)  # a reader's shared probe lasts microseconds


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _shared_probe(path: Path, directory: bool = False) -> bool:
    """True if a shared lock could be taken right now (no exclusive holder)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_DIRECTORY if directory else 0))
    except FileNotFoundError:
        return True
    except PermissionError:
        raise PermissionDenied(
            f"{path}: permission denied; the agent's state is readable by root and its own "
            "user (e.g. sudo agentctl ...)"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return True  # a symlink is never a supervisor's lock
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def probe(path: Path, claimed_pid: int | None = None) -> LockProbe:
    """Is a supervisor holding the lock, which pid is it, and does agent.lock still name
    its lock? The pid comes from the kernel, except that `status` (which only shows it)
    may pass the pid the state file claims: when agent.lock says the same, that is taken
    without reading /proc/locks, which costs milliseconds on a busy host."""
    if not _shared_probe(path):
        return LockProbe(held=True, pid=_agreed(path, claimed_pid) or holder_pid(path))
    if _shared_probe(path.parent, directory=True):
        return LockProbe(held=False, pid=None)
    if not _shared_probe(path):  # a supervisor took both locks between our two probes
        return LockProbe(held=True, pid=_agreed(path, claimed_pid) or holder_pid(path))
    # The directory is locked but agent.lock is not: its file was deleted or replaced.
    return LockProbe(held=True, pid=holder_pid(path), problem=lock_lost_reason(path))


def _agreed(path: Path, claimed_pid: int | None) -> int | None:
    if claimed_pid is None or recorded_pid(path) != claimed_pid:
        return None
    return claimed_pid if os.path.exists(f"/proc/{claimed_pid}") else None


def holder_pid(path: Path) -> int | None:
    """The pid the kernel says holds the supervisor's lock: the state directory's flock
    (taken only by supervisors), else agent.lock's; None when nobody or it cannot tell."""
    for target in (path.parent, path):
        pid = _kernel_holder(target)
        if pid is not None:
            return pid
    return None


def _kernel_holder(path: Path) -> int | None:
    """The pid holding an exclusive flock on the inode path names, from /proc/locks."""
    try:
        st = os.lstat(path)
        with open(PROC_LOCKS, "rb") as handle:
            table = handle.read()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}".encode()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF"; blocked waiters have "->"
        fields = line.split()
        if fields[1:4:2] == [b"FLOCK", b"WRITE"] and fields[5:6] == [inode]:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                return pid
    return None


def recorded_pid(path: Path) -> int | None:
    """The pid written in agent.lock: informative only, never a reason to signal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and len(text) < 10 else None
