"""Outbound: replies in queue/outgoing/ -> chat.postMessage in the original thread.

The worker hands each reply (its name in outgoing/) to Outbound.offer(); replies are
read, removed and moved to failed/ only through agent/queue.py. Its route (the Slack channel and
thread, written by Inbound) picks the channel's Lane (slack_lane: one thread per Slack
channel, its posts paced, its retries its own). Here is what each job does: an auth error
stops the profile (the reply stays and is offered again after the reconnect), any other
error moves the reply to queue/failed/ with a .reason file. A long reply is posted as
ordered parts (slack_text.split), each recorded in the route, so a restart goes on where
it stopped. A posted reply is removed from outgoing/ and its route dropped. A reply is
claimed in the store before its first post (one host posts it, with hosts sharing the
database) and recorded as posted after its last part.
Invariant: a reply is in at most one lane at a time (`pending`).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.log import event
from agent.queue import InvalidMessage, MachineTrouble, Queue
from agent.slack_api import AUTH, WORKER, ApiFailure, SlackApi
from agent.slack_attach import Attachments, extract
from agent.slack_feedback import Reactions, failure_notice
from agent.slack_files import SharedFiles
from agent.slack_jobs import Delivery, Failure, Job, Notice, Progress, Reaction, Route
from agent.slack_lane import Lane
from agent.slack_store import POST_BUSY, POST_MINE, POST_POSTED, ProfileStore
from agent.slack_text import split, to_slack

WORKING = "_Working on it…_"
RECHECK_SECONDS = 5.0  # a reply another host is posting is looked at again after this


@dataclass(frozen=True)
class ReplySettings:
    """How a profile's replies behave, from [slack.profiles.NAME] and the agents."""

    reactions: Reactions
    progress_after: float  # seconds; 0: no "working on it" post
    workdir_of: Callable[[str], Path | None]  # an agent's workdir: where ATTACH may point


