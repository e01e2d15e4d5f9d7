"""The Slack worker's memory and the session map shared in a real PostgreSQL (issue 12).

Two kinds of test: the stores of agent/pg/slackstore.py and agent/pg/sessions.py driven
in-process, two instances being two hosts on one database; and two real supervisors (one
Slack app, one profile, two Socket Mode connections to the fake Slack) sharing that
database through [queue] backend = "postgres".
"""

import contextlib
import json
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
from tests.fake_slack import FakeSlack
from tests.helpers import AgentEnv, wait_for
from tests.test_slack import (
    APP_TOKEN,
    BOT_TOKEN,
    CHANNEL,
    SILENT_AGENT,
    enqueued_events,
    mention,
    profile,
    wait_running,
    write_reply,
    write_tokens,
)


def queued(dsn: str, ts: str, channel: str = CHANNEL) -> list[dict]:
    """The shared queue's messages for this Slack message ts (every host's, any state):
    with [queue] backend = "postgres" a host's incoming/ file is inserted and unlinked."""
    import psycopg

    from tests.test_slack import message_id

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT payload FROM messages WHERE channel = 'slack' AND message_id = %s",
            (message_id(ts, channel),),
        ).fetchall()
    return [row[0] for row in rows]


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

    def free() -> bool:  # the backend ends a moment after pg_terminate_backend returns
        with store_b.backfill_turn("C1") as mine:
            return mine

    wait_for(free, 10, what="the dead host's backfill turn free")
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


# ---- two real supervisors, one Slack app and profile, one database


@pytest.fixture
def fake():
    slack = FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    yield slack
    slack.stop()


@pytest.fixture
def cluster(tmp_path, fake, pg_dsn):
    """Hosts A and B (own state_dir each) on [queue] backend = "postgres": one Slack
    profile `main`, started by start(env); stopped (and any leftover killed) afterwards."""
    hosts = [AgentEnv(tmp_path / name) for name in ("a", "b")]
    yield hosts
    for env in hosts:
        env.stop()
        env.kill_leftovers()


def configure_host(env: AgentEnv, fake: FakeSlack, dsn: str, command: list[str]) -> None:
    env.root.mkdir(parents=True, exist_ok=True)
    creds = write_tokens(env)
    env.write_config(
        slack={"enabled": True, "api_base_url": fake.api_url},
        dispatcher={"max_attempts": 1},
        queue={"backend": "postgres"},
        **{"queue.postgres": {"dsn": dsn, "host_id": f"host-{env.root.name}"}},
        **{"agents.default": {"command": command, "timeout": 120}},
        **{"slack.profiles.main": profile(creds)},
    )


def start_both(cluster: list[AgentEnv], fake: FakeSlack, dsn: str, command: list[str]) -> None:
    """A first, then B: the fake's connection 0 is A's, 1 is B's."""
    for number, env in enumerate(cluster):
        configure_host(env, fake, dsn, command)
        env.start()
        wait_running(env)
        count = number + 1
        wait_for(lambda n=count: fake.live() == n, what=f"{count} Socket Mode connections")


def test_an_event_and_its_retry_on_another_host_are_answered_once(cluster, fake, pg_dsn):
    a, b = cluster
    start_both(cluster, fake, pg_dsn, ["cat"])
    ts = "1700000100.000100"
    first = fake.push_event(mention(ts, "only once"), to=0)
    # Slack did not see the ack in time: the same envelope again, to the other connection
    again = fake.push_event(mention(ts, "only once"), retry_attempt=1, to=1, envelope_id=first)
    plain = fake.push_event({**mention(ts, "only once"), "type": "message"}, to=1)
    wait_for(lambda: fake.acked(first) and fake.acked(plain), what="deliveries acknowledged")
    assert again == first
    wait_for(lambda: fake.posted(), 30, what="the reply posted")
    later = "1700000100.000200"  # B goes on past the duplicates
    fake.push_event(mention(later, "next"), to=1)
    wait_for(lambda: len(fake.posted()) == 2, 30, what="the later message answered")
    texts = sorted(call.params["text"] for call in fake.posted())
    assert texts == ["next", "only once"]
    assert len(enqueued_events(a, ts)) + len(enqueued_events(b, ts)) == 1
    assert len(enqueued_events(b, later)) == 1


