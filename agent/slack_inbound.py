"""Inbound: a Slack message -> at most one queue message (see docs/slack.md, Inbound).

Inbound decides whether a message is for the bot (a DM, a channel message that mentions
it, a reply in a thread it follows for that sender), asks the SenderPolicy whether its
sender may run the agent, turns it into a queue message and enqueues it through the
cursor protocol (slack_cursors), which makes it exactly-once per channel. Live events and
the backfill both come through accept(). Invariants: a message from a bot (this one
included) never becomes a queue message; a message not for the bot, or denied, only
moves the cursor.
"""

import logging
from dataclasses import dataclass
from typing import Any

from agent.config import SlackProfileConfig
from agent.log import event
from agent.queue import Queue
from agent.slack_api import WORKER, ApiFailure, SlackApi
from agent.slack_cursors import Cursors
from agent.slack_files import SharedFiles
from agent.slack_jobs import Notice, Reaction, Route
from agent.slack_outbound import Outbound
from agent.slack_policy import SenderPolicy
from agent.slack_store import ProfileStore, safe_name
from agent.slack_text import from_slack

WANTED_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})


@dataclass(frozen=True)
class SlackMessage:
    """The parts of a Slack message event the worker uses."""

    channel: str
    ts: str
    thread: str  # the thread's ts; the message's own ts when it starts one
    user: str
    text: str
    channel_type: str | None
    subtype: str | None
    from_bot: bool
    files: tuple[dict[str, Any], ...] = ()

    @classmethod
    def parse(cls, channel: str, body: dict[str, Any], channel_type: str | None) -> "SlackMessage":
        ts = str(body.get("ts") or "")
        return cls(
            channel=channel,
            ts=ts,
            thread=str(body.get("thread_ts") or ts),
            user=str(body.get("user") or ""),
            text=str(body.get("text") or ""),
            channel_type=channel_type or body.get("channel_type"),
            subtype=body.get("subtype"),
            from_bot=bool(body.get("bot_id")) or body.get("subtype") == "bot_message",
            files=tuple(f for f in body.get("files") or () if isinstance(f, dict)),
        )

    @property
    def direct(self) -> bool:
        return self.channel_type == "im" or self.channel.startswith("D")

    @property
    def in_thread(self) -> bool:
        return self.thread != self.ts


def message_id(profile: str, channel: str, ts: str) -> str:
    """The queue messageId of a Slack message: unique across profiles and channels.

    Replies and routes are keyed by it. Messages enqueued before this scheme carry the bare
    ts; their routes are stored under the ts and are still found by it.
    """
    return f"{profile}.{channel}.{ts}"


def conversation_id(channel: str, thread: str) -> str:
    """The queue conversationId of a Slack thread: `<channel>.<thread ts>`.

    A thread ts alone is not unique across channels; a conversation (its order, and an
    agent session resumed for it) must never span two channels.
    """
    return f"{channel}.{thread}"


class UserNames:
    """Display names by user id (users.info), cached; the id when the lookup fails."""

    def __init__(self, api: SlackApi):
        self.api = api
        self._names: dict[str, str] = {}

    def name(self, user: str) -> str:
        if user not in self._names:
            name = user
            try:
                info = self.api.call("users.info", read=True, user=user).get("user") or {}
                profile = info.get("profile") or {}
                name = profile.get("display_name") or info.get("real_name") or info.get("name")
            except ApiFailure:
                pass  # the id is a fine sender name when the lookup fails
            self._names[user] = name or user
        return self._names[user]


