"""Wait until a directory may have new files, a wake-up arrives, or a timeout passes.

inotify (through the small inotify_simple binding) makes pickup immediate; without it
(not installed, or no inotify instances left) a slow poll still finds every file.
"""

import contextlib
import os
import select
import threading
from pathlib import Path

POLL_SECONDS = 1.0  # the fallback's pace; inotify wakes us at once instead


class DirWatcher:
    def __init__(self, directory: Path):
        self.directory = directory
        self.mode = "poll"
        self.error: str | None = None
        self._inotify = None
        self._lock = threading.Lock()  # wake() may come from any thread, even during close()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            from inotify_simple import INotify, flags

            self._inotify = INotify()
            self._inotify.add_watch(directory, flags.MOVED_TO | flags.CLOSE_WRITE)
            self.mode = "inotify"
        except (ImportError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None

    def wait(self, timeout: float) -> None:
        """Return when something may have arrived, on wake(), or after timeout seconds."""
        fds = [self._wake_r]
        if self._inotify is not None:
            fds.append(self._inotify.fileno())
        else:
            timeout = min(timeout, POLL_SECONDS)
        poller = select.poll()  # not select(): fd numbers may exceed FD_SETSIZE
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(timeout, 0) * 1000)}
        if self._wake_r in ready:
            _drain(self._wake_r)
        if self._inotify is not None and self._inotify.fileno() in ready:
            self._inotify.read(timeout=0)

    def wake(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if not self._closed:
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
