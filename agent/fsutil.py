"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

A file's mode is what its writer asks for, narrowed by the process umask: never widened
by a chmod that ignores it. The rename replaces a symlink at the path, never its target.
"""

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: Path,
    data: bytes,
    mode: int = 0o644,
    times_ns: tuple[int, int] | None = None,
    durable: bool = True,
) -> None:
    """Readers see the old content or the new, never a mix; the new survives a crash.

    times_ns, (atime, mtime) in nanoseconds, keeps a file's place in an mtime-ordered queue.
    durable=False skips the fsyncs: for a file worth nothing after a crash (a heartbeat),
    so that rewriting it often costs no disk write of its own.
    """
    import tempfile  # here, not at the top: `agentctl status` reads state but never writes

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if times_ns is not None:
                os.utime(handle.fileno(), ns=times_ns)
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    text = json.dumps(value, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(path, text.encode(), mode)


def current_umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
