"""Outbound: replies in queue/outgoing/ -> chat.postMessage in the original thread.

The worker hands each reply file to Outbound.offer(). Its route (the Slack channel and
thread, written by Inbound) picks the channel's Lane: one thread per Slack channel that
does that channel's posts and reactions in order, at most one post per second
(POST_INTERVAL), so one channel's pace, rate limit or outage never holds up another.
In a lane: 429 waits Retry-After, transient errors back off (Backoff), an auth error
stops the profile (the reply stays and is offered again after the reconnect), any other
error moves the reply to queue/failed/ with a .reason file. A long reply is posted as
ordered parts (slack_text.split), each recorded in the route, so a restart goes on where
it stopped. A posted reply is removed from outgoing/ and its route dropped.
Invariant: a file is in at most one lane at a time (`pending`).
"""

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backoff import Backoff
from agent.clock import iso_utc
from agent.fsutil import atomic_write_json, fsync_dir
from agent.log import event
from agent.slack_api import AUTH, RATELIMITED, TRANSIENT, WORKER, ApiFailure, SlackApi
from agent.slack_attach import Attachments, extract
from agent.slack_feedback import Reactions, failure_notice
from agent.slack_files import SharedFiles
from agent.slack_store import ProfileStore
from agent.slack_text import split, to_slack

POST_INTERVAL = 1.0  # Slack allows about one message per second per channel
POSTS = frozenset({"chat.postMessage", "chat.postEphemeral", "files.upload"})
POST_BACKOFF = 1.0
POST_BACKOFF_MAX = 60.0
IDLE_WAIT = 0.5


@dataclass(frozen=True)
class Route:
    """Where the reply to one message goes."""

    message_id: str
    channel: str
    thread_ts: str
    parts_posted: int = 0  # of a long reply, posted before a restart: not posted again
    message_ts: str | None = None  # the message itself (its reactions); None in old routes
    failure_noticed: bool = False
    attached: bool = False  # the reply's files were uploaded

    @classmethod
    def of(cls, message_id: str, found: dict[str, Any]) -> "Route":
        return cls(
            message_id,
            found["channel"],
            found["thread_ts"],
            int(found.get("parts_posted") or 0),
            found.get("message_ts"),
            bool(found.get("failure_noticed")),
            bool(found.get("attached")),
        )


@dataclass(frozen=True)
class Delivery:
    """One reply file and its route, waiting in a lane."""

    path: Path
    reply: dict[str, Any]
    route: Route


@dataclass(frozen=True)
class Notice:
    """A short text of the worker's own (a denial, a failure notice) for a thread."""

    channel: str
    thread_ts: str | None
    text: str
    why: str  # for the event: deny_notice, failure...
    ephemeral_to: str | None = None  # a user: chat.postEphemeral, only they see it


@dataclass(frozen=True)
class Reaction:
    """Swap the bot's reaction on a message: remove one emoji (if any), add another."""

    channel: str
    ts: str
    add: str
    remove: str = ""


@dataclass(frozen=True)
class Failure:
    """A message of this profile finally failed (queue/failed/): tell its thread once."""

    route: Route
    reason: str
    attempts: int


Job = Delivery | Notice | Reaction | Failure


class Stopping(Exception):
    """The profile is stopping: leave the job where it is."""


