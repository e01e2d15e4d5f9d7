"""This host's side of the shared queue: what it holds, and every call it makes to it.

One PgHost per supervisor process (pg_host_for), shared by the queue worker (its loop:
ingress, claims, lease renewal, reclaims, the reply pump, the spool) and the dispatcher
(its run threads: the outcome of each run). Invariants:
  - `held` is the ids this host claimed and has not recorded an outcome for; only those
    are renewed (heartbeat), and a graceful stop releases them;
  - `lost` is the ids whose lease the database says this host no longer holds: their run
    must not deliver (and cannot: the reply pump writes only what the database stored,
    and complete() stores a reply once);
  - a call that fails marks the database down (one `queue.db.down` event, health
    degraded) until a call succeeds again (`queue.db.up`); while it is down the loop
    probes it at most every DOWN_RETRY seconds, so the worker keeps beating;
  - an outcome the database cannot take now goes to the spool (agent/pg/spool.py) and is
    written when it answers again: no reply is lost to an outage.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.clock import iso_utc
from agent.config import Config
from agent.errors import DatabaseError
from agent.log import event
from agent.messages import ATTEMPTS, Message, fingerprint
from agent.pg.connect import host_id
from agent.pg.spool import COMPLETE, FAIL, RETRY, Pending, Spool
from agent.ratelimit import RepeatLimiter

T = TypeVar("T")
DOWN_RETRY = 1.0  # seconds between probes of a database that is down
POOL_LOGGER = "psycopg.pool"


@dataclass
class DbMessage(Message):
    """A message claimed from the shared queue: `row_id` is its id there."""

    row_id: int = 0


@dataclass(frozen=True)
class Ingested:
    id: int
    created: bool
    same: bool  # False: (channel, messageId) holds another message (a duplicate id)


class PgHost:
    def __init__(self, config: Config):
        self.config = config
        self.settings = config.queue.postgres
        self.host = host_id(self.settings)
        self.lease = self.settings.lease
        self.spool = Spool(config.state_dir)
        self.queue: Any = None  # agent.pg.queue.PgQueue once connected
        self.held: set[int] = set()
        self.lost: set[int] = set()
        self.unmarked: set[int] = set()  # replies written into queue/, not marked delivered
        self.down: str | None = "not connected yet"
        self.down_since: float | None = time.monotonic()
        self.next_try = 0.0
        self.stats: Any = None  # ClusterStats of the last stats() call
        self.stats_latency_ms: float | None = None  # its round trip
        self.stats_at = 0.0  # wall clock time of it
        self._lock = threading.Lock()

    # ---- the connection

    @property
    def up(self) -> bool:
        return self.down is None

    def connect(self) -> bool:
        """Open the pool (schema made current or checked) once; True when connected.
        A DatabaseError marks it down; SchemaMismatch and ConfigError propagate (fatal)."""
        if self.queue is not None:
            return True
        from agent import __version__
        from agent.pg.queue import open_queue

        try:
            queue = open_queue(self.config, f"agent {self.host}")
            queue.register_host(self.host, __version__)
            # what this host_id holds now was claimed by a previous life of this process
            # (nothing is claimed before connect): runnable again at once
            taken = queue.reclaim_own(self.host, self.config.dispatcher.max_attempts)
        except DatabaseError as exc:
            self._went_down(str(exc))
            return False
        self.queue = queue
        self._went_up()
        self._report_reclaimed(taken)
        return True

    def due(self) -> bool:
        """May the loop call the database now? (always while up; every DOWN_RETRY when down)"""
        return self.up or time.monotonic() >= self.next_try

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(queue, *args); a DatabaseError marks the database down and propagates."""
        if self.queue is None and not self.connect():
            raise DatabaseError(self.down or "queue database not connected")
        try:
            result = fn(self.queue, *args)
        except DatabaseError as exc:
            self._went_down(str(exc))
            raise
        if self.down is not None:
            self._went_up()
        return result

    def _went_down(self, reason: str) -> None:
        with self._lock:
            was_up, self.down = self.down is None, reason
            self.next_try = time.monotonic() + DOWN_RETRY
            if was_up:
                self.down_since = time.monotonic()
        if was_up:
            event(
                "queue.db.down",
                f"queue database unreachable: {reason}; incoming messages wait in incoming/",
                worker="queue",
                level=logging.ERROR,
                error=reason,
            )

    def _went_up(self) -> None:
        with self._lock:
            was_down, self.down, self.down_since = self.down is not None, None, None
        if was_down:
            event("queue.db.up", f"queue database {self._shown()} answers", worker="queue")

    def _shown(self) -> str:
        return self.queue.target.shown if self.queue is not None else "(not connected)"

    # ---- the queue worker's loop

    def ingest(self, message: Message) -> Ingested:
        """Insert a message of a local producer (origin_host = this host), idempotently."""
        from agent.pg.queue import NewMessage, conversation_key

        new = NewMessage(
            message.channel,
            message.message_id,
            conversation_key(*message.conversation),
            message.data,
            message.data.get("agent"),
            self.host,
        )
        done = self.call(lambda q: q.enqueue(new))
        if done.created:
            return Ingested(done.id, True, True)
        row = self.call(lambda q: q.get(done.id))
        same = row is not None and fingerprint(row.payload) == message.fingerprint
        return Ingested(done.id, False, same)

    def claim(self, limit: int) -> list[DbMessage]:
        rows = self.call(lambda q: q.claim(self.host, self.lease, limit))
        with self._lock:
            self.held.update(row.id for row in rows)
        messages = []
        for row in rows:
            data = dict(row.payload)
            data[ATTEMPTS] = max(row.attempts - 1, 0)  # runs before this one
            if row.error:
                data["lastError"] = row.error
            messages.append(DbMessage(f"db-{row.id}", data, row.id))
        return messages

    def heartbeat(self) -> None:
        """Renew the leases of what runs (or waits to run) here; note the ones lost."""
        with self._lock:
            ids = sorted(self.held)
        still = self.call(lambda q: q.heartbeat(self.host, ids, self.lease))
        gone = set(ids) - still
        with self._lock:
            gone &= self.held  # an outcome recorded meanwhile is no loss
            self.held -= gone
            self.lost |= gone
        for message_id in sorted(gone):
            event(
                "queue.lease_lost",
                f"the lease on message {message_id} expired and was taken back: its run here "
                "will not deliver a reply",
                worker="queue",
                level=logging.WARNING,
                row_id=message_id,
            )

    def reclaim(self, max_attempts: int) -> None:
        self._report_reclaimed(self.call(lambda q: q.reclaim_expired(max_attempts)))

    def _report_reclaimed(self, taken: list[Any]) -> None:
        for row in taken:
            event(
                "queue.lease_reclaimed",
                f"message {row.id}: lease of {row.previous_owner} expired; now {row.state}"
                f" (attempt {row.attempts})",
                worker="queue",
                level=logging.WARNING,
                row_id=row.id,
                host=row.previous_owner,
                state=row.state,
                attempts=row.attempts,
            )

    def pump(self, write: Callable[[Any], None], limit: int = 100) -> int:
        """Write each finished message of this host's producers (write(row)), then mark
        them delivered; how many. Written but not marked (the database failed in between):
        remembered, and marked first next time, never written twice. Only a crash in that
        window writes one again (the same name: it overwrites, as a re-run of the file
        queue does)."""
        if self.unmarked:
            self.call(lambda q: q.mark_delivered(sorted(self.unmarked)))
            self.unmarked.clear()
        rows = self.call(lambda q: q.undelivered(self.host, limit))
        written = []
        for row in rows:
            try:
                write(row)
            except OSError:
                break  # the disk: the rest next round
            written.append(row.id)
            self.unmarked.add(row.id)
        if written:
            self.call(lambda q: q.mark_delivered(written))
            self.unmarked.clear()
        return len(written)

    def flush_spool(self) -> int:
        """Write the outcomes kept during an outage; how many the database took."""
        taken = 0
        try:
            for item in self.spool.items():
                self._record(item)
                self.spool.remove(item.id)
                taken += 1
        finally:
            if taken:
                event(
                    "queue.db.flushed",
                    f"wrote {taken} outcome(s) kept during the outage into the queue database",
                    worker="queue",
                    count=taken,
                )
        return taken

    def release(self, ids: list[int]) -> set[int]:
        """A graceful stop: these runs go back to the queue, not counted as attempts."""
        with self._lock:
            ids = [i for i in ids if i in self.held and i not in self.spool.ids()]
            self.held -= set(ids)
        if not ids:
            return set()
        return self.call(lambda q: q.release(self.host, ids))

    def refresh_stats(self) -> None:
        began = time.monotonic()
        stats = self.call(lambda q: q.stats())
        if stats is not None:
            self.stats_latency_ms = round((time.monotonic() - began) * 1000, 1)
            self.stats_at = time.time()
        self.stats = stats

    # ---- outcomes (the dispatcher's run threads)

    def is_current(self, message_id: int) -> bool:
        with self._lock:
            return message_id not in self.lost

    def complete(self, message_id: int, reply: dict[str, Any]) -> str:
        """'stored', 'lost' (another host's reply stands) or 'kept' (spooled)."""
        return self._outcome(Pending(COMPLETE, message_id, reply=reply))

    def retry(
        self, message_id: int, error: str, max_attempts: int, first: float, cap: float
    ) -> str:
        settings = {"max_attempts": max_attempts, "first": first, "cap": cap}
        return self._outcome(Pending(RETRY, message_id, error=error, retry=settings))

    def fail(self, message_id: int, reason: str) -> str:
        return self._outcome(Pending(FAIL, message_id, error=reason))

    def _outcome(self, item: Pending) -> str:
        try:
            held = self._record(item)
        except DatabaseError as exc:
            self.spool.add(item)
            event(
                "queue.db.kept",
                f"message {item.id}: the queue database did not take its outcome ({item.op});"
                " kept on this host until it answers",
                worker="dispatcher",
                level=logging.WARNING,
                row_id=item.id,
                op=item.op,
                error=str(exc),
            )
            return "kept"
        return "stored" if held else "lost"

    def _record(self, item: Pending) -> bool:
        """Write one outcome; True when this host still held the message."""
        if item.op == COMPLETE:
            done = self.call(lambda q: q.complete(item.id, self.host, item.reply))
            held = done.stored
        elif item.op == RETRY:
            r = item.retry
            held = self.call(
                lambda q: q.retry(
                    item.id, self.host, item.error, int(r["max_attempts"]), r["first"], r["cap"]
                )
            ).held
        else:
            held = self.call(lambda q: q.fail(item.id, self.host, item.error)).held
        with self._lock:
            self.held.discard(item.id)
            self.lost.discard(item.id)
        return held

    # ---- health

    def detail(self) -> dict[str, Any]:
        stats = self.stats
        detail: dict[str, Any] = {
            "backend": "postgres",
            "host_id": self.host,
            "db": "ok" if self.up else f"down: {self.down}",
            "held": len(self.held),
            "spooled": len(self.spool),
        }
        if stats is not None:
            detail["cluster_depth"] = stats.depth
            detail["cluster_oldest_s"] = (
                None if stats.oldest_age_s is None else round(stats.oldest_age_s, 1)
            )
            detail["cluster_running"] = stats.running
            detail["cluster_hosts"] = len(stats.hosts)
            detail["db_latency_ms"] = self.stats_latency_ms
            # each host's last heartbeat as a time, so that status can age it from now
            detail["hosts"] = [
                {
                    "host_id": h.host_id,
                    "last_heartbeat": iso_utc(self.stats_at - h.heartbeat_age_s),
                    "in_flight": h.leases,
                }
                for h in stats.hosts
            ]
        return detail


class PoolLogHandler(logging.Handler):
    """psycopg_pool's own warnings (a connection lost, a reconnect failing) as one
    rate-limited `queue.db.pool` event, instead of lines on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.limiter = RepeatLimiter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()[0][:300]
            key = f"pool:{text[:60]}"
            self.limiter.event(
                key, "queue.db.pool", f"connection pool: {text}", logging.WARNING, worker="queue"
            )
        except Exception:  # a log handler never raises into the pool's threads
            pass


_hosts: dict[Path, PgHost] = {}
_hosts_lock = threading.Lock()


def pg_host_for(config: Config) -> PgHost:
    """The one PgHost of this process for a state_dir (the queue worker and the dispatcher
    are built separately; they meet here)."""
    key = Path(config.state_dir).resolve()
    with _hosts_lock:
        if key not in _hosts:
            _route_pool_logs()
            _hosts[key] = PgHost(config)
        return _hosts[key]


def _route_pool_logs() -> None:
    logger = logging.getLogger(POOL_LOGGER)
    if not any(isinstance(h, PoolLogHandler) for h in logger.handlers):
        logger.addHandler(PoolLogHandler())
        logger.setLevel(logging.WARNING)
        logger.propagate = False
