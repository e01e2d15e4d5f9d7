"""`agentctl init`: a commented starter config in the right place, with a working agent.

Where: --config PATH / $AGENT_CONFIG, else /etc/agent/agent.toml for root, else the user's
$XDG_CONFIG_HOME/agent/agent.toml (~/.config/agent/agent.toml), which agentctl then finds by
itself. The agent: `--agent claude|codex|cat`, else the first of claude, codex found on PATH.
An existing file is only replaced with --force. The file is checked by the same loader
`start` uses before it is put in place (atomically, 0640 for the system file, else 0600).
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.config import SYSTEM_CONFIG, load_config, user_config_path
from agent.errors import AgentError, ConfigError
from agent.fsutil import atomic_write_bytes

KNOWN_AGENTS = ("claude", "codex")


@dataclass(frozen=True)
class Written:
    path: Path
    agent: str
    next_step: str


def init_config(explicit: str | None, agent: str | None, force: bool) -> Written:
    path = Path(explicit) if explicit else _default_path()
    if path.exists() and not force:
        raise AgentError(f"{path} exists; not overwriting it (use --force to replace it)")
    kind, command = _agent(agent)
    text = starter_config(kind, command)
    path.parent.mkdir(mode=0o755 if path == SYSTEM_CONFIG else 0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(), mode=0o640 if path == SYSTEM_CONFIG else 0o600)
    try:
        load_config(str(path))
    except ConfigError as exc:  # a bug of ours; never leave a file start would refuse
        path.unlink()
        raise AgentError(f"the starter config failed its own check: {exc}") from None
    return Written(path, f"{kind}: {' '.join(command)}", _next_step(path, explicit))


def _default_path() -> Path:
    if os.environ.get("AGENT_CONFIG"):
        return Path(os.environ["AGENT_CONFIG"])
    return SYSTEM_CONFIG if os.geteuid() == 0 else user_config_path(os.environ)


def _agent(wanted: str | None) -> tuple[str, list[str]]:
    if wanted == "cat":
        return "plain", ["cat"]
    candidates = [wanted] if wanted else list(KNOWN_AGENTS)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return name, _command(name, found)
    if wanted:
        raise AgentError(f"--agent {wanted}: {wanted!r} is not on PATH; install it first")
    raise AgentError(
        "neither claude nor codex is on PATH: install one (npm install -g "
        "@anthropic-ai/claude-code), or use --agent cat for a smoke test"
    )


def _command(kind: str, path: str) -> list[str]:
    if kind == "claude":
        return [path, "-p"]
    return [path, "exec", "--skip-git-repo-check"]


def _next_step(path: Path, explicit: str | None) -> str:
    if path == SYSTEM_CONFIG and Path("/run/systemd/system").is_dir():
        return "systemctl restart agent && agentctl send --wait 'hello'"
    option = f"--config {path} " if explicit else ""
    return f"agentctl {option}start && agentctl {option}send --wait 'hello'"


def starter_config(kind: str, command: list[str]) -> str:
    argv = ", ".join(f'"{part}"' for part in command)
    return f"""\
# agent configuration, written by `agentctl init`. Every setting and its default:
# README.md, "Configuration" (/usr/share/doc/agent/README.md.gz when installed).
# After a change: agentctl reload (under systemd: systemctl reload agent).

# The agent every message goes to, unless a message names another [agents.NAME].
[agents.default]
# plain: the message on stdin, the reply from stdout. claude / codex: the CLI's JSON
# output, and one CLI session per conversation (a Slack thread continues its session).
kind = "{kind}"
command = [{argv}]
# Seconds one run may take; stdout beyond max_output_bytes fails the run.
#timeout = 300
#max_output_bytes = 4194304
# Its working directory; by default its own home, state_dir/home/default.
#workdir = "/srv/repos/app"
# A new session after this many quiet seconds (0: never).
#session_idle_reset = 0

# Variables added to the agent's (otherwise clean) environment.
#[agents.default.env]
#ANTHROPIC_BASE_URL = "https://api.anthropic.com"

[dispatcher]
# Runs at once (one conversation runs in order), and tries per message.
#concurrency = 4
#max_attempts = 3

[heartbeat]
# Seconds between prompts the agent gets from its heartbeat.md; 0 disables it.
#interval = 0

[logging]
# auto: journald when there is one, else state_dir/logs/agent.jsonl.
#sink = "auto"
#level = "info"

# Slack: see docs/slack.md.
#[slack]
#enabled = true
#[slack.profiles.default]
#bot_token_file = "slack-bot-token"
#app_token_file = "slack-app-token"
#channels = []
"""
