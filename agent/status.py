"""`agentctl status`: the truth about the supervisor, derived from live evidence.

- running or not: whether a process holds the supervisor lock (never a saved flag);
- crashed: the state file says a run is live, but nobody holds the lock;
- hung: a worker's last heartbeat is older than hang_timeout, whatever was saved;
- a supervisor whose own loop stopped updating the state file is degraded too.
"""

import sys
import time
from pathlib import Path
from typing import Any

from agent import errors
from agent.clock import parse_iso
from agent.config import Config
from agent.health import degraded_reasons, is_hung, loop_silent, supervisor_health
from agent.lock import probe
from agent.state import (
    PreviousRun,
    StateRecord,
    SupervisorRecord,
    UnreadableState,
    read_pulse,
    read_state,
)
from agent.states import ALIVE_STATES, LIVE_PHASES, WorkerState

# What status calls a worker whose supervisor crashed while it was alive; `last_state`
# keeps the state it was last seen in, and its heartbeat age says when it went silent.
CRASHED = "crashed"


def collect_status(
    config: Config, now: float | None = None, unit_facts: bool = True
) -> dict[str, Any]:
    """The report; unit_facts=False skips asking systemd (a `systemctl show` costs more
    than the rest of status together), which the quick human form does while running."""
    now = time.time() if now is None else now
    saved, unreadable = _saved_state(config)
    saved = _with_pulse(saved)
    sup = saved.supervisor
    lock = probe(config.lock_path, claimed_pid=sup.pid)  # shown, never signalled
    if not lock.held and sup.phase in LIVE_PHASES:
        # A supervisor writes its final state before it lets go of the lock: read again,
        # or one that stopped between our two reads would look crashed.
        saved, unreadable = _saved_state(config)
        sup = saved.supervisor
    workers = [w._asdict() for w in saved.workers]
    if lock.held and lock.pid is not None and sup.pid not in (None, lock.pid):
        # A new supervisor holds the lock but has not written its state yet: the file is
        # the previous run's, and says nothing about this one.
        sup = SupervisorRecord(phase="starting", previous_run=PreviousRun(pid=sup.pid))
        workers = []
    hang_timeout = sup.hang_timeout or config.supervisor.hang_timeout

    state = _supervisor_state(lock.held, sup.phase)
    for worker in workers:
        _derive_worker(worker, state, now, hang_timeout)
    last_error = unreadable or sup.last_error
    problems = [unreadable, sup.last_error]
    if state == "running":
        problems += [lock.problem, sup.degraded, _stale(sup, now, hang_timeout)]
        last_error = next((p for p in problems if p), None)
    health, reasons = None, []
    if state == "running":
        health = supervisor_health([(w["state"], w["detail"]) for w in workers], problems)
        reasons = degraded_reasons(
            [(w["name"], w["state"], w["detail"]) for w in workers], problems
        )

    report = {
        "supervisor": {
            "state": state,
            "health": health,
            "degraded_reasons": reasons,
            "pid": lock.pid if lock.held else sup.pid,
            "started_at": sup.started_at,
            "uptime_s": _uptime(sup, now) if state == "running" else None,
            "phase": sup.phase if state == "running" else None,
            "manager": sup.manager,
            "config": sup.config or (str(config.path) if config.path else None),
            "state_dir": str(config.state_dir),
            "log_sink": sup.log_sink,
            "last_error": last_error,
            "outcome": _outcome(state, sup),
            "stopped_at": sup.stopped_at,
            "previous_run": _previous(sup.previous_run),
            "unreadable_state": unreadable,
        },
        "workers": [_ordered(w, WORKER_KEYS) for w in workers],
    }
    cluster = _cluster(workers, now) if state == "running" else None
    if cluster:
        report["cluster"] = cluster
    if not unit_facts and state == "running":
        return report
    from agent.systemd_unit import merge_unit_facts  # systemd's view, when it manages us

    return merge_unit_facts(report, config)


