"""status derives its verdict from live evidence: the lock, the clock, the saved state."""

import json
import os
from pathlib import Path

import pytest

from agent.clock import parse_iso
from agent.config import load_config
from agent.lock import SupervisorLock
from agent.state import write_state
from agent.status import collect_status, render_status, status_exit_code
from tests.helpers import wait_for

NOW = parse_iso("2026-11-24T07:00:10.000Z")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n[supervisor]\nhang_timeout = 5\n')
    config = load_config(str(path), env={})
    config.state_dir.mkdir()
    return config


def saved(phase="ready", beat="2026-11-24T07:00:09.600Z", worker_state="running", **sup):
    return {
        "supervisor": {
            "pid": os.getpid(),
            "phase": phase,
            "outcome": "running",
            "started_at": "2026-11-24T06:00:00.123Z",
            "updated_at": "2026-11-24T07:00:09.900Z",
            "manager": "standalone",
            "config": "/etc/agent/agent.toml",
            "log_sink": "file",
            "hang_timeout": 5,
            "last_error": None,
            **sup,
        },
        "workers": [
            {
                "name": "queue",
                "state": worker_state,
                "last_heartbeat": beat,
                "restarts": 0,
                "last_error": None,
                "detail": {"depth": 3},
            },
            {
                "name": "slack",
                "state": "disabled",
                "last_heartbeat": None,
                "restarts": 0,
                "last_error": None,
                "detail": {},
            },
        ],
    }


@pytest.fixture
def held(config):
    lock = SupervisorLock(config.lock_path)
    lock.acquire()
    yield lock
    lock.release()


def test_running_and_healthy(config, held):
    write_state(config.state_path, saved())
    report = collect_status(config, now=NOW)
    assert report["supervisor"]["state"] == "running"
    assert report["supervisor"]["health"] == "healthy"
    assert report["supervisor"]["uptime_s"] == 3609.9
    queue = report["workers"][0]
    assert list(queue)[:6] == [
        "name",
        "state",
        "last_heartbeat",
        "heartbeat_age_s",
        "restarts",
        "last_error",
    ]
    assert queue["heartbeat_age_s"] == 0.4
    assert status_exit_code(report) == 0


def test_human_status_snapshot(config, held):
    write_state(config.state_path, saved())
    text = render_status(collect_status(config, now=NOW))
    assert (
        text
        == f"""\
agent supervisor: running (healthy)
  pid:        {os.getpid()}
  started:    2026-11-24T06:00:00.123Z (up 1h00m09s)
  manager:    standalone
  config:     /etc/agent/agent.toml
  state dir:  {config.state_dir}
  logs:       file
  last error: -

WORKER      STATE         HEARTBEAT   RESTARTS  DETAIL   LAST ERROR
queue       running       0.4s ago    0         depth=3  -
slack       disabled      -           0         -        -"""
    )


def test_old_heartbeat_is_hung_even_if_the_file_says_running(config, held):
    write_state(config.state_path, saved(beat="2026-11-24T07:00:01.000Z"))
    report = collect_status(config, now=NOW)
    queue = report["workers"][0]
    assert queue["state"] == "hung" and queue["last_error"] == "no heartbeat for 9.0s"
    assert report["supervisor"]["health"] == "degraded"
    assert status_exit_code(report) == 2


def test_worker_in_error_degrades(config, held):
    write_state(config.state_path, saved(worker_state="error"))
    assert status_exit_code(collect_status(config, now=NOW)) == 2


def test_a_silent_supervisor_loop_degrades(config, held):
    write_state(config.state_path, saved(updated_at="2026-11-24T06:59:00.000Z"))
    report = collect_status(config, now=NOW)
    assert report["supervisor"]["health"] == "degraded"
    assert "has not updated its state for 70s" in report["supervisor"]["last_error"]


def test_state_says_running_but_nobody_holds_the_lock_is_crashed(config):
    write_state(config.state_path, saved())
    report = collect_status(config, now=NOW)
    assert (report["supervisor"]["state"], report["supervisor"]["outcome"]) == (
        "crashed",
        "crashed",
    )
    queue, slack = report["workers"]
    # the last state it was seen in, and how long ago it went silent; not "stopped"
    assert (queue["state"], queue["last_state"], queue["heartbeat_age_s"]) == (
        "crashed",
        "running",
        0.4,
    )
    assert slack["state"] == "disabled"
    assert status_exit_code(report) == 1
    text = render_status(report)
    assert "Workers as last recorded before the crash:" in text
    assert "queue       was running   0.4s ago" in text


def test_clean_stop_and_never_started(config):
    assert status_exit_code(collect_status(config, now=NOW)) == 3
    write_state(
        config.state_path,
        saved(
            phase="stopped",
            outcome="clean",
            stopped_at="2026-11-24T07:00:00.000Z",
            worker_state="stopped",
        ),
    )
    report = collect_status(config, now=NOW)
    assert (report["supervisor"]["state"], report["supervisor"]["outcome"]) == ("stopped", "clean")
    assert report["supervisor"]["health"] is None
    assert status_exit_code(report) == 3
    assert "outcome:    clean" in render_status(report)


def test_unreadable_state_with_a_live_lock_is_degraded_not_a_traceback(config, held):
    Path(config.state_path).write_text("{")
    report = collect_status(config, now=NOW)
    assert report["supervisor"]["health"] == "degraded"
    assert "not valid JSON" in report["supervisor"]["last_error"]


