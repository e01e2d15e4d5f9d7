"""The worker contract and the runner that gives each worker its thread and lifecycle.

A worker implements four things:
  initialize(ctx)  get ready (open directories, connect); raising here is a crash
  run(ctx)         loop until ctx.stopping; wait with ctx.wait(), never a bare sleep;
                   ctx.wait() also records the heartbeat that proves the loop is alive
  shutdown(ctx)    release what initialize took
  wake()           optional: unblock a loop that waits on something else than ctx
  health()         a small dict of what it is doing, shown by `status`; a truthy
                   `degraded` reason makes the supervisor degraded, and `stalled: true`
                   also withholds the watchdog, exactly as a hung worker does
  reconfigure(c)   optional: take a reloaded config in place and return True; the
                   default (False) has the supervisor build the worker anew instead

The runner owns everything else: the thread, state transitions, heartbeat bookkeeping,
restart with backoff after a crash, and giving up after repeated crashes.
"""

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.children import ChildProcesses
from agent.clock import iso_utc
from agent.config import SupervisorConfig
from agent.faults import InjectedFault
from agent.health import initialize_overdue, is_degraded, is_hung
from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.states import ALIVE_STATES, WorkerState, check_worker_transition

HEARTBEAT_SECONDS = 1.0  # how often an idle worker loop proves it is alive


class WorkerContext:
    """What a worker's loop gets from the runtime."""

    def __init__(self, name: str, children: ChildProcesses):
        self.name = name
        self.children = children
        self.stop_event = threading.Event()
        self._last_beat = time.monotonic()
        self._last_beat_wall = time.time()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def beat(self) -> None:
        self._last_beat = time.monotonic()
        self._last_beat_wall = time.time()

    def wait(self, seconds: float = HEARTBEAT_SECONDS) -> bool:
        """Heartbeat, then wait up to `seconds` for a stop request; True when stopping."""
        self.beat()
        return self.stop_event.wait(min(seconds, HEARTBEAT_SECONDS))

    @property
    def last_beat(self) -> float:
        return self._last_beat

    @property
    def last_beat_wall(self) -> float:
        return self._last_beat_wall


class Worker:
    name = "worker"

    def initialize(self, ctx: WorkerContext) -> None:
        pass

    def run(self, ctx: WorkerContext) -> None:
        raise NotImplementedError

    def shutdown(self, ctx: WorkerContext) -> None:
        pass

    def wake(self) -> None:
        """Called right after a stop request, for a worker blocked on its own queue or socket."""

    def reconfigure(self, config: Any) -> bool:
        """Take a reloaded config in place (True), or ask to be rebuilt (False)."""
        return False

    def health(self) -> dict[str, Any]:
        return {}


@dataclass
class RestartPolicy:
    backoff: float
    backoff_max: float
    limit: int
    window: float

    @classmethod
    def from_config(cls, config: SupervisorConfig) -> "RestartPolicy":
        return cls(
            config.restart_backoff,
            config.restart_backoff_max,
            config.restart_limit,
            config.restart_window,
        )

    def delay(self, crashes_in_window: int) -> float:
        return min(self.backoff * 2 ** max(crashes_in_window - 1, 0), self.backoff_max)


