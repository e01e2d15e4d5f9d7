"""The supervisor: owns the lock, runs the workers, and reports their real health.

One thread (the main one) does all the supervising; signal handlers only enqueue.
  start:  take the lock -> note a stale previous run -> start every worker thread ->
          wait until each finished its first initialize -> READY=1
  loop:   every tick: handle queued signals, detect hung workers, ping the watchdog
          (only while every worker heartbeats), update STATUS= and the state file
  stop:   STOPPING=1 -> set every stop event -> wait up to stop_timeout (a second signal
          cuts the wait short) -> name stragglers, kill child process groups, record
          the outcome -> exit (non-zero when it had to abandon workers)
"""

import contextlib
import logging
import os
import queue
import signal
import time
import traceback
from typing import Any

from agent import errors
from agent.children import ChildProcesses
from agent.clock import iso_utc
from agent.config import Config
from agent.faults import ENV_VAR, parse_faults
from agent.lock import SupervisorLock
from agent.log import event, shutdown_logging
from agent.notify import Notifier
from agent.state import Outcome, UnreadableState, read_state, write_state
from agent.states import LIVE_PHASES, UNHEALTHY_STATES, Phase, WorkerState, check_phase_transition
from agent.worker import DisabledWorker, RestartPolicy, WorkerRunner
from agent.workers import WORKER_NAMES, build_workers