def test_a_reply_both_hosts_hold_is_posted_once(cluster, fake, pg_dsn):
    a, b = cluster
    start_both(cluster, fake, pg_dsn, SILENT_AGENT)
    ts = "1700000200.000100"
    fake.push_event(mention(ts, "twice?"), to=0)
    [item] = wait_for(lambda: queued(pg_dsn, ts), what="the message queued by A")
    # the same reply offered on both hosts (with a shared queue, any host may see it)
    replies = [write_reply(env, item, "posted once") for env in (b, a)]
    wait_for(lambda: fake.posted(), 20, what="the reply posted")
    wait_for(lambda: not any(p.exists() for p in replies), 20, what="both copies gone")
    posts = [c for c in fake.posted() if c.params["text"] == "posted once"]
    assert len(posts) == 1, posts
    assert posts[0].params["thread_ts"] == ts
    # the host that did not post found the shared route and the claim: it dropped its
    # copy (a host with files only would have moved it to failed/: no route there)
    elsewhere = a.events("slack.reply.elsewhere") + b.events("slack.reply.elsewhere")
    assert elsewhere and elsewhere[-1]["claim"] == "posted", elsewhere
    for env in cluster:
        assert not list((env.state_dir / "queue" / "failed").glob("*")), env.root.name


def test_missed_messages_are_backfilled_by_one_host_at_a_time(cluster, fake, pg_dsn):
    a, b = cluster
    start_both(cluster, fake, pg_dsn, SILENT_AGENT)
    fake.push_event(mention("1700000300.000100", "live"), to=0)
    wait_for(lambda: queued(pg_dsn, "1700000300.000100"), what="the cursor set by a live message")
    fake.refuse_connections = True  # every host away while messages come
    fake.drop()
    missed = [f"1700000300.00{n}000" for n in range(2, 6)]
    for ts in missed:
        fake.add_history(CHANNEL, {**mention(ts, f"missed {ts}"), "type": "message"})
    # the first history call is slow: the other host meets the turn taken meanwhile
    fake.script(
        "conversations.history",
        {"ok": True, "messages": fake.history[CHANNEL][::-1], "has_more": False},
        channel=CHANNEL,
        delay=4.0,
    )
    fake.refuse_connections = False
    for env in cluster:
        wait_running(env)
    busy = wait_for(
        lambda: a.events("slack.backfill.busy") + b.events("slack.backfill.busy"),
        20,
        what="a host finding the backfill turn taken",
    )
    assert busy[0]["slack_channel"] == CHANNEL
    for ts in missed:
        wait_for(lambda t=ts: queued(pg_dsn, t), 20, what=f"{ts} backfilled")
    time.sleep(1)  # a window for a second host's enqueue, which must not come
    for ts in missed:
        assert len(enqueued_events(a, ts)) + len(enqueued_events(b, ts)) == 1, ts


def test_a_session_saved_by_one_host_is_listed_on_the_other(cluster, pg_dsn):
    a, b = cluster
    for env in cluster:
        env.root.mkdir(parents=True)
        env.write_config(
            queue={"backend": "postgres"},
            **{"queue.postgres": {"dsn": pg_dsn, "host_id": f"host-{env.root.name}"}},
        )
    store = PgSessionStore(pg_config(pg_dsn, "host-a", a.state_dir))
    try:
        store.put("default", "C100.1700000400.000100", "session-on-a")
    finally:
        store.close()
    listed = b.agentctl("sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["conversation"], row["session_id"]) == ("C100.1700000400.000100", "session-on-a")
    reset = b.agentctl("sessions", "reset", "C100.1700000400.000100")
    assert reset.returncode == 0 and "forgot session session-on-a" in reset.stdout
    assert a.agentctl("sessions", "--json").stdout == ""


def test_a_profile_whose_database_is_away_reconnects_when_it_is_back(cluster, fake, pg, pg_dsn):
    a, _ = cluster
    configure_host(a, fake, pg_dsn, SILENT_AGENT)
    a.start()
    wait_running(a)
    pg.stop()
    try:
        fake.drop()  # the reconnect pins the cursors: in the database, which is away
        wait_for(
            lambda: any(
                "queue database" in (r.get("error") or "")
                for r in a.events("slack.profile.disconnected")
            ),
            30,
            what="the profile disconnected naming the database",
        )
    finally:
        pg.start()
    wait_running(a)
    ts = "1700000500.000100"
    fake.push_event(mention(ts, "back"))
    wait_for(lambda: queued(pg_dsn, ts), 20, what="a message taken in again")
