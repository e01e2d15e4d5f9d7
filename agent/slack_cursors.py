"""The cursor protocol: how a Slack message is enqueued exactly once and never missed.

Per profile and channel, slack_store.ChannelCursor persists the newest ts seen, the ts
already enqueued and the threads the bot follows. Every step of the protocol is here:

- `settle(channel, ts, thread, enqueue)`: under the store lock, a ts already recorded is a
  duplicate (False); otherwise `enqueue()` runs and only then is the ts recorded, so a
  crash in between costs a duplicate, never a loss.
- `skip(channel, ts)`: a message seen and not for the bot moves the cursor past it.
- `pin(channels)` before the socket opens: a pinned cursor does not move (moves are held),
  so a crash in the middle of a backfill loses nothing; `unpin(channel)` once that
  channel's backfill succeeded lets it pass what arrived meanwhile.

Cursors keeps them in the host's files; agent.pg.slackstore.PgCursors (same methods) in
the shared database. FileSlack hands out the files' pair for each profile, as
agent.pg.slackstore.PgSlack does the database's.
"""

import logging
from collections.abc import Callable
from pathlib import Path

from agent.log import event
from agent.slack_api import WORKER
from agent.slack_store import ProfileStore


class Cursors:
    def __init__(self, store: ProfileStore, profile: str):
        self.store = store
        self.profile = profile

    def seen(self, channel: str, ts: str) -> bool:
        """Already enqueued (a redelivery, a backfill overlapping live events)."""
        if not self._already(channel, ts):
            return False
        event(
            "slack.duplicate",
            f"slack profile {self.profile}: {channel}/{ts} already enqueued",
            worker=WORKER,
            level=logging.DEBUG,
            profile=self.profile,
            message_id=ts,
        )
        return True

    def _already(self, channel: str, ts: str) -> bool:
        with self.store.lock:
            return self.store.channel(channel).already_seen(ts)

    def skip(self, channel: str, ts: str) -> None:
        with self.store.lock:
            self.store.channel(channel).advance(ts)

    def settle(
        self,
        channel: str,
        ts: str,
        thread: str,
        enqueue: Callable[[], None],
        follower: str | None = None,
    ) -> bool:
        """Enqueue once: False when another path recorded this ts first."""
        with self.store.lock:
            cursor = self.store.channel(channel)
            if cursor.already_seen(ts):
                return False
            enqueue()
            cursor.record(ts, thread, follower)
            return True

    def threads(self, channel: str) -> list[str]:
        with self.store.lock:
            return list(self.store.channel(channel).threads)

    def follows(self, channel: str, thread: str, user: str, everyone: bool) -> bool:
        """The bot follows this thread for this user: everyone's replies, or its mentioners'.

        A thread recorded before followers were kept has none: it is followed for everyone.
        """
        with self.store.lock:
            cursor = self.store.channel(channel)
            if thread not in cursor.threads:
                return False
            followers = cursor.followers.get(thread)
            return everyone or followers is None or user in followers

    def pin(self, channels: list[str]) -> dict[str, str]:
        """Pin the channels that have a cursor; returns their cursors (the backfill plan)."""
        return self.store.pin(channels)

    def unpin(self, channel: str) -> None:
        self.store.unpin(channel)

    def known_channels(self) -> list[str]:
        return self.store.known_channels()


class FileSlack:
    """The Slack worker's memory in the host's files (state_dir/slack/): the default."""

    def profile(self, state_dir: Path, name: str) -> tuple[ProfileStore, Cursors]:
        store = ProfileStore(state_dir, name)
        return store, Cursors(store, name)

    def close(self) -> None:
        pass
