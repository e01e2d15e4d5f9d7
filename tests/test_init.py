"""The first hour: `agentctl init`, and what status and send say when no agent is configured
or no supervisor runs (real agentctl processes, real files)."""

import os
from pathlib import Path

import pytest

from tests.helpers import AgentEnv

pytestmark = pytest.mark.integration

FAKES = Path(__file__).with_name("fake_agents")


@pytest.fixture
def fresh(tmp_path):
    """An agentctl environment whose config file does not exist yet."""
    env = AgentEnv(tmp_path)
    env.env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    yield env
    env.agentctl("stop")


def test_init_with_cat_makes_a_config_that_answers_at_once(fresh):
    done = fresh.agentctl("init", "--agent", "cat")
    assert done.returncode == 0, done.stderr
    assert f"wrote {fresh.config_path} (agent plain: cat)" in done.stdout
    assert f"next: agentctl --config {fresh.config_path} start" in done.stdout
    assert fresh.config_path.stat().st_mode & 0o777 == 0o600
    assert fresh.agentctl("start").returncode == 0
    sent = fresh.agentctl("send", "--wait", "--timeout", "30", "hello")
    assert (sent.returncode, sent.stdout.strip()) == (0, "hello"), sent.stderr


def test_init_never_overwrites_without_force(fresh):
    fresh.config_path.write_text("# mine\n")
    done = fresh.agentctl("init", "--agent", "cat")
    assert done.returncode == 1 and "exists; not overwriting it (use --force" in done.stderr
    assert fresh.config_path.read_text() == "# mine\n"
    assert fresh.agentctl("init", "--agent", "cat", "--force").returncode == 0
    assert 'command = ["cat"]' in fresh.config_path.read_text()


def test_init_finds_claude_then_codex_on_path(fresh, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "codex").symlink_to(FAKES / "codex")
    path = f"{bin_dir}:/usr/bin:/bin"
    done = fresh.agentctl("init", PATH=path)
    assert done.returncode == 0 and "(agent codex:" in done.stdout
    assert 'kind = "codex"' in fresh.config_path.read_text()
    (bin_dir / "claude").symlink_to(FAKES / "claude")
    done = fresh.agentctl("init", "--force", PATH=path)
    assert f"(agent claude: {bin_dir}/claude -p)" in done.stdout
    none = fresh.agentctl("init", "--force", PATH="/usr/bin:/bin")
    assert none.returncode == 1 and "--agent cat" in none.stderr


def test_with_no_agent_status_says_so_and_send_fails_at_once(fresh):
    fresh.write_config(no_agent=True)
    fresh.start()
    code, report = fresh.status()
    assert code == 2 and report["supervisor"]["health"] == "degraded"
    dispatcher = next(w for w in report["workers"] if w["name"] == "dispatcher")
    assert dispatcher["detail"]["degraded"].startswith("no agent configured")
    assert "no agent configured" in fresh.agentctl("status").stdout
    sent = fresh.agentctl("send", "hi")
    assert sent.returncode == 78 and "no agent is configured" in sent.stderr
    assert '[agents.default]\n  command = ["claude", "-p"]' in sent.stderr
    assert os.listdir(fresh.state_dir / "queue" / "incoming") == []


def test_send_wait_without_a_supervisor_fails_at_once_and_queues_nothing(fresh):
    fresh.write_config(**{"agents.default": {"command": ["cat"]}})
    done = fresh.agentctl("send", "--wait", "hi", timeout=10)
    assert done.returncode == 3 and "not running" in done.stderr
    incoming = fresh.state_dir / "queue" / "incoming"
    assert not incoming.exists() or os.listdir(incoming) == []
