#!/usr/bin/env python3
"""Runtime benchmark: start-to-ready, stop, status wall time, idle CPU and RSS.

Prints medians of several runs and the ratio to each target. Uses the agentctl console
script installed beside this interpreter, against a throw-away state_dir.

    python bench/bench_runtime.py [--runs 7] [--idle-seconds 30]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - began, done


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()

    agentctl = shutil.which("agentctl", path=str(Path(sys.executable).parent)) or "agentctl"
    root = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    # an agent, so that status is healthy (exit 0) rather than "no agent configured"
    (root / "agent.toml").write_text(
        f'state_dir = "{root}/state"\n[agents.default]\ncommand = ["cat"]\n'
    )
    env = {**os.environ, "AGENT_CONFIG": str(root / "agent.toml"), "AGENT_MANAGER": "standalone"}
    env.pop("AGENT_FAULT_INJECT", None)
    # Measure as installed (a package ships compiled bytecode): let the warm-up write it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([agentctl, "status"], env=env, capture_output=True, check=False)

    starts, stops = [], []
    for _ in range(args.runs):
        seconds, done = timed([agentctl, "start"], env)
        assert done.returncode == 0, done.stderr
        starts.append(seconds)
        seconds, done = timed([agentctl, "stop"], env)
        assert done.returncode == 0 and done.stdout.startswith("stopped"), done.stdout
        stops.append(seconds)

    done = subprocess.run([agentctl, "start"], env=env, capture_output=True, text=True, check=True)
    pid = int(done.stdout.strip().rsplit("pid ", 1)[1].rstrip(")"))
    try:
        bare, status = [], []
        for _ in range(args.runs * 3):  # interleaved so both see the same machine load
            bare.append(timed([sys.executable, "-c", "pass"], env)[0])
            seconds, done = timed([agentctl, "status"], env)
            assert done.returncode == 0, done.stdout
            status.append(seconds)

        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)  # the measurement window itself, not a wait for a condition
        cpu_used, wall = cpu_seconds(pid) - cpu_before, time.monotonic() - wall_before
        rss = rss_mb(pid)
    finally:
        subprocess.run([agentctl, "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    idle_pct = 100 * cpu_used / wall
    rows = [
        ("agentctl start -> ready", f"{med(starts) * 1000:.0f} ms", "-", "-"),
        (
            "agentctl stop (idle)",
            f"{med(stops) * 1000:.0f} ms",
            "< 500 ms",
            f"{med(stops) / 0.5:.2f}x of limit",
        ),
        ("python -c pass", f"{med(bare) * 1000:.1f} ms", "-", "-"),
        (
            "agentctl status",
            f"{med(status) * 1000:.1f} ms",
            "<= 1.5x python -c pass",
            f"{med(status) / med(bare):.2f}x",
        ),
        (
            f"idle CPU over {wall:.0f} s",
            f"{idle_pct:.3f} % of a core",
            "< 0.5 %",
            f"{idle_pct / 0.5:.2f}x of limit",
        ),
        ("idle RSS", f"{rss:.1f} MB", "< 40 MB", f"{rss / 40:.2f}x of limit"),
    ]
    print(f"runs={args.runs} (medians); python={sys.executable}")
    for name, value, target, ratio in rows:
        print(f"{name:<26} {value:>16}   target {target:<24} {ratio}")
    ok = med(stops) < 0.5 and med(status) <= 1.5 * med(bare) and idle_pct < 0.5 and rss < 40
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
