"""Prometheus metrics: real supervisors scraped over real HTTP, and their endpoint abused.

Every count a scrape shows is checked against what is on disk (outgoing/, failed/) or what
`agentctl status` says; nothing is mocked.
"""

import errno
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load_config
from agent.errors import ConfigError
from agent.metrics import MAX_CONNECTIONS, PrometheusMetrics, SupervisorView
from agent.queue import Queue, new_message
from agent.slack_api import POSTS
from tests.fake_slack import FakeSlack
from tests.helpers import AgentEnv, wait_for
from tests.test_dispatcher import enqueue, outgoing, script
from tests.test_notify import NotifyListener, run_supervisor
from tests.test_slack import (
    APP_TOKEN,
    BOT_TOKEN,
    mention,
    profile,
    queued,
    wait_running,
    write_reply,
    write_tokens,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Answers at once; a text with "fail" always fails, one with "flaky" fails its first run.
AGENT = (
    't=$(cat)\ncase "$t" in *fail*) echo "no luck" >&2; exit 3;; esac\n'
    'case "$t" in *flaky*) [ "$AGENT_ATTEMPT" = 1 ] && exit 4;; esac\nprintf "%s" "$t"\n'
)
FAST_RETRY = {"max_attempts": 2, "retry_backoff": 0.05, "retry_backoff_max": 0.1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout: float = 5) -> Samples:
    """Every sample of one scrape, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:
        return None


def files(directory: Path) -> int:
    """Messages (and replies) in a queue directory: not reason files, not temp files."""
    return sum(1 for n in os.listdir(directory) if n.endswith(".json") and n[0] != ".")


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on, from /proc (its socket inodes in net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def metrics_env(env: AgentEnv, port: int, **sections) -> None:
    env.write_config(metrics={"listen": f"127.0.0.1:{port}"}, **sections)


# ---- configuration


@pytest.mark.parametrize(
    "listen",
    ["9464", "localhost", ":9464", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
     "127.0.0.1:+80", "::1:9464", "[::1]", "[]:9464", "a b:9464", "127.0.0.1:http"],
)  # fmt: skip
def test_a_bad_listen_value_is_a_config_error_naming_the_field(tmp_path, listen):
    path = tmp_path / "agent.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env={})
    message = str(caught.value)
    assert message.startswith(f'{path}: [metrics] listen: expected "" (off) or "host:port"')
    assert "port from 1 to 65535" in message and repr(listen) in message
    assert caught.value.exit_code == 78


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:1", "localhost:65535", ""])
def test_good_listen_values_load(tmp_path, listen):
    path = tmp_path / "agent.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    assert load_config(str(path), env={}).metrics.listen == listen


def test_start_with_a_bad_listen_value_exits_78_naming_it(agent_env):
    agent_env.write_config(metrics={"listen": "127.0.0.1:99999"})
    done = agent_env.agentctl("start")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "[metrics] listen: expected" in done.stderr and "'127.0.0.1:99999'" in done.stderr
    agent_env.write_config(metrics={"listen": 9464})  # not even a string
    done = agent_env.agentctl("run")
    assert done.returncode == 78 and "[metrics] listen: expected" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_are_off_by_default_and_nothing_listens(agent_env):
    assert load_config(str(agent_env.config_path)).metrics.listen == ""
    pid = agent_env.start()
    assert listening_ports(pid) == set()


def test_a_port_in_use_fails_the_start_with_one_clear_line(agent_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics_env(agent_env, port)
        done = agent_env.agentctl("start")
    assert done.returncode == 78, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"[metrics] listen: cannot listen on 127.0.0.1:{port}" in line
    assert os.strerror(errno.EADDRINUSE) in line
    assert agent_env.status()[0] == 3  # nothing left running, the lock is free again
    agent_env.start()  # the port is free now: the same config starts


def test_agentctl_status_never_imports_prometheus_client(agent_env):
    port = free_port()
    metrics_env(agent_env, port)
    agent_env.start()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent", "status"],
        capture_output=True,
        text=True,
        env=agent_env.cmd_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "agent.status" in done.stderr  # importtime did report the imports
    assert "prometheus_client" not in done.stderr and "agent.metrics" not in done.stderr


# ---- what the counters say, against the disk


def test_counters_match_outgoing_and_failed_after_a_batch(agent_env, tmp_path):
    port = free_port()
    command = script(tmp_path, "agent.sh", AGENT)
    metrics_env(
        agent_env,
        port,
        dispatcher=FAST_RETRY,
        **{"agents.default": {"command": command}, "agents.other": {"command": ["cat"]}},
    )
    agent_env.start()
    before = scrape(port)
    assert value(before, "agent_messages_done_total", agent="default") == 0  # exists at 0
    assert value(before, "agent_messages_failed_total", agent="other") == 0
    sent = {"ok": 8, "fail": 3, "flaky": 2}
    for kind, count in sent.items():
        for i in range(count):
            enqueue(agent_env, f"{kind} {i}", f"{kind}{i}", conversationId=f"c{i % 3}")
    for i in range(4):
        enqueue(agent_env, f"other {i}", f"other{i}", agent="other")
    queue = Queue(agent_env.state_dir / "queue")
    (queue.incoming / "garbage.json").write_text("not json")  # rejected by the queue worker
    enqueue(agent_env, "who?", "nobody1", agent="nobody")  # an agent nobody configured

    total = sum(sent.values()) + 4 + 2
    wait_for(lambda: files(queue.outgoing) + files(queue.failed) == total, what="every answer")

    def settled() -> Samples | None:
        samples = scrape(port)
        done = sum(value(samples, "agent_messages_done_total", agent=a) or 0 for a in AGENTS)
        return samples if done == files(queue.outgoing) else None

    AGENTS = ("default", "other")
    samples = wait_for(settled, what="the done counters to catch up with outgoing/")
    replies = outgoing(agent_env)
    by_agent = {a: sum(1 for r in replies.values() if r["agent"] == a) for a in AGENTS}
    assert by_agent == {"default": 10, "other": 4}  # ok and flaky; other
    for agent in AGENTS:
        assert value(samples, "agent_messages_done_total", agent=agent) == by_agent[agent]
    assert value(samples, "agent_messages_failed_total", agent="default") == 3
    assert value(samples, "agent_messages_failed_total", agent="other") == 0
    assert value(samples, "agent_messages_rejected_total", reason="invalid") == 1
    assert value(samples, "agent_messages_rejected_total", reason="unknown_agent") == 1
    failed = sum(value(samples, "agent_messages_failed_total", agent=a) for a in AGENTS)
    rejected = sum(v for (n, _), v in samples.items() if n == "agent_messages_rejected_total")
    assert failed + rejected == files(queue.failed) == 5
    # every fail ran twice (one retry), every flaky once more: 3 + 2 retries
    assert value(samples, "agent_messages_retried_total", agent="default") == 5
    runs = {"default": 8 + 3 * 2 + 2 * 2, "other": 4}
    for agent, count in runs.items():
        assert value(samples, "agent_run_duration_seconds_count", agent=agent) == count
        assert value(samples, "agent_run_duration_seconds_bucket", agent=agent, le="+Inf") == count
    assert value(samples, "agent_messages_claimed_total", agent="default") == 8 + 3 + 2
    assert value(samples, "agent_messages_claimed_total", agent="other") == 4
    assert 0 < value(samples, "agent_run_duration_seconds_sum", agent="default") < 60
    assert value(samples, "agent_queue_messages", dir="incoming") == 0
    assert value(samples, "agent_health", state="healthy") == 1


def test_queue_depth_rises_while_the_dispatcher_is_blocked_and_falls_back_to_zero(
    agent_env, tmp_path
):
    port = free_port()
    gate = tmp_path / "gate"
    blocked = script(tmp_path, "blocked.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\ncat\n")
    metrics_env(agent_env, port, **{"agents.default": {"command": blocked, "timeout": 60}})
    agent_env.start()
    for i in range(6):
        enqueue(agent_env, f"m{i}", f"m{i}", conversationId="one")  # one lane: one at a time

    def waiting() -> Samples | None:
        samples = scrape(port)
        unanswered = sum(value(samples, "agent_queue_messages", dir=d) for d in DIRS)
        return samples if unanswered == 6 else None

    DIRS = ("incoming", "processing")
    samples = wait_for(waiting, what="six messages counted as not answered")
    assert value(samples, "agent_queue_messages", dir="processing") >= 1
    aged = wait_for(
        lambda: (
            value(s := scrape(port), "agent_queue_oldest_message_age_seconds", dir="processing")
            >= 1.0
            and s
        ),
        what="the oldest claimed message to age",
    )
    assert value(aged, "agent_run_duration_seconds_count", agent="default") == 0
    gate.touch()
    wait_for(lambda: len(outgoing(agent_env)) == 6, what="six replies")
    drained = wait_for(
        lambda: (
            all(value(s := scrape(port), "agent_queue_messages", dir=d) == 0 for d in DIRS) and s
        ),
        what="the queue back to 0",
    )
    for directory in DIRS:
        assert value(drained, "agent_queue_oldest_message_age_seconds", dir=directory) == 0


def test_worker_states_restarts_and_health_agree_with_agentctl_status(agent_env):
    port = free_port()
    metrics_env(agent_env, port, heartbeat={"interval": 3600})
    agent_env.start(AGENT_FAULT_INJECT="heartbeat:crash")
    worker = wait_for(
        lambda: (w := agent_env.worker("heartbeat"))["gave_up"] and w,
        what="the heartbeat worker to give up",
    )
    samples = wait_for(
        lambda: (
            value(s := scrape(port), "agent_worker_state", worker="heartbeat", state="error") == 1
            and s
        ),
        what="the heartbeat worker in error",
    )
    code, report = agent_env.status()
    assert code == 2 and report["supervisor"]["health"] == "degraded"
    assert value(samples, "agent_health", state="degraded") == 1
    assert value(samples, "agent_health", state="healthy") == 0
    assert value(samples, "agent_worker_restarts_total", worker="heartbeat") == worker["restarts"]
    assert worker["restarts"] >= 1
    for state in ("running", "stopped", "hung", "starting", "stopping", "disabled"):
        assert value(samples, "agent_worker_state", worker="heartbeat", state=state) == 0
    assert value(samples, "agent_worker_state", worker="queue", state="running") == 1
    assert value(samples, "agent_worker_state", worker="slack", state="disabled") == 1


def test_watchdog_pings_withheld_are_counted_while_a_worker_hangs(agent_env, tmp_path):
    port = free_port()
    metrics_env(agent_env, port)
    listener = NotifyListener(tmp_path / "notify")
    proc = run_supervisor(agent_env, tmp_path / "notify", AGENT_FAULT_INJECT="dispatcher:hang")
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        assert value(scrape(port), "agent_watchdog_pings_withheld_total") == 0
        samples = wait_for(
            lambda: (
                (value(s := scrape(port), "agent_watchdog_pings_withheld_total") or 0) >= 3 and s
            ),
            what="three withheld pings",
        )
        assert value(samples, "agent_worker_state", worker="dispatcher", state="hung") == 1
        assert value(samples, "agent_health", state="degraded") == 1
        listener.poll()  # what was sent before the hang, heard now, is not "after"
        hung_at = time.monotonic()
        assert listener.silent_for(0.6, "WATCHDOG=1")  # interval 0.2 s: none while withheld
        later = scrape(port)
        # once per interval (0.2 s), not once per tick or per scrape
        elapsed = time.monotonic() - hung_at
        grown = value(later, "agent_watchdog_pings_withheld_total") - value(
            samples, "agent_watchdog_pings_withheld_total"
        )
        assert 1 <= grown <= elapsed / 0.2 + 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_a_silent_supervisor_loop_reads_as_degraded(tmp_path):
    """In-process: the view the main loop published goes stale when the loop stops."""
    path = tmp_path / "agent.toml"
    port = free_port()
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    metrics = PrometheusMetrics(load_config(str(path), env={}), ("127.0.0.1", port))
    try:
        workers = (("queue", "running"),)
        metrics.publish(SupervisorView("healthy", workers, hang_timeout=2.0))
        assert value(scrape(port), "agent_health", state="healthy") == 1
        stale = SupervisorView("healthy", workers, 2.0, at=time.monotonic() - 7.5)
        metrics.publish(stale)
        samples = scrape(port)
        assert value(samples, "agent_health", state="degraded") == 1
        # state_dir has no queue/ yet: the census says 0, it does not fail
        assert value(samples, "agent_queue_messages", dir="incoming") == 0
    finally:
        metrics.close()
    assert try_scrape(port) is None  # closed: nothing listens any more


def test_a_failing_collector_loses_only_its_own_series(tmp_path):
    path = tmp_path / "agent.toml"
    port = free_port()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "queue").write_text("a file where the queue directory belongs")
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    metrics = PrometheusMetrics(load_config(str(path), env={}), ("127.0.0.1", port))
    try:
        metrics.message_done("default")
        samples = scrape(port)
        assert value(samples, "agent_messages_done_total", agent="default") == 1
        assert not [n for n, _ in samples if n.startswith("agent_queue_")]
    finally:
        metrics.close()


def test_a_changed_listen_needs_a_restart_and_the_old_endpoint_keeps_serving(agent_env):
    port, other = free_port(), free_port()
    metrics_env(agent_env, port)
    pid = agent_env.start()
    metrics_env(agent_env, other)
    done = agent_env.agentctl("reload")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "[metrics] listen cannot change while the supervisor runs" in done.stderr
    assert value(scrape(port), "agent_health", state="healthy") == 1
    assert listening_ports(pid) == {port}


# ---- Slack


@pytest.fixture
def fake():
    slack = FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    yield slack
    slack.stop()


def test_slack_events_posts_and_429s_are_counted_per_profile(agent_env, fake):
    port = free_port()
    creds = write_tokens(agent_env)
    agent_env.write_config(
        metrics={"listen": f"127.0.0.1:{port}"},
        slack={"enabled": True, "api_base_url": fake.api_url},
        dispatcher={"max_attempts": 1},
        **{
            "agents.default": {"command": ["sleep", "600"], "timeout": 120},
            "slack.profiles.main": profile(creds),
        },
    )
    agent_env.start()
    wait_running(agent_env)
    assert value(scrape(port), "agent_slack_events_received_total", profile="main") == 0
    ts = "1700000004.000100"
    fake.push_event(mention(ts))
    item = wait_for(lambda: queued(agent_env, ts), what="the queue message")[0]
    fake.script(
        "chat.postMessage", {"ok": False, "error": "ratelimited"}, 429, {"Retry-After": "1"}
    )
    write_reply(agent_env, item, "slowly")
    wait_for(lambda: fake.posted(), what="the reply posted after the rate limit")
    samples = wait_for(
        lambda: value(s := scrape(port), "agent_slack_posts_total", profile="main") and s,
        what="the post counted",
    )
    assert value(samples, "agent_slack_events_received_total", profile="main") == 1
    assert value(samples, "agent_slack_rate_limited_total", profile="main") == 1
    posts = [c for c in fake.calls if c.method in POSTS and c.status == 200 and c.body.get("ok")]
    assert value(samples, "agent_slack_posts_total", profile="main") == len(posts) == 1


# ---- torture: the endpoint abused while messages flow


def _hammer(port: int, stop: threading.Event, seed: int, counts: dict[str, int]) -> None:
    """One abusive client: full scrapes, half-closed and cut-off requests, garbage bytes.
    Counts what it tried, what was served, and what found every slot taken."""
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(("scrape", "half_closed", "cut_off", "garbage"))
        counts[kind] = counts.get(kind, 0) + 1
        try:
            if kind == "scrape":
                scrape(port, timeout=10)
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    if kind == "half_closed":  # request sent, our side shut, then gone
                        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        sock.shutdown(socket.SHUT_WR)
                        sock.recv(rng.randrange(1, 200))
                    elif kind == "cut_off":  # asks, and closes before reading (a RST)
                        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    else:
                        sock.sendall(rng.randbytes(rng.randrange(1, 3000)) + b"\r\n\r\n")
                        sock.recv(100)
            counts["served"] = counts.get("served", 0) + 1
        except OSError:
            counts["refused"] = counts.get("refused", 0) + 1  # busy: closed at once


def _threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def _silent_clients(port: int, how_many: int) -> list[socket.socket]:
    """Connections that never send a byte (non-blocking connects: none waits)."""
    sockets = []
    for _ in range(how_many):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def test_torture_an_abused_endpoint_never_touches_the_supervisor(agent_env, tmp_path):
    port = free_port()
    command = script(tmp_path, "agent.sh", AGENT)
    metrics_env(
        agent_env,
        port,
        dispatcher={**FAST_RETRY, "concurrency": 4},
        **{"agents.default": {"command": command}},
    )
    pid = agent_env.start()
    queue = Queue(agent_env.state_dir / "queue")
    stop = threading.Event()
    counts: list[dict[str, int]] = [{} for _ in range(6)]
    threads = []  # the supervisor's thread count, now and then
    hammers = [
        threading.Thread(target=_hammer, args=(port, stop, seed, counts[seed]), daemon=True)
        for seed in range(6)
    ]
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    silent = _silent_clients(port, min(1000, soft - 200))
    for thread in hammers:
        thread.start()
    total = 200
    try:
        for i in range(total):  # over ~8 s: longer than a silent client holds a slot
            stop.wait(0.04)
            text = "fail" if i % 17 == 0 else "flaky" if i % 11 == 0 else "ok"
            data = new_message(
                "local", f"{text} {i}", "tester", "u1", message_id=f"t{i:03d}",
                conversationId=f"c{i % 10}",
            )  # fmt: skip
            queue.enqueue(data, name=f"t{i:03d}.json")
            threads.append(_threads_of(pid))
            if i % 40 == 0:
                code, report = agent_env.status()
                assert code == 0, report
        wait_for(
            lambda: files(queue.outgoing) + files(queue.failed) == total,
            timeout=120,
            what="every message answered",
        )
        code, report = agent_env.status()
        assert code == 0, report
    finally:
        stop.set()
        for thread in hammers:
            thread.join(30)
        for sock in silent:
            sock.close()
    tried = {k: sum(c.get(k, 0) for c in counts) for k in ("scrape", "garbage", "served")}
    print(f"clients: {counts}; supervisor threads at most {max(threads)}")
    assert all(n > 0 for n in tried.values()), counts
    # workers, 4 runs, the metrics server and its MAX_CONNECTIONS: never one per client
    assert max(threads) <= 8 + 4 + 1 + MAX_CONNECTIONS, threads

    fails = sum(1 for i in range(total) if i % 17 == 0)
    flaky = sum(1 for i in range(total) if i % 17 != 0 and i % 11 == 0)

    def final() -> Samples | None:
        samples = try_scrape(port)  # silent clients may still hold every slot for a while
        if samples is None:
            return None
        done = value(samples, "agent_messages_done_total", agent="default")
        failed = value(samples, "agent_messages_failed_total", agent="default")
        return samples if (done, failed) == (total - fails, fails) else None

    samples = wait_for(final, timeout=30, what="a final scrape that matches the disk")
    assert files(queue.outgoing) == total - fails and files(queue.failed) == fails
    assert value(samples, "agent_messages_retried_total", agent="default") == fails + flaky
    runs = (total - fails) + flaky + 2 * fails
    assert value(samples, "agent_run_duration_seconds_count", agent="default") == runs
    assert value(samples, "agent_health", state="healthy") == 1
    assert value(samples, "agent_worker_restarts_total", worker="dispatcher") == 0
    code, report = agent_env.status()
    assert code == 0, report
    assert all(w["restarts"] == 0 for w in report["workers"])
