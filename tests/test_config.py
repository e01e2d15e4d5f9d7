from pathlib import Path

import pytest

from agent.config import SYSTEM_STATE_DIR, load_config
from agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_embedded_defaults_use_per_user_directories(monkeypatch):
    monkeypatch.delenv("AGENT_CONFIG", raising=False)
    monkeypatch.setattr("agent.config.SYSTEM_CONFIG", Path("/nonexistent/agent.toml"))
    config = load_config(None, env={"HOME": "/home/op"})
    assert config.path is None
    assert config.state_dir == Path("/home/op/.local/state/agent")
    assert config.supervisor.stop_timeout == 10.0
    assert config.heartbeat.interval == 0.0 and config.slack.enabled is False


def test_state_dir_key_wins_and_is_relative_to_the_config_file(tmp_path):
    path = write(tmp_path, 'state_dir = "data"\n')
    config = load_config(path, env={"STATE_DIRECTORY": "/var/lib/agent"})
    assert config.state_dir == tmp_path / "data"
    assert config.lock_path == tmp_path / "data" / "agent.lock"
    assert config.state_path == tmp_path / "data" / "state.json"


def test_systemd_directories_are_honoured(tmp_path):
    path = write(tmp_path, "")
    config = load_config(
        path, env={"STATE_DIRECTORY": "/var/lib/agent:/x", "RUNTIME_DIRECTORY": "/run/agent"}
    )
    assert config.state_dir == SYSTEM_STATE_DIR
    assert config.runtime_dir == Path("/run/agent")


def test_agent_config_variable_selects_the_file(tmp_path):
    path = write(tmp_path, "[supervisor]\nstop_timeout = 2\n")
    assert load_config(None, env={"AGENT_CONFIG": path}).supervisor.stop_timeout == 2.0


