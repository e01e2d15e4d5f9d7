"""A small fake Slack on loopback: the Web API methods the worker calls, and Socket Mode.

HTTP on 127.0.0.1 answers auth.test, apps.connections.open (a ws:// URL of our own
WebSocket server), conversations.history and .replies, users.info, chat.postMessage,
chat.update, chat.postEphemeral, reactions.add and reactions.remove, files.getUploadURLExternal and
files.completeUploadExternal (the upload URL is ours too), checking the bearer token of
each call; shared files are served at /files/<name> to the bot token. The WebSocket
server (the `websockets` library) says hello, pushes Socket Mode envelopes on request and
records the acknowledgements it receives.
Tests can script the next answers of a method (429 with Retry-After, an error code) and
drop the live WebSocket connections.
"""

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

BOT_USER = "UBOT"
BOT_ID = "BBOT"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    at: float  # time.monotonic()
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scripted:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    channel: str | None = None  # only a call for this channel gets it
    delay: float = 0.0  # seconds before answering (a slow Slack)


class FakeSlack:
    def __init__(self, bot_token: str, app_token: str):
        self.bot_token = bot_token
        self.app_token = app_token
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.scripted: dict[str, deque[Scripted]] = defaultdict(deque)
        self.acks: list[str] = []
        self.ack_payloads: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}  # served at /files/<name> with the bot token
        self.downloads: list[tuple[str, str]] = []  # (name, token used)
        self.uploads: dict[str, bytes] = {}  # file id -> bytes uploaded
        self.upload_names: dict[str, str] = {}  # file id -> filename
        self.reactions: dict[tuple[str, str], list[str]] = defaultdict(list)  # (channel, ts)
        self.connections: list[ServerConnection] = []
        self.ws_opened = 0
        self.refuse_connections = False  # apps.connections.open answers an error while set
        self._envelopes = itertools.count(1)
        self._tickets = itertools.count(1)
        self._posted_ts = itertools.count(1)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.http.daemon_threads = True
        self.ws = serve(self._ws_handler, "127.0.0.1", 0, ping_interval=None)
        self._threads = [
            threading.Thread(target=self.http.serve_forever, daemon=True),
            threading.Thread(target=self.ws.serve_forever, daemon=True),
        ]

    # ---- lifecycle

    def start(self) -> "FakeSlack":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.drop()
        self.ws.shutdown()
        self.http.shutdown()
        self.http.server_close()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/api/"

    @property
    def ws_port(self) -> int:
        return self.ws.socket.getsockname()[1]

    # ---- what tests use

    def script(
        self,
        method: str,
        body: dict[str, Any],
        status: int = 200,
        headers: dict[str, str] | None = None,
        channel: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next call of `method` (for `channel`, if given) gets this answer instead."""
        with self.lock:
            self.scripted[method].append(Scripted(status, body, headers or {}, channel, delay))

    def add_history(self, channel: str, message: dict[str, Any]) -> None:
        with self.lock:
            self.history[channel].append(message)

    def calls_of(self, method: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method]

    def posted(self) -> list[Call]:
        return [c for c in self.calls_of("chat.postMessage") if c.body.get("ok")]

    def live(self) -> int:
        with self.lock:
            return len(self.connections)

    def share_file(self, name: str, data: bytes) -> dict[str, Any]:
        """Serve a file; returns its entry for a message event's `files`."""
        with self.lock:
            self.files[name] = data
        url = f"{self.api_url.removesuffix('/api/')}/files/{name}"
        return {"id": f"F{name}", "name": name, "size": len(data), "url_private_download": url}

    def reactions_on(self, channel: str, ts: str) -> list[str]:
        with self.lock:
            return list(self.reactions[(channel, ts)])

    def push_envelope(self, kind: str, payload: dict[str, Any]) -> str:
        """Push a non-event envelope (slash_commands, interactive); returns its id."""
        envelope_id = f"env-{next(self._envelopes)}"
        self.send_raw(
            {
                "envelope_id": envelope_id,
                "type": kind,
                "accepts_response_payload": kind == "slash_commands",
                "payload": payload,
            }
        )
        return envelope_id

    def push_event(
        self,
        event: dict[str, Any],
        retry_attempt: int = 0,
        to: int | None = None,
        envelope_id: str | None = None,
    ) -> str:
        """Push one events_api envelope to every live connection, or only to the `to`th
        (in the order they opened: with several agents on one app, Slack picks one);
        returns its envelope id (a retry may give the first delivery's)."""
        envelope_id = envelope_id or f"env-{next(self._envelopes)}"
        envelope = {
            "envelope_id": envelope_id,
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
            "payload": {
                "token": "verification-token",
                "team_id": "T1",
                "api_app_id": "A1",
                "type": "event_callback",
                "event_id": f"Ev{event.get('ts', '')}",
                "event_time": int(time.time()),
                "event": event,
            },
        }
        with self.lock:
            targets = list(self.connections)
        assert targets, "no Socket Mode connection to push to"
        if to is not None:
            targets = [targets[to]]
        for conn in targets:
            conn.send(json.dumps(envelope))
        return envelope_id

    def send_raw(self, message: dict[str, Any]) -> None:
        """Send any Socket Mode message (e.g. {"type": "disconnect"}) to live connections."""
        with self.lock:
            targets = list(self.connections)
        for conn in targets:
            conn.send(json.dumps(message))

    def acked(self, envelope_id: str) -> bool:
        with self.lock:
            return envelope_id in self.acks

    def drop(self) -> None:
        """Close every live WebSocket, as Slack does when it moves a connection."""
        with self.lock:
            targets, self.connections = list(self.connections), []
        for conn in targets:
            conn.close(1001, "going away")

    def cut(self) -> None:
        """Cut every live WebSocket at the TCP level, with no close frame (a network drop)."""
        with self.lock:
            targets = list(self.connections)
        for conn in targets:
            with contextlib.suppress(OSError):
                conn.socket.shutdown(socket.SHUT_RDWR)

    # ---- WebSocket side

    def _ws_handler(self, conn: ServerConnection) -> None:
        with self.lock:
            self.connections.append(conn)
            self.ws_opened += 1
        try:
            conn.send(json.dumps({"type": "hello", "num_connections": 1}))
            for raw in conn:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("envelope_id"):
                    with self.lock:
                        self.acks.append(message["envelope_id"])
                        self.ack_payloads[message["envelope_id"]] = message.get("payload")
        except ConnectionClosed:
            pass
        finally:
            with self.lock:
                if conn in self.connections:
                    self.connections.remove(conn)

    # ---- Web API side

    def _handler_class(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                url = urlparse(self.path)
                if url.path.startswith("/files/"):
                    self._file(url.path.removeprefix("/files/"))
                    return
                if url.path.startswith("/upload/"):
                    self._upload(url.path.removeprefix("/upload/"))
                    return
                method = url.path.rsplit("/", 1)[-1]
                params: dict[str, Any] = dict(parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if raw:
                    if "json" in (self.headers.get("Content-Type") or ""):
                        params.update(json.loads(raw))
                    else:
                        params.update(parse_qsl(raw.decode()))
                auth = self.headers.get("Authorization") or ""
                token = auth.removeprefix("Bearer ") if auth else params.pop("token", None)
                status, body, headers = fake._answer(method, params, token)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _file(self, name: str) -> None:
                """A shared file's content, for the bot token only (url_private_download)."""
                auth = self.headers.get("Authorization") or ""
                with fake.lock:
                    data = fake.files.get(name)
                    fake.downloads.append((name, auth.removeprefix("Bearer ")))
                if data is None or auth != f"Bearer {fake.bot_token}":
                    self.send_response(404 if data is None else 403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _upload(self, file_id: str) -> None:
                """The upload URL files.getUploadURLExternal handed out (no token needed)."""
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    fake.uploads[file_id] = data
                body = f"OK - {len(data)}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _answer(
        self, method: str, params: dict[str, Any], token: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            scripted = next(
                (
                    s
                    for s in self.scripted[method]
                    if s.channel is None or s.channel == params.get("channel")
                ),
                None,
            )
            if scripted is not None:
                self.scripted[method].remove(scripted)
        if scripted is not None:
            time.sleep(scripted.delay)  # a slow answer, on this request's own thread
            status, body, headers = scripted.status, scripted.body, scripted.headers
        else:
            status, headers = 200, {}
            body = self._normal(method, params, token)
        with self.lock:
            self.calls.append(Call(method, params, token, time.monotonic(), status, body))
        return status, body, headers

    def _normal(self, method: str, params: dict[str, Any], token: str | None) -> dict[str, Any]:
        if method == "apps.connections.open":
            if token != self.app_token:
                return {"ok": False, "error": "invalid_auth"}
            if self.refuse_connections:
                return {"ok": False, "error": "service_unavailable"}
            ticket = next(self._tickets)
            url = f"ws://127.0.0.1:{self.ws_port}/link/?ticket=ticket-{ticket}&app_id=A1"
            return {"ok": True, "url": url}
        if token != self.bot_token:
            return {"ok": False, "error": "invalid_auth"}
        if method == "auth.test":
            return {"ok": True, "user_id": BOT_USER, "bot_id": BOT_ID, "team_id": "T1"}
        if method == "users.info":
            user = params.get("user", "")
            return {
                "ok": True,
                "user": {"id": user, "name": user.lower(), "profile": {"display_name": "alice"}},
            }
        if method in ("conversations.history", "conversations.replies"):
            channel = params.get("channel", "")
            oldest = float(params.get("oldest") or 0)
            with self.lock:
                everything = list(self.history.get(channel, []))
            if method == "conversations.history":  # thread replies stay in their thread
                found = [m for m in everything if m.get("thread_ts", m["ts"]) == m["ts"]]
                found = [m for m in found if float(m["ts"]) > oldest]
                found.sort(key=lambda m: float(m["ts"]), reverse=True)
            else:  # the parent first, then its replies newer than oldest, oldest first
                thread = params.get("ts")
                parent = [m for m in everything if m["ts"] == thread]
                if not parent:
                    return {"ok": False, "error": "thread_not_found"}
                replies = [
                    m
                    for m in everything
                    if m.get("thread_ts") == thread
                    and m["ts"] != thread
                    and float(m["ts"]) > oldest
                ]
                found = parent + sorted(replies, key=lambda m: float(m["ts"]))
            return {"ok": True, "messages": found, "has_more": False}
        if method == "chat.postMessage":
            ts = f"{1800000000 + next(self._posted_ts)}.000000"
            message = {"ts": ts, "text": params.get("text"), "bot_id": BOT_ID, "user": BOT_USER}
            if params.get("thread_ts"):
                message["thread_ts"] = params["thread_ts"]
            return {"ok": True, "channel": params.get("channel"), "ts": ts, "message": message}
        if method == "files.getUploadURLExternal":
            file_id = f"F{next(self._posted_ts)}"
            with self.lock:
                self.upload_names[file_id] = params.get("filename", "")
            upload_url = f"{self.api_url.removesuffix('/api/')}/upload/{file_id}"
            return {"ok": True, "upload_url": upload_url, "file_id": file_id}
        if method == "files.completeUploadExternal":
            files = params.get("files")
            files = json.loads(files) if isinstance(files, str) else files or []
            return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]}
        if method == "chat.update":
            return {"ok": True, "channel": params.get("channel"), "ts": params.get("ts")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{1800000000 + next(self._posted_ts)}.000000"}
        if method in ("reactions.add", "reactions.remove"):
            return self._react(method, params)
        return {"ok": False, "error": "unknown_method"}

    def _react(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        key = (params.get("channel", ""), params.get("timestamp", ""))
        name = params.get("name", "")
        with self.lock:
            present = self.reactions[key]
            if method == "reactions.add":
                if name in present:
                    return {"ok": False, "error": "already_reacted"}
                present.append(name)
            else:
                if name not in present:
                    return {"ok": False, "error": "no_reaction"}
                present.remove(name)
        return {"ok": True}
