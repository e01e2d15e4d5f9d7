"""The small, explicit set of lifecycle states and the transitions allowed between them.

Every transition names the state it leaves; a transition from anywhere else is a bug
and raises InvalidTransition (the idea of supervisor's states.py).
"""

from enum import StrEnum


class WorkerState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
    HUNG = "hung"
    DISABLED = "disabled"


class Phase(StrEnum):
    """The supervisor's own lifecycle, recorded in the state file."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


# Named groups.
ALIVE_STATES = frozenset(
    {WorkerState.STARTING, WorkerState.RUNNING, WorkerState.HUNG, WorkerState.STOPPING}
)
UNHEALTHY_STATES = frozenset({WorkerState.ERROR, WorkerState.HUNG})
LIVE_PHASES = frozenset({Phase.STARTING, Phase.READY, Phase.STOPPING})

WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STOPPED: frozenset({WorkerState.STARTING}),
    WorkerState.STARTING: frozenset(
        {WorkerState.RUNNING, WorkerState.ERROR, WorkerState.STOPPING, WorkerState.HUNG}
    ),
    WorkerState.RUNNING: frozenset({WorkerState.HUNG, WorkerState.ERROR, WorkerState.STOPPING}),
    WorkerState.HUNG: frozenset({WorkerState.RUNNING, WorkerState.ERROR, WorkerState.STOPPING}),
    WorkerState.STOPPING: frozenset({WorkerState.STOPPED, WorkerState.ERROR}),
    WorkerState.ERROR: frozenset({WorkerState.STARTING, WorkerState.STOPPED}),
    WorkerState.DISABLED: frozenset(),
}

PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.READY, Phase.STOPPING}),
    Phase.READY: frozenset({Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class InvalidTransition(AssertionError):
    pass


def check_worker_transition(old: WorkerState, new: WorkerState) -> None:
    if new not in WORKER_TRANSITIONS[old]:
        raise InvalidTransition(f"worker state {old} cannot become {new}")


def check_phase_transition(old: Phase, new: Phase) -> None:
    if new not in PHASE_TRANSITIONS[old]:
        raise InvalidTransition(f"supervisor phase {old} cannot become {new}")


# The workers there are, in start order (agent.workers builds them; `logs --worker` checks
# against this without importing them).
WORKER_NAMES = ("queue", "dispatcher", "slack", "heartbeat")