def test_a_new_holder_does_not_inherit_the_previous_runs_state(config, held):
    write_state(config.state_path, saved(pid=1, worker_state="error"))  # another run's file
    report = collect_status(config, now=NOW)
    assert report["supervisor"]["state"] == "running"
    assert report["supervisor"]["phase"] == "starting"
    assert report["workers"] == []
    assert status_exit_code(report) == 0


# ---- the pulse: liveness without rewriting state.json


def _identity(path):
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def test_an_idle_supervisor_leaves_state_json_alone_and_status_reads_its_pulse(agent_env):
    agent_env.start()
    state, pulse = agent_env.state_dir / "state.json", agent_env.state_dir / "pulse.json"
    wait_for(lambda: pulse.exists(), what="the pulse file")
    before = _identity(state)
    seen = {_identity(pulse)}
    wait_for(lambda: seen.add(_identity(pulse)) or len(seen) >= 4, what="four pulses")
    assert _identity(state) == before, "an idle supervisor rewrote state.json"
    saved = json.loads(state.read_text())
    code, report = agent_env.status()
    assert code == 0, report
    queue = next(w for w in report["workers"] if w["name"] == "queue")
    saved_beat = next(w for w in saved["workers"] if w["name"] == "queue")["last_heartbeat"]
    assert parse_iso(queue["last_heartbeat"]) > parse_iso(saved_beat)  # from the pulse
    assert queue["heartbeat_age_s"] < 2


@pytest.mark.parametrize("content", [b"", b"[]", b'{"pid": 1}', b"\xff", b'{"pid": "x"}'])
def test_a_bad_pulse_file_is_ignored(agent_env, content):
    agent_env.start()
    pulse = agent_env.state_dir / "pulse.json"
    wait_for(lambda: pulse.exists(), what="the pulse file")
    pulse.unlink()
    pulse.write_bytes(content)  # until the next pulse replaces it
    done = agent_env.agentctl("status", "--json")
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr
    json.loads(done.stdout)


LONG = "agent default: 5 runs failed in a row: exit status 7: " + "the agent explains " * 20


def degraded_dispatcher() -> dict:
    state = saved()
    state["workers"].append(
        {
            "name": "dispatcher",
            "state": "running",
            "last_heartbeat": "2026-11-24T07:00:09.600Z",
            "restarts": 0,
            "last_error": None,
            "detail": {
                "degraded": LONG,
                "done": 4,
                "last_error": "m1: exit status 7",
                "pending": 5,
            },
        }
    )
    return state


def test_a_workers_problem_is_in_last_error_and_its_detail_keeps_the_counts(config, held):
    write_state(config.state_path, degraded_dispatcher())
    report = collect_status(config, now=NOW)
    assert report["supervisor"]["health"] == "degraded"
    assert report["supervisor"]["degraded_reasons"] == [f"dispatcher: {LONG}"]
    text = render_status(report)  # not a terminal: nothing is cut
    row = next(line for line in text.splitlines() if line.startswith("dispatcher"))
    assert "done=4 pending=5" in row and "degraded=" not in row and "last_error=" not in row
    assert row.endswith(LONG.rstrip())
    assert f"  degraded:   dispatcher: {LONG}".rstrip() in text


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_long_values_are_cut_to_the_terminal_width_and_columns_stay_fixed(config, held, width):
    write_state(config.state_path, degraded_dispatcher())
    text = render_status(collect_status(config, now=NOW), width)
    lines = text.splitlines()
    table = lines[lines.index("") + 1 :]
    assert all(len(line) <= max(width, 80) for line in lines), "a line is wider than asked"
    assert any(line.endswith("\u2026") for line in lines), "the long reason was not cut"
    # the fixed columns start at the same place in every row, whatever the values
    for column in ("STATE", "HEARTBEAT", "RESTARTS", "DETAIL"):
        start = table[0].index(column)
        assert all(row[start - 2 : start] == "  " for row in table[1:]), column
    assert "done=4" in text


def test_json_keeps_the_whole_text(config, held):
    write_state(config.state_path, degraded_dispatcher())
    report = json.loads(json.dumps(collect_status(config, now=NOW)))
    dispatcher = next(w for w in report["workers"] if w["name"] == "dispatcher")
    assert dispatcher["detail"]["degraded"] == LONG


def test_the_cluster_view_shows_what_is_usable_of_a_damaged_state_file(config, held):
    state = saved()
    state["workers"][0]["detail"] = {
        "backend": "postgres",
        "db": "ok",
        "host_id": "a",
        "db_latency_ms": 1.5,
        "cluster_depth": 2,
        "cluster_oldest_s": 3.0,
        "cluster_running": 1,
        "hosts": [
            {"host_id": "a", "last_heartbeat": "2026-11-24T07:00:09.000Z", "in_flight": 1},
            {"host_id": "b", "last_heartbeat": "yesterday-ish", "in_flight": 0},
            "not a host",
            {"in_flight": 3},
        ],
    }
    write_state(config.state_path, state)
    report = collect_status(config, now=NOW)
    hosts = report["cluster"]["hosts"]
    assert [(h["host_id"], h["heartbeat_age_s"], h["this_host"]) for h in hosts] == [
        ("a", 1.0, True),
        ("b", None, False),
    ]
    text = render_status(report)
    assert "  queue db:   postgres ok, 1.5 ms" in text
    assert "  cluster:    depth 2, oldest 3.0s, running 1" in text
    assert "  hosts:      a (this host): heartbeat 1.0s ago, 1 running; b: heartbeat -, 0" in text
    queue_row = next(line for line in text.splitlines() if line.startswith("queue "))
    assert "hosts=" not in queue_row and "backend=postgres" in queue_row
