"""The on-disk message queue: its directories and every read, move and write in them.

Layout under state_dir/queue/ (documented in docs/queue.md; other programs rely on it):
  tmp/         producers may stage a file here before renaming it into incoming/
  incoming/    one JSON message per file, renamed in atomically; claimed oldest first
  processing/  claimed messages; anything left here at start goes back to incoming/
  outgoing/    replies, named <channel>_<messageId>.json so a retry overwrites, never adds
  failed/      messages that can never succeed, each with a <name>.reason file
  files/       attachments: a message's `files` must resolve under it

This module is the only one that touches queue/ (producers, the workers, `agentctl send`
and the Slack link all come through it), so its trust rules hold in one place:
  - an entry is read only through read_entry: O_NOFOLLOW | O_NONBLOCK, fstat must say
    regular file, at most MAX_MESSAGE_BYTES + 1 bytes; anything else is InvalidMessage
  - an OSError is either about the entry (InvalidMessage: permanent, never retried) or
    about the machine (MachineTrouble: disk full, EIO, read-only; retried with backoff)
  - files the queue creates (replies, reason files) are 0600 from their first byte, never
    chmod-widened; names it gives are at most MAX_NAME_BYTES bytes
  - a second, different message with the (channel, messageId) of a reply or failed
    entry never overwrites it: it goes to failed/ under a name of its own
Every move is an atomic rename followed by an fsync of the directories it touched.
"Oldest" is the file's mtime (a rename keeps it), ties broken by name.
"""

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.clock import iso_utc
from agent.dirwatch import DirWatcher
from agent.fsutil import atomic_write_bytes, fsync_dir
from agent.messages import (
    ATTEMPTS,
    LAST_ERROR,
    MAX_MESSAGE_BYTES,
    InvalidMessage,
    Message,
    fingerprint,
    make_reply,
    new_message,
    parse,
    reply_name,
    same_message,
    validate,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Claim",
    "Entry",
    "FailedEntry",
    "Failure",
    "InvalidMessage",
    "MachineTrouble",
    "Message",
    "Queue",
    "Tally",
    "make_reply",
    "new_message",
    "parse",
    "read_entry",
    "reply_name",
    "validate",
]

DIRS = ("tmp", "incoming", "processing", "outgoing", "failed", "files")
MAX_NAME_BYTES = 200  # names the queue gives; leaves room for .reason and temp suffixes
MESSAGE_MODE = 0o644  # messages enqueue writes, minus the umask: the service user must read them
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE}
    | {errno.ENFILE, errno.EAGAIN, errno.EINTR}
)
DUPLICATE = "duplicate messageId"


class MachineTrouble(Exception):
    """Trouble with the machine, not the message (disk full, EIO, read-only): retry later."""

    def __init__(self, text: str, error: OSError):
        super().__init__(text)
        self.errno = error.errno


def is_machine_trouble(exc: OSError) -> bool:
    return exc.errno in MACHINE_ERRNOS


@dataclass(frozen=True)
class Entry:
    """A candidate in incoming/: its name, its place in the order, and which file it is."""

    name: str
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Unmovable:
    """An entry of incoming/ that cannot be renamed out of it (e.g. a mount point)."""

    entry: Entry
    reason: str


@dataclass
class Claim:
    """What one claim round did: names now in processing/, entries it could not move,
    and the machine trouble that cut it short (if any)."""

    claimed: list[str]
    unmovable: list[Unmovable]
    trouble: MachineTrouble | None = None
    looked_at: int = 0  # how many of the entries given are out of incoming/ or gone


@dataclass(frozen=True)
class Tally:
    """How many messages wait in one directory, and since when the oldest (its mtime)."""

    count: int
    oldest_mtime_ns: int | None


