"""The Slack worker: one ProfileLink (agent/slack_link.py) per [slack.profiles.NAME].

The worker's own loop only heartbeats, hands queue/outgoing/slack_*.json to the profile
named in each reply, tells a profile when the queue gave up on one of its messages (a
failed/slack_*.json that is a message, not a reply), and watches the profile threads
(a dead one crashes the worker, and the runner restarts it); every network call happens
in a profile thread. It sees queue/ only through agent/queue.py (Queue). The profiles'
memory (cursors, routes...) is in the host's files, or with [queue] backend = "postgres"
in the shared database (open_stores). health()
reports each profile's state, plus a `degraded` reason while any profile is not running.
See docs/slack.md.
"""

import time
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.dirwatch import DirWatcher
from agent.metrics import NO_METRICS, Metrics
from agent.queue import InvalidMessage, MachineTrouble, Queue
from agent.slack_api import RUNNING, WORKER, redact
from agent.slack_cursors import FileSlack
from agent.slack_link import ProfileLink
from agent.slack_outbound import move_to_failed
from agent.worker import Worker, WorkerContext

if TYPE_CHECKING:
    from agent.pg.slackstore import PgSlack

CHANNEL = "slack"  # the queue channel of Slack messages and replies
SCAN_SECONDS = 0.25  # outgoing/ and failed/ are looked at this often (and at once on inotify)


class SlackWorker(Worker):
    name = WORKER

    def __init__(self, config: Config, metrics: Metrics = NO_METRICS):
        self.config = config
        self.metrics = metrics
        self.links: dict[str, ProfileLink] = {}
        self.queue = Queue(config.queue_dir)  # every look at queue/ goes through it
        self._failures_seen: set[str] = set()  # reason files already looked at
        self.watcher: DirWatcher | None = None
        self.stores: FileSlack | PgSlack | None = None

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        self.stores = open_stores(self.config)
        self.links = {
            name: ProfileLink(name, profile, self.config, self.queue, self.metrics, self.stores)
            for name, profile in self.config.slack.profiles.items()
        }
        for link in self.links.values():
            link.start()

    def run(self, ctx: WorkerContext) -> None:
        watcher = self.queue.reply_watcher()  # a new reply is handed over at once
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
        queue = self.queue
        for name in queue.replies(CHANNEL):  # oldest first: a thread's replies keep order
            if any(name in link.pending for link in self.links.values()):
                continue  # already handed over
            try:
                reply = queue.read_reply(name)
            except (FileNotFoundError, MachineTrouble):
                continue  # gone, or the disk failed us: the next scan tries again
            except InvalidMessage as exc:
                move_to_failed(queue, name, f"unreadable reply: {exc}")
                continue
            profile = reply.get("channelProfileId")
            link = self.links.get(str(profile))
            if link is None:
                move_to_failed(queue, name, f"unknown slack profile {profile!r}")
                continue
            link.offer(name)

    def _scan_failed(self) -> None:
        """Messages the queue gave up on: each profile tells the thread (once)."""
        for name in self.queue.failure_names(CHANNEL):
            if name in self._failures_seen:
                continue
            self._failures_seen.add(name)
            entry = self.queue.read_failure(name)
            if entry is None or entry.is_reply:
                continue  # unreadable, or a reply that could not be posted
            failure, profile = entry.failure, entry.content.get("channelProfileId")
            link = self.links.get(str(profile))
            if failure.message_id and link is not None:
                link.outbound.failed_message(failure.message_id, failure.reason, failure.attempts)

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
        stores, self.stores = self.stores, None
        if stores is not None:
            stores.close()

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


def open_stores(config: Config) -> "FileSlack | PgSlack":
    """Where the profiles keep their memory: the host's files, or with [queue] backend =
    "postgres" the shared database (dedupe keys, cursors, routes, reply claims, backfill
    turns; docs/scaling.md), its schema made current or checked first."""
    if config.queue.backend != "postgres":
        return FileSlack()
    from agent.pg.slackstore import open_pg_slack

    return open_pg_slack(config)
