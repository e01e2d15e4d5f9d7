"""The health rules, in one place: when a worker is hung, when the supervisor is degraded.

Both the supervisor (its STATUS= line and the watchdog) and `agentctl status` (from the
state file and the clock) decide with these functions, so they can never disagree:
- a running worker whose last heartbeat is older than hang_timeout is hung, and so is a
  starting worker whose initialize has taken longer than hang_timeout;
- a running worker whose health detail carries a truthy `degraded` reason is degraded;
- the supervisor is degraded when any worker is error, hung or degraded, or when it has a
  problem of its own (its lock path no longer names its lock, its state file went silent
  or unreadable); otherwise healthy;
- the supervisor's own loop is silent when what it last wrote (its pulse, or what it last
  published for metrics) is older than hang_timeout + SILENT_MARGIN.

Cheap to import: `agentctl status` runs it on every call.
"""

from collections.abc import Iterable
from typing import Any

from agent.states import UNHEALTHY_STATES, WorkerState

HEALTHY = "healthy"
DEGRADED = "degraded"
SILENT_MARGIN = 5.0  # seconds beyond hang_timeout before a silent supervisor loop counts


def is_hung(state: str, heartbeat_age: float | None, hang_timeout: float) -> bool:
    running = state == WorkerState.RUNNING
    return running and heartbeat_age is not None and heartbeat_age > hang_timeout


def initialize_overdue(state: str, starting_for: float, hang_timeout: float) -> bool:
    return state == WorkerState.STARTING and starting_for > hang_timeout


def is_degraded(state: str, detail: Any) -> bool:
    running = state == WorkerState.RUNNING
    return running and isinstance(detail, dict) and bool(detail.get("degraded"))


def degraded_reason(state: str, detail: Any) -> str | None:
    """The reason a degraded worker gives, for the STATUS= line; None when it is not."""
    return str(detail["degraded"]) if is_degraded(state, detail) else None


def worker_unhealthy(state: str, detail: Any) -> bool:
    return state in UNHEALTHY_STATES or is_degraded(state, detail)


def supervisor_health(
    workers: Iterable[tuple[str, Any]], problems: Iterable[str | None] = ()
) -> str:
    """HEALTHY or DEGRADED from (state, detail) per worker and the supervisor's own problems."""
    if any(problems) or any(worker_unhealthy(state, detail) for state, detail in workers):
        return DEGRADED
    return HEALTHY


def degraded_reasons(
    workers: Iterable[tuple[str, str, Any]], problems: Iterable[str | None] = ()
) -> list[str]:
    """Why the supervisor is degraded: its own problems, then `name: reason` for each
    worker (name, state, detail) that is degraded, or `name: state` for one in error or hung."""
    reasons = [p for p in problems if p]
    for name, state, detail in workers:
        why = degraded_reason(state, detail)
        if why:
            reasons.append(f"{name}: {why}")
        elif state in UNHEALTHY_STATES:
            reasons.append(f"{name}: {state}")
    return reasons


def loop_silent(age: float | None, hang_timeout: float) -> str | None:
    """Why the supervisor counts as degraded when its loop showed no life for `age`
    seconds; None while it is not silent (or when there is no evidence at all)."""
    if age is not None and age > hang_timeout + SILENT_MARGIN:
        return f"supervisor has not updated its state for {age:.0f}s"
    return None


def status_line(health: str, workers: Iterable[tuple[str, str]], problem: str | None) -> str:
    """The supervisor's STATUS= text: health, then name=state per worker, then its problem."""
    line = f"{health}: " + " ".join(f"{name}={state}" for name, state in workers)
    return f"{line} ({problem})" if problem else line
