"""The on-disk message queue: its directories, its file format, and every move in it.

Layout under state_dir/queue/ (documented in docs/queue.md; other programs rely on it):
  tmp/         producers may stage a file here before renaming it into incoming/
  incoming/    one JSON message per file, renamed in atomically; claimed oldest first
  processing/  claimed messages; anything left here at start goes back to incoming/
  outgoing/    replies, named <channel>_<messageId>.json so a retry overwrites, never adds
  failed/      messages that can never succeed, each with a <name>.reason file

Every move is an atomic rename followed by an fsync of the directories it touched.
"Oldest" is the file's mtime (a rename keeps it), ties broken by name.
"""

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.clock import iso_utc
from agent.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir

DIRS = ("tmp", "incoming", "processing", "outgoing", "failed")
REQUIRED_TEXT = ("channel", "messageId", "message", "sender", "senderId")
OPTIONAL_TEXT = ("channelProfileId", "conversationId", "agent")
ATTEMPTS = "attempts"  # written by the queue itself: failed runs so far
LAST_ERROR = "lastError"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class InvalidMessage(Exception):
    """The file is not a valid message; it goes to failed/ with this reason."""


@dataclass
class Message:
    name: str  # file name in processing/
    data: dict[str, Any]

    @property
    def channel(self) -> str:
        return self.data["channel"]

    @property
    def message_id(self) -> str:
        return self.data["messageId"]

    @property
    def attempts(self) -> int:
        return self.data.get(ATTEMPTS, 0)

    @property
    def conversation(self) -> tuple[str, str | None, str | None]:
        return (self.channel, self.data.get("channelProfileId"), self.data.get("conversationId"))

    @property
    def reply_name(self) -> str:
        return reply_name(self.channel, self.message_id)


def reply_name(channel: str, message_id: str) -> str:
    """outgoing/<channel>_<messageId>.json, made safe (and still unique) as a file name."""
    return f"{quote(channel, safe='')}_{quote(message_id, safe='')}.json"


