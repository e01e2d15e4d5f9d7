"""Where the queue database is, and connections to it that never show a secret.

The connection string comes from [queue.postgres] dsn_file (e.g. a systemd credential,
LoadCredential=: it may hold a password) or dsn (password-less, e.g. a local socket).
Rules kept here, in one place:
  - the connection string's content is never logged, printed, put in an exception or in
    a repr; what is shown is `Target.shown`, its host, port, database and user only;
  - dsn_file is read at use (not at config load: under systemd only the service can read
    its credentials), must be a regular file of at most 64 KiB, not group/world-readable;
  - every psycopg error leaves this package as a DatabaseError naming `Target.shown`, with
    the server's first line of text (scrubbed of the password, in case);
  - every connection carries a statement_timeout, lock_timeout and
    idle_in_transaction_session_timeout (libpq `options`), and a connect_timeout.
"""

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, PostgresConfig
from agent.errors import ConfigError, DatabaseError
from agent.trust import credential_path

MAX_DSN_FILE_BYTES = 64 * 1024
SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user")
MISSING = (
    "the postgres queue backend needs psycopg 3 and psycopg-pool: pip install 'agent[postgres]'"
    ", or apt-get install python3-psycopg python3-psycopg-pool"
)


@dataclass(frozen=True)
class Target:
    """A database to connect to. `shown` is safe to print; the rest is not (no repr)."""

    shown: str
    dsn: str = field(repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text


def psycopg_modules() -> tuple[Any, Any]:
    """(psycopg, psycopg_pool), or a DatabaseError saying how to install them."""
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise DatabaseError(MISSING) from None
    return psycopg, psycopg_pool


def host_id(settings: PostgresConfig) -> str:
    return settings.host_id or os.uname().nodename


def load_target(config: Config) -> Target:
    """The configured database; ConfigError (exit 78) naming the file and key when the
    dsn_file cannot be used or the string is not a connection string."""
    settings: PostgresConfig = config.queue.postgres
    where = f"{config.display_path}: [queue.postgres]"
    if settings.dsn_file is not None:
        path = credential_path(settings.dsn_file)
        dsn = read_dsn_file(path, f"{where} dsn_file: {path}")
        return make_target(dsn, f"{where} dsn_file: {path}")
    if settings.dsn is not None:
        return make_target(settings.dsn, f"{where} dsn")
    raise ConfigError(f"{where}: neither dsn_file nor dsn is set")


def read_dsn_file(path: Path, label: str) -> str:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{label}: not a regular file; expected a file holding a DSN")
        if info.st_mode & 0o044:
            mode = stat.S_IMODE(info.st_mode)
            raise ConfigError(
                f"{label}: mode {mode:04o} lets others read a secret; expected 0600 or 0400 "
                f"(chmod go-rwx {path})"
            )
        data = handle.read(MAX_DSN_FILE_BYTES + 1)
    if len(data) > MAX_DSN_FILE_BYTES:
        raise ConfigError(f"{label}: larger than {MAX_DSN_FILE_BYTES} bytes; expected a DSN")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text; expected a libpq connection string") from None
    if not text:
        raise ConfigError(f"{label}: empty; expected a libpq connection string")
    return text


def make_target(dsn: str, label: str) -> Target:
    psycopg, _ = psycopg_modules()
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:  # its text quotes the string: never shown
        raise ConfigError(
            f"{label}: not a valid libpq connection string (its content is not shown)"
        ) from None
    shown = " ".join(f"{key}={params[key]}" for key in SHOWN_KEYS if params.get(key))
    secrets = tuple(str(params[key]) for key in ("password",) if params.get(key))
    return Target(shown or "(libpq defaults)", dsn, (*secrets, dsn))


def connect_kwargs(settings: PostgresConfig, application: str) -> dict[str, Any]:
    """Per-connection settings: autocommit (every statement its own transaction unless a
    block opens one) and the timeouts every statement runs under."""
    statement_ms = int(settings.statement_timeout * 1000)
    options = (
        f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}"
        f" -c idle_in_transaction_session_timeout={statement_ms * 3}"
    )
    return {
        "autocommit": True,
        "connect_timeout": max(1, round(settings.connect_timeout)),
        "options": options,
        "application_name": application[:63],
    }


def database_error(target: Target, exc: BaseException, doing: str) -> DatabaseError:
    lines = str(exc).strip().splitlines()
    detail = target.scrub(lines[0].strip()) if lines else type(exc).__name__
    return DatabaseError(f"queue database {target.shown}: {doing}: {detail}")


@contextmanager
def translated(target: Target, doing: str) -> Iterator[None]:
    """psycopg's errors (and the pool's) as DatabaseError, with no chained cause that
    could carry the connection string into a traceback."""
    psycopg, _ = psycopg_modules()
    try:
        yield
    except psycopg.Error as exc:
        raise database_error(target, exc, doing) from None


def connect(target: Target, settings: PostgresConfig, application: str = "agent") -> Any:
    """One connection outside any pool (migrations, `agentctl db`)."""
    psycopg, _ = psycopg_modules()
    with translated(target, "connect"):
        return psycopg.connect(target.dsn, **connect_kwargs(settings, application))


def open_pool(
    target: Target, settings: PostgresConfig, application: str = "agent", size: int | None = None
) -> Any:
    """A psycopg_pool.ConnectionPool: connections checked before use (so the first call after
    a server restart does not get a dead one), a wait for a free one bounded by
    connect_timeout."""
    _, psycopg_pool = psycopg_modules()
    pool_cls = psycopg_pool.ConnectionPool
    if hasattr(pool_cls, "check_connection"):  # psycopg_pool >= 3.2
        extra = {"check": pool_cls.check_connection}
    else:  # Debian 12's 3.1: no check on checkout, so we do it
        pool_cls, extra = _checked_pool_class(pool_cls), {}
    pool = pool_cls(
        target.dsn,
        min_size=1,
        max_size=size or settings.pool_size,
        kwargs=connect_kwargs(settings, application),
        timeout=settings.connect_timeout,
        reconnect_timeout=max(60.0, settings.connect_timeout * 4),
        name="agent-queue",
        open=False,
        **extra,
    )
    with translated(target, "open the connection pool"):
        pool.open(wait=False)
    return pool


def _checked_pool_class(base: type) -> type:
    """A ConnectionPool that tries each connection it hands out (what psycopg_pool 3.2's
    check_connection does): one the server dropped (a restart) is discarded and replaced,
    instead of failing the caller's first statement."""
    psycopg, _ = psycopg_modules()

    class CheckedPool(base):  # type: ignore[misc, valid-type]
        def getconn(self, timeout: float | None = None) -> Any:
            for _ in range(self.max_size):
                conn = super().getconn(timeout)
                try:
                    conn.execute("")  # an empty query: one round trip, autocommit
                    return conn
                except psycopg.Error:
                    self.putconn(conn)  # a broken connection is closed, not kept
            return super().getconn(timeout)

    return CheckedPool
