"""Configuration: one TOML file, validated strictly, with embedded defaults.

Which file: `--config PATH`, else `$AGENT_CONFIG`, else /etc/agent/agent.toml when it
exists, else none (embedded defaults with per-user directories). Every problem is a
ConfigError naming the file, the key and what was expected (exit 78).

Each section declares its keys as `Setting`s (default, kind, what it expects). This is a
small hand-rolled schema rather than dataclasses because `agentctl status` loads the
config on every call, and importing dataclasses costs a third of an interpreter start.
"""

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/agent/agent.toml")
SYSTEM_STATE_DIR = Path("/var/lib/agent")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_SINKS = ("auto", "journald", "file")
SECONDS = "a number of seconds > 0"


class Setting:
    """One key: its default, its kind, and what it expects (said in error messages)."""

    def __init__(
        self,
        default: Any,
        kind: str,
        expect: str,
        check: Callable[[Any], bool] | None = None,
        choices: tuple[str, ...] = (),
        table_of: type | None = None,
        section: type | None = None,
        secret: bool = False,
    ):
        self.default, self.kind, self.expect = default, kind, expect
        self.check, self.choices, self.table_of = check, choices, table_of
        self.section = section  # kind "table": one sub-table of this Section type
        self.secret = secret  # its value is never shown in an error (it may hold a password)

    @property
    def required(self) -> bool:
        """A key without a default that would pass (None: optional, unset)."""
        return self.check is not None and self.default is not None and not self.check(self.default)


def _finite(value: float) -> bool:
    return value - value == 0  # false for inf and nan, without importing math


def _positive(value: float) -> bool:
    return value > 0


