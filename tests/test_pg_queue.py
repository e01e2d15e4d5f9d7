"""The shared PostgreSQL queue (agent/pg) against a real PostgreSQL 15 (tests/pg.py):
every claim, lease and reply rule of docs/scaling.md, with real concurrency and a real
server crash. No mocks."""

import json
import random
import threading
import time
from collections import defaultdict

import pytest

from agent.config import PostgresConfig
from agent.errors import DatabaseError, SchemaMismatch
from agent.pg import migrate as migrations
from agent.pg.connect import connect, make_target, open_pool
from agent.pg.migrate import ensure_schema
from agent.pg.queue import NewMessage, PgQueue, conversation_key
from tests.helpers import wait_for

# agent.pg imports psycopg only when used: without it, these tests skip (CI: fail)
pytestmark = pytest.mark.usefixtures("psycopg_installed")

SECRET = "Secr3t-Pa55word"  # given to the server (trust auth ignores it); never shown
SETTINGS = PostgresConfig(connect_timeout=2.0, statement_timeout=5.0, pool_size=4)
LEASE = 30.0


def open_queue(dsn: str, size: int = 4) -> PgQueue:
    target = make_target(f"{dsn} password={SECRET}", "test dsn")
    ensure_schema(target, SETTINGS)
    return PgQueue(open_pool(target, SETTINGS, size=size), target)


@pytest.fixture
def queue(pg_dsn):
    opened = open_queue(pg_dsn)
    yield opened
    opened.close()


def new(message_id: str, conversation: str = "c1", channel: str = "local") -> NewMessage:
    key = conversation_key(channel, None, conversation)
    return NewMessage(channel, message_id, key, {"messageId": message_id, "message": "hi"})


def ids(claimed) -> list[str]:
    return [m.message_id for m in claimed]


def backoff(queue: PgQueue, message_id: int) -> float:
    """Seconds between the row's last change and when it may run again."""
    with queue.pool.connection() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM run_after - updated_at)::float8 FROM messages WHERE id = %s",
            (message_id,),
        ).fetchone()
    return row[0]


# ---- enqueue


def test_enqueue_is_idempotent_on_channel_and_message_id(queue):
    first = queue.enqueue(new("m1"))
    again = queue.enqueue(NewMessage("local", "m1", "other", {"different": True}))
    assert first.created and not again.created and again.id == first.id
    assert queue.get(first.id).payload == {"messageId": "m1", "message": "hi"}
    other_channel = queue.enqueue(new("m1", channel="slack"))
    assert other_channel.created and other_channel.id != first.id
    assert queue.stats().depth == 2


def test_concurrent_duplicates_make_one_row(queue):
    results, barrier = [], threading.Barrier(8)

    def producer() -> None:
        barrier.wait()
        results.append(queue.enqueue(new("same")))

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert queue.stats().depth == 1


# ---- claim


def test_only_the_head_of_a_conversation_is_claimed_and_in_order(queue):
    for name in ("a1", "a2", "a3"):
        queue.enqueue(new(name, "a"))
    queue.enqueue(new("b1", "b"))
    first = queue.claim("host-1", LEASE, limit=10)
    assert ids(first) == ["a1", "b1"]
    assert queue.claim("host-2", LEASE, limit=10) == []  # a2 waits behind running a1
    assert queue.complete(first[0].id, "host-1", {"message": "r1"}).stored
    assert ids(queue.claim("host-2", LEASE, limit=10)) == ["a2"]


def test_a_message_backing_off_holds_its_conversation_and_a_failed_one_does_not(queue):
    for name in ("a1", "a2"):
        queue.enqueue(new(name, "a"))
    (a1,) = queue.claim("h", LEASE)
    outcome = queue.retry(a1.id, "h", "exit 1", max_attempts=3, first=60, cap=60)
    assert (outcome.held, outcome.state, outcome.attempts) == (True, "queued", 1)
    assert queue.claim("h", LEASE, limit=10) == []  # a1 backs off; a2 must not pass it
    with queue.pool.connection() as conn:  # due now, as if the minute had passed
        conn.execute("UPDATE messages SET run_after = now() WHERE id = %s", (a1.id,))
    (again,) = queue.claim("h", LEASE)
    assert again.id == a1.id and again.attempts == 2
    failed = queue.fail(a1.id, "h", "unknown agent 'x'")
    assert (failed.state, queue.get(a1.id).error) == ("failed", "unknown agent 'x'")
    assert ids(queue.claim("h", LEASE)) == ["a2"]  # a poison message does not block the rest


