"""What the Slack worker's lanes carry: typed jobs for one Slack channel.

A Route says where the reply to one message goes (from slack_store's route file); a
Delivery is a reply (by its name in outgoing/) with its route; a Notice is a short text
of the worker's own; a Reaction swaps the bot's emoji on a message; a Failure tells a
thread that its message finally failed; a Progress posts "working on it" while a run
lasts. Records only: what each does is in slack_outbound.
"""

from dataclasses import dataclass
from typing import Any


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
    progress_ts: str | None = None  # the "working on it" post the reply replaces

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
            found.get("progress_ts"),
        )


@dataclass(frozen=True)
class Delivery:
    """One reply (its name in queue/outgoing/) and its route, waiting in a lane."""

    name: str
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


@dataclass(frozen=True)
class Progress:
    """A run outlasted progress_after: post "working on it" (the reply replaces it)."""

    route: Route


Job = Delivery | Notice | Reaction | Failure | Progress