def _within(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: low <= value <= high


def _seconds(low: float, high: float) -> str:
    return f"a number of seconds from {low:g} to {high:g}"


class Section:
    """A config table: attributes from FIELDS, filled with defaults where the file is silent."""

    FIELDS: dict[str, Setting] = {}

    def __init__(self, **values: Any):
        for name, setting in self.FIELDS.items():
            default = setting.default
            if isinstance(default, dict):
                default = dict(default)  # each section its own copy
            elif setting.section is not None:
                default = setting.section()
            setattr(self, name, values.get(name, default))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class SupervisorConfig(Section):
    FIELDS = {
        "stop_timeout": Setting(10.0, "float", _seconds(0.1, 3600), _within(0.1, 3600)),
        "hang_timeout": Setting(10.0, "float", _seconds(1, 3600), _within(1, 3600)),
        "restart_backoff": Setting(1.0, "float", _seconds(0.01, 3600), _within(0.01, 3600)),
        "restart_backoff_max": Setting(30.0, "float", _seconds(0.01, 86400), _within(0.01, 86400)),
        "restart_limit": Setting(5, "int", "a whole number >= 1", lambda v: v >= 1),
        "restart_window": Setting(60.0, "float", _seconds(1, 86400), _within(1, 86400)),
    }


class LoggingConfig(Section):
    FIELDS = {
        "sink": Setting("auto", "str", "one of auto, journald, file", choices=LOG_SINKS),
        "level": Setting("info", "str", "one of debug, info, warning, error", choices=LOG_LEVELS),
    }


class HeartbeatConfig(Section):
    FIELDS = {
        "interval": Setting(
            0.0,
            "float",
            "0 (disabled) or a number of seconds from 0.1 to 604800",
            lambda v: v == 0 or 0.1 <= v <= 604800,
        ),
    }


class DispatcherConfig(Section):
    FIELDS = {
        "concurrency": Setting(4, "int", "a whole number from 1 to 256", _within(1, 256)),
        "max_attempts": Setting(3, "int", "a whole number from 1 to 100", _within(1, 100)),
        "retry_backoff": Setting(1.0, "float", _seconds(0.01, 3600), _within(0.01, 3600)),
        "retry_backoff_max": Setting(60.0, "float", _seconds(0.01, 86400), _within(0.01, 86400)),
    }


def _host_id(value: str) -> bool:
    return 0 < len(value) <= 128 and value.isprintable() and value.strip() == value


class PostgresConfig(Section):
    """[queue.postgres]: the shared queue database (docs/scaling.md). The connection string
    comes from dsn_file (it may hold a password: read at use, never logged) or dsn (for
    password-less local sockets); exactly one of them when backend = "postgres"."""

    FIELDS = {
        "dsn_file": Setting(
            None,
            "optional_str",
            "a file path string (relative: in $CREDENTIALS_DIRECTORY, as the Slack token files)",
            bool,
        ),
        "dsn": Setting(
            None,
            "optional_str",
            "a libpq connection string without a password (use dsn_file for one)",
            lambda v: bool(v.strip()) and not _has_password(v),
            secret=True,
        ),
        "host_id": Setting(
            None,
            "optional_str",
            "a name of 1 to 128 printable characters, no surrounding spaces (default: hostname)",
            _host_id,
        ),
        "auto_migrate": Setting(True, "bool", "true or false"),
        "connect_timeout": Setting(5.0, "float", _seconds(1, 300), _within(1, 300)),
        "statement_timeout": Setting(10.0, "float", _seconds(0.1, 3600), _within(0.1, 3600)),
        "pool_size": Setting(4, "int", "a whole number from 1 to 64", _within(1, 64)),
        # a claim is held this long unless renewed (every lease/3 by the holder)
        "lease": Setting(60.0, "float", _seconds(1, 3600), _within(1, 3600)),
    }


_PASSWORD_KEY = re.compile(r"(?:^|[\s&?])password\s*=", re.IGNORECASE)


def _has_password(dsn: str) -> bool:
    """Whether a connection string carries a password: key=value, URI user:pass@ or
    ?password=."""
    if _PASSWORD_KEY.search(dsn):
        return True
    if "://" in dsn:
        authority = dsn.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        return ":" in authority.rpartition("@")[0]
    return False


class QueueConfig(Section):
    FIELDS = {
        # messages waiting longer than this while none is claimed: degraded, no watchdog
        "stall_timeout": Setting(600.0, "float", SECONDS, _positive),
        "backend": Setting("files", "str", "one of files, postgres", choices=("files", "postgres")),
        "postgres": Setting(None, "table", "a [queue.postgres] table", section=PostgresConfig),
    }


class MetricsConfig(Section):
    FIELDS = {
        # where agent/metrics.py serves Prometheus metrics; "" (the default): nowhere
        "listen": Setting(
            "",
            "str",
            '"" (off) or "host:port" with a port from 1 to 65535 (IPv6: "[::1]:9464")',
            lambda v: v == "" or listen_address(v) is not None,
        ),
    }


def listen_address(value: str) -> tuple[str, int] | None:
    """("host", port) of a "host:port" or "[ipv6]:port" string; None when it is not one.
    The host is not resolved here: binding it at start says whether it exists."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return None
    elif ":" in host:
        return None  # a bare IPv6 address: its port is ambiguous without brackets
    if not colon or not host or not (port.isascii() and port.isdigit()):
        return None
    if any(c.isspace() or c in "[]/" for c in host) or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


class AgentConfig(Section):
    """[agents.NAME]: the AI agent command a message is handed to (argv, no shell)."""

    FIELDS = {
        "command": Setting((), "argv", "a non-empty array of strings (argv)", bool),
        "kind": Setting(
            "plain", "str", "one of plain, claude, codex", choices=("plain", "claude", "codex")
        ),
        "session_idle_reset": Setting(
            0.0,
            "float",
            "a number of seconds >= 0 (0: a conversation's session never expires)",
            lambda v: v >= 0,
        ),
        "timeout": Setting(300.0, "float", _seconds(0.1, 86400), _within(0.1, 86400)),
        "workdir": Setting(None, "optional_str", "a directory path string"),
        "env": Setting({}, "env", "a table of environment variable names to string values"),
        "max_output_bytes": Setting(
            4 * 1024 * 1024,
            "int",
            "a whole number of bytes from 1024 to 1073741824",
            lambda v: 1024 <= v <= 1 << 30,
        ),
    }


class SlackProfileConfig(Section):
    """[slack.profiles.NAME]: one Slack app connection."""

    FIELDS = {
        "bot_token_file": Setting("", "str", "a file path string (xoxb- token)", bool),
        "app_token_file": Setting("", "str", "a file path string (xapp- token)", bool),
        "agent": Setting(None, "optional_str", "the name of an [agents.NAME] table"),
        "channels": Setting((), "argv", "an array of channel ids"),
        "allowed_users": Setting((), "argv", "an array of Slack user ids (empty: everyone)"),
        "allow_dm": Setting(False, "bool", "true or false"),
        "deny_notice": Setting("", "str", "a string (empty: no notice)"),
        "follow_threads": Setting(
            "mentioner", "str", "one of mentioner, all", choices=("mentioner", "all")
        ),
        "ack_reaction": Setting("eyes", "str", "an emoji name without colons (empty: none)"),
        "done_reaction": Setting(
            "white_check_mark", "str", "an emoji name without colons (empty: none)"
        ),
        "failed_reaction": Setting("x", "str", "an emoji name without colons (empty: none)"),
        "progress_after": Setting(
            30.0, "float", "a number of seconds >= 0 (0: never)", lambda v: v >= 0
        ),
        "max_file_bytes": Setting(
            20 * 1024 * 1024, "int", "a whole number of bytes >= 0 (0: no files)", lambda v: v >= 0
        ),
    }


class SlackConfig(Section):
    FIELDS = {
        "enabled": Setting(False, "bool", "true or false"),
        "api_base_url": Setting("https://slack.com/api/", "str", "a URL string"),
        "profiles": Setting(
            {}, "tables", "a table of [slack.profiles.NAME] tables", table_of=SlackProfileConfig
        ),
    }


SECTIONS: dict[str, type[Section]] = {
    "supervisor": SupervisorConfig,
    "logging": LoggingConfig,
    "heartbeat": HeartbeatConfig,
    "dispatcher": DispatcherConfig,
    "queue": QueueConfig,
    "slack": SlackConfig,
    "metrics": MetricsConfig,
}
TABLES_OF: dict[str, type[Section]] = {"agents": AgentConfig}
TOP_LEVEL_KEYS = ("state_dir",)


class Config:
    def __init__(
        self,
        path: Path | None,
        state_dir: Path,
        runtime_dir: Path | None = None,
        agents: dict[str, AgentConfig] | None = None,
        **sections: Section,
    ):
        self.path = path  # the file it came from; None means embedded defaults
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir  # $RUNTIME_DIRECTORY under systemd
        self.agents = agents or {}
        self.supervisor: SupervisorConfig = sections.get("supervisor") or SupervisorConfig()
        self.logging: LoggingConfig = sections.get("logging") or LoggingConfig()
        self.heartbeat: HeartbeatConfig = sections.get("heartbeat") or HeartbeatConfig()
        self.dispatcher: DispatcherConfig = sections.get("dispatcher") or DispatcherConfig()
        self.queue: QueueConfig = sections.get("queue") or QueueConfig()
        self.slack: SlackConfig = sections.get("slack") or SlackConfig()
        self.metrics: MetricsConfig = sections.get("metrics") or MetricsConfig()

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
    """--config, $AGENT_CONFIG, the user's own file (not for root), the system file, or
    None (embedded defaults)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("AGENT_CONFIG"):
        return Path(env["AGENT_CONFIG"])
    if os.geteuid() != 0 and user_config_path(env).exists():
        return user_config_path(env)
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return None


def user_config_path(env: dict[str, str]) -> Path:
    """$XDG_CONFIG_HOME/agent/agent.toml, else ~/.config/agent/agent.toml."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "agent" / "agent.toml"


def load_config(explicit: str | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    path = choose_config_path(explicit, env)
    table = _read_toml(path) if path else {}
    return _build(table, path, env)


def locate_only(explicit: str | None = None, env: dict[str, str] | None = None) -> Config:
    """The config file's path and its state_dir, without validating the rest: enough to find
    a running supervisor when the file has become invalid since it started (when the file is
    not even TOML, the state_dir its defaults give)."""
    env = dict(os.environ if env is None else env)
    path = choose_config_path(explicit, env)
    table: dict[str, Any] = {}
    if path is not None:
        try:  # a file that is still TOML may still name its state_dir
            state_dir = _read_toml(path).get("state_dir")
        except ConfigError:
            state_dir = None
        if isinstance(state_dir, str) and state_dir:
            table["state_dir"] = state_dir
    return _build(table, path, env)


def config_for_finding(explicit: str | None = None) -> tuple[Config, str | None]:
    """For commands that only need to find the supervisor (status, stop, logs, reload): the
    config, or, when the file has become invalid, locate_only's with a warning saying so."""
    try:
        return load_config(explicit), None
    except ConfigError as exc:
        config = locate_only(explicit)
        return config, f"{exc}; looking for the supervisor in {config.state_dir}"


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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None


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
    config = Config(
        path=path.resolve() if path else None,
        state_dir=_state_dir(table, path, env, where),
        runtime_dir=_first_dir(env.get("RUNTIME_DIRECTORY")),
        agents=_tables(AgentConfig, table.get("agents", {}), where, "agents"),
        **sections,
    )
    _check_references(config, where)
    return config


def _tables(cls: type[Section], values: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    result = {}
    for sub, sub_values in values.items():
        if not isinstance(sub_values, dict):
            raise ConfigError(f"{where}: [{name}.{sub}] must be a table, got {_kind(sub_values)}")
        result[sub] = _section(cls, sub_values, where, f"{name}.{sub}")
    return result


def _check_references(config: Config, where: str) -> None:
    _check_queue_backend(config.queue, where)
    for name, profile in config.slack.profiles.items():
        if profile.agent is not None and profile.agent not in config.agents:
            raise ConfigError(
                f"{where}: [slack.profiles.{name}] agent: expected the name of an "
                f"[agents.NAME] table, got {profile.agent!r}"
            )


def _check_queue_backend(queue: QueueConfig, where: str) -> None:
    postgres: PostgresConfig = queue.postgres
    given = [key for key in ("dsn_file", "dsn") if getattr(postgres, key) is not None]
    if queue.backend == "postgres" and len(given) != 1:
        found = "both" if given else "neither"
        raise ConfigError(
            f"{where}: [queue.postgres] dsn_file, dsn: expected exactly one of them with "
            f'[queue] backend = "postgres", got {found}'
        )


def _section(cls: type[Section], values: dict[str, Any], where: str, name: str) -> Section:
    chosen: dict[str, Any] = {}
    for key, value in values.items():
        setting = cls.FIELDS.get(key)
        if setting is None:
            raise ConfigError(
                f"{where}: unknown key '{key}' in [{name}] "
                f"(expected one of {', '.join(cls.FIELDS)})"
            )
        label = f"{where}: [{name}] {key}"
        if setting.table_of is not None or setting.section is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: expected {setting.expect}, got {_kind(value)}")
            if setting.section is not None:
                chosen[key] = _section(setting.section, value, where, f"{name}.{key}")
            else:
                chosen[key] = _tables(setting.table_of, value, where, f"{name}.{key}")
        else:
            chosen[key] = _checked(setting, value, label)
    for key, setting in cls.FIELDS.items():
        if key not in chosen and setting.required:
            raise ConfigError(f"{where}: [{name}] {key}: missing; expected {setting.expect}")
    return cls(**chosen)


_KIND_TESTS: dict[str, Callable[[Any], bool]] = {
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and _finite(v),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "optional_str": lambda v: isinstance(v, str),
    "argv": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "env": lambda v: isinstance(v, dict) and all(_env_pair(k, x) for k, x in v.items()),
}


def _env_pair(name: Any, value: Any) -> bool:
    """A variable the kernel can pass: a name without '=' or NUL, a string value without NUL."""
    return (
        isinstance(name, str)
        and isinstance(value, str)
        and bool(name)
        and "=" not in name
        and "\0" not in name + value
    )


def _checked(setting: Setting, value: Any, label: str) -> Any:
    if not _KIND_TESTS[setting.kind](value):
        raise _wrong(setting, value, label)
    if setting.kind == "float":
        value = float(value)
    elif setting.kind == "argv":
        value = tuple(value)
    elif setting.kind == "env":
        value = dict(value)
    if setting.choices and value not in setting.choices:
        raise _wrong(setting, value, label)
    if setting.check and not setting.check(value):
        raise _wrong(setting, value, label)
    return value


def _wrong(setting: Setting, value: Any, label: str) -> ConfigError:
    if setting.secret:
        return ConfigError(f"{label}: expected {setting.expect}, got a {_kind(value)} (not shown)")
    return ConfigError(f"{label}: expected {setting.expect}, got {value!r} ({_kind(value)})")


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
