"""A hostile state_dir: whoever can plant files there must not make the supervisor write
outside it, signal a foreign process, or admit a second supervisor (docs/security.md)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runledger import boot_id, proc_stat
from tests.helpers import pid_alive, pids_with_cmdline, skip_or_fail, wait_for

pytestmark = pytest.mark.integration

NOBODY = 65534


@pytest.fixture
def outside(tmp_path):
    """A file outside state_dir that nothing may write; its bytes and times are checked."""
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


def untouched(path: Path, before: os.stat_result) -> bool:
    now = path.stat()
    return path.read_text() == "precious\n" and now.st_mtime_ns == before.st_mtime_ns


def supervisors(agent_env) -> list[int]:
    """Live supervisor processes of this agent_env (their argv names its config file)."""
    return [
        pid
        for pid in pids_with_cmdline(str(agent_env.config_path))
        if b"run" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ]


@pytest.fixture
def sleeper():
    """A real process leading its own process group and session, unrelated to the agent."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _refused_at_start(agent_env, *needles: str) -> str:
    for command in ("start", "run"):
        done = agent_env.agentctl(command)
        assert done.returncode == 78, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]
    assert supervisors(agent_env) == []
    return lines[0]


# ---- symlinks planted where the runtime keeps its files


@pytest.mark.parametrize("name", ["agent.lock", "state.json", "logs/agent.jsonl", "logs"])
def test_a_symlink_in_state_dir_is_refused_at_start_and_its_target_untouched(
    agent_env, outside, name
):
    link = agent_env.state_dir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside.parent if name == "logs" else outside)
    before = outside.stat()
    _refused_at_start(agent_env, str(link), "a symlink")
    assert untouched(outside, before)
    assert os.listdir(outside.parent) == ["precious.txt"]


def test_symlinks_planted_while_running_are_never_written_through(agent_env, outside):
    pid = agent_env.start()
    before = outside.stat()
    state, log = agent_env.state_dir / "state.json", agent_env.state_dir / "logs" / "agent.jsonl"
    for path in (state, log):
        path.unlink()
        path.symlink_to(outside)
    # the state file is replaced by the next flush, never written through
    wait_for(lambda: not state.is_symlink(), what="the supervisor to replace the state symlink")
    logs = agent_env.agentctl("logs")
    assert logs.returncode == 0 and "is a symlink; not following it" in logs.stderr
    assert "precious" not in logs.stdout
    assert agent_env.stop().returncode == 0  # it logs while stopping: into its own file
    assert not pid_alive(pid)
    assert untouched(outside, before)
    _refused_at_start(agent_env, str(log), "a symlink")  # the log symlink is still there
    assert untouched(outside, before)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_the_lock_refuses_what_is_not_its_file_and_never_truncates_a_target(
    tmp_path, outside, kind
):
    from agent.errors import AgentError
    from agent.lock import SupervisorLock

    lock_path = tmp_path / "agent.lock"
    {
        "symlink": lambda: lock_path.symlink_to(outside),
        "fifo": lambda: os.mkfifo(lock_path),
        "directory": lock_path.mkdir,
    }[kind]()
    before = outside.stat()
    with pytest.raises(AgentError, match="is a symlink or not a regular file"):
        SupervisorLock(lock_path).acquire()
    assert untouched(outside, before)


# ---- ownership and modes (sshd StrictModes)


@pytest.mark.parametrize(
    ("relative", "mode", "owner"),
    [
        ("", 0o777, None),
        ("", 0o770, None),
        ("", 0o755, NOBODY),
        ("logs", 0o757, None),
        ("runs", 0o770, None),
        ("runs", 0o700, NOBODY),
        ("slack/main", 0o772, None),
        ("queue/incoming", 0o777, None),
        ("queue/processing", 0o770, None),
    ],
)
def test_a_writable_or_foreign_state_dir_or_subdirectory_is_refused_at_start(
    agent_env, relative, mode, owner
):
    target = agent_env.state_dir / relative
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(mode)
    if owner is not None:
        os.chown(target, owner, owner)
    line = _refused_at_start(agent_env, f"{target.as_posix().rstrip('/')}:")
    uid = owner if owner is not None else 0
    assert f"owner uid {uid}, mode {mode:04o}" in line
    assert "expected owner uid 0" in line and "writable" in line
    assert agent_env.status()[0] == 3  # status still answers


