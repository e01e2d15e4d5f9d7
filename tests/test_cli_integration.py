"""Integration: real agentctl processes against a temporary state_dir."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import pid_alive, skip_or_fail, wait_for

pytestmark = pytest.mark.integration


def test_start_status_stop_round_trip(agent_env):
    pid = agent_env.start()
    code, report = agent_env.status()
    assert code == 0
    sup = report["supervisor"]
    assert (sup["state"], sup["health"], sup["pid"], sup["manager"]) == (
        "running",
        "healthy",
        pid,
        "standalone",
    )
    assert sup["config"] == str(agent_env.config_path)
    assert {w["name"]: w["state"] for w in report["workers"]} == {
        "queue": "running",
        "dispatcher": "running",
        "slack": "disabled",
        "heartbeat": "disabled",
    }

    done = agent_env.stop()
    assert done.returncode == 0
    assert done.stdout.strip() == f"stopped (pid {pid})"
    assert not pid_alive(pid)
    code, report = agent_env.status()
    assert code == 3
    assert report["supervisor"]["state"] == "stopped"
    assert report["supervisor"]["outcome"] == "clean"
    assert {w["state"] for w in report["workers"]} == {"stopped", "disabled"}


def test_stop_when_not_running_is_a_quiet_success(agent_env):
    first = agent_env.stop()
    assert (first.returncode, first.stdout.strip()) == (0, "not running")
    agent_env.start()
    assert agent_env.stop().returncode == 0
    again = agent_env.stop()
    assert (again.returncode, again.stdout.strip()) == (0, "not running")


def test_duplicate_start_is_refused_with_the_running_pid(agent_env):
    pid = agent_env.start()
    done = agent_env.agentctl("start")
    assert done.returncode == 1
    assert f"already running (pid {pid})" in done.stderr
    assert agent_env.status()[1]["supervisor"]["pid"] == pid


def test_concurrent_starts_leave_exactly_one_supervisor(agent_env):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agent", "start"],
            env=agent_env.cmd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(20)
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    winners = [out for code, out, _ in results if code == 0]
    losers = [err for code, _, err in results if code != 0]
    assert len(winners) == 1, results
    pid = int(winners[0].strip().rsplit("pid ", 1)[1].rstrip(")"))
    assert len(losers) == 19
    assert all(f"already running (pid {pid})" in err for err in losers), losers
    assert agent_env.status()[1]["supervisor"]["pid"] == pid
    assert len(agent_env.events("supervisor.ready")) == 1


def test_restart_gives_a_fresh_runtime_with_the_same_config(agent_env):
    pid = agent_env.start()
    before = agent_env.status()[1]["supervisor"]
    done = agent_env.agentctl("restart")
    assert done.returncode == 0, done.stderr
    after = agent_env.status()[1]["supervisor"]
    assert after["state"] == "running"
    assert after["pid"] != pid and not pid_alive(pid)
    assert after["started_at"] > before["started_at"]
    assert after["config"] == before["config"]
    assert after["previous_run"]["outcome"] == "clean"
    assert {w["state"] for w in agent_env.status()[1]["workers"]} == {"running", "disabled"}


def test_crashing_worker_ends_in_error_and_degrades_health(agent_env):
    agent_env.start(AGENT_FAULT_INJECT="queue:crash")
    worker = wait_for(
        lambda: (w := _worker_in(agent_env, "queue", "error")) and w["gave_up"] and w,
        what="queue to stay in error",
    )
    assert "fault injection" in worker["last_error"]
    assert worker["restarts"] == 2  # restart_limit 3: the first run and two restarts
    code, report = agent_env.status()
    assert code == 2
    assert report["supervisor"]["health"] == "degraded"
    assert _worker_state(report, "dispatcher") == "running"
    errors = agent_env.events("worker.error")
    assert errors and all(e["worker"] == "queue" for e in errors)
    assert "fault injection" in errors[0]["message"]
    assert len(agent_env.events("worker.restarting")) == 2
    human = agent_env.agentctl("status")
    assert human.returncode == 2
    assert "degraded" in human.stdout and "fault injection" in human.stdout


def test_hanging_worker_is_reported_hung(agent_env):
    agent_env.start(AGENT_FAULT_INJECT="dispatcher:hang")
    worker = wait_for(lambda: _worker_in(agent_env, "dispatcher", "hung"), what="hung dispatcher")
    assert worker["heartbeat_age_s"] >= 2
    assert agent_env.status()[0] == 2
    hung = wait_for(lambda: agent_env.events("worker.hung"), what="worker.hung event")
    assert hung[0]["worker"] == "dispatcher" and hung[0]["level"] == "error"
    assert agent_env.stop().returncode == 0  # a hung worker still honours its stop event


def test_slow_stop_times_out_names_the_worker_and_records_it(agent_env):
    agent_env.write_config(supervisor={"stop_timeout": 1})
    pid = agent_env.start(AGENT_FAULT_INJECT="queue:slow-stop")
    done = agent_env.stop()
    assert done.returncode == 0
    assert "shutdown timeout waiting for workers: queue" in done.stderr
    assert not pid_alive(pid)
    code, report = agent_env.status()
    assert code == 3
    sup = report["supervisor"]
    assert sup["outcome"] == "shutdown_timeout"
    assert sup["last_error"] == "shutdown timeout waiting for workers: queue"
    queue = _worker_state(report, "queue", whole=True)
    assert (queue["state"], queue["last_error"]) == ("error", "shutdown timeout")
    assert _worker_state(report, "dispatcher") == "stopped"
    timeout = agent_env.events("supervisor.shutdown.timeout")
    assert len(timeout) == 1 and timeout[0]["level"] == "error"
    assert timeout[0]["workers"] == "queue"


def test_second_signal_escalates_a_graceful_stop(agent_env):
    agent_env.write_config(supervisor={"stop_timeout": 30})
    pid = agent_env.start(AGENT_FAULT_INJECT="queue:slow-stop")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: agent_env.events("supervisor.stopping"), what="graceful stop to begin")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=10, what="supervisor to exit")
    sup = agent_env.status()[1]["supervisor"]
    assert sup["outcome"] == "forced"
    assert sup["last_error"] == "forced stop while waiting for workers: queue"
    assert agent_env.events("supervisor.shutdown.forced")


def test_kill_9_shows_crashed_and_the_next_start_recovers(agent_env):
    pid = agent_env.start()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), what="killed supervisor to vanish")
    code, report = agent_env.status()
    assert code == 1
    assert report["supervisor"]["state"] == "crashed"
    assert report["supervisor"]["health"] is None
    assert {w["state"] for w in report["workers"]} == {"crashed", "disabled"}
    assert "crashed" in agent_env.agentctl("status").stdout

    new_pid = agent_env.start()
    code, report = agent_env.status()
    assert code == 0 and new_pid != pid
    assert report["supervisor"]["previous_run"]["outcome"] == "crashed"
    assert report["supervisor"]["previous_run"]["pid"] == pid
    stale = agent_env.events("supervisor.stale_state")
    assert len(stale) == 1 and str(pid) in stale[0]["message"]


def test_stop_escalates_to_sigkill_when_the_supervisor_does_not_exit(agent_env):
    agent_env.write_config(supervisor={"stop_timeout": 0.5})
    pid = agent_env.start()
    os.kill(pid, signal.SIGSTOP)  # frozen: it cannot act on SIGTERM
    done = agent_env.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"killed (pid {pid})"
    assert "sent SIGKILL" in done.stderr
    assert not pid_alive(pid)
    sup = agent_env.status()[1]["supervisor"]
    assert (sup["state"], sup["outcome"]) == ("stopped", "killed")
    assert agent_env.events("supervisor.killed")


def test_start_reports_why_the_supervisor_died_before_ready(agent_env):
    done = agent_env.agentctl("start", AGENT_FAULT_INJECT="queue:explode")
    assert done.returncode != 0
    assert "failed to start" in done.stderr
    assert "AGENT_FAULT_INJECT" in done.stderr and "queue:explode" in done.stderr
    assert agent_env.status()[0] == 3


def test_bad_config_exits_78_naming_file_key_and_expectation(agent_env):
    agent_env.config_path.write_text('[supervisor]\nstop_timeout = "soon"\n')
    # start and run need the config; status and stop only need to find the supervisor,
    # so they say what is wrong as a warning and go on (exit 3: not running; 0: nothing
    # to stop)
    for command, code in (("start", 78), ("run", 78), ("status", 3), ("stop", 0)):
        done = agent_env.agentctl(command)
        assert done.returncode == code, (command, done.stderr)
        assert str(agent_env.config_path) in done.stderr
        assert "[supervisor] stop_timeout" in done.stderr
        assert "expected a number of seconds" in done.stderr
        assert "Traceback" not in done.stderr


def test_cycles_with_status_readers_never_see_an_unreadable_state(agent_env):
    stop_reading = threading.Event()
    problems: list[str] = []

    def read_status() -> None:
        while not stop_reading.is_set():
            done = agent_env.agentctl("status", "--json")
            try:
                report = json.loads(done.stdout)
            except ValueError:
                problems.append(f"unparsable status: {done.stdout!r} {done.stderr!r}")
                continue
            if done.returncode not in (0, 3) or "not valid JSON" in str(report):
                problems.append(f"status exit {done.returncode}: {report['supervisor']}")

    readers = [threading.Thread(target=read_status) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for cycle in range(50):
            pid = agent_env.start()
            assert agent_env.status()[0] == 0
            if cycle % 2:
                done = agent_env.agentctl("restart")
                assert done.returncode == 0, done.stderr
            assert agent_env.stop().returncode == 0
            assert not pid_alive(pid)
    finally:
        stop_reading.set()
        for reader in readers:
            reader.join()
    assert problems == []


def _worker_state(report, name, whole=False):
    worker = next(w for w in report["workers"] if w["name"] == name)
    return worker if whole else worker["state"]


def _worker_in(agent_env, name, state):
    worker = agent_env.worker(name)
    return worker if worker["state"] == state else None


def test_a_worker_that_cannot_initialize_degrades_but_does_not_end_the_supervisor(agent_env):
    agent_env.state_dir.mkdir(parents=True)
    (agent_env.state_dir / "logs").mkdir()
    (agent_env.state_dir / "queue").write_text("not a directory")  # queue cannot initialize
    agent_env.write_config(supervisor={"restart_limit": 1})
    pid = agent_env.start()
    worker = wait_for(
        lambda: (w := agent_env.worker("queue"))["gave_up"] and w, what="queue to give up"
    )
    assert "FileExistsError" in worker["last_error"] or "NotADirectory" in worker["last_error"]
    assert agent_env.status()[0] == 2
    assert pid_alive(pid)  # one broken worker degrades the supervisor, it does not end it


def test_start_prints_why_a_supervisor_failed_after_taking_the_lock(agent_env):
    (agent_env.state_dir / "state.json").mkdir(parents=True)  # the state cannot be written
    done = agent_env.agentctl("start")
    assert done.returncode == 1
    assert "failed to start" in done.stderr and "IsADirectoryError" in done.stderr
    assert "Traceback" not in done.stderr
    failed = agent_env.events("supervisor.failed")
    assert len(failed) == 1 and failed[0]["level"] == "critical"
    assert "Traceback" in failed[0]["traceback"]  # the details are in the log, not on the screen


def test_unprivileged_user_gets_a_clear_permission_error(tmp_path_factory):
    if os.geteuid() != 0:
        skip_or_fail("needs root to run agentctl as another user")
    root = tmp_path_factory.mktemp("perm")
    root.chmod(0o755)
    for parent in root.parents:  # nobody must reach the config file
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    state = root / "state"
    state.mkdir(mode=0o700)
    (state / "agent.lock").touch()
    config = root / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n[agents.default]\ncommand = ["cat"]\n')
    config.chmod(0o644)
    checkout = Path(__file__).resolve().parents[1]
    commands = (["status"], ["status", "--json"], ["logs"], ["stop"], ["start"], ["send", "hi"])
    for command in commands:
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-m",
                "agent",
                *command,
            ],
            env={"AGENT_CONFIG": str(config), "PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 77, (command, done.stderr)
        assert "permission denied" in done.stderr and "Traceback" not in done.stderr


def test_status_logs_and_stop_still_find_a_supervisor_whose_config_broke(agent_env):
    pid = agent_env.start()
    good = agent_env.config_path.read_text()
    agent_env.config_path.write_text(good + "[dispatcher]\nconcurrency = 0\n")  # invalid now
    for args in (["status"], ["status", "--json"], ["logs", "-n", "5"], ["logs", "--json"]):
        done = agent_env.agentctl(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert "warning:" in done.stderr and "looking for the supervisor in" in done.stderr
        assert "Traceback" not in done.stderr
    assert str(pid) in agent_env.agentctl("status").stdout
    stopped = agent_env.agentctl("stop")
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout


def test_config_after_the_command_version_and_usage_errors(agent_env, tmp_path):
    pid = agent_env.start()
    env = {k: v for k, v in agent_env.cmd_env().items() if k != "AGENT_CONFIG"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-user-config")

    def agentctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    config = str(agent_env.config_path)
    for args in (["status", "--config", config], ["--config", config, "status"]):
        done = agentctl(*args)
        assert done.returncode == 0 and f"pid:        {pid}" in done.stdout, done.stderr
    other = tmp_path / "other.toml"
    other.write_text("state_dir = '/nonexistent-before'\n")
    after_wins = agentctl("--config", str(other), "status", "--config", config, "--json")
    assert json.loads(after_wins.stdout)["supervisor"]["pid"] == pid
    sent = agentctl("send", "--config", config, "--wait", "-", stdin="from stdin\n")
    assert (sent.returncode, sent.stdout) == (0, "from stdin\n"), sent.stderr
    version = agentctl("--version")
    assert version.returncode == 0 and version.stdout.startswith("agentctl, version ")
    for args, said in (
        (["logs", "--since", "bogus"], "--since: expected a time"),
        (["logs", "--worker", "nope"], "expected one of queue, dispatcher, slack, heartbeat"),
    ):
        done = agentctl(*args, "--config", config)
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
        done = agentctl("--config", config, *args)  # the quick path says the same
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
    # --json before the command as well as after it, where it applies; refused elsewhere
    for args in (["--json", "status"], ["status", "--json"], ["--json", "--config", config]):
        args = [*args, "status"] if args[-1] == config else args
        done = agentctl(*args, "--config", config)
        assert json.loads(done.stdout)["supervisor"]["pid"] == pid, args
    for args in (["--json", "logs", "-n", "3"], ["--json", "logs", "--worker", "queue", "-n", "3"]):
        lines = agentctl(*args, "--config", config).stdout.splitlines()
        assert lines and all(json.loads(line)["ts"] for line in lines), args
    doctor = agentctl("--json", "doctor", "--offline", "--config", config)
    assert json.loads(doctor.stdout.splitlines()[0]), doctor.stdout
    refused = agentctl("--json", "stop", "--config", config)
    assert refused.returncode == 2 and "--json applies to status, logs" in refused.stderr
    assert pid_alive(pid)


def test_a_failed_start_says_its_own_cause_never_an_earlier_runs(agent_env):
    state = agent_env.state_dir
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "supervisor.out").write_text("OLD OUTPUT LINE from an earlier run\n")
    earlier = {
        "supervisor": {"pid": 4_000_000, "phase": "stopped", "last_error": "OLD PROBLEM"},
        "workers": [],
    }
    (state / "state.json").write_text(json.dumps(earlier))
    (state / "home").write_text("not a directory")  # the agents' homes cannot be made
    done = agent_env.agentctl("start")
    assert done.returncode == 78, done.stderr
    assert f"{state / 'home'}: expected a directory" in done.stderr
    assert "OLD PROBLEM" not in done.stderr and "OLD OUTPUT LINE" not in done.stderr


def test_run_in_a_terminal_prints_human_lines_and_still_logs_to_the_sink(agent_env):
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run"],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=agent_env.cmd_env(),
    )
    os.close(follower)
    seen = b""

    def ready_line_seen() -> bool:
        nonlocal seen
        if select.select([leader], [], [], 0.2)[0]:
            with contextlib.suppress(OSError):  # the terminal closed: the process ended
                seen += os.read(leader, 4096)
        return b"supervisor.ready supervisor ready" in seen

    try:
        wait_for(ready_line_seen, timeout=20, what="a human 'supervisor.ready' line on the tty")
        line = next(x for x in seen.decode().splitlines() if "supervisor.ready" in x)
        assert " info supervisor.ready " in line and not line.lstrip().startswith("{")
        assert agent_env.events("supervisor.ready"), "the sink did not get the event too"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        os.close(leader)


def test_restart_with_a_new_config_runs_the_new_one(agent_env, tmp_path):
    old_pid = agent_env.start()
    new = tmp_path / "new.toml"
    new.write_text(
        f'state_dir = "{agent_env.state_dir}"\n[logging]\nsink = "file"\n'
        '[agents.default]\ncommand = ["sh", "-c", "echo from-the-new-config"]\n'
    )
    new.chmod(0o640)
    for where in (["restart", "--config", str(new)], ["--config", str(new), "restart"]):
        done = agent_env.agentctl(*where)
        assert done.returncode == 0, done.stderr
        _, report = agent_env.status()
        assert report["supervisor"]["config"] == str(new), where
        assert report["supervisor"]["pid"] != old_pid
        old_pid = report["supervisor"]["pid"]
        sent = agent_env.agentctl("--config", str(new), "send", "--wait", "hi")
        assert sent.stdout.strip() == "from-the-new-config", sent.stderr
