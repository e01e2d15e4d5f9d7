"""Live reload through real supervisors: SIGHUP / `agentctl reload` re-read the config
without dropping a message; an invalid file is refused and the old config keeps running."""

import json
import os
import signal
import threading

import pytest

from agent.queue import Queue, new_message
from tests.helpers import wait_for
from tests.test_dispatcher import enqueue, outgoing, reply, script

pytestmark = pytest.mark.integration


def echo_agent(tmp_path, name: str, ledger) -> list[str]:
    """An agent that answers `<name>: <text>` and notes each message id it runs."""
    return script(
        tmp_path, f"{name}.sh", f'echo "$AGENT_MESSAGE_ID" >> {ledger}\nprintf "{name}: "; cat\n'
    )


def write_agents(env, command: list[str], **more) -> None:
    env.write_config(**{"agents.default": {"command": command}, **more})


def test_reload_under_a_stream_of_messages_loses_none_and_runs_none_twice(agent_env, tmp_path):
    ledger = tmp_path / "ran.log"
    write_agents(agent_env, echo_agent(tmp_path, "old", ledger), dispatcher={"concurrency": 2})
    agent_env.start()
    queue = Queue(agent_env.state_dir / "queue")
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            message_id = f"s{n}"
            data = new_message("local", f"text {n}", "t", "1", message_id=message_id)
            data["conversationId"] = f"c{n % 5}"
            queue.enqueue(data, name=f"{message_id}.json")
            sent.append(message_id)
            n += 1
            stop.wait(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: len(outgoing(agent_env)) >= 20, what="replies before the reload")
        write_agents(agent_env, echo_agent(tmp_path, "new", ledger), dispatcher={"concurrency": 3})
        done = agent_env.agentctl("reload")
        assert done.returncode == 0, done.stderr
        assert "agents" in done.stdout and "[dispatcher]" in done.stdout
        after_verdict = len(sent)
    finally:
        stop.set()
        producer.join()
    wait_for(lambda: len(outgoing(agent_env)) == len(sent), timeout=60, what="every reply")
    replies = outgoing(agent_env)
    assert not list((agent_env.state_dir / "queue" / "failed").glob("*"))
    ran = ledger.read_text().split()
    assert sorted(ran) == sorted(sent), "a message was run twice or not at all"
    for message_id in sent[after_verdict + 1 :]:  # enqueued after the verdict: the new agent
        assert replies[f"local_{message_id}.json"]["message"].startswith("new: ")
    [reloaded] = agent_env.events("supervisor.reloaded")
    assert reloaded["workers"] == "queue,dispatcher"  # (the queue checks a message's agent)


@pytest.mark.parametrize(
    "breakage, said, signalled",
    [
        # not even TOML: its state_dir is unknown, so agentctl says what is wrong itself
        ("[dispatcher\nconcurrency = 2\n", "invalid TOML", False),
        ("[dispatcher]\nconcurrency = 0\n", "[dispatcher] concurrency", True),
        ('[agents.default]\ncommand = ["/no/such/agent"]\n', "is not an executable file", True),
        ("[bogus]\n", "unknown key 'bogus'", True),
    ],
)
def test_an_invalid_reload_is_refused_and_the_old_agent_keeps_answering(
    agent_env, tmp_path, breakage, said, signalled
):
    write_agents(agent_env, ["cat"])
    pid = agent_env.start()
    good = agent_env.config_path.read_text()
    agent_env.config_path.write_text(good.split("[agents.default]")[0] + breakage)
    done = agent_env.agentctl("reload")
    assert done.returncode == 78, done.stdout + done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    failed = agent_env.events("supervisor.reload.failed")
    assert [said in f["error"] for f in failed] == ([True] if signalled else [])
    enqueue(agent_env, "still the old one", "o1")
    assert wait_for(lambda: reply(agent_env, "o1"), what="o1")["message"] == "still the old one"
    agent_env.config_path.write_text(good)
    code, report = agent_env.status()
    assert code == 0 and report["supervisor"]["pid"] == pid


def test_settings_that_cannot_change_live_are_named_in_the_refusal(agent_env, tmp_path):
    write_agents(agent_env, ["cat"])
    pid = agent_env.start()
    text = agent_env.config_path.read_text()
    other = tmp_path / "other-state"
    agent_env.config_path.write_text(text.replace(str(agent_env.state_dir), str(other), 1))
    # agentctl follows the new file to a state_dir where nothing runs ...
    done = agent_env.agentctl("reload")
    assert done.returncode == 3 and "not running" in done.stderr
    os.kill(pid, signal.SIGHUP)  # ... the supervisor itself refuses the move
    [failed] = wait_for(lambda: agent_env.events("supervisor.reload.failed"), what="refusal")
    assert "state_dir cannot change while the supervisor runs" in failed["error"]


