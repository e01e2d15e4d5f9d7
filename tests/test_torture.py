"""Torture: 500 messages over 20 conversations, the supervisor kill -9'ed again and again.

At the end every message has exactly one reply or one failed/ entry, and inside each
conversation the replies were produced in message order. Kill points are random but
seeded: the seed is printed, and AGENT_TORTURE_SEED=<seed> replays a run.
"""

import json
import os
import random
import signal
import sys

import pytest

from agent.queue import Queue, new_message
from tests.helpers import pid_alive, pids_with_cmdline, wait_for

pytestmark = pytest.mark.integration

MESSAGES = 500
CONVERSATIONS = 20
KILLS = 15
# The agent echoes the text and the moment it ran: replies of one conversation must
# carry increasing moments in message order.
AGENT_CODE = "import sys, time; print(sys.stdin.read() + '|' + str(time.time_ns()))"


def _finished(queue: Queue) -> int:
    """Messages with their final file: replies and failed entries, not reasons or temp files."""
    return sum(
        1
        for directory in (queue.outgoing, queue.failed)
        for name in os.listdir(directory)
        if name.endswith(".json") and not name.startswith(".")
    )


def test_torture_kill9_supervisor_loses_nothing_and_keeps_order(agent_env, tmp_path):
    seed = int(os.environ.get("AGENT_TORTURE_SEED") or random.SystemRandom().randrange(2**31))
    print(f"torture seed: {seed} (replay with AGENT_TORTURE_SEED={seed})")
    rng = random.Random(seed)
    marker = f"torture-{tmp_path.name}-{seed}"
    agent_env.write_config(
        **{
            "agents.default": {"command": [sys.executable, "-S", "-c", AGENT_CODE, marker]},
            "dispatcher": {"concurrency": 4, "max_attempts": 3, "retry_backoff": 0.05},
        }
    )
    queue = Queue(agent_env.state_dir / "queue")
    queue.ensure_dirs()

    conversation_of = [rng.randrange(CONVERSATIONS) for _ in range(MESSAGES)]
    cuts = sorted(rng.sample(range(1, MESSAGES), KILLS - 1))
    chunks = [range(a, b) for a, b in zip([0, *cuts], [*cuts, MESSAGES], strict=True)]

    pid = agent_env.start()
    kill_log = []
    for chunk in chunks:
        for i in chunk:
            data = new_message(
                "local",
                f"c{conversation_of[i]}:{i}",
                "tester",
                "u1",
                message_id=f"m{i:04d}",
                conversationId=f"c{conversation_of[i]}",
            )
            queue.enqueue(data, name=f"{i:05d}.json")
        # a random moment: once a random share of the open work is finished, mostly
        # while runs are in flight (sometimes at once: during start-up and recovery)
        floor = _finished(queue)
        target = floor + rng.randint(0, max((chunk.stop - floor) * 2 // 3, 0))
        wait_for(
            lambda t=target: _finished(queue) >= t,
            timeout=60,
            interval=0.001,
            what=f"{target} finished",
        )
        os.kill(pid, signal.SIGKILL)
        kill_log.append((chunk.stop, target, _finished(queue)))
        wait_for(lambda p=pid: not pid_alive(p), what="the killed supervisor gone")
        pid = agent_env.start()
    print(f"kills (written, kill target, finished at kill): {kill_log}")
    assert len(kill_log) >= 10

    wait_for(lambda: _finished(queue) >= MESSAGES, timeout=120, what="all messages finished")
    done = agent_env.stop()
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not pids_with_cmdline(marker), what="no agent process left")

    replies = {p.name: json.loads(p.read_text()) for p in queue.outgoing.glob("*.json")}
    failed = {p.name for p in queue.failed.glob("*.json")}
    assert os.listdir(queue.incoming) == [] and os.listdir(queue.processing) == []
    moments: dict[int, list[int]] = {}
    for i in range(MESSAGES):
        name = f"local_m{i:04d}.json"
        assert (name in replies) != (name in failed), f"seed {seed}: {name} reply/failed"
        if name in replies:
            text, moment = replies[name]["message"].rsplit("|", 1)
            assert text == f"c{conversation_of[i]}:{i}", f"seed {seed}: wrong reply for {name}"
            moments.setdefault(conversation_of[i], []).append(int(moment))
    assert len(replies) + len(failed) == MESSAGES, f"seed {seed}: unexpected extra files"
    for conversation, seen in moments.items():
        assert seen == sorted(seen), f"seed {seed}: conversation c{conversation} out of order"
    print(f"replies: {len(replies)}, failed: {len(failed)}")
