"""The Slack worker's memory and the session map shared in a real PostgreSQL (issue 12).

Two kinds of test: the stores of agent/pg/slackstore.py and agent/pg/sessions.py driven
in-process, two instances being two hosts on one database; and two real supervisors (one
Slack app, one profile, two Socket Mode connections to the fake Slack) sharing that
database through [queue] backend = "postgres".
"""

import contextlib
import threading
import time
from pathlib import Path

import pytest

from agent.config import Config, PostgresConfig, QueueConfig
from agent.errors import DatabaseError
from agent.pg.connect import make_target, open_pool
from agent.pg.migrate import ensure_schema
from agent.pg.sessions import PgSessionStore
from agent.pg.slackstore import PgSlack
from agent.slack_store import POST_BUSY, POST_MINE, POST_POSTED

SETTINGS = PostgresConfig(connect_timeout=2.0, statement_timeout=5.0, pool_size=4)


def host(dsn: str, name: str, state_dir: Path) -> tuple:
    """One host's store and cursors of profile `main`."""
    target = make_target(dsn, "test dsn")
    ensure_schema(target, SETTINGS)
    db = PgSlack(open_pool(target, SETTINGS, size=4), target, name)
    store, cursors = db.profile(state_dir, "main")
    store.prepare()
    return db, store, cursors


@pytest.fixture
def two_hosts(pg_dsn, tmp_path):
    a = host(pg_dsn, "host-a", tmp_path / "a")
    b = host(pg_dsn, "host-b", tmp_path / "b")
    yield a, b
    a[0].close()
    b[0].close()


def test_a_message_settled_on_one_host_is_a_duplicate_on_the_other(two_hosts):
    (_, store_a, cursors_a), (_, store_b, cursors_b) = two_hosts
    enqueued = []

    def enqueue(host):
        def run():
            store = store_a if host == "a" else store_b
            store.write_route("main.C1.5.0", "C1", "5.0", message_ts="5.0")
            enqueued.append(host)

        return run

    assert not cursors_b.seen("C1", "5.0")
    assert cursors_a.settle("C1", "5.0", "5.0", enqueue("a"), follower="U1")
    assert cursors_b.seen("C1", "5.0")
    assert not cursors_b.settle("C1", "5.0", "5.0", enqueue("b"), follower="U1")
    assert enqueued == ["a"]
    # what host A learnt, host B knows: the route, the thread and its follower, the cursor
    assert store_b.route("main.C1.5.0")["thread_ts"] == "5.0"
    assert cursors_b.threads("C1") == ["5.0"]
    assert cursors_b.follows("C1", "5.0", "U1", everyone=False)
    assert not cursors_b.follows("C1", "5.0", "U2", everyone=False)
    assert cursors_b.known_channels() == ["C1"]
    assert cursors_b.pin(["C1"]) == {"C1": "5.0"}


