"""`agentctl doctor`: one line per check, each ok / warn / fail with a fix hint.

The checks look at the installation as the supervisor will meet it: the config, state_dir's
ownership and modes, the log sink, the systemd unit, each agent command (as the service
user), the Slack token files, free disk, the queue, and (unless --offline) Slack's
auth.test for each profile. With [queue] backend = "postgres", the database too: the DSN
file (never its content), reachability and latency, the schema version against this build,
and the clock's skew against the database's (leases and idle resets compare them). They
only read; nothing is changed. Exit 0 when no check fails, 1 otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.config import Config, load_config, locate_only
from agent.errors import AgentError

OK, WARN, FAIL = "ok", "warn", "fail"
LOW_DISK_BYTES = 1 << 30  # warn below 1 GiB free in state_dir
NO_DISK_BYTES = 100 << 20  # fail below 100 MiB
QUEUE_WAIT_WARN_SECONDS = 300.0
SKEW_WARN_SECONDS = 1.0  # the clock against the database's
SKEW_FAIL_SECONDS = 30.0
SERVICE_USER = "agent"
UNIT = "agent.service"


@dataclass(frozen=True)
class Finding:
    check: str
    level: str
    message: str
    hint: str | None = None


def run_doctor(config_path: str | None, as_json: bool, offline: bool) -> int:
    findings = list(diagnose(config_path, offline))
    for finding in findings:
        if as_json:
            print(json.dumps(asdict(finding)))
        else:
            hint = f" (fix: {finding.hint})" if finding.hint else ""
            print(f"{finding.level:<4}  {finding.check}: {finding.message}{hint}")
    return 1 if any(f.level == FAIL for f in findings) else 0


def diagnose(config_path: str | None, offline: bool) -> Iterator[Finding]:
    try:
        config = load_config(config_path)
    except AgentError as exc:
        yield Finding("config", FAIL, str(exc), "correct the file; `agentctl start` says the same")
        config = locate_only(config_path)
        checks: list[Callable[[Config], Iterator[Finding]]] = [_state_dir, _unit, _disk]
    else:
        yield Finding("config", OK, f"{config.display_path} is valid")
        checks = [_state_dir, _log_sink, _unit, _agents, _tokens, _disk, _queue, _database]
        if not offline:
            checks.append(_slack_auth)
    for check in checks:
        try:
            yield from check(config)
        except Exception as exc:  # a check that breaks is itself a finding, never a traceback
            yield Finding(check.__name__.strip("_"), WARN, f"could not check: {exc}")


# ---- the checks


def _state_dir(config: Config) -> Iterator[Finding]:
    from agent.trust import check_state_dir

    if not config.state_dir.exists():
        yield Finding(
            "state_dir", WARN, f"{config.state_dir} does not exist yet", "start creates it"
        )
        return
    try:
        check_state_dir(config.state_dir, owner=_service_uid())
    except AgentError as exc:
        yield Finding("state_dir", FAIL, str(exc), "chown/chmod as the message says")
        return
    yield Finding("state_dir", OK, f"{config.state_dir}: owner and modes as required")


def _log_sink(config: Config) -> Iterator[Finding]:
    from agent.log import choose_sink

    try:
        sink = choose_sink(config)
    except AgentError as exc:
        yield Finding("log sink", FAIL, str(exc), 'set [logging] sink = "auto" or "file"')
        return
    where = "journald" if sink == "journald" else f"the file {config.log_path}"
    yield Finding("log sink", OK, f"{config.logging.sink}: events go to {where}")


def _unit(config: Config) -> Iterator[Finding]:
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        yield Finding("systemd unit", OK, "no systemd here: standalone (agentctl start)")
        return
    props = _unit_properties("LoadState", "UnitFileState", "ExecStart", "ActiveState")
    if props.get("LoadState") != "loaded":
        yield Finding("systemd unit", WARN, f"{UNIT} is not installed", "install the .deb")
        return
    executable = props.get("ExecStart", "").split("path=", 1)[-1].split(" ;", 1)[0].strip()
    mine = shutil.which("agentctl") or sys.argv[0]
    if executable and Path(executable).resolve() != Path(mine).resolve():
        yield Finding(
            "systemd unit",
            WARN,
            f"{UNIT} runs {executable}, but this agentctl is {mine}",
            "run the agentctl the unit runs, or reinstall",
        )
    if props.get("UnitFileState") != "enabled":
        yield Finding("systemd unit", WARN, f"{UNIT} is not enabled", f"systemctl enable {UNIT}")
        return
    yield Finding("systemd unit", OK, f"{UNIT} enabled, {props.get('ActiveState')}")


def _agents(config: Config) -> Iterator[Finding]:
    from agent.agentenv import agent_environment

    if not config.agents:
        yield Finding(
            "agents",
            FAIL,
            "no agent is configured: every message would fail",
            'add [agents.default] with command = ["claude", "-p"] (or run agentctl init)',
        )
        return
    for name, agent in config.agents.items():
        path = agent_environment(config, name, {})["PATH"]
        program = agent.command[0]
        found = program if "/" in program else shutil.which(program, path=path)
        if not found or not os.access(found, os.X_OK):
            yield Finding(
                f"agent {name}",
                FAIL,
                f"{program!r} is not an executable on the agent's PATH ({path})",
                "install it, or give its absolute path in [agents.NAME] command",
            )
        elif not _runs_as_service_user(found):
            yield Finding(
                f"agent {name}",
                FAIL,
                f"{found} is not executable by the service user {SERVICE_USER!r}",
                f"chmod o+rx {found} (and its directories)",
            )
        else:
            yield Finding(f"agent {name}", OK, f"{found} ({agent.kind})")


def _tokens(config: Config) -> Iterator[Finding]:
    if not config.slack.enabled:
        return
    from agent.slack_api import resolve_token_path
    from agent.trust import loose_secret_files

    for profile_name, profile in config.slack.profiles.items():
        for kind, name in (("bot", profile.bot_token_file), ("app", profile.app_token_file)):
            path = resolve_token_path(name)
            check = f"slack {profile_name} {kind} token"
            from_unit = "CREDENTIALS_DIRECTORY" not in os.environ and not Path(name).is_absolute()
            if from_unit and not os.path.exists(path):
                yield Finding(check, OK, f"{name}: from systemd's LoadCredential= at start")
                continue
            if not os.path.exists(path):
                yield Finding(check, FAIL, f"{path} does not exist", "write the token file")
                continue
            loose = loose_secret_files([path])
            if loose:
                yield Finding(check, WARN, loose[0], f"chmod 0600 {path}")
            else:
                yield Finding(check, OK, f"{path} is private")


def _disk(config: Config) -> Iterator[Finding]:
    where = config.state_dir if config.state_dir.exists() else config.state_dir.parent
    usage = shutil.disk_usage(where)
    free = f"{usage.free / (1 << 30):.1f} GiB free in {where}"
    if usage.free < NO_DISK_BYTES:
        yield Finding("disk", FAIL, free, "free space: replies and state need it")
    elif usage.free < LOW_DISK_BYTES:
        yield Finding("disk", WARN, free, "free space soon")
    else:
        yield Finding("disk", OK, free)


def _queue(config: Config) -> Iterator[Finding]:
    from agent.queue import Queue

    queue = Queue(config.queue_dir)
    if not queue.incoming.is_dir():
        yield Finding("queue", OK, "empty (no queue yet)")
        return
    waiting = queue.oldest_first(queue.incoming)
    failed = len(queue.oldest_first(queue.failed)) if queue.failed.is_dir() else 0
    age = queue.age(queue.incoming, waiting[0]) if waiting else None
    text = f"{len(waiting)} waiting" + (f", oldest {age:.0f}s" if age is not None else "")
    text += f", {failed} in failed/"
    if age is not None and age > QUEUE_WAIT_WARN_SECONDS:
        yield Finding("queue", WARN, text, "is the supervisor running? agentctl status")
    elif failed:
        yield Finding("queue", WARN, text, f"look at the reasons in {queue.failed}")
    else:
        yield Finding("queue", OK, text)


def _database(config: Config) -> Iterator[Finding]:
    """[queue] backend = "postgres": the DSN, the server, its schema, the clock."""
    if config.queue.backend != "postgres":
        return
    from agent.pg.connect import connect, translated

    target = yield from _dsn(config)
    if target is None:
        return
    settings = config.queue.postgres
    started = time.monotonic()
    try:
        with connect(target, settings, "agent doctor") as conn, translated(target, "check"):
            conn.execute("SELECT 1")
            latency = (time.monotonic() - started) * 1000
            yield Finding("queue database", OK, f"{target.shown}: reachable, {latency:.0f} ms")
            yield _schema(conn, settings.auto_migrate, target.shown)
            yield _skew(conn)
    except AgentError as exc:  # DatabaseError: the server's words, never the DSN
        yield Finding(
            "queue database",
            FAIL,
            str(exc),
            "is the server up and reachable from here? agentctl db status says the same",
        )


def _dsn(config: Config) -> Iterator[Finding]:
    """The connection string's finding; returns its Target (None: nothing to connect to)."""
    from agent.pg.connect import load_target

    settings = config.queue.postgres
    name = settings.dsn_file
    if name is not None:
        from_unit = "CREDENTIALS_DIRECTORY" not in os.environ and not Path(name).is_absolute()
        if from_unit and not Path(name).exists():
            yield Finding("queue dsn", OK, f"{name}: from systemd's LoadCredential= at start")
            return None
    try:
        target = load_target(config)
    except AgentError as exc:  # says which file and what is wrong, never its content
        hint = "chmod 0600 the file" if "lets others read" in str(exc) else None
        yield Finding("queue dsn", FAIL, str(exc), hint or "write a libpq connection string")
        return None
    where = "dsn_file, private" if name is not None else "dsn in the config"
    yield Finding("queue dsn", OK, f"{where}: {target.shown}")
    return target


