"""What an agent run gets (home, workdir, a clean environment), and the health rule that
makes the dispatcher degraded when an agent's runs keep failing. Real supervisors, real
processes; the rule itself also in-process."""

import json
import os
import signal

import pytest

from agent.agenthealth import FAILURE_STREAK, STALL_SECONDS, AgentRunHealth, AgentsHealth
from tests.helpers import pid_alive, pids_with_cmdline, wait_for
from tests.test_dispatcher import FAST_RETRY, enqueue, failed_reason, reply, script

pytestmark = pytest.mark.integration

SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID")


# ---- the rule, in-process


def test_five_failed_runs_in_a_row_make_an_agent_failing_and_one_success_clears_it():
    health = AgentRunHealth()
    for n in range(FAILURE_STREAK - 1):
        health.failed(f"exit status {n}", now=n)
    assert health.problem(now=10) is None
    health.failed("exit status 127: setpriv: activate capabilities", now=11)
    assert health.problem(now=12) == (
        f"{FAILURE_STREAK} runs failed in a row: exit status 127: setpriv: activate capabilities"
    )
    health.succeeded()
    assert health.problem(now=13) is None


def test_slow_failures_count_once_no_run_succeeded_for_the_window():
    health = AgentRunHealth()
    health.failed("timed out after 300s", now=100.0)
    assert health.problem(now=100.0 + STALL_SECONDS - 1) is None
    assert health.problem(now=100.0 + STALL_SECONDS).startswith("no successful run for 15 min")


def test_the_dispatcher_reason_names_each_failing_agent():
    agents = AgentsHealth()
    for _ in range(FAILURE_STREAK):
        agents.record("b", False, "exit status 2", now=1)
        agents.record("a", True, None, now=1)
    assert (
        agents.degraded(now=2) == f"agent b: {FAILURE_STREAK} runs failed in a row: exit status 2"
    )


# ---- through a running supervisor


def test_status_is_degraded_after_consecutive_failures_and_healthy_after_a_success(
    agent_env, tmp_path
):
    works = tmp_path / "works"
    command = script(
        tmp_path, "flaky.sh", f'[ -e {works} ] || {{ echo "no model" >&2; exit 3; }}\ncat\n'
    )
    agent_env.write_config(
        **{"agents.default": {"command": command}, "dispatcher": {"max_attempts": 1}}
    )
    agent_env.start()
    for n in range(FAILURE_STREAK):
        enqueue(agent_env, "x", f"f{n}", conversationId=f"c{n}")
    wait_for(lambda: len(agent_env.events("message.failed")) == FAILURE_STREAK, what="5 failures")
    code, report = wait_for(lambda: _degraded(agent_env), what="status degraded")
    assert code == 2 and report["supervisor"]["health"] == "degraded"
    detail = next(w for w in report["workers"] if w["name"] == "dispatcher")["detail"]
    assert detail["degraded"] == (
        f"agent default: {FAILURE_STREAK} runs failed in a row: exit status 3: no model"
    )
    assert failed_reason(agent_env, "local_f0.json").endswith("exit status 3: no model")
    [failing] = agent_env.events("agent.failing")
    assert failing["agent"] == "default"

    works.touch()
    enqueue(agent_env, "back", "ok1")
    assert wait_for(lambda: reply(agent_env, "ok1"), what="ok1's reply")["message"] == "back"
    code, report = wait_for(lambda: _healthy(agent_env), what="status healthy again")
    assert report["supervisor"]["health"] == "healthy"
    assert wait_for(lambda: agent_env.events("agent.recovered"), what="agent.recovered")


def _degraded(env):
    code, report = env.status()
    return (code, report) if report["supervisor"]["health"] == "degraded" else None


def _healthy(env):
    code, report = env.status()
    return (code, report) if code == 0 else None


