"""agent under a real systemd 252 + journald, installed from its .deb (see conftest.py).

The tests share one guest and run in file order: install -> start -> status -> logs ->
agentctl -> watchdog -> stop -> slow-stop -> security -> upgrade -> remove -> purge.
"""

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.e2e.guest import Guest
from tests.helpers import skip_or_fail, wait_for

pytestmark = pytest.mark.e2e

CONFIG = "/etc/agent/agent.toml"
DROPIN = "/etc/systemd/system/agent.service.d/50-e2e.conf"
ENABLED_WORKERS = ("queue", "dispatcher")  # what the packaged default config runs
# where the Claude Code CLI keeps a session of the `default` agent (see test_main_job.py)
SESSION_FILE = "/var/lib/agent/home/default/.claude/projects/-var-lib-agent-home-default/s.jsonl"


# ---- helpers


def journal(guest: Guest, *matches: str, unit: bool = True) -> list[dict[str, Any]]:
    argv = ["journalctl", "--no-pager", "-o", "json", *(["-u", "agent"] if unit else []), *matches]
    out = guest.run(argv).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def agent_processes(guest: Guest) -> list[str]:
    done = guest.run(["pgrep", "-a", "-u", "agent"], check=False)
    return done.stdout.splitlines()


def main_pid(guest: Guest) -> int:
    return int(guest.unit("MainPID")["MainPID"])


def wait_active(guest: Guest, other_than: int = 0, timeout: float = 30) -> int:
    def ready() -> int | None:
        props = guest.unit("ActiveState", "SubState", "MainPID")
        pid = int(props["MainPID"])
        if props["ActiveState"] == "active" and props["SubState"] == "running" and pid:
            return pid if pid != other_than else None
        return None

    return wait_for(ready, timeout=timeout, interval=0.1, what="agent.service active (running)")


def restart_clean(guest: Guest) -> int:
    guest.run(["systemctl", "reset-failed", "agent"], check=False)
    guest.run(["systemctl", "restart", "agent"])
    return wait_active(guest)


@contextmanager
def faulty_service(guest: Guest, config: str, dropin: str) -> Iterator[None]:
    """Run with a test config and a unit drop-in; restore both (and a clean service) after."""
    original = guest.path(CONFIG).read_text()
    guest.run(["systemctl", "reset-failed", "agent"], check=False)  # a fresh start-limit count
    guest.write(CONFIG, config)
    guest.write(DROPIN, "[Service]\n" + dropin)
    guest.run(["systemctl", "daemon-reload"])
    try:
        yield
    finally:
        guest.write(CONFIG, original)  # byte for byte: the conffile counts as unmodified again
        guest.path(DROPIN).unlink()
        guest.run(["systemctl", "daemon-reload"])
        restart_clean(guest)


# ---- the package


def test_lintian_reports_no_errors(agent_deb):
    if not shutil.which("lintian"):
        skip_or_fail("lintian is not installed; run `bash tests/e2e/prepare.sh`")
    done = subprocess.run(["lintian", str(agent_deb)], capture_output=True, text=True, check=False)
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert not errors, done.stdout


def test_install_enables_and_starts_the_service(guest):
    props = guest.unit("UnitFileState", "ActiveState", "SubState", "User", "FragmentPath")
    assert props["UnitFileState"] == "enabled"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["User"] == "agent"
    uid = int(guest.run(["id", "-u", "agent"]).stdout)
    assert 0 < uid < 1000, "agent must be a system user"
    conffiles = guest.run(["dpkg-query", "-W", "-f=${Conffiles}", "agent"]).stdout
    assert CONFIG in conffiles
    owner = guest.run(["stat", "-c", "%U %a", "/var/lib/agent"]).stdout.split()
    assert owner == ["agent", "750"]
    agent_proc = guest.run(["ps", "-o", "user=,args=", "-p", str(main_pid(guest))]).stdout
    assert agent_proc.split()[0] == "agent" and "agentctl run" in agent_proc


