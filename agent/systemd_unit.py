"""What systemd knows about agent.service, added to `agentctl status` under systemd.

The supervisor's own report (lock, state file, heartbeats) stays the truth about the
workers; systemd adds what only the manager knows: the unit's active state, its main pid,
how the last run ended (Result=, e.g. `watchdog`) and how often it restarted the service.
"""

import os
from typing import Any

from agent.config import Config

PROPERTIES = (
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "StatusText",
    "ExecMainStatus",
    "ActiveEnterTimestamp",
)


def unit_facts(config: Config) -> dict[str, Any] | None:
    """The unit's facts when systemd manages this agent; None otherwise."""
    if not os.path.isdir("/run/systemd/system"):  # not booted with systemd: skip the import
        return None
    from agent import control

    if not control.systemd_manages(config):
        return None
    try:
        props = control.unit_properties(*PROPERTIES)
    except Exception as exc:  # systemctl missing or unusable: say so, never fail status
        return {"unit": control.UNIT, "error": str(exc)}
    if "ActiveState" not in props:
        return {"unit": control.UNIT, "error": "systemctl show returned nothing"}
    return {
        "unit": control.UNIT,
        "active_state": props.get("ActiveState") or None,
        "sub_state": props.get("SubState") or None,
        "result": props.get("Result") or None,
        "main_pid": _int(props.get("MainPID")) or None,
        "restarts": _int(props.get("NRestarts")),
        "status_text": props.get("StatusText") or None,
        "exec_main_status": _int(props.get("ExecMainStatus")),
        "active_since": props.get("ActiveEnterTimestamp") or None,
    }


def merge_unit_facts(report: dict[str, Any], config: Config) -> dict[str, Any]:
    """Add report["systemd"] when systemd manages the agent; the report otherwise unchanged."""
    facts = unit_facts(config)
    if facts is None:
        return report
    report["systemd"] = facts
    sup = report["supervisor"]
    sup["manager"] = sup.get("manager") or "systemd"
    result = facts.get("result")
    if (
        sup.get("state") != "running"
        and result not in (None, "success")
        and not sup.get("last_error")
    ):
        sup["last_error"] = f"systemd: {facts['unit']} ended with Result={result}"
    return report


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
