"""The Slack worker's memory in the queue database: the only module with its SQL.

With [queue] backend = "postgres" several hosts run the same Slack profile (Slack spreads
one app's envelopes over all its Socket Mode connections and retries on any of them), so
what slack_store keeps in files per host is kept here, shared (docs/scaling.md, "Slack
across hosts"):

  - dedupe keys (slack_events): one row per Slack message taken in, keyed
    `<channel>/<ts>`; Slack's event_id is no key, since one message arrives as two events
    (message and app_mention) and a backfill has none. A key is inserted in the SAME
    transaction that enqueues the message and writes its route (PgCursors.settle): a
    second host inserting the same key waits on the unique index until the first commits
    (then it finds the key: a duplicate) or rolls back (then it enqueues). A crash between
    the enqueue and the commit rolls the key back: it costs a duplicate, never a loss;
  - cursors (slack_cursors): the newest ts per channel, and the threads the bot follows
    with their followers (jsonb). pinned_ts is the pin before a backfill, persisted (a
    crash in the middle of a backfill leaves it, and the next backfill starts there);
    the cursor itself only ever moves forward;
  - a backfill turn per (profile, channel): a session advisory lock held on one pooled
    connection while that channel is backfilled, so one host at a time does it (another
    finds it busy and tries later); a dying host's lock goes with its connection;
  - routes (slack_routes) and reply claims (slack_reply_posts): a reply is claimed
    (insert-if-absent, with a lease) before its first post and marked posted after, so
    two hosts never both post it. What remains: a host that dies after Slack accepted a
    post and before it recorded it; its claim expires and the reply is posted again.

Everything runs on the pool's autocommit connections; errors leave as DatabaseError
(agent.pg.connect), never with the connection string. The inbox (events acknowledged,
not enqueued yet) stays on the host's disk: it is that host's promise to itself.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from agent.config import Config
from agent.pg.connect import Target, host_id, load_target, open_pool, translated
from agent.pg.migrate import ensure_schema
from agent.slack_cursors import Cursors
from agent.slack_store import (
    POST_BUSY,
    POST_MINE,
    POST_POSTED,
    ROUTE_MAX_AGE,
    THREAD_LIMIT,
    ProfileStore,
    ts_key,
)

POST_LEASE = 300.0  # seconds a claim on a reply holds before another host may take it over

CLAIM_POST = """
INSERT INTO slack_reply_posts AS p (profile, message_id, claimed_by, lease_expires_at)
VALUES (%(profile)s, %(message_id)s, %(host)s, now() + make_interval(secs => %(lease)s))
ON CONFLICT (profile, message_id) DO UPDATE
SET claimed_by = excluded.claimed_by, claimed_at = now(),
    lease_expires_at = excluded.lease_expires_at
WHERE p.posted_at IS NULL AND (p.claimed_by = excluded.claimed_by OR p.lease_expires_at < now())
RETURNING claimed_by
"""

MOVE_CURSOR = """
INSERT INTO slack_cursors AS c (profile, channel, cursor_ts) VALUES (%s, %s, %s)
ON CONFLICT (profile, channel) DO UPDATE SET cursor_ts = excluded.cursor_ts, updated_at = now()
WHERE c.cursor_ts IS NULL OR c.cursor_ts::numeric < excluded.cursor_ts::numeric
"""


class PgSlack:
    """The database side of one Slack worker: a pool and this host's id."""

    def __init__(self, pool: Any, target: Target, host: str):
        self.pool = pool
        self.target = target
        self.host = host
        self._tx = threading.local()  # the connection of a transaction open in this thread

    @contextmanager
    def conn(self, doing: str) -> Iterator[Any]:
        """A pooled connection; inside PgCursors.settle, that transaction's own one (so the
        route written while enqueueing commits or rolls back with its dedupe key)."""
        current = getattr(self._tx, "conn", None)
        if current is not None:
            yield current
            return
        with translated(self.target, doing), self.pool.connection() as conn:
            yield conn

    @contextmanager
    def transaction(self, doing: str) -> Iterator[Any]:
        previous = getattr(self._tx, "conn", None)
        with self.conn(doing) as conn, translated(self.target, doing), conn.transaction():
            self._tx.conn = conn
            try:
                yield conn
            finally:
                self._tx.conn = previous

    def profile(self, state_dir: Any, name: str) -> tuple["PgProfileStore", "PgCursors"]:
        store = PgProfileStore(self, state_dir, name)
        return store, PgCursors(store, name)

    def close(self) -> None:
        self.pool.close()


def open_pg_slack(config: Config) -> PgSlack:
    """The configured database for the Slack worker, its schema made current or checked."""
    settings = config.queue.postgres
    target = load_target(config)
    ensure_schema(target, settings)
    pool = open_pool(target, settings, "agent slack")
    return PgSlack(pool, target, host_id(settings))