def _schema(conn: Any, auto_migrate: bool, shown: str) -> Finding:
    from agent.pg.migrate import build_version, current_version

    version, build = current_version(conn), build_version()
    text = f"version {version}, this build {build}"
    if version > build:
        return Finding(
            "queue schema",
            FAIL,
            f"{text}: a newer agent migrated it; this one refuses to use it",
            "upgrade agent on this host",
        )
    if version < build and auto_migrate:
        return Finding(
            "queue schema", WARN, f"{text}: the start migrates it", "or: agentctl db migrate"
        )
    if version < build:
        return Finding(
            "queue schema",
            FAIL,
            f"{text}: the start refuses it (auto_migrate off)",
            "agentctl db migrate",
        )
    return Finding("queue schema", OK, f"{text} (current)")


def _skew(conn: Any) -> Finding:
    """This host's clock against the database's, measured at the middle of the round trip."""
    before = time.time()
    (database,) = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()
    skew = database - (before + time.time()) / 2
    text = f"{skew:+.3f}s against the database"
    hint = "synchronize the clock (chrony, systemd-timesyncd): session idle resets compare it"
    if abs(skew) > SKEW_FAIL_SECONDS:
        return Finding("clock skew", FAIL, text, hint)
    if abs(skew) > SKEW_WARN_SECONDS:
        return Finding("clock skew", WARN, text, hint)
    return Finding("clock skew", OK, text)


