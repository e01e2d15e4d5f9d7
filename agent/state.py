"""The state file: what the supervisor last knew, as JSON with stable key order.

Only the supervisor's main loop writes it, always atomically; readers never see a torn
file. It keeps the last run's outcome after the process ends, so `status` can tell a
clean stop from a shutdown timeout or a crash. It is evidence, not truth: `status`
combines it with the lock and the clock (see agent.status).
"""

import json
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_json

SCHEMA_VERSION = 1


class Outcome:
    RUNNING = "running"  # the run has not ended (or the process died without saying)
    CLEAN = "clean"
    SHUTDOWN_TIMEOUT = "shutdown_timeout"
    FORCED = "forced"
    FAILED = "failed"  # the supervisor gave up during start-up
    CRASHED = "crashed"  # found by the next start: the previous run never recorded an end
    KILLED = "killed"  # `agentctl stop` had to SIGKILL it


def write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_json(path, {"schema": SCHEMA_VERSION, **state})


class UnreadableState(Exception):
    pass


def read_state(path: Path) -> dict[str, Any] | None:
    """None when there is no state file yet; UnreadableState when it is not ours."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableState(f"{path}: {exc.strerror}") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnreadableState(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("supervisor"), dict):
        raise UnreadableState(f"{path}: not an agent state file")
    return state
