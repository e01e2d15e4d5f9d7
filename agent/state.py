"""The state file: what the supervisor last knew, as typed records in JSON with stable key order.

This module is the only one that reads or writes state_dir/state.json. Invariants:
- Writes are atomic (temp file, fsync, rename) and 0640 at most, so readers never see a
  torn file and nobody outside the agent's group reads it.
- Reads never follow a symlink, never read more than MAX_STATE_BYTES, and turn anything
  of the wrong shape or type (`[]`, `{"pid": "x"}`, NaN, huge numbers, nested garbage)
  into UnreadableState, one line naming the file and the field; never a traceback.
- It keeps the last run's outcome after the process ends, so `status` can tell a clean
  stop from a shutdown timeout or a crash. It is evidence, not truth: `status` combines it
  with the lock and the clock (see agent.status), under the rules of agent.health.
"""

import errno
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA_VERSION = 1
MAX_STATE_BYTES = 1024 * 1024
FILE_MODE = 0o640
MAX_PID = 1 << 22  # the kernel's largest pid_max
MAX_COUNT = 1 << 31
MAX_SECONDS = 1e9


class Outcome:
    RUNNING = "running"  # the run has not ended (or the process died without saying)
    CLEAN = "clean"
    SHUTDOWN_TIMEOUT = "shutdown_timeout"
    FORCED = "forced"
    FAILED = "failed"  # the supervisor gave up during start-up
    CRASHED = "crashed"  # found by the next start: the previous run never recorded an end
    KILLED = "killed"  # `agentctl stop` had to SIGKILL it


PHASES = ("starting", "ready", "stopping", "stopped")  # agent.states.Phase, without the enum
WORKER_STATES = ("starting", "running", "stopping", "stopped", "error", "hung", "disabled")


class UnreadableState(Exception):
    """The state file exists but is not evidence we can use; the message is one line."""


class StateNotPermitted(UnreadableState):
    """The state file exists, but we may not read it (not root, not the agent's group)."""


class PreviousRun(NamedTuple):
    pid: int | None = None
    started_at: str | None = None
    stopped_at: str | None = None
    outcome: str | None = None
    last_error: str | None = None


class SupervisorRecord(NamedTuple):
    pid: int | None = None
    phase: str | None = None
    outcome: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    stopped_at: str | None = None
    manager: str | None = None
    config: str | None = None
    state_dir: str | None = None
    log_sink: str | None = None
    hang_timeout: float | None = None
    stop_timeout: float | None = None
    last_error: str | None = None
    degraded: str | None = None  # the supervisor's own reason to be degraded (lock lost)
    previous_run: PreviousRun | None = None
    pulse_file: str | None = None  # where the liveness pulse is (see Pulse)
    reloads: int = 0  # reload attempts so far; `agentctl reload` waits for this to grow
    last_reload_at: str | None = None
    last_reload_error: str | None = None  # None: the last reload was applied
    last_reload_changes: str | None = None  # what it changed, for people


class WorkerRecord(NamedTuple):
    name: str
    state: str
    last_heartbeat: str | None = None
    restarts: int = 0
    last_error: str | None = None
    fault: str | None = None
    gave_up: bool = False
    detail: dict[str, Any] = {}


class Pulse(NamedTuple):
    """Proof of life, rewritten every second without fsync (pulse.json, in the runtime
    directory when there is one: a tmpfs, so an idle supervisor writes nothing to disk).
    state.json itself is rewritten only when something in it changes; `status` takes the
    newer of the two times. Worth nothing after a crash, and never trusted beyond that."""

    pid: int
    updated_at: str
    heartbeats: dict[str, str]  # worker name -> its last heartbeat


