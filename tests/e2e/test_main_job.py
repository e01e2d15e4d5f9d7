"""The product's main job through the installed unit: a message in, the agent's reply out.

In the booted guest with the .deb installed, the real Claude Code CLI (from npm, bound
read-only at /opt/agent-clis) answers through a loopback stand-in for the model API
(fake_model.py, run by the guest's python3), next to a plain `cat` agent: when both fail
the unit is at fault, when only claude fails the CLI is. Runs before test_systemd.py (file
order) and leaves the packaged config and a clean running service behind.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.agenthealth import FAILURE_STREAK
from tests.e2e.guest import CLAUDE_IN_GUEST, CODEX_IN_GUEST, Guest, GuestError
from tests.e2e.test_systemd import CONFIG, DROPIN, main_pid, restart_clean, wait_active
from tests.helpers import skip_or_fail, wait_for

pytestmark = pytest.mark.e2e

PORT = 8765
MODEL_LOG = "/root/fake-model.log"
HOMES = "/var/lib/agent/home"
UNREACHABLE = "model unreachable: connection refused"
MODEL_ENV = f"""ANTHROPIC_BASE_URL = "http://127.0.0.1:{PORT}"
ANTHROPIC_API_KEY = "sk-ant-e2e-fake-key"
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1"
"""
AGENTS = f"""
[dispatcher]
max_attempts = 1

[agents.default]
command = ["{CLAUDE_IN_GUEST}", "-p"]
timeout = 60
[agents.default.env]
{MODEL_ENV}
# the same CLI through its adapter: JSON output, a session per conversation (--resume)
[agents.claude]
kind = "claude"
command = ["{CLAUDE_IN_GUEST}", "-p"]
timeout = 60
[agents.claude.env]
{MODEL_ENV}
[agents.cat]
command = ["cat"]

[agents.printenv]
command = ["env"]

[agents.flaky]
command = ["sh", "-c", "[ -e $HOME/ok ] || {{ echo '{UNREACHABLE}' >&2; exit 7; }}; cat"]

