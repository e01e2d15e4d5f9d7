"""The queue backend as the dispatcher sees it: the few calls a run's outcome makes.

Everything above it (lanes, retries and backoff, max_attempts, agent health, sessions,
metrics, events) is the same for both backends; only where an outcome goes differs:
  files      the message is a file in processing/ (agent/queue.py): the reply goes to
             outgoing/, a retry is counted in the file and run again here after the
             backoff, a failure moves it to failed/ with its reason;
  postgres   the message is a row of the shared queue leased to this host
             (agent/pg/host.py): the reply is stored in the row (once, cluster-wide) and
             the origin host's reply pump writes it into its outgoing/; a retry goes back
             to the shared queue with its backoff (any host may run it next); a failure
             is recorded in the row, and the pump writes failed/ on the origin host.
Invariants: `is_current` is False for a message whose run must not deliver (its file was
finished by an earlier life; its lease was taken back); `reply` never lets a second
reply of one message reach a reader.
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import Config
from agent.queue import Message, Queue

DONE, DUPLICATE, LOST, KEPT = "done", "duplicate", "lost", "kept"


@dataclass(frozen=True)
class Replied:
    """What became of a reply: done (delivered or stored), duplicate (another message
    holds this messageId: failed instead), lost (another host's reply stands), kept
    (stored locally until the database answers)."""

    status: str
    detail: str | None = None


class QueueBackend(Protocol):
    name: str

    def is_current(self, message: Message) -> bool: ...

    def reply(self, message: Message, reply: dict[str, Any]) -> Replied: ...

    def retry(self, message: Message, error: str, delay: float) -> bool:
        """Record a failed run. True: the dispatcher runs it again here after `delay`;
        False: it went back to the shared queue (the lane is free)."""
        ...

    def fail(self, message: Message, reason: str) -> str | None:
        """Failed for good, with the reason; where it went (for the event)."""
        ...

    def let_go(self, messages: list[Message]) -> list[Message]:
        """A stop: the messages given up here (released to other hosts); files: none."""
        ...


class FileBackend:
    name = "files"

    def __init__(self, queue: Queue):
        self.queue = queue

    def is_current(self, message: Message) -> bool:
        return self.queue.is_claimed(message.name)

    def reply(self, message: Message, reply: dict[str, Any]) -> Replied:
        written = self.queue.write_reply(message, reply)
        if written.parent == self.queue.failed:  # a duplicate messageId: not our reply
            return Replied(DUPLICATE, f"duplicate messageId; failed as {written.name}")
        self.queue.done(message.name)
        return Replied(DONE)

    def retry(self, message: Message, error: str, delay: float) -> bool:
        self.queue.record_attempt(message, error)
        return True

    def fail(self, message: Message, reason: str) -> str | None:
        return self.queue.fail(message.name, reason, message)

    def let_go(self, messages: list[Message]) -> list[Message]:
        return []  # they stay in processing/: the next start takes them up again


class PgBackend:
    name = "postgres"

    def __init__(self, host: Any, config: Config):  # host: agent.pg.host.PgHost
        self.host = host
        self.settings = config.dispatcher

    def is_current(self, message: Message) -> bool:
        return self.host.is_current(_row(message))

    def reply(self, message: Message, reply: dict[str, Any]) -> Replied:
        status = self.host.complete(_row(message), reply)
        if status == "lost":
            return Replied(LOST, "its lease was taken back and another host's outcome stands")
        return Replied(KEPT if status == "kept" else DONE)

    def retry(self, message: Message, error: str, delay: float) -> bool:
        s = self.settings
        self.host.retry(_row(message), error, s.max_attempts, s.retry_backoff, s.retry_backoff_max)
        return False

    def fail(self, message: Message, reason: str) -> str | None:
        self.host.fail(_row(message), reason)
        return f"queue database message {_row(message)}"

    def let_go(self, messages: list[Message]) -> list[Message]:
        from agent.errors import DatabaseError

        # down: their leases expire instead, and another host (or this one) takes them over
        with contextlib.suppress(DatabaseError):
            self.host.release([_row(m) for m in messages])
        return messages  # no longer held here either way


def _row(message: Message) -> int:
    return message.row_id  # type: ignore[attr-defined]  # agent.pg.host.DbMessage


def backend_for(config: Config, queue: Queue) -> QueueBackend:
    if config.queue.backend == "postgres":
        from agent.pg.host import pg_host_for

        return PgBackend(pg_host_for(config), config)
    return FileBackend(queue)
