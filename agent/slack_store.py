"""What the Slack worker remembers on disk, per profile, so that nothing is missed or doubled.

    state_dir/slack/<profile>/channels/<channel>.json   the cursor of one channel: the newest
        message ts seen, the recent ts already enqueued (duplicate deliveries are dropped
        against it), the threads the bot takes part in (whose replies it listens to) and
        each thread's followers (the users who mentioned the bot in it)
    state_dir/slack/<profile>/routes/<id>.json           where the reply to message <id> goes
        (the Slack channel and thread), removed once the reply is posted; <id> is the
        queue messageId (<profile>.<channel>.<ts>; the bare ts before that scheme)
    state_dir/slack/<profile>/inbox/<channel>_<ts>.json  an event acknowledged to Slack and
        not enqueued yet (the ack comes before slow calls); replayed at the next connect

Every write is atomic (temp file, fsync, rename, fsync of the directory) and 0640 at
most; every read refuses a symlink (O_NOFOLLOW) and anything but a small regular file, so
an entry planted here can neither redirect a write nor feed a read from outside.

ProfileStore is also the interface of the Slack worker's memory: with [queue] backend =
"postgres", agent.pg.slackstore.PgProfileStore keeps the routes, reply claims and backfill
turns in the shared database instead (the inbox stays here). One host alone needs no
claim: here claim_post always says POST_MINE and every backfill turn is ours.
"""

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_json

FILE_MODE = 0o640
MAX_STORE_BYTES = 4 * 1024 * 1024
SEEN_LIMIT = 1000  # message ts remembered per channel for duplicate detection
THREAD_LIMIT = 200  # threads per channel whose replies the bot listens to
ROUTE_MAX_AGE = 14 * 86400  # routes of messages that never got a reply are pruned after this

# claim_post: this host posts the reply; another host posted it; another host is posting it
POST_MINE, POST_POSTED, POST_BUSY = "mine", "posted", "busy"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """A string usable as (part of) a file name."""
    return _SAFE.sub("_", text) or "_"


def read_json(path: Path) -> Any:
    """A store file's JSON; OSError when it is missing, a symlink or not a regular file,
    ValueError when it is not JSON."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_mode & 0o170000 != 0o100000:
            raise OSError(f"{path}: not a regular file")
        data = os.read(fd, MAX_STORE_BYTES)
    finally:
        os.close(fd)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None


def write_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value, mode=FILE_MODE)


def ts_key(ts: str) -> tuple[int, int]:
    """Slack ts '1700000000.000100' as a sortable number pair."""
    whole, _, frac = str(ts).partition(".")
    try:
        return int(whole), int(frac.ljust(6, "0")[:6] or 0)
    except ValueError:
        return 0, 0


class ChannelCursor:
    """The persisted state of one profile's channel."""

    def __init__(self, path: Path):
        self.path = path
        data: Any = {}
        try:
            data = read_json(path)
        except (OSError, ValueError):
            data = {}  # missing or unreadable: it only costs a wider backfill
        if not isinstance(data, dict):
            data = {}
        self.cursor: str | None = _str_or_none(data.get("cursor"))
        self.seen: list[str] = _strings(data.get("seen"))
        self.threads: list[str] = _strings(data.get("threads"))
        followers = data.get("followers")
        self.followers: dict[str, list[str]] = {
            thread: _strings(users)
            for thread, users in (followers.items() if isinstance(followers, dict) else ())
            if isinstance(thread, str)
        }
        self._seen_set = set(self.seen)
        # While pinned (a backfill from this cursor is due or running) the cursor stays put:
        # moving past a message not fetched yet could lose it. `held` is where it may go.
        self.pinned = False
        self.held: str | None = None

    def already_seen(self, ts: str) -> bool:
        if ts in self._seen_set:
            return True
        # Older than everything we still remember, with the memory full: an old redelivery.
        return len(self.seen) >= SEEN_LIMIT and ts_key(ts) <= ts_key(self.seen[0])

    def record(self, ts: str, thread: str, follower: str | None = None) -> None:
        """Remember an enqueued message, the thread it belongs to and who follows it."""
        self.seen.append(ts)
        self.seen.sort(key=ts_key)
        del self.seen[:-SEEN_LIMIT]
        self._seen_set = set(self.seen)
        self._move(ts)
        if thread in self.threads:
            self.threads.remove(thread)
        self.threads.append(thread)
        del self.threads[:-THREAD_LIMIT]
        if follower is not None:
            users = self.followers.setdefault(thread, [])
            if follower not in users:
                users.append(follower)
        self.followers = {t: u for t, u in self.followers.items() if t in self.threads}
        self.save()

    def advance(self, ts: str) -> None:
        """Move the cursor past a message that was seen but not wanted (not for the bot)."""
        if self._move(ts):
            self.save()

    def unpin(self) -> None:
        """The backfill succeeded: the cursor may now pass what arrived meanwhile."""
        held, self.held, self.pinned = self.held, None, False
        if held is not None:
            self.advance(held)

    def _move(self, ts: str) -> bool:
        if self.pinned:
            if self.held is None or ts_key(ts) > ts_key(self.held):
                self.held = ts
            return False
        if self.cursor is None or ts_key(ts) > ts_key(self.cursor):
            self.cursor = ts
            return True
        return False

    def save(self) -> None:
        write_json(
            self.path,
            {
                "cursor": self.cursor,
                "seen": self.seen,
                "threads": self.threads,
                "followers": self.followers,
            },
        )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


