"""The worker runner with real threads: transitions, heartbeats, restart backoff."""

import threading
import time

import pytest

from agent.children import ChildProcesses
from agent.states import InvalidTransition, WorkerState, check_worker_transition
from agent.worker import RestartPolicy, Worker, WorkerContext, WorkerRunner
from tests.helpers import wait_for

FAST = RestartPolicy(backoff=0.01, backoff_max=0.05, limit=3, window=60)


class Idle(Worker):
    name = "idle"

    def __init__(self) -> None:
        self.shutdowns = 0

    def run(self, ctx: WorkerContext) -> None:
        while not ctx.wait():
            pass

    def shutdown(self, ctx: WorkerContext) -> None:
        self.shutdowns += 1


class CrashesFirst(Idle):
    """Raises on its first `crashes` runs, then runs normally."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes

    def run(self, ctx: WorkerContext) -> None:
        if self.crashes:
            self.crashes -= 1
            raise ValueError("boom")
        super().run(ctx)


class Silent(Worker):
    """Stops heartbeating until told to go on."""

    name = "silent"

    def __init__(self) -> None:
        self.resume = threading.Event()

    def run(self, ctx: WorkerContext) -> None:
        self.resume.wait()
        while not ctx.wait(0.05):
            pass

    def wake(self) -> None:
        self.resume.set()


def runner_for(worker: Worker, policy: RestartPolicy = FAST, fault=None) -> WorkerRunner:
    return WorkerRunner(worker, policy, ChildProcesses(), fault=fault, stop_timeout=1)


def stop(runner: WorkerRunner) -> None:
    runner.request_stop()
    runner.join(5)
    assert not runner.is_alive()


def test_idle_worker_runs_then_stops_promptly():
    worker = Idle()
    runner = runner_for(worker)
    assert runner.state == WorkerState.STOPPED
    runner.start()
    assert runner.first_attempt_done.wait(5)
    assert runner.state == WorkerState.RUNNING
    began = time.monotonic()
    stop(runner)
    assert time.monotonic() - began < 0.5
    assert runner.state == WorkerState.STOPPED and worker.shutdowns == 1


def test_crash_is_restarted_and_recovers():
    runner = runner_for(CrashesFirst(crashes=2))
    runner.start()
    wait_for(
        lambda: runner.state == WorkerState.RUNNING and runner.restarts == 2,
        what="two restarts then running",
    )
    assert runner.last_error == "ValueError: boom"
    assert not runner.gave_up
    stop(runner)


def test_repeated_crashes_in_the_window_stay_error():
    runner = runner_for(CrashesFirst(crashes=99))
    runner.start()
    wait_for(lambda: runner.gave_up, what="giving up")
    runner.join(5)
    assert not runner.is_alive()
    assert runner.state == WorkerState.ERROR and runner.restarts == 2
    runner.request_stop()  # nothing left to stop; stays error
    assert runner.state == WorkerState.ERROR


def test_restart_backoff_doubles_up_to_the_maximum():
    policy = RestartPolicy(backoff=1, backoff_max=5, limit=10, window=60)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_stale_heartbeat_is_hung_and_fresh_one_recovers():
    worker = Silent()
    runner = runner_for(worker)
    runner.start()
    assert runner.first_attempt_done.wait(5)
    later = time.monotonic() + 5
    runner.check_heartbeat(later, hang_timeout=2)
    assert runner.state == WorkerState.HUNG
    assert runner.last_error.startswith("no heartbeat for")
    worker.resume.set()
    wait_for(lambda: runner.heartbeat_age(time.monotonic()) < 0.5, what="a fresh heartbeat")
    runner.check_heartbeat(time.monotonic(), hang_timeout=2)
    assert runner.state == WorkerState.RUNNING
    stop(runner)


def test_fault_injection_crash_says_so():
    runner = runner_for(Idle(), fault="crash")
    runner.start()
    wait_for(lambda: runner.gave_up, what="injected crashes to exhaust restarts")
    assert "fault injection" in runner.last_error


def test_shutdown_timeout_marks_the_straggler():
    runner = runner_for(Idle(), fault="slow-stop")
    runner.start()
    assert runner.first_attempt_done.wait(5)
    runner.request_stop()
    runner.join(0.3)
    assert runner.is_alive() and runner.state == WorkerState.STOPPING
    runner.mark_shutdown_timeout()
    assert (runner.state, runner.last_error) == (WorkerState.ERROR, "shutdown timeout")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (WorkerState.STOPPED, WorkerState.RUNNING),
        (WorkerState.RUNNING, WorkerState.STARTING),
        (WorkerState.STOPPED, WorkerState.HUNG),
        (WorkerState.DISABLED, WorkerState.STARTING),
        (WorkerState.ERROR, WorkerState.RUNNING),
    ],
)
def test_illegal_transitions_are_refused(old, new):
    with pytest.raises(InvalidTransition):
        check_worker_transition(old, new)


def test_snapshot_has_the_status_fields():
    runner = runner_for(Idle())
    runner.start()
    assert runner.first_attempt_done.wait(5)
    snap = runner.snapshot()
    assert {"name", "state", "last_heartbeat", "restarts", "last_error"} <= set(snap)
    assert snap["state"] == "running" and snap["last_heartbeat"].endswith("Z")
    stop(runner)


def test_a_worker_that_just_stopped_is_not_marked_as_a_straggler():
    runner = runner_for(Idle())
    runner.start()
    assert runner.first_attempt_done.wait(5)
    stop(runner)
    assert runner.mark_shutdown_timeout() is False  # no InvalidTransition stopped -> error
    assert (runner.state, runner.last_error) == (WorkerState.STOPPED, None)


class SlowInitialize(Idle):
    """Initialize blocks until released (a mount, a network call)."""

    name = "slow-init"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def initialize(self, ctx: WorkerContext) -> None:
        self.release.wait()


def test_initialize_that_outlasts_the_hang_timeout_is_hung_then_recovers():
    worker = SlowInitialize()
    runner = runner_for(worker)
    runner.start()
    wait_for(lambda: runner.state == WorkerState.STARTING, what="starting")
    runner.check_heartbeat(time.monotonic() + 5, hang_timeout=2)
    assert runner.state == WorkerState.HUNG
    assert runner.last_error.startswith("initialize has not finished after")
    runner.check_heartbeat(time.monotonic(), hang_timeout=2)  # a fresh old beat is no proof
    assert runner.state == WorkerState.HUNG
    worker.release.set()
    wait_for(lambda: runner.state == WorkerState.RUNNING, what="running once initialized")
    stop(runner)