def test_retries_back_off_doubling_up_to_the_cap_then_fail(queue):
    row = queue.enqueue(new("m"))
    seen = []
    for _ in range(3):
        (claimed,) = wait_for(lambda: queue.claim("h", LEASE), what="the retried message due")
        outcome = queue.retry(claimed.id, "h", "boom", max_attempts=3, first=0.05, cap=0.08)
        delay = backoff(queue, row.id) if outcome.state == "queued" else None
        seen.append((outcome.state, outcome.attempts, delay and round(delay, 6)))
    # 0.05 * 2^0, then 0.05 * 2^1 = 0.1 cut to the cap 0.08, then max_attempts: failed
    assert seen == [("queued", 1, 0.05), ("queued", 2, 0.08), ("failed", 3, None)]
    message = queue.get(row.id)
    assert (message.state, message.error, message.lease_owner) == ("failed", "boom", None)


def test_only_the_lease_holder_may_retry_fail_or_release(queue):
    row = queue.enqueue(new("m"))
    queue.claim("h1", LEASE)
    assert not queue.retry(row.id, "h2", "x", 3, 1, 1).held
    assert not queue.fail(row.id, "h2", "x").held
    assert queue.release("h2", [row.id]) == set()
    assert queue.get(row.id).lease_owner == "h1"
    assert queue.release("h1", [row.id]) == {row.id}  # a graceful stop: not an attempt
    message = queue.get(row.id)
    assert (message.state, message.attempts) == ("queued", 0)


# ---- leases


def test_a_heartbeat_renews_the_leases_still_held(queue):
    row = queue.enqueue(new("m"))
    queue.claim("h1", 1.0)
    assert queue.heartbeat("h1", [row.id, 999], lease_seconds=120) == {row.id}
    with queue.pool.connection() as conn:
        left = conn.execute(
            "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM messages"
        ).fetchone()[0]
    assert left > 100
    assert queue.reclaim_expired(max_attempts=3) == []
    (host,) = queue.stats().hosts
    assert (host.host_id, host.in_flight, host.leases) == ("h1", 2, 1)


def test_an_expired_lease_is_reclaimed_and_the_late_completion_loses(queue):
    row = queue.enqueue(new("m"))
    queue.claim("host-a", 0.2)
    (taken,) = wait_for(lambda: queue.reclaim_expired(max_attempts=3), what="lease expiry")
    assert (taken.previous_owner, taken.state) == ("host-a", "queued")
    (again,) = queue.claim("host-b", LEASE)
    assert again.id == row.id and again.attempts == 2
    assert queue.renew("host-a", [row.id], LEASE) == set()  # host-a learns it lost
    won = queue.complete(row.id, "host-b", {"message": "from b"})
    late = queue.complete(row.id, "host-a", {"message": "from a"})
    assert won.stored and not late.stored
    assert (late.state, late.reply_host) == ("done", "host-b")
    message = queue.get(row.id)
    assert (message.reply, message.reply_host) == ({"message": "from b"}, "host-b")
    with queue.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_a_late_completion_wins_while_nobody_has_claimed_it_again(queue):
    row = queue.enqueue(new("m"))
    queue.claim("host-a", 0.2)
    wait_for(lambda: queue.reclaim_expired(max_attempts=3), what="lease expiry")
    assert queue.complete(row.id, "host-a", {"message": "late but first"}).stored
    assert queue.claim("host-b", LEASE) == []  # answered: never run again
    assert not queue.complete(row.id, "host-b", {"message": "second"}).stored
    assert queue.get(row.id).reply == {"message": "late but first"}


