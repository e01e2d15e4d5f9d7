# ruff: noqa: F811  (pytest fixtures imported from tests.test_slack)
"""Conversations that remember: claude and codex agents resume their CLI's session per
conversation, through real supervisors and small fake CLIs (tests/fake_agents) that behave
as the real ones document; the adapters' parsing also against the real CLIs' shapes."""

import json
import time
from pathlib import Path

import pytest

from agent.adapters import ClaudeAdapter, CodexAdapter, RunOutput
from agent.sessions import SessionStore
from tests.helpers import wait_for
from tests.test_dispatcher import enqueue, failed_reason, reply
from tests.test_slack import fake, slack_env  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

FAKES = Path(__file__).with_name("fake_agents")


def calls(env, agent: str, cli: str) -> list[list[str]]:
    log = env.state_dir / "home" / agent / f".fake-{cli}" / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()]


def answer(env, message_id: str) -> str:
    return wait_for(lambda: reply(env, message_id), what=f"{message_id}'s reply")["message"]


@pytest.fixture
def claude_env(agent_env):
    agent_env.write_config(
        **{"agents.default": {"command": [str(FAKES / "claude"), "-p"], "kind": "claude"}}
    )
    return agent_env


def test_a_thread_of_three_messages_resumes_the_session_the_first_one_returned(claude_env):
    claude_env.start()
    for n in range(3):
        enqueue(claude_env, f"message {n}", f"m{n}", conversationId="thread-1")
        assert answer(claude_env, f"m{n}") == f"turn {n + 1}: message {n}"
    first, second, third = calls(claude_env, "default", "claude")
    assert first == ["-p", "--output-format", "json"]
    [session] = SessionStore(claude_env.state_dir).all()
    assert (session.agent, session.conversation) == ("default", "thread-1")
    assert second == third == ["-p", "--output-format", "json", "--resume", session.session_id]


def test_the_mapping_survives_a_restart(claude_env):
    claude_env.start()
    enqueue(claude_env, "before", "r1", conversationId="c")
    answer(claude_env, "r1")
    claude_env.stop()
    claude_env.start()
    enqueue(claude_env, "after", "r2", conversationId="c")
    assert answer(claude_env, "r2") == "turn 2: after"


def test_messages_without_a_conversation_never_resume(claude_env):
    claude_env.start()
    for n in range(2):
        enqueue(claude_env, "alone", f"a{n}")
        assert answer(claude_env, f"a{n}") == "turn 1: alone"
    assert all("--resume" not in call for call in calls(claude_env, "default", "claude"))
    assert SessionStore(claude_env.state_dir).all() == []


def test_a_session_the_cli_rejects_is_reset_once_and_the_message_answered(claude_env):
    claude_env.state_dir.mkdir(parents=True)
    SessionStore(claude_env.state_dir).put("default", "c", "expired-session")
    claude_env.start()
    enqueue(claude_env, "hello again", "x1", conversationId="c")
    assert answer(claude_env, "x1") == "turn 1: hello again"
    [reset] = claude_env.events("session.reset")
    assert reset["conversation"] == "c" and "No conversation found" in reset["reason"]
    [session] = SessionStore(claude_env.state_dir).all()
    assert session.session_id != "expired-session"
    assert claude_env.events("agent.failing") == []  # the rejected resume is not a failure


def test_session_idle_reset_starts_a_new_session_after_a_quiet_period(agent_env):
    command = [str(FAKES / "claude"), "-p"]
    agent_env.write_config(
        **{"agents.default": {"command": command, "kind": "claude", "session_idle_reset": 60}}
    )
    agent_env.start()
    enqueue(agent_env, "one", "i1", conversationId="c")
    answer(agent_env, "i1")
    store = SessionStore(agent_env.state_dir)
    [session] = store.all()
    store.put("default", "c", session.session_id)  # then pretend it was last used long ago
    path = agent_env.state_dir / "sessions.json"
    data = json.loads(path.read_text())
    data["sessions"][0]["last_used"] = time.time() - 61
    path.write_text(json.dumps(data))
    enqueue(agent_env, "two", "i2", conversationId="c")
    assert answer(agent_env, "i2") == "turn 1: two"
    [reset] = agent_env.events("session.reset")
    assert reset["reason"] == "idle for more than 60s"


