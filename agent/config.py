"""Configuration: one TOML file, validated strictly, with embedded defaults.

Which file: `--config PATH`, else `$AGENT_CONFIG`, else /etc/agent/agent.toml when it
exists, else none (embedded defaults with per-user directories). Every problem is a
ConfigError naming the file, the key and what was expected (exit 78).
"""

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/agent/agent.toml")
SYSTEM_STATE_DIR = Path("/var/lib/agent")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_SINKS = ("auto", "journald", "file")


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _setting(default: Any, expect: str, check=None, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying what the key expects, for error messages."""
    return field(default=default, metadata={"expect": expect, "check": check, "choices": choices})


def _table_of(cls: type) -> Any:
    """A field holding named sub-tables, like [slack.profiles.NAME]."""
    return field(default_factory=dict, metadata={"table_of": cls})


@dataclass(frozen=True)
class SupervisorConfig:
    stop_timeout: float = _setting(10.0, "a number of seconds > 0", _positive)
    hang_timeout: float = _setting(10.0, "a number of seconds > 0", _positive)
    restart_backoff: float = _setting(1.0, "a number of seconds > 0", _positive)
    restart_backoff_max: float = _setting(30.0, "a number of seconds > 0", _positive)
    restart_limit: int = _setting(5, "a whole number >= 1", lambda v: v >= 1)
    restart_window: float = _setting(60.0, "a number of seconds > 0", _positive)


@dataclass(frozen=True)
class LoggingConfig:
    sink: str = _setting("auto", "one of auto, journald, file", choices=LOG_SINKS)
    level: str = _setting("info", "one of debug, info, warning, error", choices=LOG_LEVELS)


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: float = _setting(0.0, "a number of seconds >= 0 (0 disables)", _non_negative)


@dataclass(frozen=True)
class DispatcherConfig:
    concurrency: int = _setting(4, "a whole number >= 1", lambda v: v >= 1)
    max_attempts: int = _setting(3, "a whole number >= 1", lambda v: v >= 1)
    retry_backoff: float = _setting(1.0, "a number of seconds > 0", _positive)
    retry_backoff_max: float = _setting(60.0, "a number of seconds > 0", _positive)


@dataclass(frozen=True)
class AgentConfig:
    """[agents.NAME]: the AI agent command a message is handed to (argv, no shell)."""

    command: tuple[str, ...] = _setting((), "a non-empty array of strings (argv)", bool)
    timeout: float = _setting(300.0, "a number of seconds > 0", _positive)
    workdir: str | None = _setting(None, "a directory path string")


@dataclass(frozen=True)
class SlackProfileConfig:
    """[slack.profiles.NAME]: one Slack app connection."""

    bot_token_file: str = _setting("", "a file path string (xoxb- token)", bool)
    app_token_file: str = _setting("", "a file path string (xapp- token)", bool)
    agent: str | None = _setting(None, "the name of an [agents.NAME] table")
    channels: tuple[str, ...] = _setting((), "an array of channel ids")


@dataclass(frozen=True)
class SlackConfig:
    enabled: bool = _setting(False, "true or false")
    api_base_url: str = _setting("https://slack.com/api/", "a URL string")
    profiles: dict[str, SlackProfileConfig] = _table_of(SlackProfileConfig)


SECTIONS: dict[str, type] = {
    "supervisor": SupervisorConfig,
    "logging": LoggingConfig,
    "heartbeat": HeartbeatConfig,
    "dispatcher": DispatcherConfig,
    "slack": SlackConfig,
}
TABLES_OF: dict[str, type] = {"agents": AgentConfig}
TOP_LEVEL_KEYS = ("state_dir",)


@dataclass(frozen=True)
class Config:
    path: Path | None  # the file it came from; None means embedded defaults
    state_dir: Path
    supervisor: SupervisorConfig = SupervisorConfig()
    logging: LoggingConfig = LoggingConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    slack: SlackConfig = SlackConfig()
    agents: dict[str, AgentConfig] = field(default_factory=dict)
    runtime_dir: Path | None = None  # $RUNTIME_DIRECTORY under systemd

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "agent.lock"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "agent.jsonl"

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "queue"

    @property
    def display_path(self) -> str:
        return str(self.path) if self.path else "(embedded defaults)"


def choose_config_path(explicit: str | None, env: dict[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("AGENT_CONFIG"):
        return Path(env["AGENT_CONFIG"])
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return None


def load_config(explicit: str | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    path = choose_config_path(explicit, env)
    table = _read_toml(path) if path else {}
    return _build(table, path, env)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _build(table: dict[str, Any], path: Path | None, env: dict[str, str]) -> Config:
    where = str(path) if path else "(embedded defaults)"
    for key, value in table.items():
        if key in SECTIONS or key in TABLES_OF:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table, got {_kind(value)}")
        elif key not in TOP_LEVEL_KEYS:
            known = ", ".join([*TOP_LEVEL_KEYS, *(f"[{s}]" for s in [*SECTIONS, *TABLES_OF])])
            raise ConfigError(f"{where}: unknown key '{key}' (expected one of {known})")
    sections = {
        name: _section(cls, table.get(name, {}), where, name) for name, cls in SECTIONS.items()
    }
    tables = {
        name: _tables(cls, table.get(name, {}), where, name) for name, cls in TABLES_OF.items()
    }
    config = Config(
        path=path.resolve() if path else None,
        state_dir=_state_dir(table, path, env, where),
        runtime_dir=_first_dir(env.get("RUNTIME_DIRECTORY")),
        **sections,
        **tables,
    )
    _check_references(config, where)
    return config


def _tables(cls: type, values: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    result = {}
    for sub, sub_values in values.items():
        if not isinstance(sub_values, dict):
            raise ConfigError(f"{where}: [{name}.{sub}] must be a table, got {_kind(sub_values)}")
        result[sub] = _section(cls, sub_values, where, f"{name}.{sub}")
    return result


def _check_references(config: Config, where: str) -> None:
    for name, profile in config.slack.profiles.items():
        if profile.agent is not None and profile.agent not in config.agents:
            raise ConfigError(
                f"{where}: [slack.profiles.{name}] agent: expected the name of an "
                f"[agents.NAME] table, got {profile.agent!r}"
            )


def _section(cls: type, values: dict[str, Any], where: str, name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    chosen: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}' in [{name}] (expected one of {', '.join(fields)})"
            )
        label = f"{where}: [{name}] {key}"
        table_of = fields[key].metadata.get("table_of")
        if table_of is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: expected a table of tables, got {_kind(value)}")
            chosen[key] = _tables(table_of, value, where, f"{name}.{key}")
        else:
            chosen[key] = _checked(fields[key], value, label)
    for key, spec in fields.items():
        check = spec.metadata.get("check")
        if key not in chosen and check and not check(spec.default):
            raise ConfigError(
                f"{where}: [{name}] {key}: missing; expected {spec.metadata['expect']}"
            )
    return cls(**chosen)


def _checked(spec: dataclasses.Field, value: Any, label: str) -> Any:
    meta = spec.metadata
    wrong = ConfigError(f"{label}: expected {meta['expect']}, got {value!r} ({_kind(value)})")
    if spec.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        value = float(value)
    elif spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
    elif spec.type is bool:
        if not isinstance(value, bool):
            raise wrong
    elif spec.type in (str, str | None) and not isinstance(value, str):
        raise wrong
    elif spec.type == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong
        value = tuple(value)
    if meta["choices"] and value not in meta["choices"]:
        raise wrong
    if meta["check"] and not meta["check"](value):
        raise wrong
    return value


def _state_dir(table: dict[str, Any], path: Path | None, env: dict[str, str], where: str) -> Path:
    if "state_dir" in table:
        value = table["state_dir"]
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{where}: state_dir: expected a directory path string, got {value!r}"
                f" ({_kind(value)})"
            )
        state_dir = Path(value).expanduser()
        if not state_dir.is_absolute() and path is not None:
            state_dir = path.resolve().parent / state_dir
        return state_dir.resolve()
    from_unit = _first_dir(env.get("STATE_DIRECTORY"))
    if from_unit:
        return from_unit
    if path is not None and path.resolve() == SYSTEM_CONFIG:
        return SYSTEM_STATE_DIR
    xdg = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local/state")
    return Path(xdg) / "agent"


def _first_dir(value: str | None) -> Path | None:
    """systemd passes several directories separated by ':'; the first is ours."""
    if not value:
        return None
    return Path(value.split(":")[0])


def _kind(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        dict: "table",
        list: "array",
    }.get(type(value), type(value).__name__)