def _slack_auth(config: Config) -> Iterator[Finding]:
    if not config.slack.enabled:
        return
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    from agent.slack_api import read_token

    for name, profile in config.slack.profiles.items():
        check = f"slack {name} auth.test"
        try:
            token = read_token(profile.bot_token_file, "bot")
            client = WebClient(token=token, base_url=config.slack.api_base_url, timeout=10)
            answer = client.auth_test()
        except SlackApiError as exc:
            error = exc.response.get("error", "unknown_error")
            yield Finding(check, FAIL, f"Slack refused the bot token: {error}", "check the token")
        except Exception as exc:  # no network, a missing token: said without the token
            yield Finding(check, WARN, f"could not ask Slack: {type(exc).__name__}")
        else:
            yield Finding(check, OK, f"bot {answer.get('user')} in team {answer.get('team')}")


# ---- helpers


def _unit_properties(*names: str) -> dict[str, str]:
    done = subprocess.run(
        ["systemctl", "show", UNIT, *(f"--property={n}" for n in names)],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return dict(line.partition("=")[::2] for line in done.stdout.splitlines() if "=" in line)


def _service_uid() -> int | None:
    """The packaged service's user when root checks for it (systemd runs it); else None."""
    if os.geteuid() != 0 or not Path("/run/systemd/system").is_dir():
        return None
    import pwd

    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        return None  # no service user on this machine: standalone


def _runs_as_service_user(program: str) -> bool:
    """Root checking for the packaged service: can the `agent` user execute it?"""
    if _service_uid() is None:
        return True
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={SERVICE_USER}",
            f"--regid={SERVICE_USER}",
            "--clear-groups",
            "test",
            "-x",
            program,
        ],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return done.returncode == 0