class Outbound:
    def __init__(
        self,
        name: str,
        api: SlackApi,
        store: ProfileStore,
        queue_dir: Path,
        stop: threading.Event,
        ready: Callable[[], bool],
        on_problem: Callable[[ApiFailure], None],
        reactions: Reactions,
        files: SharedFiles,
        workdir_of: Callable[[str], Path | None],
    ):
        self.name = name
        self.files = files
        self.max_file_bytes = files.max_bytes
        self.workdir_of = workdir_of  # an agent's workdir: where ATTACH paths may point
        self.reactions = reactions
        self.api = api
        self.store = store
        self.queue_dir = queue_dir
        self.stop_event = stop
        self.ready = ready  # the profile is connected: lanes may post
        self.on_problem = on_problem  # an auth failure: the profile must reconnect
        self.pending: set[str] = set()  # outgoing file names handed over and not finished
        self.lock = threading.Lock()
        self.lanes: dict[str, Lane] = {}
        self.posted = 0

    def offer(self, path: Path) -> None:
        with self.lock:
            if path.name in self.pending:
                return
            self.pending.add(path.name)
        delivery = self._delivery(path)
        if delivery is None:
            self.finish(path)
            return
        self.lane(delivery.route.channel).put(delivery)

    def notice(self, notice: Notice) -> None:
        self.lane(notice.channel).put(notice)

    def react(self, reaction: Reaction) -> None:
        if reaction.add or reaction.remove:
            self.lane(reaction.channel).put(reaction)

    def failed_message(self, message_id: str, reason: str, attempts: int) -> None:
        """The queue gave up on a message: a notice and the failed reaction, once."""
        found = self.store.route(message_id)
        if found is None:
            return  # not ours, or long gone
        route = Route.of(message_id, found)
        if not route.failure_noticed:
            self.lane(route.channel).put(Failure(route, reason, attempts))

    def finish(self, path: Path) -> None:
        with self.lock:
            self.pending.discard(path.name)

    def lane(self, channel: str) -> "Lane":
        with self.lock:
            if channel not in self.lanes:
                self.lanes[channel] = Lane(self, channel)
            return self.lanes[channel]

    def join(self, timeout: float) -> None:
        for lane in list(self.lanes.values()):
            lane.thread.join(timeout)

    def _delivery(self, path: Path) -> Delivery | None:
        """The reply and its route; None (after moving it to failed/) when it has none."""
        try:
            reply = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            move_to_failed(self.queue_dir, path, f"unreadable reply: {exc}")
            return None
        message_id = str(reply.get("messageId") or "") if isinstance(reply, dict) else ""
        found = self.store.route(message_id) if message_id else None
        if found is None:
            reason = f"no Slack route for message {message_id!r}"
            move_to_failed(self.queue_dir, path, reason, reply)
            return None
        return Delivery(path, reply, Route.of(message_id, found))

    # ---- what a lane does with a job

    def perform(self, lane: "Lane", job: Job) -> None:
        if isinstance(job, Delivery):
            self.deliver(lane, job)
        elif isinstance(job, Failure):
            self._tell_failure(lane, job)
        elif isinstance(job, Notice):
            self._post_notice(lane, job)
        else:
            self._swap_reaction(lane, job)

    def _tell_failure(self, lane: "Lane", failure: Failure) -> None:
        route = failure.route
        text = failure_notice(failure.reason, failure.attempts)
        self._post_notice(lane, Notice(route.channel, route.thread_ts, text, "failure"))
        self._swap(route, self.reactions.failed)
        self.store.update_route(route.message_id, failure_noticed=True)
        self.files.remove(route.message_id)

    def _swap(self, route: Route, emoji: str) -> None:
        """Replace the ack reaction on the message with `emoji` (after the current job)."""
        if route.message_ts:
            self.react(Reaction(route.channel, route.message_ts, emoji, self.reactions.ack))

    def _post_notice(self, lane: "Lane", notice: Notice) -> None:
        params: dict[str, Any] = {"channel": notice.channel, "text": notice.text}
        if notice.thread_ts:
            params["thread_ts"] = notice.thread_ts
        method = "chat.postMessage"
        if notice.ephemeral_to:
            method, params["user"] = "chat.postEphemeral", notice.ephemeral_to
        try:
            lane.call(method, **params)
        except ApiFailure as failure:
            self._cosmetic_failed("notice", notice.channel, failure)
            return
        event(
            "slack.notice.posted",
            f"slack profile {self.name}: {notice.why} notice posted in {notice.channel}",
            worker=WORKER,
            profile=self.name,
            slack_channel=notice.channel,
            why=notice.why,
        )

    def _swap_reaction(self, lane: "Lane", reaction: Reaction) -> None:
        """Reactions are a courtesy: a failure is logged, never retried past transients."""
        steps = [("reactions.remove", reaction.remove), ("reactions.add", reaction.add)]
        for method, emoji in steps:
            if not emoji:
                continue
            try:
                lane.call(method, channel=reaction.channel, timestamp=reaction.ts, name=emoji)
            except ApiFailure as failure:
                if failure.error not in ("no_reaction", "already_reacted"):
                    self._cosmetic_failed(method, reaction.channel, failure)

    def _cosmetic_failed(self, what: str, channel: str, failure: ApiFailure) -> None:
        if failure.kind == AUTH:
            self.on_problem(failure)
        event(
            "slack.feedback.failed",
            f"slack profile {self.name}: {what} in {channel} failed: {failure.error}",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.name,
            slack_channel=channel,
            error=failure.error,
        )

    def deliver(self, lane: "Lane", delivery: Delivery) -> None:
        """Post a reply as ordered parts (each recorded), then upload what it attaches."""
        route = delivery.route
        agent = str(delivery.reply.get("agent") or "")
        attach = extract(
            str(delivery.reply.get("message") or ""), self.workdir_of(agent), self.max_file_bytes
        )
        text = "\n\n".join(t for t in (attach.text, attach.note()) if t)
        parts = [] if attach.paths and not text else split(to_slack(text))
        try:
            attempts = self._post_parts(lane, route, parts)
        except ApiFailure as failure:
            if failure.kind == AUTH:
                self.on_problem(failure)
            else:
                self._failed(delivery, failure.error)
            return
        if attach.paths and not route.attached and not self._upload(lane, route, attach):
            return  # auth failure: the reply stays, the rest comes after the reconnect
        _remove(delivery.path)
        self.store.drop_route(route.message_id)
        self.files.remove(route.message_id)  # the message is done: its files go
        self._swap(route, self.reactions.done)
        self.posted += 1
        event(
            "slack.reply.posted",
            f"slack profile {self.name}: reply to {route.message_id} posted in thread",
            worker=WORKER,
            profile=self.name,
            message_id=route.message_id,
            slack_channel=route.channel,
            attempts=attempts,
            parts=len(parts),
            attached=len(attach.paths),
        )

    def _post_parts(self, lane: "Lane", route: Route, parts: list[str]) -> int:
        attempts = 0
        for number in range(route.parts_posted, len(parts)):
            attempts += lane.call(
                "chat.postMessage",
                channel=route.channel,
                text=parts[number],
                thread_ts=route.thread_ts,
                link_names=False,
                unfurl_links=False,
            )
            if len(parts) > 1:
                self.store.update_route(route.message_id, parts_posted=number + 1)
        return attempts

    def _upload(self, lane: "Lane", route: Route, attach: Attachments) -> bool:
        """Upload into the thread; False on an auth failure (the profile reconnects)."""
        paths = list(attach.paths)
        try:
            lane.retrying(
                "files.upload", lambda: self.api.upload(route.channel, route.thread_ts, paths)
            )
        except ApiFailure as failure:
            if failure.kind == AUTH:
                self.on_problem(failure)
                return False
            self._cosmetic_failed("files.upload", route.channel, failure)
            note = f"_(the attached files could not be uploaded: {failure.error})_"
            self.notice(Notice(route.channel, route.thread_ts, note, "attach_failed"))
        self.store.update_route(route.message_id, attached=True)
        return True

    def _failed(self, delivery: Delivery, error: str) -> None:
        message_id = delivery.route.message_id
        move_to_failed(self.queue_dir, delivery.path, f"chat.postMessage: {error}", delivery.reply)
        self.store.drop_route(message_id)
        event(
            "slack.reply.failed",
            f"slack profile {self.name}: reply to {message_id} failed: {error}",
            worker=WORKER,
            level=logging.ERROR,
            profile=self.name,
            message_id=message_id,
            error=error,
        )


