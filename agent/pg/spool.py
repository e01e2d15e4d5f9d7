"""Outcomes of runs kept on this host while the queue database cannot take them.

A run that ends while the database is down (restart, outage) must not lose its reply:
its outcome (complete with the reply, retry or fail with the error) goes into
state_dir/queue-spool.json, and is written to the database when it answers again (the
queue worker tries at every round). The only module that reads or writes that file:
  - one JSON list of records, replaced atomically (temp, fsync, rename, fsync dir), 0600:
    a reply may hold anything the agent said;
  - a record is kept until the database took it (a completion the database refuses
    because another host stored its own reply counts as taken: nothing is delivered
    twice); a crash in between sends it again at next start, and every outcome statement
    is guarded by the message's state, so a second try changes nothing;
  - an unreadable file is set aside as queue-spool.json.bad (never silently emptied); it is
    read like a queue entry (agent.queue.read_entry): never through a symlink, never
    blocking on a FIFO, a regular file of at most SPOOL_LIMIT bytes.
"""

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_bytes
from agent.queue import InvalidMessage, read_entry

SPOOL_NAME = "queue-spool.json"
SPOOL_LIMIT = 256 * 1024 * 1024  # an outage's replies; more is not a spool of ours
COMPLETE, RETRY, FAIL = "complete", "retry", "fail"


@dataclass(frozen=True)
class Pending:
    """One outcome waiting for the database: op is complete, retry or fail."""

    op: str
    id: int
    reply: dict[str, Any] | None = None
    error: str | None = None
    retry: dict[str, float] = field(default_factory=dict)  # max_attempts, first, cap


class Spool:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / SPOOL_NAME
        self._lock = threading.Lock()
        self._items: list[Pending] = self._load()

    def _load(self) -> list[Pending]:
        try:
            raw = read_entry(self.path, SPOOL_LIMIT)
        except FileNotFoundError:
            return []
        except InvalidMessage:  # a symlink, a FIFO, a directory, too large
            raw = b""
        try:
            return [Pending(**item) for item in json.loads(raw)]
        except (ValueError, TypeError):
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(SPOOL_NAME + ".bad"))
            return []

    def add(self, item: Pending) -> None:
        with self._lock:
            self._items = [i for i in self._items if i.id != item.id] + [item]
            self._save()

    def items(self) -> list[Pending]:
        with self._lock:
            return list(self._items)

    def ids(self) -> set[int]:
        with self._lock:
            return {i.id for i in self._items}

    def remove(self, message_id: int) -> None:
        with self._lock:
            self._items = [i for i in self._items if i.id != message_id]
            self._save()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _save(self) -> None:
        if not self._items:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        data = json.dumps([asdict(i) for i in self._items], sort_keys=True).encode() + b"\n"
        atomic_write_bytes(self.path, data, 0o600)
