#!/usr/bin/env python3
"""Slack benchmark: how fast a mention shows life, and how fast it is answered.

A real supervisor (standalone, JSON-lines log) with `cat` as the agent, connected to the
fake Slack of the tests (tests/fake_slack.py: HTTP Web API and Socket Mode on loopback).
Each sample is a mention in a channel of its own (posts are paced per channel), sent
once the previous one was answered:

  first sign of life   mention pushed on the WebSocket -> reactions.add reaches Slack
                       (goal: p50 under 50 ms)
  reply                mention pushed -> chat.postMessage with the agent's reply reaches
                       Slack (goal: p50 under 150 ms)

Figures are printed, not asserted.

    python bench/bench_slack.py [--samples 30]      (BENCH_KEEP=1 keeps its state_dir)

The reply figure includes the agent run: about 250 ms of it, in many samples, is
agentrun's 0.25 s poll noticing that `cat` has exited after its output closed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_slack import BOT_USER, FakeSlack

BOT_TOKEN = "xoxb-bench-0000-benchtoken"
APP_TOKEN = "xapp-1-A1-0000-benchtoken"
GOAL_LIFE_MS = 50.0
GOAL_REPLY_MS = 150.0


def agentctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True, check=False
    )


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.0005)


def write_config(root: Path, fake: FakeSlack) -> Path:
    (root / "bot").write_text(BOT_TOKEN)
    (root / "app").write_text(APP_TOKEN)
    config = root / "agent.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\n'
        '[logging]\nsink = "file"\n'
        '[agents.default]\ncommand = ["cat"]\n'
        f'[slack]\nenabled = true\napi_base_url = "{fake.api_url}"\n'
        f'[slack.profiles.main]\nbot_token_file = "{root / "bot"}"\n'
        f'app_token_file = "{root / "app"}"\n'
    )
    return config


def first_call(fake: FakeSlack, method: str, channel: str) -> float | None:
    calls = [c for c in fake.calls_of(method) if c.params.get("channel") == channel]
    return calls[0].at if calls and calls[0].status == 200 else None


def sample(fake: FakeSlack, number: int) -> tuple[float, float]:
    channel = f"CB{number:05d}"
    ts = f"{1700000000 + number}.000100"
    mention = {
        "type": "app_mention",
        "user": "U1",
        "text": f"<@{BOT_USER}> ping {number}",
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
    }
    start = time.monotonic()
    fake.push_event(mention)
    life = wait_until(lambda: first_call(fake, "reactions.add", channel), 10, "the reaction")
    reply = wait_until(lambda: first_call(fake, "chat.postMessage", channel), 10, "the reply")
    return (life - start) * 1000, (reply - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-slack-"))
    fake = FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    env = {**os.environ, "AGENT_CONFIG": str(write_config(root, fake))}
    env["AGENT_MANAGER"] = "standalone"
    env.pop("NOTIFY_SOCKET", None)
    try:
        started = agentctl(env, "start")
        if started.returncode != 0:
            raise SystemExit(f"bench: start failed: {started.stdout}{started.stderr}")
        wait_until(lambda: fake.live() == 1, 20, "the Socket Mode connection")
        sample(fake, 0)  # warm-up: first users.info, first lane, first agent run
        lives, replies = zip(*(sample(fake, n) for n in range(1, args.samples + 1)), strict=True)
    finally:
        agentctl(env, "stop")
        fake.stop()
        if not os.environ.get("BENCH_KEEP"):  # BENCH_KEEP=1 keeps the logs to look at
            shutil.rmtree(root, ignore_errors=True)
    report("mention -> first sign of life (reaction)", lives, GOAL_LIFE_MS)
    report("mention -> reply posted (cat agent)", replies, GOAL_REPLY_MS)
    return 0


def report(what: str, values: tuple[float, ...], goal: float) -> None:
    p50 = statistics.median(values)
    p90 = sorted(values)[int(len(values) * 0.9) - 1]
    print(f"{what}: p50 {p50:.1f} ms, p90 {p90:.1f} ms, n={len(values)} (goal p50 < {goal:g} ms)")


if __name__ == "__main__":
    sys.exit(main())
