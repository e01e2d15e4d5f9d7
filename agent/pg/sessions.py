"""The session map in the queue database: agent.sessions.SessionStore's interface, shared.

With [queue] backend = "postgres" a conversation's next message may run on another host;
its CLI session id must be found there, so (agent, conversation) -> session id is a row
of `sessions` (0001) instead of a line of the host's sessions.json. Every call is one
statement on a pooled autocommit connection (the pool opened at first use, so building
the store costs nothing); last_used is the row's updated_at (the database's clock).

What is NOT shared: the CLI's own session files (e.g. ~/.claude/projects/...) stay on the
host whose run created them; a resume on another host is then rejected by the CLI and the
dispatcher starts afresh (docs/scaling.md, "Agent sessions across hosts").

A session that cannot be read raises (DatabaseError: the run is retried later, nothing
done yet); one that cannot be saved after a run is logged (`session.unsaved`) and
dropped: the reply stands, the next message starts a fresh session.
"""

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.config import Config
from agent.errors import DatabaseError
from agent.log import event
from agent.pg.connect import host_id, load_target, open_pool, translated
from agent.pg.migrate import ensure_schema
from agent.sessions import Session

COLUMNS = "agent, conversation, session_id, extract(epoch FROM updated_at)::float8"


class PgSessionStore:
    def __init__(self, config: Config, pool: Any = None, target: Any = None):
        self.config = config
        self.settings = config.queue.postgres
        self.host = host_id(self.settings)
        self._pool, self._target = pool, target
        self._lock = threading.Lock()

    @contextmanager
    def _conn(self, doing: str) -> Iterator[Any]:
        with self._lock:
            if self._pool is None:
                self._target = load_target(self.config)
                ensure_schema(self._target, self.settings)
                self._pool = open_pool(self._target, self.settings, "agent sessions", size=2)
        with translated(self._target, doing), self._pool.connection() as conn:
            yield conn

    def get(self, agent: str, conversation: str) -> Session | None:
        with self._conn("read an agent session") as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM sessions WHERE agent = %s AND conversation = %s",
                (agent, conversation),
            ).fetchone()
        return Session(*row) if row else None

    def put(self, agent: str, conversation: str, session_id: str) -> None:
        try:
            with self._conn("save an agent session") as conn:
                conn.execute(
                    "INSERT INTO sessions (agent, conversation, session_id, host_id)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (agent, conversation) DO UPDATE"
                    " SET session_id = excluded.session_id, host_id = excluded.host_id,"
                    " updated_at = now()",
                    (agent, conversation, session_id, self.host),
                )
        except DatabaseError as exc:
            event(
                "session.unsaved",
                f"session {session_id} of {agent} for {conversation} not saved: {exc}",
                level=logging.WARNING,
                agent=agent,
                conversation=conversation,
                error=str(exc),
            )

    def forget(self, conversation: str, agent: str | None = None) -> list[Session]:
        with self._conn("forget an agent session") as conn:
            rows = conn.execute(
                f"DELETE FROM sessions WHERE conversation = %s AND (%s::text IS NULL OR agent = %s)"
                f" RETURNING {COLUMNS}",
                (conversation, agent, agent),
            ).fetchall()
        return sorted((Session(*row) for row in rows), key=lambda s: s.agent)

    def all(self) -> list[Session]:
        with self._conn("list agent sessions") as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM sessions ORDER BY conversation, agent"
            ).fetchall()
        return [Session(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
