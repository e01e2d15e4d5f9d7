"""The message file format: what a valid queue message is, and every limit on it.

A message file is at most MAX_MESSAGE_BYTES of UTF-8 JSON holding one object with the
fields of docs/queue.md. Invariants of a message that passes `parse`:
  - every required field is there with its type; `timestamp` is a finite number
  - no string anywhere (keys included, however deep) holds a NUL or an unpaired surrogate,
    so it can go to an agent's stdin, its environment and a UTF-8 file unchanged
  - the identity fields are at most FIELD_LIMITS characters, and the reply file name
    `<channel>_<messageId>.json` (percent-encoded) at most MAX_REPLY_NAME_BYTES bytes
  - every `files` entry is a normalized absolute path under the files directory given
Anything else is an InvalidMessage naming the field and what was expected: a permanent
problem with that message, never retried. Pure functions: no file is touched here.
"""

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

MAX_MESSAGE_BYTES = 1024 * 1024  # a message file larger than this is rejected unread
MAX_REPLY_NAME_BYTES = 200  # so <name>.reason and temporary names fit NAME_MAX (255)
FIELD_LIMITS = {  # characters
    "channel": 64,
    "messageId": 128,
    "channelProfileId": 128,
    "conversationId": 256,
    "sender": 256,
    "senderId": 256,
    "agent": 128,
}
MAX_FILES = 64
MAX_FILE_PATH_BYTES = 4096
REQUIRED_TEXT = ("channel", "messageId", "message", "sender", "senderId")
OPTIONAL_TEXT = ("channelProfileId", "conversationId", "agent")
ATTEMPTS = "attempts"  # written by the queue itself: failed runs so far
LAST_ERROR = "lastError"
QUEUE_FIELDS = (ATTEMPTS, LAST_ERROR)  # the queue's bookkeeping, not the message


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

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.data)


def reply_name(channel: str, message_id: str) -> str:
    """outgoing/<channel>_<messageId>.json, made safe (and still unique) as a file name."""
    return f"{quote(channel, safe='')}_{quote(message_id, safe='')}.json"


def fingerprint(data: dict[str, Any]) -> str:
    """What makes two files the same message: every field but the queue's bookkeeping."""
    content = {k: v for k, v in data.items() if k not in QUEUE_FIELDS}
    text = json.dumps(content, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def parse(raw: bytes, files_dir: Path | None = None) -> dict[str, Any]:
    """The message in raw (the file's bytes), or InvalidMessage saying what is wrong."""
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
    return validate(data, files_dir)


def validate(data: Any, files_dir: Path | None = None) -> dict[str, Any]:
    """data if it is a valid message; files_dir None skips only the files-directory rule."""
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(data).__name__}")
    _check_strings(data)
    for key in REQUIRED_TEXT:
        if key not in data:
            raise InvalidMessage(f"missing required field '{key}'")
        if not isinstance(data[key], str):
            raise InvalidMessage(f"field '{key}' must be a string")
    for key in ("channel", "messageId"):
        if not data[key]:
            raise InvalidMessage(f"field '{key}' must not be empty")
    _check_timestamp(data)
    for key in OPTIONAL_TEXT:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidMessage(f"field '{key}' must be a string")
    _check_lengths(data)
    _check_files(data.get("files"), files_dir)
    attempts = data.get(ATTEMPTS, 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidMessage(f"field '{ATTEMPTS}' must be a whole number >= 0")
    return data


def _check_timestamp(data: dict[str, Any]) -> None:
    if "timestamp" not in data:
        raise InvalidMessage("missing required field 'timestamp'")
    value = data["timestamp"]
    if isinstance(value, bool) or not isinstance(value, int | float) or value - value != 0:
        raise InvalidMessage("field 'timestamp' must be a finite number (ms since epoch)")


def _check_strings(data: Any) -> None:
    """No NUL and no unpaired surrogate in any key or string, however deep (no recursion)."""
    todo = [("$", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            _check_text(where, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(f"{where} key", key)
                todo.append((f"{where}.{key[:40]}", item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def _check_text(where: str, text: str) -> None:
    if "\x00" in text:
        raise InvalidMessage(f"{_field(where)} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"{_field(where)} contains an unpaired surrogate") from None


def _field(where: str) -> str:
    shown = where.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return f"field {shown.removeprefix('$.')!r}" if where != "$" else "the message"


def _check_lengths(data: dict[str, Any]) -> None:
    for key, limit in FIELD_LIMITS.items():
        value = data.get(key)
        if isinstance(value, str) and len(value) > limit:
            raise InvalidMessage(f"field '{key}' is {len(value)} characters long (limit {limit})")
    name = reply_name(data["channel"], data["messageId"])
    if len(name.encode()) > MAX_REPLY_NAME_BYTES:
        raise InvalidMessage(
            f"fields 'channel' and 'messageId' too long: the reply file name would be "
            f"{len(name.encode())} bytes (limit {MAX_REPLY_NAME_BYTES})"
        )


def _check_files(files: Any, files_dir: Path | None) -> None:
    if files is None:
        return
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InvalidMessage("field 'files' must be an array of absolute paths")
    if len(files) > MAX_FILES:
        raise InvalidMessage(f"field 'files' has {len(files)} entries (limit {MAX_FILES})")
    for path in files:
        _check_file(path, files_dir)


def _check_file(path: str, files_dir: Path | None) -> None:
    if not os.path.isabs(path):
        raise InvalidMessage(f"field 'files': {path[:200]!r} is not one of the absolute paths")
    if len(path.encode()) > MAX_FILE_PATH_BYTES or os.path.normpath(path) != path:
        raise InvalidMessage(f"field 'files': {path[:200]!r} must be a normalized absolute path")
    if files_dir is not None and not _real(path).startswith(_real(files_dir).rstrip("/") + "/"):
        raise InvalidMessage(
            f"field 'files': {path[:200]!r} is not under the files directory {files_dir}"
        )


def _real(path: str | Path) -> str:
    return os.path.realpath(path)  # a symlink under files/ pointing out of it is caught


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


def same_message(message: Message, reply: Any) -> bool:
    """Is reply (an outgoing/ file) the answer to this message, not to another of its id?"""
    if not isinstance(reply, dict):
        return False
    data = message.data
    return (
        reply.get("originalMessage") == data["message"]
        and reply.get("sender") == data["sender"]
        and reply.get("senderId") == data["senderId"]
        and reply.get("conversationId") == data.get("conversationId")
        and reply.get("channelProfileId") == data.get("channelProfileId")
    )
