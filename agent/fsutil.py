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
    sync_file: bool = True,
    sync_dir: bool = True,
) -> None:
    """Readers see the old content or the new, never a mix; the new survives a crash.

    The temp file is created with `mode` as narrowed by the umask (O_CREAT | O_EXCL |
    O_NOFOLLOW): never wider, never chmod-ed afterwards. times_ns, (atime, mtime) in
    nanoseconds, keeps a file's place in an mtime-ordered queue. sync_file / sync_dir
    False skip an fsync: for a caller that syncs a batch itself, or for a file worth
    nothing after a crash (a heartbeat), so that rewriting it costs no disk write.
    """
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if times_ns is not None:
                os.utime(handle.fileno(), ns=times_ns)
            if sync_file:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    text = json.dumps(value, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(path, text.encode(), mode)