def test_a_claude_error_result_fails_with_its_text(agent_env):
    agent_env.write_config(
        **{
            "agents.default": {"command": [str(FAKES / "claude"), "-p"], "kind": "claude"},
            "dispatcher": {"max_attempts": 1},
        }
    )
    agent_env.start()
    enqueue(agent_env, "FAIL now", "e1", conversationId="c")
    wait_for(lambda: agent_env.events("message.failed"), what="e1 failed")
    assert failed_reason(agent_env, "local_e1.json").endswith(
        "exit status 1: API Error: 400 refused"
    )


def test_codex_threads_resume_with_exec_resume(agent_env):
    command = [str(FAKES / "codex"), "exec", "--skip-git-repo-check"]
    agent_env.write_config(**{"agents.cx": {"command": command, "kind": "codex"}})
    agent_env.start()
    for n in range(2):
        enqueue(agent_env, f"q{n}", f"c{n}", conversationId="t")
        assert answer(agent_env, f"c{n}") == f"turn {n + 1}: q{n}"
    first, second = calls(agent_env, "cx", "codex")
    [session] = SessionStore(agent_env.state_dir).all()
    assert first == ["exec", "--skip-git-repo-check", "--json", "-"]
    assert second == ["exec", "--skip-git-repo-check", "--json", "resume", session.session_id, "-"]


def test_agentctl_sessions_lists_and_resets(claude_env):
    claude_env.start()
    enqueue(claude_env, "hi", "s1", conversationId="conv-a")
    answer(claude_env, "s1")
    listed = claude_env.agentctl("sessions")
    assert listed.returncode == 0 and "conv-a" in listed.stdout and "default" in listed.stdout
    [record] = map(json.loads, claude_env.agentctl("sessions", "--json").stdout.splitlines())
    assert (record["conversation"], record["agent"]) == ("conv-a", "default")
    reset = claude_env.agentctl("sessions", "reset", "conv-a")
    assert reset.returncode == 0 and record["session_id"] in reset.stdout
    assert claude_env.agentctl("sessions").stdout.strip() == "no agent sessions"
    again = claude_env.agentctl("sessions", "reset", "conv-a")
    assert again.returncode == 1 and "no session for conversation 'conv-a'" in again.stderr
    enqueue(claude_env, "fresh", "s2", conversationId="conv-a")
    assert answer(claude_env, "s2") == "turn 1: fresh"


@pytest.mark.parametrize(
    "content", [b"", b"[]", b'{"sessions": 5}', b'{"sessions": [{"agent": 1}]}', b"\xff\xfe"]
)
def test_a_bad_session_file_counts_as_empty_and_is_replaced(claude_env, content):
    claude_env.state_dir.mkdir(parents=True)
    (claude_env.state_dir / "sessions.json").write_bytes(content)
    assert claude_env.agentctl("sessions").stdout.strip() == "no agent sessions"
    claude_env.start()
    enqueue(claude_env, "ok", "b1", conversationId="c")
    assert answer(claude_env, "b1") == "turn 1: ok"
    assert len(SessionStore(claude_env.state_dir).all()) == 1
    assert (claude_env.state_dir / "sessions.json").stat().st_mode & 0o777 == 0o600


# ---- the adapters on the real CLIs' output (as observed, ../shared/reference)


def test_claude_adapter_reads_the_real_result_object():
    out = (
        b'{"type":"result","subtype":"success","is_error":false,"result":"hi there",'
        b'"session_id":"7ddb","num_turns":1}\n'
    )
    got = ClaudeAdapter().answer(RunOutput(0, out, b""), resumed=False)
    assert (got.ok, got.reply, got.session_id) == (True, "hi there", "7ddb")
    not_logged_in = (
        b'{"type":"result","subtype":"success","is_error":true,'
        b'"result":"Not logged in \xc2\xb7 Please run /login","session_id":"x"}'
    )
    got = ClaudeAdapter().answer(RunOutput(1, not_logged_in, b""), resumed=False)
    assert not got.ok and got.error == "exit status 1: Not logged in · Please run /login"
    rejected = RunOutput(1, b"", b"No conversation found with session ID: 0000\n")
    assert ClaudeAdapter().answer(rejected, resumed=True).resume_rejected
    assert not ClaudeAdapter().answer(rejected, resumed=False).resume_rejected
    garbage = ClaudeAdapter().answer(RunOutput(0, b"not json", b""), resumed=False)
    assert not garbage.ok and "no JSON result" in (garbage.error or "")