class Inbound:
    def __init__(
        self,
        name: str,
        profile: SlackProfileConfig,
        api: SlackApi,
        store: ProfileStore,
        queue: Queue,
        outbound: Outbound,
        files: SharedFiles,
        cursors: Cursors | None = None,
    ):
        self.name = name
        self.files = files
        self.outbound = outbound
        self.policy = SenderPolicy(name, profile)
        self.profile = profile
        self.api = api
        self.store = store
        self.cursors = cursors if cursors is not None else Cursors(store, name)
        self.queue = queue
        self.users = UserNames(api)
        self.enqueued = 0

    @property
    def bot_user(self) -> str | None:
        return self.api.identity.user_id

    def accept(
        self, channel: str, body: dict[str, Any], channel_type: str | None, source: str
    ) -> bool:
        """Enqueue one Slack message if it is for the bot, allowed and new; True when enqueued."""
        message = SlackMessage.parse(channel, body, channel_type)
        if not self.admit(message):
            return False
        self.react_received(message)
        return self.enqueue(message, source)

    def admit(self, message: SlackMessage) -> bool:
        """Local checks only (no Web API call): new, for the bot, from an allowed sender."""
        if not message.ts or self.cursors.seen(message.channel, message.ts):
            return False
        if not self._for_the_bot(message):
            self.cursors.skip(message.channel, message.ts)  # not for us: never fetched again
            return False
        denial = self.policy.denial(message.user, message.direct)
        if denial is not None:
            self.cursors.skip(message.channel, message.ts)
            self._deny(message, denial)
            return False
        return True

    def react_received(self, message: SlackMessage) -> None:
        """The first sign of life: the ack reaction, added by the channel's lane."""
        emoji = self.profile.ack_reaction
        if emoji:
            self.outbound.react(Reaction(message.channel, message.ts, add=emoji))

    def enqueue(self, message: SlackMessage, source: str) -> bool:
        """Into queue/incoming/ through the cursor protocol; False when already there."""
        channel = message.channel
        item = self._queue_message(message)  # users.info: may be slow
        file_name = f"slack_{safe_name(self.name)}_{safe_name(channel)}_{safe_name(message.ts)}"

        def enqueue() -> None:
            self.store.write_route(
                item["messageId"],
                channel,
                message.thread,
                message_ts=message.ts,
            )
            self.queue.enqueue(item, name=f"{file_name}.json")  # staged in tmp/, renamed in

        follower = message.user if message.direct or self._mentions(message) else None
        if not self.cursors.settle(channel, message.ts, message.thread, enqueue, follower):
            return False  # enqueued by another path meanwhile
        self.outbound.expect(
            Route(item["messageId"], channel, message.thread, message_ts=message.ts)
        )
        self.enqueued += 1
        event(
            "slack.message.enqueued",
            f"slack profile {self.name}: message {message.ts} from {channel} enqueued ({source})",
            worker=WORKER,
            profile=self.name,
            message_id=item["messageId"],
            slack_channel=channel,
            source=source,
        )
        return True

    def _for_the_bot(self, message: SlackMessage) -> bool:
        if message.subtype not in WANTED_SUBTYPES:
            return False  # edits, deletions, joins, bot_message...
        if message.from_bot or not message.user or message.user == self.bot_user:
            return False
        if message.direct:
            return True
        if self.profile.channels and message.channel not in self.profile.channels:
            return False
        if self._mentions(message):
            return True
        return message.in_thread and self.cursors.follows(
            message.channel, message.thread, message.user, self.policy.follow_all
        )

    def _mentions(self, message: SlackMessage) -> bool:
        return bool(self.bot_user) and f"<@{self.bot_user}>" in message.text

    def _deny(self, message: SlackMessage, reason: str) -> None:
        text = self.policy.deny(message.user, message.channel, reason)
        if text:
            thread = None if message.direct and not message.in_thread else message.thread
            self.outbound.notice(Notice(message.channel, thread, text, "deny_notice"))

    def _queue_message(self, message: SlackMessage) -> dict[str, Any]:
        sender = self.users.name(message.user)
        text = from_slack(message.text, self.bot_user, self.users.name)
        item: dict[str, Any] = {
            "channel": "slack",
            "channelProfileId": self.name,
            "conversationId": conversation_id(message.channel, message.thread),
            "messageId": message_id(self.name, message.channel, message.ts),
            "message": text,
            "sender": sender,
            "senderId": message.user,
            "timestamp": int(float(message.ts) * 1000),
        }
        if self.profile.agent:
            item["agent"] = self.profile.agent
        if message.files:
            self._attach(item, message)
        return item

    def _attach(self, item: dict[str, Any], message: SlackMessage) -> None:
        """Download the shared files; their paths in `files`, a preamble before the text."""
        if self.profile.max_file_bytes <= 0:
            return
        downloads = self.files.download(item["messageId"], list(message.files))
        if downloads.paths:
            item["files"] = downloads.paths
        preamble = downloads.preamble()
        if preamble:
            item["message"] = f"{preamble}\n\n{item['message']}".rstrip()

    def error(self, exc: Exception) -> None:
        """An event that could not be enqueued (logged redacted; Slack or the inbox retries)."""
        event(
            "slack.inbound.error",
            f"slack profile {self.name}: could not enqueue an event: "
            f"{type(exc).__name__}: {self.api.redact(str(exc))}",
            worker=WORKER,
            level=logging.ERROR,
            profile=self.name,
        )