class ProfileStore:
    """One profile's cursors and reply routes; thread-safe."""

    def __init__(self, state_dir: Path, profile: str):
        self.root = state_dir / "slack" / safe_name(profile)
        self.channels_dir = self.root / "channels"
        self.routes_dir = self.root / "routes"
        self.inbox_dir = self.root / "inbox"
        self.lock = threading.RLock()
        self._cursors: dict[str, ChannelCursor] = {}

    def prepare(self) -> None:
        for directory in (self.channels_dir, self.routes_dir, self.inbox_dir):
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.prune_routes()

    def channel(self, channel: str) -> ChannelCursor:
        with self.lock:
            if channel not in self._cursors:
                path = self.channels_dir / f"{safe_name(channel)}.json"
                self._cursors[channel] = ChannelCursor(path)
            return self._cursors[channel]

    def known_channels(self) -> list[str]:
        with self.lock:
            names = {p.stem for p in self.channels_dir.glob("*.json")}
            return sorted(names | set(self._cursors))

    def pin(self, channels: list[str]) -> dict[str, str]:
        """Pin the channels that have a cursor and return those cursors: the backfill plan."""
        with self.lock:
            plan = {}
            for name in channels:
                cursor = self.channel(name)
                if cursor.cursor is not None:  # never seen anything: nothing can be missed
                    cursor.pinned = True
                    plan[name] = cursor.cursor
            return plan

    def unpin(self, channel: str) -> None:
        with self.lock:
            self.channel(channel).unpin()

    # ---- reply routes

    def write_route(self, ts: str, channel: str, thread_ts: str, **extra: Any) -> None:
        write_json(
            self.routes_dir / f"{safe_name(ts)}.json",
            {"channel": channel, "thread_ts": thread_ts, "created": time.time(), **extra},
        )

    def update_route(self, ts: str, **fields: Any) -> None:
        """Add fields to a route (e.g. how many parts of a long reply are posted)."""
        route = self.route(ts)
        if route is not None:
            write_json(self.routes_dir / f"{safe_name(ts)}.json", {**route, **fields})

    def route(self, ts: str) -> dict[str, Any] | None:
        try:
            route = read_json(self.routes_dir / f"{safe_name(ts)}.json")
        except (OSError, ValueError):
            return None
        if not isinstance(route, dict):
            return None
        wanted = (route.get("channel"), route.get("thread_ts"))
        return route if all(isinstance(v, str) for v in wanted) else None

    def drop_route(self, ts: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.routes_dir / f"{safe_name(ts)}.json")

    def prune_routes(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for path in self.routes_dir.glob("*.json"):
            try:
                if now - path.stat().st_mtime > ROUTE_MAX_AGE:
                    path.unlink()
            except OSError:
                pass

    # ---- one host posts a reply, one host backfills a channel (trivial with one host)

    def claim_post(self, message_id: str) -> str:
        """Before the first post of a reply: POST_MINE, POST_POSTED or POST_BUSY."""
        return POST_MINE

    def record_post(self, message_id: str, slack_ts: str | None) -> None:
        """After the reply is posted (its last part's ts)."""

    def was_posted(self, message_id: str) -> bool:
        """A reply with no route: was it posted (by another host, its route dropped)?"""
        return False

    @contextlib.contextmanager
    def backfill_turn(self, channel: str) -> Iterator[bool]:
        """True while this host may backfill the channel."""
        yield True

    # ---- inbox: acknowledged events not enqueued yet (they hold message text: 0640)

    def inbox_put(self, channel: str, ts: str, item: dict[str, Any]) -> None:
        write_json(self.inbox_dir / f"{safe_name(channel)}_{safe_name(ts)}.json", item)

    def inbox_drop(self, channel: str, ts: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.inbox_dir / f"{safe_name(channel)}_{safe_name(ts)}.json")

    def inbox(self) -> list[dict[str, Any]]:
        items = []
        for path in sorted(self.inbox_dir.glob("*.json")):
            try:
                item = read_json(path)
            except (OSError, ValueError):
                continue
            if isinstance(item, dict):
                items.append(item)
        return items
