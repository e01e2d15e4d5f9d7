"""A record of agent runs in flight, so runs orphaned by a `kill -9` die at the next start.

A supervisor that is killed outright cannot kill its children. Each run's direct child
dies with it (PR_SET_PDEATHSIG, see agentrun), but helpers it started in its process
group would live on. The ledger keeps one file per running process group in
state_dir/runs/<pgid>: JSON with the leader's start time (clock ticks since boot), its
session id and the boot id. At the next start each group still recorded is killed, but
only when every check below holds, so a planted or stale entry never makes us SIGKILL
somebody else's process group:

- the entry is a regular file (opened O_NOFOLLOW), owned by us, small, of our format;
- it was written in this boot, and within RECORD_SLACK seconds of the leader's start
  (its ctime, which nobody can set back): a record written later cannot name an older
  process;
- a live leader has the recorded start time, process group and session;
- without a leader, every process left in the group is in the recorded session and
  started after the recorded leader.

Entries that fail are removed and logged (`dispatcher.run_record_refused`), never acted on.
"""

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, NamedTuple

RECORD_MODE = 0o640
MAX_RECORD_BYTES = 4096
RECORD_SLACK = (-5.0, 60.0)  # seconds a record's ctime may lie before/after the leader start


class ProcStat(NamedTuple):
    pgid: int
    sid: int
    start: int  # clock ticks since boot


class RunRecord(NamedTuple):
    pgid: int
    sid: int
    leader_start: int
    boot_id: str


class RunLedger:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def record(self, pid: int) -> None:
        """Record the group a just-spawned leader heads; raises if it cannot be written."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        stat = proc_stat(pid)
        record = {
            "pgid": pid,
            "sid": stat.sid if stat else pid,
            "leader_start": stat.start if stat else 0,
            "boot_id": boot_id(),
        }
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.directory / str(pid), flags, RECORD_MODE)
        with open(fd, "w") as handle:
            handle.write(json.dumps(record))

    def forget(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / str(pid)).unlink()

    def kill_leftovers(self) -> list[int]:
        """Kill every recorded group proven to be ours; the pgids that were signalled."""
        killed: list[int] = []
        if not self.directory.is_dir() or self.directory.is_symlink():
            return killed
        for entry in self.directory.iterdir():
            if not entry.name.isdigit():
                continue
            problem = self._kill_if_ours(entry)
            if problem is None:
                killed.append(int(entry.name))
            elif problem:
                _refused(entry, problem)
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()  # a symlink is removed, never followed
        return killed

    def _kill_if_ours(self, entry: Path) -> str | None:
        """None when the group was killed, '' when nothing was left, else why not."""
        try:
            record, ctime = read_record(entry)
        except (OSError, ValueError, RecursionError) as exc:
            return str(exc) or type(exc).__name__
        if record.boot_id != boot_id():
            return "recorded in another boot"
        if not _fresh(ctime, record.leader_start):
            return "not written when its leader started"
        members = _group_members(record.pgid)
        if not members:
            return ""
        why_not = _not_our_group(record, members)
        if why_not:
            return why_not
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pgid, signal.SIGKILL)
            return None
        return ""


def read_record(entry: Path) -> tuple[RunRecord, float]:
    """The record and the file's ctime; OSError or ValueError when it is not ours."""
    fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o170000 != 0o100000:
            raise ValueError("not a regular file")
        if info.st_uid != os.geteuid():
            raise ValueError(f"owned by uid {info.st_uid}, not by us")
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError("too large")
    return _parse(json.loads(data), int(entry.name)), info.st_ctime


def _parse(raw: Any, pgid: int) -> RunRecord:
    if not isinstance(raw, dict) or raw.get("pgid") != pgid:
        raise ValueError("not a run record of ours")
    numbers = [raw.get(k) for k in ("sid", "leader_start")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in numbers):
        raise ValueError("not a run record of ours")
    if not isinstance(raw.get("boot_id"), str):
        raise ValueError("not a run record of ours")
    return RunRecord(pgid, numbers[0], numbers[1], raw["boot_id"])


def _not_our_group(record: RunRecord, members: dict[int, ProcStat]) -> str | None:
    leader = members.get(record.pgid)
    if leader is not None:
        if (leader.start, leader.sid) != (record.leader_start, record.sid):
            return "its leader is another process than the one recorded"
        return None
    for pid, member in members.items():
        if member.sid != record.sid or member.start < record.leader_start:
            return f"pid {pid} in the group is not from the recorded run"
    return None


def _fresh(ctime: float, leader_start: int) -> bool:
    started = _boot_time() + leader_start / os.sysconf("SC_CLK_TCK")
    low, high = RECORD_SLACK
    return started + low <= ctime <= started + high


def _group_members(pgid: int) -> dict[int, ProcStat]:
    members = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat.pgid == pgid:
                members[int(name)] = stat
    return members


def proc_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return None  # a zombie is already dead
        return ProcStat(int(fields[2]), int(fields[3]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str:
    """This boot's id; empty where /proc/sys is hidden (ProcSubset=pid), where the ctime
    check (a record must be written when its leader started) still tells boots apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _boot_time() -> float:
    """Wall-clock time of boot, without /proc/stat (hidden under the unit's ProcSubset=pid):
    a process's start time counts clock ticks on CLOCK_BOOTTIME."""
    import time

    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _refused(entry: Path, reason: str) -> None:
    from agent.log import event

    event(
        "dispatcher.run_record_refused",
        f"not killing the process group in {entry}: {reason}",
        worker="dispatcher",
        level=logging.WARNING,
        entry=str(entry),
        reason=reason,
    )