class Outbound:
    def __init__(
        self,
        name: str,
        api: SlackApi,
        store: ProfileStore,
        queue: Queue,
        stop: threading.Event,
        ready: Callable[[], bool],
        on_problem: Callable[[ApiFailure], None],
        files: SharedFiles,
        settings: ReplySettings,
    ):
        self.name = name
        self.progress_after = settings.progress_after
        self.waiting: dict[str, tuple[float, Route]] = {}  # enqueued, not answered yet
        self.files = files
        self.max_file_bytes = files.max_bytes
        self.workdir_of = settings.workdir_of
        self.reactions = settings.reactions
        self.api = api
        self.store = store
        self.queue = queue  # replies are read, removed and failed only through it
        self.stop_event = stop
        self.ready = ready  # the profile is connected: lanes may post
        self.on_problem = on_problem  # an auth failure: the profile must reconnect
        self.pending: set[str] = set()  # outgoing file names handed over and not finished
        self.deferred: dict[str, float] = {}  # pending names another host is posting: until
        self.lock = threading.Lock()
        self.lanes: dict[str, Lane] = {}
        self.posted = 0

    def offer(self, name: str) -> None:
        """Post the reply outgoing/<name> (once: a name already handed over is ignored)."""
        with self.lock:
            if name in self.pending:
                return
            self.pending.add(name)
        delivery = self._delivery(name)
        if delivery is None:
            self.finish(name)
            return
        self._answered(delivery.route.message_id)
        self.submit(delivery.route.channel, delivery)

    def expect(self, route: Route) -> None:
        """A message was enqueued: no reply within progress_after, and the thread hears
        that the agent is working on it."""
        if self.progress_after > 0:
            with self.lock:
                self.waiting[route.message_id] = (time.monotonic() + self.progress_after, route)

    def tick(self) -> None:
        """From the profile's serve loop: a Progress job for each run that outlasted it;
        replies another host was posting are let go (the next scan offers them again)."""
        now = time.monotonic()
        with self.lock:
            due = [route for at, route in self.waiting.values() if at <= now]
            for route in due:
                del self.waiting[route.message_id]
            for name in [name for name, at in self.deferred.items() if at <= now]:
                del self.deferred[name]
                self.pending.discard(name)
        for route in due:
            self.submit(route.channel, Progress(route))

    def _answered(self, message_id: str) -> None:
        with self.lock:
            self.waiting.pop(message_id, None)

    def notice(self, notice: Notice) -> None:
        self.submit(notice.channel, notice)

    def react(self, reaction: Reaction) -> None:
        if reaction.add or reaction.remove:
            self.submit(reaction.channel, reaction)

    def failed_message(self, message_id: str, reason: str, attempts: int) -> None:
        """The queue gave up on a message: a notice and the failed reaction, once."""
        found = self.store.route(message_id)
        if found is None:
            return  # not ours, or long gone
        route = Route.of(message_id, found)
        self._answered(message_id)
        if not route.failure_noticed:
            self.submit(route.channel, Failure(route, reason, attempts))

    def finish(self, name: str) -> None:
        with self.lock:
            if name not in self.deferred:  # tick() lets a deferred one go when it is due
                self.pending.discard(name)

    def submit(self, channel: str, job: Job) -> None:
        """Into the channel's lane (started when the channel has none)."""
        with self.lock:
            if channel not in self.lanes:
                self.lanes[channel] = Lane(self, channel)
            self.lanes[channel].put(job)

    def retire(self, lane: Lane) -> bool:
        """An idle lane ends, unless a job came in meanwhile; True when it may end."""
        with self.lock, lane.wakeup:
            if lane.jobs:
                return False
            if self.lanes.get(lane.channel) is lane:
                del self.lanes[lane.channel]
            return True

    def join(self, timeout: float) -> None:
        for lane in list(self.lanes.values()):
            lane.thread.join(timeout)

    def _delivery(self, name: str) -> Delivery | None:
        """The reply and its route; None when it is gone, when the machine failed to read
        it (it stays: the next scan offers it again), or (after moving it to failed/)
        when it is not a reply or has no route."""
        try:
            reply = self.queue.read_reply(name)
        except (FileNotFoundError, MachineTrouble):
            return None
        except InvalidMessage as exc:
            move_to_failed(self.queue, name, f"unreadable reply: {exc}")
            return None
        message_id = str(reply.get("messageId") or "")
        found = self.store.route(message_id) if message_id else None
        if found is None and message_id and self.store.was_posted(message_id):
            self._posted_elsewhere(name, message_id)  # and its route dropped after
            return None
        if found is None:
            reason = f"no Slack route for message {message_id!r}"
            move_to_failed(self.queue, name, reason, reply)
            return None
        return Delivery(name, reply, Route.of(message_id, found))

    # ---- what a lane does with a job

    def perform(self, lane: "Lane", job: Job) -> None:
        if isinstance(job, Delivery):
            self.deliver(lane, job)
        elif isinstance(job, Failure):
            self._tell_failure(lane, job)
        elif isinstance(job, Progress):
            self._show_progress(lane, job)
        elif isinstance(job, Notice):
            self._post_notice(lane, job)
        else:
            self._swap_reaction(lane, job)

    def _current(self, route: Route) -> Route:
        """The route as it is now (a Progress job ahead in the lane may have changed it)."""
        found = self.store.route(route.message_id)
        return Route.of(route.message_id, found) if found is not None else route

    def _show_progress(self, lane: "Lane", progress: Progress) -> None:
        found = self.store.route(progress.route.message_id)
        if found is None:
            return  # answered meanwhile
        route = Route.of(progress.route.message_id, found)
        if route.progress_ts or route.failure_noticed or route.parts_posted:
            return
        params = {"channel": route.channel, "thread_ts": route.thread_ts, "text": WORKING}
        try:
            answer = lane.call("chat.postMessage", **params).answer
        except ApiFailure as failure:
            self._cosmetic_failed("progress", route.channel, failure)
            return
        if answer.get("ts"):
            self.store.update_route(route.message_id, progress_ts=str(answer["ts"]))

    def _replace_progress(self, lane: "Lane", route: Route, text: str) -> bool:
        """Put text in place of the "working on it" post; False when there is none (left)."""
        if not route.progress_ts:
            return False
        try:
            lane.call("chat.update", channel=route.channel, ts=route.progress_ts, text=text)
        except ApiFailure as failure:
            if failure.kind == AUTH:
                raise
            return False  # deleted meanwhile, say: post instead
        self.store.update_route(route.message_id, progress_ts=None)
        return True

    def _tell_failure(self, lane: "Lane", failure: Failure) -> None:
        route = self._current(failure.route)
        text = failure_notice(failure.reason, failure.attempts)
        if not self._replace_progress(lane, route, text):
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
        """Post a reply as ordered parts (each recorded), then upload what it attaches.

        First the reply is claimed (slack_store.claim_post): with hosts sharing the
        database, a reply another host posted is dropped here, one another host is
        posting now is offered again later."""
        claim = self.store.claim_post(delivery.route.message_id)
        if claim != POST_MINE:
            self._elsewhere(delivery, claim)
            return
        route = self._current(delivery.route)
        agent = str(delivery.reply.get("agent") or "")
        attach = extract(
            str(delivery.reply.get("message") or ""), self.workdir_of(agent), self.max_file_bytes
        )
        text = "\n\n".join(t for t in (attach.text, attach.note()) if t)
        parts = [] if attach.paths and not text else split(to_slack(text))
        try:
            attempts, last_ts = self._post_parts(lane, route, parts)
        except ApiFailure as failure:
            if failure.kind == AUTH:
                self.on_problem(failure)
            else:
                self._failed(delivery, failure.error)
            return
        if attach.paths and not route.attached and not self._upload(lane, route, attach):
            return  # auth failure: the reply stays, the rest comes after the reconnect
        self.store.record_post(route.message_id, last_ts)
        self.queue.remove_reply(delivery.name)
        self.store.drop_route(route.message_id)
        self.files.remove(route.message_id)  # the message is done: its files go
        self._swap(route, self.reactions.done)
        with self.lock:  # lanes post in parallel
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

    def _post_parts(self, lane: "Lane", route: Route, parts: list[str]) -> tuple[int, str | None]:
        """Each part in order; the first one replaces a "working on it" post if any.
        The attempts made and the ts of the last part posted."""
        attempts, last_ts = 0, None
        for number in range(route.parts_posted, len(parts)):
            if number == 0 and self._replace_progress(lane, route, parts[0]):
                attempts += 1
                last_ts = route.progress_ts
            else:
                done = lane.call(
                    "chat.postMessage",
                    channel=route.channel,
                    text=parts[number],
                    thread_ts=route.thread_ts,
                    link_names=False,
                    unfurl_links=False,
                )
                attempts += done.attempts
                last_ts = str(done.answer.get("ts") or "") or None
            if len(parts) > 1:
                self.store.update_route(route.message_id, parts_posted=number + 1)
        return attempts, last_ts

    def _elsewhere(self, delivery: Delivery, claim: str) -> None:
        """Another host posted this reply (ours is a copy: removed) or is posting it now
        (ours waits RECHECK_SECONDS, then is offered again: its claim may expire)."""
        message_id = delivery.route.message_id
        if claim == POST_POSTED:
            self._posted_elsewhere(delivery.name, message_id)
            self.finish(delivery.name)
            return
        with self.lock:
            self.deferred[delivery.name] = time.monotonic() + RECHECK_SECONDS
        self._elsewhere_event(message_id, claim)

    def _posted_elsewhere(self, name: str, message_id: str) -> None:
        """Our copy of a reply another host posted: removed, with its files."""
        self.queue.remove_reply(name)
        self.files.remove(message_id)
        self._elsewhere_event(message_id, POST_POSTED)

    def _elsewhere_event(self, message_id: str, claim: str) -> None:
        event(
            "slack.reply.elsewhere",
            f"slack profile {self.name}: reply to {message_id} "
            + (
                "posted already: this copy dropped"
                if claim == POST_POSTED
                else f"being posted by another host: looked at again in {RECHECK_SECONDS:g}s"
            ),
            worker=WORKER,
            level=logging.DEBUG if claim == POST_BUSY else logging.INFO,
            profile=self.name,
            message_id=message_id,
            claim=claim,
        )

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
        move_to_failed(self.queue, delivery.name, f"chat.postMessage: {error}", delivery.reply)
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


def move_to_failed(queue: Queue, name: str, reason: str, reply: Any = None) -> None:
    """The reply outgoing/<name>, untouched, into failed/ with its reason file (the queue's)."""
    if queue.fail_reply(name, reason, reply) is None:
        return  # already gone
    event(
        "slack.reply.failed_file",
        f"reply {name} moved to failed/: {reason}",
        worker=WORKER,
        level=logging.ERROR,
        file=name,
        reason=reason,
    )
