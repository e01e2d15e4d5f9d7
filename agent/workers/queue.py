"""The queue worker: claims incoming messages oldest first and hands them to the dispatcher.

At the first start in a process it moves whatever a previous run left in processing/
back to incoming/ (original order). It notices new files at once through inotify and
still heartbeats while idle. Invariants:
  - one bad entry never holds up another: each claimed entry is read and judged alone.
    Not a valid message: failed/ with its reason, one `message.failed` event, no retry.
    Cannot even be renamed out of incoming/: quarantined (skipped while this process
    lives, remembered by name and inode), a reason file, one `message.quarantined` event
  - machine trouble (disk full, EIO, read-only) with one entry defers that entry with
    backoff, the others keep flowing; with the claim itself, the whole round backs off
  - only valid messages for a configured agent reach the hand-off, so a burst of poison
    never fills it
  - a second, different message with the (channel, messageId) of one in flight, answered
    or failed goes to failed/ as a duplicate
  - health(): depth, the oldest waiting message's age, failed and quarantined counts, and
    `degraded` + `stalled` once messages wait longer than [queue] stall_timeout while
    none is claimed (the supervisor then withholds the watchdog)
  - repeated errors are logged rate-limited (agent/ratelimit.py)
"""

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from agent.agentrun import choose_agent
from agent.clock import iso_utc
from agent.config import Config
from agent.dirwatch import DirWatcher
from agent.handoff import Handoff, handoff_for
from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.queue import (
    DUPLICATE,
    Entry,
    InvalidMessage,
    MachineTrouble,
    Message,
    Queue,
    Unmovable,
    is_machine_trouble,
    printable,
)
from agent.ratelimit import RepeatLimiter
from agent.worker import Worker, WorkerContext

IDLE_WAIT = 0.5  # seconds between heartbeats while nothing arrives
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # retrying after machine trouble


@dataclass
class Deferred:
    """An entry given back to incoming/ after machine trouble, not claimed before `due`."""

    due: float  # monotonic
    failures: int


@dataclass(frozen=True)
class InFlight:
    """A message handed to the dispatcher: its name in processing/ and its content."""

    name: str
    fingerprint: str


@dataclass
class Backlog:
    """What waits in incoming/ (quarantined entries not counted) and since when."""

    depth: int = 0
    oldest_mtime_ns: int | None = None
    waiting_since: float | None = None  # monotonic: when depth last became > 0
    last_progress: float = 0.0  # monotonic: last claim, rejection or quarantine


def backoff(failures: int) -> float:
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


