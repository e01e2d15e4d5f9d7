"""A real, throw-away PostgreSQL for the tests and the benches.

PgCluster runs Debian's PostgreSQL 15 binaries (`initdb`, `pg_ctl`) in a temporary
directory, listening only on a unix socket inside it (listen_addresses = ''): nothing
leaves the machine and nothing outlives the run. PostgreSQL refuses to run as root, so
under root (the tests and CI) the server runs as the `postgres` system user the Debian
package creates (or `nobody`), which owns the directory; as anyone else it runs as that
user. Clients connect as the superuser `postgres` (trust, local socket).

Each test gets a database of its own (create_database), so tests are isolated without a
cluster per test. fsync is off, yet a killed server loses nothing (a commit still reaches
the OS before it returns); durable=True turns fsync on, for benches. restart_immediate()
is `pg_ctl restart -m immediate`: the server dies without a checkpoint and comes back
after crash recovery.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("AGENT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PORT = 5432  # only names the socket file (.s.PGSQL.5432) inside the cluster's own directory
SUPERUSER = "postgres"
SERVER_USERS = ("postgres", "nobody")  # who runs the server when we are root


class PgUnavailable(Exception):
    """No PostgreSQL can be run here; the text says why."""


class PgCluster:
    def __init__(self, root: Path, run_as: str | None, durable: bool = False):
        self.root = root
        self.durable = durable  # fsync on: what a real server pays per commit (the benches)
        self.run_as = run_as  # None: this process's own user
        self.data = root / "data"
        self.socket_dir = root / "socket"

    @classmethod
    def create(cls, prefix: str = "agent-pg-", durable: bool = False) -> "PgCluster":
        """initdb + start a new cluster; PgUnavailable when this machine cannot."""
        if not (PG_BIN / "initdb").exists():
            raise PgUnavailable(
                f"no PostgreSQL binaries in {PG_BIN} (apt-get install postgresql; "
                "or set AGENT_TEST_PG_BIN)"
            )
        run_as = _server_user()
        root = Path(tempfile.mkdtemp(prefix=prefix))
        cluster = cls(root, run_as, durable)
        try:
            cluster._init()
            cluster._pg_ctl("start", "-l", str(root / "server.log"))
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _init(self) -> None:
        self.socket_dir.mkdir()
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            PG_BIN / "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "port": str(PORT),
            # no fsync: a commit still reaches the OS before it returns (synchronous_commit
            # stays on), so a killed server (restart -m immediate) loses nothing; only a
            # power cut would
            "fsync": "off" if not self.durable else "on",
            "max_connections": "100",
            "shared_buffers": "'64MB'",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _run(self, *argv: str | Path, timeout: float = 120) -> str:
        try:
            done = subprocess.run(
                [str(a) for a in argv],
                user=self.run_as,
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PgUnavailable(f"{Path(argv[0]).name} could not run: {exc}") from None
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PgUnavailable(
                f"{Path(argv[0]).name} {argv[1]} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}\n{tail}"
            )
        return done.stdout

    def _pg_ctl(self, command: str, *extra: str) -> None:
        self._run(PG_BIN / "pg_ctl", command, "-D", str(self.data), "-w", "-t", "60", *extra)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={PORT} dbname={dbname} user={SUPERUSER}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit: CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, template: str = "template0") -> str:
        """A new, empty database (a copy of `template`); returns its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def restart_immediate(self) -> None:
        """Kill the server without a checkpoint (-m immediate) and start it again."""
        self._pg_ctl("restart", "-m", "immediate", "-l", str(self.root / "server.log"))

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def start(self) -> None:
        self._pg_ctl("start", "-l", str(self.root / "server.log"))

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        """Stop the server (fast) if it runs, then remove everything."""
        try:
            if self.running():
                self.stop("fast")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PgUnavailable(f"running as root and none of the users {SERVER_USERS} exists")
