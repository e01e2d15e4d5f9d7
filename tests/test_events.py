"""Event names are an interface: every one the code logs is in agent.events, and
`logs --event` refuses a name that is not, listing the valid ones."""

import ast
from pathlib import Path

import pytest

from agent import slack_api
from agent.events import EVENTS

PACKAGE = Path(__file__).resolve().parent.parent / "agent"
# calls whose given argument is an event name: event(name, ...), self._error(name, ...),
# RepeatLimiter.event(key, name, ...)
NAME_ARGUMENT = {"event": 0, "_error": 0}


def _logged_names() -> dict[str, list[str]]:
    """Every string constant that reaches an event name argument, with where it is."""
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            index = NAME_ARGUMENT.get(name)
            if name == "event" and isinstance(func, ast.Attribute) and func.attr == "event":
                index = 1 if getattr(func.value, "attr", "") == "errors" else 0
            if index is None or len(node.args) <= index:
                continue
            for const in ast.walk(node.args[index]):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    found.setdefault(const.value, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_event_the_code_logs_is_registered():
    logged = _logged_names()
    assert len(logged) > 40, "the scan found too few event names to be working"
    unknown = {name: where for name, where in logged.items() if name not in EVENTS}
    # f"slack.profile.{state}" leaves its prefix as a constant
    unknown.pop("slack.profile.", None)
    assert not unknown, f"add these to agent/events.py: {unknown}"


def test_every_slack_profile_state_has_its_event():
    states = [slack_api.RUNNING, slack_api.CONNECTING, slack_api.AUTH_MISSING]
    states += [slack_api.AUTH_FAILED, slack_api.API_FAILURE, slack_api.DISCONNECTED]
    assert all(f"slack.profile.{state}" in EVENTS for state in states)


def test_registered_names_are_well_formed_and_described():
    for name, meaning in EVENTS.items():
        assert name == name.lower() and "." in name and " " not in name, name
        assert meaning.strip(), name


@pytest.mark.integration
def test_logs_refuses_an_unknown_event_and_lists_the_valid_ones(agent_env):
    result = agent_env.agentctl("logs", "--event", "worker.eror")
    assert result.returncode == 2
    assert "--event: unknown event 'worker.eror'" in result.stderr
    assert "worker.error" in result.stderr and "Traceback" not in result.stderr
    assert agent_env.agentctl("logs", "--event", "worker.error").returncode == 0


def test_the_operations_guide_lists_every_event_with_its_meaning():
    guide = (PACKAGE.parent / "docs" / "operations.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
        for line in guide.splitlines()
        if line.startswith("| `") and "." in line.split("|")[1]
    }
    listed = {name: meaning for name, meaning in rows.items() if "_total" not in name}
    missing = sorted(set(EVENTS) - set(listed))
    assert not missing, f"docs/operations.md lacks these events: {missing}"
    assert all(listed[name] == meaning for name, meaning in EVENTS.items())
