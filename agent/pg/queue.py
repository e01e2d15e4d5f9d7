"""The shared queue's operations: the only module with the queue's SQL (docs/scaling.md).

A message row goes queued -> running -> done | failed; running -> queued again on a retry,
a release (graceful stop) or an expired lease. Every change is one statement, guarded by
the state it expects, so two hosts racing for a row cannot both win:
  - enqueue is idempotent on (channel, message_id): a duplicate returns the existing id;
  - claim takes only the HEAD of a conversation (its lowest unfinished id), and only when
    that head is queued and due: a conversation never runs two messages at once, on any
    host, and runs them in id order. Rows are locked FOR UPDATE SKIP LOCKED, so
    concurrent claimers skip each other's rows instead of waiting;
  - a claim is a lease (lease_owner, lease_expires_at) that the holder renews
    (heartbeat); any host may reclaim an expired one (at-least-once runs). A run that
    keeps killing its host fails after max_attempts reclaims (poison isolation);
  - complete stores the reply once: from the lease holder, or (after its lease was
    reclaimed) from whoever ran it while nobody else holds it; any later completion is
    told it lost and changes nothing;
  - retries back off as the dispatcher does: first * 2^(attempts-1), at most cap.
Times are the database's now(), never a host's clock. Every call is one round trip on a
pooled autocommit connection (heartbeat: one transaction of two statements); errors leave
as DatabaseError (agent.pg.connect), never with the connection string.
"""

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.config import Config
from agent.pg.connect import Target, load_target, open_pool, translated
from agent.pg.migrate import ensure_schema

MESSAGE_COLUMNS = (
    "id, channel, message_id, conversation, agent, payload, state, attempts, run_after,"
    " lease_owner, lease_expires_at, reply, reply_host, origin_host, error"
)


@dataclass(frozen=True)
class NewMessage:
    channel: str
    message_id: str
    conversation: str  # conversation_key(): messages with one key run in order, one at a time
    payload: dict[str, Any]
    agent: str | None = None
    origin_host: str | None = None  # a local producer that waits for the reply


@dataclass(frozen=True)
class Enqueued:
    id: int
    created: bool  # False: (channel, message_id) was already queued; nothing was added


@dataclass(frozen=True)
class QueuedMessage:
    id: int
    channel: str
    message_id: str
    conversation: str
    agent: str | None
    payload: dict[str, Any]
    state: str
    attempts: int
    run_after: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    reply: dict[str, Any] | None
    reply_host: str | None
    origin_host: str | None
    error: str | None


@dataclass(frozen=True)
class Completion:
    id: int
    stored: bool  # this call stored the reply; False: it lost (someone else's, or finished)
    state: str  # the message's state after the call
    reply_host: str | None  # whose reply is stored


@dataclass(frozen=True)
class Outcome:
    """What a retry or failure did: held False means the lease was lost, nothing changed."""

    id: int
    held: bool
    state: str | None = None
    attempts: int = 0
    run_after: datetime | None = None


@dataclass(frozen=True)
class Reclaimed:
    id: int
    previous_owner: str
    state: str  # queued (runs again) or failed (max_attempts reached)
    attempts: int


@dataclass(frozen=True)
class HostStats:
    host_id: str
    heartbeat_age_s: float
    in_flight: int  # as the host last reported
    leases: int  # running messages it holds now


@dataclass(frozen=True)
class ClusterStats:
    depth: int  # queued (due or backing off)
    oldest_age_s: float | None  # age of the oldest queued message
    running: int
    failed: int
    hosts: tuple[HostStats, ...]


def conversation_key(channel: str, profile: str | None, conversation: str | None) -> str:
    """agent.messages.Message.conversation as one text: the same triple, the same key."""
    return json.dumps([channel, profile, conversation], ensure_ascii=False)