def test_sections_and_tables_parse(tmp_path):
    path = write(
        tmp_path,
        """
[supervisor]
stop_timeout = 4
restart_limit = 2
[heartbeat]
interval = 30
[agents.default]
command = ["claude", "-p"]
timeout = 120
[slack]
enabled = true
[slack.profiles.main]
bot_token_file = "bot"
app_token_file = "app"
agent = "default"
""",
    )
    config = load_config(path, env={})
    assert config.supervisor.restart_limit == 2
    assert config.agents["default"].command == ("claude", "-p")
    assert config.slack.profiles["main"].agent == "default"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[supervisor]\nstop_timeout = 'ten'\n",
            "[supervisor] stop_timeout: expected a number of seconds from 0.1 to 3600, got 'ten' "
            "(string)",
        ),
        ("[supervisor]\nstop_timeout = -1\n", "[supervisor] stop_timeout: expected a number"),
        (
            "[supervisor]\nrestart_limit = 1.5\n",
            "[supervisor] restart_limit: expected a whole number",
        ),
        ("[supervisor]\nstop_timout = 3\n", "unknown key 'stop_timout' in [supervisor]"),
        ("[slack]\nenabled = 'yes'\n", "[slack] enabled: expected true or false"),
        ("[logging]\nsink = 'syslog'\n", "[logging] sink: expected one of auto, journald, file"),
        ("colour = 1\n", "unknown key 'colour'"),
        ("supervisor = 3\n", "[supervisor] must be a table, got integer"),
        ("state_dir = 5\n", "state_dir: expected a directory path string"),
        ("[agents.x]\ntimeout = 3\n", "[agents.x] command: missing; expected a non-empty array"),
        ("[agents.x]\ncommand = 'cat'\n", "[agents.x] command: expected a non-empty array"),
        (
            "[slack.profiles.p]\nbot_token_file = 'b'\napp_token_file = 'a'\nagent = 'nobody'\n",
            "[slack.profiles.p] agent: expected the name of an [agents.NAME] table, got 'nobody'",
        ),
        ("[supervisor\n", "invalid TOML"),
    ],
)
def test_bad_config_names_file_key_and_expectation(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(path)
    assert message in str(caught.value)
    assert caught.value.exit_code == 78


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.toml"), env={})


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_seconds_are_refused(tmp_path, value):
    path = write(tmp_path, f"[supervisor]\nstop_timeout = {value}\n")
    with pytest.raises(ConfigError, match="stop_timeout: expected a number of seconds from"):
        load_config(path, env={})


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"state_dir = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(str(path), env={})


BOUNDS = [
    ("supervisor", "stop_timeout", 0.05, 3601, "a number of seconds from 0.1 to 3600"),
    ("supervisor", "hang_timeout", 0.5, 3601, "a number of seconds from 1 to 3600"),
    ("supervisor", "restart_backoff", 0.001, 3601, "a number of seconds from 0.01 to 3600"),
    ("supervisor", "restart_backoff_max", 0, 86401, "a number of seconds from 0.01 to 86400"),
    ("supervisor", "restart_window", 0.5, 86401, "a number of seconds from 1 to 86400"),
    ("dispatcher", "concurrency", 0, 257, "a whole number from 1 to 256"),
    ("dispatcher", "max_attempts", 0, 101, "a whole number from 1 to 100"),
    ("dispatcher", "retry_backoff", 0, 3601, "a number of seconds from 0.01 to 3600"),
    ("dispatcher", "retry_backoff_max", 0, 1e300, "a number of seconds from 0.01 to 86400"),
    ("heartbeat", "interval", 0.01, 604801, "0 (disabled) or a number of seconds from 0.1"),
    ("agents.a", "timeout", 0.01, 86401, "a number of seconds from 0.1 to 86400"),
]


@pytest.mark.parametrize(("section", "key", "low", "high", "expect"), BOUNDS)
def test_settings_have_sane_lower_and_upper_bounds(tmp_path, section, key, low, high, expect):
    command = "command = ['cat']\n" if section.startswith("agents") else ""
    for value in (low, high):
        path = write(tmp_path, f"[{section}]\n{command}{key} = {value!r}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        message = str(caught.value)
        assert message.startswith(f"{path}: [{section}] {key}: expected {expect}"), message
        assert caught.value.exit_code == 78


def test_the_queue_backend_is_files_unless_postgres_is_chosen(tmp_path):
    assert load_config(write(tmp_path, ""), env={}).queue.backend == "files"
    path = write(
        tmp_path,
        "[queue]\nbackend = 'postgres'\n[queue.postgres]\ndsn = 'host=/run/postgresql'\n"
        "host_id = 'gw-1'\nauto_migrate = false\n",
    )
    postgres = load_config(path, env={}).queue.postgres
    assert (postgres.dsn, postgres.host_id, postgres.auto_migrate) == (
        "host=/run/postgresql",
        "gw-1",
        False,
    )
    assert postgres.dsn_file is None and postgres.statement_timeout == 10.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[queue]\nbackend = 'redis'\n", "[queue] backend: expected one of files, postgres"),
        (
            "[queue]\nbackend = 'postgres'\n",
            "[queue.postgres] dsn_file, dsn: expected exactly one of them with [queue] "
            'backend = "postgres", got neither',
        ),
        (
            "[queue]\nbackend = 'postgres'\n[queue.postgres]\ndsn = 'a=b'\ndsn_file = 'x'\n",
            "got both",
        ),
        ("[queue]\npostgres = 3\n", "[queue] postgres: expected a [queue.postgres] table"),
        ("[queue.postgres]\ndsn_fil = 'x'\n", "unknown key 'dsn_fil' in [queue.postgres]"),
        ("[queue.postgres]\nhost_id = ' gw'\n", "[queue.postgres] host_id: expected a name"),
        ("[queue.postgres]\ndsn_file = ''\n", "[queue.postgres] dsn_file: expected a file path"),
        ("[queue.postgres]\npool_size = 0\n", "[queue.postgres] pool_size: expected a whole"),
    ],
)
def test_bad_queue_settings_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert message in str(caught.value) and caught.value.exit_code == 78


@pytest.mark.parametrize(
    "dsn",
    [
        "host=/run/postgresql password=Sup3rSecret",
        "postgresql://agent:Sup3rSecret@db.example/agent",
        "postgresql:///agent?host=/run/postgresql&password=Sup3rSecret",
    ],
)
def test_a_dsn_with_a_password_is_refused_without_showing_it(tmp_path, dsn):
    path = write(tmp_path, f"[queue.postgres]\ndsn = '{dsn}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "[queue.postgres] dsn: expected a libpq connection string without a password" in str(
        caught.value
    )
    assert "Sup3rSecret" not in str(caught.value)
