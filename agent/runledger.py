"""A record of agent runs in flight, so runs orphaned by a `kill -9` die at the next start.

A supervisor that is killed outright cannot kill its children. Each run's direct child
dies with it (PR_SET_PDEATHSIG, see agentrun), but helpers it started in its process
group would live on. The ledger keeps one file per running process group in
state_dir/runs/: <pgid> holding the leader's start time. At the next start every group
still recorded is killed. The start time guards against a reused pid: a pid that still
names a group cannot be reused, and a leader with another start time is somebody else.
"""

import contextlib
import os
import signal
from pathlib import Path


class RunLedger:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def record(self, pid: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(pid)).write_text(str(_start_time(pid) or ""))

    def forget(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / str(pid)).unlink()

    def kill_leftovers(self) -> list[int]:
        """Kill every recorded group that still exists; the pgids that were signalled."""
        killed: list[int] = []
        if not self.directory.is_dir():
            return killed
        for entry in self.directory.iterdir():
            if not entry.name.isdigit():
                continue
            pgid = int(entry.name)
            recorded = entry.read_text().strip()
            now = _start_time(pgid)
            if now is None or now == recorded:  # gone leader: the pid names only our group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                    killed.append(pgid)
            entry.unlink()
        return killed


def _start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19]  # field 22 of stat: start time in clock ticks since boot
