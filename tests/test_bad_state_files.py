"""Bad state files never crash a command: status, start, stop and logs call a state.json or
a log record of the wrong shape unreadable evidence, say so in one line and go on."""

import json
import subprocess

import pytest

from tests.helpers import pid_alive

pytestmark = pytest.mark.integration

BAD_STATES = [
    "[]",
    '{"pid": "x"}',
    '{"workers": 5}',
    '{"supervisor": {"pid": 1' + "0" * 40 + "}, " + '"workers": []}',
    '{"supervisor": {"pid": 1' + "0" * 6000 + "}}",
    '{"supervisor": {"hang_timeout": NaN}, "workers": []}',
    '{"supervisor": {"phase": "ready", "started_at": {"a": [1, {"b": null}]}}}',
    '{"supervisor": {"phase": "ready"}, "workers": [{"name": "q", "state": 7}]}',
    "[" * 50000 + "]" * 50000,
    "\x00\x01 not json",
]


def _one_warning(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("text", BAD_STATES, ids=range(len(BAD_STATES)))
def test_status_logs_start_and_stop_go_on_past_a_bad_state_file(agent_env, text):
    state = agent_env.state_dir / "state.json"
    agent_env.state_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(text)

    status = agent_env.agentctl("status")
    assert status.returncode == 3, status.stderr  # not running, as the lock says
    line = _one_warning(status.stderr)
    assert line.startswith(f"agentctl: warning: {state}: ") and line.endswith("; ignoring it")
    as_json = agent_env.agentctl("status", "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["supervisor"]["unreadable_state"] in line

    logs = agent_env.agentctl("logs")
    assert logs.returncode == 0
    assert str(state) in _one_warning(logs.stderr)

    start = agent_env.agentctl("start")  # start replaces it
    assert start.returncode == 0, start.stderr
    assert _one_warning(start.stderr).endswith("; the new supervisor replaces it")
    pid = int(start.stdout.strip().rsplit("pid ", 1)[1].rstrip(")"))
    assert agent_env.events("supervisor.stale_state")
    code, report = agent_env.status()
    assert (code, report["supervisor"]["pid"]) == (0, pid)
    assert report["supervisor"]["unreadable_state"] is None

    state.write_text(text)  # gone bad while running (until the next flush): stop still works
    stop = agent_env.stop()
    assert (stop.returncode, stop.stdout.strip()) == (0, f"stopped (pid {pid})")
    assert "Traceback" not in stop.stderr
    assert not pid_alive(pid)


BAD_RECORDS = [
    "[1, 2]",
    '{"ts": ["x"], "message": "a"}',
    '{"ts": "2026-11-24T06:00:00Z", "level": {"x": 1}, "message": "b"}',
    '{"message": 5}',
    '{"pid": "x", "message": "c"}',
    '{"pid": 1' + "0" * 6000 + "}",
    '{"message": NaN}',
    "[" * 50000 + "]" * 50000,
    "garbage",
]


def test_logs_skip_records_of_the_wrong_shape_and_say_so_once(agent_env):
    log = agent_env.state_dir / "logs" / "agent.jsonl"
    log.parent.mkdir(parents=True)
    good = {"ts": "2026-11-24T06:00:00.000Z", "level": "info", "event": "x.y", "message": "ok"}
    lines = [json.dumps(good), *BAD_RECORDS, json.dumps({**good, "message": "last"})]
    log.write_text("\n".join(lines) + "\n")
    for args in (["logs"], ["logs", "--json"], ["logs", "-n", "50", "--level", "info"]):
        done = agent_env.agentctl(*args)
        assert done.returncode == 0, done.stderr
        assert "ok" in done.stdout and "last" in done.stdout
        line = _one_warning(done.stderr)
        assert f"skipped {len(BAD_RECORDS)} unreadable log record(s)" in line
    clicked = agent_env.agentctl("logs", "--worker", "queue", "--lines=5")  # the click path
    assert clicked.returncode == 0 and "Traceback" not in clicked.stderr


def _piped(agent_env, command: str) -> subprocess.CompletedProcess:
    """`agentctl ... | head -1` in a shell; returns agentctl's own exit code as stdout."""
    script = f'"$PY" -m agent {command} | head -1 >/dev/null; echo "${{PIPESTATUS[0]}}"'
    import sys

    return subprocess.run(
        ["bash", "-c", script],
        env={**agent_env.cmd_env(), "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_and_logs_into_a_closed_pipe_exit_quietly(agent_env):
    agent_env.start()
    log = agent_env.state_dir / "logs" / "agent.jsonl"
    record = {"ts": "2026-11-24T06:00:00.000Z", "level": "info", "message": "x" * 200}
    with open(log, "a") as handle:
        for _ in range(3000):  # far more than a pipe holds
            handle.write(json.dumps(record) + "\n")
    for command in ("status", "status --json", "logs", "logs -n 3000", "logs -n 3000 --json"):
        for _ in range(3):
            done = _piped(agent_env, command)
            assert (done.stdout.strip(), done.stderr) == ("0", ""), command
    clicked = _piped(agent_env, "logs --lines=3000 --level=info")  # through click
    assert (clicked.stdout.strip(), clicked.stderr) == ("0", "")