def validate(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(data).__name__}")
    for key in REQUIRED_TEXT:
        if key not in data:
            raise InvalidMessage(f"missing required field '{key}'")
        if not isinstance(data[key], str):
            raise InvalidMessage(f"field '{key}' must be a string")
    for key in ("channel", "messageId"):
        if not data[key]:
            raise InvalidMessage(f"field '{key}' must not be empty")
    if "timestamp" not in data:
        raise InvalidMessage("missing required field 'timestamp'")
    if isinstance(data["timestamp"], bool) or not isinstance(data["timestamp"], int | float):
        raise InvalidMessage("field 'timestamp' must be a number (ms since epoch)")
    for key in OPTIONAL_TEXT:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidMessage(f"field '{key}' must be a string")
    files = data.get("files")
    if files is not None and (
        not isinstance(files, list)
        or not all(isinstance(f, str) and os.path.isabs(f) for f in files)
    ):
        raise InvalidMessage("field 'files' must be an array of absolute paths")
    attempts = data.get(ATTEMPTS, 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidMessage(f"field '{ATTEMPTS}' must be a whole number >= 0")
    return data


def parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message file larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"malformed JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep for the parser
        raise InvalidMessage(f"unreadable JSON: {type(exc).__name__}: {exc}") from None
    return validate(data)


class Queue:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.processing = self.root / "processing"
        self.outgoing = self.root / "outgoing"
        self.failed = self.root / "failed"

    def ensure_dirs(self) -> None:
        for sub in DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- claiming

    def oldest_first(self, directory: Path) -> list[str]:
        """Message file names in a directory, oldest first (mtime, then name)."""
        found = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".json"):
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue
        found.sort()
        return [name for _, name in found]

    def claim_all(self, limit: int | None = None) -> list[str]:
        """Move incoming messages (at most limit) into processing/, oldest first."""
        claimed = []
        for name in self.oldest_first(self.incoming)[:limit]:
            target = _free_name(self.processing, name)
            try:
                os.rename(self.incoming / name, self.processing / target)
            except FileNotFoundError:
                continue
            claimed.append(target)
        if claimed:
            try:
                fsync_dir(self.processing)
                fsync_dir(self.incoming)
            except OSError:
                with contextlib.suppress(OSError):
                    self.unclaim(claimed)  # not durable: nobody may work on them yet
                raise
        return claimed

    def recover(self) -> list[str]:
        """At start: everything left in processing/ goes back to incoming/, order kept."""
        for sub in (self.processing, self.outgoing, self.failed):
            _remove_stale_temp_files(sub)  # a crash mid-write leaves them; nobody reads them
        return self.unclaim(self.oldest_first(self.processing))

    def unclaim(self, names: list[str]) -> list[str]:
        """Give claimed messages back to incoming/ (a rename keeps their place in the order)."""
        moved = []
        for name in names:
            target = _free_name(self.incoming, name)
            try:
                os.rename(self.processing / name, self.incoming / target)
            except FileNotFoundError:
                continue
            moved.append(target)
        if moved:
            fsync_dir(self.incoming)
            fsync_dir(self.processing)
        return moved

    def age(self, directory: Path, name: str) -> float | None:
        """Seconds since an entry was written (its mtime); None when it is gone."""
        try:
            return max(time.time() - os.stat(directory / name).st_mtime, 0.0)
        except OSError:
            return None

    def depth(self) -> int:
        return _count_json(self.incoming)

    def load(self, name: str) -> Message:
        """Read a claimed message; InvalidMessage if it is not one, OSError if it is gone."""
        raw = (self.processing / name).read_bytes()
        return Message(name, parse(raw))

    # ---- outcomes

    def write_reply(self, message: Message, reply: dict[str, Any]) -> Path:
        path = self.outgoing / message.reply_name
        atomic_write_json(path, reply)
        return path

    def done(self, name: str) -> None:
        """The reply is durable: forget the claimed message."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.processing / name)
        fsync_dir(self.processing)

    def fail(self, name: str, reason: str, message: Message | None = None) -> str:
        """Move a claimed file to failed/ with a reason file; returns its name there."""
        # a valid message is named like its reply, so a reprocessed one overwrites its entry
        target = message.reply_name if message is not None else _free_name(self.failed, name)
        info = {
            "reason": reason,
            "failedAt": iso_utc(),
            "file": name,
            ATTEMPTS: message.attempts if message else 0,
        }
        if message is not None:
            info.update(channel=message.channel, messageId=message.message_id)
        atomic_write_json(self.failed / f"{target}.reason", info)
        os.replace(self.processing / name, self.failed / target)
        fsync_dir(self.failed)
        fsync_dir(self.processing)
        return target

    def record_attempt(self, message: Message, error: str) -> None:
        """Count one more failed run in the file itself, keeping its place in the order."""
        message.data[ATTEMPTS] = message.attempts + 1
        message.data[LAST_ERROR] = error
        path = self.processing / message.name
        stat = os.stat(path)
        data = json.dumps(message.data, ensure_ascii=False, indent=2).encode() + b"\n"
        atomic_write_bytes(path, data, stat.st_mode & 0o777, (stat.st_atime_ns, stat.st_mtime_ns))

    # ---- producers

    def enqueue(self, data: dict[str, Any], name: str | None = None) -> Path:
        """Write a message the way every producer should: stage in tmp/, rename in."""
        validate(data)
        name = name or f"{time.time_ns()}_{quote(data['channel'], safe='')}_{uuid.uuid4().hex}"
        if not name.endswith(".json"):
            name += ".json"
        staged = self.tmp / f"{name}.{uuid.uuid4().hex[:8]}"
        atomic_write_json(staged, data)
        target = self.incoming / name
        os.rename(staged, target)
        fsync_dir(self.incoming)
        fsync_dir(self.tmp)
        return target


def new_message(
    channel: str,
    text: str,
    sender: str,
    sender_id: str,
    message_id: str | None = None,
    **optional: Any,
) -> dict[str, Any]:
    data = {
        "channel": channel,
        "messageId": message_id or f"{time.time_ns()}-{uuid.uuid4().hex[:8]}",
        "message": text,
        "sender": sender,
        "senderId": sender_id,
        "timestamp": int(time.time() * 1000),
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    return data


def make_reply(message: Message, text: str, agent: str) -> dict[str, Any]:
    data = message.data
    return {
        "channel": data["channel"],
        "channelProfileId": data.get("channelProfileId"),
        "conversationId": data.get("conversationId"),
        "messageId": data["messageId"],
        "sender": data["sender"],
        "senderId": data["senderId"],
        "message": text,
        "originalMessage": data["message"],
        "agent": agent,
        "timestamp": int(time.time() * 1000),
    }


def _free_name(directory: Path, name: str) -> str:
    """name, or name with a suffix when directory already holds a file of that name."""
    if not (directory / name).exists():
        return name
    stem = name[: -len(".json")] if name.endswith(".json") else name
    while True:
        candidate = f"{stem}.{uuid.uuid4().hex[:8]}.json"
        if not (directory / candidate).exists():
            return candidate


def _count_json(directory: Path) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if e.name.endswith(".json") and e.name[0] != ".")
    except FileNotFoundError:
        return 0


def _remove_stale_temp_files(directory: Path) -> None:
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