CLAIM = f"""
WITH picked AS (
    SELECT m.id
    FROM messages m
    WHERE m.state = 'queued' AND m.run_after <= now()
      AND NOT EXISTS (
          SELECT 1 FROM messages earlier
          WHERE earlier.conversation = m.conversation
            AND earlier.state IN ('queued', 'running')
            AND earlier.id < m.id)
    ORDER BY m.id
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
)
UPDATE messages m
SET state = 'running', lease_owner = %(host)s,
    lease_expires_at = now() + make_interval(secs => %(lease)s),
    attempts = m.attempts + 1, updated_at = now()
FROM picked
WHERE m.id = picked.id
RETURNING {", ".join(f"m.{c.strip()}" for c in MESSAGE_COLUMNS.split(","))}
"""
# Ready messages are read oldest first (index messages_queued); each is a head when no
# earlier message of its conversation is unfinished (one probe of messages_pending), so
# the cost grows with the ready messages passed over, not with the whole backlog. That
# check reads the statement's snapshot; `m.state = 'queued'` is on the locked row itself,
# so PostgreSQL re-checks it on the newest version of a row another claimer changed
# meanwhile (EvalPlanQual): a head claimed elsewhere is never claimed twice.

HELD = "state = 'running' AND lease_owner = %(host)s"
RELEASE_LEASE = "lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"

COMPLETE = f"""
UPDATE messages
SET state = 'done', reply = %(reply)s, reply_host = %(host)s, error = NULL,
    finished_at = now(), {RELEASE_LEASE}
WHERE id = %(id)s AND (({HELD}) OR (state = 'queued' AND attempts > 0))
RETURNING id
"""

RETRY = f"""
UPDATE messages
SET state = CASE WHEN attempts >= %(max_attempts)s THEN 'failed' ELSE 'queued' END,
    run_after = now() + make_interval(
        secs => least(%(first)s * power(2, greatest(attempts - 1, 0)), %(cap)s)),
    finished_at = CASE WHEN attempts >= %(max_attempts)s THEN now() END,
    error = %(error)s, {RELEASE_LEASE}
WHERE id = %(id)s AND {HELD}
RETURNING id, state, attempts, run_after
"""

FAIL = f"""
UPDATE messages
SET state = 'failed', error = %(error)s, finished_at = now(), {RELEASE_LEASE}
WHERE id = %(id)s AND {HELD}
RETURNING id, state, attempts, run_after
"""

RELEASE = f"""
UPDATE messages
SET state = 'queued', attempts = greatest(attempts - 1, 0), run_after = now(), {RELEASE_LEASE}
WHERE id = ANY(%(ids)s) AND {HELD}
RETURNING id
"""

RENEW = f"""
UPDATE messages
SET lease_expires_at = now() + make_interval(secs => %(lease)s), updated_at = now()
WHERE id = ANY(%(ids)s) AND {HELD}
RETURNING id
"""

RECLAIM = f"""
WITH expired AS (
    SELECT id, lease_owner FROM messages
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE messages m
SET state = CASE WHEN m.attempts >= %(max_attempts)s THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN m.attempts >= %(max_attempts)s THEN now() END,
    error = 'lease of ' || expired.lease_owner || ' expired (attempt ' || m.attempts || ')',
    run_after = now(), {RELEASE_LEASE}
FROM expired
WHERE m.id = expired.id AND m.state = 'running' AND m.lease_expires_at < now()
RETURNING m.id, expired.lease_owner, m.state, m.attempts
"""

RECLAIM_OWN = f"""
UPDATE messages
SET state = CASE WHEN attempts >= %(max_attempts)s THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN attempts >= %(max_attempts)s THEN now() END,
    error = 'host ' || lease_owner || ' restarted (attempt ' || attempts || ')',
    run_after = now(), {RELEASE_LEASE}
WHERE state = 'running' AND lease_owner = %(host)s
RETURNING id, %(host)s, state, attempts
"""

REGISTER = """
INSERT INTO hosts (host_id, started_at, heartbeat_at, in_flight, version)
VALUES (%(host)s, now(), now(), 0, %(version)s)
ON CONFLICT (host_id) DO UPDATE
SET started_at = now(), heartbeat_at = now(), in_flight = 0, version = EXCLUDED.version
"""

HEARTBEAT = """
INSERT INTO hosts (host_id, in_flight) VALUES (%(host)s, %(in_flight)s)
ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = now(), in_flight = EXCLUDED.in_flight
"""

