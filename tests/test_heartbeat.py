"""The heartbeat worker through a real supervisor: prompts, replies, misses."""

import os

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def test_heartbeat_uses_heartbeat_md_from_the_workdir(agent_env, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "heartbeat.md").write_text("Status from heartbeat.md\nsecond line\n")
    agent_env.write_config(
        **{
            "agents.default": {"command": ["cat"], "workdir": str(workdir)},
            "heartbeat": {"interval": 0.5},
        }
    )
    agent_env.start()
    record = wait_for(lambda: agent_env.events("heartbeat.reply"), what="heartbeat.reply")[0]
    assert record["agent"] == "default"
    assert record["reply"] == "Status from heartbeat.md"  # the first line only
    assert record["message_id"].startswith("default-")
    outgoing = agent_env.state_dir / "queue" / "outgoing"
    wait_for(
        lambda: not list(outgoing.glob("heartbeat_*.json")) or None,
        timeout=5,
        what="heartbeat replies consumed",
    )
    detail = wait_for(
        lambda: (
            agent_env.worker("heartbeat")["detail"].get("last_reply")
            and agent_env.worker("heartbeat")["detail"]
        ),
        what="heartbeat detail",
    )
    assert detail["missed"] == 0


def test_heartbeat_without_file_uses_builtin_prompt_for_every_agent(agent_env):
    agent_env.write_config(
        **{
            "agents.alpha": {"command": ["cat"]},
            "agents.beta": {"command": ["cat"]},
            "heartbeat": {"interval": 0.5},
        }
    )
    agent_env.start()
    records = wait_for(
        lambda: (
            {r["agent"]: r for r in agent_env.events("heartbeat.reply")}.keys() >= {"alpha", "beta"}
            and agent_env.events("heartbeat.reply")
        ),
        what="heartbeat replies from both agents",
    )
    assert all(r["reply"].startswith("This is a scheduled heartbeat check") for r in records)


def test_heartbeat_missed_when_no_reply_in_time(agent_env, tmp_path):
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\ncat >/dev/null; sleep 5; echo late\n")
    slow.chmod(0o755)
    agent_env.write_config(
        **{
            "agents.default": {"command": [str(slow)], "timeout": 10},
            "heartbeat": {"interval": 0.5},
        }
    )
    agent_env.start()
    record = wait_for(lambda: agent_env.events("heartbeat.missed"), what="heartbeat.missed")[0]
    assert record["agent"] == "default" and record["level"] == "warning"
    assert record["reason"] == "no reply in time"
    # While that heartbeat is still queued, later ticks do not pile more into its lane.
    wait_for(lambda: agent_env.worker("heartbeat")["detail"]["skipped"] >= 4, what="skipped ticks")
    queue = agent_env.state_dir / "queue"
    queued = [n for d in ("incoming", "processing") for n in os.listdir(queue / d)]
    assert len(queued) == 1, queued


def test_heartbeat_disabled_by_default(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.start()
    assert agent_env.worker("heartbeat")["state"] == "disabled"