@dataclass(frozen=True)
class Failure:
    """The one shape of a failed/<name>.reason file (docs/queue.md)."""

    reason: str
    file: str  # its name where it was: processing/, incoming/ (quarantined) or outgoing/
    attempts: int = 0
    channel: str | None = None
    message_id: str | None = None
    quarantined: bool = False

    @classmethod
    def about(cls, reason: str, name: str, message: Message | None) -> "Failure":
        if message is None:
            return cls(reason, name)
        return cls(reason, name, message.attempts, message.channel, message.message_id)

    @classmethod
    def about_reply(cls, reason: str, name: str, reply: Any) -> "Failure":
        if not isinstance(reply, dict) or not isinstance(reply.get("channel"), str):
            return cls(reason, name)
        return cls(reason, name, 0, reply["channel"], str(reply.get("messageId")))

    def as_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "reason": self.reason,
            "failedAt": iso_utc(),
            "file": printable(self.file),
            ATTEMPTS: self.attempts,
        }
        if self.channel is not None:
            info.update(channel=self.channel, messageId=self.message_id)
        if self.quarantined:
            info["quarantined"] = True
        return info

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> "Failure":
        """A reason file's record (fields of the wrong type read as absent)."""
        attempts = info.get(ATTEMPTS)
        message_id = info.get("messageId")
        channel = info.get("channel")
        return cls(
            str(info.get("reason") or ""),
            str(info.get("file") or ""),
            attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else 0,
            channel if isinstance(channel, str) else None,
            str(message_id) if message_id not in (None, "") else None,
            info.get("quarantined") is True,
        )


@dataclass(frozen=True)
class FailedEntry:
    """An entry of failed/ and its reason, as whoever tells a channel about it sees them."""

    name: str  # in failed/
    failure: Failure
    content: dict[str, Any]  # the JSON object the entry holds
    is_reply: bool  # a reply that could not be delivered, not a message the queue gave up on


