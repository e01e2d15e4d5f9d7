"""`agentctl doctor` on a healthy installation and on each broken case (real files, real
agentctl processes); the checks of the installed unit run in the e2e suite."""

import json
import os
import re
import time

import pytest

from tests.test_dispatcher import enqueue

pytestmark = pytest.mark.integration


def doctor(env, *args: str) -> tuple[int, dict[str, dict]]:
    done = env.agentctl("doctor", "--json", "--offline", *args)
    assert "Traceback" not in done.stderr, done.stderr
    findings = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, {f["check"]: f for f in findings}


def test_a_healthy_installation_is_all_ok(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.start()
    code, found = doctor(agent_env)
    assert code == 0, found
    assert {f["level"] for f in found.values()} == {"ok"}, found
    assert {"config", "state_dir", "log sink", "agent default", "disk", "queue"} <= set(found)
    human = agent_env.agentctl("doctor", "--offline")
    assert human.returncode == 0 and human.stdout.splitlines()[0].startswith("ok    config:")


def test_an_invalid_config_fails_with_the_message_start_prints(agent_env):
    agent_env.config_path.write_text("[dispatcher]\nconcurrency = 0\n")
    code, found = doctor(agent_env)
    start = agent_env.agentctl("start")
    assert code == 1 and found["config"]["level"] == "fail"
    assert found["config"]["message"] in start.stderr


def test_a_state_dir_others_may_write_fails(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.state_dir.mkdir(parents=True)
    agent_env.state_dir.chmod(0o777)
    code, found = doctor(agent_env)
    assert code == 1 and found["state_dir"]["level"] == "fail"
    assert "group/world-writable" in found["state_dir"]["message"]


@pytest.mark.parametrize(
    "agents, check, said",
    [
        ({}, "agents", "no agent is configured"),
        ({"agents.default": {"command": ["no-such-cli"]}}, "agent default", "'no-such-cli'"),
    ],
)
def test_agents_that_cannot_run_fail(agent_env, agents, check, said):
    agent_env.write_config(no_agent=not agents, **agents)
    code, found = doctor(agent_env)
    assert code == 1 and found[check]["level"] == "fail" and said in found[check]["message"]
    assert found[check]["hint"]


def test_a_journald_sink_without_journald_fails_here_and_at_start(agent_env):
    if os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("this machine has journald: the sink works")
    agent_env.write_config(
        **{"agents.default": {"command": ["cat"]}, "logging": {"sink": "journald"}}
    )
    code, found = doctor(agent_env)
    assert code == 1 and found["log sink"]["level"] == "fail"
    start = agent_env.agentctl("start")
    assert start.returncode == 78 and "[logging] sink" in start.stderr


def test_readable_token_files_warn(agent_env, tmp_path):
    bot, app = tmp_path / "bot", tmp_path / "app"
    bot.write_text("xoxb-1")
    app.write_text("xapp-1")
    bot.chmod(0o644)
    app.chmod(0o600)
    agent_env.write_config(
        **{
            "agents.default": {"command": ["cat"]},
            "slack": {"enabled": True},
            "slack.profiles.main": {"bot_token_file": str(bot), "app_token_file": str(app)},
        }
    )
    code, found = doctor(agent_env)
    assert found["slack main bot token"]["level"] == "warn"
    assert "lets others read a secret" in found["slack main bot token"]["message"]
    assert found["slack main app token"]["level"] == "ok"
    assert code == 0  # a warning is not a failure
    assert "xoxb-1" not in json.dumps(found)


def test_a_message_waiting_for_an_hour_warns(agent_env):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    enqueue(agent_env, "waiting", "w1")  # no supervisor: it waits
    waiting = agent_env.state_dir / "queue" / "incoming" / "w1.json"
    old = time.time() - 3600
    os.utime(waiting, (old, old))
    code, found = doctor(agent_env)
    assert code == 0 and found["queue"]["level"] == "warn"
    assert re.search(r"1 waiting, oldest 36\d\ds", found["queue"]["message"]), found["queue"]


# ---- [queue] backend = "postgres"

DSN_SECRET = "doctor-pg-secret-password"


def postgres_env(agent_env, dsn: str, mode: int = 0o600):
    dsn_file = agent_env.root / "queue-dsn"
    dsn_file.write_text(f"{dsn} password={DSN_SECRET}\n")
    dsn_file.chmod(mode)
    agent_env.write_config(
        queue={"backend": "postgres"},
        **{"agents.default": {"command": ["cat"]}, "queue.postgres": {"dsn_file": str(dsn_file)}},
    )
    return dsn_file


def pg_doctor(agent_env) -> tuple[int, dict[str, dict]]:
    code, found = doctor(agent_env)
    human = agent_env.agentctl("doctor", "--offline")
    assert DSN_SECRET not in json.dumps(found) + human.stdout + human.stderr
    return code, found


def test_a_healthy_database_is_ok_with_its_latency_schema_and_clock(agent_env, pg_dsn):
    postgres_env(agent_env, pg_dsn)
    assert agent_env.agentctl("db", "migrate").returncode == 0
    code, found = pg_doctor(agent_env)
    for check in ("queue dsn", "queue database", "queue schema", "clock skew"):
        assert found[check]["level"] == "ok", found[check]
    assert re.search(r"reachable, \d+ ms", found["queue database"]["message"])
    assert "(current)" in found["queue schema"]["message"]
    assert re.fullmatch(r"[+-]\d+\.\d{3}s against the database", found["clock skew"]["message"])
    assert code == 0, found


def test_a_database_behind_this_build_warns_when_the_start_migrates_it(agent_env, pg_dsn):
    postgres_env(agent_env, pg_dsn)
    code, found = pg_doctor(agent_env)
    assert code == 0 and found["queue schema"]["level"] == "warn"
    assert "version 0, this build" in found["queue schema"]["message"]


def test_an_unreachable_database_fails(agent_env, pg, pg_dsn):
    postgres_env(agent_env, pg_dsn)
    pg.stop()
    try:
        code, found = pg_doctor(agent_env)
    finally:
        pg.start()
    assert code == 1 and found["queue database"]["level"] == "fail"
    assert found["queue database"]["message"].startswith(f"queue database host={pg.socket_dir}")
    assert found["queue database"]["hint"]
    assert "queue schema" not in found and "clock skew" not in found


def test_a_dsn_file_others_may_read_fails_without_showing_it(agent_env, pg_dsn):
    dsn_file = postgres_env(agent_env, pg_dsn, mode=0o644)
    code, found = pg_doctor(agent_env)
    assert code == 1 and found["queue dsn"]["level"] == "fail"
    assert "lets others read a secret" in found["queue dsn"]["message"]
    assert str(dsn_file) in found["queue dsn"]["message"]
    assert "queue database" not in found


def test_a_schema_ahead_of_this_build_fails(agent_env, pg_dsn):
    import psycopg

    from agent.pg.migrate import build_version

    postgres_env(agent_env, pg_dsn)
    assert agent_env.agentctl("db", "migrate").returncode == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum, host_id)"
            " VALUES (%s, 'future', 'x', 'elsewhere')",
            (build_version() + 1,),
        )
    code, found = pg_doctor(agent_env)
    assert code == 1 and found["queue schema"]["level"] == "fail"
    assert found["queue schema"]["hint"] == "upgrade agent on this host"


@pytest.mark.parametrize("skew, level", [(0.2, "ok"), (5.0, "warn"), (120.0, "fail")])
def test_the_clock_skew_against_the_database_warns_above_1s_and_fails_above_30s(
    pg_dsn, monkeypatch, skew, level
):
    import psycopg

    from agent import doctor as doctor_module

    real = time.time
    monkeypatch.setattr(doctor_module.time, "time", lambda: real() - skew)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        finding = doctor_module._skew(conn)
    monkeypatch.undo()
    assert finding.level == level, finding
    assert finding.message.startswith("+")