def test_a_message_whose_runs_keep_losing_their_host_fails_after_max_attempts(queue):
    row = queue.enqueue(new("poison"))
    states = []
    for _ in range(2):
        queue.claim("doomed", 0.1)
        (taken,) = wait_for(lambda: queue.reclaim_expired(max_attempts=2), what="lease expiry")
        states.append(taken.state)
    assert states == ["queued", "failed"]
    assert queue.get(row.id).error == "lease of doomed expired (attempt 2)"


# ---- concurrency


def test_many_claimers_never_run_two_messages_of_a_conversation_and_keep_order(pg_dsn):
    """3 hosts x 2 threads claim 30 conversations x 20 messages; some runs fail and retry.
    Checked by the claimers themselves: a conversation is never held twice at once; and
    each conversation's messages ran and finished in order."""
    conversations, per_conversation, total = 30, 20, 600
    producer = open_queue(pg_dsn)
    for seq in range(per_conversation):  # interleaved, as a real mix of threads arrives
        for conv in range(conversations):
            producer.enqueue(new(f"{conv}.{seq}", f"conv-{conv}"))
    hosts = {f"host-{n}": open_queue(pg_dsn, size=2) for n in range(3)}
    lock = threading.Lock()
    running: dict[str, str] = {}
    claimed_order: dict[str, list[int]] = defaultdict(list)
    violations: list[str] = []
    done = [0]
    deadline = time.monotonic() + 120

    def claimer(host: str, queue: PgQueue, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                if done[0] >= total:
                    return
            batch = queue.claim(host, LEASE, limit=3)
            if not batch:
                time.sleep(0.002)  # nothing claimable right now: poll again
            for message in batch:
                conv, seq = message.message_id.split(".")
                with lock:
                    if conv in running:
                        violations.append(f"{message.message_id} while {running[conv]} runs")
                    running[conv] = message.message_id
                    claimed_order[conv].append(int(seq))
                if rng.random() < 0.05:
                    with lock:
                        del running[conv]
                    queue.retry(message.id, host, "flaky", 100, 0.001, 0.01)
                    continue
                with lock:
                    del running[conv]
                if queue.complete(message.id, host, {"message": message.message_id}).stored:
                    with lock:
                        done[0] += 1

    threads = [
        threading.Thread(target=claimer, args=(host, queue, n * 10 + k))
        for n, (host, queue) in enumerate(hosts.items())
        for k in range(2)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert violations == []
        assert done[0] == total, f"only {done[0]} of {total} done before the deadline"
        for conv, order in claimed_order.items():
            deduped = [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s]
            assert deduped == list(range(per_conversation)), f"{conv}: {order}"
        with producer.pool.connection() as conn:
            out_of_order = conn.execute(
                "SELECT count(*) FROM (SELECT id, row_number() OVER (PARTITION BY conversation"
                " ORDER BY id) AS by_id, row_number() OVER (PARTITION BY conversation"
                " ORDER BY finished_at, id) AS by_finish FROM messages) t"
                " WHERE by_id <> by_finish"
            ).fetchone()[0]
            states = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY 1"))
        assert out_of_order == 0 and states == {"done": total}
        assert producer.stats().depth == 0
    finally:
        for queue in (producer, *hosts.values()):
            queue.close()


# ---- migrations


def test_hosts_migrating_together_migrate_once(pg_dsn):
    target = make_target(pg_dsn, "test dsn")
    barrier, results, errors = threading.Barrier(4), [], []

    def host(n: int) -> None:
        try:
            with connect(target, SETTINGS) as conn:
                barrier.wait()
                results.append(migrations.migrate(conn, f"host-{n}", target.shown))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    build = migrations.build_version()
    assert errors == []
    assert sorted(len(r.applied) for r in results) == [0, 0, 0, build]
    assert {r.after for r in results} == {build}
    with connect(target, SETTINGS) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == list(range(1, build + 1))


def test_a_schema_ahead_of_this_build_is_refused(pg_dsn):
    target = make_target(pg_dsn, "test dsn")
    ensure_schema(target, SETTINGS)
    with connect(target, SETTINGS) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum, host_id)"
            " VALUES (%s, 'from_the_future', '-', 'newer-host')",
            (migrations.build_version() + 1,),
        )
    for auto_migrate in (True, False):
        with pytest.raises(SchemaMismatch) as caught:
            ensure_schema(target, PostgresConfig(auto_migrate=auto_migrate))
        assert "is newer than this agent's" in str(caught.value)
        assert "upgrade agent on this host" in str(caught.value)
        assert caught.value.exit_code == 78