def test_bundled_modules_are_what_agentctl_imports(guest):
    # the exact sys.path line the package put into /usr/bin/agentctl, then the imports the
    # Slack worker and the queue's directory watch make
    script = guest.path("/usr/bin/agentctl").read_text()
    path_line = next(line for line in script.splitlines() if line.startswith("sys.path"))
    probe = (
        f"import sys\n{path_line}\n"
        "import inotify_simple, slack_sdk\n"
        "from slack_sdk import WebClient\n"
        "from slack_sdk.socket_mode.builtin import SocketModeClient\n"
        "print(slack_sdk.__file__, inotify_simple.__file__)\n"
    )
    out = guest.run(["python3", "-c", probe]).stdout.split()
    assert all(f.startswith("/usr/share/agent/vendor/") for f in out), out
    # the service found inotify_simple too (it logs a warning when it has to poll)
    messages = [e.get("MESSAGE", "") for e in journal(guest)]
    assert not [m for m in messages if "inotify unavailable" in m], messages


# ---- start, status, logs


def test_start_blocks_until_ready_with_status_text(guest):
    guest.run(["systemctl", "stop", "agent"])
    assert guest.unit("ActiveState")["ActiveState"] == "inactive"
    guest.run(["systemctl", "start", "agent"], timeout=120)
    # Type=notify: `systemctl start` returned, so READY=1 arrived; systemd says so too
    props = guest.unit("ActiveState", "SubState", "StatusText", "MainPID", "Type")
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    status = props["StatusText"]
    # the packaged config names no agent: running, but it says what is missing
    assert status.startswith("degraded:") and "no agent configured" in status, status
    for worker in ENABLED_WORKERS:
        assert f"{worker}=running" in status, status
    pid = int(props["MainPID"])
    started = journal(guest, "EVENT=worker.started", f"_PID={pid}")
    assert {e["WORKER"] for e in started} >= set(ENABLED_WORKERS)
    shown = guest.run(["systemctl", "status", "agent", "--no-pager"]).stdout
    assert "active (running)" in shown and f'Status: "{status}"' in shown


def test_status_json_reports_systemd_and_running_workers(guest):
    done = guest.run(["agentctl", "status", "--json"], check=False)
    assert done.returncode == 2, done.stdout + done.stderr  # degraded: no agent configured
    report = json.loads(done.stdout)
    sup = report["supervisor"]
    assert sup["manager"] == "systemd"
    assert (sup["state"], sup["health"]) == ("running", "degraded")  # no agent configured
    assert sup["pid"] == main_pid(guest)
    assert sup["log_sink"] == "journald"
    assert sup["state_dir"] == "/var/lib/agent"
    states = {w["name"]: w["state"] for w in report["workers"]}
    enabled = {name: s for name, s in states.items() if s != "disabled"}
    assert set(enabled) == set(ENABLED_WORKERS), states
    assert set(enabled.values()) == {"running"}, states
    unit = report["systemd"]
    assert (unit["active_state"], unit["sub_state"]) == ("active", "running")
    assert unit["main_pid"] == sup["pid"]
    human = guest.run(["agentctl", "status"], check=False).stdout
    assert "running (degraded)" in human and "no agent configured" in human
    assert "manager:    systemd" in human
    assert "agent.service active" not in human  # the quick form does not ask systemd
    full = guest.run(["agentctl", "status", "-l"], check=False).stdout
    assert f"agent.service active (running), main pid {sup['pid']}, result success" in full


def test_an_idle_service_keeps_its_pulse_in_run_and_leaves_state_json_alone(guest):
    pulse, state = guest.path("/run/agent/pulse.json"), guest.path("/var/lib/agent/state.json")
    wait_for(pulse.exists, what="/run/agent/pulse.json")
    assert not guest.path("/var/lib/agent/pulse.json").exists()
    before = state.stat().st_mtime_ns
    seen = {pulse.stat().st_ino}
    wait_for(lambda: seen.add(pulse.stat().st_ino) or len(seen) >= 4, what="four pulses")
    assert state.stat().st_mtime_ns == before, "an idle service rewrote state.json"
    report = json.loads(guest.run(["agentctl", "status", "--json"], check=False).stdout)
    assert all(w["heartbeat_age_s"] < 2 for w in report["workers"] if w["state"] == "running")


