"""`agentctl logs`: recent structured events from whichever sink the runtime uses.

journald: systemd.journal.Reader with the journal's own matches (SYSLOG_IDENTIFIER,
WORKER, EVENT, PRIORITY, a time seek), so the journal does the filtering.
file: the JSON-lines file under state_dir/logs, read backwards from its end so that the
last N matches cost a read of the tail, not of the whole history.
"""

import errno
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from agent.clock import iso_utc, parse_iso
from agent.config import Config
from agent.errors import AgentError, PermissionDenied, UsageError
from agent.journalfields import key_of_field

LEVELS = ("debug", "info", "warning", "error", "critical")
PRIORITY_OF_LEVEL = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
LEVEL_OF_PRIORITY = {
    0: "critical",
    1: "critical",
    2: "critical",
    3: "error",
    4: "warning",
    5: "info",
    6: "info",
    7: "debug",
}
CORE_KEYS = ("ts", "level", "event", "worker", "message", "pid")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CHUNK = 64 * 1024


class LogFilter(NamedTuple):
    worker: str | None = None
    event: str | None = None
    level: str | None = None  # minimum severity
    since: float | None = None  # epoch seconds
    unit: str | None = None  # journald only: the systemd unit that logged them

    def matches(self, record: dict[str, Any]) -> bool:
        if self.worker and record.get("worker") != self.worker:
            return False
        if self.event and record.get("event") != self.event:
            return False
        if self.level and _severity(record.get("level")) < _severity(self.level):
            return False
        return not (self.since is not None and _record_time(record) < self.since)


def parse_since(text: str, now: float | None = None) -> float:
    """'10m', '2h', '1d', '30s' ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
    try:
        return parse_iso(text.strip())
    except ValueError:
        raise UsageError(
            f"--since: expected a time like 2026-11-24T06:00:00Z or an age like 30s, 10m, 2h, "
            f"1d; got {text!r}"
        ) from None


def _check_worker(worker: str | None) -> None:
    from agent.states import WORKER_NAMES

    if worker is not None and worker not in WORKER_NAMES:
        raise UsageError(f"--worker: expected one of {', '.join(WORKER_NAMES)}; got {worker!r}")


def _check_event(name: str | None) -> None:
    from agent.events import is_known, unknown_event_message

    if name is not None and not is_known(name):
        raise UsageError(f"--event: {unknown_event_message(name)}")


def _severity(level: str | None) -> int:
    return -PRIORITY_OF_LEVEL.get(level or "info", 6)


def _record_time(record: dict[str, Any]) -> float:
    try:
        return parse_iso(record["ts"])
    except (KeyError, ValueError, TypeError):
        return 0.0


# ---- JSON-lines file sink


def file_tail(path: Path, flt: LogFilter, limit: int) -> list[dict[str, Any]]:
    """The last `limit` matching records, oldest first. Records of the wrong shape are
    unreadable evidence: skipped, and counted in one warning line on stderr."""
    found: list[dict[str, Any]] = []
    skipped = [0]
    for record in _records_backwards(path, skipped):
        if flt.since is not None and _record_time(record) < flt.since:
            break
        if flt.matches(record):
            found.append(record)
            if len(found) >= limit:
                break
    if skipped[0]:
        print(
            f"agentctl: warning: {path}: skipped {skipped[0]} unreadable log record(s)",
            file=sys.stderr,
        )
    found.reverse()
    return found


def _records_backwards(path: Path, skipped: list[int]) -> Iterator[dict[str, Any]]:
    try:
        files = [path, *_rotated(path)]
    except PermissionError:
        raise PermissionDenied(f"{path.parent}: permission denied reading the agent log") from None
    for file in files:
        for index, line in enumerate(_lines_backwards(file)):
            record = _parse_line(line)
            if record is not None:
                yield record
            elif index > 0 or file != path:  # the newest line may be torn by a writer: quiet
                skipped[0] += 1


def _rotated(path: Path) -> list[Path]:
    backups = []
    index = 1
    while (candidate := path.with_name(f"{path.name}.{index}")).exists():
        backups.append(candidate)
        index += 1
    return backups


def _lines_backwards(path: Path) -> Iterator[bytes]:
    try:
        handle = open_log(path)
    except FileNotFoundError:
        return
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied reading the agent log") from None
    with handle:
        position = handle.seek(0, os.SEEK_END)
        partial = b""
        while position > 0:
            step = min(CHUNK, position)
            position -= step
            handle.seek(position)
            block = handle.read(step) + partial
            lines = block.split(b"\n")
            partial = lines.pop(0)
            yield from (line for line in reversed(lines) if line)
        if partial:
            yield partial


CORE_TYPES = {
    "ts": str,
    "level": str,
    "event": str,
    "worker": str,
    "message": str,
    "pid": int,
}


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """One record, or None when the line is not a record of ours (bad JSON, wrong shape)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    for key, kind in CORE_TYPES.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return None
    return record