def test_without_auto_migrate_a_schema_behind_is_refused(pg_dsn):
    target = make_target(pg_dsn, "test dsn")
    with pytest.raises(SchemaMismatch, match=r"schema version 0, .*run `agentctl db migrate`"):
        ensure_schema(target, PostgresConfig(auto_migrate=False))


def test_a_failing_migration_leaves_nothing_behind(pg_dsn):
    target = make_target(pg_dsn, "test dsn")
    good = migrations.Migration(1, "good", "CREATE TABLE t_good (x int)")
    bad = migrations.Migration(2, "bad", "CREATE TABLE t_bad (x nosuchtype)")
    with connect(target, SETTINGS) as conn:
        with pytest.raises(Exception, match="nosuchtype"):
            migrations.migrate(conn, "h", target.shown, (good, bad))
        assert migrations.current_version(conn) == 0
        assert conn.execute("SELECT to_regclass('t_good')").fetchone()[0] is None


# ---- outages


def test_a_server_crash_is_a_clear_error_and_the_queue_works_again_after(pg, pg_dsn):
    queue = open_queue(pg_dsn)
    try:
        queue.enqueue(new("before"))
        pg.restart_immediate()  # a crash between two calls: the pool replaces dead connections
        assert ids(wait_for(lambda: queue.claim("h", LEASE), what="claim after restart")) == [
            "before"
        ]
        pg.stop("immediate")
        started = time.monotonic()
        with pytest.raises(DatabaseError) as caught:
            queue.enqueue(new("during"))
        text = str(caught.value)
        assert time.monotonic() - started < 15
        assert text.startswith(f"queue database {queue.target.shown}: enqueue: ")
        assert SECRET not in text and "password" not in text
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        pg.start()
        wait_for(lambda: _enqueued(queue, "after"), what="the queue back after the restart")
        assert queue.stats().depth == 1  # "before" is running; "after" waits
    finally:
        if not pg.running():
            pg.start()
        queue.close()


def test_a_crash_mid_run_costs_only_clear_errors_and_the_run_goes_on(pg, pg_dsn):
    """A producer enqueueing in a loop while the server is killed and restarted: every
    failure is a DatabaseError without the secret, and enqueues succeed again after."""
    queue = open_queue(pg_dsn)
    errors: list[DatabaseError] = []
    made: list[int] = []
    stop = threading.Event()

    def producer() -> None:
        n = 0
        while not stop.is_set():
            try:
                made.append(queue.enqueue(new(f"m{n}")).id)
                n += 1
            except DatabaseError as exc:
                errors.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        wait_for(lambda: len(made) >= 20, what="the producer running")
        pg.restart_immediate()
        after = len(made)
        wait_for(lambda: len(made) >= after + 20, what="enqueues after the restart")
    finally:
        stop.set()
        thread.join()
        queue.close()
    for error in errors:
        assert str(error).startswith("queue database host=") and SECRET not in str(error)
    with connect(make_target(pg_dsn, "t"), SETTINGS) as conn:
        stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert stored == len(made)  # every acknowledged enqueue survived the crash


def test_a_statement_stuck_behind_a_lock_is_cut_off_by_the_timeout(pg_dsn):
    target = make_target(pg_dsn, "t")
    ensure_schema(target, SETTINGS)
    impatient = PostgresConfig(statement_timeout=0.3)
    queue = PgQueue(open_pool(target, impatient), target)
    row = queue.enqueue(new("m"))
    queue.claim("h", LEASE)
    try:
        with connect(target, SETTINGS) as holder, holder.transaction():
            holder.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (row.id,))
            started = time.monotonic()
            cut_off = r"complete: canceling statement due to (statement|lock) timeout"
            with pytest.raises(DatabaseError, match=cut_off):
                queue.complete(row.id, "h", {"message": "r"})
            assert time.monotonic() - started < 5
    finally:
        queue.close()


