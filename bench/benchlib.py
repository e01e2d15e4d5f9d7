"""What the queue benches share: a throw-away agent with its own state_dir, started and
stopped through agentctl, and a wait with a deadline."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.queue import Queue  # noqa: E402


@dataclass(frozen=True)
class BenchAgent:
    root: Path
    env: dict[str, str]
    queue: Queue
    pid: int


def agentctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True, check=False
    )


@contextlib.contextmanager
def running_agent(
    prefix: str, config: str, env: dict[str, str] | None = None
) -> Iterator[BenchAgent]:
    """A supervisor on `config` (TOML after state_dir) in a fresh directory under /var/tmp
    (a disk, not a tmpfs), stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"agent-bench-{prefix}-", dir="/var/tmp"))
    state = root / "state"
    (root / "agent.toml").write_text(f'state_dir = "{state}"\n{config}')
    full_env = {
        **os.environ,
        "AGENT_CONFIG": str(root / "agent.toml"),
        "AGENT_MANAGER": "standalone",
        **(env or {}),
    }
    for name in ("AGENT_FAULT_INJECT", "NOTIFY_SOCKET"):
        full_env.pop(name, None)
    queue = Queue(state / "queue")
    queue.ensure_dirs()
    done = agentctl(full_env, "start")
    if done.returncode != 0:
        raise SystemExit(f"bench: start failed: {done.stderr}")
    pid = int(done.stdout.strip().rsplit("pid ", 1)[1].rstrip(")"))
    try:
        yield BenchAgent(root, full_env, queue, pid)
    finally:
        agentctl(full_env, "stop")
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(interval)
