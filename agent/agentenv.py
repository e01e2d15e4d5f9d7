"""What an agent run is given: its own home, its working directory and a clean environment.

Invariants:
- Every agent has a home of its own, state_dir/home/NAME (0700), apart from the runtime's
  files (queue, state, lock, logs). The provider CLIs keep their sessions and settings there
  (`~/.claude`, `~/.codex`), so those survive restarts and upgrades and `dpkg --purge`
  removes them with the rest of state_dir. The working directory is `[agents.NAME] workdir`,
  else that home: a CLI that writes into its working directory never lands beside the queue.
- The environment is built from nothing: PASSED_THROUGH from the supervisor's own
  environment (never CREDENTIALS_DIRECTORY, NOTIFY_SOCKET, WATCHDOG_*, INVOCATION_ID or
  anything else the supervisor was given), HOME, the message's AGENT_* variables, then what
  `[agents.NAME] env` adds.
- A command that cannot start (not found on that PATH, not executable, a missing workdir) is
  a ConfigError before the supervisor reports ready, never a run that fails at every message.
"""

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from agent.config import AgentConfig, Config
from agent.errors import ConfigError, os_error

PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
HOME_DIR = "home"


def agent_home(config: Config, name: str) -> Path:
    return config.state_dir / HOME_DIR / name


def agent_workdir(config: Config, name: str) -> Path:
    workdir = config.agents[name].workdir
    return Path(workdir) if workdir else agent_home(config, name)


def prepare_home(config: Config, name: str) -> Path:
    """Create the agent's home (0700) if needed; refuse one that is not a real directory of ours."""
    home = agent_home(config, name)
    for directory in (home.parent, home):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(
                f"{directory}: expected a directory owned by uid {os.geteuid()} for the "
                f"agent's home, found {_describe(info)}"
            )
    return home


def agent_environment(
    config: Config,
    name: str,
    message_vars: Mapping[str, str],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    base = os.environ if base is None else base
    env = {key: base[key] for key in PASSED_THROUGH if base.get(key)}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["HOME"] = str(agent_home(config, name))
    env["AGENT_NAME"] = name
    env.update(message_vars)
    env.update(config.agents[name].env)
    return env


def prepare_agents(config: Config) -> None:
    """At start, before READY: every agent's home exists and its command and workdir work."""
    for name in config.agents:
        try:
            prepare_home(config, name)
        except OSError as exc:
            raise os_error(exc) from None
    check_agent_commands(config)
    for name, agent in config.agents.items():
        if agent.workdir and not Path(agent.workdir).is_dir():
            raise ConfigError(
                f"{config.display_path}: [agents.{name}] workdir: {agent.workdir} is not a "
                "directory"
            )


def check_agent_commands(config: Config, base: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first agent whose command cannot start."""
    for name, agent in config.agents.items():
        where = f"{config.display_path}: [agents.{name}]"
        path = agent_environment(config, name, {}, base)["PATH"]
        _check_command(agent, where, path)


def _check_command(agent: AgentConfig, where: str, path: str) -> None:
    program = agent.command[0]
    if not program:
        raise ConfigError(f"{where} command: the program name (first element) is empty")
    if "/" in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ConfigError(f"{where} command: {program} is not an executable file")
    elif shutil.which(program, path=path) is None:
        raise ConfigError(f"{where} command: {program!r} not found on PATH ({path})")


def _describe(info: os.stat_result) -> str:
    kind = "a directory" if stat.S_ISDIR(info.st_mode) else "something else than a directory"
    if stat.S_ISLNK(info.st_mode):
        kind = "a symbolic link"
    return f"{kind} owned by uid {info.st_uid}"
