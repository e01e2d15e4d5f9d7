"""The supervisor's sd_notify conversation, heard on a real datagram socket."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.integration


class NotifyListener:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def poll(self) -> list[str]:
        try:
            while True:
                data = self.sock.recv(65536).decode()
                self.messages.extend((time.monotonic(), line) for line in data.splitlines())
        except TimeoutError:
            pass
        return [line for _, line in self.messages]

    def silent_for(self, seconds: float, prefix: str) -> bool:
        """No line with prefix arrives for `seconds`. Proving an absence needs a window: the
        watchdog interval is 0.2 s, so a pinging supervisor would send several meanwhile."""
        since = time.monotonic()
        while time.monotonic() - since < seconds:
            if self.lines_after(since, prefix):
                return False
        return True

    def lines_after(self, moment: float, prefix: str) -> list[str]:
        self.poll()
        return [line for at, line in self.messages if at > moment and line.startswith(prefix)]


def run_supervisor(agent_env, notify_path, **env):
    full_env = agent_env.cmd_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000", **env)
    full_env.pop("AGENT_MANAGER")
    full_env["INVOCATION_ID"] = "0123456789abcdef"  # what systemd sets for a service
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_ready_status_watchdog_and_stopping(agent_env, tmp_path):
    listener = NotifyListener(tmp_path / "notify")
    proc = run_supervisor(agent_env, tmp_path / "notify")
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        statuses = [m for m in listener.poll() if m.startswith("STATUS=")]
        assert statuses[-1] == "STATUS=healthy: queue=running dispatcher=running"
        ready_at = time.monotonic()
        wait_for(
            lambda: len(listener.lines_after(ready_at, "WATCHDOG=1")) >= 3,
            what="three watchdog pings",
        )
        assert agent_env.status()[1]["supervisor"]["manager"] == "systemd"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        lines = listener.poll()
        assert "STOPPING=1" in lines
        assert lines.index("READY=1") < lines.index("STOPPING=1")
    finally:
        proc.kill()
        proc.wait()


def test_watchdog_stops_while_a_worker_is_hung(agent_env, tmp_path):
    listener = NotifyListener(tmp_path / "notify")
    proc = run_supervisor(agent_env, tmp_path / "notify", AGENT_FAULT_INJECT="dispatcher:hang")
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        wait_for(
            lambda: any("dispatcher=hung" in m for m in listener.poll()),
            what="STATUS= naming the hung worker",
        )
        assert any(m.startswith("STATUS=degraded") for m in listener.poll())
        assert listener.silent_for(1.5, "WATCHDOG=1")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_watchdog_pid_of_another_process_is_not_ours(agent_env, tmp_path):
    listener = NotifyListener(tmp_path / "notify")
    proc = run_supervisor(agent_env, tmp_path / "notify", WATCHDOG_PID=str(os.getpid()))
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        assert listener.silent_for(1.0, "WATCHDOG=1")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_kill_all_kills_whole_child_process_groups(tmp_path):
    from agent.children import ChildProcesses

    children = ChildProcesses()
    proc = children.spawn(["sh", "-c", "sleep 300 & sleep 300"])
    grandchild_group = proc.pid
    assert os.getpgid(proc.pid) == proc.pid  # its own group
    assert children.kill_all() == [grandchild_group]
    proc.wait(5)
    wait_for(lambda: not _group_alive(grandchild_group), what="the whole group to die")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_pgid_of(pid) == pgid for pid in _pids() if _state(pid) != "Z")


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _last_status(listener: NotifyListener) -> str:
    statuses = [m for m in listener.poll() if m.startswith("STATUS=")]
    return statuses[-1] if statuses else ""


@pytest.mark.parametrize("cause", ["none", "queue:crash", "dispatcher:hang", "lock_lost"])
def test_status_line_and_agentctl_status_never_disagree_on_health(agent_env, tmp_path, cause):
    listener = NotifyListener(tmp_path / "notify")
    fault = {"AGENT_FAULT_INJECT": cause} if ":" in cause else {}
    proc = run_supervisor(agent_env, tmp_path / "notify", **fault)
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        if cause == "lock_lost":
            (agent_env.state_dir / "agent.lock").unlink()
        expected = "healthy" if cause == "none" else "degraded"
        wait_for(
            lambda: _last_status(listener).startswith(f"STATUS={expected}: "),
            what=f"STATUS={expected}",
        )
        code, report = agent_env.status()
        assert report["supervisor"]["health"] == expected, report["supervisor"]
        assert code == (0 if expected == "healthy" else 2)
        if cause == "lock_lost":
            assert "no longer names" in _last_status(listener)
            assert "no longer names" in report["supervisor"]["last_error"]
    finally:
        proc.kill()
        proc.wait()
