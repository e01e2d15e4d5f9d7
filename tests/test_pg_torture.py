"""Cluster torture: three supervisors on one PostgreSQL queue, killed at random.

600 messages over 30 conversations, each conversation produced on one host (through
`agentctl send` for three of them, files dropped into incoming/ for the rest), while at
least ten random `kill -9` of supervisors (each restarted) and one `pg_ctl restart -m
immediate` happen. At the end: every message has exactly one reply, on its producer's
host, and nothing anywhere else; each conversation ran in order and never two of its
messages at once (a run of a killed host may not have logged its end: it is dead); the
database holds 600 rows, all done and delivered, none claimed; processing/ is empty.
The seed is printed (AGENT_TORTURE_SEED=<seed> replays the same choices).
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from agent.queue import Queue, new_message
from tests.helpers import AgentEnv, pid_alive, wait_for
from tests.test_pg_backend import logging_agent, pg_sections, rows, runs

pytestmark = pytest.mark.integration

HOSTS = "abc"
CONVERSATIONS = 30
PER_CONVERSATION = 20
SENT_BY_AGENTCTL = (0, 1, 2)  # conversations produced with `agentctl send` (one per host)
KILLS = 10
DYING = 0.5  # seconds a killed supervisor's last run may still start while it is torn down


def text_of(conversation: int, seq: int) -> str:
    return f"t{conversation:02d}-{seq:02d}"


def produce(env: AgentEnv, host: int, rng: random.Random, errors: list) -> None:
    """This host's conversations, one message of each per round, in order."""
    queue = Queue(env.state_dir / "queue")
    mine = [c for c in range(CONVERSATIONS) if c % len(HOSTS) == host]
    try:
        for seq in range(PER_CONVERSATION):
            for c in mine:
                text = text_of(c, seq)
                if c in SENT_BY_AGENTCTL:
                    done = env.agentctl("send", "--conversation", f"conv{c}", text)
                    assert done.returncode == 0, done.stderr
                else:
                    data = new_message("local", text, "tester", "u1", conversationId=f"conv{c}")
                    queue.enqueue(data, name=f"{time.time_ns()}-{text}.json")
            time.sleep(rng.uniform(0.1, 0.4))
    except BaseException as exc:  # reported by the test, not lost in a thread
        errors.append(exc)


def assert_runs_one_at_a_time_in_order(
    log: Path, kills: list[tuple[str, float]], texts: dict[str, str]
) -> None:
    """texts: messageId -> text (whose last part is the message's place in its conversation)."""
    by_conversation: dict[str, list] = {}
    for what, conversation, message, host, at in runs(log):
        by_conversation.setdefault(conversation, []).append((at, what, texts[message], host))
    for conversation, events in by_conversation.items():
        events.sort()
        running = None  # (message, host, started)
        order = []
        for at, what, message, host in events:
            if what == "end":
                if running and running[0] == message and running[1] == host:
                    running = None
                continue
            if running is not None:
                # its host died mid-run (t: when the supervisor was seen gone; a run may
                # start while a SIGKILLed process is still being torn down, and dies with it)
                killed = any(
                    h == running[1] and running[2] <= t + DYING and t <= at for h, t in kills
                )
                assert killed, (
                    f"{conversation}: {message} started on {host} at {at} while {running} ran;"
                    f" runs: {events}; kills: {kills}"
                )
            running = (message, host, at)
            if not order or order[-1] != message:
                order.append(message)
        seqs = [int(m.split("-")[-1]) for m in order]
        assert seqs == list(range(PER_CONVERSATION)), f"{conversation} ran as {order}"


def test_three_supervisors_killed_at_random_answer_every_message_once_in_order(
    tmp_path, pg, pg_dsn
):
    seed = int(os.environ.get("AGENT_TORTURE_SEED") or random.randrange(2**32))
    print(f"torture seed: {seed} (AGENT_TORTURE_SEED={seed} replays it)")
    rng = random.Random(seed)
    log = tmp_path / "runs.log"
    agent = {"command": logging_agent(tmp_path, log, "sleep 0.02\n"), "timeout": 60}
    envs = []
    for host in HOSTS:
        (tmp_path / host).mkdir()
        env = AgentEnv(tmp_path / host)
        env.write_config(
            **pg_sections(pg_dsn, host, lease=2.0),
            **{"agents.default": agent, "dispatcher": {"concurrency": 4, "max_attempts": 50}},
        )
        envs.append(env)
    pids = {host: env.start() for host, env in zip(HOSTS, envs, strict=True)}
    kills: list[tuple[str, float]] = []
    errors: list[BaseException] = []
    try:
        producers = [
            threading.Thread(target=produce, args=(env, i, random.Random(rng.random()), errors))
            for i, env in enumerate(envs)
        ]
        for thread in producers:
            thread.start()
        for k in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            host = rng.choice(HOSTS)
            env = envs[HOSTS.index(host)]
            os.kill(pids[host], signal.SIGKILL)
            wait_for(lambda h=host: not pid_alive(pids[h]), what=f"{host} killed")
            kills.append((host, time.time()))
            if k == KILLS // 2:
                pg.restart_immediate()
            pids[host] = env.start()
        for thread in producers:
            thread.join(120)
        assert not errors, errors

        expected = {
            host: {
                text_of(c, s)
                for c in range(CONVERSATIONS)
                if c % len(HOSTS) == i
                for s in range(PER_CONVERSATION)
            }
            for i, host in enumerate(HOSTS)
        }

        def answers(env: AgentEnv) -> dict[str, str]:
            out = env.state_dir / "queue" / "outgoing"
            found = [json.loads(p.read_text()) for p in out.glob("*.json")]
            return {reply["messageId"]: reply["message"] for reply in found}

        def replies(env: AgentEnv) -> list[str]:
            return list(answers(env).values())

        def all_answered() -> bool:
            return sum(len(replies(env)) for env in envs) >= CONVERSATIONS * PER_CONVERSATION

        wait_for(all_answered, timeout=120, interval=0.5, what="600 replies")
        for host, env in zip(HOSTS, envs, strict=True):
            got = replies(env)
            assert sorted(got) == sorted(expected[host]), f"host {host}'s replies"
            queue_dir = env.state_dir / "queue"
            assert os.listdir(queue_dir / "failed") == [], f"host {host}: failed/"
        table = rows(pg_dsn)
        assert len(table) == CONVERSATIONS * PER_CONVERSATION
        assert {r[1] for r in table} == {"done"}  # nothing claimed, nothing failed
        wait_for(lambda: all(r[5] is not None for r in rows(pg_dsn)), what="every reply delivered")
        texts = {k: v for env in envs for k, v in answers(env).items()}
        assert_runs_one_at_a_time_in_order(log, kills, texts)
        for host, env in zip(HOSTS, envs, strict=True):
            assert pid_alive(pids[host])
            assert os.listdir(env.state_dir / "queue" / "processing") == []
            assert not (env.state_dir / "queue-spool.json").exists()
        reclaimed = sum(len(env.events("queue.lease_reclaimed")) for env in envs)
        print(
            f"torture: {len(table)} messages, {len(kills)} kills, {reclaimed} leases reclaimed,"
            f" {sum(r[4] for r in table) - len(table)} extra attempts"
        )
    finally:
        for env in envs:
            env.agentctl("stop")
            env.kill_leftovers()
