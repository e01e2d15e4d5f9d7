"""Files shared with a Slack message: downloaded for the agent, deleted when it is done.

A message for the bot that carries `files` has each of them (at most `max_file_bytes`,
default 20 MB) downloaded with the bot token into
state_dir/queue/files/slack/<profile>/<messageId>/ (directory 0700, files 0600; under the
queue's files/, where a message's `files` must point, docs/queue.md). The queue
message lists their absolute paths in `files` (the agent gets them in $AGENT_FILES, one
per line) and its text starts with a preamble naming them, and any file that was skipped
and why. The directory is removed when the reply is posted or the failure notice is, and
at the next start once it is as old as a route may get (a reply that never came).
Invariants: the bot token is only ever sent to Slack's own hosts (or the configured API
host); no error text carries it (every error passes through the API's redaction).
"""

import contextlib
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.slack_api import SlackApi
from agent.slack_store import safe_name

DOWNLOAD_TIMEOUT = 30
CHUNK = 64 * 1024


@dataclass
class Downloads:
    paths: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why"

    def preamble(self) -> str:
        """What the agent reads before the message text ("" when no file was shared)."""
        lines = []
        if self.paths:
            lines.append("[Files shared with this message (also in $AGENT_FILES):")
            lines += self.paths
            lines[-1] += "]"
        lines += [f"[File not passed on: {why}]" for why in self.skipped]
        return "\n".join(lines)


class SharedFiles:
    def __init__(self, root: Path, api: SlackApi, max_bytes: int):
        self.root = root
        self.api = api
        self.max_bytes = max_bytes

    def directory(self, message_id: str) -> Path:
        return self.root / safe_name(message_id)

    def download(self, message_id: str, files: list[dict[str, Any]]) -> Downloads:
        result = Downloads()
        for number, info in enumerate(files):
            name = str(info.get("name") or info.get("id") or f"file{number}")
            why = self._one(message_id, number, name, info, result)
            if why:
                result.skipped.append(f"{name}: {why}")
        return result

    def remove(self, message_id: str) -> None:
        shutil.rmtree(self.directory(message_id), ignore_errors=True)

    def prune(self, max_age: float, now: float | None = None) -> None:
        """Remove the files of messages older than max_age seconds (a reply never posted)."""
        now = time.time() if now is None else now
        for directory in self.root.glob("*"):
            with contextlib.suppress(OSError):
                if now - directory.stat().st_mtime > max_age:
                    shutil.rmtree(directory, ignore_errors=True)

    def _one(
        self, message_id: str, number: int, name: str, info: dict[str, Any], result: Downloads
    ) -> str | None:
        size = info.get("size")
        if isinstance(size, int) and size > self.max_bytes:
            return f"larger than max_file_bytes ({self.max_bytes})"
        url = str(info.get("url_private_download") or info.get("url_private") or "")
        if not self._trusted(url):
            return "no download URL on a Slack host"
        directory = self.directory(message_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = directory / f"{number}_{safe_name(name)}"
        try:
            if not self._fetch(url, target):
                target.unlink(missing_ok=True)
                return f"larger than max_file_bytes ({self.max_bytes})"
        except Exception as exc:
            target.unlink(missing_ok=True)
            return f"download failed: {type(exc).__name__}: {self.api.redact(str(exc))}"
        result.paths.append(str(target.resolve()))
        return None

    def _trusted(self, url: str) -> bool:
        """Only Slack's hosts (or the configured API host) ever see the bot token."""
        host = urlparse(url).hostname or ""
        api_host = urlparse(self.api.base_url).hostname or ""
        return bool(host) and (
            host == api_host or host == "slack.com" or host.endswith(".slack.com")
        )

    def _fetch(self, url: str, target: Path) -> bool:
        """Download to target (0600); False when it turned out larger than max_bytes."""
        token = self.api.secrets[0] if self.api.secrets else ""
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        opener = urllib.request.build_opener(_SlackOnlyRedirects(self._trusted))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, opener.open(request, timeout=DOWNLOAD_TIMEOUT) as answer:
            written = 0
            while chunk := answer.read(CHUNK):
                written += len(chunk)
                if written > self.max_bytes:
                    return False
                out.write(chunk)
        return True


class _SlackOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect (which would carry the Authorization header along) only to a Slack host."""

    def __init__(self, trusted: Any):
        self.trusted = trusted

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str):
        if not self.trusted(newurl):
            raise urllib.error.URLError("redirected away from Slack")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
