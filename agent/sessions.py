"""The session map: which agent CLI session continues which conversation.

The only module that opens state_dir/sessions.json. One JSON object,
{"sessions": [{"agent", "conversation", "session_id", "last_used"}, ...]}, replaced
atomically (temp, fsync, rename, fsync dir; mode 0600) on every change, so it survives a
crash and restarts. Every operation takes an exclusive flock on sessions.lock first and
reads the file afresh: the dispatcher's run threads and `agentctl sessions reset` may
change it at the same moment without losing each other's change. An unreadable or
ill-shaped file counts as empty (every conversation starts afresh) and is replaced by the
next change; it never stops a run.

With [queue] backend = "postgres" the map is shared in the database instead
(agent.pg.sessions.PgSessionStore, the same methods): open_session_store picks.
"""

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from agent.config import Config
    from agent.pg.sessions import PgSessionStore

FILE_NAME = "sessions.json"
LOCK_NAME = "sessions.lock"
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Session:
    agent: str
    conversation: str
    session_id: str
    last_used: float  # epoch seconds


class SessionStore:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE_NAME
        self.lock_path = Path(state_dir) / LOCK_NAME
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread

    def get(self, agent: str, conversation: str) -> Session | None:
        with self._locked():
            return self._read().get((agent, conversation))

    def put(self, agent: str, conversation: str, session_id: str) -> None:
        with self._locked():
            sessions = self._read()
            sessions[(agent, conversation)] = Session(agent, conversation, session_id, time.time())
            self._write(sessions)

    def forget(self, conversation: str, agent: str | None = None) -> list[Session]:
        """Forget the conversation's sessions (of one agent, or all); those forgotten."""
        with self._locked():
            sessions = self._read()
            gone = [
                s
                for key, s in sessions.items()
                if key[1] == conversation and agent in (None, key[0])
            ]
            for session in gone:
                del sessions[(session.agent, session.conversation)]
            if gone:
                self._write(sessions)
            return gone

    def all(self) -> list[Session]:
        with self._locked():
            return sorted(self._read().values(), key=lambda s: (s.conversation, s.agent))

    def close(self) -> None:
        pass

    # ---- the file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read(self) -> dict[tuple[str, str], Session]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError:
            return {}  # e.g. a symlink planted in its place: not evidence of anything
        try:
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError:  # a directory, a disk error
            return {}
        try:
            records = json.loads(data)["sessions"]
            sessions = [Session(**r) for r in records if _well_formed(r)]
        except (ValueError, KeyError, TypeError):
            return {}
        return {(s.agent, s.conversation): s for s in sessions}

    def _write(self, sessions: dict[tuple[str, str], Session]) -> None:
        records = [asdict(s) for s in sessions.values()]
        data = json.dumps({"sessions": records}, sort_keys=True, indent=1) + "\n"
        atomic_write_bytes(self.path, data.encode(), mode=0o600)


def open_session_store(config: "Config") -> "SessionStore | PgSessionStore":
    """The session map of this configuration: state_dir/sessions.json, or with [queue]
    backend = "postgres" the shared table (connected at first use)."""
    if config.queue.backend != "postgres":
        return SessionStore(config.state_dir)
    from agent.pg.sessions import PgSessionStore

    return PgSessionStore(config)


def _well_formed(record: object) -> bool:
    if not isinstance(record, dict) or set(record) != {
        "agent",
        "conversation",
        "session_id",
        "last_used",
    }:
        return False
    strings = all(isinstance(record[k], str) for k in ("agent", "conversation", "session_id"))
    used = record["last_used"]
    return strings and isinstance(used, int | float) and not isinstance(used, bool)
