"""agentctl logs over the JSON-lines sink: filters, tail, rotation and output shapes."""

import json
import subprocess
import sys

import click
import pytest

from agent.errors import AgentError
from agent.logquery import LogFilter, file_tail, json_line, parse_since, render_record
from tests.helpers import wait_for


def record(i, event="worker.started", worker="queue", level="info", ts=None):
    return {
        "ts": ts or f"2026-11-24T07:00:{i % 60:02d}.000Z",
        "level": level,
        "event": event,
        "worker": worker,
        "message": f"m{i}",
        "pid": 10,
    }


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_tail_returns_the_last_matches_oldest_first(tmp_path):
    path = tmp_path / "agent.jsonl"
    write_lines(path, [record(i, worker="queue" if i % 2 else "dispatcher") for i in range(5000)])
    found = file_tail(path, LogFilter(worker="queue"), 3)
    assert [r["message"] for r in found] == ["m4995", "m4997", "m4999"]


def test_filters_by_event_level_and_since(tmp_path):
    path = tmp_path / "agent.jsonl"
    write_lines(
        path,
        [
            record(1, event="worker.error", level="error", ts="2026-11-24T06:00:00.000Z"),
            record(2, event="worker.started"),
            record(3, event="worker.hung", level="error"),
            record(4, event="worker.recovered", level="warning"),
        ],
    )
    assert [r["message"] for r in file_tail(path, LogFilter(event="worker.hung"), 10)] == ["m3"]
    assert [r["message"] for r in file_tail(path, LogFilter(level="warning"), 10)] == [
        "m1",
        "m3",
        "m4",
    ]
    since = parse_since("2026-11-24T06:30:00Z")
    assert [r["message"] for r in file_tail(path, LogFilter(since=since), 10)] == ["m2", "m3", "m4"]


def test_rotated_files_are_read_after_the_current_one(tmp_path):
    path = tmp_path / "agent.jsonl"
    write_lines(path.with_name("agent.jsonl.1"), [record(1), record(2)])
    write_lines(path, [record(3)])
    assert [r["message"] for r in file_tail(path, LogFilter(), 10)] == ["m1", "m2", "m3"]


def test_a_torn_last_line_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "agent.jsonl"
    write_lines(path, [record(1)])
    with open(path, "a") as handle:
        handle.write('{"ts": "2026-11')
    assert [r["message"] for r in file_tail(path, LogFilter(), 10)] == ["m1"]


def test_missing_log_file_is_empty(tmp_path):
    assert file_tail(tmp_path / "none.jsonl", LogFilter(), 5) == []


def test_relative_since_and_bad_since():
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h", now=10000.0) == 2800.0
    with pytest.raises(AgentError, match="--since: expected a time like"):
        parse_since("yesterday-ish")


def test_output_shapes_snapshot():
    rec = {
        **record(7, event="worker.error", level="error"),
        "error": "ValueError: boom",
        "traceback": "Traceback ...",
    }
    assert render_record(rec) == (
        "2026-11-24T07:00:07.000Z error   worker.error [queue] m7 error=ValueError: boom"
    )
    assert json_line(rec) == (
        '{"ts": "2026-11-24T07:00:07.000Z", "level": "error", "event": "worker.error", '
        '"worker": "queue", "message": "m7", "pid": 10, "error": "ValueError: boom", '
        '"traceback": "Traceback ..."}'
    )