class PgProfileStore(ProfileStore):
    """slack_store.ProfileStore with routes, reply claims and backfill turns in the
    database; the inbox stays in the host's files (the parent's)."""

    def __init__(self, db: PgSlack, state_dir: Any, profile: str):
        super().__init__(state_dir, profile)
        self.db = db
        self.profile = profile

    def prepare(self) -> None:
        self.inbox_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.prune_routes()

    # ---- routes

    def write_route(self, ts: str, channel: str, thread_ts: str, **extra: Any) -> None:
        from psycopg.types.json import Jsonb

        with self.db.conn("write a Slack route") as conn:
            conn.execute(
                "INSERT INTO slack_routes (profile, message_id, channel, thread_ts, fields)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (profile, message_id) DO UPDATE"
                " SET channel = excluded.channel, thread_ts = excluded.thread_ts,"
                " fields = excluded.fields, created_at = now()",
                (self.profile, ts, channel, thread_ts, Jsonb(extra)),
            )

    def update_route(self, ts: str, **fields: Any) -> None:
        from psycopg.types.json import Jsonb

        with self.db.conn("update a Slack route") as conn:
            conn.execute(
                "UPDATE slack_routes SET fields = fields || %s"
                " WHERE profile = %s AND message_id = %s",
                (Jsonb(fields), self.profile, ts),
            )

    def route(self, ts: str) -> dict[str, Any] | None:
        with self.db.conn("read a Slack route") as conn:
            row = conn.execute(
                "SELECT channel, thread_ts, fields, extract(epoch FROM created_at)"
                " FROM slack_routes WHERE profile = %s AND message_id = %s",
                (self.profile, ts),
            ).fetchone()
        if row is None:
            return None
        channel, thread_ts, fields, created = row
        extra = fields if isinstance(fields, dict) else {}
        return {**extra, "channel": channel, "thread_ts": thread_ts, "created": float(created)}

    def drop_route(self, ts: str) -> None:
        with self.db.conn("drop a Slack route") as conn:
            conn.execute(
                "DELETE FROM slack_routes WHERE profile = %s AND message_id = %s",
                (self.profile, ts),
            )

    def prune_routes(self, now: float | None = None) -> None:
        """Routes, dedupe keys and reply claims older than ROUTE_MAX_AGE (any profile's:
        the clock is the database's)."""
        age = f"{int(ROUTE_MAX_AGE)} seconds"
        with self.db.conn("prune Slack routes") as conn:
            conn.execute("DELETE FROM slack_routes WHERE created_at < now() - %s::interval", (age,))
            conn.execute(
                "DELETE FROM slack_events WHERE received_at < now() - %s::interval", (age,)
            )
            conn.execute(
                "DELETE FROM slack_reply_posts WHERE claimed_at < now() - %s::interval", (age,)
            )

    # ---- replies: one host posts each, once

    def claim_post(self, message_id: str) -> str:
        params = {
            "profile": self.profile,
            "message_id": message_id,
            "host": self.db.host,
            "lease": POST_LEASE,
        }
        with self.db.conn("claim a Slack reply") as conn:
            if conn.execute(CLAIM_POST, params).fetchone() is not None:
                return POST_MINE
            row = conn.execute(
                "SELECT posted_at IS NOT NULL FROM slack_reply_posts"
                " WHERE profile = %s AND message_id = %s",
                (self.profile, message_id),
            ).fetchone()
        return POST_POSTED if row is not None and row[0] else POST_BUSY

    def record_post(self, message_id: str, slack_ts: str | None) -> None:
        with self.db.conn("record a Slack reply") as conn:
            conn.execute(
                "UPDATE slack_reply_posts SET posted_at = now(), slack_ts = %s"
                " WHERE profile = %s AND message_id = %s AND claimed_by = %s",
                (slack_ts, self.profile, message_id, self.db.host),
            )

    def was_posted(self, message_id: str) -> bool:
        with self.db.conn("read a Slack reply claim") as conn:
            row = conn.execute(
                "SELECT 1 FROM slack_reply_posts"
                " WHERE profile = %s AND message_id = %s AND posted_at IS NOT NULL",
                (self.profile, message_id),
            ).fetchone()
        return row is not None

    # ---- backfill: one host per channel at a time

    @contextmanager
    def backfill_turn(self, channel: str) -> Iterator[bool]:
        """True while this host holds the channel's backfill lock; False: another has it."""
        key = f"agent-slack-backfill:{self.profile}:{channel}"
        lock = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        unlock = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"
        target = self.db.target
        with translated(target, "take a backfill turn"), self.db.pool.connection() as conn:
            mine = bool(conn.execute(lock, (key,)).fetchone()[0])
            try:
                yield mine
            finally:
                if mine:
                    with suppress(Exception):  # a broken connection's locks died with it
                        conn.execute(unlock, (key,))


