"""The installed package's query speed: `agentctl logs` beside `journalctl` over a full
journal, and `agentctl status` beside a bare `python3 -c pass`, in a real systemd.

Boots the e2e guest (tests/e2e/guest.py: systemd 252 + journald in a container), installs the
freshly built .deb, fills the journal with agent events logged by the agent's own journald
handler from inside agent.service (so they carry _SYSTEMD_UNIT=agent.service), then times,
inside the guest, alternating runs of

    agentctl logs --worker queue -n 100 --json
    journalctl -u agent WORKER=queue -n 100 -o json

and prints both medians and their ratio (target: agentctl <= 1.5x journalctl); then, with
that supervisor running, `agentctl status` beside `python3 -c pass` (target: <= 1.5x), and
where each command's time goes (`python3 -X importtime`, interpreter start, the query).

    sudo python3 bench/bench_journal_logs.py [--events 200000] [--runs 21]

Needs what the e2e tests need (bash tests/e2e/prepare.sh). Exit 0 when the ratio meets the
target, 1 when it does not, 2 when the bench cannot run.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.guest import Guest, GuestError, build_deb, cannot_boot_reason, install_deb, log

TARGET_RATIO = 1.5
JSON_FLOOR_LABEL = "python3 -c 'import json, pathlib'"
BENCH_DIR = "/usr/local/lib/agent-bench"
WORKERS = ("queue", "dispatcher", "slack", "heartbeat")

# Runs inside agent.service (ExecStartPre=, as User=agent): the agent's own JournaldHandler.
FILL = """
import logging, sys
from agent.config import load_config
from agent.log import event, setup_logging

setup_logging(load_config(), "journald")
workers = {workers!r}
events = ("queue.enqueued", "dispatcher.dispatched", "slack.message.received", "heartbeat")
total = int(sys.argv[1])
for i in range(total):
    w = i % len(workers)
    event(events[w], f"bench event {{i}} for {{workers[w]}}", worker=workers[w], seq=i,
          level=logging.WARNING if i % 50 == 0 else logging.INFO)
"""

# Runs inside the guest as root: alternate the two commands, time each, print JSON.
TIMER = """
import json, statistics, subprocess, sys, time
runs = int(sys.argv[1])
cmds = {
    "agentctl": ["agentctl", "logs", "--worker", "queue", "-n", "100", "--json"],
    "journalctl": ["journalctl", "-u", "agent", "WORKER=queue", "-n", "100", "-o", "json",
                   "--no-pager"],
    "python3": ["python3", "-c", "pass"],  # the floor for any Python command
    "status": ["agentctl", "status"],  # exits 2 here: the packaged config names no agent
    "python3-I": ["python3", "-I", "-S", "-c", "pass"],  # the interpreter without site
    "python3-json": ["python3", "-c", "import json, pathlib"],  # reading a JSON file, a path
    "true": ["true"],  # starting any process at all
}
times = {name: [] for name in cmds}
lines = {}
for i in range(runs + 2):
    for name, argv in cmds.items():
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=name != "status")
        took = time.perf_counter() - t0
        if i >= 2:  # two warm-up rounds: page cache, pyc files
            times[name].append(took)
        lines[name] = done.stdout.count("\\n")
imports = {}
for name in ("status", "agentctl"):
    done = subprocess.run(["python3", "-X", "importtime", "/usr/bin/" + cmds[name][0],
                           *cmds[name][1:]], capture_output=True, text=True)
    imports[name] = done.stderr