@pytest.mark.integration
def test_agentctl_logs_shows_the_lifecycle_events(agent_env):
    agent_env.start(AGENT_FAULT_INJECT="queue:crash")
    wait_for(lambda: agent_env.worker("queue")["gave_up"], what="queue to give up")
    agent_env.stop()
    done = agent_env.agentctl("logs", "-n", "200", "--json")
    assert done.returncode == 0
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert all({"ts", "level", "event", "worker", "message", "pid"} <= set(r) for r in records)
    events = [r["event"] for r in records]
    for name in (
        "supervisor.starting",
        "worker.started",
        "supervisor.ready",
        "worker.error",
        "worker.restarting",
        "supervisor.stopping",
        "worker.stopped",
        "supervisor.stopped",
    ):
        assert name in events, name
    assert events.index("supervisor.starting") < events.index("supervisor.ready")
    errors = agent_env.agentctl("logs", "--worker", "queue", "--event", "worker.error", "--json")
    lines = [json.loads(line) for line in errors.stdout.splitlines()]
    assert lines and all((r["worker"], r["event"]) == ("queue", "worker.error") for r in lines)
    assert "fault injection" in lines[0]["error"]
    human = agent_env.agentctl("logs", "-n", "1", "--event", "supervisor.stopped")
    assert human.stdout.count("\n") == 1
    assert " info    supervisor.stopped supervisor stopped (clean) outcome=clean" in human.stdout
    bad = agent_env.agentctl("logs", "--since", "whenever")
    assert bad.returncode == 2 and "--since: expected" in bad.stderr


@pytest.mark.integration
def test_agentctl_logs_follow_prints_new_events(agent_env):
    follower = subprocess.Popen(
        [sys.executable, "-m", "agent", "logs", "-f", "-n", "1", "--json"],
        env=agent_env.cmd_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        agent_env.start()
        seen: list[str] = []

        def ready_seen() -> bool:
            seen.append(follower.stdout.readline())
            return '"supervisor.ready"' in seen[-1]

        wait_for(ready_seen, timeout=20, what="supervisor.ready through logs -f")
    finally:
        follower.terminate()
        follower.wait(10)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["logs"], ("logs", None, {"limit": 20, "follow": False, "as_json": False})),
        (
            ["logs", "-n", "5", "--worker", "queue", "--json", "-f", "--level", "error"],
            (
                "logs",
                None,
                {"limit": 5, "follow": True, "as_json": True, "worker": "queue", "level": "error"},
            ),
        ),
        (
            ["--json", "--config", "a.toml", "logs", "--event", "worker.error"],
            (
                "logs",
                "a.toml",
                {"limit": 20, "follow": False, "as_json": True, "event": "worker.error"},
            ),
        ),
        (
            ["status", "--config=b.toml", "-l"],
            ("status", "b.toml", {"as_json": False, "full": True}),
        ),
        (["--json", "status"], ("status", None, {"as_json": True, "full": False})),
        (["logs", "-n", "0"], None),  # invalid: click says why
        (["logs", "--level", "loud"], None),
        (["logs", "--event", "no.such.event"], None),
        (["logs", "--help"], None),
        (["logs", "--worker"], None),
        (["--json", "start"], None),
        (["status", "--bogus"], None),
    ],
)
def test_plain_status_and_logs_lines_skip_click_and_the_rest_go_to_it(args, expected):
    from agent.entry import plain_command

    assert plain_command(args) == expected


def test_the_fast_grammar_is_a_subset_of_the_click_commands():
    """Every option entry.py accepts without click exists on the click command, with the
    same kind (flag or value), so the two grammars cannot drift apart."""
    from agent import entry
    from agent.cli import main

    def kinds(command) -> dict[str, bool]:
        return {
            name: param.is_flag
            for param in command.params
            if isinstance(param, click.Option)
            for name in param.opts
        }

    assert kinds(main)["--json"] and not kinds(main)["--config"]
    status, logs = kinds(main.commands["status"]), kinds(main.commands["logs"])
    for name in entry.STATUS_FLAGS:
        assert status[name] is True, name
    for name in entry.LOGS_FLAGS:
        assert logs[name] is True, name
    for name in entry.LOGS_VALUES:
        assert logs[name] is False, name
    assert not logs["--config"] and not status["--config"]
    level = next(p for p in main.commands["logs"].params if p.name == "level")
    assert tuple(level.type.choices) == entry.LEVELS


def test_journal_field_names_round_trip():
    from agent.journalfields import journal_field_name, key_of_field

    assert journal_field_name("message_id") == "QUEUE_MESSAGE_ID"  # MESSAGE_ID is journald's
    assert journal_field_name("priority") == "AGENT_PRIORITY"
    assert journal_field_name("retry-after") == "RETRY_AFTER"
    for key in ("message_id", "error", "heartbeat_age_s"):
        assert key_of_field(journal_field_name(key)) == key