def test_sighup_reloads_and_a_reload_can_switch_a_worker_on_and_off(agent_env, tmp_path):
    write_agents(agent_env, ["cat"])
    pid = agent_env.start()
    assert agent_env.worker("heartbeat")["state"] == "disabled"
    write_agents(agent_env, ["cat"], heartbeat={"interval": 3600})
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: agent_env.worker("heartbeat")["state"] == "running", what="heartbeat on")
    [event] = agent_env.events("supervisor.reloaded")
    assert event["workers"] == "heartbeat" and event["changed"] == "[heartbeat]"
    write_agents(agent_env, ["cat"])
    assert agent_env.agentctl("reload").returncode == 0
    assert agent_env.worker("heartbeat")["state"] == "disabled"
    unchanged = agent_env.agentctl("reload")
    assert unchanged.returncode == 0 and unchanged.stdout.strip().endswith("no change")
    assert agent_env.status()[1]["supervisor"]["pid"] == pid


def test_a_run_in_flight_finishes_under_the_settings_it_started_with(agent_env, tmp_path):
    gate = tmp_path / "gate"
    slow = script(tmp_path, "slow.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\necho old\n")
    write_agents(agent_env, slow)
    agent_env.start()
    enqueue(agent_env, "x", "f1")
    wait_for(lambda: agent_env.worker("dispatcher")["detail"]["in_flight"] == 1, what="in flight")
    write_agents(agent_env, script(tmp_path, "new.sh", "echo new\n"))
    assert agent_env.agentctl("reload").returncode == 0
    gate.touch()
    assert wait_for(lambda: reply(agent_env, "f1"), what="f1")["message"] == "old"
    enqueue(agent_env, "y", "f2")
    assert wait_for(lambda: reply(agent_env, "f2"), what="f2")["message"] == "new"


def test_reload_without_a_supervisor_says_not_running(agent_env):
    done = agent_env.agentctl("reload")
    assert done.returncode == 3 and "not running" in done.stderr


def test_the_reload_verdict_is_in_the_state_file(agent_env):
    write_agents(agent_env, ["cat"])
    agent_env.start()
    agent_env.agentctl("reload")
    saved = json.loads((agent_env.state_dir / "state.json").read_text())["supervisor"]
    assert saved["reloads"] == 1 and saved["last_reload_error"] is None


def test_a_message_for_an_agent_added_by_a_reload_is_answered(agent_env, tmp_path):
    write_agents(agent_env, ["cat"])
    agent_env.start()
    agent_env.write_config(
        **{"agents.default": {"command": ["cat"]}, "agents.added": {"command": ["echo", "new"]}}
    )
    assert agent_env.agentctl("reload").returncode == 0
    enqueue(agent_env, "x", "n1", agent="added")
    assert wait_for(lambda: reply(agent_env, "n1"), what="n1")["message"] == "new"


def test_a_worker_that_will_not_stop_for_a_reload_is_never_doubled(agent_env):
    write_agents(agent_env, ["cat"], heartbeat={"interval": 3600})
    agent_env.start(AGENT_FAULT_INJECT="heartbeat:slow-stop")
    write_agents(agent_env, ["cat"], heartbeat={"interval": 1800})
    done = agent_env.agentctl("reload")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "worker heartbeat did not stop within stop_timeout" in done.stderr
    code, report = agent_env.status()
    heartbeats = [w for w in report["workers"] if w["name"] == "heartbeat"]
    assert len(heartbeats) == 1 and heartbeats[0]["state"] == "error", heartbeats
    assert code == 2


def test_a_reload_that_changes_the_queue_backend_rebuilds_the_slack_worker(tmp_path):
    from agent.config import Config, PostgresConfig, QueueConfig
    from agent.reload import plan_reload

    files = Config(None, tmp_path)
    shared = Config(
        None,
        tmp_path,
        queue=QueueConfig(backend="postgres", postgres=PostgresConfig(dsn="dbname=agent")),
    )
    assert "slack" in plan_reload(files, shared).workers  # its stores move to the database
    calmer = Config(None, tmp_path, queue=QueueConfig(stall_timeout=900.0))
    assert "slack" not in plan_reload(files, calmer).workers