def test_an_agent_runs_in_its_own_home_with_a_clean_environment(agent_env, tmp_path):
    command = script(tmp_path, "env.sh", 'cat >/dev/null; echo "cwd=$(pwd)"; env\n')
    agent_env.write_config(
        **{"agents.probe": {"command": command}, "agents.probe.env": {"MODEL_URL": "http://x"}}
    )
    secrets = tmp_path / "creds"
    secrets.mkdir()
    agent_env.start(
        CREDENTIALS_DIRECTORY=str(secrets), SLACK_BOT_TOKEN="xoxb-secret", LANG="C.UTF-8"
    )
    enqueue(agent_env, "who am i", "e1", conversationId="conv")
    text = wait_for(lambda: reply(agent_env, "e1"), what="e1's reply")["message"]
    lines = text.splitlines()
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    home = agent_env.state_dir / "home" / "probe"
    assert lines[0] == f"cwd={home}"
    assert env["HOME"] == str(home)
    assert (home.stat().st_mode & 0o777) == 0o700
    assert env["MODEL_URL"] == "http://x"
    assert env["AGENT_NAME"] == "probe" and env["AGENT_CONVERSATION_ID"] == "conv"
    assert env["LANG"] == "C.UTF-8" and env["PATH"]
    for name in ("CREDENTIALS_DIRECTORY", "SLACK_BOT_TOKEN", "AGENT_CONFIG", *SUPERVISOR_ONLY):
        assert name not in env, f"{name} leaked into the agent's environment"
    allowed = {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_", "MODEL_URL"}
    assert {k for k in env if not k.startswith("AGENT_")} <= allowed | {
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "USER",
        "LOGNAME",
        "TMPDIR",
    }


def test_a_command_that_cannot_start_is_a_config_error_before_ready(agent_env):
    for command, expected in (
        (["no-such-agent-cli", "-p"], "'no-such-agent-cli' not found on PATH"),
        (["/nonexistent/claude"], "/nonexistent/claude is not an executable file"),
        ([""], "the program name (first element) is empty"),
    ):
        agent_env.write_config(**{"agents.default": {"command": command}})
        done = agent_env.agentctl("start")
        assert done.returncode == 78, done.stdout + done.stderr
        assert "[agents.default] command" in done.stderr and expected in done.stderr
        assert "Traceback" not in done.stderr
    code, _ = agent_env.status()
    assert code == 3  # nothing runs


def test_a_missing_workdir_is_a_config_error(agent_env, tmp_path):
    missing = tmp_path / "gone"
    agent_env.write_config(**{"agents.default": {"command": ["cat"], "workdir": str(missing)}})
    done = agent_env.agentctl("start")
    assert done.returncode == 78 and f"workdir: {missing} is not a directory" in done.stderr


@pytest.mark.parametrize("bad", [{"A=B": "x"}, {"X": 1}, {"X": "a\0b"}, {"": "x"}])
def test_agent_env_must_be_a_table_of_strings(agent_env, bad):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    text = agent_env.config_path.read_text() + "[agents.default.env]\n"
    text += "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in bad.items())
    agent_env.config_path.write_text(text)
    done = agent_env.agentctl("start")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "[agents.default] env: expected a table of environment variable" in done.stderr


def test_hup_reloads_and_usr1_usr2_alrm_pipe_are_logged_and_never_kill_the_supervisor(
    agent_env, tmp_path
):
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}, "dispatcher": FAST_RETRY})
    pid = agent_env.start()
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE):
        os.kill(pid, sig)
    names = {"SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM"}
    wait_for(
        lambda: names <= {r["signal"] for r in agent_env.events("supervisor.signal")},
        what="a supervisor.signal event for each",
    )
    assert pid_alive(pid)
    enqueue(agent_env, "still here", "s1")
    assert wait_for(lambda: reply(agent_env, "s1"), what="a reply after the signals")
    code, report = agent_env.status()
    assert code == 0 and report["supervisor"]["pid"] == pid
    actions = {r["signal"]: r["action"] for r in agent_env.events("supervisor.signal")}
    assert actions == {"SIGHUP": "reload", **dict.fromkeys(names - {"SIGHUP"}, "ignored")}


# ---- runaway agents


def _vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_agent_printing_without_end_is_killed_at_max_output_bytes(agent_env):
    agent_env.write_config(
        **{
            "agents.default": {"command": ["yes", "runaway-6004"], "max_output_bytes": 1 << 20},
            "dispatcher": {"max_attempts": 1},
        }
    )
    pid = agent_env.start()
    before = _vm_hwm_kib(pid)
    enqueue(agent_env, "x", "y1")
    wait_for(lambda: agent_env.events("message.failed"), what="the runaway run failed")
    reason = failed_reason(agent_env, "local_y1.json")
    assert reason.endswith("output exceeded max_output_bytes (1048576)"), reason
    assert _vm_hwm_kib(pid) - before < 16 * 1024, "the supervisor's peak RSS grew by > 16 MB"
    assert not pids_with_cmdline("runaway-6004")


def test_a_run_ends_when_the_agent_exits_though_a_helper_holds_its_stdout(agent_env, tmp_path):
    command = script(tmp_path, "agent.sh", "cat >/dev/null; sleep 6001 & echo done\n")
    agent_env.write_config(**{"agents.default": {"command": command, "timeout": 120}})
    agent_env.start()
    enqueue(agent_env, "x", "g1")
    assert wait_for(lambda: reply(agent_env, "g1"), timeout=20, what="g1")["message"] == "done"
    [done] = agent_env.events("message.done")
    assert done["duration_ms"] < 20_000  # not the 120 s time limit
    # killed with the run's group; SIGKILL lands when the kernel next schedules it
    wait_for(lambda: not pids_with_cmdline("sleep 6001"), timeout=5, what="the helper gone")


def test_helpers_that_left_the_process_group_die_with_the_run(agent_env, tmp_path):
    body = (
        "cat >/dev/null\n"
        "setsid sleep 6002 </dev/null >/dev/null 2>&1 &\n"  # its own session, no pipes
        "setsid sh -c 'exec sleep 6003' &\n"  # its own session, holding stdout
        "echo started\n"
    )
    command = script(tmp_path, "agent.sh", body)
    agent_env.write_config(**{"agents.default": {"command": command}})
    agent_env.start()
    enqueue(agent_env, "x", "d1")
    assert wait_for(lambda: reply(agent_env, "d1"), what="d1")["message"] == "started"
    wait_for(
        lambda: not pids_with_cmdline("sleep 6002") and not pids_with_cmdline("sleep 6003"),
        what="the setsid helpers gone with their run",
    )
