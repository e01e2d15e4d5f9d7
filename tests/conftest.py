import pytest

from tests.helpers import AgentEnv, skip_or_fail


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
