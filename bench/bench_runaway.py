#!/usr/bin/env python3
"""Runaway agents and an idle disk: the supervisor's peak RSS while agents print without end,
and what an idle supervisor writes to disk per minute.

- runaway: agents run `yes` (endless output) at the default max_output_bytes (4 MiB), with
  [dispatcher] concurrency runs at once, for --messages messages; printed: the supervisor's
  VmHWM (peak RSS) before and after, and the goal (under 60 MB).
- idle: a supervisor with nothing to do for --idle-seconds; printed: bytes and write calls
  it made (/proc/PID/io: wchar, syscw), per minute. Goal: none when nothing changed.

    python bench/bench_runaway.py [--messages 40] [--idle-seconds 30]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.queue import Queue, new_message  # noqa: E402


def agentctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "agent", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)


def proc_field(pid: int, name: str, source: str = "status") -> int:
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise KeyError(name)


def setup(root: Path, agents: str) -> dict[str, str]:
    (root / "agent.toml").write_text(f'state_dir = "{root}/state"\n{agents}')
    env = {**os.environ, "AGENT_CONFIG": str(root / "agent.toml"), "AGENT_MANAGER": "standalone"}
    env.pop("NOTIFY_SOCKET", None)
    return env


def start(env: dict[str, str]) -> int:
    done = agentctl(env, "start")
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().rsplit("pid ", 1)[1].rstrip(")"))


def runaway(messages: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="agent-bench-runaway-"))
    env = setup(root, '[agents.default]\ncommand = ["yes"]\n[dispatcher]\nmax_attempts = 1\n')
    pid = start(env)
    try:
        before = proc_field(pid, "VmHWM:") / 1024
        queue = Queue(root / "state" / "queue")
        began = time.monotonic()
        for n in range(messages):
            queue.enqueue(new_message("local", "go", "bench", "0", message_id=f"r{n}"))
        failed = queue.failed
        while len(list(failed.glob("*.reason"))) < messages:
            if time.monotonic() - began > 300:
                raise SystemExit("runaway: not every message failed within 300 s")
            time.sleep(0.1)
        took = time.monotonic() - began
        peak = proc_field(pid, "VmHWM:") / 1024
        reason = json.loads(next(failed.glob("*.reason")).read_text())["reason"]
    finally:
        agentctl(env, "stop")
    print(
        f"runaway: {messages} runs of `yes` (4 MiB limit each) in {took:.1f} s; "
        f"supervisor peak RSS {before:.1f} MB before, {peak:.1f} MB after "
        f"(goal < 60 MB: {'met' if peak < 60 else 'MISSED'})"
    )
    print(f"  reason recorded: {reason}")


def idle(seconds: float, runtime_dir: Path | None) -> None:
    """What an idle supervisor writes: state.json replacements, bytes sent to the disk
    (/proc/PID/io write_bytes), and its write calls (the pulse)."""
    root = Path(tempfile.mkdtemp(prefix="agent-bench-idle-", dir="/var/tmp"))
    env = setup(root, '[agents.default]\ncommand = ["cat"]\n')
    where = "state_dir (standalone)"
    if runtime_dir is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime_dir)  # as systemd's RuntimeDirectory=
        where = f"{runtime_dir} (tmpfs, as under systemd)"
    pid = start(env)
    state = root / "state" / "state.json"
    try:
        time.sleep(2)  # past start-up
        inode, io = state.stat().st_ino, _io(pid)
        replaced = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if state.stat().st_ino != inode:
                replaced, inode = replaced + 1, state.stat().st_ino
        after = _io(pid)
    finally:
        agentctl(env, "stop")
    per_minute = 60 / seconds
    disk = (after["write_bytes"] - io["write_bytes"]) * per_minute
    calls = (after["syscw"] - io["syscw"]) * per_minute
    print(
        f"idle, pulse in {where}: state.json replaced {replaced * per_minute:.0f} times/min, "
        f"{disk:.0f} bytes/min to the disk, {calls:.0f} write calls/min "
        f"(goal: no disk writes when nothing changed)"
    )


def _io(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    runaway(args.messages)
    idle(args.idle_seconds, None)
    shm = Path(tempfile.mkdtemp(prefix="agent-bench-run-", dir="/dev/shm"))
    idle(args.idle_seconds, shm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
