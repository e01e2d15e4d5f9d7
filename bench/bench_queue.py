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
import statistics
import sys
import time

from benchlib import running_agent, wait_until
from inotify_simple import INotify, flags

from agent.queue import Queue, new_message

TARGET_RATE = 150.0  # messages/s
TARGET_PICKUP_MS = 20.0  # median


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)]


def throughput(queue: Queue, messages: int, conversations: int) -> tuple[float, float]:
    """messages/s and seconds for `messages` written as fast as possible, until replied."""
    began = time.perf_counter()
    for i in range(messages):
        data = new_message(
            "bench", f"message {i}", "bench", "b", message_id=f"t{i}",
            conversationId=f"c{i % conversations}",
        )  # fmt: skip
        queue.enqueue(data, name=f"t{i:06d}.json")
    wait_until(lambda: len(os.listdir(queue.outgoing)) >= messages, 600, "all replies", 0.0005)
    elapsed = time.perf_counter() - began
    return messages / elapsed, elapsed


def pickup_latency(queue: Queue, count: int) -> list[float]:
    """Milliseconds from the rename into incoming/ to the claim (the rename out of it),
    seen through inotify (IN_MOVED_FROM), one message at a time on an idle queue."""
    watch = INotify()
    watch.add_watch(queue.incoming, flags.MOVED_FROM)
    pickups = []
    for i in range(count):
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
        wait_until(reply.exists, 30, f"reply p{i}", 0.0005)  # idle again before the next
    watch.close()
    return pickups


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pickups", type=int, default=200)
    args = parser.parse_args()

    config = (
        '[logging]\nsink = "file"\n[agents.default]\ncommand = ["cat"]\n'
        f"[dispatcher]\nconcurrency = {args.concurrency}\n"
    )
    with running_agent("queue", config) as agent:
        rate, elapsed = throughput(agent.queue, args.messages, args.conversations)
        pickups = pickup_latency(agent.queue, args.pickups)
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
    return 0 if rate >= TARGET_RATE and median < TARGET_PICKUP_MS else 1


if __name__ == "__main__":
    sys.exit(main())
