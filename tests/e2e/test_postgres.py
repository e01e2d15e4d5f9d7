"""The packaged service on the shared PostgreSQL queue ([queue] backend = "postgres"), as an
operator runs it: Debian's postgresql, python3-psycopg and python3-psycopg-pool in the
booted guest, agent.service under its own sandbox connecting over the local socket with
peer authentication. A message in and its reply out, status and `agentctl db`, a database
restart under the running service."""

import json
from collections.abc import Iterator

import pytest

from tests.e2e.guest import Guest
from tests.e2e.test_systemd import CONFIG, restart_clean
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

QUEUE = """
[queue]
backend = "postgres"
[queue.postgres]
dsn = "host=/run/postgresql dbname=agent"
host_id = "guest-1"
statement_timeout = 5
"""
SHARED = (
    QUEUE
    + """
[agents.cat]
command = ["cat"]
"""
)


def status(guest: Guest) -> tuple[int, dict]:
    done = guest.run(["agentctl", "status", "--json"], check=False)
    return done.returncode, json.loads(done.stdout)


def psql(guest: Guest, sql: str, database: str = "agent") -> str:
    """One query as the postgres superuser in the guest; its rows, unaligned."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-At", "-d", database, "-c", sql]
    return guest.run(argv).stdout.strip()


def ensure_database(guest: Guest) -> None:
    """Debian's postgresql running, with a role and a database for the service's user
    (peer authentication over /run/postgresql); idempotent."""
    guest.run(["systemctl", "start", "postgresql"], timeout=120)
    wait_for(
        lambda: guest.run(["pg_isready", "-q"], check=False).returncode == 0,
        timeout=60,
        what="postgresql accepting connections",
    )
    for sql in ("CREATE ROLE agent LOGIN", "CREATE DATABASE agent OWNER agent"):
        done = guest.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-c", sql], check=False)
        assert done.returncode == 0 or "already exists" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def shared(guest: Guest) -> Iterator[Guest]:
    original = guest.path(CONFIG).read_text()
    ensure_database(guest)
    guest.write(CONFIG, SHARED)  # the packaged file already has a [queue] table
    restart_clean(guest)
    try:
        yield guest
    finally:
        guest.write(CONFIG, original)
        restart_clean(guest)


def test_the_packaged_service_answers_through_the_shared_queue(shared):
    done = shared.run(["agentctl", "send", "--wait", "--agent", "cat", "through postgres"])
    assert done.stdout.strip() == "through postgres"
    state, origin = psql(
        shared,
        "SELECT state || ' ' || origin_host FROM messages"
        " WHERE payload->>'message' = 'through postgres'",
    ).split()
    assert (state, origin) == ("done", "guest-1")
    # the queue worker reads the cluster's stats every few seconds: wait for one after
    # this host's first heartbeat
    cluster = wait_for(
        lambda: (c := status(shared)[1].get("cluster") or {}).get("hosts") and c,
        timeout=30,
        what="this host in the cluster view",
    )
    assert (cluster["db"], cluster["host_id"]) == ("ok", "guest-1")
    assert [h["host_id"] for h in cluster["hosts"]] == ["guest-1"]
    human = shared.run(["agentctl", "status"], check=False).stdout
    assert "queue db:   postgres ok" in human
    # peer authentication: as the service's user, as docs/scaling.md says
    db = shared.run(["runuser", "-u", "agent", "--", "agentctl", "db", "status"], check=False)
    assert db.returncode == 0 and "(current)" in db.stdout, db.stdout + db.stderr
    assert "password" not in db.stdout


def test_a_database_restart_under_the_service_loses_nothing(shared):
    pid = shared.unit("MainPID")["MainPID"]
    shared.run(["systemctl", "stop", "postgresql"], timeout=120)
    try:
        wait_for(
            lambda: (status(shared)[1]["cluster"] or {}).get("db", "").startswith("down"),
            timeout=30,
            what="the queue worker reporting the database down",
        )
        assert status(shared)[0] == 2  # degraded, not dead
        shared.run(["agentctl", "send", "--agent", "cat", "sent during the outage"])
    finally:
        shared.run(["systemctl", "start", "postgresql"], timeout=120)
    wait_for(lambda: status(shared)[1]["cluster"]["db"] == "ok", timeout=60, what="db ok")
    wait_for(
        lambda: shared.sh(
            "grep -l 'sent during the outage' /var/lib/agent/queue/outgoing/* || true"
        ).strip(),
        timeout=60,
        what="the message sent during the outage answered",
    )
    assert shared.unit("MainPID")["MainPID"] == pid  # never restarted by systemd
