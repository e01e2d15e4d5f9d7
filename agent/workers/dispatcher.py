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

from agent.adapters import adapter_for
from agent.agentenv import agent_environment, agent_workdir, prepare_home
from agent.agenthealth import AgentsHealth
from agent.agentrun import RunResult, choose_agent, run_agent
from agent.backend import DONE as REPLY_DONE
from agent.backend import DUPLICATE, LOST, QueueBackend, backend_for
from agent.clock import iso_utc
from agent.config import Config
from agent.handoff import Handoff, handoff_for
from agent.lanes import Lanes
from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.queue import Message, Queue, is_machine_trouble, make_reply
from agent.runledger import RunLedger
from agent.sessions import open_session_store
from agent.worker import Worker, WorkerContext

IDLE_WAIT = 0.5
JOIN_SECONDS = 8.0

DONE, FAILED, RETRY, STOPPED = "done", "failed", "retry", "stopped"
HANDED_BACK = "handed back"  # a failed run went back to the shared queue: the lane is free
NO_AGENT = "no agent configured: add an [agents.default] table (agentctl init)"


class DispatcherWorker(Worker):
    name = "dispatcher"

    def __init__(
        self,
        config: Config,
        handoff: Handoff | None = None,
        metrics: Metrics = NO_METRICS,
        backend: QueueBackend | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.settings = config.dispatcher
        self.queue = Queue(config.queue_dir)
        self.backend = backend or backend_for(config, self.queue)
        self.handoff = handoff or handoff_for(config.queue_dir)
        self.ledger = RunLedger(config.state_dir / "runs")
        self.sessions = open_session_store(config)  # a file, or the shared database table
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
        self.agents_health = AgentsHealth()
        self.runs_started: dict[int, float] = {}  # receipt number -> monotonic start
        self._health_lock = threading.Lock()

    # ---- worker contract

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        for name in self.config.agents:  # (the supervisor made them before READY already)
            prepare_home(self.config, name)
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

    def reconfigure(self, config: Config) -> bool:
        """New agents and limits apply to runs that start from now on; runs in flight keep
        the settings they started with. In place: the messages it holds stay with it."""
        self.config = config
        self.settings = config.dispatcher
        self.lanes.concurrency = config.dispatcher.concurrency
        self.handoff.inbox.put(None)  # re-check what may start now
        return True

    def wake(self) -> None:
        self.life_stop.set()  # cut in-flight runs short: they stay claimed for next start
        self.handoff.inbox.put(None)

    def shutdown(self, ctx: WorkerContext) -> None:
        self.life_stop.set()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in list(self.threads):
            thread.join(max(deadline - time.monotonic(), 0))
        self._let_go()
        self.sessions.close()  # the database's pool, if any (reopened at first use)

    def _let_go(self) -> None:
        """Messages received but not finished: the backend may give them up (postgres:
        released to the other hosts). Files keep them claimed for the next start."""
        if self.backend.name == "files":
            return
        while (item := self._next_item(0)) is not None:
            if item[0] == "message":
                self._handle(item)
        given_up = {id(m) for m in self.backend.let_go(list(self.unfinished.values()))}
        for number, message in list(self.unfinished.items()):
            if id(message) in given_up:
                del self.unfinished[number]
                self.handoff.finished()

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._health_lock:
            degraded = self.agents_health.degraded(now)
            oldest = min(self.runs_started.values(), default=None)
        if not self.config.agents:
            degraded = NO_AGENT
        return {
            "degraded": degraded,
            "in_flight": self.lanes.running,
            "oldest_run_s": round(now - oldest, 1) if oldest is not None else None,
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
                outcome, delay = self._attempt(message, stop, number)
        except FileNotFoundError as exc:  # somebody removed the claimed file
            self._note_error(f"{message.name}: {exc}")
            outcome = DONE
        except Exception as exc:
            outcome, delay = self._after_error(message, exc)
        finally:
            self.threads.discard(threading.current_thread())
        self.handoff.inbox.put(("finished", life, lane, number, outcome, delay))

    def _run(
        self, agent_name: str, message: Message, stop: threading.Event, number: int
    ) -> RunResult:
        """One message's run, continuing its conversation's agent session when there is one;
        a resume the agent CLI rejects is retried once as a fresh session."""
        conversation = message.data.get("conversationId") or None
        session_id = self._session_to_resume(agent_name, conversation)
        result = self._run_once(agent_name, message, stop, number, session_id)
        if result.resume_rejected and conversation:
            self.sessions.forget(conversation, agent_name)
            self._session_reset(agent_name, conversation, f"rejected: {result.error}")
            result = self._run_once(agent_name, message, stop, number, None)
        if result.ok and result.session_id and conversation and self._keeps_sessions(agent_name):
            self.sessions.put(agent_name, conversation, result.session_id)
        return result

    def _keeps_sessions(self, agent_name: str) -> bool:
        return adapter_for(self.config.agents[agent_name].kind).keeps_sessions

    def _session_to_resume(self, agent_name: str, conversation: str | None) -> str | None:
        if conversation is None or not self._keeps_sessions(agent_name):
            return None  # messages without a conversation never resume
        session = self.sessions.get(agent_name, conversation)
        if session is None:
            return None
        idle_reset = self.config.agents[agent_name].session_idle_reset
        if idle_reset and time.time() - session.last_used > idle_reset:
            self.sessions.forget(conversation, agent_name)
            self._session_reset(agent_name, conversation, f"idle for more than {idle_reset:g}s")
            return None
        return session.session_id

    def _session_reset(self, agent_name: str, conversation: str, why: str) -> None:
        event(
            "session.reset",
            f"agent {agent_name}: conversation {conversation} starts a new session ({why})",
            worker=self.name,
            agent=agent_name,
            conversation=conversation,
            reason=why,
        )

    def _run_once(
        self,
        agent_name: str,
        message: Message,
        stop: threading.Event,
        number: int,
        session_id: str | None,
    ) -> RunResult:
        """One run of the agent, with its own home and environment; its health recorded."""
        assert self.ctx is not None
        env = agent_environment(self.config, agent_name, _message_env(message))
        started = time.monotonic()
        with self._health_lock:
            self.runs_started[number] = started
        try:
            result = run_agent(
                self.ctx.children,
                self.config.agents[agent_name],
                message.data["message"],
                stop,
                env,
                agent_workdir(self.config, agent_name),
                self.ledger,
                session_id,
            )
        finally:
            with self._health_lock:
                self.runs_started.pop(number, None)
        if not result.stopped:
            self.metrics.agent_run(agent_name, time.monotonic() - started)
        if not result.stopped and not result.resume_rejected:
            self._record_health(agent_name, result)
        return result

    def _record_health(self, agent_name: str, result: RunResult) -> None:
        now = time.monotonic()
        with self._health_lock:
            health = self.agents_health.by_agent.get(agent_name)
            was = health.problem(now) if health else None
            self.agents_health.record(agent_name, result.ok, result.error, now)
            problem = self.agents_health.by_agent[agent_name].problem(now)
        if problem and not was:
            event(
                "agent.failing",
                f"agent {agent_name}: {problem}",
                worker=self.name,
                level=logging.ERROR,
                agent=agent_name,
                error=problem,
            )
        elif was and not problem:
            event(
                "agent.recovered",
                f"agent {agent_name} answered again",
                worker=self.name,
                agent=agent_name,
            )

    def _attempt(self, message: Message, stop: threading.Event, number: int) -> tuple[str, float]:
        if not self.backend.is_current(message):
            return DONE, 0.0  # finished by a previous life, or its lease lost: never run twice
        try:
            agent_name = choose_agent(self.config.agents, message.data.get("agent"))
        except ValueError as exc:
            self._fail(message, str(exc), None)
            return FAILED, 0.0
        started = time.monotonic()
        result = self._run(agent_name, message, stop, number)
        if result.stopped:
            return STOPPED, 0.0
        if result.ok:
            replied = self.backend.reply(message, make_reply(message, result.reply, agent_name))
            if replied.status == DUPLICATE:  # a duplicate messageId: not our reply
                self._counted_failure(message, replied.detail or DUPLICATE, agent_name)
                return FAILED, 0.0
            if replied.status == LOST:
                self._lost(message, agent_name, replied.detail or "")
                return DONE, 0.0
            self.metrics.message_done(agent_name)
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
                **({} if replied.status == REPLY_DONE else {"kept_locally": True}),
            )
            return DONE, 0.0
        return self._after_failed_run(message, agent_name, result.error or "failed")

    def _after_error(self, message: Message, exc: Exception) -> tuple[str, float]:
        """Trouble with the machine (disk full, EIO): keep the message and try again later.
        Anything else is about this message: it fails with the reason, never loops."""
        reason = f"{type(exc).__name__}: {exc}"
        self._note_error(f"{message.name}: {reason}")
        if isinstance(exc, OSError) and is_machine_trouble(exc):
            return RETRY, self.settings.retry_backoff_max
        try:
            self._fail(message, reason, None)
        except Exception:  # failing it needs the disk too
            return RETRY, self.settings.retry_backoff_max
        return FAILED, 0.0

    def _after_failed_run(self, message: Message, agent: str, error: str) -> tuple[str, float]:
        attempts = message.attempts + 1
        if attempts >= self.settings.max_attempts:
            message.data["attempts"] = attempts
            self._fail(message, f"agent '{agent}' failed {attempts} time(s); last: {error}", agent)
            return FAILED, 0.0
        delay = min(
            self.settings.retry_backoff * 2 ** (attempts - 1), self.settings.retry_backoff_max
        )
        kept_here = self.backend.retry(message, error, delay)
        self.metrics.message_retried(agent)
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
        return (RETRY, delay) if kept_here else (HANDED_BACK, 0.0)

    def _fail(self, message: Message, reason: str, agent: str | None) -> None:
        target = self.backend.fail(message, reason)
        self._counted_failure(message, reason, agent, target)

    def _lost(self, message: Message, agent: str, why: str) -> None:
        """The run ended after its message was taken over elsewhere: its reply is dropped."""
        event(
            "message.lost",
            f"{message.channel} message {message.message_id}: the reply of this run is "
            f"dropped ({why})",
            worker=self.name,
            level=logging.WARNING,
            message_id=message.message_id,
            channel=message.channel,
            agent=agent,
        )

    def _counted_failure(
        self, message: Message, reason: str, agent: str | None, target: str | None = None
    ) -> None:
        """One message in failed/; agent None when it failed before one was chosen."""
        self.metrics.message_failed(agent)
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


def _message_env(message: Message) -> dict[str, str]:
    data = message.data
    return {
        "AGENT_CHANNEL": data["channel"],
        "AGENT_MESSAGE_ID": data["messageId"],
        "AGENT_CONVERSATION_ID": data.get("conversationId") or "",
        "AGENT_SENDER": data["sender"],
        "AGENT_FILES": "\n".join(data.get("files") or []),
        "AGENT_ATTEMPT": str(message.attempts + 1),
    }
