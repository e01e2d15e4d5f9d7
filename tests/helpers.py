"""Shared test tools: wait for a condition with a deadline, drive real agentctl processes."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

NO_SKIP_VAR = "AGENT_TESTS_NO_SKIP"  # set by .ci/run: a skip there is a failure


def skip_or_fail(reason: str) -> None:
    """Skip locally with a clear reason; under CI ($AGENT_TESTS_NO_SKIP=1) fail instead."""
    if os.environ.get(NO_SKIP_VAR) == "1":
        pytest.fail(f"{reason} (and {NO_SKIP_VAR}=1 turns this skip into a failure)")
    pytest.skip(reason)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll until predicate() is truthy; return its value, or fail naming what never came."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@dataclass
class AgentEnv:
    """An isolated agent: its own state_dir and config file, driven by real agentctl runs."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    started: list[int] = field(default_factory=list)  # supervisor pids, for the teardown
    # sections every write_config adds under the test's own (the queue_backend fixture's
    # [queue] backend = "postgres"); a test's sections override them key by key
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    def write_config(self, no_agent: bool = False, **sections: dict[str, Any]) -> None:
        """The test config: fast supervisor settings, the given sections, and (unless the
        sections name agents, or no_agent) a `cat` agent, so that a healthy supervisor
        is a configured one."""
        self.config = {
            "supervisor": {
                "stop_timeout": 3,
                "hang_timeout": 2,
                "restart_backoff": 0.1,
                "restart_limit": 3,
            }
        }
        if not no_agent and not any(name.startswith("agents.") for name in sections):
            self.config["agents.default"] = {"command": ["cat"]}
        for name, values in [*self.defaults.items(), *sections.items()]:
            self.config.setdefault(name, {}).update(values)
        self.config_path.write_text(_toml(self.state_dir, self.config))

    def cmd_env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "AGENT_FAULT_INJECT")
        }
        env.update(AGENT_CONFIG=str(self.config_path), AGENT_MANAGER="standalone")
        env.update(self.env)
        env.update(extra)
        return env

    def agentctl(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cmd_env(**env),
            check=False,
        )

    def start(self, **env: str) -> int:
        done = self.agentctl("start", **env)
        assert done.returncode == 0, f"start failed: {done.stdout}{done.stderr}"
        pid = int(done.stdout.strip().rsplit("pid ", 1)[1].rstrip(")"))
        self.started.append(pid)
        return pid

    def kill_leftovers(self) -> list[int]:
        """SIGKILL the supervisors this env started that still run (a test that moved its
        config's state_dir leaves `agentctl stop` looking elsewhere); their pids."""
        import signal

        left = [pid for pid in self.started if pid_alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(pid) for pid in left), what="leftovers gone")
        return left

    def stop(self) -> subprocess.CompletedProcess:
        return self.agentctl("stop")

    def status(self) -> tuple[int, dict[str, Any]]:
        done = self.agentctl("status", "--json")
        return done.returncode, json.loads(done.stdout)

    def worker(self, name: str) -> dict[str, Any]:
        _, report = self.status()
        return next(w for w in report["workers"] if w["name"] == name)

    def log_records(self) -> list[dict[str, Any]]:
        path = self.state_dir / "logs" / "agent.jsonl"
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        from agent.events import EVENTS

        unknown = {r.get("event") for r in records} - set(EVENTS) - {None}
        assert not unknown, f"events logged but not registered in agent/events.py: {unknown}"
        return records

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == name]


def pg_sections(dsn: str, host: str, lease: float = 2.0) -> dict[str, dict[str, Any]]:
    """The config sections of a host on the shared PostgreSQL queue at dsn."""
    return {
        "queue": {"backend": "postgres"},
        "queue.postgres": {
            "dsn": dsn,
            "host_id": host,
            "lease": lease,
            "connect_timeout": 1,
            "statement_timeout": 2,
        },
    }


def _toml(state_dir: Path, config: dict[str, Any]) -> str:
    lines = [f'state_dir = "{state_dir}"']
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed child not reaped yet) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pids_with_cmdline(marker: str) -> list[int]:
    """Live processes whose command line contains marker (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if pid_alive(pid)]
