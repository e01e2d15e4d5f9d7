"""The supervisor on the shared PostgreSQL queue ([queue] backend = "postgres"), end to end:
real supervisors (agentctl start), a real PostgreSQL (tests/pg.py), real agent processes.

What it shows: local ingress (agentctl send, files dropped in incoming/) is answered
exactly once on the producer's host whichever host ran the message; a conversation runs
in order and never twice at once across hosts; a killed or frozen host's claim is taken
over and the late host delivers nothing; a database restart or outage loses nothing and
answers nothing twice, while the supervisors stay up and say they are degraded.
The file queue's behaviours run against both backends in tests/test_dispatcher.py and
tests/test_queue.py (the queue_backend fixture, tests/conftest.py).
"""

import json
import os
import signal
import stat
import threading
from collections import Counter
from pathlib import Path

import pytest

from agent.queue import Queue, new_message
from tests.helpers import AgentEnv, pg_sections, pid_alive, wait_for

pytestmark = pytest.mark.integration


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return [str(path)]


def logging_agent(tmp_path: Path, log: Path, extra: str = "") -> list[str]:
    """An agent that logs `start|end <conversation> <message> <home> <time>` around its run
    (HOME is state_dir/home/NAME: it tells the host) and answers with its input."""
    fields = '$AGENT_CONVERSATION_ID|$AGENT_MESSAGE_ID|$HOME|$(date +%s.%N)"'
    return script(
        tmp_path,
        "agent.sh",
        f't=$(cat); echo "start|{fields} >> {log}\n{extra}'
        f'echo "end|{fields} >> {log}\nprintf "%s" "$t"\n',
    )


def enqueue(env: AgentEnv, text: str, message_id: str, **optional) -> None:
    data = new_message("local", text, "tester", "u1", message_id=message_id, **optional)
    queue = Queue(env.state_dir / "queue")
    queue.ensure_dirs()
    queue.enqueue(data, name=f"{message_id}.json")


def outgoing(env: AgentEnv) -> dict[str, dict]:
    out = env.state_dir / "queue" / "outgoing"
    if not out.exists():
        return {}
    return {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


def rows(dsn: str, where: str = "true") -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            f"SELECT message_id, state, reply_host, origin_host, attempts, delivered_at"
            f" FROM messages WHERE {where} ORDER BY id"
        ).fetchall()


def runs(log: Path) -> list[tuple[str, str, str, str, float]]:
    """(what, conversation, message, host, time) per line of the logging agent."""
    found = []
    if log.exists():
        for line in log.read_text().splitlines():
            what, conversation, message, home, at = line.split("|")
            found.append((what, conversation, message, Path(home).parents[2].name, float(at)))
    return found


def assert_one_run_at_a_time(log: Path) -> None:
    """Per conversation, finished runs never overlap and start in message order."""
    by_conversation: dict[str, list] = {}
    for what, conversation, message, _host, at in runs(log):
        if what == "start":
            by_conversation.setdefault(conversation, []).append(("start", message, at))
        else:
            by_conversation[conversation].append(("end", message, at))
    for conversation, events in by_conversation.items():
        events.sort(key=lambda e: e[2])
        running = None
        for what, message, _ in events:
            if what == "start":
                assert running is None, f"{conversation}: {message} started during {running}"
                running = message
            elif running == message:
                running = None
            # an end without its start: a run killed with its host (never logged its end)


class Collector:
    """Takes every reply that appears in one host's outgoing/ (as `send --wait` does) and
    counts them by messageId: a reply delivered twice shows up as a count of 2."""

    def __init__(self, env: AgentEnv):
        self.queue = Queue(env.state_dir / "queue")
        self.seen: Counter = Counter()

    def collect(self) -> Counter:
        self.queue.ensure_dirs()
        for name in self.queue.replies("local"):
            reply = self.queue.read_reply(name)
            self.queue.remove_reply(name)
            self.seen[reply["messageId"]] += 1
        return self.seen


@pytest.fixture
def cluster(tmp_path, pg_dsn):
    """make(host, **sections) -> an AgentEnv on the shared database of this test."""
    envs: list[AgentEnv] = []

    def make(host: str, lease: float = 2.0, **sections) -> AgentEnv:
        (tmp_path / host).mkdir()
        env = AgentEnv(tmp_path / host)
        merged = pg_sections(pg_dsn, host, lease)
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        env.write_config(**merged)
        envs.append(env)
        return env

    make.dsn = pg_dsn
    yield make
    for env in envs:
        for pid in env.started:  # a test may leave one frozen
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        env.agentctl("stop")
        env.kill_leftovers()


# ---- one host