TICK_SECONDS = 0.5
STATE_FLUSH_SECONDS = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Supervisor:
    def __init__(self, config: Config, log_sink: str, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.config = config
        self.log_sink = log_sink
        self.manager = environ.get("AGENT_MANAGER") or (
            "systemd" if environ.get("INVOCATION_ID") else "standalone"
        )
        self.notifier = Notifier(environ)
        self._fault_spec = environ.get(ENV_VAR)
        self.faults: dict[str, str] = {}
        self.lock = SupervisorLock(config.lock_path)
        self.children = ChildProcesses()
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.phase = Phase.STARTING
        self.outcome = Outcome.RUNNING
        self.last_error: str | None = None
        self.previous_run: dict[str, Any] | None = None
        self.started_at = time.time()
        self.runners: list[WorkerRunner] = []
        self.disabled: list[DisabledWorker] = []
        self._last_flush = 0.0
        self._last_watchdog = 0.0
        self._last_status = ""

    # ---- lifecycle

    def run(self) -> int:
        """The whole life of a supervisor process; returns its exit code."""
        try:
            self.faults = parse_faults(self._fault_spec, WORKER_NAMES)
            self.lock.acquire()
        except errors.AgentError as exc:
            self.notifier.failed(str(exc))
            raise
        try:
            return self._run_locked()
        except Exception as exc:  # a bug or the machine (disk full...): record it, say it once
            self._record_failure(exc)
            raise errors.AgentError(f"supervisor failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.lock.release()

    def _record_failure(self, exc: Exception) -> None:
        self.outcome = Outcome.FAILED
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.notifier.failed(self.last_error)
        event(
            "supervisor.failed",
            f"supervisor failed: {self.last_error}",
            level=logging.CRITICAL,
            error=self.last_error,
            traceback="".join(traceback.format_exception(exc)).strip(),
        )
        self.children.kill_all()
        with contextlib.suppress(Exception):
            self.phase = Phase.STOPPED
            self._flush_state(force=True)

    def _run_locked(self) -> int:
        self._install_signal_handlers()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.previous_run = self._inspect_previous_run()
        self._write_pidfile()
        event(
            "supervisor.starting",
            f"supervisor starting (pid {os.getpid()})",
            pid=os.getpid(),
            config=self.config.display_path,
            manager=self.manager,
            faults=",".join(f"{w}:{k}" for w, k in self.faults.items()) or None,
        )
        self._build_runners()
        self._flush_state(force=True)
        for runner in self.runners:
            runner.start()
        if not self._wait_for_first_initialize():
            return self._shutdown()
        self._become_ready()
        while True:
            signum = self._next_signal(TICK_SECONDS)
            if signum is not None:
                event(
                    "supervisor.signal",
                    f"received {signal.Signals(signum).name}",
                    signal=signal.Signals(signum).name,
                )
                return self._shutdown()
            self._tick()

    def _build_runners(self) -> None:
        policy = RestartPolicy.from_config(self.config.supervisor)
        for name, worker in build_workers(self.config).items():
            if worker is None:
                self.disabled.append(DisabledWorker(name))
            else:
                self.runners.append(
                    WorkerRunner(
                        worker,
                        policy,
                        self.children,
                        fault=self.faults.get(name),
                        stop_timeout=self.config.supervisor.stop_timeout,
                    )
                )

    def _wait_for_first_initialize(self) -> bool:
        """Wait until every worker tried to initialize once; False if a stop came first."""
        for runner in self.runners:
            while not runner.first_attempt_done.wait(TICK_SECONDS):
                if self._next_signal(0) is not None:
                    return False
                self._flush_state()
        return True

    def _become_ready(self) -> None:
        self._move(Phase.READY)
        summary = self._status_line()
        self.notifier.ready(summary)
        self._last_status = summary
        self._flush_state(force=True)
        event(
            "supervisor.ready",
            f"supervisor ready: {summary}",
            pid=os.getpid(),
            workers=",".join(r.name for r in self.runners),
        )

    def _tick(self) -> None:
        now = time.monotonic()
        for runner in self.runners:
            runner.check_heartbeat(now, self.config.supervisor.hang_timeout)
        self._ping_watchdog(now)
        self._update_status_line()
        self._flush_state()

    # ---- shutdown

    def _shutdown(self) -> int:
        self._move(Phase.STOPPING)
        self.notifier.stopping("stopping")
        event(
            "supervisor.stopping",
            "supervisor stopping: asking workers to stop",
            stop_timeout=self.config.supervisor.stop_timeout,
        )
        for runner in self.runners:
            runner.request_stop()
        self._flush_state(force=True)
        forced = self._wait_for_workers(self.config.supervisor.stop_timeout)
        stragglers = [r for r in self.runners if r.is_alive() and r.mark_shutdown_timeout()]
        if stragglers:
            self._abandon(stragglers, forced)
        killed = self.children.kill_all()
        if killed:
            event(
                "supervisor.children.killed",
                f"killed {len(killed)} child process group(s)",
                level=logging.WARNING,
                process_groups=",".join(map(str, killed)),
            )
        if self.outcome == Outcome.RUNNING:
            self.outcome = Outcome.CLEAN
        self._move(Phase.STOPPED)
        self._flush_state(force=True)
        event(
            "supervisor.stopped",
            f"supervisor stopped ({self.outcome})",
            outcome=self.outcome,
            level=logging.INFO if self.outcome == Outcome.CLEAN else logging.ERROR,
        )
        if not stragglers:
            return errors.EXIT_OK
        # Threads cannot be killed: end the process, the only way to stop them.
        self.lock.release()
        shutdown_logging()
        os._exit(errors.RUN_FORCED if forced else errors.RUN_SHUTDOWN_TIMEOUT)

    def _wait_for_workers(self, timeout: float) -> bool:
        """Wait for worker threads to end; True if a second signal forced an early end."""
        deadline = time.monotonic() + timeout
        last_extend = 0.0
        for runner in self.runners:
            while runner.is_alive() and time.monotonic() < deadline:
                if self._next_signal(0) is not None:
                    event(
                        "supervisor.shutdown.forced",
                        "second stop signal: not waiting for workers any longer",
                        level=logging.WARNING,
                    )
                    return True
                runner.join(min(0.05, max(deadline - time.monotonic(), 0)))
                now = time.monotonic()
                if now - last_extend >= 1.0:
                    self.notifier.extend_timeout(deadline - now + 5)
                    last_extend = now
                self._flush_state()
        return False

    def _abandon(self, stragglers: list[WorkerRunner], forced: bool) -> None:
        names = ", ".join(r.name for r in stragglers)
        if forced:
            self.outcome = Outcome.FORCED
            self.last_error = f"forced stop while waiting for workers: {names}"
        else:
            self.outcome = Outcome.SHUTDOWN_TIMEOUT
            self.last_error = f"shutdown timeout waiting for workers: {names}"
        event(
            "supervisor.shutdown.timeout",
            self.last_error,
            level=logging.ERROR,
            workers=names,
            stop_timeout=self.config.supervisor.stop_timeout,
            forced=forced,
        )

    # ---- signals

    def _install_signal_handlers(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, _frame: object) -> None:
        self.signals.put(signum)  # SimpleQueue.put is safe in a signal handler

    def _next_signal(self, timeout: float) -> int | None:
        try:
            return self.signals.get(timeout=timeout) if timeout > 0 else self.signals.get_nowait()
        except queue.Empty:
            return None

    # ---- health, notify, state

    def workers_fresh(self, now: float) -> bool:
        """Watchdog evidence: no worker is hung or stalled, every running worker heartbeats."""
        limit = self.config.supervisor.hang_timeout
        for runner in self.runners:
            if runner.state == WorkerState.HUNG or runner.stalled():
                return False
            if runner.state == WorkerState.RUNNING and runner.heartbeat_age(now) > limit:
                return False
        return True

    def _ping_watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or now - self._last_watchdog < interval:
            return
        if self.workers_fresh(now):
            self.notifier.watchdog()
            self._last_watchdog = now

    def healthy(self) -> bool:
        return not any(r.state in UNHEALTHY_STATES or r.degraded() for r in self.runners)

    def _status_line(self) -> str:
        health = "healthy" if self.healthy() else "degraded"
        workers = " ".join(f"{r.name}={r.state}" for r in self.runners)
        return f"{health}: {workers}"

    def _update_status_line(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self.notifier.status(line)
            self._last_status = line
            self._flush_state(force=True)

    def _flush_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < STATE_FLUSH_SECONDS:
            return
        self._last_flush = now
        write_state(self.config.state_path, self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        workers = [r.snapshot() for r in self.runners] + [d.snapshot() for d in self.disabled]
        order = {name: i for i, name in enumerate(WORKER_NAMES)}
        workers.sort(key=lambda w: order.get(w["name"], len(order)))
        return {
            "supervisor": {
                "pid": os.getpid(),
                "phase": str(self.phase),
                "outcome": self.outcome,
                "started_at": iso_utc(self.started_at),
                "updated_at": iso_utc(),
                "stopped_at": iso_utc() if self.phase == Phase.STOPPED else None,
                "manager": self.manager,
                "config": str(self.config.path) if self.config.path else None,
                "state_dir": str(self.config.state_dir),
                "log_sink": self.log_sink,
                "hang_timeout": self.config.supervisor.hang_timeout,
                "stop_timeout": self.config.supervisor.stop_timeout,
                "last_error": self.last_error,
                "previous_run": self.previous_run,
            },
            "workers": workers,
        }

    def _move(self, new: Phase) -> None:
        check_phase_transition(self.phase, new)
        self.phase = new

    def _inspect_previous_run(self) -> dict[str, Any] | None:
        """A previous run that never recorded its end crashed; say so once, deterministically."""
        try:
            previous = read_state(self.config.state_path)
        except UnreadableState as exc:
            event(
                "supervisor.stale_state",
                f"ignoring unreadable state file: {exc}",
                level=logging.WARNING,
            )
            return None
        if previous is None:
            return None
        old = previous["supervisor"]
        outcome = old.get("outcome")
        if old.get("phase") in LIVE_PHASES:
            outcome = Outcome.CRASHED
            event(
                "supervisor.stale_state",
                f"previous supervisor (pid {old.get('pid')}) ended without recording it; "
                "treating it as crashed",
                level=logging.WARNING,
                previous_pid=old.get("pid"),
            )
        return {
            "pid": old.get("pid"),
            "started_at": old.get("started_at"),
            "stopped_at": old.get("stopped_at") or old.get("updated_at"),
            "outcome": outcome,
            "last_error": old.get("last_error"),
        }

    def _write_pidfile(self) -> None:
        """A conventional pid file in RuntimeDirectory=, for tools; truth stays in the lock."""
        if self.config.runtime_dir is not None:
            (self.config.runtime_dir / "agent.pid").write_text(f"{os.getpid()}\n")