# The shared queue's view (postgres backend), as the queue worker last saw it: shown in
# its own rows, not in the worker's DETAIL.
CLUSTER_KEYS = ("host_id", "cluster_depth", "cluster_oldest_s", "cluster_running")
CLUSTER_KEYS += ("cluster_hosts", "db_latency_ms", "hosts")


def _cluster(workers: list[dict[str, Any]], now: float) -> dict[str, Any] | None:
    queue = next((w for w in workers if w["name"] == "queue"), None)
    detail = (queue or {}).get("detail") or {}
    if detail.get("backend") != "postgres":
        return None
    hosts = []
    listed = detail.get("hosts")
    for host in listed if isinstance(listed, list) else []:
        if not isinstance(host, dict) or not isinstance(host.get("host_id"), str):
            continue  # a state file of the wrong shape: what is usable is shown
        age = _age(host.get("last_heartbeat"), now)
        this = host["host_id"] == detail.get("host_id")
        hosts.append({**host, "heartbeat_age_s": age, "this_host": this})
    return {
        "backend": "postgres",
        "host_id": detail.get("host_id"),
        "db": detail.get("db"),
        "db_latency_ms": detail.get("db_latency_ms"),
        "depth": detail.get("cluster_depth"),
        "oldest_age_s": detail.get("cluster_oldest_s"),
        "running": detail.get("cluster_running"),
        "hosts": hosts,
    }


def _age(iso: Any, now: float) -> float | None:
    try:
        return round(max(now - parse_iso(iso), 0.0), 1) if isinstance(iso, str) else None
    except ValueError:
        return None


def _saved_state(config: Config) -> tuple[StateRecord, str | None]:
    """The saved state (empty when there is none) and, when it is unusable, why."""
    try:
        saved = read_state(config.state_path)
    except UnreadableState as exc:
        return StateRecord(SupervisorRecord()), str(exc)
    return saved or StateRecord(SupervisorRecord()), None


def _with_pulse(saved: StateRecord) -> StateRecord:
    """The saved state with the newer times of its supervisor's pulse (agent.state.Pulse)."""
    sup = saved.supervisor
    pulse = read_pulse(Path(sup.pulse_file)) if sup.pulse_file else None
    if pulse is None or pulse.pid != sup.pid:
        return saved
    workers = tuple(
        w._replace(last_heartbeat=_newer(w.last_heartbeat, pulse.heartbeats.get(w.name)))
        for w in saved.workers
    )
    sup = sup._replace(updated_at=_newer(sup.updated_at, pulse.updated_at))
    return StateRecord(sup, workers)


def _newer(saved: str | None, pulsed: str | None) -> str | None:
    if saved is None or pulsed is None:
        return saved or pulsed
    return pulsed if parse_iso(pulsed) > parse_iso(saved) else saved


def _previous(previous: PreviousRun | None) -> dict[str, Any] | None:
    return previous._asdict() if previous is not None else None


def _stale(sup: SupervisorRecord, now: float, hang_timeout: float) -> str | None:
    return loop_silent(_state_file_age(sup, now), hang_timeout)


WORKER_KEYS = ("name", "state", "last_heartbeat", "heartbeat_age_s", "restarts", "last_error")


