"""Child processes started by workers, each in its own process group.

Every child is registered here so that shutdown, a timeout or a forced exit can kill
its whole process group: no child may outlive the supervisor. A helper that left the
group (setsid, a daemon's double fork) is found by a marker variable in its environment,
which it inherits: kill_marked sweeps /proc for it. (Not a cgroup per run: the unit keeps
ProtectControlGroups=yes, and standalone there may be no delegated cgroup at all; under
systemd the service's cgroup still catches everything at stop, KillMode=mixed.)
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


def kill_marked(name: str, value: str) -> list[int]:
    """SIGKILL every process of ours whose environment has NAME=VALUE; their pids."""
    needle = f"{name}={value}".encode()
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or not _has_marker(entry.name, needle):
            continue
        try:
            pidfd = os.pidfd_open(int(entry.name))
        except OSError:
            continue
        try:  # the pidfd pins the process: check again, then it cannot be another one
            if _has_marker(entry.name, needle):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed.append(int(entry.name))
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return killed


def _has_marker(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return needle in handle.read().split(b"\0")
    except OSError:  # gone, or not ours (environ is readable only by its owner)
        return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
