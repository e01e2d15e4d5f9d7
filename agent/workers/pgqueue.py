"""The queue worker with [queue] backend = "postgres" (docs/scaling.md): this host's local
ingress into the shared queue, its claims from it, its leases and its replies.

Each round (every POLL seconds, and at once when a file arrives or a run ends):
  1. the database (while it is down: one probe every DOWN_RETRY seconds, so the loop
     keeps beating): outcomes kept in the spool during an outage are written first; the
     leases of what this host holds are renewed every lease/3; expired leases of any host
     are reclaimed every lease/2; the reply pump writes the finished messages of this
     host's producers into outgoing/ (or failed/) and marks them delivered; cluster
     stats every STATS_EVERY seconds, for health;
  2. local ingress, as with the file backend (same validation, poison to failed/,
     quarantine): each valid file is inserted (idempotent on (channel, messageId),
     origin_host = this host) and then unlinked from processing/. A crash in between
     puts it back in incoming/ at next start, and the insert is then a no-op. While the
     database is down nothing leaves incoming/: files wait there;
  3. claims: conversation heads, as many as the dispatcher has free places, handed over.
Health: the file queue's detail plus backend, db (ok | down: reason), held, spooled
and the cluster's depth and oldest age from the last stats call; `degraded` while the
database does not answer (files waiting for it then are not a stall: the watchdog keeps
being fed, so an outage never gets the supervisor killed by systemd).
"""

import contextlib
import logging
import time
from typing import Any

from agent.agentrun import choose_agent
from agent.config import Config
from agent.errors import DatabaseError
from agent.handoff import Handoff
from agent.log import event
from agent.messages import ATTEMPTS
from agent.metrics import NO_METRICS, Metrics
from agent.pg.host import DbMessage, PgHost
from agent.queue import DUPLICATE, Message, printable
from agent.worker import WorkerContext
from agent.workers.queue import QueueWorker

POLL = 0.2  # seconds between rounds: claims of messages other hosts inserted
INGEST_BATCH = 256  # files of incoming/ taken per round
STATS_EVERY = 5.0


