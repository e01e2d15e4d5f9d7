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

from agent import errors
from agent.agentenv import prepare_agents
from agent.children import ChildProcesses
from agent.clock import iso_utc
from agent.config import Config, load_config
from agent.faults import ENV_VAR, parse_faults
from agent.health import degraded_reasons, is_hung, status_line, supervisor_health
from agent.lock import SupervisorLock
from agent.log import event, set_level, shutdown_logging
from agent.metrics import NO_METRICS, Metrics, SupervisorView, start_metrics
from agent.notify import Notifier
from agent.reload import ReloadPlan, plan_reload
from agent.state import (
    Outcome,
    PreviousRun,
    Pulse,
    StateRecord,
    SupervisorRecord,
    UnreadableState,
    WorkerRecord,
    read_state,
    write_pulse,
    write_state,
)
from agent.states import LIVE_PHASES, Phase, WorkerState, check_phase_transition
from agent.worker import DisabledWorker, RestartPolicy, Worker, WorkerRunner
from agent.workers import WORKER_NAMES, build_worker, build_workers

TICK_SECONDS = 0.5
STATE_FLUSH_SECONDS = 1.0
PULSE_FILE = "pulse.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGHUP reloads the configuration. The others' default action would end the supervisor
# silently: each is logged and otherwise ignored. SIGPIPE is ignored outright, as Python
# already does: a closed pipe is an EPIPE error where it happens.
NOTED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


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
        self.metrics: Metrics = NO_METRICS  # served from the lock on, when [metrics] is on
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.phase = Phase.STARTING
        self.outcome = Outcome.RUNNING
        self.last_error: str | None = None
        self.problem: str | None = None  # the supervisor's own reason to be degraded
        self.previous_run: PreviousRun | None = None
        self.started_at = time.time()
        self.runners: list[WorkerRunner] = []
        self.disabled: list[DisabledWorker] = []
        self._last_flush = 0.0
        self._reload_requested = False
        self.reloads = 0  # reload attempts, each with a verdict in the state file
        self.last_reload_error: str | None = None
        self.last_reload_changes: str | None = None
        self.last_reload_at: float | None = None
        self.state_error: str | None = None  # the state file cannot be written (disk)
        self._last_written: StateRecord | None = None  # without its times (_without_times)
        self._state_identity: tuple[int, ...] | None = None
        self.pulse_path = (config.runtime_dir or config.state_dir) / PULSE_FILE
        self._last_watchdog = 0.0
        self._last_withheld = 0.0
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
            prepare_agents(self.config)
            # after the lock: a start that loses the race says "already running", never
            # that the port is taken (by the winner)
            self.metrics = start_metrics(self.config)
        except errors.AgentError as exc:
            self.notifier.failed(str(exc))
            self.lock.release()
            raise
        try:
            return self._run_locked()
        except Exception as exc:  # a bug or the machine (disk full...): record it, say it once
            self._record_failure(exc)
            raise errors.AgentError(f"supervisor failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.close()
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
        self.config.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
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
        self._warn_loose_secrets()
        self._build_runners()
        write_state(self.config.state_path, self.snapshot())  # at start, failing here is fatal
        for runner in self.runners:
            runner.start()
        if not self._wait_for_first_initialize():
            return self._shutdown()
        self._become_ready()
        while True:
            signum = self._next_signal(TICK_SECONDS)
            if signum is not None:
                self._note_signal(signum, "stopping")
                return self._shutdown()
            self._tick()

    def _build_runners(self) -> None:
        policy = RestartPolicy.from_config(self.config.supervisor)
        for name, worker in build_workers(self.config, self.metrics).items():
            if worker is None:
                self.disabled.append(DisabledWorker(name))
            else:
                self.runners.append(self._runner_for(worker, policy))

    def _runner_for(self, worker: Worker, policy: RestartPolicy) -> WorkerRunner:
        return WorkerRunner(
            worker,
            policy,
            self.children,
            fault=self.faults.get(worker.name),
            stop_timeout=self.config.supervisor.stop_timeout,
            metrics=self.metrics,
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
        self._publish_metrics()
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
        if self._reload_requested:
            self._reload_requested = False
            self._reload()
        self._check_lock()
        now = time.monotonic()
        for runner in self.runners:
            runner.check_heartbeat(now, self.config.supervisor.hang_timeout)
        self._ping_watchdog(now)
        self._update_status_line()
        self._publish_metrics()
        self._flush_state()

    def _check_lock(self) -> None:
        """Say so when agent.lock no longer names our lock (deleted or replaced): degraded."""
        lost = self.lock.lost()
        if lost == self.problem:
            return
        self.problem = lost
        if lost:
            event("supervisor.lock_lost", lost, level=logging.ERROR, path=str(self.lock.path))
        else:
            event("supervisor.lock_restored", f"{self.lock.path} names our lock again")

    # ---- reload (SIGHUP; agentctl reload; systemctl reload)

    def _reload(self) -> None:
        """Re-read the config file: apply it, or refuse it and keep the old one running."""
        self.notifier.reloading()
        try:
            plan = self._plan_reload()
        except errors.AgentError as exc:
            self._reload_verdict(None, str(exc))
            return
        try:
            touched = self._apply_reload(plan)
        except errors.AgentError as exc:
            self._reload_verdict(None, str(exc))
            return
        self._reload_verdict(plan, None, touched)

    def _plan_reload(self) -> ReloadPlan:
        new = load_config(str(self.config.path)) if self.config.path else self.config
        plan = plan_reload(self.config, new)
        prepare_agents(new)  # the same checks as at start: homes, commands, workdirs
        return plan

    def _apply_reload(self, plan: ReloadPlan) -> list[str]:
        """Give the new config to the workers it concerns; their names."""
        self.config = plan.config
        set_level(plan.config.logging.level)
        touched = []
        for name in plan.workers:
            runner = next((r for r in self.runners if r.name == name), None)
            if runner is None and build_worker(plan.config, name) is None:
                continue  # off before, off now
            touched.append(name)
            if runner is None or not runner.worker.reconfigure(plan.config):
                self._replace_worker(name, runner)
        return touched

    def _replace_worker(self, name: str, runner: WorkerRunner | None) -> None:
        if runner is not None:
            runner.request_stop()
            runner.join(self.config.supervisor.stop_timeout)
            if runner.is_alive() and runner.mark_shutdown_timeout():
                # never two of one worker: the straggler stays, in error, and is named
                raise errors.AgentError(
                    f"worker {name} did not stop within stop_timeout "
                    f"{self.config.supervisor.stop_timeout:g}s to take the new configuration; "
                    "restart the service to apply it"
                )
            self.runners.remove(runner)
        self.disabled = [d for d in self.disabled if d.name != name]
        worker = build_worker(self.config, name, self.metrics)
        if worker is None:
            self.disabled.append(DisabledWorker(name))
            return
        fresh = self._runner_for(worker, RestartPolicy.from_config(self.config.supervisor))
        self.runners.append(fresh)
        self.runners.sort(key=lambda r: WORKER_NAMES.index(r.name))
        fresh.start()

    def _reload_verdict(
        self, plan: ReloadPlan | None, error: str | None, touched: list[str] | None = None
    ) -> None:
        self.reloads += 1
        self.last_reload_at = time.time()
        self.last_reload_error = error
        self.last_reload_changes = plan.summary if plan is not None else None
        if error is None:
            assert plan is not None
            event(
                "supervisor.reloaded",
                f"configuration reloaded: {plan.summary}",
                changed=plan.summary,
                workers=",".join(touched or []) or None,
            )
        else:
            event(
                "supervisor.reload.failed",
                f"reload refused, the old configuration keeps running: {error}",
                level=logging.ERROR,
                error=error,
            )
        line = self._status_line()
        self.notifier.ready(line)
        self._last_status = line
        self._flush_state(force=True)

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
        self._publish_metrics()
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
        self.metrics.close()
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
        for signum in (*STOP_SIGNALS, *NOTED_SIGNALS):
            signal.signal(signum, self._enqueue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _note_signal(self, signum: int, action: str) -> None:
        name = signal.Signals(signum).name
        event(
            "supervisor.signal",
            f"received {name}: {action}",
            level=logging.WARNING if action == "ignored" else logging.INFO,
            signal=name,
            action=action,
        )

    def _enqueue_signal(self, signum: int, _frame: object) -> None:
        self.signals.put(signum)  # SimpleQueue.put is safe in a signal handler

    def _next_signal(self, timeout: float) -> int | None:
        """The next stop signal within `timeout`; any other signal is noted and dropped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    signum = self.signals.get(timeout=remaining)
                else:
                    signum = self.signals.get_nowait()
            except queue.Empty:
                return None
            if signum in STOP_SIGNALS:
                return signum
            if signum == signal.SIGHUP:
                self._note_signal(signum, "reload")
                self._reload_requested = True  # done by the loop's next tick, once ready
            else:
                self._note_signal(signum, "ignored")

    # ---- health, notify, state

    def workers_fresh(self, now: float) -> bool:
        """Watchdog evidence: no worker is hung or stalled, every running worker heartbeats."""
        limit = self.config.supervisor.hang_timeout
        for runner in self.runners:
            if runner.state == WorkerState.HUNG or runner.stalled():
                return False
            if is_hung(runner.state, runner.heartbeat_age(now), limit):
                return False
        return True

    def _ping_watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or now - self._last_watchdog < interval:
            return
        if self.workers_fresh(now):
            self.notifier.watchdog()
            self._last_watchdog = now
        elif now - self._last_withheld >= interval:  # counted once per ping it replaces
            self._last_withheld = now
            self.metrics.watchdog_withheld()

    def health(self) -> str:
        """healthy or degraded, by the rules `agentctl status` applies too (agent.health)."""
        workers = [(r.state, r.health_detail()) for r in self.runners]
        return supervisor_health(workers, [self.problem, self.state_error])

    def _publish_metrics(self) -> None:
        """Worker states and health for the next scrape (agent.metrics reads, never asks)."""
        if not self.metrics.enabled:
            return
        workers = [(r.name, str(r.state)) for r in self.runners]
        workers += [(d.name, str(WorkerState.DISABLED)) for d in self.disabled]
        workers.sort(key=lambda w: WORKER_NAMES.index(w[0]))
        view = SupervisorView(self.health(), tuple(workers), self.config.supervisor.hang_timeout)
        self.metrics.publish(view)

    def _status_line(self) -> str:
        """STATUS=: health, name=state per worker, then why it is degraded, if it is."""
        workers = [(r.name, str(r.state)) for r in self.runners]
        reasons = degraded_reasons(
            [(r.name, str(r.state), r.health_detail()) for r in self.runners],
            [self.problem, self.state_error],
        )
        return status_line(self.health(), workers, "; ".join(reasons)[:400] or None)

    def _update_status_line(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self.notifier.status(line)
            self._last_status = line
            self._flush_state(force=True)

    def _flush_state(self, force: bool = False) -> None:
        """Once a second: the pulse (no fsync), and state.json only when something in it
        changed, so an idle supervisor writes nothing to disk. A full or failing disk makes
        us degraded, never dead."""
        now = time.monotonic()
        if not force and now - self._last_flush < STATE_FLUSH_SECONDS:
            return
        self._last_flush = now
        record = self.snapshot()
        settled = _without_times(record)
        try:
            if force or settled != self._last_written or not self._state_file_is_ours():
                write_state(self.config.state_path, record)
                self._last_written = settled
                self._state_identity = _identity(os.lstat(self.config.state_path))
            write_pulse(self.pulse_path, _pulse_of(record))
        except OSError as exc:
            self._state_write_failed(exc)
            return
        if self.state_error is not None:
            event(
                "supervisor.state.recovered",
                f"the state file is written again ({self.config.state_path})",
            )
            self.state_error = None

    def _state_file_is_ours(self) -> bool:
        """state.json is still the file we last wrote (not removed, replaced or a symlink)."""
        try:
            return _identity(os.lstat(self.config.state_path)) == self._state_identity
        except OSError:
            return False

    def _state_write_failed(self, exc: OSError) -> None:
        error = f"cannot write {self.config.state_path}: {exc.strerror or exc}"
        if error != self.state_error:  # once per distinct error, not once a second
            event("supervisor.state.error", error, level=logging.ERROR, error=error)
        self.state_error = error

    def snapshot(self) -> StateRecord:
        snaps = [r.snapshot() for r in self.runners] + [d.snapshot() for d in self.disabled]
        order = {name: i for i, name in enumerate(WORKER_NAMES)}
        snaps.sort(key=lambda w: order.get(w["name"], len(order)))
        supervisor = SupervisorRecord(
            pid=os.getpid(),
            phase=str(self.phase),
            outcome=self.outcome,
            started_at=iso_utc(self.started_at),
            updated_at=iso_utc(),
            stopped_at=iso_utc() if self.phase == Phase.STOPPED else None,
            manager=self.manager,
            config=str(self.config.path) if self.config.path else None,
            state_dir=str(self.config.state_dir),
            log_sink=self.log_sink,
            hang_timeout=self.config.supervisor.hang_timeout,
            stop_timeout=self.config.supervisor.stop_timeout,
            last_error=self.last_error,
            degraded=self.problem,
            previous_run=self.previous_run,
            pulse_file=str(self.pulse_path),
            reloads=self.reloads,
            last_reload_at=iso_utc(self.last_reload_at) if self.last_reload_at else None,
            last_reload_error=self.last_reload_error,
            last_reload_changes=self.last_reload_changes,
        )
        return StateRecord(supervisor, tuple(WorkerRecord(**w) for w in snaps))

    def _move(self, new: Phase) -> None:
        check_phase_transition(self.phase, new)
        self.phase = new

    def _inspect_previous_run(self) -> PreviousRun | None:
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
        old = previous.supervisor
        outcome = old.outcome
        if old.phase in LIVE_PHASES:
            outcome = Outcome.CRASHED
            event(
                "supervisor.stale_state",
                f"previous supervisor (pid {old.pid}) ended without recording it; "
                "treating it as crashed",
                level=logging.WARNING,
                previous_pid=old.pid,
            )
        return PreviousRun(
            pid=old.pid,
            started_at=old.started_at,
            stopped_at=old.stopped_at or old.updated_at,
            outcome=outcome,
            last_error=old.last_error,
        )

    def _write_pidfile(self) -> None:
        """A conventional pid file in RuntimeDirectory=, for tools; truth stays in the lock."""
        if self.config.runtime_dir is not None:
            from agent.fsutil import atomic_write_bytes  # replaces a symlink, never follows it

            atomic_write_bytes(self.config.runtime_dir / "agent.pid", f"{os.getpid()}\n".encode())

    def _warn_loose_secrets(self) -> None:
        """A Slack token file its group or the world may read: a warning event at start."""
        if not self.config.slack.enabled:
            return
        from agent.slack_api import resolve_token_path
        from agent.trust import loose_secret_files

        paths = [
            resolve_token_path(name)
            for profile in self.config.slack.profiles.values()
            for name in (profile.bot_token_file, profile.app_token_file)
        ]
        for problem in loose_secret_files(paths):
            event("supervisor.insecure_file", problem, level=logging.WARNING)


def _identity(info: os.stat_result) -> tuple[int, ...]:
    """Tells our file from a symlink or another file that reuses its inode number."""
    return (info.st_mode, info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)


def _without_times(record: StateRecord) -> StateRecord:
    """What must reach state.json: the record less the times the pulse carries."""
    workers = tuple(w._replace(last_heartbeat=None) for w in record.workers)
    return StateRecord(record.supervisor._replace(updated_at=None), workers)


def _pulse_of(record: StateRecord) -> Pulse:
    sup = record.supervisor
    beats = {w.name: w.last_heartbeat for w in record.workers if w.last_heartbeat}
    return Pulse(sup.pid or os.getpid(), sup.updated_at or iso_utc(), beats)