def test_two_hosts_settling_one_message_at_once_enqueue_it_once(two_hosts):
    (_, _, cursors_a), (_, _, cursors_b) = two_hosts
    enqueued, start = [], threading.Barrier(2)

    def settle(cursors, name):
        start.wait()
        cursors.settle("C1", "6.0", "6.0", lambda: enqueued.append(name) or time.sleep(0.3))

    threads = [
        threading.Thread(target=settle, args=(cursors_a, "a")),
        threading.Thread(target=settle, args=(cursors_b, "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(enqueued) == 1, enqueued


def test_an_enqueue_that_fails_leaves_no_key_and_no_route(two_hosts):
    (_, store_a, cursors_a), (_, _, cursors_b) = two_hosts

    def broken():
        store_a.write_route("main.C1.7.0", "C1", "7.0")
        raise OSError("disk full")

    with pytest.raises(OSError):
        cursors_a.settle("C1", "7.0", "7.0", broken)
    assert store_a.route("main.C1.7.0") is None
    assert not cursors_b.seen("C1", "7.0")  # so the inbox replay or the other host takes it
    assert cursors_b.settle("C1", "7.0", "7.0", lambda: None)


def test_the_cursor_only_moves_forward_and_a_pin_outlives_a_crashed_backfill(two_hosts):
    (_, _, cursors_a), (_, _, cursors_b) = two_hosts
    cursors_a.skip("C1", "10.5")
    cursors_b.skip("C1", "9.0")  # older: no move
    assert cursors_a.pin(["C1", "C2"]) == {"C1": "10.5"}  # C2 never seen: nothing to miss
    cursors_b.skip("C1", "11.0")  # a live event on B while A backfills
    # A dies mid-backfill (no unpin): B's next plan starts at A's pin, not past it
    assert cursors_b.pin(["C1"]) == {"C1": "10.5"}
    cursors_b.unpin("C1")
    assert cursors_a.pin(["C1"]) == {"C1": "11.0"}


def test_one_host_at_a_time_backfills_a_channel(two_hosts):
    (_, store_a, _), (_, store_b, _) = two_hosts
    with store_a.backfill_turn("C1") as mine_a:
        assert mine_a
        with store_b.backfill_turn("C1") as mine_b:
            assert not mine_b
        with store_b.backfill_turn("C2") as other:
            assert other  # another channel is free
    with store_b.backfill_turn("C1") as mine_b:
        assert mine_b  # free once A is done


def test_a_backfill_turn_of_a_host_that_dies_is_free_again(pg_dsn, tmp_path):
    db_a, store_a, _ = host(pg_dsn, "host-a", tmp_path / "a")
    _, store_b, _ = host(pg_dsn, "host-b", tmp_path / "b")
    turn = store_a.backfill_turn("C1")
    assert turn.__enter__()
    with store_b.backfill_turn("C1") as mine:
        assert not mine
    with db_a.pool.connection() as conn:  # host A dies: its connections with it
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'")
    with store_b.backfill_turn("C1") as mine:
        assert mine
    with contextlib.suppress(DatabaseError):
        turn.__exit__(None, None, None)
    db_a.close()


def test_a_reply_claimed_by_one_host_is_not_posted_by_the_other(two_hosts):
    (_, store_a, _), (_, store_b, _) = two_hosts
    assert store_a.claim_post("main.C1.5.0") == POST_MINE
    assert store_b.claim_post("main.C1.5.0") == POST_BUSY
    assert store_a.claim_post("main.C1.5.0") == POST_MINE  # its own claim, after a restart
    store_a.record_post("main.C1.5.0", "1800000001.000000")
    assert store_b.claim_post("main.C1.5.0") == POST_POSTED
    assert store_a.claim_post("main.C1.5.0") == POST_POSTED


def test_an_expired_claim_is_taken_over(two_hosts, monkeypatch):
    (db_a, store_a, _), (_, store_b, _) = two_hosts
    monkeypatch.setattr("agent.pg.slackstore.POST_LEASE", 0.0)
    assert store_a.claim_post("main.C1.8.0") == POST_MINE
    time.sleep(0.05)
    assert store_b.claim_post("main.C1.8.0") == POST_MINE  # A died before it posted
    store_a.record_post("main.C1.8.0", "1")  # too late: not A's claim any more
    with db_a.pool.connection() as conn:
        row = conn.execute("SELECT claimed_by, posted_at FROM slack_reply_posts").fetchone()
    assert row == ("host-b", None)


def test_routes_are_updated_and_dropped_for_every_host(two_hosts):
    (_, store_a, _), (_, store_b, _) = two_hosts
    store_a.write_route("main.C1.9.0", "C1", "8.0", message_ts="9.0")
    store_b.update_route("main.C1.9.0", parts_posted=2, progress_ts=None)
    route = store_a.route("main.C1.9.0")
    assert route["channel"] == "C1" and route["thread_ts"] == "8.0"
    assert route["message_ts"] == "9.0" and route["parts_posted"] == 2
    assert route["progress_ts"] is None and route["created"] > 0
    store_b.drop_route("main.C1.9.0")
    assert store_a.route("main.C1.9.0") is None


# ---- sessions


def pg_config(dsn: str, host_id: str, state_dir: Path) -> Config:
    postgres = PostgresConfig(dsn=dsn, host_id=host_id, connect_timeout=2.0)
    return Config(None, state_dir, queue=QueueConfig(backend="postgres", postgres=postgres))


def test_a_session_written_on_one_host_is_read_on_the_other(pg_dsn, tmp_path):
    a = PgSessionStore(pg_config(pg_dsn, "host-a", tmp_path / "a"))
    b = PgSessionStore(pg_config(pg_dsn, "host-b", tmp_path / "b"))
    try:
        assert b.get("default", "C1.5.0") is None
        a.put("default", "C1.5.0", "session-1")
        found = b.get("default", "C1.5.0")
        assert (found.agent, found.conversation, found.session_id) == (
            "default",
            "C1.5.0",
            "session-1",
        )
        assert abs(found.last_used - time.time()) < 5
        b.put("default", "C1.5.0", "session-2")
        a.put("other", "C1.5.0", "session-3")
        assert [s.session_id for s in a.all()] == ["session-2", "session-3"]
        gone = a.forget("C1.5.0", "default")
        assert [s.session_id for s in gone] == ["session-2"]
        assert [s.session_id for s in b.forget("C1.5.0")] == ["session-3"]
        assert b.all() == []
    finally:
        a.close()
        b.close()