def _ordered(record: dict[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    return {**{k: record.get(k) for k in first}, **record}


def _supervisor_state(lock_held: bool, phase: str | None) -> str:
    if lock_held:
        return "running"
    if phase in LIVE_PHASES:
        return "crashed"
    return "stopped"


def _derive_worker(
    worker: dict[str, Any], supervisor: str, now: float, hang_timeout: float
) -> None:
    beat = worker.get("last_heartbeat")
    age = round(max(now - parse_iso(beat), 0.0), 1) if beat else None
    worker["heartbeat_age_s"] = age
    if supervisor != "running":
        if worker["state"] in ALIVE_STATES:  # its process is gone
            worker["last_state"] = worker["state"]
            worker["state"] = CRASHED if supervisor == "crashed" else str(WorkerState.STOPPED)
        if worker["state"] != CRASHED:
            worker["heartbeat_age_s"] = None
        return
    if is_hung(worker["state"], age, hang_timeout):
        worker["state"] = str(WorkerState.HUNG)
        worker["last_error"] = f"no heartbeat for {age:.1f}s"


def _state_file_age(sup: SupervisorRecord, now: float) -> float | None:
    return max(now - parse_iso(sup.updated_at), 0.0) if sup.updated_at else None


def _uptime(sup: SupervisorRecord, now: float) -> float | None:
    return round(now - parse_iso(sup.started_at), 1) if sup.started_at else None


def _outcome(state: str, sup: SupervisorRecord) -> str | None:
    if state == "crashed":
        return "crashed"
    if state == "stopped":
        return sup.outcome
    return None


def status_exit_code(report: dict[str, Any]) -> int:
    sup = report["supervisor"]
    if sup["state"] == "crashed":
        return errors.STATUS_CRASHED
    if sup["state"] != "running":
        return errors.STATUS_NOT_RUNNING
    return errors.STATUS_HEALTHY if sup["health"] == "healthy" else errors.STATUS_DEGRADED


def render_status(report: dict[str, Any], width: int | None = None) -> str:
    """The human report; with a width, long values are cut to it (--json has them whole)."""
    sup = report["supervisor"]
    headline = f"agent supervisor: {sup['state']}"
    if sup["health"]:
        headline += f" ({sup['health']})"
    lines = [headline]
    rows = [
        ("pid", sup["pid"]),
        ("started", _started(sup)),
        ("manager", sup.get("manager")),
        ("config", sup.get("config") or "(embedded defaults)"),
        ("state dir", sup.get("state_dir")),
        ("logs", sup.get("log_sink")),
    ]
    if sup["state"] != "running":
        rows.append(("outcome", sup.get("outcome")))
        rows.append(("stopped", sup.get("stopped_at")))
    if sup.get("degraded_reasons"):
        rows.append(("degraded", "; ".join(sup["degraded_reasons"])))
    rows.append(("last error", sup.get("last_error")))
    unit = report.get("systemd")
    if unit:
        rows.append(("systemd", _unit_line(unit)))
    cluster = report.get("cluster")
    if cluster:
        rows += _cluster_rows(cluster)
    for key, value in rows:
        lines.append(_cut(f"  {key + ':':<12}{'-' if value is None else value}", width))
    if report["workers"]:
        lines.append("")
        if sup["state"] == "crashed":
            lines.append("Workers as last recorded before the crash:")
        lines.append(_worker_table(report["workers"], width))
    return "\n".join(lines)


def _cluster_rows(cluster: dict[str, Any]) -> list[tuple[str, str]]:
    latency = cluster.get("db_latency_ms")
    db = f"postgres {cluster.get('db')}" + (f", {latency} ms" if latency is not None else "")
    oldest = cluster.get("oldest_age_s")
    queue = (
        f"depth {cluster.get('depth', '-')}, oldest "
        f"{'-' if oldest is None else f'{oldest:.1f}s'}, running {cluster.get('running', '-')}"
    )
    hosts = "; ".join(_host_text(h) for h in cluster.get("hosts") or [])
    return [("queue db", db), ("cluster", queue), ("hosts", hosts or "-")]


def _host_text(host: dict[str, Any]) -> str:
    age = host.get("heartbeat_age_s")
    beat = "-" if age is None else f"{age:.1f}s ago"
    this = " (this host)" if host.get("this_host") else ""
    return f"{host['host_id']}{this}: heartbeat {beat}, {host.get('in_flight', 0)} running"


def _unit_line(unit: dict[str, Any]) -> str:
    if unit.get("error"):
        return f"{unit['unit']}: {unit['error']}"
    return (
        f"{unit['unit']} {unit.get('active_state')} ({unit.get('sub_state')}), "
        f"main pid {unit.get('main_pid') or '-'}, result {unit.get('result')}, "
        f"restarts {unit.get('restarts')}"
    )


def _started(sup: dict[str, Any]) -> str | None:
    if not sup.get("started_at"):
        return None
    if sup.get("uptime_s") is None:
        return sup["started_at"]
    return f"{sup['started_at']} (up {_duration(sup['uptime_s'])})"


# The fixed columns; DETAIL and LAST ERROR share what the terminal leaves.
COLUMNS = (("WORKER", 10), ("STATE", 12), ("HEARTBEAT", 10), ("RESTARTS", 8))
MIN_FREE_COLUMNS = 30


def _worker_table(workers: list[dict[str, Any]], width: int | None) -> str:
    rows = [_worker_row(w) for w in workers]
    detail_width, error_width = _free_widths(rows, width)
    header = (*(name for name, _ in COLUMNS), "DETAIL", "LAST ERROR")
    lines = [_table_line(header, detail_width, error_width)]
    lines += [_table_line(row, detail_width, error_width) for row in rows]
    return "\n".join(lines)


def _worker_row(w: dict[str, Any]) -> tuple[str, ...]:
    age = w.get("heartbeat_age_s")
    detail = dict(w.get("detail") or {})
    # a problem the worker reports in its detail belongs in LAST ERROR, not DETAIL
    degraded, detail_error = detail.pop("degraded", None), detail.pop("last_error", None)
    for key in CLUSTER_KEYS:  # in the report's own rows
        detail.pop(key, None)
    state = w["state"]
    if state == CRASHED and w.get("last_state"):
        state = f"was {w['last_state']}"
    return (
        w["name"],
        state,
        "-" if age is None else f"{age:.1f}s ago",
        str(w.get("restarts", 0)),
        _detail_text(detail),
        str(w.get("last_error") or degraded or detail_error or "-"),
    )


def _free_widths(rows: list[tuple[str, ...]], width: int | None) -> tuple[int, int | None]:
    """DETAIL's column width and LAST ERROR's cut (None: no cut)."""
    detail = max([len("DETAIL")] + [len(row[4]) for row in rows])
    error = max([len("LAST ERROR")] + [len(row[5]) for row in rows])
    if width is None:
        return detail, None
    free = max(width - sum(w + 2 for _, w in COLUMNS) - 2, MIN_FREE_COLUMNS)
    if detail + error <= free:
        return detail, error
    detail = min(detail, max(free // 2, free - error))
    return detail, free - detail


def _table_line(row: tuple[str, ...], detail_width: int, error_width: int | None) -> str:
    cells = [_cut(cell, w).ljust(w) for cell, (_, w) in zip(row, COLUMNS, strict=False)]
    cells.append(_cut(row[4], detail_width).ljust(detail_width))
    cells.append(row[5] if error_width is None else _cut(row[5], error_width))
    return "  ".join(cells).rstrip()


def _cut(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + "\u2026"


def _detail_text(detail: dict[str, Any]) -> str:
    """k=v pairs, empty values hidden; a nested table (slack profiles) as name:state,..."""
    parts = []
    for key, value in detail.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = ",".join(
                f"{name}:{sub.get('state', '?') if isinstance(sub, dict) else sub}"
                for name, sub in value.items()
            )
        parts.append(f"{key}={value}")
    return " ".join(parts) or "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def output_width(full: bool) -> int | None:
    """Cut to $COLUMNS or the terminal, unless --full or the output is not a terminal."""
    import os

    columns = os.environ.get("COLUMNS", "")
    if full:
        return None
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except OSError:
        return None


def print_status(config: Config, as_json: bool, full: bool = False) -> int:
    """Print the report (human or JSON) and return the documented exit code."""
    report = collect_status(config, unit_facts=as_json or full)
    unreadable = report["supervisor"].get("unreadable_state")
    if unreadable:
        print(f"agentctl: warning: {unreadable}; ignoring it", file=sys.stderr)
    from agent.output import flush, write

    if as_json:
        import json

        write(json.dumps(report, indent=2)) and flush()
    else:
        write(render_status(report, output_width(full))) and flush()
    return status_exit_code(report)
