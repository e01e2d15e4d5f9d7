#!/usr/bin/env python3
"""Shared PostgreSQL queue benchmark (agent/pg/queue.py): claim latency and throughput.

Starts a throw-away PostgreSQL 15 cluster of its own (tests/pg.py: unix socket in a temp
directory, removed at the end), fsync ON by default (what a commit really costs on this
disk; --no-fsync for the tests' setting), and the schema through the real migrations.

  claim       a backlog of --backlog messages over --conversations conversations; one
              claim(limit=1) + complete at a time, each claim timed (p50, p99)
  throughput  1 and 3 concurrent clients (each its own host_id and pool), each doing
              enqueue -> claim -> complete in a loop: messages/s over all clients

    python bench/bench_pg_queue.py [--backlog 2000] [--conversations 200]
                                   [--messages 1500] [--no-fsync]
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import PostgresConfig  # noqa: E402
from agent.pg.connect import make_target, open_pool  # noqa: E402
from agent.pg.migrate import ensure_schema  # noqa: E402
from agent.pg.queue import NewMessage, PgQueue, conversation_key  # noqa: E402
from tests.pg import PgCluster  # noqa: E402

TARGET_CLAIM_P50_MS = 5.0
TARGET_RATE = 200.0  # messages/s, one host
LEASE = 60.0
SETTINGS = PostgresConfig()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)]


def message(tag: str, n: int, conversations: int) -> NewMessage:
    conv = conversation_key("bench", None, f"c{n % conversations}")
    return NewMessage("bench", f"{tag}.{n}", conv, {"message": f"hello {n}", "sender": "b"})


def open_queue(cluster: PgCluster, dbname: str, size: int = 2) -> PgQueue:
    target = make_target(cluster.dsn(dbname), "bench")
    ensure_schema(target, SETTINGS)
    return PgQueue(open_pool(target, SETTINGS, "bench", size=size), target)


def claim_latency(cluster: PgCluster, backlog: int, conversations: int) -> list[float]:
    queue = open_queue(cluster, cluster.create_database())
    try:
        for n in range(backlog):
            queue.enqueue(message("lat", n, conversations))
        timings = []
        for _ in range(backlog):
            began = time.perf_counter()
            claimed = queue.claim("bench-host", LEASE, limit=1)
            timings.append((time.perf_counter() - began) * 1000)
            for item in claimed:
                queue.complete(item.id, "bench-host", {"message": "ok"})
        return timings
    finally:
        queue.close()


def throughput(cluster: PgCluster, clients: int, messages: int, conversations: int) -> float:
    dbname = cluster.create_database()
    queues = [open_queue(cluster, dbname) for _ in range(clients)]
    per_client = messages // clients
    done = [0] * clients

    def client(k: int) -> None:
        queue, host = queues[k], f"host-{k}"
        for n in range(per_client):
            queue.enqueue(message(f"t{k}", n * clients + k, conversations))
            for item in queue.claim(host, LEASE, limit=1):
                if queue.complete(item.id, host, {"message": "ok"}).stored:
                    done[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drain = queues[0]  # messages another client's claim skipped (its head was busy)
    while item := drain.claim("drain", LEASE, limit=50):
        for one in item:
            done[0] += drain.complete(one.id, "drain", {"message": "ok"}).stored
    elapsed = time.perf_counter() - began
    for queue in queues:
        queue.close()
    assert sum(done) == per_client * clients, f"{sum(done)} of {per_client * clients} done"
    return sum(done) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()

    cluster = PgCluster.create(prefix="agent-bench-pg-", durable=not args.no_fsync)
    try:
        print(f"PostgreSQL 15, unix socket, fsync {'off' if args.no_fsync else 'on'}")
        timings = claim_latency(cluster, args.backlog, args.conversations)
        p50, p99 = statistics.median(timings), percentile(timings, 0.99)
        print(
            f"claim latency, backlog {args.backlog} over {args.conversations} conversations:"
            f" p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(timings):.2f} ms"
            f" (goal p50 < {TARGET_CLAIM_P50_MS:.0f} ms: {'ok' if p50 < 5 else 'MISSED'})"
        )
        for clients in (1, 3):
            rate = throughput(cluster, clients, args.messages, args.conversations)
            goal = f" (goal > {TARGET_RATE:.0f}: {'ok' if rate > TARGET_RATE else 'MISSED'})"
            print(
                f"enqueue+claim+complete, {clients} client{'s' if clients > 1 else ''}:"
                f" {rate:.0f} messages/s{goal if clients == 1 else ''}"
            )
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
