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
import sys
import tempfile
import time
from pathlib import Path

from benchlib import running_agent

from agent.queue import new_message


def proc_field(pid: int, name: str, source: str = "status") -> int:
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise KeyError(name)


def runaway(messages: int) -> None:
    config = '[agents.default]\ncommand = ["yes"]\n[dispatcher]\nmax_attempts = 1\n'
    with running_agent("runaway", config) as agent:
        before = proc_field(agent.pid, "VmHWM:") / 1024
        began = time.monotonic()
        for n in range(messages):
            agent.queue.enqueue(new_message("local", "go", "bench", "0", message_id=f"r{n}"))
        failed = agent.queue.failed
        while len(list(failed.glob("*.reason"))) < messages:
            if time.monotonic() - began > 300:
                raise SystemExit("runaway: not every message failed within 300 s")
            time.sleep(0.1)
        took = time.monotonic() - began
        peak = proc_field(agent.pid, "VmHWM:") / 1024
        reason = json.loads(next(failed.glob("*.reason")).read_text())["reason"]
    print(
        f"runaway: {messages} runs of `yes` (4 MiB limit each) in {took:.1f} s; "
        f"supervisor peak RSS {before:.1f} MB before, {peak:.1f} MB after "
        f"(goal < 60 MB: {'met' if peak < 60 else 'MISSED'})"
    )
    print(f"  reason recorded: {reason}")


def idle(seconds: float, runtime_dir: Path | None) -> None:
    """What an idle supervisor writes: state.json replacements, bytes sent to the disk
    (/proc/PID/io write_bytes), and its write calls (the pulse)."""
    where = "state_dir (standalone)"
    env = {}
    if runtime_dir is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime_dir)  # as systemd's RuntimeDirectory=
        where = f"{runtime_dir} (tmpfs, as under systemd)"
    with running_agent("idle", '[agents.default]\ncommand = ["cat"]\n', env) as agent:
        state = agent.root / "state" / "state.json"
        time.sleep(2)  # past start-up
        inode, io = state.stat().st_ino, _io(agent.pid)
        replaced = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if state.stat().st_ino != inode:
                replaced, inode = replaced + 1, state.stat().st_ino
        after = _io(agent.pid)
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
