"""The queue database's schema: versioned SQL files, applied once, in order, by one host.

migrations/NNNN_name.sql ship inside the package (package data). A database records what
it has in schema_migrations (version, name, checksum, applied_at, host). migrate() runs in
one transaction that first takes a transaction-level advisory lock, so hosts starting
together queue up behind it: the first applies what is missing, the others then find
nothing to do. DDL is transactional in PostgreSQL: a migration that fails leaves nothing.

A database whose version is ahead of this build (a newer agent migrated it) is refused,
never used: SchemaMismatch. So is one behind it when auto_migrate is off.
"""

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from agent.config import PostgresConfig
from agent.errors import SchemaMismatch
from agent.pg.connect import Target, connect, host_id, translated

LOCK_KEY = 0x6167_656E_7471  # "agentq": the one advisory lock key of migrations
MIGRATION_TIMEOUT_S = 300  # waiting for another host's migration included
NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    host_id    text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationResult:
    before: int
    after: int
    applied: tuple[str, ...]  # names of the migrations this call applied


def shipped() -> tuple[Migration, ...]:
    """The migrations of this build, by version; numbered 1, 2, ... without gaps."""
    found = []
    for entry in resources.files("agent.pg").joinpath("migrations").iterdir():
        match = NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"agent/pg/migrations: versions {versions} are not 1..n")
    return tuple(found)


def build_version() -> int:
    return len(shipped())


def current_version(conn: Any) -> int:
    """The database's schema version; 0 for one never migrated."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn: Any, host_id: str, shown: str, migrations: tuple[Migration, ...] = ()) -> Any:
    """Bring the schema to this build's version. `conn` is in autocommit mode."""
    migrations = migrations or shipped()
    with conn.transaction():
        conn.execute(f"SET LOCAL statement_timeout = '{MIGRATION_TIMEOUT_S}s'")
        conn.execute(f"SET LOCAL lock_timeout = '{MIGRATION_TIMEOUT_S}s'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(CREATE_TABLE)
        before = current_version(conn)
        refuse_ahead(before, len(migrations), shown)
        applied = []
        for migration in migrations[before:]:
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, host_id)"
                " VALUES (%s, %s, %s, %s)",
                (migration.version, migration.name, migration.checksum, host_id),
            )
            applied.append(f"{migration.version:04d}_{migration.name}")
    return MigrationResult(before, len(migrations), tuple(applied))


def refuse_ahead(version: int, build: int, shown: str) -> None:
    if version > build:
        raise SchemaMismatch(
            f"queue database {shown}: schema version {version} is newer than this agent's "
            f"({build}): a newer agent migrated it; upgrade agent on this host (refusing to use it)"
        )


def check(conn: Any, shown: str, build: int | None = None) -> int:
    """The schema version, when it is exactly this build's; SchemaMismatch otherwise."""
    build = build_version() if build is None else build
    version = current_version(conn)
    refuse_ahead(version, build, shown)
    if version < build:
        raise SchemaMismatch(
            f"queue database {shown}: schema version {version}, this agent needs {build}: "
            "run `agentctl db migrate` (or set [queue.postgres] auto_migrate = true)"
        )
    return version


def ensure_schema(target: Target, settings: PostgresConfig) -> int:
    """At start: migrate (auto_migrate) or only check; the version, or SchemaMismatch."""
    with connect(target, settings, "agent migrate") as conn, translated(target, "migrate"):
        if settings.auto_migrate:
            migrate(conn, host_id(settings), target.shown)
        return check(conn, target.shown)