def printable(name: str) -> str:
    """A file name as text that any log or JSON file can hold (undecodable bytes as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_entry(path: Path, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """The bytes of a regular file, never following a symlink nor blocking on a FIFO.

    FileNotFoundError when it is gone; InvalidMessage for anything wrong with the entry;
    MachineTrouble when the machine failed us.
    """
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _classified(exc, "cannot open") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidMessage(f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > limit:
            raise InvalidMessage(f"message file larger than {limit} bytes ({info.st_size})")
        return _read_at_most(fd, limit)
    except OSError as exc:
        raise _classified(exc, "cannot read") from None
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, min(1 << 16, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:  # it grew after fstat
        raise InvalidMessage(f"message file larger than {limit} bytes")
    return b"".join(chunks)


def _classified(exc: OSError, what: str) -> Exception:
    text = f"{what}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    if is_machine_trouble(exc):
        return MachineTrouble(text, exc)
    if exc.errno == errno.ELOOP:
        return InvalidMessage("is a symbolic link (never followed)")
    if exc.errno == errno.ENXIO:
        return InvalidMessage("not a regular file (a socket or a device without a reader)")
    return InvalidMessage(text)


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return f"mode {mode:o}"


class Queue:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.processing = self.root / "processing"
        self.outgoing = self.root / "outgoing"
        self.failed = self.root / "failed"
        self.files = self.root / "files"
        self._replies = threading.RLock()  # check-then-write of outgoing/ and failed/ names
        self._unsynced: list[Path] = []  # reason files of fail(sync=False) not fsynced yet

    def ensure_dirs(self) -> None:
        for sub in DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- claiming

    def waiting(self) -> list[Entry]:
        """Message entries in incoming/, oldest first (mtime, then name). Any kind of
        entry: claiming is a rename, and reading (with its checks) comes after."""
        return _entries(self.incoming)

    def oldest_first(self, directory: Path) -> list[str]:
        """Message file names in a directory, oldest first (mtime, then name)."""
        return [entry.name for entry in _entries(directory)]

    def claim(self, entries: list[Entry]) -> Claim:
        """Move entries from incoming/ into processing/, in the order given."""
        result = Claim([], [])
        for entry in entries:
            target = _free_name(self.processing, entry.name)
            try:
                os.rename(self.incoming / entry.name, self.processing / target)
            except FileNotFoundError:
                result.looked_at += 1
                continue
            except OSError as exc:
                problem = _classified(exc, "cannot move out of incoming/")
                if isinstance(problem, MachineTrouble):
                    result.trouble = problem
                    break
                result.unmovable.append(Unmovable(entry, str(problem)))
                result.looked_at += 1
                continue
            result.claimed.append(target)
            result.looked_at += 1
        if result.claimed:
            try:
                fsync_dir(self.processing)
                fsync_dir(self.incoming)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    self.unclaim(result.claimed)  # not durable: nobody may work on them yet
                trouble = MachineTrouble(f"fsync: {exc}", exc)
                return Claim([], result.unmovable, trouble, len(result.unmovable))
        return result

    def claim_all(self, limit: int | None = None) -> list[str]:
        """Move incoming messages (at most limit) into processing/, oldest first."""
        result = self.claim(self.waiting()[:limit])
        if result.trouble is not None and not result.claimed:
            raise OSError(result.trouble.errno, str(result.trouble))
        return result.claimed

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

    def census(self) -> dict[str, Tally]:
        """Messages not answered yet: waiting in incoming/ (quarantined ones too) and
        claimed in processing/. One scandir and one lstat per entry, nothing read."""
        return {"incoming": _tally(self.incoming), "processing": _tally(self.processing)}

    def load(self, name: str) -> Message:
        """A claimed message. InvalidMessage if it is not one (permanent), MachineTrouble
        when the machine failed to read it, FileNotFoundError if it is gone."""
        return Message(name, parse(read_entry(self.processing / name), self.files))

    def is_claimed(self, name: str) -> bool:
        return os.path.lexists(self.processing / name)

    def is_waiting(self, name: str) -> bool:
        """Is a file of this name in incoming/ or processing/ (not yet answered or failed)?"""
        return any(os.path.lexists(d / name) for d in (self.incoming, self.processing))

    def duplicate_of(self, message: Message) -> str | None:
        """Where a different message with this (channel, messageId) already ended, or None."""
        name = message.reply_name
        reply = self._read_json(self.outgoing / name)
        if reply is not None and not same_message(message, reply):
            return f"outgoing/{name}"
        earlier = self._read_json(self.failed / name)
        if isinstance(earlier, dict) and fingerprint(earlier) != message.fingerprint:
            return f"failed/{name}"
        return None

    # ---- outcomes

    def write_reply(self, message: Message, reply: dict[str, Any]) -> Path:
        """outgoing/<channel>_<messageId>.json; a reply to a different message of the same
        id is never overwritten: this message goes to failed/ as a duplicate instead."""
        path = self.outgoing / message.reply_name
        with self._replies:
            existing = self._read_json(path)
            if existing is not None and not same_message(message, existing):
                reason = f"{DUPLICATE}: outgoing/{path.name} answers another message"
                target = self.fail(message.name, reason, message, duplicate=True)
                return self.failed / target
            _write_private(path, _json_bytes(reply))
        return path

    def put_reply(self, reply: dict[str, Any]) -> Path:
        """A reply computed elsewhere (the shared queue, docs/scaling.md) written into
        outgoing/<channel>_<messageId>.json for its local reader; writing it twice
        overwrites, never adds."""
        path = self.outgoing / reply_name(reply["channel"], str(reply["messageId"]))
        with self._replies:
            _write_private(path, _json_bytes(reply))
        return path

    def put_failed(self, data: dict[str, Any], reason: str) -> str:
        """A message that failed elsewhere (the shared queue) written into failed/ under
        its reply name with its reason file, as fail() would leave it; its name there."""
        message = Message(reply_name(data["channel"], str(data["messageId"])), data)
        with self._replies:
            target = self._failed_name(message.name, message, duplicate=False)
            failure = Failure.about(reason, message.name, message).as_json()
            _write_private(self.failed / f"{target}.reason", _json_bytes(failure))
            _write_private(self.failed / target, _json_bytes(data))
        return target

    def done(self, name: str) -> None:
        """The reply is durable: forget the claimed message."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.processing / name)
        fsync_dir(self.processing)

    def fail(
        self,
        name: str,
        reason: str,
        message: Message | None = None,
        sync: bool = True,
        duplicate: bool = False,
    ) -> str:
        """Move a claimed entry to failed/ with a reason file; returns its name there.

        A valid message is named like its reply (a message run again overwrites its own
        entry), unless a different message of that id holds the name; a duplicate always
        gets a name of its own. sync=False leaves the fsyncs to sync_failed(), for a batch.
        """
        with self._replies:
            target = self._failed_name(name, message, duplicate)
            reason_path = self.failed / f"{target}.reason"
            data = _json_bytes(Failure.about(reason, name, message).as_json())
            _write_private(reason_path, data, sync_dir=False, sync=sync)
            os.replace(self.processing / name, self.failed / target)
            if not sync:
                self._unsynced.append(reason_path)
        if sync:
            fsync_dir(self.failed)
            fsync_dir(self.processing)
        return target

    def sync_failed(self) -> None:
        """Make a batch of fail(sync=False) durable: every reason file written, then the
        directories. Batched, the fsyncs after the first find little left to write."""
        with self._replies:
            pending, self._unsynced = self._unsynced, []
        for path in pending:
            with contextlib.suppress(FileNotFoundError):
                _fsync_file(path)
        fsync_dir(self.failed)
        fsync_dir(self.processing)

    def note_quarantined(self, name: str, reason: str) -> str:
        """A reason file for an entry that cannot leave incoming/; returns its name."""
        target = _free_name(self.failed, name)
        failure = Failure(reason, name, quarantined=True)
        _write_private(self.failed / f"{target}.reason", _json_bytes(failure.as_json()))
        return f"{target}.reason"

    def record_attempt(self, message: Message, error: str) -> None:
        """Count one more failed run in the file itself, keeping its place in the order."""
        message.data[ATTEMPTS] = message.attempts + 1
        message.data[LAST_ERROR] = error
        path = self.processing / message.name
        info = os.stat(path, follow_symlinks=False)
        data = json.dumps(message.data, ensure_ascii=False, indent=2).encode() + b"\n"
        atomic_write_bytes(path, data, info.st_mode & 0o777, (info.st_atime_ns, info.st_mtime_ns))

    def _failed_name(self, name: str, message: Message | None, duplicate: bool) -> str:
        if message is None:
            return _free_name(self.failed, name)
        target = message.reply_name
        if duplicate:
            return _free_name(self.failed, f"{target[: -len('.json')]}.{uuid.uuid4().hex[:8]}.json")
        earlier = self._read_json(self.failed / target)
        if earlier is None and not os.path.lexists(self.failed / target):
            return target
        if isinstance(earlier, dict) and fingerprint(earlier) == message.fingerprint:
            return target  # the same message, run again
        return _free_name(self.failed, target)

    # ---- replies, for whoever delivers a channel's replies

    def replies(self, channel: str) -> list[str]:
        """Names of outgoing/<channel>_*.json, oldest first."""
        prefix = f"{quote(channel, safe='')}_"
        return [n for n in self.oldest_first(self.outgoing) if n.startswith(prefix)]

    def read_reply(self, name: str) -> dict[str, Any]:
        """A reply in outgoing/; FileNotFoundError if gone, InvalidMessage if not a reply."""
        raw = read_entry(self.outgoing / name)
        try:
            reply = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            raise InvalidMessage(f"unreadable reply JSON: {exc}") from None
        if not isinstance(reply, dict):
            raise InvalidMessage(f"expected a JSON object, got {type(reply).__name__}")
        return reply

    def take_reply(self, channel: str, message_id: str) -> dict[str, Any] | None:
        """The reply to a message, removed from outgoing/ (it reached its reader); or None."""
        name = reply_name(channel, message_id)
        reply = self._read_json(self.outgoing / name)
        if reply is not None:
            self.remove_reply(name)
        return reply

    def incoming_watcher(self) -> DirWatcher:
        """Wakes when a message may have arrived in incoming/ (close it when done)."""
        return DirWatcher(self.incoming)

    def reply_watcher(self) -> DirWatcher:
        """Wakes when a reply may have arrived in outgoing/ (close it when done)."""
        return DirWatcher(self.outgoing)

    def remove_reply(self, name: str) -> None:
        try:
            os.unlink(self.outgoing / name)
        except FileNotFoundError:
            return
        fsync_dir(self.outgoing)

    def failure(self, channel: str, message_id: str) -> dict[str, Any] | None:
        """The reason of a message that ended in failed/ under its reply name, or None."""
        name = reply_name(channel, message_id)
        if not os.path.lexists(self.failed / name):
            return None
        reason = self._read_json(self.failed / f"{name}.reason")
        return reason if isinstance(reason, dict) else {"reason": "(reason file unreadable)"}

    def failure_names(self, channel: str) -> list[str]:
        """Names of the reason files failed/<channel>_*.json.reason, by name."""
        prefix = f"{quote(channel, safe='')}_"
        with contextlib.suppress(FileNotFoundError), os.scandir(self.failed) as entries:
            return sorted(
                e.name
                for e in entries
                if e.name.startswith(prefix) and e.name.endswith(".json.reason")
            )
        return []

    def read_failure(self, reason_name: str) -> FailedEntry | None:
        """The entry failed/<name> of the reason file failed/<name>.reason, with its reason;
        None when either is gone or unreadable, or not a JSON object (a quarantine note)."""
        name = reason_name.removesuffix(".reason")
        info = self._read_json(self.failed / reason_name)
        content = self._read_json(self.failed / name)
        if not isinstance(info, dict) or not isinstance(content, dict):
            return None
        # A reply answers an originalMessage; reason files of replies written before the
        # queue owned them had no `attempts`.
        is_reply = "originalMessage" in content or ATTEMPTS not in info
        return FailedEntry(name, Failure.from_json(info), content, is_reply)

    def fail_reply(self, name: str, reason: str, reply: Any = None) -> str | None:
        """A reply that cannot be delivered, untouched, into failed/ with its reason file."""
        with self._replies:
            target = _free_name(self.failed, name)
            failure = Failure.about_reply(reason, name, reply)
            _write_private(self.failed / f"{target}.reason", _json_bytes(failure.as_json()))
            try:
                os.replace(self.outgoing / name, self.failed / target)
            except FileNotFoundError:
                return None
        fsync_dir(self.failed)
        fsync_dir(self.outgoing)
        return target

    def _read_json(self, path: Path) -> Any:
        try:
            return json.loads(read_entry(path).decode("utf-8"))
        except (OSError, ValueError, InvalidMessage, MachineTrouble):
            return None

    # ---- producers

    def enqueue(self, data: dict[str, Any], name: str | None = None) -> Path:
        """Write a message the way every producer should: stage in tmp/, rename in."""
        validate(data, self.files)
        name = name or f"{time.time_ns()}_{quote(data['channel'], safe='')}_{uuid.uuid4().hex}"
        if not name.endswith(".json"):
            name += ".json"
        staged = self.tmp / f"{name}.{uuid.uuid4().hex[:8]}"
        _write_new(staged, _json_bytes(data), sync_dir=False, mode=MESSAGE_MODE)
        target = self.incoming / name
        os.rename(staged, target)
        fsync_dir(self.incoming)
        fsync_dir(self.tmp)
        return target


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2) + "\n").encode()


