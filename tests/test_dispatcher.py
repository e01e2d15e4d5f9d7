"""Queue + dispatcher through a real supervisor: real files, real agent processes, signals.

Every test runs on both queue backends (the queue_backend fixture, tests/conftest.py): the
file queue, and the shared PostgreSQL queue of one host ("solo") with local ingress
through incoming/ and the outcomes written back into outgoing/ and failed/.
"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from agent.queue import Queue, new_message
from tests.helpers import pid_alive, pids_with_cmdline, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("queue_backend")]

FAST_RETRY = {"retry_backoff": 0.05, "retry_backoff_max": 0.2}


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return [str(path)]


def enqueue(env, text: str, message_id: str, **optional) -> None:
    data = new_message("local", text, "tester", "u1", message_id=message_id, **optional)
    queue = Queue(env.state_dir / "queue")
    queue.ensure_dirs()
    queue.enqueue(data, name=f"{message_id}.json")


def outgoing(env) -> dict[str, dict]:
    out = env.state_dir / "queue" / "outgoing"
    if not out.exists():
        return {}
    return {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


def failed_reason(env, name: str) -> str:
    return json.loads((env.state_dir / "queue" / "failed" / f"{name}.reason").read_text())["reason"]


def reply(env, message_id: str) -> dict | None:
    return outgoing(env).get(f"local_{message_id}.json")


def test_round_trip_reply_fields_events_and_health(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.start()
    enqueue(agent_env, "hello", "m1", conversationId="t1", channelProfileId="p")
    got = wait_for(lambda: reply(agent_env, "m1"), what="the reply to m1")
    assert got["message"] == "hello"
    assert got["originalMessage"] == "hello"
    assert (got["channel"], got["channelProfileId"], got["conversationId"]) == ("local", "p", "t1")
    assert (got["messageId"], got["sender"], got["agent"]) == ("m1", "tester", "default")
    assert isinstance(got["timestamp"], int)
    assert os.listdir(agent_env.state_dir / "queue" / "processing") == []
    for name in ("message.claimed", "message.done"):
        [record] = wait_for(lambda n=name: agent_env.events(n), what=name)
        assert record["message_id"] == "m1"
    # the state file is flushed about once a second
    detail = wait_for(
        lambda: (d := agent_env.worker("dispatcher")["detail"]).get("done") == 1 and d,
        what="dispatcher detail with done=1",
    )
    assert detail["in_flight"] == 0 and detail["pending"] == 0 and detail["last_processed"]
    queue = agent_env.worker("queue")["detail"]
    assert queue["depth"] == 0 and queue["watch"] == "inotify"


def test_send_waits_for_the_reply_and_says_at_once_when_nothing_runs(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    done = agent_env.agentctl("send", "--wait", "--timeout", "30", "anyone?", timeout=10)
    assert done.returncode == 3 and "not running" in done.stderr  # at once, nothing queued
    queued = agent_env.agentctl("send", "anyone?")  # without --wait it waits in the queue
    assert queued.returncode == 0 and "no supervisor is running" in queued.stderr
    agent_env.start()  # the waiting message is answered now; its reply stays in outgoing/
    wait_for(lambda: outgoing(agent_env), what="the earlier message's reply")
    done = agent_env.agentctl("send", "--wait", "--conversation", "c9", "ping pong")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ping pong\n"
    done = agent_env.agentctl("send", "--wait", "--agent", "nobody", "hello?")
    assert done.returncode == 78  # refused at once, before anything is queued
    assert "unknown agent 'nobody' (configured: default)" in done.stderr
    done = agent_env.agentctl("send", "no wait")
    assert done.returncode == 0 and done.stdout.startswith("queued local message ")


def test_same_conversation_runs_strictly_in_order(agent_env, tmp_path):
    log = tmp_path / "runs.log"
    command = script(
        tmp_path,
        "agent.sh",
        f't=$(cat); echo "start $t" >> {log}; sleep 0.05; echo "end $t" >> {log}; echo "$t"\n',
    )
    agent_env.write_config(
        **{"agents.default": {"command": command}, "dispatcher": {"concurrency": 4}}
    )
    for i in range(6):  # queued before start: all claimed in one batch
        enqueue(agent_env, f"m{i}", f"m{i}", conversationId="same")
    agent_env.start()
    wait_for(lambda: len(outgoing(agent_env)) == 6, what="six replies")
    expected = [f"{what} m{i}" for i in range(6) for what in ("start", "end")]
    assert log.read_text().split("\n")[:-1] == expected


def test_different_conversations_run_in_parallel(agent_env, tmp_path):
    # each run waits until both runs have started: only parallel runs can both finish
    started = tmp_path / "started"
    started.mkdir()
    command = script(
        tmp_path,
        "agent.sh",
        f"t=$(cat); touch {started}/$t\n"
        f'while [ "$(ls {started} | wc -l)" -lt 2 ]; do sleep 0.01; done; echo "$t"\n',
    )
    agent_env.write_config(
        **{
            "agents.default": {"command": command, "timeout": 20},
            "dispatcher": {"concurrency": 2, "max_attempts": 1},
        }
    )
    agent_env.start()
    enqueue(agent_env, "a", "a", conversationId="one")
    enqueue(agent_env, "b", "b", conversationId="two")
    wait_for(lambda: len(outgoing(agent_env)) == 2, timeout=15, what="both replies")
    assert agent_env.events("message.retry") == []


def test_failed_runs_are_retried_then_succeed(agent_env, tmp_path):
    command = script(
        tmp_path,
        "agent.sh",
        'cat > /dev/null; if [ "$AGENT_ATTEMPT" -lt 3 ]; then echo "boom $AGENT_ATTEMPT" >&2;'
        " exit 4; fi; echo fine\n",
    )
    agent_env.write_config(
        **{
            "agents.default": {"command": command},
            "dispatcher": {"max_attempts": 3, **FAST_RETRY},
        }
    )
    agent_env.start()
    enqueue(agent_env, "try me", "r1")
    assert wait_for(lambda: reply(agent_env, "r1"), what="a reply after retries")["message"] == (
        "fine"
    )
    retries = agent_env.events("message.retry")
    assert [r["attempts"] for r in retries] == [1, 2]
    assert retries[0]["message_id"] == "r1"
    assert "exit status 4: boom 1" in retries[0]["error"]


def test_a_message_that_keeps_failing_goes_to_failed_with_payload_intact(agent_env, tmp_path):
    command = script(tmp_path, "agent.sh", "cat > /dev/null; echo nope >&2; exit 1\n")
    agent_env.write_config(
        **{
            "agents.default": {"command": command},
            "dispatcher": {"max_attempts": 2, **FAST_RETRY},
        }
    )
    agent_env.start()
    enqueue(agent_env, "doomed", "f1", conversationId="c")
    enqueue(agent_env, "after", "f2", conversationId="c")  # not blocked for good behind f1
    failed = agent_env.state_dir / "queue" / "failed"
    wait_for(lambda: (failed / "local_f2.json").exists(), what="f2 in failed/")
    kept = json.loads((failed / "local_f1.json").read_text())
    assert (kept["message"], kept["conversationId"], kept["attempts"]) == ("doomed", "c", 1)
    reason = failed_reason(agent_env, "local_f1.json")
    assert reason.startswith("agent 'default' failed 2 time(s)")
    assert reason.endswith("exit status 1: nope")
    assert [r["message_id"] for r in agent_env.events("message.retry")] == ["f1", "f2"]
    record, _ = wait_for(
        lambda: len(events := agent_env.events("message.failed")) == 2 and events,
        what="two message.failed events",
    )
    assert record["message_id"] == "f1" and record["level"] == "error"
    assert outgoing(agent_env) == {}
    done = agent_env.agentctl("send", "--wait", "--timeout", "20", "x")
    assert done.returncode != 0 and "failed" in done.stderr


def test_a_second_message_with_an_answered_id_goes_to_failed_as_a_duplicate(agent_env):
    agent_env.start()
    enqueue(agent_env, "first", "d1")
    wait_for(lambda: reply(agent_env, "d1"), what="d1 answered")
    enqueue(agent_env, "second, same id", "d1-again")  # file name differs, messageId below
    data = new_message("local", "second", "tester", "u1", message_id="d1")
    Queue(agent_env.state_dir / "queue").enqueue(data, name="d1-dup.json")
    failed = agent_env.state_dir / "queue" / "failed"
    dup = wait_for(
        lambda: [p.name for p in failed.glob("local_d1.*.json")], what="the duplicate failed"
    )
    assert "duplicate messageId" in failed_reason(agent_env, dup[0])
    wait_for(lambda: reply(agent_env, "d1-again"), what="the queue flows on")
    assert reply(agent_env, "d1")["message"] == "first"


def test_malformed_input_goes_to_failed_and_never_blocks_the_queue(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.start()
    incoming = agent_env.state_dir / "queue" / "incoming"
    bad = {
        "broken.json": b'{"channel": "local", ',
        "array.json": b"[1, 2]",
        "noid.json": json.dumps({"channel": "local", "message": "x"}).encode(),
        "binary.json": b"\x00\xff\xfe",
    }
    for name, raw in bad.items():
        (agent_env.root / name).write_bytes(raw)
        os.rename(agent_env.root / name, incoming / name)
    enqueue(agent_env, "still works", "ok1")
    wait_for(lambda: reply(agent_env, "ok1"), what="the valid message's reply")
    failed = agent_env.state_dir / "queue" / "failed"
    wait_for(lambda: all((failed / n).exists() for n in bad), what="all bad files in failed/")
    assert "malformed JSON" in failed_reason(agent_env, "broken.json")
    assert "expected a JSON object" in failed_reason(agent_env, "array.json")
    assert "missing required field 'messageId'" in failed_reason(agent_env, "noid.json")
    assert "not UTF-8" in failed_reason(agent_env, "binary.json")
    for name in ("queue", "dispatcher"):
        worker = agent_env.worker(name)
        assert (worker["state"], worker["restarts"]) == ("running", 0)


def test_unknown_agent_and_no_agent_go_to_failed(agent_env):
    agent_env.write_config(
        **{"agents.one": {"command": ["cat"]}, "agents.two": {"command": ["cat"]}}
    )
    agent_env.start()
    enqueue(agent_env, "x", "u1", agent="three")
    enqueue(agent_env, "x", "u2")  # two agents, none named default
    enqueue(agent_env, "x", "u3", agent="two")
    failed = agent_env.state_dir / "queue" / "failed"
    wait_for(lambda: (failed / "local_u2.json").exists(), what="u2 in failed/")
    assert "unknown agent 'three' (configured: one, two)" in failed_reason(
        agent_env, "local_u1.json"
    )
    assert "none is called 'default'" in failed_reason(agent_env, "local_u2.json")
    assert wait_for(lambda: reply(agent_env, "u3"), what="u3's reply")["agent"] == "two"
    agent_env.stop()
    agent_env.write_config(no_agent=True)  # no [agents.*] at all
    agent_env.start()
    enqueue(agent_env, "x", "u4")
    wait_for(lambda: (failed / "local_u4.json").exists(), what="u4 in failed/")
    assert "no agent is configured" in failed_reason(agent_env, "local_u4.json")


def grandchild_script(tmp_path: Path, marker: Path | None = None) -> list[str]:
    """An agent that starts a long-lived helper (own pid + helper pid in pids.<n>)."""
    guard = f"[ -e {marker} ] || {{ cat; exit 0; }}\n" if marker else ""
    return script(
        tmp_path,
        "agent.sh",
        guard + f"sleep 300 & echo $$ $! > {tmp_path}/pids.tmp; mv {tmp_path}/pids.tmp "
        f"{tmp_path}/pids; wait\n",
    )


def read_pids(tmp_path: Path) -> list[int] | None:
    try:
        return [int(p) for p in (tmp_path / "pids").read_text().split()]
    except (OSError, ValueError):
        return None


def test_timeout_kills_the_whole_process_group(agent_env, tmp_path):
    agent_env.write_config(
        **{
            "agents.default": {"command": grandchild_script(tmp_path), "timeout": 0.5},
            "dispatcher": {"max_attempts": 1},
        }
    )
    agent_env.start()
    enqueue(agent_env, "hang", "t1")
    pids = wait_for(lambda: read_pids(tmp_path), what="the agent's pids")
    failed = agent_env.state_dir / "queue" / "failed"
    wait_for(lambda: (failed / "local_t1.json").exists(), what="t1 in failed/")
    assert "timed out after 0.5s" in failed_reason(agent_env, "local_t1.json")
    wait_for(lambda: not any(pid_alive(p) for p in pids), what="agent and helper gone")


def test_shutdown_kills_in_flight_runs_and_the_message_is_redone(
    agent_env, queue_backend, tmp_path
):
    marker = tmp_path / "slow"
    marker.touch()
    agent_env.write_config(**{"agents.default": {"command": grandchild_script(tmp_path, marker)}})
    agent_env.start()
    enqueue(agent_env, "long job", "s1")
    pids = wait_for(lambda: read_pids(tmp_path), what="the agent's pids")
    done = agent_env.stop()
    assert done.returncode == 0, done.stderr
    assert not any(pid_alive(p) for p in pids)
    processing = agent_env.state_dir / "queue" / "processing"
    if queue_backend.postgres:  # released to the shared queue: kept, not failed, no attempt
        assert [r[:3] for r in queue_backend.rows()] == [("s1", "queued", 0)]
        assert os.listdir(processing) == []
    else:
        assert [p.name for p in processing.iterdir()] == ["s1.json"]  # kept, not failed
    assert agent_env.events("message.retry") == []
    marker.unlink()
    agent_env.start()
    assert wait_for(lambda: reply(agent_env, "s1"), what="s1 redone")["message"] == "long job"
    if queue_backend.postgres:
        assert [r[:3] for r in queue_backend.rows()] == [("s1", "done", 1)]
    else:
        [record] = agent_env.events("queue.recovered")
        assert record["count"] == 1


def test_child_env_and_workdir(agent_env, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = script(
        tmp_path, "agent.sh", 'cat >/dev/null; echo "$(pwd) $AGENT_CHANNEL $AGENT_MESSAGE_ID"\n'
    )
    agent_env.write_config(**{"agents.w": {"command": command, "workdir": str(workdir)}})
    agent_env.start()
    enqueue(agent_env, "where", "e1")
    got = wait_for(lambda: reply(agent_env, "e1"), what="e1's reply")
    assert got["message"] == f"{workdir} local e1"


def test_sigkill_of_supervisor_mid_run_loses_nothing_and_leaves_no_run(agent_env, tmp_path):
    marker = tmp_path / "slow"
    marker.touch()
    agent_env.write_config(**{"agents.default": {"command": grandchild_script(tmp_path, marker)}})
    pid = agent_env.start()
    enqueue(agent_env, "survive", "k1")
    agent, helper = wait_for(lambda: read_pids(tmp_path), what="the agent's pids")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), what="the supervisor gone")
    # the run dies with the supervisor (death signal); its helper at the next start
    wait_for(lambda: not pid_alive(agent), what="the agent run gone with its supervisor")
    marker.unlink()
    agent_env.start()
    wait_for(lambda: not pid_alive(helper), what="the orphaned helper killed at start")
    [record] = agent_env.events("dispatcher.orphans_killed")
    assert record["process_groups"] == str(agent)
    assert wait_for(lambda: reply(agent_env, "k1"), what="k1 redone")["message"] == "survive"
    assert os.listdir(agent_env.state_dir / "runs") == []


def test_agent_runs_do_not_outlive_a_kill_9_of_the_supervisor(agent_env, tmp_path):
    marker = f"agent-orphan-{os.getpid()}"
    script = tmp_path / "agent.sh"  # the agent starts a helper in its group, then blocks
    sleeper = f"{sys.executable} -c 'import time; time.sleep(600)'"
    script.write_text(f"#!/bin/sh\n{sleeper} helper-{marker} &\nexec {sleeper} agent-{marker}\n")
    script.chmod(0o755)
    agent_env.write_config(**{"agents.default": {"command": [str(script)], "timeout": 900}})
    pid = agent_env.start()
    queue = Queue(agent_env.state_dir / "queue")
    queue.enqueue(new_message("local", "hi", sender="t", sender_id="t", message_id="m1"))
    wait_for(lambda: len(pids_with_cmdline(marker)) == 2, what="the agent and its helper running")
    (agent,) = pids_with_cmdline(f"agent-{marker}")
    (helper,) = pids_with_cmdline(f"helper-{marker}")
    os.kill(pid, signal.SIGKILL)
    # the agent itself dies with the supervisor (pdeathsig); its helper may linger ...
    wait_for(lambda: not pid_alive(agent), what="the agent to die with the supervisor")
    agent_env.start()  # (which runs the recovered message again: at-least-once)
    # ... until the next start kills what the run ledger says was left behind.
    wait_for(lambda: agent_env.events("dispatcher.orphans_killed"), what="orphans_killed")
    wait_for(lambda: not pid_alive(helper), what="the old helper to be killed")