def test_send_wait_and_dropped_files_are_answered_once_and_status_shows_the_database(cluster):
    env = cluster("a")
    env.start()
    done = env.agentctl("send", "--wait", "--conversation", "c", "hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello"
    for i in range(5):
        enqueue(env, f"file {i}", f"f{i}", conversationId="c")
    wait_for(lambda: len(outgoing(env)) == 5, what="five replies")
    assert {r["message"] for r in outgoing(env).values()} == {f"file {i}" for i in range(5)}
    states = rows(cluster.dsn)
    assert [(r[1], r[2], r[3]) for r in states] == [("done", "a", "a")] * 6
    assert all(r[5] is not None for r in states)  # delivered
    queue_dir = env.state_dir / "queue"
    assert os.listdir(queue_dir / "incoming") == os.listdir(queue_dir / "processing") == []
    detail = wait_for(
        lambda: (d := env.worker("queue")["detail"]).get("cluster_depth") == 0 and d,
        what="the queue worker's cluster stats",
    )
    assert (detail["backend"], detail["db"], detail["host_id"]) == ("postgres", "ok", "a")
    text = env.agentctl("status").stdout
    assert "backend=postgres" in text and "db=ok" in text
    assert "  queue db:   postgres ok, " in text and " ms" in text
    assert "  cluster:    depth 0, oldest -, running 0" in text
    assert "  hosts:      a (this host): heartbeat " in text
    cluster_view = env.status()[1]["cluster"]
    assert cluster_view["db_latency_ms"] >= 0 and cluster_view["host_id"] == "a"
    [me] = cluster_view["hosts"]
    assert me["this_host"] and me["heartbeat_age_s"] < 30 and me["in_flight"] == 0


# ---- several hosts


def test_three_hosts_share_the_load_in_order_and_each_producer_gets_its_replies(cluster, tmp_path):
    log = tmp_path / "runs.log"
    agent = {"command": logging_agent(tmp_path, log, "sleep 0.02\n")}
    hosts = [
        cluster(h, **{"agents.default": agent, "dispatcher": {"concurrency": 3}}) for h in "abc"
    ]
    for env in hosts:
        env.start()
    collectors = [Collector(env) for env in hosts]
    for i in range(20):  # 6 conversations, each produced on one host, in order
        for c in range(6):
            enqueue(hosts[c % 3], f"{c}-{i}", f"c{c}-m{i:02d}", conversationId=f"conv{c}")

    def all_in() -> bool:
        return sum(sum(c.collect().values()) for c in collectors) >= 120

    wait_for(all_in, timeout=60, what="120 replies")
    for h, collector in enumerate(collectors):
        mine = {f"c{c}-m{i:02d}" for c in range(6) if c % 3 == h for i in range(20)}
        assert collector.seen == Counter({m: 1 for m in mine}), f"host {'abc'[h]}"
    ran_on = {host for what, _, _, host, _ in runs(log) if what == "start"}
    assert ran_on == {"a", "b", "c"}, "every host ran messages"
    cross = [r for r in rows(cluster.dsn) if r[2] != r[3]]
    assert cross, "some replies were computed on another host than their producer's"
    assert_one_run_at_a_time(log)
    for c in range(6):
        started = [m for w, conv, m, _, _ in runs(log) if w == "start" and conv == f"conv{c}"]
        assert started == sorted(started), f"conv{c} ran out of order"
    assert {r[1] for r in rows(cluster.dsn)} == {"done"}
    # every host's status lists the three, each with a heartbeat
    view = wait_for(
        lambda: len((v := hosts[0].status()[1].get("cluster") or {}).get("hosts") or []) == 3 and v,
        what="three hosts in a's status",
    )
    assert [h["host_id"] for h in view["hosts"]] == ["a", "b", "c"]
    assert [h["this_host"] for h in view["hosts"]] == [True, False, False]
    assert all(h["heartbeat_age_s"] is not None for h in view["hosts"])


def slow_first_attempt(tmp_path: Path, log: Path, seconds: float) -> dict:
    """The first attempt of a message sleeps; later attempts answer at once."""
    extra = f'if [ "$AGENT_ATTEMPT" = 1 ]; then sleep {seconds}; fi\n'
    return {"command": logging_agent(tmp_path, log, extra), "timeout": 120}


def test_kill_9_of_the_host_holding_a_claim_lets_another_host_finish_it(cluster, tmp_path):
    log = tmp_path / "runs.log"
    agent = slow_first_attempt(tmp_path, log, 60)
    a = cluster("a", **{"agents.default": agent})
    b = cluster("b", **{"agents.default": agent})
    pids = {"a": a.start(), "b": b.start()}
    enqueue(a, "survive", "k1", conversationId="k")  # a is the producer
    first = wait_for(lambda: [r for r in runs(log) if r[0] == "start"], what="the first run")
    holder = first[0][3]
    os.kill(pids[holder], signal.SIGKILL)
    wait_for(lambda: not pid_alive(pids[holder]), what="the holder gone")
    wait_for(lambda: rows(cluster.dsn, "state = 'done'"), timeout=20, what="k1 done elsewhere")
    [row] = rows(cluster.dsn)
    assert (row[2], row[4]) == ("b" if holder == "a" else "a", 2)
    if holder == "a":
        a.start()  # the producer's host: its pump writes the reply once it is back
    collector = Collector(a)
    wait_for(lambda: collector.collect()["k1"] == 1, what="k1's reply on a")
    reclaimed = [e for env in (a, b) for e in env.events("queue.lease_reclaimed")]
    assert reclaimed and reclaimed[0]["host"] == holder
    assert [r[2] for r in runs(log) if r[0] == "end"] == ["k1"]  # the killed run never ended
    assert collector.collect() == Counter({"k1": 1})


def test_a_frozen_host_loses_its_claim_and_after_thawing_delivers_no_second_reply(
    cluster, tmp_path
):
    log = tmp_path / "runs.log"
    agent = slow_first_attempt(tmp_path, log, 3)
    a = cluster("a", **{"agents.default": agent})
    b = cluster("b", **{"agents.default": agent})
    a_pid = a.start()
    enqueue(a, "thaw", "s1", conversationId="s")
    wait_for(lambda: runs(log), what="the first run, on a")
    b.start()
    os.kill(a_pid, signal.SIGSTOP)  # a holds the claim, frozen; its agent run goes on
    try:
        wait_for(lambda: rows(cluster.dsn, "state = 'done'"), timeout=20, what="s1 done on b")
    finally:
        os.kill(a_pid, signal.SIGCONT)
    [row] = rows(cluster.dsn)
    assert (row[2], row[4]) == ("b", 2)
    # the thawed host's run ends (its agent slept 3 s): its reply is dropped
    [lost] = wait_for(lambda: a.events("message.lost"), what="a noticing it lost")
    assert lost["message_id"] == "s1"
    assert a.events("message.done") == []
    assert len([r for r in runs(log) if r[0] == "end"]) == 2  # both runs ended
    collector = Collector(a)
    wait_for(lambda: collector.collect()["s1"] == 1, what="s1's reply on a (from b's run)")
    wait_for(lambda: a.worker("queue")["state"] == "running", what="the thawed host ok")
    assert collector.collect() == Counter({"s1": 1})
    assert outgoing(b) == {}


def test_a_database_restart_and_outage_lose_nothing_and_answer_nothing_twice(cluster, pg, tmp_path):
    hosts = [cluster(h, **{"dispatcher": {"concurrency": 2}}) for h in "ab"]
    pids = [env.start() for env in hosts]
    collectors = [Collector(env) for env in hosts]
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            env = hosts[i % 2]
            enqueue(env, f"n{i}", f"n{i:03d}", conversationId=f"r{i % 5}")
            sent.append(f"n{i:03d}")
            i += 1
            stop.wait(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: len(sent) > 50, what="a stream going")
        pg.restart_immediate()
        wait_for(lambda: len(sent) > 150, what="the stream going on")
        pg.stop("immediate")
        try:
            degraded = wait_for(
                lambda: "queue database unreachable" in str(hosts[0].status()[1]),
                timeout=20,
                what="a degraded queue worker",
            )
            assert degraded
            _, report = hosts[0].status()
            assert report["supervisor"]["health"] == "degraded"
            assert all(pid_alive(pid) for pid in pids)
        finally:
            pg.start()
    finally:
        stop.set()
        producer.join()

    def answered() -> int:
        return sum(sum(c.collect().values()) for c in collectors)

    wait_for(lambda: answered() >= len(sent), timeout=60, what=f"{len(sent)} replies")
    for h, collector in enumerate(collectors):
        mine = {m for i, m in enumerate(sent) if i % 2 == h}
        assert collector.seen == Counter({m: 1 for m in mine})
    assert all(pid_alive(pid) for pid in pids)
    wait_for(
        lambda: hosts[0].status()[1]["supervisor"]["health"] == "healthy", what="healthy again"
    )
    assert hosts[0].events("queue.db.down") and hosts[0].events("queue.db.up")
    assert {r[1] for r in rows(cluster.dsn)} == {"done"}


def test_an_outcome_reached_while_the_database_is_down_is_kept_and_written_later(
    cluster, pg, tmp_path
):
    log = tmp_path / "runs.log"
    agent = slow_first_attempt(tmp_path, log, 2)
    env = cluster("a", lease=60, **{"agents.default": agent})
    env.start()
    enqueue(env, "kept", "p1")
    wait_for(lambda: runs(log), what="the run")
    spool = env.state_dir / "queue-spool.json"
    pg.stop("fast")
    try:
        wait_for(spool.exists, timeout=20, what="the outcome kept in the spool")
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600
        [kept] = env.events("queue.db.kept")
        assert (kept["op"], kept["level"]) == ("complete", "warning")
        assert outgoing(env) == {}
    finally:
        pg.start()
    collector = Collector(env)
    wait_for(lambda: collector.collect()["p1"] == 1, timeout=20, what="p1 answered")
    assert not spool.exists()
    [row] = rows(cluster.dsn)
    assert (row[1], row[2], row[4]) == ("done", "a", 1)  # run once, stored by its holder
    [flushed] = env.events("queue.db.flushed")
    assert flushed["count"] == 1
    assert collector.collect() == Counter({"p1": 1})


def test_a_host_started_while_the_database_is_down_waits_and_then_serves(cluster, pg):
    env = cluster("a", queue={"stall_timeout": 1})
    pg.stop("fast")
    try:
        env.start()
        enqueue(env, "patience", "w1")
        wait_for(
            lambda: "unreachable" in str(env.worker("queue")["detail"].get("degraded")),
            what="degraded while the database is down",
        )
        wait_for(
            lambda: (env.worker("queue")["detail"].get("oldest_age_s") or 0) >= 2,
            what="w1 waiting for longer than stall_timeout",
        )
        assert (env.state_dir / "queue" / "incoming" / "w1.json").exists()
        assert not env.worker("queue")["detail"].get("stalled")  # the database, not a stall
        assert env.events("queue.stalled") == []
    finally:
        pg.start()
    reply = wait_for(lambda: outgoing(env).get("local_w1.json"), timeout=20, what="w1 answered")
    assert reply["message"] == "patience"


def test_a_graceful_stop_releases_its_claims_to_the_other_hosts(cluster, tmp_path):
    log = tmp_path / "runs.log"
    agent = slow_first_attempt(tmp_path, log, 60)
    a = cluster("a", lease=60, **{"agents.default": agent})
    a.start()
    enqueue(a, "handed over", "g1")
    wait_for(lambda: runs(log), what="the run on a")
    assert a.stop().returncode == 0
    [row] = rows(cluster.dsn)
    assert (row[1], row[4]) == ("queued", 0)  # released: not an attempt, no lease to wait for
    b = cluster("b", lease=60, **{"agents.default": {"command": ["cat"]}})
    b.start()
    wait_for(lambda: rows(cluster.dsn, "state = 'done'"), what="g1 done on b")
    a.start()
    assert wait_for(lambda: outgoing(a).get("local_g1.json"), what="g1 on a")["message"]


def test_connection_pool_warnings_become_one_rate_limited_event(monkeypatch):
    import logging

    from agent.pg.host import PoolLogHandler

    seen = []
    monkeypatch.setattr("agent.ratelimit.event", lambda name, text, **f: seen.append((name, text)))
    logger = logging.getLogger("test.psycopg.pool")
    logger.propagate = False
    logger.addHandler(PoolLogHandler())
    for _ in range(5):
        logger.warning("error connecting in 'agent-queue': connection refused\nmore detail")
    assert seen == [
        ("queue.db.pool", "connection pool: error connecting in 'agent-queue': connection refused")
    ]


def test_heartbeats_go_through_the_shared_queue_and_never_pile_up(cluster, tmp_path):
    slow = script(tmp_path, "slow.sh", 'cat >/dev/null; [ -e "$HOME/fast" ] || sleep 3; echo ok\n')
    env = cluster(
        "a", **{"agents.default": {"command": slow, "timeout": 10}, "heartbeat": {"interval": 0.5}}
    )
    env.start()
    wait_for(lambda: env.events("heartbeat.missed"), what="a heartbeat missed (slow agent)")
    wait_for(lambda: env.worker("heartbeat")["detail"]["skipped"] >= 3, what="skipped ticks")
    assert len(rows(cluster.dsn, "channel = 'heartbeat'")) == 1  # no pile-up in its lane
    (env.state_dir / "home" / "default" / "fast").touch()
    [reply] = wait_for(lambda: env.events("heartbeat.reply"), timeout=20, what="the reply")
    assert reply["reply"] == "ok" and reply["late"] is True