def _write_private(path: Path, data: bytes, sync_dir: bool = True, sync: bool = True) -> None:
    """Atomic, durable, and 0600 from its creation (fsutil: O_EXCL | O_NOFOLLOW with the
    mode, never through a symlink), and nothing chmods it wider afterwards."""
    _write_new(path, data, sync_dir, sync=sync)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(
    path: Path, data: bytes, sync_dir: bool = True, mode: int | None = None, sync: bool = True
) -> None:
    """Temp file, fsync (unless sync is False: the caller syncs a batch), rename into
    place, fsync the directory (unless sync_dir is False). mode None: 0600."""
    atomic_write_bytes(
        path, data, 0o600 if mode is None else mode, sync_file=sync, sync_dir=sync_dir
    )


def _fit(name: str) -> str:
    """name, or a shortened one (with a digest of the whole) when longer than MAX_NAME_BYTES."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: MAX_NAME_BYTES - 40].decode("utf-8", "surrogateescape")
    return f"{head}.{digest}.json"


def _free_name(directory: Path, name: str) -> str:
    """name (fitted), or with a suffix when directory already holds an entry of that name."""
    name = _fit(name)
    if not os.path.lexists(directory / name):
        return name
    stem = name[: -len(".json")] if name.endswith(".json") else name
    while True:
        candidate = f"{stem}.{uuid.uuid4().hex[:8]}.json"
        if not os.path.lexists(directory / candidate):
            return candidate


def _entries(directory: Path) -> list[Entry]:
    """*.json entries of a directory (hidden ones left out), oldest first, never followed."""
    found = list(_json_entries(directory))
    found.sort(key=lambda e: (e.mtime_ns, e.name))
    return found


def _json_entries(directory: Path) -> Iterator[Entry]:
    """*.json entries of a directory (hidden ones left out), in directory order; an entry
    that vanishes while we look is skipped."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
            yield Entry(entry.name, mtime, entry.inode())


def _tally(directory: Path) -> Tally:
    count, oldest = 0, None
    with contextlib.suppress(FileNotFoundError):
        for entry in _json_entries(directory):
            count += 1
            oldest = entry.mtime_ns if oldest is None else min(oldest, entry.mtime_ns)
    return Tally(count, oldest)


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
