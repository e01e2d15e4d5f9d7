"""Child processes started by workers, each in its own process group.

Every child is registered here so that shutdown, a timeout or a forced exit can kill
its whole process group: no child may outlive the supervisor.
"""

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any


class ChildProcesses:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()

    def spawn(self, argv: Sequence[str], **popen_args: Any) -> subprocess.Popen:
        with self._lock:  # no kill_all may slip between fork and registration
            proc = subprocess.Popen(argv, start_new_session=True, **popen_args)
            self._groups.add(proc.pid)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._groups.discard(proc.pid)

    def kill_group(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        _signal_group(proc.pid, sig)

    def kill_all(self, sig: int = signal.SIGKILL) -> list[int]:
        with self._lock:
            groups = sorted(self._groups)
            for pgid in groups:
                _signal_group(pgid, sig)
        return groups

    def __len__(self) -> int:
        """How many child process groups are registered (none may be left after a stop)."""
        with self._lock:
            return len(self._groups)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