def file_follow(path: Path, flt: LogFilter, poll: float = 0.2) -> Iterator[dict[str, Any]]:
    """Records appended from now on; survives rotation (a new inode at the same path)."""
    handle, inode = _open_at_end(path)
    buffer = b""
    while True:
        chunk = handle.read() if handle else b""
        if chunk:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                record = _parse_line(line)
                if record is not None and flt.matches(record):
                    yield record
            continue
        time.sleep(poll)  # a tail -f poll; no inotify needed for an operator's terminal
        current = _inode(path)
        if current != inode:
            if handle:
                handle.close()
            handle, inode = _open_at_end(path, seek_end=False)


def _open_at_end(path: Path, seek_end: bool = True):
    try:
        handle = open_log(path)
    except _NotOurs:
        return None, _inode(path)  # not ours: wait until the path names another file
    except FileNotFoundError:
        return None, None
    if seek_end:
        handle.seek(0, os.SEEK_END)
    return handle, os.fstat(handle.fileno()).st_ino


class _NotOurs(FileNotFoundError):
    """A log path that is a symlink or not a regular file: read as if it were absent."""


def open_log(path: Path):
    """Open a log file for reading without following a symlink; only regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where our log should be
            print(f"agentctl: warning: {path}: is a symlink; not following it", file=sys.stderr)
            raise _NotOurs(path) from None
        raise
    if os.fstat(fd).st_mode & 0o170000 != 0o100000:
        os.close(fd)
        print(f"agentctl: warning: {path}: not a regular file; skipping it", file=sys.stderr)
        raise _NotOurs(path)
    return os.fdopen(fd, "rb")


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


# ---- journald sink
#
# `agentctl logs` is a short-lived command, so the tail is read with systemd-python's C
# reader (systemd._reader) and converted here: importing systemd.journal and its per-field
# converters costs more than the query itself. Following (-f) uses the full Reader.


def _journal_matches(flt: LogFilter) -> list[str]:
    matches = ["SYSLOG_IDENTIFIER=agent"]
    if flt.unit:
        matches.append(f"_SYSTEMD_UNIT={flt.unit}")
    if flt.worker:
        matches.append(f"WORKER={flt.worker}")
    if flt.event:
        matches.append(f"EVENT={flt.event}")
    if flt.level:  # several values of one field: the journal ORs them
        matches += [f"PRIORITY={p}" for p in range(PRIORITY_OF_LEVEL[flt.level] + 1)]
    return matches


def _no_systemd_python() -> AgentError:
    return AgentError(
        "the agent logs to journald, but systemd-python (python3-systemd) is not installed; "
        "use journalctl -t agent"
    )


def _open_journal(cls):
    try:
        return cls()
    except OSError as exc:
        raise PermissionDenied(
            f"cannot open the journal: {exc.strerror}; reading the system journal needs root "
            "or membership of the systemd-journal or adm group"
        ) from None


def journal_reader(flt: LogFilter):
    """A systemd.journal.Reader with our matches (for following)."""
    try:
        from systemd import journal
    except ImportError:
        raise _no_systemd_python() from None
    reader = _open_journal(journal.Reader)
    for match in _journal_matches(flt):
        reader.add_match(match)
    return reader


def journal_tail(flt: LogFilter, limit: int) -> list[dict[str, Any]]:
    """The last `limit` matching events, oldest first; the journal does the matching."""
    try:
        from systemd._reader import _Reader
    except ImportError:
        raise _no_systemd_python() from None
    reader = _open_journal(_Reader)
    for match in _journal_matches(flt):
        reader.add_match(match)
    since_usec = None if flt.since is None else int(flt.since * 1_000_000)
    reader.seek_tail()
    found = []
    try:
        while len(found) < limit and reader._previous():
            stamp = reader._get_realtime()
            if since_usec is not None and stamp < since_usec:
                break
            entry = {k: _decode(v) for k, v in reader._get_all().items()}
            entry["__REALTIME_TIMESTAMP"] = stamp
            found.append(journal_record(entry))
    finally:
        reader.close()
    if not found and not _journal_readable_by_us():
        raise PermissionDenied(
            "no agent events visible in the journal: reading the system "
            "journal needs root or membership of the systemd-journal or adm "
            "group"
        )
    found.reverse()
    return found


def _decode(value: bytes | list[bytes]) -> str:
    if isinstance(value, list):  # a field sent more than once: the last value wins
        value = value[-1]
    return value.decode("utf-8", "replace")


def journal_follow(flt: LogFilter) -> Iterator[dict[str, Any]]:
    reader = journal_reader(flt)
    reader.seek_tail()
    reader.get_previous()  # after seek_tail, step back once or newer systemd yields nothing
    while True:
        for entry in reader:
            yield journal_record(entry)
        reader.wait(1.0)


def journal_record(entry: dict[str, Any]) -> dict[str, Any]:
    """One journal entry (from either reader) as the same record the file sink writes."""
    stamp = entry.get("__REALTIME_TIMESTAMP")
    if isinstance(stamp, datetime):
        ts = iso_utc(stamp.timestamp())
    elif isinstance(stamp, int):  # microseconds, from the C reader
        ts = iso_utc(stamp / 1_000_000)
    else:
        ts = None
    pid = entry.get("_PID")
    record: dict[str, Any] = {
        "ts": ts,
        "level": LEVEL_OF_PRIORITY.get(_int(entry.get("PRIORITY"), 6), "info"),
        "event": entry.get("EVENT") or None,
        "worker": entry.get("WORKER") or None,
        "message": entry.get("MESSAGE"),
        "pid": _int(pid, None) if pid is not None else None,
    }
    for key, value in entry.items():
        if key.startswith("_") or key in _JOURNAL_OWN or key in ("EVENT", "WORKER"):
            continue
        if key.isupper():
            record[key_of_field(key)] = value
    return record


def _int(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


_JOURNAL_OWN = {
    "MESSAGE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_FACILITY",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "MESSAGE_ID",
    "INVOCATION_ID",
    "UNIT",
    "USER_UNIT",
}


def _journal_readable_by_us() -> bool:
    if os.geteuid() == 0:
        return True
    import grp

    groups = set(os.getgroups())
    for name in ("systemd-journal", "adm"):
        try:
            if grp.getgrnam(name).gr_gid in groups:
                return True
        except KeyError:
            continue
    return False


# ---- rendering


def render_record(record: dict[str, Any]) -> str:
    extra = " ".join(
        f"{k}={_short(v)}"
        for k, v in record.items()
        if k not in CORE_KEYS and k != "traceback" and v is not None
    )
    worker = f"[{record['worker']}]" if record.get("worker") else ""
    parts = [
        record.get("ts") or "-",
        f"{(record.get('level') or '-'):<7}",
        record.get("event") or "-",
        worker,
        record.get("message") or "",
        extra,
    ]
    return " ".join(p for p in parts if p)


def json_line(record: dict[str, Any]) -> str:
    ordered = {key: record.get(key) for key in CORE_KEYS}
    ordered.update({k: v for k, v in record.items() if k not in ordered})
    return json.dumps(ordered, default=str, ensure_ascii=False)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- the command


def show_logs(
    config: Config, flt: LogFilter, limit: int, follow: bool, as_json: bool
) -> Iterator[str]:
    """Lines to print: the last `limit` matches, then (with follow) new ones as they come."""
    render = json_line if as_json else render_record
    recorded = _recorded_run(config)
    if runtime_sink(config, recorded) == "journald":
        if recorded.get("manager") == "systemd":
            flt = flt._replace(unit="agent.service")
        recent, later = journal_tail(flt, limit), (journal_follow(flt) if follow else ())
    else:
        recent, later = (
            file_tail(config.log_path, flt, limit),
            file_follow(config.log_path, flt) if follow else (),
        )
    for record in recent:
        yield render(record)
    for record in later:
        yield render(record)


def _recorded_run(config: Config) -> dict[str, Any]:
    """What the last supervisor recorded about itself (empty when nothing readable)."""
    from agent.state import StateNotPermitted, UnreadableState, read_state

    try:
        saved = read_state(config.state_path)
    except StateNotPermitted:
        saved = None  # reading the log itself will say what is not permitted
    except UnreadableState as exc:
        print(f"agentctl: warning: {exc}; ignoring it", file=sys.stderr)
        saved = None
    return saved.supervisor._asdict() if saved else {}


def runtime_sink(config: Config, recorded: dict[str, Any] | None = None) -> str:
    """The sink the last supervisor recorded; else the one a new supervisor would choose."""
    recorded = _recorded_run(config) if recorded is None else recorded
    if recorded.get("log_sink") in ("journald", "file"):
        return recorded["log_sink"]
    from agent.log import choose_sink

    return choose_sink(config)


def print_logs(
    config: Config,
    limit: int,
    follow: bool,
    as_json: bool,
    worker: str | None = None,
    event: str | None = None,
    level: str | None = None,
    since: str | None = None,
) -> None:
    """`agentctl logs`: the last `limit` matching events, then new ones with `follow`."""
    _check_worker(worker)
    _check_event(event)
    flt = LogFilter(
        worker=worker, event=event, level=level, since=parse_since(since) if since else None
    )
    from agent.output import flush, write

    for line in show_logs(config, flt, limit, follow, as_json):
        if not write(line, flush=follow):
            return
    flush()
