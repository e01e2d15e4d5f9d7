"""The dispatcher worker: runs each claimed message through its agent command.

Messages of one conversation run strictly one after another; different conversations
run in parallel, up to [dispatcher] concurrency, each run in its own thread. The loop
itself only schedules, so it heartbeats however long the agents take. A failed run is
retried with backoff (the attempt count is kept in the message file) up to
max_attempts, then the message goes to failed/. The reply is durable before the
claimed file is removed: after a crash a message is redone, and its reply overwritten.
"""

import logging
import queue
import threading
import time
from typing import Any

from agent.agentrun import choose_agent, run_agent
from agent.clock import iso_utc
from agent.config import Config
from agent.handoff import Handoff, handoff_for
from agent.lanes import Lanes
from agent.log import event
from agent.queue import Message, Queue, make_reply
from agent.runledger import RunLedger
from agent.worker import Worker, WorkerContext

IDLE_WAIT = 0.5
JOIN_SECONDS = 8.0

DONE, FAILED, RETRY, STOPPED = "done", "failed", "retry", "stopped"


class DispatcherWorker(Worker):
    name = "dispatcher"

    def __init__(self, config: Config, handoff: Handoff | None = None):
        self.config = config
        self.settings = config.dispatcher
        self.queue = Queue(config.queue_dir)
        self.handoff = handoff or handoff_for(config.queue_dir)
        self.ledger = RunLedger(config.state_dir / "runs")
        # received but not finished, by receipt number; survives a restart of this
        # worker (order kept). Not by file name: a name is free again once its file is done.
        self.unfinished: dict[int, Message] = {}
        self.received = 0
        self.life = 0
        self.lanes = Lanes(self.settings.concurrency)
        self.life_stop = threading.Event()
        self.threads: set[threading.Thread] = set()
        self.ctx: WorkerContext | None = None
        self.done = 0
        self.failed = 0
        self.retries = 0
        self.last_processed: float | None = None
        self.last_error: str | None = None

    # ---- worker contract

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        self.ctx = ctx
        self.life += 1
        if self.life == 1:
            self._kill_orphaned_runs()
        self.life_stop = threading.Event()
        self.threads = set()
        self.lanes = Lanes(self.settings.concurrency)
        for number, message in self.unfinished.items():  # a previous life's work, in order
            self.lanes.add(message.conversation, (number, message))

    def run(self, ctx: WorkerContext) -> None:
        while not ctx.stopping:
            ctx.beat()
            self._start_ready(ctx)
            item = self._next_item(self._wait_time())
            while item is not None:
                self._handle(item)
                item = self._next_item(0)
            self.lanes.release_due(time.monotonic())

    def wake(self) -> None:
        self.life_stop.set()  # cut in-flight runs short: they stay claimed for next start
        self.handoff.inbox.put(None)

    def shutdown(self, ctx: WorkerContext) -> None:
        self.life_stop.set()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in list(self.threads):
            thread.join(max(deadline - time.monotonic(), 0))

    def health(self) -> dict[str, Any]:
        return {
            "in_flight": self.lanes.running,
            "pending": self.lanes.pending + self.handoff.inbox.qsize(),
            "done": self.done,
            "failed": self.failed,
            "retries": self.retries,
            "last_processed": iso_utc(self.last_processed) if self.last_processed else None,
            "last_error": self.last_error,
        }

    # ---- scheduling (the loop's thread only)

    def _wait_time(self) -> float:
        due = self.lanes.next_due()
        if due is None:
            return IDLE_WAIT
        return min(IDLE_WAIT, max(due - time.monotonic(), 0.0))

    def _next_item(self, timeout: float) -> Any:
        try:
            if timeout <= 0:
                return self.handoff.inbox.get_nowait()
            return self.handoff.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, item: tuple) -> None:
        if item[0] == "message":
            message: Message = item[1]
            self.received += 1
            self.unfinished[self.received] = message
            self.lanes.add(message.conversation, (self.received, message))
            return
        _, life, lane, number, outcome, delay = item
        if life != self.life:
            # A thread of a previous life. Its message was queued again at initialize; if
            # that thread still finished it, it must not run a second time.
            if outcome not in (RETRY, STOPPED) and self.unfinished.pop(number, None) is not None:
                self.handoff.finished()
            return
        if outcome == RETRY:
            self.lanes.retry_at(lane, time.monotonic() + delay)
        elif outcome == STOPPED:
            pass  # stopping: the message stays claimed and comes back at next start
        else:
            self.lanes.finished(lane)
            if self.unfinished.pop(number, None) is not None:
                self.handoff.finished()

    def _start_ready(self, ctx: WorkerContext) -> None:
        while not ctx.stopping:
            started = self.lanes.start_next()
            if started is None:
                return
            lane, (number, message) = started
            thread = threading.Thread(
                target=self._process,
                args=(self.life, self.life_stop, lane, number, message),
                name=f"dispatch-{message.message_id}",
                daemon=True,
            )
            self.threads.add(thread)
            thread.start()

    # ---- one message (its own thread)

    def _process(
        self, life: int, stop: threading.Event, lane: Any, number: int, message: Message
    ) -> None:
        delay = 0.0
        try:
            if self.unfinished.get(number) is not message:
                outcome = DONE  # a previous life of this worker finished it meanwhile
            else:
                outcome, delay = self._attempt(message, stop)
        except FileNotFoundError as exc:  # somebody removed the claimed file
            self._note_error(f"{message.name}: {exc}")
            outcome = DONE
        except Exception as exc:  # disk trouble: keep the message, try again later
            self._note_error(f"{message.name}: {type(exc).__name__}: {exc}")
            outcome, delay = RETRY, self.settings.retry_backoff_max
        finally:
            self.threads.discard(threading.current_thread())
        self.handoff.inbox.put(("finished", life, lane, number, outcome, delay))

    def _attempt(self, message: Message, stop: threading.Event) -> tuple[str, float]:
        if not self.queue.is_claimed(message.name):
            return DONE, 0.0  # finished by a previous life of this worker: never run twice
        try:
            agent_name = choose_agent(self.config.agents, message.data.get("agent"))
        except ValueError as exc:
            self._fail(message, str(exc))
            return FAILED, 0.0
        agent = self.config.agents[agent_name]
        started = time.monotonic()
        assert self.ctx is not None
        result = run_agent(
            self.ctx.children,
            agent,
            message.data["message"],
            stop,
            _child_env(message),
            self.ledger,
        )
        if result.stopped:
            return STOPPED, 0.0
        if result.ok:
            self.queue.write_reply(message, make_reply(message, result.reply, agent_name))
            self.queue.done(message.name)
            self.done += 1
            self.last_processed = time.time()
            event(
                "message.done",
                f"replied to {message.channel} message {message.message_id} ({agent_name})",
                worker=self.name,
                message_id=message.message_id,
                channel=message.channel,
                agent=agent_name,
                attempts=message.attempts + 1,
                duration_ms=round((time.monotonic() - started) * 1000),
            )
            return DONE, 0.0
        return self._after_failed_run(message, agent_name, result.error or "failed")

    def _after_failed_run(self, message: Message, agent: str, error: str) -> tuple[str, float]:
        attempts = message.attempts + 1
        if attempts >= self.settings.max_attempts:
            message.data["attempts"] = attempts
            self._fail(message, f"agent '{agent}' failed {attempts} time(s); last: {error}")
            return FAILED, 0.0
        self.queue.record_attempt(message, error)
        delay = min(
            self.settings.retry_backoff * 2 ** (attempts - 1), self.settings.retry_backoff_max
        )
        self.retries += 1
        self.last_error = f"{message.message_id}: {error}"
        event(
            "message.retry",
            f"agent '{agent}' failed on {message.message_id} (attempt {attempts} of "
            f"{self.settings.max_attempts}): {error}; retrying in {delay:g}s",
            worker=self.name,
            level=logging.WARNING,
            message_id=message.message_id,
            agent=agent,
            attempts=attempts,
            error=error,
            retry_in_s=delay,
        )
        return RETRY, delay

    def _fail(self, message: Message, reason: str) -> None:
        target = self.queue.fail(message.name, reason, message)
        self.failed += 1
        self.last_processed = time.time()
        self.last_error = f"{message.message_id}: {reason}"
        event(
            "message.failed",
            f"{message.channel} message {message.message_id} failed: {reason}",
            worker=self.name,
            level=logging.ERROR,
            message_id=message.message_id,
            channel=message.channel,
            failed_as=target,
            reason=reason,
        )

    def _kill_orphaned_runs(self) -> None:
        """Runs a killed supervisor left behind (their process groups) die now."""
        killed = self.ledger.kill_leftovers()
        if killed:
            event(
                "dispatcher.orphans_killed",
                f"killed {len(killed)} agent process group(s) left by a previous run",
                worker=self.name,
                level=logging.WARNING,
                process_groups=",".join(map(str, killed)),
            )

    def _note_error(self, text: str) -> None:
        self.last_error = text
        event("dispatcher.error", text, worker=self.name, level=logging.ERROR, error=text)


def _child_env(message: Message) -> dict[str, str]:
    data = message.data
    return {
        "AGENT_CHANNEL": data["channel"],
        "AGENT_MESSAGE_ID": data["messageId"],
        "AGENT_CONVERSATION_ID": data.get("conversationId") or "",
        "AGENT_SENDER": data["sender"],
        "AGENT_FILES": "\n".join(data.get("files") or []),
        "AGENT_ATTEMPT": str(message.attempts + 1),
    }