def _enqueued(queue: PgQueue, message_id: str) -> bool:
    try:
        return queue.enqueue(new(message_id)).created
    except DatabaseError:
        return False


# ---- agentctl db


def test_agentctl_db_status_and_migrate_against_a_real_database(agent_env, pg, pg_dsn):
    dsn_file = agent_env.root / "queue-dsn"
    dsn_file.write_text(f"{pg_dsn} password={SECRET}\n")
    dsn_file.chmod(0o600)
    agent_env.write_config(
        queue={"backend": "postgres"}, **{"queue.postgres": {"dsn_file": str(dsn_file)}}
    )
    before = agent_env.agentctl("db", "status", "--json")
    report = json.loads(before.stdout)
    assert before.returncode == 1, before.stderr
    assert report["reachable"] is True and report["latency_ms"] >= 0
    build = migrations.build_version()
    assert (report["schema_version"], report["build_version"]) == (0, build)
    assert report["server"].startswith(f"host={pg.socket_dir} port=5432 dbname=")

    migrated = agent_env.agentctl("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema version 0 -> {build} (applied 0001_queue, " in migrated.stdout
    again = agent_env.agentctl("db", "migrate")
    assert f"schema version {build}, up to date" in again.stdout

    after = agent_env.agentctl("db", "status")
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"schema: version {build}, this build {build} (current)" in after.stdout
    assert "queue: depth 0, oldest -, running 0, failed 0" in after.stdout
    for done in (before, migrated, again, after):
        assert SECRET not in done.stdout + done.stderr


def test_agentctl_db_status_says_why_without_the_secret(agent_env, pg):
    dsn_file = agent_env.root / "queue-dsn"
    dsn_file.write_text(f"host={agent_env.root}/nowhere dbname=x password={SECRET}\n")
    dsn_file.chmod(0o600)
    agent_env.write_config(
        queue={"backend": "postgres"}, **{"queue.postgres": {"dsn_file": str(dsn_file)}}
    )
    down = agent_env.agentctl("db", "status", "--json")
    report = json.loads(down.stdout)
    assert down.returncode == 1 and report["reachable"] is False
    assert report["error"].startswith(f"queue database host={agent_env.root}/nowhere dbname=x")
    dsn_file.chmod(0o644)
    loose = agent_env.agentctl("db", "status")
    assert loose.returncode == 78
    assert "mode 0644 lets others read a secret; expected 0600 or 0400" in loose.stderr
    for done in (down, loose):
        assert SECRET not in done.stdout + done.stderr


def test_agentctl_db_status_with_the_files_backend(agent_env):
    done = agent_env.agentctl("db", "status")
    assert done.returncode == 0 and done.stdout.startswith("queue backend: files")
    report = json.loads(agent_env.agentctl("--json", "db", "status").stdout)
    assert (report["backend"], report["ok"], report["server"]) == ("files", True, None)


@pytest.mark.parametrize("pool_check", ["psycopg_pool's", "ours (psycopg_pool 3.1)"])
def test_the_first_call_after_a_server_restart_gets_a_live_connection(
    pg, pg_dsn, monkeypatch, pool_check
):
    """Debian 12's psycopg_pool 3.1 has no check on checkout: open_pool then uses its own
    (agent.pg.connect._checked_pool_class), so no caller meets a connection the restart
    killed."""
    import psycopg_pool

    if pool_check.startswith("ours"):
        monkeypatch.delattr(psycopg_pool.ConnectionPool, "check_connection", raising=False)
    queue = open_queue(pg_dsn, size=2)
    try:
        queue.enqueue(new("before"))
        queue.enqueue(new("other", conversation="c2"))  # both pooled connections used
        pg.restart_immediate()
        assert sorted(ids(queue.claim("h", LEASE, limit=2))) == ["before", "other"]
    finally:
        queue.close()
