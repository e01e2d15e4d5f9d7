"""Backfill: what came while the profile was away, from channel history (docs/slack.md).

On every (re)connect the cursors are pinned before the WebSocket opens (the plan), then
each channel's conversations.history since its cursor, and conversations.replies for the
bot's most recently active threads, go through Inbound.accept like live events. A channel
whose backfill succeeded is unpinned; one that failed stays pinned (its cursor does not
move) and is tried again every RETRY seconds; a rate-limited page waits Retry-After. An
auth failure stops the profile. Only the configured `channels` are backfilled (all
channels the bot has seen when none are configured; DMs only with `allow_dm`). A channel
is backfilled during the store's backfill turn: with hosts sharing the database, one host
at a time; a host that finds the turn taken leaves the channel pinned and retries it.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.log import event
from agent.slack_api import AUTH, RATELIMITED, TRANSIENT, WORKER, ApiFailure, SlackApi
from agent.slack_inbound import Inbound
from agent.slack_store import ts_key

HISTORY_PAGES = 20  # at most this many pages of 200 messages per channel and backfill
THREAD_BACKFILL = 20  # threads per channel whose missed replies a backfill fetches
THREAD_AGE = 7 * 86400  # ... if they started at most this long before the cursor
RETRY = 30.0  # a channel whose backfill failed is tried again after this
RATELIMIT_TRIES = 5  # a page rate limited this often fails the channel's backfill


class Backfill:
    def __init__(
        self,
        name: str,
        api: SlackApi,
        inbound: Inbound,
        channels: Callable[[], list[str]],
        wait: Callable[[float], bool],
    ):
        self.name = name
        self.wait = wait  # sleeps; True when the profile is stopping
        self.api = api
        self.inbound = inbound
        self.cursors = inbound.cursors
        self.channels = channels  # which channels a backfill covers
        self.debt: set[str] = set()  # channels whose backfill failed: retried
        self.due = 0.0

    def plan(self) -> dict[str, str]:
        """Pin every channel to backfill; call before the socket opens."""
        return self.cursors.pin(self.channels())

    def retry_plan(self) -> dict[str, str] | None:
        """The plan for the channels whose backfill failed, when it is time to retry them."""
        if not self.debt or time.monotonic() < self.due:
            return None
        return self.cursors.pin(sorted(self.debt))

    def run(self, plan: dict[str, str]) -> None:
        """Enqueue what is newer than each pinned cursor; raises SlackProblem on auth errors."""
        self.debt = set(plan)
        for channel, cursor in plan.items():
            with self.inbound.store.backfill_turn(channel) as mine:
                if not mine:  # another host backfills it now: its debt stays, retried
                    self._busy(channel)
                    continue
                try:
                    count = self._channel(channel, cursor)
                except ApiFailure as failure:
                    if failure.kind == AUTH:
                        raise failure.problem() from None
                    self._failed(channel, failure)
                    continue
            self.cursors.unpin(channel)
            self.debt.discard(channel)
            if count:
                event(
                    "slack.backfill",
                    f"slack profile {self.name}: backfilled {count} message(s) from {channel}",
                    worker=WORKER,
                    profile=self.name,
                    slack_channel=channel,
                    count=count,
                )
        self.due = time.monotonic() + RETRY

    def _channel(self, channel: str, cursor: str) -> int:
        count = self._accept_all(channel, self._pages("conversations.history", cursor, channel))
        # Replies in the bot's threads are not in the channel history: ask each recent
        # thread (which now includes threads the backfill just started).
        for thread in self._recent_threads(channel, cursor):
            count += self._accept_all(channel, self._replies(channel, thread, cursor))
        return count

    def _busy(self, channel: str) -> None:
        event(
            "slack.backfill.busy",
            f"slack profile {self.name}: another host is backfilling {channel}; "
            f"trying again in {RETRY:g}s",
            worker=WORKER,
            profile=self.name,
            slack_channel=channel,
        )

    def _failed(self, channel: str, failure: ApiFailure) -> None:
        event(
            "slack.backfill.failed",
            f"slack profile {self.name}: backfill of {channel} failed: {failure}",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.name,
            slack_channel=channel,
            error=str(failure),
        )

    def _accept_all(self, channel: str, messages: list[dict[str, Any]]) -> int:
        ordered = sorted(messages, key=lambda m: ts_key(m.get("ts", "")))
        return sum(1 for m in ordered if self.inbound.accept(channel, m, None, source="backfill"))

    def _recent_threads(self, channel: str, cursor: str) -> list[str]:
        """The bot's most recently active threads started at most THREAD_AGE before cursor."""
        horizon = ts_key(cursor)[0] - THREAD_AGE
        threads = self.cursors.threads(channel)
        return [t for t in threads[-THREAD_BACKFILL:] if ts_key(t)[0] >= horizon]

    def _replies(self, channel: str, thread: str, oldest: str) -> list[dict[str, Any]]:
        try:
            found = self._pages("conversations.replies", oldest, channel, ts=thread)
        except ApiFailure as failure:
            if failure.error == "thread_not_found":
                return []  # deleted meanwhile
            raise
        return [m for m in found if m.get("ts") != thread]

    def _pages(self, method: str, oldest: str, channel: str, **params: Any) -> list[dict]:
        """Every message newer than `oldest` from a paginated history-like method."""
        messages: list[dict[str, Any]] = []
        cursor = None
        for _ in range(HISTORY_PAGES):
            kwargs: dict[str, Any] = {**params, "channel": channel, "oldest": oldest, "limit": 200}
            if cursor:
                kwargs["cursor"] = cursor
            page = self._page(method, kwargs)
            messages.extend(page.get("messages") or [])
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                break
        return [m for m in messages if ts_key(m.get("ts", "")) > ts_key(oldest)]

    def _page(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One page; a 429 waits Retry-After and asks again (RATELIMIT_TRIES times at most)."""
        for _ in range(RATELIMIT_TRIES - 1):
            try:
                return self.api.call(method, read=True, **params)
            except ApiFailure as failure:
                if failure.kind != RATELIMITED:
                    raise
                self._ratelimited(method, params["channel"], failure.retry_after)
                if self.wait(failure.retry_after):
                    raise ApiFailure(method, TRANSIENT, "stopping") from None
        return self.api.call(method, read=True, **params)

    def _ratelimited(self, method: str, channel: str, delay: float) -> None:
        event(
            "slack.ratelimited",
            f"slack profile {self.name}: {method} for {channel} rate limited, "
            f"retrying in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.name,
            slack_channel=channel,
            retry_after_s=delay,
        )