class PgQueueWorker(QueueWorker):
    def __init__(
        self,
        config: Config,
        host: PgHost,
        handoff: Handoff | None = None,
        metrics: Metrics = NO_METRICS,
    ):
        super().__init__(config, handoff, metrics)
        self.pg = host
        self.concurrency = config.dispatcher.concurrency
        self.max_attempts = config.dispatcher.max_attempts
        self.next_beat = self.next_reclaim = self.next_stats = 0.0
        self.ingested = 0
        self.delivered = 0

    def initialize(self, ctx: WorkerContext) -> None:
        super().initialize(ctx)
        self.handoff.on_finished = self.wake
        self.pg.connect()  # down: degraded, retried each round; a wrong schema: fatal

    def run(self, ctx: WorkerContext) -> None:
        assert self.watcher is not None
        while not ctx.stopping:
            ctx.beat()
            self._db_round(ctx)
            ctx.beat()
            if not self.pg.up:
                # files wait because of the database, which `degraded` already says: not a
                # stall (that would withhold the watchdog, and systemd would kill us)
                self.backlog.last_progress = time.monotonic()
            self._round(ctx)
            self._claim_heads()
            if ctx.stopping:
                break
            self.watcher.wait(POLL)

    def reconfigure(self, config: Config) -> bool:
        self.concurrency = config.dispatcher.concurrency
        self.max_attempts = config.dispatcher.max_attempts
        return super().reconfigure(config)

    def shutdown(self, ctx: WorkerContext) -> None:
        self.handoff.on_finished = None
        super().shutdown(ctx)

    def health(self) -> dict[str, Any]:
        detail = super().health()
        detail.update(self.pg.detail(), ingested=self.ingested, delivered=self.delivered)
        if not self.pg.up:
            detail["degraded"] = f"queue database unreachable: {self.pg.down}"
        return detail

    # ---- the database's share of a round

    def _db_round(self, ctx: WorkerContext) -> None:
        if not self.pg.due():
            return
        was_up = self.pg.up
        try:
            if not self.pg.connect():
                return
            if len(self.pg.spool):
                self.pg.flush_spool()
            now = time.monotonic()
            if not was_up:
                self.next_beat = self.next_reclaim = 0.0  # back: renew and reclaim at once
            if now >= self.next_beat:
                self.pg.heartbeat()
                self.next_beat = now + self.pg.lease / 3
            if now >= self.next_reclaim:
                self.pg.reclaim(self.max_attempts)
                self.next_reclaim = now + self.pg.lease / 2
            ctx.beat()
            self.delivered += self.pg.pump(self._deliver)
            if now >= self.next_stats:
                self.pg.refresh_stats()
                self.next_stats = now + STATS_EVERY
        except DatabaseError as exc:
            self.last_error = str(exc)

    def _deliver(self, row: Any) -> None:
        """One finished message of a local producer, where its reader looks for it."""
        if row.state == "done":
            self.queue.put_reply(row.reply)
        else:
            data = dict(row.payload)
            if row.attempts > 1:  # as the file queue's failed/ entry: runs before the last
                data[ATTEMPTS] = row.attempts - 1
            self.queue.put_failed(data, row.error or "failed")

    # ---- local ingress: the file queue's round, with an insert instead of a hand-off

    def _room(self) -> int:
        return INGEST_BATCH if self.pg.up else 0  # down: the files wait in incoming/

    def _duplicate_of(self, message: Message) -> str | None:
        return None  # the database decides, on (channel, messageId)

    def _hand_over(self, message: Message, agent: str) -> bool:
        if not self.pg.up:
            return self._give_back(message)
        try:
            got = self.pg.ingest(message)
        except DatabaseError as exc:
            self.last_error = str(exc)
            return self._give_back(message)
        if not got.same:
            reason = f"{DUPLICATE}: message {got.id} of the queue database holds another one"
            return self._reject(message.name, reason, "duplicate", message)
        try:
            self.queue.done(message.name)
        except OSError as exc:  # still in processing/: the next start inserts it again (no-op)
            self._error("queue.error", f"cannot remove {printable(message.name)}: {exc}")
        self.ingested += 1
        event(
            "message.ingested",
            f"queued {message.channel} message {message.message_id} in the shared queue"
            f" (id {got.id}{'' if got.created else ', already there'})",
            worker=self.name,
            message_id=message.message_id,
            channel=message.channel,
            row_id=got.id,
        )
        return False

    def _give_back(self, message: Message) -> bool:
        """The database did not take it: back to incoming/ (its place kept), tried later."""
        with contextlib.suppress(OSError):
            self.queue.unclaim([message.name])
        return False

    # ---- claims

    def _claim_heads(self) -> None:
        free = self.concurrency - self.handoff.outstanding()
        if free <= 0 or not self.pg.up:
            return
        try:
            messages = self.pg.claim(free)
        except DatabaseError as exc:
            self.last_error = str(exc)
            return
        for message in messages:
            self._hand_over_claimed(message)

    def _hand_over_claimed(self, message: DbMessage) -> None:
        try:
            agent = choose_agent(self.agents, message.data.get("agent"))
        except ValueError:
            agent = str(message.data.get("agent") or "default")  # the dispatcher fails it
        self.metrics.message_claimed(agent)
        self.claimed += 1
        self.last_claimed = time.time()
        self.backlog.last_progress = time.monotonic()
        event(
            "message.claimed",
            f"claimed {message.channel} message {message.message_id} (id {message.row_id},"
            f" attempt {message.attempts + 1})",
            worker=self.name,
            level=logging.INFO,
            message_id=message.message_id,
            channel=message.channel,
            row_id=message.row_id,
        )
        self.handoff.put(message)