def test_codex_adapter_reads_json_lines_and_survives_reconnect_errors():
    lines = [
        {"type": "thread.started", "thread_id": "th1"},
        {"type": "error", "message": "Reconnecting... 1/5"},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "done it"}},
        {"type": "turn.completed"},
    ]
    out = "\n".join(json.dumps(x) for x in lines).encode()
    got = CodexAdapter().answer(RunOutput(0, out, b""), resumed=False)
    assert (got.ok, got.reply, got.session_id) == (True, "done it", "th1")
    offline = "\n".join(json.dumps(x) for x in lines[:2]).encode()
    got = CodexAdapter().answer(RunOutput(101, offline, b""), resumed=False)
    assert not got.ok and got.error == "exit status 101: Reconnecting... 1/5"
    rejected = RunOutput(1, b"", b"Error: thread/resume: thread/resume failed: no rollout found")
    assert CodexAdapter().answer(rejected, resumed=True).resume_rejected


# ---- through Slack: a thread is a conversation


def test_a_slack_thread_of_three_messages_resumes_one_claude_session(slack_env, fake):
    from tests.test_slack import CHANNEL, mention, profile, wait_running, write_tokens
    from tests.test_slack_bot import in_thread

    creds = write_tokens(slack_env)
    slack_env.write_config(
        slack={"enabled": True, "api_base_url": fake.api_url},
        **{
            "agents.default": {"command": [str(FAKES / "claude"), "-p"], "kind": "claude"},
            "slack.profiles.main": profile(creds),
        },
    )
    slack_env.start()
    wait_running(slack_env)
    root = "1700000900.000100"
    fake.push_event(mention(root, "first"))
    wait_for(lambda: len(fake.posted()) == 1, 30, what="the reply to the mention")
    for n, ts in enumerate(("1700000900.000200", "1700000900.000300"), start=2):
        fake.push_event(in_thread(ts, root, "U1", f"turn {n} please"))
        wait_for(lambda n=n: len(fake.posted()) == n, 30, what=f"reply {n}")
    texts = [p.params["text"] for p in fake.posted()]
    assert texts == ["turn 1: first", "turn 2: turn 2 please", "turn 3: turn 3 please"]
    assert all(p.params["thread_ts"] == root for p in fake.posted())
    first, second, third = calls(slack_env, "default", "claude")
    [session] = SessionStore(slack_env.state_dir).all()
    assert session.conversation == f"{CHANNEL}.{root}"
    assert "--resume" not in first
    assert second[-2:] == third[-2:] == ["--resume", session.session_id]
    slack_env.stop()  # the mapping survives a restart
    slack_env.start()
    wait_running(slack_env)
    fake.push_event(in_thread("1700000900.000400", root, "U1", "after a restart"))
    wait_for(lambda: len(fake.posted()) == 4, 30, what="the reply after the restart")
    assert fake.posted()[-1].params["text"] == "turn 4: after a restart"


def test_a_planted_symlink_at_sessions_json_is_replaced_never_written_through(claude_env, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("precious\n")
    claude_env.state_dir.mkdir(parents=True)
    (claude_env.state_dir / "sessions.json").symlink_to(outside)
    claude_env.start()
    enqueue(claude_env, "hi", "l1", conversationId="c")
    assert answer(claude_env, "l1") == "turn 1: hi"
    assert outside.read_text() == "precious\n"
    path = claude_env.state_dir / "sessions.json"
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert len(SessionStore(claude_env.state_dir).all()) == 1