class StateRecord(NamedTuple):
    supervisor: SupervisorRecord
    workers: tuple[WorkerRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        sup = self.supervisor._asdict()
        if self.supervisor.previous_run is not None:
            sup["previous_run"] = self.supervisor.previous_run._asdict()
        return {
            "schema": SCHEMA_VERSION,
            "supervisor": sup,
            "workers": [w._asdict() for w in self.workers],
        }


# ---- reading


def read_state(path: Path) -> StateRecord | None:
    """None when there is no state file yet; UnreadableState when it is not usable evidence."""
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise UnreadableState(f"{path}: is a symlink; not trusted") from None
        if isinstance(exc, PermissionError):
            raise StateNotPermitted(f"{path}: permission denied") from None
        raise UnreadableState(f"{path}: {exc.strerror or exc}") from None
    return parse_state(data, str(path))


def readable_problem(path: Path) -> str | None:
    """One line saying why the state file is unusable evidence, or None when it is fine."""
    try:
        read_state(path)
    except UnreadableState as exc:
        return str(exc)
    return None


def _read_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not _is_regular(os.fstat(fd).st_mode):
            raise UnreadableState(f"{path}: not a regular file")
        data = os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_BYTES:
        raise UnreadableState(f"{path}: larger than {MAX_STATE_BYTES} bytes")
    return data


def _is_regular(mode: int) -> bool:
    return mode & 0o170000 == 0o100000  # S_ISREG, without importing stat


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_state(data: bytes, where: str) -> StateRecord:
    try:
        raw = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise UnreadableState(f"{where}: not valid JSON ({reason})") from None
    try:
        return state_from_json(raw)
    except _Wrong as exc:
        raise UnreadableState(f"{where}: not an agent state file: {exc}") from None


class _Wrong(Exception):
    pass


def state_from_json(raw: Any) -> StateRecord:
    """The typed record of a decoded state file; _Wrong names the first bad field."""
    if not isinstance(raw, dict):
        raise _Wrong(f"expected an object, got {_kind(raw)}")
    sup = _supervisor(_table(raw, "supervisor"))
    workers = raw.get("workers", [])
    if not isinstance(workers, list) or len(workers) > 64:
        raise _Wrong(f"workers: expected a list of at most 64 workers, got {_kind(workers)}")
    return StateRecord(sup, tuple(_worker(w, f"workers[{i}]") for i, w in enumerate(workers)))


def _supervisor(raw: dict[str, Any]) -> SupervisorRecord:
    where = "supervisor"
    previous = raw.get("previous_run")
    return SupervisorRecord(
        pid=_pid(raw, where),
        phase=_choice(raw, where, "phase", PHASES),
        outcome=_text(raw, where, "outcome"),
        started_at=_time(raw, where, "started_at"),
        updated_at=_time(raw, where, "updated_at"),
        stopped_at=_time(raw, where, "stopped_at"),
        manager=_text(raw, where, "manager"),
        config=_text(raw, where, "config"),
        state_dir=_text(raw, where, "state_dir"),
        log_sink=_text(raw, where, "log_sink"),
        hang_timeout=_seconds(raw, where, "hang_timeout"),
        stop_timeout=_seconds(raw, where, "stop_timeout"),
        last_error=_text(raw, where, "last_error"),
        degraded=_text(raw, where, "degraded"),
        previous_run=None if previous is None else _previous(_table(raw, "previous_run")),
        pulse_file=_text(raw, where, "pulse_file"),
        reloads=_count(raw, where, "reloads"),
        last_reload_at=_time(raw, where, "last_reload_at"),
        last_reload_error=_text(raw, where, "last_reload_error"),
        last_reload_changes=_text(raw, where, "last_reload_changes"),
    )


def _previous(raw: dict[str, Any]) -> PreviousRun:
    where = "supervisor.previous_run"
    return PreviousRun(
        pid=_pid(raw, where),
        started_at=_time(raw, where, "started_at"),
        stopped_at=_time(raw, where, "stopped_at"),
        outcome=_text(raw, where, "outcome"),
        last_error=_text(raw, where, "last_error"),
    )


def _worker(raw: Any, where: str) -> WorkerRecord:
    if not isinstance(raw, dict):
        raise _Wrong(f"{where}: expected an object, got {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _Wrong(f"{where}.name: expected a worker name, got {_kind(name)}")
    restarts = raw.get("restarts", 0)
    if not _is_int(restarts) or not 0 <= restarts < MAX_COUNT:
        raise _Wrong(f"{where}.restarts: expected a count, got {_kind(restarts)}")
    gave_up = raw.get("gave_up", False)
    if not isinstance(gave_up, bool):
        raise _Wrong(f"{where}.gave_up: expected true or false, got {_kind(gave_up)}")
    detail = raw.get("detail") or {}
    if not isinstance(detail, dict):
        raise _Wrong(f"{where}.detail: expected an object, got {_kind(detail)}")
    return WorkerRecord(
        name=name,
        state=_choice(raw, where, "state", WORKER_STATES, required=True),
        last_heartbeat=_time(raw, where, "last_heartbeat"),
        restarts=restarts,
        last_error=_text(raw, where, "last_error"),
        fault=_text(raw, where, "fault"),
        gave_up=gave_up,
        detail=detail,
    )


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise _Wrong(f"{key}: expected an object, got {_kind(value)}")
    return value


def _text(raw: dict[str, Any], where: str, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise _Wrong(f"{where}.{key}: expected a string, got {_kind(value)}")
    return value


def _choice(
    raw: dict[str, Any], where: str, key: str, allowed: tuple[str, ...], required: bool = False
) -> str | None:
    value = raw.get(key)
    if (value is None and not required) or value in allowed:
        return value
    raise _Wrong(f"{where}.{key}: expected one of {', '.join(allowed)}, got {_shown(value)}")


def _time(raw: dict[str, Any], where: str, key: str) -> str | None:
    value = _text(raw, where, key)
    if value is None:
        return None
    from agent.clock import parse_iso

    try:
        parse_iso(value)
    except (ValueError, OverflowError, OSError):
        raise _Wrong(f"{where}.{key}: expected an ISO 8601 time, got {_shown(value)}") from None
    return value


def _count(raw: dict[str, Any], where: str, key: str) -> int:
    value = raw.get(key, 0)
    if _is_int(value) and 0 <= value < MAX_COUNT:
        return value
    raise _Wrong(f"{where}.{key}: expected a count, got {_shown(value)}")


def _pid(raw: dict[str, Any], where: str) -> int | None:
    value = raw.get("pid")
    if value is None or (_is_int(value) and 0 < value < MAX_PID):
        return value
    raise _Wrong(f"{where}.pid: expected a process id, got {_shown(value)}")


def _seconds(raw: dict[str, Any], where: str, key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < MAX_SECONDS:
        return float(value)
    raise _Wrong(f"{where}.{key}: expected a number of seconds, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# ---- writing


def write_state(path: Path, state: StateRecord | dict[str, Any]) -> None:
    """Atomically replace the state file; a plain dict is checked first, so what is written
    can always be read back."""
    from agent.fsutil import atomic_write_json

    if isinstance(state, dict):
        try:
            state = state_from_json(state)
        except _Wrong as exc:
            raise ValueError(f"refusing to write a bad state record: {exc}") from None
    atomic_write_json(path, state.to_json(), mode=FILE_MODE)


def record_killed(path: Path, reason: str, stopped_at: str) -> None:
    """Mark a run that `agentctl stop` had to SIGKILL as ended (the caller holds the lock).
    An unreadable or already-stopped state is left as it is."""
    try:
        saved = read_state(path)
    except UnreadableState:
        return
    if saved is None or saved.supervisor.phase == "stopped":
        return
    sup = saved.supervisor._replace(
        phase="stopped", outcome=Outcome.KILLED, last_error=reason, stopped_at=stopped_at
    )
    write_state(path, saved._replace(supervisor=sup))


# ---- the pulse

MAX_PULSE_BYTES = 64 * 1024


def write_pulse(path: Path, pulse: Pulse) -> None:
    from agent.fsutil import atomic_write_bytes

    data = json.dumps(pulse._asdict(), sort_keys=True).encode()
    atomic_write_bytes(path, data, mode=FILE_MODE, sync_file=False, sync_dir=False)


def read_pulse(path: Path) -> Pulse | None:
    """The pulse, or None when it is missing or not what write_pulse writes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_PULSE_BYTES + 1) if _is_regular(os.fstat(fd).st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        raw = json.loads(data, parse_constant=_no_constants)
        if not isinstance(raw, dict):
            return None
        where = "pulse"
        pid, updated = _pid(raw, where), _time(raw, where, "updated_at")
        beats = raw["heartbeats"]
        if pid is None or updated is None or not isinstance(beats, dict):
            return None
        times = {name: _time(beats, where, name) for name in beats}
        return Pulse(pid, updated, {name: t for name, t in times.items() if t})
    except (ValueError, RecursionError, _Wrong, TypeError, KeyError):
        return None