def test_the_queue_ingress_may_be_group_writable_for_producers(agent_env):
    for name in ("incoming", "tmp"):
        ingress = agent_env.state_dir / "queue" / name
        ingress.mkdir(parents=True)
        ingress.chmod(0o2770)
    pid = agent_env.start()
    assert agent_env.status()[0] == 0
    assert agent_env.stop().stdout.strip() == f"stopped (pid {pid})"


def test_entries_that_are_not_the_runtimes_are_neither_checked_nor_used(agent_env, outside):
    home = agent_env.state_dir / "home"  # e.g. an agent's home: its files are its own
    home.mkdir(parents=True)
    home.chmod(0o777)
    (home / "link").symlink_to(outside)
    (agent_env.state_dir / "notes").symlink_to(outside)
    before = outside.stat()
    pid = agent_env.start()
    assert agent_env.stop().stdout.strip() == f"stopped (pid {pid})"
    assert untouched(outside, before)


def test_what_the_supervisor_creates_is_private_to_its_user_and_group(agent_env):
    done = subprocess.run(
        [sys.executable, "-m", "agent", "start"],
        env=agent_env.cmd_env(),
        preexec_fn=lambda: os.umask(0),  # the laxest umask an operator could have
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    agent_env.stop()
    for path in [agent_env.state_dir, *agent_env.state_dir.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        assert mode & 0o027 == 0, f"{path}: {mode:04o}"  # at most 0750 / 0640


def test_a_slack_token_file_others_can_read_gives_a_warning_event(agent_env, tmp_path):
    bot, app = tmp_path / "bot", tmp_path / "app"
    bot.write_text("xoxb-test")
    app.write_text("xapp-test")
    bot.chmod(0o644)
    app.chmod(0o600)
    agent_env.write_config(
        slack={"enabled": True, "api_base_url": "http://127.0.0.1:9/api/"},
        **{"slack.profiles.main": {"bot_token_file": str(bot), "app_token_file": str(app)}},
    )
    agent_env.start()
    [warning] = wait_for(lambda: agent_env.events("supervisor.insecure_file"), what="warning")
    assert warning["level"] == "warning" and str(bot) in warning["message"]
    assert "0644" in warning["message"] and str(app) not in warning["message"]


# ---- runs/: a planted entry never gets a foreign process group killed


def _record(pgid: int, **changes) -> str:
    stat = proc_stat(pgid)
    record = {"pgid": pgid, "sid": stat.sid, "leader_start": stat.start, "boot_id": boot_id()}
    return json.dumps({**record, **changes})


@pytest.mark.parametrize(
    "plant",
    ["old_format", "wrong_start", "wrong_session", "other_boot", "foreign_owner", "garbage"],
)
def test_a_planted_runs_entry_never_kills_an_unrelated_process_group(agent_env, sleeper, plant):
    runs = agent_env.state_dir / "runs"
    runs.mkdir(parents=True)
    entry = runs / str(sleeper.pid)
    text = {
        "old_format": str(proc_stat(sleeper.pid).start),  # what the ledger used to accept
        "wrong_start": _record(sleeper.pid, leader_start=1),
        "wrong_session": _record(sleeper.pid, sid=1),
        "other_boot": _record(sleeper.pid, boot_id="0" * 36),
        "foreign_owner": _record(sleeper.pid),
        "garbage": "[" * 3000,
    }[plant]
    entry.write_text(text)
    if plant == "foreign_owner":
        os.chown(entry, NOBODY, NOBODY)
    agent_env.start()
    refused = wait_for(
        lambda: agent_env.events("dispatcher.run_record_refused"), what="the refusal event"
    )
    assert str(entry) in refused[0]["message"]
    assert not entry.exists()
    assert pid_alive(sleeper.pid), "a foreign process group was signalled"
    assert not agent_env.events("dispatcher.orphans_killed")
    assert len(supervisors(agent_env)) == 1


def test_a_planted_runs_symlink_is_refused_at_start(agent_env, sleeper, outside):
    runs = agent_env.state_dir / "runs"
    runs.mkdir(parents=True)
    (runs / str(sleeper.pid)).symlink_to(outside)
    _refused_at_start(agent_env, "a symlink")
    assert pid_alive(sleeper.pid)


def test_a_runs_entry_for_a_group_whose_leader_is_gone_kills_only_our_session(agent_env, tmp_path):
    # A leaderless group in its own session: the members are not of the recorded run.
    done = subprocess.run(
        ["setsid", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $$ $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    leader, member = map(int, done.stdout.split())
    try:
        wait_for(lambda: not pid_alive(leader), what="the group leader to exit")
        runs = agent_env.state_dir / "runs"
        runs.mkdir(parents=True)
        member_stat = proc_stat(member)
        record = {
            "pgid": leader,
            "sid": member_stat.sid + 1,  # not the session its members are in
            "leader_start": member_stat.start,
            "boot_id": boot_id(),
        }
        (runs / str(leader)).write_text(json.dumps(record))
        agent_env.start()
        wait_for(lambda: agent_env.events("dispatcher.run_record_refused"), what="refusal")
        assert pid_alive(member)
    finally:
        os.kill(member, signal.SIGKILL)


# ---- agent.lock: its content never chooses whom stop signals; deleting it admits nobody


def test_another_pid_written_into_agent_lock_is_never_signalled(agent_env, sleeper):
    pid = agent_env.start()
    lock = agent_env.state_dir / "agent.lock"
    lock.write_text(f"{sleeper.pid}\n")  # same file, same lock, a lie inside
    code, report = agent_env.status()
    assert (code, report["supervisor"]["pid"]) == (0, pid)  # the kernel's holder
    assert supervisors(agent_env) == [pid]
    done = agent_env.stop()
    assert (done.returncode, done.stdout.strip()) == (0, f"stopped (pid {pid})")
    assert not pid_alive(pid)
    assert pid_alive(sleeper.pid)
    again = agent_env.stop()
    assert again.stdout.strip() == "not running" and pid_alive(sleeper.pid)


def test_a_pid_in_an_unheld_agent_lock_is_never_signalled(agent_env, sleeper):
    agent_env.state_dir.mkdir(parents=True)
    (agent_env.state_dir / "agent.lock").write_text(f"{sleeper.pid}\n")
    done = agent_env.stop()
    assert (done.returncode, done.stdout.strip()) == (0, "not running")
    assert agent_env.status()[0] == 3
    assert pid_alive(sleeper.pid)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_deleted_or_replaced_agent_lock_admits_no_second_supervisor(agent_env, how, sleeper):
    pid = agent_env.start()
    lock = agent_env.state_dir / "agent.lock"
    lock.unlink()
    if how == "replaced":
        lock.write_text(f"{sleeper.pid}\n")
    lost = wait_for(lambda: agent_env.events("supervisor.lock_lost"), what="lock_lost event")
    assert lost[0]["level"] == "error" and str(lock) in lost[0]["message"]
    code, report = agent_env.status()
    sup = report["supervisor"]
    assert (code, sup["state"], sup["health"], sup["pid"]) == (2, "running", "degraded", pid)
    assert "no longer names the running supervisor's lock" in sup["last_error"]
    human = agent_env.agentctl("status")
    assert "running (degraded)" in human.stdout and "no longer names" in human.stdout
    for command in ("start", "run"):
        done = agent_env.agentctl(command)
        assert done.returncode == 1, (command, done.stderr)
        assert f"already running (pid {pid})" in done.stderr
    assert supervisors(agent_env) == [pid]
    done = agent_env.stop()
    assert (done.returncode, done.stdout.strip()) == (0, f"stopped (pid {pid})")
    assert pid_alive(sleeper.pid)
    assert supervisors(agent_env) == []
    assert agent_env.start() != pid  # and afterwards all is well again
    assert agent_env.status()[0] == 0


# ---- restart: the config state.json names is not a command


def _hostile_config(tmp_path: Path, mode: int, owner: int | None) -> tuple[Path, Path]:
    evil_state = tmp_path / "evil-state"
    evil = tmp_path / "evil.toml"
    evil.write_text(f'state_dir = "{evil_state}"\n')
    evil.chmod(mode)
    if owner is not None:
        os.chown(evil, owner, owner)
    return evil, evil_state


def _name_config_in_state(agent_env, config: Path) -> None:
    from agent.state import read_state, write_state

    path = agent_env.state_dir / "state.json"
    saved = read_state(path)
    write_state(path, saved._replace(supervisor=saved.supervisor._replace(config=str(config))))


@pytest.mark.parametrize(("mode", "owner"), [(0o666, None), (0o644, NOBODY), (0o620, None)])
def test_restart_never_uses_an_untrusted_config_named_by_state_json(
    agent_env, tmp_path, mode, owner
):
    evil, evil_state = _hostile_config(tmp_path, mode, owner)
    pid = agent_env.start()
    agent_env.stop()
    _name_config_in_state(agent_env, evil)
    bare = {"AGENT_CONFIG": "", "STATE_DIRECTORY": str(agent_env.state_dir)}
    done = agent_env.agentctl("restart", **bare)
    assert done.returncode == 78, done.stderr
    assert str(evil) in done.stderr and "not using it" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not evil_state.exists() and supervisors(agent_env) == []
    assert not pid_alive(pid)


def test_restart_prefers_its_own_config_and_falls_back_only_to_a_trusted_recorded_one(
    agent_env, tmp_path
):
    evil, evil_state = _hostile_config(tmp_path, 0o666, None)
    agent_env.start()
    _name_config_in_state(agent_env, evil)  # running: the next flush rewrites it, so stop first
    agent_env.stop()
    _name_config_in_state(agent_env, evil)
    done = agent_env.agentctl("restart")  # $AGENT_CONFIG given: the recorded one is ignored
    assert done.returncode == 0, done.stderr
    assert agent_env.status()[1]["supervisor"]["config"] == str(agent_env.config_path)
    assert not evil_state.exists()
    agent_env.config_path.chmod(0o640)
    bare = {"AGENT_CONFIG": "", "STATE_DIRECTORY": str(agent_env.state_dir)}
    done = agent_env.agentctl("restart", **bare)  # none given: the trusted recorded one
    assert done.returncode == 0, done.stderr
    assert agent_env.status()[1]["supervisor"]["config"] == str(agent_env.config_path)
    assert len(supervisors(agent_env)) == 1


def test_an_unprivileged_supervisor_refuses_a_state_dir_owned_by_another_user(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root to run the supervisor as another user")
    root = tmp_path / "priv"
    root.mkdir(mode=0o755)
    for parent in root.parents:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    state = root / "state"
    state.mkdir(mode=0o755)
    os.chown(state, 1, 1)  # daemon: neither nobody nor root
    config = root / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n')
    config.chmod(0o644)
    checkout = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
            *("/usr/bin/python3", "-m", "agent", "run"),
        ],
        env={"AGENT_CONFIG": str(config), "PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert f"{state}: owner uid 1" in done.stderr and f"expected owner uid {NOBODY}" in done.stderr


def test_a_run_record_must_be_written_when_its_leader_started():
    from agent.runledger import _boot_time, _fresh

    ticks = proc_stat(os.getpid()).start
    started = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    assert _fresh(started + 0.05, ticks)  # written right after the spawn: ours
    assert _fresh(started + 30, ticks)  # a slow machine
    assert not _fresh(started + 3600, ticks)  # planted an hour after the process started
    assert not _fresh(started - 60, ticks)  # older than its process: another boot or a lie