[agents.slow]
command = ["sh", "-c", "[ -e $HOME/fast ] || sleep $(cat $HOME/seconds 2>/dev/null || echo 8); cat"]
timeout = 120
"""


# ---- helpers


def send(
    guest: Guest, agent: str, text: str, timeout: float = 90, conversation: str | None = None
) -> tuple[int, str, str]:
    also = ["--conversation", conversation] if conversation else []
    done = guest.run(
        ["agentctl", "send", "--wait", "--timeout", str(timeout), "--agent", agent, *also, text],
        check=False,
        timeout=timeout + 30,
    )
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def send_nowait(guest: Guest, agent: str, text: str) -> None:
    guest.run(["agentctl", "send", "--agent", agent, text])


def model_requests(guest: Guest) -> list[dict]:
    path = guest.path(MODEL_LOG)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def as_agent(guest: Guest, script: str) -> str:
    return guest.run(
        ["setpriv", "--reuid=agent", "--regid=agent", "--clear-groups", "sh", "-c", script]
    ).stdout


def status_text(guest: Guest) -> str:
    return guest.unit("StatusText")["StatusText"]


def run_processes(guest: Guest, needle: str) -> list[str]:
    done = guest.run(["pgrep", "-a", "-u", "agent", "-f", needle], check=False)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


@contextmanager
def dropin(guest: Guest, text: str) -> Iterator[None]:
    """The service restarted with a unit drop-in; without it (restarted again) after."""
    guest.write(DROPIN, "[Service]\n" + text)
    guest.run(["systemctl", "daemon-reload"])
    try:
        restart_clean(guest)
        yield
    finally:
        guest.path(DROPIN).unlink()
        guest.run(["systemctl", "daemon-reload"])
        restart_clean(guest)


@pytest.fixture(scope="module")
def agents(guest: Guest) -> Iterator[Guest]:
    """The packaged config plus the test agents, and the fake model API running."""
    here = Path(__file__).with_name("fake_model.py")
    guest.write("/root/fake_model.py", here.read_text())
    guest.run(
        [
            "systemd-run",
            "--unit=fake-model",
            "--property=Restart=no",
            "/usr/bin/python3",
            "/root/fake_model.py",
            "--port",
            str(PORT),
            "--log",
            MODEL_LOG,
        ]
    )
    wait_for(
        lambda: (
            guest.run(
                [
                    "python3",
                    "-c",
                    f"import socket; socket.create_connection(('127.0.0.1', {PORT}))",
                ],
                check=False,
            ).returncode
            == 0
        ),
        timeout=20,
        what="the fake model API",
    )
    original = guest.path(CONFIG).read_text()
    guest.write(CONFIG, AGENTS)
    try:
        restart_clean(guest)
    except GuestError as exc:
        journal = guest.run(["journalctl", "-u", "agent", "-n", "20", "--no-pager"]).stdout
        raise GuestError(f"{exc}\njournal:\n{journal}") from None
    try:
        yield guest
    finally:
        guest.write(CONFIG, original)  # byte for byte: the conffile counts as unmodified
        guest.run(["systemctl", "stop", "fake-model"], check=False)
        restart_clean(guest)


# ---- the main job


def test_the_real_claude_cli_answers_through_the_installed_unit(agents):
    code, out, err = send(agents, "default", "hello from the e2e suite")
    assert code == 0, f"claude: exit {code}: {err}"
    assert out == "model reply #1 to 'hello from the e2e suite' (2 messages)", out
    assert model_requests(agents)[-1] == {"messages": 2, "prompt": "hello from the e2e suite"}
    # the same unit, a plain command: tells a CLI problem from a unit problem
    assert send(agents, "cat", "plain text through the unit") == (
        0,
        "plain text through the unit",
        "",
    )


def test_the_agent_keeps_its_files_in_its_own_home(agents):
    listing = agents.sh(f"cd {HOMES} && find . -maxdepth 4 | sort")
    assert "./default/.claude/projects" in listing, listing
    sessions = agents.sh(f"ls {HOMES}/default/.claude/projects/-var-lib-agent-home-default/")
    assert [n for n in sessions.split() if n.endswith(".jsonl")], sessions
    owner = agents.run(["stat", "-c", "%U %a", f"{HOMES}/default", HOMES]).stdout.split()
    assert owner == ["agent", "700", "agent", "700"], owner
    top = set(agents.sh("ls -A /var/lib/agent").split())
    assert not {".claude", ".claude.json", ".codex"} & top, top  # nothing beside the queue


def test_the_agent_gets_a_clean_environment_under_the_unit(agents):
    code, out, err = send(agents, "printenv", "-")
    assert code == 0, err
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["HOME"] == f"{HOMES}/printenv" and env["AGENT_NAME"] == "printenv"
    leaked = {
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "INVOCATION_ID",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "SYSTEMD_EXEC_PID",
    } & set(env)
    assert not leaked, f"the supervisor's variables reached the agent: {leaked}"


def test_a_conversation_resumes_its_claude_session_across_a_restart(agents):
    code, out, err = send(agents, "claude", "first turn", conversation="thread-9")
    assert code == 0 and out.endswith("to 'first turn' (2 messages)"), err
    listed = agents.run(["agentctl", "sessions", "--json"]).stdout.splitlines()
    [session] = [json.loads(line) for line in listed]
    assert (session["agent"], session["conversation"]) == ("claude", "thread-9")
    old = main_pid(agents)
    agents.run(["systemctl", "restart", "agent"])
    assert wait_active(agents, other_than=old) != old
    code, out, err = send(agents, "claude", "and the second turn", conversation="thread-9")
    assert code == 0, err
    # the resumed turn carried the first exchange along: 4 messages, not 2
    assert out.endswith("to 'and the second turn' (4 messages)"), out
    assert model_requests(agents)[-1] == {"messages": 4, "prompt": "and the second turn"}
    code, out, _ = send(agents, "claude", "another thread", conversation="thread-10")
    assert out.endswith("(2 messages)")  # a new conversation, a new session


def test_a_failing_agent_says_why_and_status_tells_until_it_answers_again(agents):
    code, _, err = send(agents, "default", "FAIL-WITH-400 please")
    assert code == 1
    assert "exit status 1: API Error: 400 fake model refuses this prompt" in err, err
    for n in range(FAILURE_STREAK):
        code, _, err = send(agents, "flaky", f"attempt {n}")
        assert code == 1 and "exit status 7: model unreachable: connection refused" in err, err
    wait_for(lambda: status_text(agents).startswith("degraded"), what="STATUS= degraded")
    assert (
        f"agent flaky: {FAILURE_STREAK} runs failed in a row: exit status 7: "
        "model unreachable: connection refused" in status_text(agents)
    )
    done = agents.run(["agentctl", "status", "--json"], check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 2 and report["supervisor"]["health"] == "degraded"
    failing = agents.run(["journalctl", "-u", "agent", "-o", "json", "EVENT=agent.failing"])
    assert json.loads(failing.stdout.splitlines()[-1])["AGENT"] == "flaky"

    as_agent(agents, f"touch {HOMES}/flaky/ok")
    assert send(agents, "flaky", "now it works")[:2] == (0, "now it works")
    wait_for(lambda: status_text(agents).startswith("healthy"), what="STATUS= healthy again")
    assert agents.run(["agentctl", "status"], check=False).returncode == 0


# ---- the service's own paths, with runs in flight


def test_the_watchdog_is_fed_while_a_run_lasts_longer_than_it(agents):
    with dropin(agents, "WatchdogSec=3\n"):
        pid = main_pid(agents)
        restarts = agents.unit("NRestarts")["NRestarts"]
        code, out, err = send(agents, "slow", "outlasting the watchdog")  # sleeps 8 s
        assert (code, out) == (0, "outlasting the watchdog"), err
        assert main_pid(agents) == pid
        assert agents.unit("NRestarts", "Result") == {"NRestarts": restarts, "Result": "success"}


def test_hup_usr1_usr2_with_a_run_in_flight_never_disturb_the_run(agents):
    # (SIGHUP reloads an unchanged config: nothing to do)
    pid = main_pid(agents)
    send_nowait(agents, "slow", "through a SIGHUP")
    wait_for(lambda: run_processes(agents, "sleep"), what="the slow run in flight")
    for sig in ("HUP", "USR1", "USR2"):
        agents.run(["systemctl", "kill", "--kill-whom=main", f"--signal=SIG{sig}", "agent"])
    assert send(agents, "cat", "after the signals")[:2] == (0, "after the signals")
    assert main_pid(agents) == pid
    events = agents.run(
        ["journalctl", "-u", "agent", "-o", "json", "EVENT=supervisor.signal", f"_PID={pid}"]
    ).stdout.splitlines()
    assert {json.loads(e)["SIGNAL"] for e in events} >= {"SIGHUP", "SIGUSR1", "SIGUSR2"}
    wait_for(lambda: not run_processes(agents, "sleep"), timeout=30, what="the slow run done")


def test_stop_with_a_run_in_flight_is_quick_clean_and_loses_nothing(agents):
    as_agent(agents, f"rm -f {HOMES}/slow/fast; echo 600 > {HOMES}/slow/seconds")
    try:
        send_nowait(agents, "slow", "interrupted by a stop")
        wait_for(lambda: run_processes(agents, "sleep 600"), what="the long run in flight")
        t0 = time.monotonic()
        agents.run(["systemctl", "stop", "agent"])
        took = time.monotonic() - t0
        props = agents.unit("ActiveState", "Result")
        assert props == {"ActiveState": "inactive", "Result": "success"}, props
        assert took < 10, f"stop took {took:.1f}s"
        assert agents.run(["pgrep", "-u", "agent"], check=False).stdout == ""
        claimed = agents.sh("ls /var/lib/agent/queue/processing").split()
        assert len(claimed) == 1, claimed  # kept for the next start, not failed
        as_agent(agents, f"touch {HOMES}/slow/fast")
        agents.run(["systemctl", "start", "agent"])
        replies = wait_for(
            lambda: agents.sh(
                "grep -l 'interrupted by a stop' /var/lib/agent/queue/outgoing/*", check=False
            ).split(),
            timeout=30,
            what="the interrupted message answered after the restart",
        )
        assert len(replies) == 1
    finally:
        as_agent(agents, f"rm -f {HOMES}/slow/fast {HOMES}/slow/seconds")
        restart_clean(agents)


# ---- W+X memory: which real CLIs work under MemoryDenyWriteExecute=yes


def _run_as_agent(
    guest: Guest, *argv: str, stdin: str = "", timeout: int = 20, mdwe: bool = True
) -> tuple[int, str]:
    """Run argv as a transient service of the agent user, with or without W^X memory."""
    done = guest.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            f"--property=MemoryDenyWriteExecute={'yes' if mdwe else 'no'}",
            "--property=User=agent",
            f"--property=RuntimeMaxSec={timeout}",
            f"--setenv=HOME={HOMES}/default",
            f"--working-directory={HOMES}/default",
            *argv,
        ],
        check=False,
        input=stdin,
        timeout=timeout + 30,
    )
    return done.returncode, done.stdout + done.stderr


def test_which_agent_clis_need_write_execute_memory(agents, capsys):
    shipped = agents.unit("MemoryDenyWriteExecute")["MemoryDenyWriteExecute"]
    assert shipped == "yes"  # and the real claude answered through the unit above
    code, out = _run_as_agent(
        agents,
        f"--setenv=ANTHROPIC_BASE_URL=http://127.0.0.1:{PORT}",
        "--setenv=ANTHROPIC_API_KEY=x",
        "--setenv=CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
        CLAUDE_IN_GUEST,
        "-p",
        stdin="under W^X",
    )
    assert code == 0 and "to 'under W^X'" in out, out
    # codex cannot reach a model here: alive means it got as far as its first JSON event
    codex = [CODEX_IN_GUEST, "exec", "--json", "--skip-git-repo-check", "-"]
    _, out = _run_as_agent(agents, *codex, stdin="hi", timeout=8)
    assert '"type":"thread.started"' in out.replace(" ", ""), out
    # a plain node agent needs W+X memory: it fails under the shipped unit, and works with
    # the drop-in docs/packaging.md gives (MemoryDenyWriteExecute=no)
    if not agents.path("/usr/local/bin/node").exists():
        skip_or_fail("the host has no /usr/bin/node to bind into the guest")
    script = ["/usr/local/bin/node", "-e", "console.log([1, 2].map((x) => x * 21).join())"]
    code, out = _run_as_agent(agents, *script)
    said = [line.strip("# ") for line in out.splitlines() if line.strip("# ")]
    first = (said or [""])[0][:120]
    with capsys.disabled():
        print(f"\nMemoryDenyWriteExecute=yes: claude works, codex works, node exit {code}: {first}")
    assert code != 0 and "21,42" not in out
    assert _run_as_agent(agents, *script, mdwe=False) == (0, "21,42\n")


# ---- a workdir outside state_dir, and a command that cannot start


def test_a_workdir_elsewhere_needs_the_documented_read_write_drop_in(agents):
    agents.run(["install", "-d", "-o", "agent", "-g", "agent", "/srv/work"])
    config = AGENTS + '\n[agents.builder]\ncommand = ["sh", "-c", "cat > made.txt && pwd"]\n'
    config += 'workdir = "/srv/work"\n'
    agents.write(CONFIG, config)
    try:
        restart_clean(agents)
        code, _, err = send(agents, "builder", "x")
        assert code == 1 and "Read-only file system" in err, err  # ProtectSystem=strict
        with dropin(agents, "ReadWritePaths=/srv/work\n"):  # as docs/packaging.md says
            assert send(agents, "builder", "built") == (0, "/srv/work", "")
            assert agents.path("/srv/work/made.txt").read_text() == "built"
    finally:
        agents.write(CONFIG, AGENTS)
        restart_clean(agents)


def test_a_command_that_cannot_start_fails_the_start_before_ready_with_the_reason(agents):
    agents.write(CONFIG, AGENTS + '\n[agents.typo]\ncommand = ["/usr/local/bin/claud", "-p"]\n')
    try:
        agents.run(["systemctl", "reset-failed", "agent"], check=False)
        done = agents.run(["systemctl", "restart", "agent"], check=False)
        assert done.returncode != 0  # Type=notify: READY=1 never came
        props = agents.unit("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert (props["ActiveState"], props["ExecMainStatus"]) == ("failed", "78"), props
        assert props["NRestarts"] == "0"  # RestartPreventExitStatus=78: no restart loop
        said = agents.run(["journalctl", "-u", "agent", "-n", "20", "--no-pager"]).stdout
        assert "[agents.typo] command: /usr/local/bin/claud is not an executable file" in said, said
        assert "Traceback" not in said
    finally:
        agents.write(CONFIG, AGENTS)
        restart_clean(agents)


# ---- live reload through systemd


def test_systemctl_reload_applies_a_valid_config_and_refuses_an_invalid_one(agents):
    pid = main_pid(agents)
    send_nowait(agents, "slow", "in flight across the reload")
    wait_for(lambda: run_processes(agents, "sleep"), what="a run in flight")
    agents.write(CONFIG, AGENTS + '\n[agents.fresh]\ncommand = ["sh", "-c", "echo fresh"]\n')
    done = agents.run(["systemctl", "reload", "agent"], check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert send(agents, "fresh", "x") == (0, "fresh", "")  # the new agent answers at once
    agents.write(CONFIG, AGENTS + "\n[dispatcher]\nconcurrency = 0\n")  # not TOML: a 2nd table
    refused = agents.run(["systemctl", "reload", "agent"], check=False, timeout=60)
    assert refused.returncode != 0
    mine = agents.run(["agentctl", "reload"], check=False, timeout=60)
    assert mine.returncode == 78 and "invalid TOML" in mine.stderr, mine.stderr
    # (agentctl send itself needs a valid file: put the applied one back, without a reload)
    agents.write(CONFIG, AGENTS + '\n[agents.fresh]\ncommand = ["sh", "-c", "echo fresh"]\n')
    assert send(agents, "fresh", "the applied config still runs")[:2] == (0, "fresh")
    assert main_pid(agents) == pid
    failed = agents.run(
        ["journalctl", "-u", "agent", "-o", "json", "EVENT=supervisor.reload.failed"]
    )
    assert failed.stdout.strip(), "no supervisor.reload.failed event in the journal"
    agents.write(CONFIG, AGENTS)
    assert agents.run(["agentctl", "reload"], check=False, timeout=60).returncode == 0
    wait_for(lambda: not run_processes(agents, "sleep"), timeout=30, what="the slow run done")
    replies = agents.sh("grep -l 'in flight across the reload' /var/lib/agent/queue/outgoing/*")
    assert len(replies.split()) == 1  # finished under the old settings, answered once


def test_doctor_on_the_installed_service_finds_nothing_wrong(agents):
    done = agents.run(["agentctl", "doctor", "--json", "--offline"], check=False)
    found = {f["check"]: f for f in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 0, [f for f in found.values() if f["level"] != "ok"]
    assert found["systemd unit"] == {
        "check": "systemd unit",
        "level": "ok",
        "message": "agent.service enabled, active",
        "hint": None,
    }
    assert (
        found["agent claude"]["level"] == "ok"
        and CLAUDE_IN_GUEST in found["agent claude"]["message"]
    )
    assert found["state_dir"]["level"] == "ok" and found["log sink"]["level"] == "ok"
    agents.write("/usr/local/bin/private-cli", "#!/bin/sh\ncat\n", mode=0o700)  # root's only
    agents.write(CONFIG, AGENTS + '\n[agents.private]\ncommand = ["/usr/local/bin/private-cli"]\n')
    try:
        done = agents.run(["agentctl", "doctor", "--json", "--offline"], check=False)
        found = {f["check"]: f for f in map(json.loads, done.stdout.splitlines())}
        assert done.returncode == 1 and found["agent private"]["level"] == "fail"
        assert "not executable by the service user 'agent'" in found["agent private"]["message"]
    finally:
        agents.write(CONFIG, AGENTS)


# ---- metrics through the packaged service


METRICS_PORT = 9464


def scrape(guest: Guest) -> dict[str, float]:
    """name{labels} -> value, scraped over HTTP inside the guest."""
    text = guest.run(
        [
            "python3",
            "-c",
            f"import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())",
        ]
    ).stdout
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_of_the_packaged_service_count_what_it_did(agents):
    agents.write(CONFIG, AGENTS + f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n')
    try:
        # a reload cannot open the listener (named in the refusal); a restart does
        refused = agents.run(["agentctl", "reload"], check=False, timeout=60)
        assert refused.returncode != 0 and "[metrics] listen" in refused.stderr, refused.stderr
        restart_clean(agents)
        wait_for(
            lambda: agents.run(["agentctl", "status"], check=False).returncode == 0,
            timeout=30,
            what="healthy after the restart",
        )
        for i in range(3):
            assert send(agents, "cat", f"metered {i}")[:2] == (0, f"metered {i}")
        samples = scrape(agents)
        assert samples['agent_messages_done_total{agent="cat"}'] == 3
        assert samples['agent_run_duration_seconds_count{agent="cat"}'] == 3
        assert samples['agent_health{state="healthy"}'] == 1
        assert samples['agent_worker_state{state="running",worker="dispatcher"}'] == 1
        assert samples["agent_watchdog_pings_withheld_total"] == 0
    finally:
        agents.write(CONFIG, AGENTS)
        restart_clean(agents)


def test_the_real_claude_cli_keeps_its_conversation_through_the_shared_queue(agents):
    from tests.e2e.test_postgres import QUEUE, ensure_database, psql

    ensure_database(agents)
    agents.write(CONFIG, AGENTS + QUEUE)
    try:
        restart_clean(agents)
        first = send(agents, "claude", "via the shared queue", conversation="pg-thread")
        assert first[0] == 0 and first[1].endswith("to 'via the shared queue' (2 messages)"), first
        second = send(agents, "claude", "and again", conversation="pg-thread")
        # the session id came back from the database's session map: the CLI resumed
        assert second[0] == 0 and second[1].endswith("to 'and again' (4 messages)"), second
        rows = psql(agents, "SELECT count(*) FROM sessions WHERE conversation LIKE '%pg-thread%'")
        assert rows == "1", rows
    finally:
        agents.write(CONFIG, AGENTS)
        restart_clean(agents)
