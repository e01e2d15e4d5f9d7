"""`agentctl db status` and `agentctl db migrate`: what the queue database looks like from
this host, and bringing its schema to this build's version.

status never changes anything. It says which backend the config chooses; for postgres,
the server (host, port, database, user: never the password), whether it answers and how
fast, its schema version against this build's, and the cluster's depth, oldest message,
running, failed and hosts. Its exit code: 0 when the database answers with this build's
schema, 1 otherwise (files backend: 0).
"""

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.config import Config
from agent.errors import EXIT_FAILURE, EXIT_OK, AgentError


@dataclass
class DbStatus:
    backend: str
    server: str | None = None
    host_id: str | None = None
    reachable: bool | None = None
    connect_ms: float | None = None
    latency_ms: float | None = None
    schema_version: int | None = None
    build_version: int | None = None
    depth: int | None = None
    oldest_age_s: float | None = None
    running: int | None = None
    failed: int | None = None
    hosts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.backend != "postgres":
            return True
        return bool(self.reachable) and self.schema_version == self.build_version


def db_status(config: Config) -> DbStatus:
    if config.queue.backend != "postgres":
        return DbStatus(config.queue.backend)
    from agent.pg import migrate
    from agent.pg.connect import connect, host_id, load_target

    settings = config.queue.postgres
    target = load_target(config)  # a bad dsn_file is a config error (exit 78), not a status
    report = DbStatus("postgres", target.shown, host_id(settings))
    report.build_version = migrate.build_version()
    try:
        started = time.perf_counter()
        with connect(target, settings, "agentctl db status") as conn:
            report.connect_ms = _ms_since(started)
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            report.latency_ms = _ms_since(started)
            report.reachable = True
            report.schema_version = _read(conn, target, migrate.current_version)
            if report.schema_version == report.build_version:
                _fill_stats(report, conn, target)
    except AgentError as exc:
        report.reachable = report.reachable or False
        report.error = str(exc)
    return report


def _read(conn: Any, target: Any, query: Any) -> Any:
    from agent.pg.connect import translated

    with translated(target, "read the schema version"):
        return query(conn)


def _fill_stats(report: DbStatus, conn: Any, target: Any) -> None:
    from agent.pg.connect import translated
    from agent.pg.queue import HOST_STATS, STATS

    with translated(target, "read queue stats"):
        depth, oldest, running, failed = conn.execute(STATS).fetchone()
        hosts = conn.execute(HOST_STATS).fetchall()
    report.depth, report.running, report.failed = depth, running, failed
    report.oldest_age_s = None if oldest is None else round(oldest, 3)
    report.hosts = [
        {"host_id": h, "heartbeat_age_s": round(age, 3), "in_flight": n, "leases": leases}
        for h, age, n, leases in hosts
    ]


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def render(report: DbStatus, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(report) | {"ok": report.ok}, sort_keys=True)
    if report.backend != "postgres":
        return f'queue backend: {report.backend} (no database; [queue] backend = "postgres")'
    lines = [
        "queue backend: postgres",
        f"server: {report.server}",
        f"host id: {report.host_id}",
    ]
    if report.reachable:
        lines.append(
            f"reachable: yes (connect {report.connect_ms} ms, round trip {report.latency_ms} ms)"
        )
    else:
        lines.append("reachable: no")
    if report.schema_version is not None:
        lines.append(
            f"schema: version {report.schema_version}, this build "
            f"{report.build_version} ({_schema_verdict(report)})"
        )
    if report.depth is not None:
        oldest = "-" if report.oldest_age_s is None else f"{report.oldest_age_s:.1f} s"
        lines.append(
            f"queue: depth {report.depth}, oldest {oldest}, running {report.running},"
            f" failed {report.failed}"
        )
        for host in report.hosts:
            lines.append(
                f"host {host['host_id']}: heartbeat {host['heartbeat_age_s']:.1f} s ago,"
                f" in flight {host['in_flight']}, leases {host['leases']}"
            )
    if report.error:
        lines.append(f"error: {report.error}")
    return "\n".join(lines)


def _schema_verdict(report: DbStatus) -> str:
    if report.schema_version == report.build_version:
        return "current"
    if (report.schema_version or 0) < (report.build_version or 0):
        return "behind: run `agentctl db migrate`"
    return "AHEAD of this build: upgrade agent"


def print_status(config: Config, as_json: bool) -> int:
    from agent.output import write

    report = db_status(config)
    write(render(report, as_json))
    return EXIT_OK if report.ok else EXIT_FAILURE


def run_migrate(config: Config) -> str:
    """Bring the schema to this build's version; one line saying what was done."""
    if config.queue.backend != "postgres":
        raise AgentError(
            'the queue backend is "files": nothing to migrate ([queue] backend = "postgres")'
        )
    from agent.pg.connect import connect, host_id, load_target, translated
    from agent.pg.migrate import migrate

    settings = config.queue.postgres
    target = load_target(config)
    with connect(target, settings, "agentctl db migrate") as conn, translated(target, "migrate"):
        result = migrate(conn, host_id(settings), target.shown)
    if not result.applied:
        return f"queue database {target.shown}: schema version {result.after}, up to date"
    return (
        f"queue database {target.shown}: schema version {result.before} -> {result.after}"
        f" (applied {', '.join(result.applied)})"
    )