STATS = """
SELECT count(*) FILTER (WHERE state = 'queued'),
       extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'queued'))::float8,
       count(*) FILTER (WHERE state = 'running'),
       count(*) FILTER (WHERE state = 'failed')
FROM messages WHERE state IN ('queued', 'running', 'failed')
"""

UNDELIVERED = f"""
SELECT {MESSAGE_COLUMNS} FROM messages
WHERE origin_host = %(host)s AND state IN ('done', 'failed') AND delivered_at IS NULL
ORDER BY id
LIMIT %(limit)s
"""

DELIVERED = """
UPDATE messages SET delivered_at = now()
WHERE id = ANY(%(ids)s) AND delivered_at IS NULL AND state IN ('done', 'failed')
"""

HOST_STATS = """
SELECT h.host_id, extract(epoch FROM now() - h.heartbeat_at)::float8, h.in_flight,
       (SELECT count(*) FROM messages m WHERE m.state = 'running' AND m.lease_owner = h.host_id)
FROM hosts h ORDER BY h.host_id
"""


class PgQueue:
    """The queue operations on a connection pool (agent.pg.connect.open_pool)."""

    def __init__(self, pool: Any, target: Target):
        self.pool = pool
        self.target = target

    @contextmanager
    def _conn(self, doing: str) -> Iterator[Any]:
        with translated(self.target, doing), self.pool.connection() as conn:
            yield conn

    def _rows(self, doing: str, sql: str, params: dict[str, Any], record: Any = None) -> list:
        from psycopg.rows import class_row, tuple_row

        factory = class_row(record) if record else tuple_row
        with self._conn(doing) as conn, conn.cursor(row_factory=factory) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def close(self) -> None:
        self.pool.close()

    # ---- producers

    def enqueue(self, message: NewMessage) -> Enqueued:
        """Add the message unless (channel, message_id) is there already (in any state)."""
        from psycopg.types.json import Jsonb

        params = {
            "channel": message.channel,
            "message_id": message.message_id,
            "conversation": message.conversation,
            "agent": message.agent,
            "payload": Jsonb(message.payload),
            "origin": message.origin_host,
        }
        with self._conn("enqueue") as conn:
            row = conn.execute(
                "INSERT INTO messages (channel, message_id, conversation, agent, payload,"
                " origin_host) VALUES (%(channel)s, %(message_id)s, %(conversation)s,"
                " %(agent)s, %(payload)s, %(origin)s)"
                " ON CONFLICT (channel, message_id) DO NOTHING RETURNING id",
                params,
            ).fetchone()
            if row:
                return Enqueued(row[0], True)
            row = conn.execute(  # a new statement: sees the row the conflict waited for
                "SELECT id FROM messages WHERE channel = %(channel)s"
                " AND message_id = %(message_id)s",
                params,
            ).fetchone()
            return Enqueued(row[0], False)

    # ---- a host running messages

    def claim(self, host: str, lease_seconds: float, limit: int = 1) -> list[QueuedMessage]:
        """Up to `limit` conversation heads, oldest first, now leased to `host`."""
        params = {"host": host, "lease": lease_seconds, "limit": limit}
        rows = self._rows("claim", CLAIM, params, QueuedMessage)
        return sorted(rows, key=lambda m: m.id)

    def renew(self, host: str, ids: Sequence[int], lease_seconds: float) -> set[int]:
        """Extend the leases `host` still holds among ids; the ids returned are held."""
        params = {"host": host, "ids": list(ids), "lease": lease_seconds}
        return {row[0] for row in self._rows("renew leases", RENEW, params)}

    def complete(self, message_id: int, host: str, reply: dict[str, Any]) -> Completion:
        from psycopg.types.json import Jsonb

        params = {"id": message_id, "host": host, "reply": Jsonb(reply)}
        with self._conn("complete") as conn:
            if conn.execute(COMPLETE, params).fetchone():
                return Completion(message_id, True, "done", host)
            row = conn.execute(
                "SELECT state, reply_host FROM messages WHERE id = %(id)s", params
            ).fetchone()
        state, reply_host = row if row else ("missing", None)
        return Completion(message_id, False, state, reply_host)

    def retry(
        self,
        message_id: int,
        host: str,
        error: str,
        max_attempts: int,
        first: float,
        cap: float,
    ) -> Outcome:
        """A failed run: queued again after first * 2^(attempts-1) s (at most cap), or
        failed once attempts reached max_attempts. Only from the lease holder."""
        params = {"id": message_id, "host": host, "error": error}
        params.update(max_attempts=max_attempts, first=first, cap=cap)
        return self._outcome(message_id, "record a retry", RETRY, params)

    def fail(self, message_id: int, host: str, reason: str) -> Outcome:
        """Failed for good (an invalid message, an unknown agent): never retried."""
        params = {"id": message_id, "host": host, "error": reason}
        return self._outcome(message_id, "record a failure", FAIL, params)

    def _outcome(self, message_id: int, doing: str, sql: str, params: dict) -> Outcome:
        rows = self._rows(doing, sql, params)
        if not rows:
            return Outcome(message_id, False)
        _, state, attempts, run_after = rows[0]
        return Outcome(message_id, True, state, attempts, run_after)

    def release(self, host: str, ids: Sequence[int]) -> set[int]:
        """A graceful stop: the runs cut short go back to the queue, not counted as attempts."""
        params = {"host": host, "ids": list(ids)}
        return {row[0] for row in self._rows("release leases", RELEASE, params)}

    def reclaim_expired(self, max_attempts: int, limit: int = 100) -> list[Reclaimed]:
        """Take back the expired leases of any host (run by every host, now and then)."""
        params = {"max_attempts": max_attempts, "limit": limit}
        return [Reclaimed(*row) for row in self._rows("reclaim leases", RECLAIM, params)]

    # ---- replies for local producers (the origin host writes them into its queue/)

    def undelivered(self, host: str, limit: int = 100) -> list[QueuedMessage]:
        """Finished messages of `host`'s own producers whose outcome it has not written yet."""
        params = {"host": host, "limit": limit}
        return self._rows("read replies to deliver", UNDELIVERED, params, QueuedMessage)

    def mark_delivered(self, ids: Sequence[int]) -> None:
        with self._conn("mark replies delivered") as conn:
            conn.execute(DELIVERED, {"ids": list(ids)})

    def reclaim_own(self, host: str, max_attempts: int) -> list[Reclaimed]:
        """At start: leases `host` holds belong to its previous life (a crash): they are
        taken back at once instead of after their expiry. host_id must be unique."""
        params = {"host": host, "max_attempts": max_attempts}
        return [Reclaimed(*row) for row in self._rows("reclaim own leases", RECLAIM_OWN, params)]

    # ---- hosts and the cluster

    def register_host(self, host: str, version: str | None = None) -> None:
        with self._conn("register host") as conn:
            conn.execute(REGISTER, {"host": host, "version": version})

    def heartbeat(self, host: str, running: Sequence[int], lease_seconds: float) -> set[int]:
        """The host is alive with these runs: its row and their leases, in one transaction.
        Returns the ids still held (a run not among them was reclaimed: it lost)."""
        params = {"host": host, "in_flight": len(running), "ids": list(running)}
        params["lease"] = lease_seconds
        with self._conn("heartbeat") as conn, conn.transaction():
            conn.execute(HEARTBEAT, params)
            return {row[0] for row in conn.execute(RENEW, params).fetchall()}

    def stats(self) -> ClusterStats:
        with self._conn("read queue stats") as conn:
            depth, oldest, running, failed = conn.execute(STATS).fetchone()
            hosts = tuple(HostStats(*row) for row in conn.execute(HOST_STATS).fetchall())
        return ClusterStats(depth, oldest, running, failed, hosts)

    def get(self, message_id: int) -> QueuedMessage | None:
        rows = self._rows(
            "read a message",
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %(id)s",
            {"id": message_id},
            QueuedMessage,
        )
        return rows[0] if rows else None


def open_queue(config: Config, application: str = "agent") -> PgQueue:
    """The configured queue, its schema made current (auto_migrate) or checked."""
    settings = config.queue.postgres
    target = load_target(config)
    ensure_schema(target, settings)
    return PgQueue(open_pool(target, settings, application), target)
