#!/usr/bin/env python3
"""Queue benchmark: messages per second end to end, and pickup latency.

A real supervisor (standalone, JSON-lines log) with `cat` as the agent command, on a
throw-away state_dir on the real disk, so every queue move is fsync'ed (durable).

  throughput  N messages over C conversations written into incoming/ as fast as the
              producer can, until every reply is in outgoing/: messages/s
  pickup      one message at a time on an idle queue: from the rename into incoming/
              to the rename out of it (the claim), seen through inotify (median and p99)

    python bench/bench_queue.py [--messages 2000] [--conversations 50] [--pickups 200]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inotify_simple import INotify, flags

from agent.queue import Queue, new_message

TARGET_RATE = 150.0  # messages/s
TARGET_PICKUP_MS = 20.0  # median


def agentctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True, check=False
    )


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.0005)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pickups", type=int, default=200)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="agent-bench-queue-", dir="/var/tmp"))
    state = root / "state"
    (root / "agent.toml").write_text(
        f'state_dir = "{state}"\n[logging]\nsink = "file"\n'
        f'[agents.default]\ncommand = ["cat"]\n[dispatcher]\nconcurrency = {args.concurrency}\n'
    )
    env = {**os.environ, "AGENT_CONFIG": str(root / "agent.toml"), "AGENT_MANAGER": "standalone"}
    env.pop("AGENT_FAULT_INJECT", None)
    queue = Queue(state / "queue")
    queue.ensure_dirs()
    done = agentctl(env, "start")
    if done.returncode != 0:
        raise SystemExit(f"bench: start failed: {done.stderr}")
    try:
        # ---- throughput
        began = time.perf_counter()
        for i in range(args.messages):
            data = new_message(
                "bench", f"message {i}", "bench", "b", message_id=f"t{i}",
                conversationId=f"c{i % args.conversations}",
            )  # fmt: skip
            queue.enqueue(data, name=f"t{i:06d}.json")
        wait_until(lambda: len(os.listdir(queue.outgoing)) >= args.messages, 600, "all replies")
        elapsed = time.perf_counter() - began
        rate = args.messages / elapsed

        # ---- pickup latency on an idle queue: the claim is the rename out of incoming/,
        # seen through inotify (IN_MOVED_FROM) so the measurement adds no polling delay
        watch = INotify()
        watch.add_watch(queue.incoming, flags.MOVED_FROM)
        pickups = []
        for i in range(args.pickups):
            data = new_message("bench", "ping", "bench", "b", message_id=f"p{i}")
            staged = queue.tmp / f"p{i}.json"
            with open(staged, "w") as handle:
                handle.write(json.dumps(data))
                handle.flush()
                os.fsync(handle.fileno())
            sent = time.perf_counter()
            os.rename(staged, queue.incoming / f"p{i}.json")
            while not any(e.name == f"p{i}.json" for e in watch.read(timeout=30_000)):
                pass
            pickups.append((time.perf_counter() - sent) * 1000)
            reply = queue.outgoing / f"bench_p{i}.json"
            wait_until(reply.exists, 30, f"reply p{i}")  # idle again before the next one
        watch.close()
    finally:
        agentctl(env, "stop")
    median, p99 = statistics.median(pickups), percentile(pickups, 0.99)
    print(
        f"throughput: {args.messages} messages, {args.conversations} conversations, "
        f"concurrency {args.concurrency}, cat, durable (fsync) writes"
    )
    print(f"  {rate:.0f} messages/s in {elapsed:.2f}s  (target >= {TARGET_RATE:.0f}: "
          f"{rate / TARGET_RATE:.2f}x)")  # fmt: skip
    print(f"pickup latency (rename into incoming/ -> claimed), {len(pickups)} messages, idle:")
    print(f"  median {median:.1f} ms (target < {TARGET_PICKUP_MS:.0f}: "
          f"{median / TARGET_PICKUP_MS:.2f} of target), p99 {p99:.1f} ms")  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    return 0 if rate >= TARGET_RATE and median < TARGET_PICKUP_MS else 1


if __name__ == "__main__":
    sys.exit(main())
