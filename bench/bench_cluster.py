#!/usr/bin/env python3
"""Cluster benchmark: messages per second through real supervisors, `cat` as the agent.

  files      one supervisor on the file queue
  pg x1      one supervisor on the shared PostgreSQL queue
  pg x3      three supervisors (separate state_dirs, one database)

Each run writes --messages messages over --conversations conversations into incoming/
(spread over the hosts' incoming/ for three: each host is the producer of a third) as
fast as the producer can, until every reply is in its producer's outgoing/. State dirs
on the real disk (/var/tmp); the throw-away PostgreSQL 15 (tests/pg.py) with fsync on
(--no-fsync for the tests' setting). The three hosts share this machine's CPUs: the
figure shows the queue's overhead, not what three machines would do.

    python bench/bench_cluster.py [--messages 1500] [--conversations 60] [--concurrency 4]
"""

import argparse
import contextlib
import os
import sys
import time

from benchlib import running_agent, wait_until

from agent.queue import Queue, new_message

REPO_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def config(backend: str, host: str, dsn: str | None, concurrency: int) -> str:
    lines = [
        "[agents.default]",
        'command = ["cat"]',
        "[dispatcher]",
        f"concurrency = {concurrency}",
    ]
    if backend == "postgres":
        lines += [
            "[queue]",
            'backend = "postgres"',
            "[queue.postgres]",
            f'dsn = "{dsn}"',
            f'host_id = "{host}"',
            f"pool_size = {max(4, concurrency + 2)}",
        ]
    return "\n".join(lines) + "\n"


def run(queues: list[Queue], messages: int, conversations: int) -> float:
    """messages/s from the first write to the last reply."""
    began = time.perf_counter()
    for i in range(messages):
        c = i % conversations
        data = new_message(
            "local", f"message {i}", "bench", "b", message_id=f"t{i}", conversationId=f"c{c}"
        )
        queues[c % len(queues)].enqueue(data, name=f"t{i:06d}.json")

    def replied() -> bool:
        return sum(len(os.listdir(q.outgoing)) for q in queues) >= messages

    wait_until(replied, 600, "all replies", 0.002)
    return messages / (time.perf_counter() - began)


def scenario(label: str, hosts: int, args: argparse.Namespace, dsn: str | None) -> float:
    backend = "files" if dsn is None else "postgres"
    with contextlib.ExitStack() as stack:
        agents = [
            stack.enter_context(
                running_agent(f"cluster-{h}", config(backend, f"h{h}", dsn, args.concurrency))
            )
            for h in range(hosts)
        ]
        rate = run([a.queue for a in agents], args.messages, args.conversations)
    print(f"{label:<10} {rate:8.1f} msg/s  ({args.messages} messages, {hosts} host(s))")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(REPO_TESTS))
    from tests.pg import PgCluster

    print(
        f"cat agent, {args.conversations} conversations, concurrency {args.concurrency} per host,"
        f" postgres fsync {'off' if args.no_fsync else 'on'}"
    )
    scenario("files", 1, args, None)
    cluster = PgCluster.create(prefix="agent-bench-pg-", durable=not args.no_fsync)
    try:
        scenario("pg x1", 1, args, cluster.dsn(cluster.create_database()))
        scenario("pg x3", 3, args, cluster.dsn(cluster.create_database()))
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