def test_logs_come_from_journald_with_structured_fields(guest):
    done = guest.run(["agentctl", "logs", "--json", "-n", "50"])
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert 0 < len(records) <= 50
    assert all({"ts", "level", "event", "worker", "message", "pid"} <= set(r) for r in records)
    assert "supervisor.ready" in {r["event"] for r in records}

    done = guest.run(["agentctl", "logs", "--worker", "queue", "--event", "worker.started"])
    lines = done.stdout.splitlines()
    assert lines, "no worker.started event for queue"
    assert all("worker.started" in line and "[queue]" in line for line in lines), lines
    done = guest.run(
        ["agentctl", "logs", "--worker", "queue", "--event", "worker.started", "--json"]
    )
    for record in map(json.loads, done.stdout.splitlines()):
        assert (record["worker"], record["event"]) == ("queue", "worker.started")

    warnings = guest.run(["agentctl", "logs", "--level", "warning", "--json", "-n", "500"])
    for record in map(json.loads, warnings.stdout.splitlines()):
        assert record["level"] in ("warning", "error", "critical"), record
    recent = guest.run(["agentctl", "logs", "--since", "1h", "--json"]).stdout.splitlines()
    assert recent, "--since 1h found nothing"
    bad = guest.run(["agentctl", "logs", "--since", "yesterdayish"], check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr

    entries = journal(guest)
    structured = [e for e in entries if e.get("EVENT") and e.get("WORKER")]
    assert structured, "journalctl -u agent shows no entry with EVENT and WORKER"
    assert all(e["_SYSTEMD_UNIT"] == "agent.service" for e in structured)
    assert ("worker.started", "queue") in {(e["EVENT"], e["WORKER"]) for e in structured}


def test_agentctl_start_stop_restart_delegate_to_systemctl(guest):
    old = main_pid(guest)
    done = guest.run(["agentctl", "restart"])
    new = main_pid(guest)
    assert new != old and done.stdout.strip() == f"started (pid {new})"
    again = guest.run(["agentctl", "start"], check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    stopped = guest.run(["agentctl", "stop"])
    assert stopped.stdout.strip() == f"stopped (pid {new})", stopped.stdout + stopped.stderr
    assert guest.unit("ActiveState")["ActiveState"] == "inactive"
    started = guest.run(["agentctl", "start"])
    assert started.stdout.strip() == f"started (pid {wait_active(guest)})"


def test_agentctl_without_privileges_says_why(guest):
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "agentctl"]
    for action in ("stop", "restart"):
        done = guest.run([*nobody, action], check=False)
        assert done.returncode == 77, done.stdout + done.stderr
        assert "permission denied" in done.stderr and "as root" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    logs = guest.run([*nobody, "logs"], check=False)
    assert logs.returncode == 77, logs.stdout + logs.stderr
    assert "systemd-journal" in logs.stderr and "Traceback" not in logs.stderr
    assert guest.unit("ActiveState")["ActiveState"] == "active"


# ---- failure handling


def test_hang_triggers_the_watchdog_and_a_restart(guest):
    with faulty_service(
        guest,
        "[supervisor]\nhang_timeout = 1\n",
        "Environment=AGENT_FAULT_INJECT=queue:hang\nWatchdogSec=3\nRestartSec=4\n",
    ):
        guest.run(["systemctl", "restart", "agent"])
        hung_pid = main_pid(guest)
        assert guest.unit("Environment")["Environment"].find("queue:hang") >= 0

        # Result=watchdog shows while systemd waits RestartSec before restarting
        wait_for(
            lambda: guest.unit("Result")["Result"] == "watchdog",
            timeout=30,
            interval=0.1,
            what="Result=watchdog",
        )
        # agentctl status adds systemd's verdict to its own (within RestartSec=4)
        report = json.loads(guest.run(["agentctl", "status", "--json"], check=False).stdout)
        assert report["systemd"]["result"] == "watchdog", report["systemd"]
        assert report["supervisor"]["state"] != "running"
        new_pid = wait_active(guest, other_than=hung_pid)
        assert new_pid != hung_pid
        assert int(guest.unit("NRestarts")["NRestarts"]) >= 1
        messages = [e.get("MESSAGE", "") for e in journal(guest)]
        assert any("Watchdog timeout" in m for m in messages), messages[-10:]
        assert any("Failed with result 'watchdog'" in m for m in messages)
        hung = journal(guest, "EVENT=worker.hung", "WORKER=queue", f"_PID={hung_pid}")
        assert hung, "the supervisor did not report the hung worker before the watchdog fired"
    assert guest.unit("ActiveState")["ActiveState"] == "active"


def test_stop_is_clean(guest):
    pid = main_pid(guest)
    guest.run(["systemctl", "stop", "agent"])
    props = guest.unit("ActiveState", "Result", "MainPID", "ExecMainStatus")
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success"
    assert props["MainPID"] == "0"
    assert agent_processes(guest) == []
    assert guest.run(["systemctl", "is-active", "agent"], check=False).returncode == 3
    stopped = journal(guest, "EVENT=supervisor.stopped", f"_PID={pid}")
    assert stopped and stopped[-1]["OUTCOME"] == "clean"
    guest.run(["systemctl", "start", "agent"])


def test_stop_kills_a_stray_child_too(guest):
    # a process in the service's cgroup that escaped the supervisor (own session, ignores
    # SIGTERM): KillMode=mixed SIGKILLs it once the supervisor has exited
    stray = "setsid -f sh -c 'trap \"\" TERM; exec sleep 600' </dev/null >/dev/null 2>&1"
    with faulty_service(guest, "", f"ExecStartPost=/bin/sh -c {json.dumps(stray)}\n"):
        guest.run(["systemctl", "restart", "agent"])
        wait_for(
            lambda: any("sleep 600" in p for p in agent_processes(guest)),
            timeout=10,
            what="the stray child in agent.service's cgroup",
        )
        guest.run(["systemctl", "stop", "agent"])
        assert agent_processes(guest) == []
        assert guest.unit("ActiveState")["ActiveState"] in ("inactive", "failed")


def test_slow_stop_hits_the_supervisor_timeout_before_systemds(guest):
    with faulty_service(
        guest,
        "[supervisor]\nstop_timeout = 2\n",
        "Environment=AGENT_FAULT_INJECT=queue:slow-stop\n",
    ):
        guest.run(["systemctl", "restart", "agent"])
        pid = main_pid(guest)
        t0 = time.monotonic()
        guest.run(["systemctl", "stop", "agent"], timeout=60)
        took = time.monotonic() - t0
        props = guest.unit("ActiveState", "Result", "ExecMainStatus", "TimeoutStopUSec")
        assert 2 <= took < 15, f"stop took {took:.1f}s"
        assert props["Result"] != "timeout", "systemd's TimeoutStopSec fired first"
        assert props["ExecMainStatus"] == "70"  # errors.RUN_SHUTDOWN_TIMEOUT
        assert props["ActiveState"] in ("inactive", "failed")
        assert agent_processes(guest) == []
        timeouts = journal(guest, "EVENT=supervisor.shutdown.timeout", f"_PID={pid}")
        assert timeouts and "queue" in timeouts[-1]["WORKERS"]


def test_security_exposure_is_at_most_2(guest, capsys):
    out = guest.run(["systemd-analyze", "security", "agent.service", "--no-pager"]).stdout
    found = re.search(r"Overall exposure level for agent\.service: (\d+\.\d+)", out)
    assert found, out[-500:]
    exposure = float(found.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security agent.service: exposure {exposure}")
    assert exposure <= 2.0


# ---- upgrade, remove, purge


def test_reinstall_restarts_and_keeps_state(guest):
    old = wait_active(guest)
    guest.run(["install", "-o", "agent", "-g", "agent", "/dev/null", "/var/lib/agent/e2e-mark"])
    guest.run(["install", "-D", "-o", "agent", "-m", "600", "/dev/null", SESSION_FILE])
    guest.run(["dpkg", "-i", guest.install_path], timeout=180)
    new = wait_active(guest, other_than=old)
    assert new != old
    assert guest.path("/var/lib/agent/e2e-mark").exists()
    assert guest.path(SESSION_FILE).exists()  # an agent CLI's session, in the agent's home
    report = json.loads(guest.run(["agentctl", "status", "--json"], check=False).stdout)
    assert report["supervisor"]["previous_run"]["pid"] == old  # state.json survived
    assert guest.unit("UnitFileState")["UnitFileState"] == "enabled"


def test_remove_keeps_state_and_purge_removes_it(guest):
    guest.run(["dpkg", "-r", "agent"], timeout=180)
    assert guest.unit("LoadState")["LoadState"] == "not-found"
    assert agent_processes(guest) == []
    assert guest.path("/var/lib/agent/e2e-mark").exists()
    assert guest.path(SESSION_FILE).exists()
    assert guest.path("/var/lib/agent/state.json").exists()
    assert guest.path(CONFIG).exists()  # a removed package keeps its conffiles
    assert not guest.path("/usr/bin/agentctl").exists()

    guest.run(["dpkg", "--purge", "agent"], timeout=180)
    assert not guest.path("/var/lib/agent").exists()
    assert not guest.path("/etc/agent").exists()
    assert guest.run(["dpkg", "-s", "agent"], check=False).returncode != 0
