"""The heartbeat worker: every [heartbeat] interval, prompt each agent through the queue.

The prompt is the agent's heartbeat.md (in its workdir) or a short built-in one. The
reply (outgoing/heartbeat_<messageId>.json) is logged as `heartbeat.reply` with its
first line and then removed: this worker is the heartbeat channel's only reader. No
reply within the interval logs `heartbeat.missed`.
"""

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from agent.agentenv import agent_workdir
from agent.clock import iso_utc
from agent.config import Config
from agent.log import event
from agent.queue import Queue, new_message, reply_name
from agent.worker import Worker, WorkerContext

CHANNEL = "heartbeat"
PROMPT_FILE = "heartbeat.md"
BUILTIN_PROMPT = (
    "This is a scheduled heartbeat check. Reply with one short line saying you are alive "
    "and whether anything needs attention."
)
CHECK_SECONDS = 0.25  # how often pending replies are looked for


@dataclass
class Pending:
    agent: str
    message_id: str
    sent: float  # monotonic
    file: str = ""  # its name in incoming/ (and then processing/)
    missed: bool = False


class HeartbeatWorker(Worker):
    name = "heartbeat"

    def __init__(self, config: Config):
        self.config = config
        self.interval = config.heartbeat.interval
        self.queue = Queue(config.queue_dir)
        self.pending: dict[str, Pending] = {}
        self.last_tick: float | None = None
        self.last_reply: float | None = None
        self.missed = 0
        self.skipped = 0  # ticks not sent because the previous heartbeat was still queued
        self.last_error: str | None = None

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        # replies to an earlier run's heartbeats: nobody waits for them any more
        awaited = {reply_name(CHANNEL, message_id) for message_id in self.pending}
        for stale in self.queue.replies(CHANNEL):
            if stale not in awaited:
                with contextlib.suppress(OSError):
                    self.queue.remove_reply(stale)

    def run(self, ctx: WorkerContext) -> None:
        next_tick = time.monotonic() + self.interval
        while not ctx.wait(min(CHECK_SECONDS, max(next_tick - time.monotonic(), 0))):
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = max(next_tick + self.interval, now)
            self._check_replies(time.monotonic())

    def health(self) -> dict[str, Any]:
        return {
            "last_tick": iso_utc(self.last_tick) if self.last_tick else None,
            "last_reply": iso_utc(self.last_reply) if self.last_reply else None,
            "waiting": len(self.pending),
            "missed": self.missed,
            "skipped": self.skipped,
            "last_error": self.last_error,
        }

    def prompt_for(self, agent: str) -> str:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = (agent_workdir(self.config, agent) / PROMPT_FILE).read_text("utf-8").strip()
            if text:
                return text
        return BUILTIN_PROMPT

    def _tick(self) -> None:
        self.last_tick = time.time()
        if not self.config.agents:
            self.last_error = "no agent configured"
            return
        for agent in self.config.agents:
            if self._still_queued(agent):
                # A slow or stuck agent: one heartbeat waiting for it is enough; more would
                # only pile up in its lane.
                self.skipped += 1
                continue
            data = new_message(
                CHANNEL,
                self.prompt_for(agent),
                sender="heartbeat",
                sender_id="heartbeat",
                message_id=f"{agent}-{time.time_ns()}",
                agent=agent,
                conversationId=f"heartbeat-{agent}",
            )
            try:
                path = self.queue.enqueue(data)
            except OSError as exc:
                self.last_error = f"cannot enqueue heartbeat for {agent}: {exc}"
                event("heartbeat.error", self.last_error, worker=self.name, level=logging.ERROR)
                continue
            self.pending[data["messageId"]] = Pending(
                agent, data["messageId"], time.monotonic(), path.name
            )

    def _still_queued(self, agent: str) -> bool:
        return any(item.agent == agent and self._in_queue(item) for item in self.pending.values())

    def _in_queue(self, item: Pending) -> bool:
        if self.config.queue.backend == "postgres":
            # its file left incoming/ for the shared queue (docs/scaling.md): it waits
            # there until answered, as far as this host can tell; given up after 10 ticks
            return time.monotonic() - item.sent < 10 * self.interval
        return self.queue.is_waiting(item.file)

    def _check_replies(self, now: float) -> None:
        for message_id, item in list(self.pending.items()):
            try:
                reply = self.queue.take_reply(CHANNEL, message_id)
            except OSError as exc:  # read, then removing it failed: seen next time
                self.last_error = f"cannot remove heartbeat reply {message_id}: {exc}"
                continue
            if reply is not None:
                self._replied(item, reply, now)
                del self.pending[message_id]
                continue
            failed = self.queue.failure(CHANNEL, message_id) is not None
            if not item.missed and (failed or now - item.sent >= self.interval):
                self._missed(item, "the agent run failed" if failed else "no reply in time")
            if failed or (now - item.sent >= 10 * self.interval and not self._in_queue(item)):
                del self.pending[message_id]

    def _replied(self, item: Pending, reply: dict[str, Any], now: float) -> None:
        text = str(reply.get("message") or "")
        first = text.strip().splitlines()[0] if text.strip() else ""
        self.last_reply = time.time()
        event(
            "heartbeat.reply",
            f"heartbeat reply from {item.agent}: {first}",
            worker=self.name,
            agent=item.agent,
            message_id=item.message_id,
            reply=first,
            late=item.missed,
            latency_ms=round((now - item.sent) * 1000),
        )

    def _missed(self, item: Pending, why: str) -> None:
        item.missed = True
        self.missed += 1
        self.last_error = f"{item.agent}: heartbeat missed ({why})"
        event(
            "heartbeat.missed",
            f"no heartbeat reply from {item.agent} within {self.interval:g}s ({why})",
            worker=self.name,
            level=logging.WARNING,
            agent=item.agent,
            message_id=item.message_id,
            reason=why,
        )