class WorkerRunner:
    def __init__(
        self,
        worker: Worker,
        policy: RestartPolicy,
        children: ChildProcesses,
        fault: str | None = None,
        stop_timeout: float = 10.0,
        metrics: Metrics = NO_METRICS,
    ):
        self.worker = worker
        self.metrics = metrics
        self.name = worker.name
        self.policy = policy
        self.fault = fault
        self.ctx = WorkerContext(worker.name, children)
        self.restarts = 0
        self.last_error: str | None = None
        self.state = WorkerState.STOPPED
        self._state_since = time.monotonic()
        self._hung_in_initialize = False  # hung because initialize never finished
        self.first_attempt_done = threading.Event()
        self.gave_up = False  # crashed restart_limit times within restart_window: stays error
        self._slow_stop_seconds = stop_timeout * 3 + 5
        self._crashes: deque[float] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- called by the supervisor's loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        with self._lock:
            self.ctx.stop_event.set()
            if self.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.HUNG):
                self._move(WorkerState.STOPPING)
        self.worker.wake()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def heartbeat_age(self, now: float) -> float:
        return max(now - self.ctx.last_beat, 0.0)

    def check_heartbeat(self, now: float, hang_timeout: float) -> None:
        """running -> hung when the heartbeat is too old, starting -> hung when initialize
        takes longer than hang_timeout; hung -> running when the worker shows life again."""
        age = self.heartbeat_age(now)
        with self._lock:
            if is_hung(self.state, age, hang_timeout):
                self._become_hung(f"no heartbeat for {age:.1f}s", heartbeat_age_s=round(age, 1))
            elif initialize_overdue(self.state, now - self._state_since, hang_timeout):
                waited = now - self._state_since
                self._become_hung(
                    f"initialize has not finished after {waited:.1f}s",
                    starting_for_s=round(waited, 1),
                )
                self._hung_in_initialize = True
            elif (
                self.state == WorkerState.HUNG
                and not self._hung_in_initialize
                and age <= hang_timeout
            ):
                self._move(WorkerState.RUNNING)
                event(
                    "worker.recovered",
                    f"worker {self.name} is heartbeating again",
                    worker=self.name,
                    level=logging.WARNING,
                )

    def _become_hung(self, reason: str, **fields: Any) -> None:
        self._move(WorkerState.HUNG)
        self.last_error = reason
        event(
            "worker.hung",
            f"worker {self.name}: {reason}",
            worker=self.name,
            level=logging.ERROR,
            **fields,
        )

    def degraded(self) -> bool:
        """A running worker whose health() carries a truthy `degraded` reason."""
        return is_degraded(self.state, self._health_detail())

    def health_detail(self) -> dict[str, Any]:
        """What the worker says about itself now (empty unless it is alive)."""
        return self._health_detail()

    def stalled(self) -> bool:
        """A running worker whose health() says `stalled`: its work stopped moving."""
        return self.state == WorkerState.RUNNING and bool(self._health_detail().get("stalled"))

    def mark_shutdown_timeout(self) -> bool:
        """Record that this worker did not stop in time; False if it just managed to."""
        with self._lock:
            if self.state == WorkerState.STOPPED:  # its thread is only finishing its log line
                return False
            if self.state != WorkerState.ERROR:
                self._move(WorkerState.ERROR)
            self.last_error = "shutdown timeout"
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state, last_error, restarts = self.state, self.last_error, self.restarts
        return {
            "name": self.name,
            "state": str(state),
            "last_heartbeat": iso_utc(self.ctx.last_beat_wall),
            "restarts": restarts,
            "last_error": last_error,
            "fault": self.fault,
            "gave_up": self.gave_up,
            "detail": self._health_detail(),
        }

    # ---- the worker's own thread

    def _main(self) -> None:
        try:
            self._live()
        finally:
            self.first_attempt_done.set()

    def _live(self) -> None:
        while True:
            crashed = self._attempt()
            if not crashed or self.ctx.stopping:
                self._finish_stopped()
                return
            if self._gave_up():
                return
            if self.ctx.stop_event.wait(self.policy.delay(len(self._crashes))):
                self._finish_stopped()
                return
            with self._lock:
                self.restarts += 1
            self.metrics.worker_restarted(self.name)
            event(
                "worker.restarting",
                f"restarting worker {self.name} (restart {self.restarts})",
                worker=self.name,
                level=logging.WARNING,
                restarts=self.restarts,
            )

    def _attempt(self) -> bool:
        """One life of the worker: initialize, run, shutdown. True if it crashed."""
        with self._lock:
            if self.ctx.stopping:
                return False
            self._move(WorkerState.STARTING)
        try:
            self.worker.initialize(self.ctx)
            self.ctx.beat()
            self._mark_running()
            self.first_attempt_done.set()
            self._run_with_faults()
            if not self.ctx.stopping:
                raise RuntimeError("run loop returned without a stop request")
            self.worker.shutdown(self.ctx)
            return False
        except Exception as exc:
            self._record_crash(exc)
            self._shutdown_after_crash()
            return True
        finally:
            self.first_attempt_done.set()

    def _run_with_faults(self) -> None:
        if self.fault == "crash":
            raise InjectedFault(f"fault injection: worker {self.name} crashed")
        if self.fault == "hang":
            self.ctx.stop_event.wait()  # alive, but never heartbeats again
            return
        self.worker.run(self.ctx)
        if self.fault == "slow-stop":
            threading.Event().wait(self._slow_stop_seconds)  # ignores the stop request

    def _mark_running(self) -> None:
        with self._lock:
            late = self.state == WorkerState.HUNG and self._hung_in_initialize
            if self.state != WorkerState.STARTING and not late:  # a stop arrived meanwhile
                return
            self._move(WorkerState.RUNNING)
            recovered = self.restarts > 0 or late
        event(
            "worker.started",
            f"worker {self.name} started",
            worker=self.name,
            restarts=self.restarts,
        )
        if recovered:
            event(
                "worker.recovered",
                f"worker {self.name} is running again after a restart",
                worker=self.name,
                level=logging.WARNING,
                restarts=self.restarts,
            )

    def _record_crash(self, exc: Exception) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.policy.window:
            self._crashes.popleft()
        with self._lock:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.state != WorkerState.ERROR:
                self._move(WorkerState.ERROR)
        event(
            "worker.error",
            f"worker {self.name} failed: {self.last_error}",
            worker=self.name,
            level=logging.ERROR,
            error=self.last_error,
            traceback="".join(traceback.format_exception(exc)).strip(),
        )

    def _shutdown_after_crash(self) -> None:
        try:
            self.worker.shutdown(self.ctx)
        except Exception as exc:
            event(
                "worker.error",
                f"worker {self.name} shutdown failed after a crash: {exc}",
                worker=self.name,
                level=logging.ERROR,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _gave_up(self) -> bool:
        if len(self._crashes) < self.policy.limit:
            return False
        self.gave_up = True
        event(
            "worker.error",
            f"worker {self.name} crashed {len(self._crashes)} times within "
            f"{self.policy.window:g}s; not restarting it",
            worker=self.name,
            level=logging.ERROR,
            error=self.last_error,
            gave_up=True,
        )
        return True

    def _finish_stopped(self) -> None:
        with self._lock:
            if self.state == WorkerState.STOPPED:
                return
            if self.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.HUNG):
                self._move(WorkerState.STOPPING)
            if self.state == WorkerState.ERROR and self.last_error == "shutdown timeout":
                return  # the supervisor already gave up on us; keep that verdict
            self._move(WorkerState.STOPPED)
        event("worker.stopped", f"worker {self.name} stopped", worker=self.name)

    def _move(self, new: WorkerState) -> None:
        check_worker_transition(self.state, new)
        self.state = new
        self._state_since = time.monotonic()
        self._hung_in_initialize = False  # set again right after a move to hung from starting

    def _health_detail(self) -> dict[str, Any]:
        if self.state not in ALIVE_STATES:
            return {}
        try:
            return self.worker.health()
        except Exception as exc:  # a health snapshot must never take the supervisor down
            return {"health_error": f"{type(exc).__name__}: {exc}"}


class DisabledWorker:
    """Stands in the registry for an optional worker that is switched off."""

    def __init__(self, name: str):
        self.name = name

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(WorkerState.DISABLED),
            "last_heartbeat": None,
            "restarts": 0,
            "last_error": None,
            "fault": None,
            "gave_up": False,
            "detail": {},
        }