class PgCursors(Cursors):
    """slack_cursors.Cursors' protocol on the shared tables (see the module's opening)."""

    store: PgProfileStore

    def _already(self, channel: str, ts: str) -> bool:
        with self.store.db.conn("read a Slack dedupe key") as conn:
            row = conn.execute(
                "SELECT 1 FROM slack_events WHERE profile = %s AND event_id = %s",
                (self.profile, _key(channel, ts)),
            ).fetchone()
        return row is not None

    def skip(self, channel: str, ts: str) -> None:
        if _numeric(ts):
            with self.store.db.conn("move a Slack cursor") as conn:
                conn.execute(MOVE_CURSOR, (self.profile, channel, ts))

    def settle(
        self,
        channel: str,
        ts: str,
        thread: str,
        enqueue: Callable[[], None],
        follower: str | None = None,
    ) -> bool:
        db = self.store.db
        with db.transaction("enqueue a Slack message once") as conn:
            inserted = conn.execute(
                "INSERT INTO slack_events (profile, event_id, host_id) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (self.profile, _key(channel, ts), db.host),
            ).fetchone()
            if inserted is None:
                return False  # another host (or path) took it in
            enqueue()  # an exception rolls the key (and the route) back
            if _numeric(ts):
                conn.execute(MOVE_CURSOR, (self.profile, channel, ts))
            self._follow(conn, channel, thread, follower)
        return True

    def _follow(self, conn: Any, channel: str, thread: str, follower: str | None) -> None:
        """The thread becomes the most recent one the bot follows (ChannelCursor.record)."""
        from psycopg.types.json import Jsonb

        conn.execute(
            "INSERT INTO slack_cursors (profile, channel) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (self.profile, channel),
        )
        (book,) = conn.execute(
            "SELECT threads FROM slack_cursors WHERE profile = %s AND channel = %s FOR UPDATE",
            (self.profile, channel),
        ).fetchone()
        threads, followers = _threads(book)
        if thread in threads:
            threads.remove(thread)
        threads.append(thread)
        del threads[:-THREAD_LIMIT]
        if follower is not None:
            users = followers.setdefault(thread, [])
            if follower not in users:
                users.append(follower)
        followers = {t: u for t, u in followers.items() if t in threads}
        conn.execute(
            "UPDATE slack_cursors SET threads = %s, updated_at = now()"
            " WHERE profile = %s AND channel = %s",
            (Jsonb({"order": threads, "followers": followers}), self.profile, channel),
        )

    def _book(self, channel: str) -> tuple[list[str], dict[str, list[str]]]:
        with self.store.db.conn("read Slack threads") as conn:
            row = conn.execute(
                "SELECT threads FROM slack_cursors WHERE profile = %s AND channel = %s",
                (self.profile, channel),
            ).fetchone()
        return _threads(row[0] if row else None)

    def threads(self, channel: str) -> list[str]:
        return self._book(channel)[0]

    def follows(self, channel: str, thread: str, user: str, everyone: bool) -> bool:
        threads, followers = self._book(channel)
        if thread not in threads:
            return False
        users = followers.get(thread)
        return everyone or users is None or user in users

    def pin(self, channels: list[str]) -> dict[str, str]:
        """Pin the channels that have a cursor; an older pin left by a backfill that did
        not finish (on any host) is kept: the plan starts there."""
        with self.store.db.conn("pin Slack cursors") as conn:
            rows = conn.execute(
                "UPDATE slack_cursors SET pinned_ts = coalesce(pinned_ts, cursor_ts)"
                " WHERE profile = %s AND channel = ANY(%s) AND cursor_ts IS NOT NULL"
                " RETURNING channel, pinned_ts",
                (self.profile, list(channels)),
            ).fetchall()
        return {channel: pinned for channel, pinned in sorted(rows)}

    def unpin(self, channel: str) -> None:
        with self.store.db.conn("unpin a Slack cursor") as conn:
            conn.execute(
                "UPDATE slack_cursors SET pinned_ts = NULL WHERE profile = %s AND channel = %s",
                (self.profile, channel),
            )

    def known_channels(self) -> list[str]:
        with self.store.db.conn("list Slack channels") as conn:
            rows = conn.execute(
                "SELECT channel FROM slack_cursors WHERE profile = %s ORDER BY channel",
                (self.profile,),
            ).fetchall()
        return [row[0] for row in rows]


def _key(channel: str, ts: str) -> str:
    return f"{channel}/{ts}"


def _numeric(ts: str) -> bool:
    """A Slack ts the database can compare as a number (the cursor moves only by those)."""
    whole, dot, frac = ts.partition(".")
    return whole.isdigit() and (not dot or frac.isdigit()) and ts_key(ts) != (0, 0)


def _threads(book: Any) -> tuple[list[str], dict[str, list[str]]]:
    """slack_cursors.threads as (threads oldest first, followers per thread)."""
    book = book if isinstance(book, dict) else {}
    order = book.get("order")
    threads = [t for t in order if isinstance(t, str)] if isinstance(order, list) else []
    found = book.get("followers")
    followers = {
        t: [u for u in users if isinstance(u, str)]
        for t, users in (found.items() if isinstance(found, dict) else ())
        if isinstance(users, list)
    }
    return threads, followers
