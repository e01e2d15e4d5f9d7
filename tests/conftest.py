from dataclasses import dataclass

import pytest

from tests.helpers import AgentEnv, pg_sections, skip_or_fail


@pytest.fixture
def agent_env(tmp_path):
    """An isolated agent; whatever supervisor a test leaves running is stopped afterwards."""
    env = AgentEnv(tmp_path)
    env.write_config()
    yield env
    env.agentctl("stop")
    env.kill_leftovers()


@pytest.fixture(scope="session")
def psycopg_installed():
    """The postgres backend's driver; skips (fails under AGENT_TESTS_NO_SKIP=1) without it."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg / psycopg-pool are not installed (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def pg_cluster(psycopg_installed):
    """One throw-away PostgreSQL 15 for the session (tests/pg.py), stopped and removed at
    its end. Skips (fails under AGENT_TESTS_NO_SKIP=1) when it cannot be had."""
    from tests.pg import PgCluster, PgUnavailable

    try:
        cluster = PgCluster.create()
    except PgUnavailable as exc:
        skip_or_fail(f"no PostgreSQL for the tests: {exc}")
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg(pg_cluster):
    """The session's cluster, made sure to be up (a test may have stopped it)."""
    if not pg_cluster.running():
        pg_cluster.start()
    return pg_cluster


@pytest.fixture
def pg_dsn(pg):
    """A libpq connection string to a fresh, empty database of this test's own."""
    return pg.dsn(pg.create_database())


@dataclass
class QueueBackend:
    name: str  # "files" | "postgres"
    dsn: str | None = None  # the postgres run's own database

    @property
    def postgres(self) -> bool:
        return self.name == "postgres"

    def rows(self, where: str = "true") -> list[tuple]:
        """(message_id, state, attempts, reply_host, origin_host) of the shared queue."""
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(
                "SELECT message_id, state, attempts, reply_host, origin_host"
                f" FROM messages WHERE {where} ORDER BY id"
            ).fetchall()


@pytest.fixture(params=["files", "postgres"])
def queue_backend(request, agent_env):
    """Runs a test on both queue backends: for "postgres", every agent_env.write_config
    adds [queue] backend = "postgres" on a fresh database of the test's own (host "solo")."""
    if request.param == "files":
        return QueueBackend("files")
    dsn = request.getfixturevalue("pg_dsn")
    agent_env.defaults = pg_sections(dsn, "solo")
    agent_env.write_config()
    return QueueBackend("postgres", dsn)