class Lane:
    """One Slack channel's posts, in order, in their own thread."""

    def __init__(self, outbound: Outbound, channel: str):
        self.outbound = outbound
        self.channel = channel
        self.jobs: deque[Job] = deque()
        self.next_post = 0.0  # monotonic time before which this channel gets no post
        self.wakeup = threading.Condition()
        self.thread = threading.Thread(
            target=self._run, name=f"slack-{outbound.name}-{channel}", daemon=True
        )
        self.thread.start()

    def put(self, job: Job) -> None:
        with self.wakeup:
            self.jobs.append(job)
            self.wakeup.notify()

    def _next(self) -> Job | None:
        with self.wakeup:
            if not self.jobs:
                self.wakeup.wait(IDLE_WAIT)
            return self.jobs.popleft() if self.jobs else None

    def _run(self) -> None:
        stop = self.outbound.stop_event
        while not stop.is_set():
            job = self._next()
            if job is None:
                continue
            try:
                self._wait_ready()
                self.outbound.perform(self, job)
            except Stopping:
                return
            except Exception as exc:  # a bug must not kill the lane: the reply stays
                self._crashed(exc)
            finally:
                if isinstance(job, Delivery):  # the next scan may hand it over again
                    self.outbound.finish(job.path)

    def _wait_ready(self) -> None:
        while not self.outbound.ready():
            if self.outbound.stop_event.wait(0.1):
                raise Stopping

    def _crashed(self, exc: Exception) -> None:
        event(
            "slack.reply.error",
            f"slack profile {self.outbound.name}: posting in {self.channel} failed: "
            f"{type(exc).__name__}: {self.outbound.api.redact(str(exc))}",
            worker=WORKER,
            level=logging.ERROR,
            profile=self.outbound.name,
            slack_channel=self.channel,
        )
        if self.outbound.stop_event.wait(POST_BACKOFF):
            raise Stopping from None

    def call(self, method: str, **params: Any) -> int:
        """One Web API call, retried through rate limits and transient errors."""
        return self.retrying(method, lambda: self.outbound.api.call(method, **params))

    def retrying(self, method: str, attempt_once: Callable[[], Any]) -> int:
        """Run one call, retried through rate limits and transient errors.

        Returns the number of attempts; raises ApiFailure for auth and permanent errors,
        Stopping when the profile stops meanwhile.
        """
        backoff = Backoff(POST_BACKOFF, POST_BACKOFF_MAX)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pace(method)
                attempt_once()
                return attempt
            except ApiFailure as failure:
                if failure.kind == RATELIMITED:
                    delay = failure.retry_after
                    self._ratelimited(method, delay)
                elif failure.kind == TRANSIENT:
                    delay = backoff.next()
                    self._retrying(method, failure, attempt, delay)
                else:
                    raise
            if self.outbound.stop_event.wait(delay):
                raise Stopping

    def _pace(self, method: str) -> None:
        """At most one post per POST_INTERVAL in this channel (other calls are not paced)."""
        if method not in POSTS:
            return
        delay = self.next_post - time.monotonic()
        if delay > 0 and self.outbound.stop_event.wait(delay):
            raise Stopping
        self.next_post = time.monotonic() + POST_INTERVAL

    def _ratelimited(self, method: str, delay: float) -> None:
        event(
            "slack.ratelimited",
            f"slack profile {self.outbound.name}: {method} in {self.channel} rate limited, "
            f"retrying in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.outbound.name,
            slack_channel=self.channel,
            retry_after_s=delay,
        )

    def _retrying(self, method: str, failure: ApiFailure, attempt: int, delay: float) -> None:
        event(
            "slack.reply.retry",
            f"slack profile {self.outbound.name}: {method} in {self.channel} failed "
            f"({failure.error}); retry in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.outbound.name,
            slack_channel=self.channel,
            error=failure.error,
            attempt=attempt,
        )


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def move_to_failed(queue_dir: Path, path: Path, reason: str, reply: Any = None) -> None:
    """The reply, untouched, into failed/, with `<name>.reason` saying why (as the queue does)."""
    failed = queue_dir / "failed"
    failed.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"reason": reason, "failedAt": iso_utc(), "file": path.name}
    if isinstance(reply, dict):
        info.update(channel=reply.get("channel"), messageId=reply.get("messageId"))
    atomic_write_json(failed / f"{path.name}.reason", info)
    try:
        os.replace(path, failed / path.name)
    except FileNotFoundError:
        return
    fsync_dir(failed)
    fsync_dir(path.parent)
    event(
        "slack.reply.failed_file",
        f"reply {path.name} moved to failed/: {reason}",
        worker=WORKER,
        level=logging.ERROR,
        file=path.name,
        reason=reason,
    )
