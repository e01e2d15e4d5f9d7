"""Where the queue database is (agent/pg/connect.py): the dsn_file rules, and that the
connection string's content never reaches an error, a repr or the shown form."""

import os
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.pg.connect import load_target, make_target

# agent.pg imports psycopg only when used: without it, these tests skip (CI: fail)
pytestmark = pytest.mark.usefixtures("psycopg_installed")

SECRET = "Secr3t-Pa55word"


def config_with(tmp_path: Path, dsn_file: str):
    path = tmp_path / "agent.toml"
    path.write_text(f"[queue]\nbackend = 'postgres'\n[queue.postgres]\ndsn_file = '{dsn_file}'\n")
    return load_config(str(path), env={})


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_shown_form_has_host_port_database_and_user_only(tmp_path):
    dsn = f"host=/run/postgresql port=5433 dbname=agent user=agent password={SECRET}"
    target = make_target(dsn, "x")
    assert target.shown == "host=/run/postgresql port=5433 dbname=agent user=agent"
    assert SECRET not in repr(target)
    assert target.scrub(f"failed for {SECRET}") == "failed for ***"


def test_a_relative_dsn_file_is_a_systemd_credential(tmp_path, monkeypatch):
    secret_file(tmp_path / "queue-dsn", f"dbname=agent password={SECRET}\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    target = load_target(config_with(tmp_path, "queue-dsn"))
    assert target.shown == "dbname=agent" and target.dsn.endswith(SECRET)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: secret_file(p, "dbname=a", 0o640), "mode 0640 lets others read a secret"),
        (lambda p: secret_file(p, "  \n"), "empty; expected a libpq connection string"),
        (lambda p: os.mkfifo(p, 0o600), "not a regular file"),
        (lambda p: None, "cannot open: No such file or directory"),
        (
            lambda p: secret_file(p, f"dbname=a {SECRET}"),
            "not a valid libpq connection string (its content is not shown)",
        ),
    ],
)
def test_an_unusable_dsn_file_is_a_config_error_naming_it(tmp_path, setup, message):
    path = tmp_path / "queue-dsn"
    setup(path)
    with pytest.raises(ConfigError) as caught:
        load_target(config_with(tmp_path, str(path)))
    text = str(caught.value)
    assert f"[queue.postgres] dsn_file: {path}: {message}" in text, text
    assert SECRET not in text and caught.value.exit_code == 78
