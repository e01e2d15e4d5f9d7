"""The Slack worker: one ProfileLink (agent/slack_link.py) per [slack.profiles.NAME].

The worker's own loop only heartbeats, hands queue/outgoing/slack_*.json to the profile
named in each reply, tells a profile when the queue gave up on one of its messages (a
`slack_*.json.reason` with `attempts` in queue/failed/), and watches the profile threads
(a dead one crashes the worker, and the runner restarts it); every network call happens
in a profile thread. health() reports each profile's state, plus a `degraded` reason
while any profile is not running.
See docs/slack.md.
"""

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.dirwatch import DirWatcher
from agent.queue import Queue
from agent.slack_api import RUNNING, WORKER, redact
from agent.slack_link import ProfileLink
from agent.slack_outbound import move_to_failed
from agent.worker import Worker, WorkerContext

SCAN_SECONDS = 0.25  # outgoing/ and failed/ are looked at this often (and at once on inotify)


class SlackWorker(Worker):
    name = WORKER

    def __init__(self, config: Config):
        self.config = config
        self.links: dict[str, ProfileLink] = {}
        self.outgoing = config.queue_dir / "outgoing"
        self.failed = config.queue_dir / "failed"
        self._failures_seen: set[str] = set()  # reason files already looked at
        self.watcher: DirWatcher | None = None

    def initialize(self, ctx: WorkerContext) -> None:
        Queue(self.config.queue_dir).ensure_dirs()
        self.links = {
            name: ProfileLink(name, profile, self.config)
            for name, profile in self.config.slack.profiles.items()
        }
        for link in self.links.values():
            link.start()

    def run(self, ctx: WorkerContext) -> None:
        watcher = DirWatcher(self.outgoing)  # a new reply is handed over at once
        try:
            self._loop(ctx, watcher)
        finally:
            watcher.close()

    def _loop(self, ctx: WorkerContext, watcher: DirWatcher) -> None:
        self.watcher = watcher
        while not ctx.stopping:
            ctx.beat()
            for link in self.links.values():
                if not link.alive() and not ctx.stopping:
                    crash = link.crash
                    raise RuntimeError(
                        f"slack profile {link.name} thread died: "
                        f"{type(crash).__name__}: {redact(str(crash), tuple(link.secrets))}"
                    )
            self._scan_outgoing()
            self._scan_failed()
            watcher.wait(SCAN_SECONDS)

    def _scan_outgoing(self) -> None:
        found = []
        try:
            with os.scandir(self.outgoing) as entries:
                for entry in entries:
                    if entry.name.startswith("slack_") and entry.name.endswith(".json"):
                        with contextlib.suppress(FileNotFoundError):
                            found.append((entry.stat().st_mtime_ns, entry.name))
        except FileNotFoundError:
            return
        for _, name in sorted(found):  # oldest reply first: a thread's replies keep order
            if any(name in link.pending for link in self.links.values()):
                continue  # already handed over
            path = self.outgoing / name
            try:
                reply = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                move_to_failed(self.config.queue_dir, path, "unreadable reply JSON")
                continue
            profile = reply.get("channelProfileId") if isinstance(reply, dict) else None
            link = self.links.get(str(profile))
            if link is None:
                move_to_failed(self.config.queue_dir, path, f"unknown slack profile {profile!r}")
                continue
            link.offer(path)

    def _scan_failed(self) -> None:
        """Messages the queue gave up on: each profile tells the thread (once)."""
        try:
            with os.scandir(self.failed) as entries:
                names = [
                    e.name
                    for e in entries
                    if e.name.startswith("slack_")
                    and e.name.endswith(".json.reason")
                    and e.name not in self._failures_seen
                ]
        except FileNotFoundError:
            return
        for name in sorted(names):
            self._failures_seen.add(name)
            failure = _message_failure(self.failed, name)
            link = self.links.get(str(failure.get("profile"))) if failure else None
            if failure and link is not None:
                link.outbound.failed_message(
                    failure["messageId"], failure["reason"], failure["attempts"]
                )

    def wake(self) -> None:
        if self.watcher is not None:
            self.watcher.wake()
        for link in self.links.values():
            link.stop()

    def shutdown(self, ctx: WorkerContext) -> None:
        for link in self.links.values():
            link.stop()
        deadline = time.monotonic() + 5
        for link in self.links.values():
            link.join(max(deadline - time.monotonic(), 0.1))
        self.links = {}

    def degraded(self) -> str | None:
        """Why the worker is degraded (a profile is not running), or None when it is not."""
        links = dict(self.links)
        if not links:
            return "[slack] is enabled but no [slack.profiles.NAME] is configured"
        bad = [f"{name} {link.state}" for name, link in links.items() if link.state != RUNNING]
        return ("slack profile " + ", ".join(bad)) if bad else None

    def health(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "profiles": {name: link.health() for name, link in dict(self.links).items()}
        }
        reason = self.degraded()
        if reason:
            detail["degraded"] = reason
        return detail


def _message_failure(failed: Path, reason_name: str) -> dict[str, Any] | None:
    """A failed *message* (the queue's reason has `attempts`; a reply that could not be
    posted has not) with its profile, or None."""
    try:
        info = json.loads((failed / reason_name).read_text())
        message = json.loads((failed / reason_name.removesuffix(".reason")).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(message, dict) or "attempts" not in info:
        return None
    if "originalMessage" in message or not info.get("messageId"):
        return None
    return {
        "profile": message.get("channelProfileId"),
        "messageId": str(info["messageId"]),
        "reason": str(info.get("reason") or ""),
        "attempts": int(info.get("attempts") or 0),
    }