class QueueWorker(Worker):
    name = "queue"

    def __init__(
        self, config: Config, handoff: Handoff | None = None, metrics: Metrics = NO_METRICS
    ):
        self.queue = Queue(config.queue_dir)
        self.metrics = metrics
        self.handoff = handoff or handoff_for(config.queue_dir)
        self.stall_timeout = config.queue.stall_timeout
        self.agents = config.agents
        self.watcher: DirWatcher | None = None
        self.backlog = Backlog(last_progress=time.monotonic())
        self.quarantined: dict[tuple[str, int], str] = {}  # (name, inode) -> reason
        self.deferred: dict[str, Deferred] = {}  # name in incoming/ -> when to try again
        self.in_flight: dict[str, InFlight] = {}  # by reply name
        self.claim_failures = 0
        self.paused_until = 0.0
        self.stalled = False
        self.claimed = 0
        self.failed = 0
        self.last_claimed: float | None = None
        self.last_error: str | None = None
        self.errors = RepeatLimiter()

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        self.watcher = self.queue.incoming_watcher()
        self.handoff.on_room = self.watcher.wake
        if self.watcher.mode != "inotify":
            event(
                "queue.poll",
                f"inotify unavailable ({self.watcher.error}); polling incoming/ instead",
                worker=self.name,
                level=logging.WARNING,
            )
        if not self.handoff.recovered.is_set():
            moved = self.queue.recover()
            if moved:
                event(
                    "queue.recovered",
                    f"moved {len(moved)} unfinished message(s) from processing/ back to incoming/",
                    worker=self.name,
                    level=logging.WARNING,
                    count=len(moved),
                )
            self.handoff.recovered.set()

    def run(self, ctx: WorkerContext) -> None:
        assert self.watcher is not None
        while not ctx.stopping:
            ctx.beat()
            self._round(ctx)
            if ctx.stopping:
                break
            self.watcher.wait(IDLE_WAIT)

    def reconfigure(self, config: Config) -> bool:
        """A reload: the agents a message may name, and the stall threshold, in place (what
        it remembers about deferred and quarantined entries stays)."""
        self.agents = config.agents
        self.stall_timeout = config.queue.stall_timeout
        return True

    def wake(self) -> None:
        if self.watcher is not None:
            self.watcher.wake()

    def shutdown(self, ctx: WorkerContext) -> None:
        self.handoff.on_room = None
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def health(self) -> dict[str, Any]:
        oldest = self.backlog.oldest_mtime_ns
        detail: dict[str, Any] = {
            "depth": self.backlog.depth,
            "oldest_age_s": round(max(time.time() - oldest / 1e9, 0.0), 1) if oldest else None,
            "claimed": self.claimed,
            "failed": self.failed,
            "quarantined": len(self.quarantined),
            "deferred": len(self.deferred),
            "last_claimed": iso_utc(self.last_claimed) if self.last_claimed else None,
            "watch": self.watcher.mode if self.watcher else None,
            "last_error": self.last_error,
        }
        if self.stalled:
            detail["degraded"] = self._stall_text()
            detail["stalled"] = True
        return detail

    # ---- one round: look, claim what fits, judge each claimed entry

    def _round(self, ctx: WorkerContext) -> None:
        now = time.monotonic()
        try:
            entries = self._candidates(now)
        except OSError as exc:
            self._error("queue.error", f"cannot list incoming/: {exc}")
            with contextlib.suppress(OSError):
                self.queue.ensure_dirs()  # removed by hand: recreate it for the next round
            return
        room = self._room()  # the dispatcher has enough: the rest waits in incoming/
        if room > 0 and now >= self.paused_until:
            batch = [e for e in entries if self._due(e.name, now)][:room]
            gone = {e.name for e in batch[: self._claim(ctx, batch)]}
            self._count_waiting([e for e in entries if e.name not in gone])
        self._note_backlog(time.monotonic())

    def _room(self) -> int:
        """How many entries of incoming/ this round may claim."""
        return self.handoff.room()

    def _candidates(self, now: float) -> list[Entry]:
        """Entries of incoming/, oldest first, without the quarantined; forgets the
        deferrals and quarantine keys whose entry is gone (memory stays bounded)."""
        entries = self.queue.waiting()
        present = {(e.name, e.inode) for e in entries}
        self.quarantined = {k: v for k, v in self.quarantined.items() if k in present}
        names = {e.name for e in entries}
        self.deferred = {n: d for n, d in self.deferred.items() if n in names}
        waiting = [e for e in entries if (e.name, e.inode) not in self.quarantined]
        self._count_waiting(waiting)
        return waiting

    def _count_waiting(self, waiting: list[Entry]) -> None:
        self.backlog.depth = len(waiting)
        self.backlog.oldest_mtime_ns = waiting[0].mtime_ns if waiting else None

    def _due(self, name: str, now: float) -> bool:
        deferred = self.deferred.get(name)
        return deferred is None or deferred.due <= now

    def _claim(self, ctx: WorkerContext, entries: list[Entry]) -> int:
        """Claim and judge entries; returns how many of them left incoming/ (in order)."""
        if not entries:
            return 0
        claim = self.queue.claim(entries)
        for unmovable in claim.unmovable:
            self._quarantine(unmovable)
        if claim.trouble is not None:
            self.claim_failures += 1
            delay = backoff(self.claim_failures)
            self.paused_until = time.monotonic() + delay
            self._error("queue.error", f"claim failed: {claim.trouble}; retrying in {delay:g}s")
        elif claim.claimed:
            self.claim_failures = 0
        unsynced = False
        for name in claim.claimed:
            ctx.beat()  # a batch can be long (up to the hand-off limit)
            unsynced |= self._admit(name)
        if unsynced:
            self._sync_failed()
        if claim.claimed or claim.unmovable:
            self.backlog.last_progress = time.monotonic()
        return claim.looked_at

    def _admit(self, name: str) -> bool:
        """Hand one claimed entry over, or fail it; True when failed/ needs an fsync."""
        try:
            message = self.queue.load(name)
        except FileNotFoundError:  # somebody removed it from processing/
            return False
        except MachineTrouble as exc:
            self._defer(name, str(exc))
            return False
        except InvalidMessage as exc:
            return self._reject(name, str(exc), "invalid")
        duplicate = self._duplicate_of(message)
        if duplicate is not None:
            reason = f"{DUPLICATE}: {duplicate} holds another message with this id"
            return self._reject(name, reason, "duplicate", message)
        try:
            agent = choose_agent(self.agents, message.data.get("agent"))
        except ValueError as exc:  # fails here, without taking a place in the hand-off
            return self._reject(name, str(exc), "unknown_agent", message)
        return self._hand_over(message, agent)

    def _hand_over(self, message: Message, agent: str) -> bool:
        self._remember_in_flight(message)
        self.metrics.message_claimed(agent)
        self.claimed += 1
        self.last_claimed = time.time()
        event(
            "message.claimed",
            f"claimed {message.channel} message {message.message_id}",
            worker=self.name,
            message_id=message.message_id,
            channel=message.channel,
            file=printable(message.name),
        )
        self.handoff.put(message)
        return False

    def _duplicate_of(self, message: Message) -> str | None:
        earlier = self.in_flight.get(message.reply_name)
        if (
            earlier is not None
            and earlier.fingerprint != message.fingerprint
            and earlier.name != message.name
            and self.queue.is_claimed(earlier.name)
        ):
            return f"processing/{earlier.name}"
        return self.queue.duplicate_of(message)

    def _remember_in_flight(self, message: Message) -> None:
        if len(self.in_flight) >= 2 * self.handoff.limit:
            self.in_flight = {
                k: v for k, v in self.in_flight.items() if self.queue.is_claimed(v.name)
            }
        self.in_flight[message.reply_name] = InFlight(message.name, message.fingerprint)

    # ---- bad entries and trouble

    def _reject(self, name: str, reason: str, why: str, message: Message | None = None) -> bool:
        """failed/ with its reason and one event; True when failed/ needs an fsync. `why`:
        invalid, duplicate or unknown_agent (the label of agent_messages_rejected_total)."""
        duplicate = why == "duplicate"
        try:
            target = self.queue.fail(name, reason, message, sync=False, duplicate=duplicate)
        except OSError as exc:
            self._cannot_fail(name, exc)
            return False
        self.metrics.message_rejected(why)
        self.failed += 1
        self.last_error = f"{printable(name)}: {reason}"
        event(
            "message.failed",
            f"invalid message {printable(name)}: {reason}",
            worker=self.name,
            level=logging.ERROR,
            message_id=message.message_id if message else None,
            file=printable(name),
            failed_as=printable(target),
            reason=reason,
        )
        return True

    def _cannot_fail(self, name: str, exc: OSError) -> None:
        """failed/ refused the entry: machine trouble defers it; anything else about the
        entry itself quarantines it in incoming/ (never a retry in a spin)."""
        if isinstance(exc, FileNotFoundError) and not self.queue.is_claimed(name):
            return  # somebody removed it meanwhile
        text = f"cannot move to failed/: {exc}"
        if is_machine_trouble(exc) or isinstance(exc, FileNotFoundError):
            self._defer(name, text)  # FileNotFoundError: failed/ itself is gone (recreated)
            return
        try:
            [back] = self.queue.unclaim([name]) or [name]
            inode = os.lstat(self.queue.incoming / back).st_ino
        except OSError as again:
            self._error("queue.error", f"cannot return {printable(name)} to incoming/: {again}")
            return
        self._quarantine(Unmovable(Entry(back, 0, inode), text))

    def _quarantine(self, unmovable: Unmovable) -> None:
        entry = unmovable.entry
        self.quarantined[(entry.name, entry.inode)] = unmovable.reason
        note = None
        try:
            note = self.queue.note_quarantined(entry.name, unmovable.reason)
        except OSError as exc:
            self._error("queue.error", f"cannot write the reason file for a quarantine: {exc}")
        self.last_error = f"{printable(entry.name)}: {unmovable.reason}"
        event(
            "message.quarantined",
            f"cannot move {printable(entry.name)} out of incoming/ ({unmovable.reason}); "
            "skipping it until the next start",
            worker=self.name,
            level=logging.ERROR,
            file=printable(entry.name),
            reason=unmovable.reason,
            reason_file=printable(note) if note else None,
        )

    def _defer(self, name: str, text: str) -> None:
        """Machine trouble with one entry: back to incoming/, not claimed again for a while."""
        with contextlib.suppress(OSError):
            self.queue.ensure_dirs()  # a directory removed by hand comes back
        try:
            [back] = self.queue.unclaim([name]) or [name]
        except OSError as exc:  # still in processing/: the next start recovers it
            self._error("queue.error", f"cannot return {printable(name)} to incoming/: {exc}")
            return
        failures = self.deferred[back].failures + 1 if back in self.deferred else 1
        delay = backoff(failures)
        self.deferred[back] = Deferred(time.monotonic() + delay, failures)
        self._error("queue.retry_later", f"{printable(name)}: {text}; retrying in {delay:g}s")

    def _sync_failed(self) -> None:
        try:
            self.queue.sync_failed()
        except OSError as exc:
            self._error("queue.error", f"cannot fsync failed/: {exc}")

    def _error(self, name: str, text: str) -> None:
        self.last_error = text
        key = f"{name}:{text.split(':', 1)[0]}"
        self.errors.event(key, name, text, worker=self.name, error=text)

    # ---- stall detection

    def _note_backlog(self, now: float) -> None:
        backlog = self.backlog
        if backlog.depth <= 0:
            backlog.waiting_since = None
        elif backlog.waiting_since is None:
            backlog.waiting_since = now
        stalled = backlog.depth > 0 and self._stalled_for(now) > self.stall_timeout
        if stalled != self.stalled:
            self.stalled = stalled
            event(
                "queue.stalled" if stalled else "queue.flowing",
                self._stall_text() if stalled else "the queue is moving again",
                worker=self.name,
                level=logging.ERROR if stalled else logging.WARNING,
                depth=backlog.depth,
            )

    def _stalled_for(self, now: float) -> float:
        since = self.backlog.waiting_since
        if since is None:
            return 0.0
        return now - max(since, self.backlog.last_progress)

    def _stall_text(self) -> str:
        return (
            f"{self.backlog.depth} message(s) waiting in incoming/, none claimed for "
            f"{self._stalled_for(time.monotonic()):.0f}s (stall_timeout {self.stall_timeout:g}s)"
        )