print(json.dumps({"times": times, "lines": lines, "imports": imports}))
"""

DROPIN = "/etc/systemd/system/agent.service.d/90-bench-fill.conf"


def fill_journal(guest: Guest, events: int) -> float:
    # journald's default rate limit (10,000 per 30 s per unit) would drop most of them
    guest.write("/etc/systemd/journald.conf.d/90-bench.conf", "[Journal]\nRateLimitIntervalSec=0\n")
    guest.run(["systemctl", "restart", "systemd-journald"])
    guest.write(f"{BENCH_DIR}/fill.py", FILL.format(workers=WORKERS))
    guest.write(
        DROPIN,
        "[Service]\n"
        f"ExecStartPre=/usr/bin/python3 {BENCH_DIR}/fill.py {events}\n"
        "TimeoutStartSec=1800\n",
    )
    guest.run(["systemctl", "daemon-reload"])
    t0 = time.monotonic()
    guest.run(["systemctl", "restart", "agent"], timeout=1800)
    took = time.monotonic() - t0
    guest.path(DROPIN).unlink()
    guest.run(["systemctl", "daemon-reload"])
    guest.run(["journalctl", "--sync"])
    return took


def count(guest: Guest, *matches: str) -> int:
    out = guest.run(["journalctl", "-u", "agent", *matches, "-o", "cat", "--no-pager"]).stdout
    return out.count("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="agent events to log")
    parser.add_argument("--runs", type=int, default=21, help="timed runs of each command")
    parser.add_argument("--deb", type=Path, help="a prebuilt agent_*.deb (default: build one)")
    args = parser.parse_args()
    if args.events < 1 or args.runs < 1:
        parser.error("--events and --runs must be at least 1")
    reason = cannot_boot_reason()
    if reason:
        print(f"bench_journal_logs: cannot run: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        try:
            deb = args.deb or build_deb(Path(tmp))
            with Guest(name="agent-bench") as guest:
                install_deb(guest, deb)
                log(f"filling the journal with {args.events} agent events")
                took = fill_journal(guest, args.events)
                total = count(guest, "SYSLOG_IDENTIFIER=agent")
                queue = count(guest, "WORKER=queue")
                log(f"journal filled in {took:.0f} s: {total} agent entries, {queue} for queue")
                guest.write(f"{BENCH_DIR}/timer.py", TIMER)
                out = guest.run(
                    ["python3", f"{BENCH_DIR}/timer.py", str(args.runs)], timeout=1800
                ).stdout
        except GuestError as exc:
            print(f"bench_journal_logs: {exc}", file=sys.stderr)
            return 2
    result = json.loads(out)
    med = {name: sorted(t)[len(t) // 2] for name, t in result["times"].items()}
    ratio = med["agentctl"] / med["journalctl"]
    print(f"journal: {total} agent entries ({queue} with WORKER=queue)")
    for name, argv in (
        ("agentctl", "agentctl logs --worker queue -n 100 --json"),
        ("journalctl", "journalctl -u agent WORKER=queue -n 100 -o json"),
        ("python3", "python3 -c pass (interpreter start alone)"),
    ):
        print(f"{argv:<48} median {med[name] * 1000:6.1f} ms ({result['lines'][name]} lines)")
    query = med["journalctl"] - med["true"]  # journalctl's own work beyond starting
    floor = (med["python3"] + query) / med["journalctl"]
    print(f"{'true (starting any process)':<48} median {med['true'] * 1000:6.1f} ms")
    print(
        f"floor for a Python client doing journalctl's query: python3 start "
        f"{med['python3'] * 1000:.1f} ms + the query {query * 1000:.1f} ms "
        f"= {floor:.2f}x journalctl"
    )
    verdict = "OK" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"ratio agentctl/journalctl: {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}")
    status_ratio = med["status"] / med["python3"]
    print(f"{'agentctl status (running supervisor)':<48} median {med['status'] * 1000:6.1f} ms")
    print(f"{'python3 -I -S -c pass (no site)':<48} median {med['python3-I'] * 1000:6.1f} ms")
    json_floor = med["python3-json"] / med["python3"]
    print(
        f"{JSON_FLOOR_LABEL:<48} median {med['python3-json'] * 1000:6.1f} ms"
        f" = {json_floor:.2f}x python3 (the floor with the stdlib JSON reader)"
    )
    verdict = "OK" if status_ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"ratio status/python3: {status_ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}")
    for name in ("status", "agentctl"):
        print(f"where `{name}` spends its imports (self us, cumulative us, module; top 12):")
        for row in top_imports(result["imports"][name], 12):
            print(f"    {row}")
    if total < args.events:
        print(f"warning: only {total} of {args.events} events reached the journal", file=sys.stderr)
    return 0 if ratio <= TARGET_RATIO and status_ratio <= TARGET_RATIO else 1


def top_imports(importtime: str, n: int) -> list[str]:
    """The n imports with the largest cumulative time, from `python3 -X importtime`."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, module = line[12:].split("|", 2)
        rows.append((int(cumulative), int(self_us), module.rstrip()[1:]))  # indent = depth
    total = sum(c for c, _, m in rows if not m.startswith(" "))
    rows.sort(reverse=True)
    lines = [f"{s:>7} {c:>7}  {m}" for c, s, m in rows[:n]]
    return [*lines, f"{'':>7} {total:>7}  (all top-level imports)"]


if __name__ == "__main__":
    sys.exit(main())
