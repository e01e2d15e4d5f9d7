"""One Slack profile's connection: Socket Mode in, threaded replies out (see docs/slack.md).

A ProfileLink owns one [slack.profiles.NAME] in its own thread, with slack_sdk: auth.test
with the bot token, apps.connections.open with the app token, the built-in Socket Mode
client, then a backfill of channel history since the persisted cursors. When the
connection drops it reconnects by itself with backoff.

Inbound: a message for the bot (a DM, a channel message that mentions it, a reply in a
thread it takes part in) is written atomically into queue/incoming/ before the Socket
Mode envelope is acknowledged; a delivery whose ts is already recorded is dropped.
Outbound: replies handed over by the worker are posted with chat.postMessage in the
thread of the original message, then removed. 429 waits Retry-After, transient errors
back off, a permanent error moves the reply to queue/failed/ with a .reason file.
Tokens are read from files and never logged: every error text passes through redact().
"""

import contextlib
import logging
import os
import queue
import re
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import Config, SlackProfileConfig
from agent.log import event
from agent.queue import InvalidMessage, MachineTrouble, Queue
from agent.slack_store import ProfileStore, safe_name, ts_key

WORKER = "slack"
CHANNEL = "slack"  # the queue channel of Slack messages and replies
RECONNECT_BACKOFF = 0.5  # first reconnect delay; doubles up to RECONNECT_BACKOFF_MAX
RECONNECT_BACKOFF_MAX = 30.0
STABLE_SECONDS = 30.0  # a connection up this long resets the reconnect backoff
POST_BACKOFF = 1.0
POST_BACKOFF_MAX = 60.0
PING_INTERVAL = 5.0  # Socket Mode ping; a connection silent for 3 intervals is dropped
HTTP_TIMEOUT = 15
CLOSE_WAIT = 1.5  # how long a shutdown waits for the SDK client to close
HISTORY_PAGES = 20  # at most this many pages of 200 messages per channel and backfill
THREAD_BACKFILL = 20  # threads per channel whose missed replies a backfill fetches
THREAD_AGE = 7 * 86400  # ... if they started at most this long before the cursor
BACKFILL_RETRY = 30.0  # a channel whose backfill failed is tried again after this

# Profile states shown in status.
RUNNING = "running"
CONNECTING = "connecting"
AUTH_MISSING = "auth_missing"
AUTH_FAILED = "auth_failed"
API_FAILURE = "api_failure"
DISCONNECTED = "disconnected"

AUTH_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "not_allowed_token_type",
        "team_access_not_granted",
    }
)
TRANSIENT_ERRORS = frozenset(
    {
        "ratelimited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "team_added_to_org",
    }
)
WANTED_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})

_TOKEN_PATTERN = re.compile(r"xox[a-z]-[A-Za-z0-9-]+|xapp-[A-Za-z0-9-]+")
_TICKET_PATTERN = re.compile(r"(ticket=)[^&\s'\"]+")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove tokens (the known ones and anything shaped like one) and WebSocket tickets."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _TOKEN_PATTERN.sub("[redacted]", text)
    return _TICKET_PATTERN.sub(r"\1[redacted]", text)


class SlackProblem(Exception):
    """A profile cannot run; `state` is the health it reports. The text is safe to show."""

    def __init__(self, state: str, text: str):
        super().__init__(text)
        self.state = state


def api_problem(exc: BaseException, secrets: tuple[str, ...], what: str) -> SlackProblem:
    """Turn anything a slack_sdk call raised into a SlackProblem without token or URL noise."""
    from slack_sdk.errors import SlackApiError

    if isinstance(exc, SlackApiError):
        error = _api_error_code(exc, secrets)
        if error in AUTH_ERRORS:
            return SlackProblem(AUTH_FAILED, f"{what}: {error}")
        return SlackProblem(API_FAILURE, f"{what}: {error}")
    return SlackProblem(API_FAILURE, f"{what}: {type(exc).__name__}: {redact(str(exc), secrets)}")


def _api_error_code(exc: Any, secrets: tuple[str, ...] = ()) -> str:
    response = getattr(exc, "response", None)
    try:
        error = response.get("error") if response is not None else None
    except Exception:
        error = None
    status = getattr(response, "status_code", None)
    if error:
        # a non-JSON answer (a proxy's error page) becomes the error: it may echo a token
        return redact(str(error), secrets)[:200]
    return f"http_{status}" if status else "unknown_error"


def resolve_token_path(path: str, env: dict[str, str] | None = None) -> Path:
    """Absolute as given; else relative to $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
    env = os.environ if env is None else env
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials:
        return Path(credentials) / candidate
    return candidate.resolve()


def read_token(path: str, kind: str) -> str:
    resolved = resolve_token_path(path)
    try:
        token = resolved.read_text().strip()
    except FileNotFoundError:
        raise SlackProblem(AUTH_MISSING, f"{kind} token file {resolved} not found") from None
    except OSError as exc:
        raise SlackProblem(
            AUTH_MISSING, f"{kind} token file {resolved} unreadable: {exc.strerror}"
        ) from None
    if not token:
        raise SlackProblem(AUTH_MISSING, f"{kind} token file {resolved} is empty")
    return token


class _SdkLogBridge(logging.Handler):
    """slack_sdk's own log lines, redacted, as `slack.sdk` events (warnings and worse)."""

    def __init__(self, profile: str, secrets: list[str]):
        super().__init__(logging.WARNING)
        self.profile = profile
        self.secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(record.getMessage(), tuple(self.secrets))
            event("slack.sdk", text, worker=WORKER, level=record.levelno, profile=self.profile)
        except Exception:
            pass


def _sdk_logger(profile: str, secrets: list[str]) -> logging.Logger:
    # Outside the "agent" logger tree on purpose: nothing unredacted reaches our sinks.
    logger = logging.getLogger(f"agent_slack_sdk.{safe_name(profile)}")
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    logger.handlers[:] = [_SdkLogBridge(profile, secrets)]
    return logger


class ProfileLink:
    """One profile: its connection thread, its state, its outbox."""

    def __init__(self, name: str, profile: SlackProfileConfig, config: Config):
        self.name = name
        self.profile = profile
        self.api_base_url = config.slack.api_base_url
        self.queue = Queue(config.queue_dir)
        self.store = ProfileStore(config.state_dir, name)
        self.outbox: queue.SimpleQueue[str] = queue.SimpleQueue()  # reply names
        self.pending: set[str] = set()  # outgoing file names handed over and not finished
        self.pending_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.kick = threading.Event()  # wakes the serve loop (new outbox item, stop)
        self.state = CONNECTING
        self.last_error: str | None = None
        self.since = time.time()
        self._last_failure: tuple[str, str | None] | None = None
        self.enqueued = 0
        self.posted = 0
        self.secrets: list[str] = []
        self.bot_user_id: str | None = None
        self.web: Any = None
        self.socket: Any = None
        self._session: str | None = None
        self._debt: set[str] = set()  # channels whose backfill failed: retried
        self._debt_due = 0.0
        self._users: dict[str, str] = {}
        self.thread: threading.Thread | None = None
        self.crash: BaseException | None = None

    # ---- state

    def _set(self, state: str, error: str | None = None) -> None:
        previous = self.state
        if state != previous:
            self.since = time.time()
        self.state = state
        if error is not None or state == RUNNING:
            self.last_error = error
        if state == previous:
            return
        # A profile that keeps failing the same way logs it once, not at every retry.
        failure = state not in (RUNNING, CONNECTING)
        repeated = (state, error) == self._last_failure or (
            state == CONNECTING and self._last_failure is not None
        )
        if failure:
            self._last_failure = (state, error)
        elif state == RUNNING:
            self._last_failure = None
        level = logging.DEBUG if repeated else logging.WARNING if failure else logging.INFO
        event(
            f"slack.profile.{state}",
            f"slack profile {self.name}: {state}" + (f" ({error})" if error else ""),
            worker=WORKER,
            level=level,
            profile=self.name,
            state=state,
            error=error,
        )

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "last_error": self.last_error,
            "enqueued": self.enqueued,
            "posted": self.posted,
            "outbox": len(self.pending),
        }

    # ---- thread

    def start(self) -> None:
        self.store.prepare()
        self.thread = threading.Thread(target=self._main, name=f"slack-{self.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.kick.set()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _wait(self, seconds: float) -> bool:
        return self.stop_event.wait(seconds)

    def _main(self) -> None:
        try:
            self._live()
        except BaseException as exc:  # reported by the worker loop, which then crashes
            self.crash = exc
        finally:
            self._close()

    def _live(self) -> None:
        backoff = RECONNECT_BACKOFF
        while not self.stop_event.is_set():
            connected = None
            try:
                self._connect()
                connected = time.monotonic()
                self._serve()
                if self.stop_event.is_set():
                    return
                self._set(DISCONNECTED, "the Socket Mode connection closed")
            except SlackProblem as problem:
                self._set(problem.state, str(problem))
            finally:
                self._close()
            # Only a connection that held for a while resets the backoff: one that Slack
            # closes at once must not turn into a reconnect loop.
            if connected is not None and time.monotonic() - connected > STABLE_SECONDS:
                backoff = RECONNECT_BACKOFF
            if self._wait(backoff):
                return
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)

    def _close(self) -> None:
        client, self.socket = self.socket, None
        if client is None:
            return
        # The SDK reads with a 3 s timeout while holding the lock its close() needs: wake
        # the reader by shutting the socket down, and let the rest finish in the background.
        session = getattr(client, "current_session", None)
        raw = getattr(session, "sock", None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
        closer = threading.Thread(
            target=_close_quietly, args=(client,), name=f"slack-{self.name}-close", daemon=True
        )
        closer.start()
        closer.join(CLOSE_WAIT)

    # ---- connecting

    def _connect(self) -> None:
        from slack_sdk import WebClient
        from slack_sdk.socket_mode.builtin import SocketModeClient

        self._set(CONNECTING)
        bot_token = read_token(self.profile.bot_token_file, "bot")
        app_token = read_token(self.profile.app_token_file, "app")
        self.secrets[:] = [bot_token, app_token]
        secrets = tuple(self.secrets)
        logger = _sdk_logger(self.name, self.secrets)
        self.web = WebClient(
            token=bot_token, base_url=self.api_base_url, timeout=HTTP_TIMEOUT, logger=logger
        )
        try:
            auth = self.web.auth_test()
        except Exception as exc:
            raise api_problem(exc, secrets, "auth.test") from None
        self.bot_user_id = auth.get("user_id")
        channels = self._backfill_channels()
        plan = self.store.pin(channels)  # before the socket opens: nothing slips between
        try:
            url = self.web.apps_connections_open(app_token=app_token)["url"]
        except Exception as exc:
            raise api_problem(exc, secrets, "apps.connections.open") from None
        client = SocketModeClient(
            app_token=app_token,
            web_client=self.web,
            auto_reconnect_enabled=False,
            concurrency=1,  # one envelope at a time keeps the order of a thread
            ping_interval=PING_INTERVAL,
            logger=logger,
        )
        client.socket_mode_request_listeners.append(self._on_request)
        client.wss_uri = url
        self.socket = client
        try:
            client.connect()
        except Exception as exc:
            raise api_problem(exc, secrets, "socket mode connect") from None
        if not client.is_connected():
            raise SlackProblem(API_FAILURE, "socket mode connect: the WebSocket handshake failed")
        self._session = client.session_id()
        self._backfill(plan)
        self._set(RUNNING)

    def _backfill_channels(self) -> list[str]:
        return sorted(set(self.profile.channels) | set(self.store.known_channels()))

    def _backfill(self, plan: dict[str, str]) -> None:
        """Enqueue what came while we were away: messages newer than each pinned cursor.

        A channel whose backfill succeeded is unpinned; one that failed stays pinned (its
        cursor does not move) and is tried again every BACKFILL_RETRY seconds.
        """
        self._debt = set(plan)
        for channel, cursor in plan.items():
            try:
                count = self._accept_all(channel, self._history(channel, cursor))
                # Replies in the bot's threads are not in the channel history: ask each
                # recent thread (which now includes threads the backfill just started).
                for thread in self._recent_threads(channel, cursor):
                    count += self._accept_all(channel, self._replies(channel, thread, cursor))
            except SlackProblem as problem:
                if problem.state == AUTH_FAILED:
                    raise
                event(
                    "slack.backfill.failed",
                    f"slack profile {self.name}: backfill of {channel} failed: {problem}",
                    worker=WORKER,
                    level=logging.WARNING,
                    profile=self.name,
                    slack_channel=channel,
                    error=str(problem),
                )
                continue
            self.store.unpin(channel)
            self._debt.discard(channel)
            if count:
                event(
                    "slack.backfill",
                    f"slack profile {self.name}: backfilled {count} message(s) from {channel}",
                    worker=WORKER,
                    profile=self.name,
                    slack_channel=channel,
                    count=count,
                )
        self._debt_due = time.monotonic() + BACKFILL_RETRY

    def _accept_all(self, channel: str, messages: list[dict[str, Any]]) -> int:
        ordered = sorted(messages, key=lambda m: ts_key(m.get("ts", "")))
        return sum(1 for m in ordered if self._accept(channel, m, None, source="backfill"))

    def _recent_threads(self, channel: str, cursor: str) -> list[str]:
        """The bot's most recently active threads started at most THREAD_AGE before cursor."""
        horizon = ts_key(cursor)[0] - THREAD_AGE
        with self.store.lock:
            threads = list(self.store.channel(channel).threads)
        return [t for t in threads[-THREAD_BACKFILL:] if ts_key(t)[0] >= horizon]

    def _history(self, channel: str, oldest: str) -> list[dict[str, Any]]:
        return self._pages("conversations.history", oldest, channel=channel)

    def _replies(self, channel: str, thread: str, oldest: str) -> list[dict[str, Any]]:
        try:
            found = self._pages("conversations.replies", oldest, channel=channel, ts=thread)
        except SlackProblem as problem:
            if str(problem).endswith("thread_not_found"):
                return []  # deleted meanwhile
            raise
        return [m for m in found if m.get("ts") != thread]

    def _pages(self, method: str, oldest: str, **params: Any) -> list[dict[str, Any]]:
        """Every message newer than `oldest` from a paginated history-like method."""
        messages: list[dict[str, Any]] = []
        cursor = None
        for _ in range(HISTORY_PAGES):
            kwargs: dict[str, Any] = {**params, "oldest": oldest, "limit": 200}
            if cursor:
                kwargs["cursor"] = cursor
            try:
                page = self.web.api_call(method, http_verb="GET", params=kwargs)
            except Exception as exc:
                raise api_problem(exc, tuple(self.secrets), method) from None
            messages.extend(page.get("messages") or [])
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                break
        return [m for m in messages if ts_key(m.get("ts", "")) > ts_key(oldest)]

    # ---- connected

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            client = self.socket
            if client is None or not client.is_connected() or self._dead(client):
                return
            if client.session_id() != self._session:  # the SDK moved to a new endpoint
                self._session = client.session_id()
                self._backfill(self.store.pin(self._backfill_channels()))
            elif self._debt and time.monotonic() >= self._debt_due:
                self._backfill(self.store.pin(sorted(self._debt)))
            self._drain_outbox()
            self.kick.wait(0.5)
            self.kick.clear()

    @staticmethod
    def _dead(client: Any) -> bool:
        """The peer closed the socket, or the connection has been silent too long."""
        session = getattr(client, "current_session", None)
        raw = getattr(session, "sock", None)
        if raw is not None and _peer_closed(raw):
            return True
        last = getattr(session, "last_ping_pong_time", None)
        return last is not None and time.time() - last > PING_INTERVAL * 3

    def _on_request(self, client: Any, request: Any) -> None:
        """A Socket Mode envelope: enqueue first, acknowledge after (Slack redelivers)."""
        from slack_sdk.socket_mode.response import SocketModeResponse

        try:
            if request.type == "events_api":
                body = request.payload.get("event") or {}
                if body.get("type") in ("message", "app_mention") and body.get("channel"):
                    self._accept(body["channel"], body, body.get("channel_type"), source="socket")
        except Exception as exc:  # not acknowledged: Slack redelivers, backfill catches up
            event(
                "slack.inbound.error",
                f"slack profile {self.name}: could not enqueue an event: "
                f"{type(exc).__name__}: {redact(str(exc), tuple(self.secrets))}",
                worker=WORKER,
                level=logging.ERROR,
                profile=self.name,
            )
            return
        client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    def _wanted(self, channel: str, message: dict[str, Any], channel_type: str | None) -> bool:
        if message.get("subtype") not in WANTED_SUBTYPES:
            return False  # edits, deletions, joins, bot_message...
        if message.get("bot_id") or not message.get("user"):
            return False
        if message.get("user") == self.bot_user_id:
            return False
        direct = channel_type == "im" or channel.startswith("D")
        if direct:
            return True
        if self.profile.channels and channel not in self.profile.channels:
            return False
        if self.bot_user_id and f"<@{self.bot_user_id}>" in (message.get("text") or ""):
            return True
        thread = message.get("thread_ts")
        return bool(thread and thread != message.get("ts") and thread in self._threads(channel))

    def _threads(self, channel: str) -> list[str]:
        return self.store.channel(channel).threads

    def _accept(
        self, channel: str, message: dict[str, Any], channel_type: str | None, source: str
    ) -> bool:
        """Enqueue one Slack message if it is for the bot and new; True when enqueued."""
        ts = str(message.get("ts") or "")
        if not ts:
            return False
        with self.store.lock:
            if not self._fresh_and_wanted(channel, ts, message, channel_type):
                return False
        user = str(message["user"])
        sender = self._user_name(user)  # a network call: not under the lock
        thread = str(message.get("thread_ts") or ts)
        text = (message.get("text") or "").replace(f"<@{self.bot_user_id}>", "").strip()
        item: dict[str, Any] = {
            "channel": CHANNEL,
            "channelProfileId": self.name,
            "conversationId": thread,
            "messageId": ts,
            "message": text,
            "sender": sender,
            "senderId": user,
            "timestamp": int(float(ts) * 1000),
        }
        if self.profile.agent:
            item["agent"] = self.profile.agent
        name = f"slack_{safe_name(self.name)}_{safe_name(channel)}_{safe_name(ts)}.json"
        with self.store.lock:
            cursor = self.store.channel(channel)
            if cursor.already_seen(ts):  # enqueued by another path meanwhile
                return False
            self.store.write_route(ts, channel, thread)
            self.queue.enqueue(item, name=name)  # staged in tmp/, renamed into incoming/
            cursor.record(ts, thread)
            self.enqueued += 1
        event(
            "slack.message.enqueued",
            f"slack profile {self.name}: message {ts} from {channel} enqueued ({source})",
            worker=WORKER,
            profile=self.name,
            message_id=ts,
            slack_channel=channel,
            source=source,
        )
        return True

    def _fresh_and_wanted(
        self, channel: str, ts: str, message: dict[str, Any], channel_type: str | None
    ) -> bool:
        cursor = self.store.channel(channel)
        if cursor.already_seen(ts):
            event(
                "slack.duplicate",
                f"slack profile {self.name}: {channel}/{ts} already enqueued",
                worker=WORKER,
                level=logging.DEBUG,
                profile=self.name,
                message_id=ts,
            )
            return False
        if not self._wanted(channel, message, channel_type):
            cursor.advance(ts)  # not for us: no need to fetch it again
            return False
        return True

    def _user_name(self, user: str) -> str:
        if user not in self._users:
            name = user
            try:
                info = self.web.users_info(user=user)["user"]
                profile = info.get("profile") or {}
                name = profile.get("display_name") or info.get("real_name") or info.get("name")
            except Exception:
                pass  # the id is a fine sender name when the lookup fails
            self._users[user] = name or user
        return self._users[user]

    # ---- outbound

    def offer(self, name: str) -> None:
        """Post the reply outgoing/<name> (once: a name already handed over is ignored)."""
        with self.pending_lock:
            if name in self.pending:
                return
            self.pending.add(name)
        self.outbox.put(name)
        self.kick.set()

    def _finish(self, name: str) -> None:
        with self.pending_lock:
            self.pending.discard(name)

    def _drain_outbox(self) -> None:
        while not self.stop_event.is_set() and self.state == RUNNING:
            try:
                name = self.outbox.get_nowait()
            except queue.Empty:
                return
            # A SlackProblem (the profile's auth failed) leaves the reply where it is and
            # ends the connection: _live reports it and reconnects with backoff.
            try:
                done = self._post(name)
            finally:
                self._finish(name)  # finished or not: the next scan may hand it over again
            if not done:
                return  # stopping

    def _post(self, name: str) -> bool:
        """Post one reply; True when it is finished (posted or failed), False when stopping."""
        from slack_sdk.errors import SlackApiError

        try:
            reply = self.queue.read_reply(name)
        except FileNotFoundError:
            return True
        except MachineTrouble:
            return True  # the file stays in outgoing/: the next scan hands it over again
        except InvalidMessage as exc:
            move_to_failed(self.queue, name, f"unreadable reply: {exc}")
            return True
        message_id = str(reply.get("messageId") or "")
        route = self.store.route(message_id) if message_id else None
        if route is None:
            reason = f"no Slack route for message {message_id!r}"
            move_to_failed(self.queue, name, reason, reply)
            return True
        text = str(reply.get("message") or "").strip() or "(empty reply)"
        backoff = POST_BACKOFF
        attempt = 0
        while not self.stop_event.is_set():
            attempt += 1
            try:
                self.web.chat_postMessage(
                    channel=route["channel"], text=text, thread_ts=route["thread_ts"]
                )
            except SlackApiError as exc:
                error = _api_error_code(exc, tuple(self.secrets))
                status = getattr(exc.response, "status_code", None)
                if status == 429 or error == "ratelimited":
                    delay = _retry_after(exc.response)
                    event(
                        "slack.ratelimited",
                        f"slack profile {self.name}: rate limited, retrying in {delay:g}s",
                        worker=WORKER,
                        level=logging.WARNING,
                        profile=self.name,
                        message_id=message_id,
                        retry_after_s=delay,
                    )
                    if self._wait(delay):
                        return False
                    continue
                if error in AUTH_ERRORS:
                    raise SlackProblem(AUTH_FAILED, f"chat.postMessage: {error}") from None
                if error in TRANSIENT_ERRORS or (status is not None and status >= 500):
                    if self._retry(message_id, error, attempt, backoff):
                        return False
                    backoff = min(backoff * 2, POST_BACKOFF_MAX)
                    continue
                move_to_failed(self.queue, name, f"chat.postMessage: {error}", reply)
                self.store.drop_route(message_id)
                event(
                    "slack.reply.failed",
                    f"slack profile {self.name}: reply to {message_id} failed: {error}",
                    worker=WORKER,
                    level=logging.ERROR,
                    profile=self.name,
                    message_id=message_id,
                    error=error,
                )
                return True
            except Exception as exc:  # network trouble: transient
                error = f"{type(exc).__name__}: {redact(str(exc), tuple(self.secrets))}"
                if self._retry(message_id, error, attempt, backoff):
                    return False
                backoff = min(backoff * 2, POST_BACKOFF_MAX)
                continue
            self.queue.remove_reply(name)
            self.store.drop_route(message_id)
            self.posted += 1
            event(
                "slack.reply.posted",
                f"slack profile {self.name}: reply to {message_id} posted in thread",
                worker=WORKER,
                profile=self.name,
                message_id=message_id,
                slack_channel=route["channel"],
                attempts=attempt,
            )
            return True
        return False

    def _retry(self, message_id: str, error: str, attempt: int, delay: float) -> bool:
        """Log a transient failure and wait; True when stopping."""
        event(
            "slack.reply.retry",
            f"slack profile {self.name}: posting reply to {message_id} failed ({error}); "
            f"retry in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.name,
            message_id=message_id,
            error=error,
            attempt=attempt,
        )
        return self._wait(delay)


def _peer_closed(sock: Any) -> bool:
    """True when the peer has closed the TCP connection (the SDK would spin until a ping
    fails). Peeks at the raw socket below any TLS layer, consuming nothing."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True  # reset, or already closed


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()


def _retry_after(response: Any) -> float:
    headers = getattr(response, "headers", None) or {}
    value = None
    for key, item in dict(headers).items():
        if key.lower() == "retry-after":
            value = item[0] if isinstance(item, list) else item
    try:
        return min(max(float(value), 0.0), 300.0) if value is not None else 1.0
    except ValueError:
        return 1.0


def move_to_failed(queue: Queue, name: str, reason: str, reply: Any = None) -> None:
    """The reply outgoing/<name>, untouched, into failed/ with its reason file."""
    if queue.fail_reply(name, reason, reply) is None:
        return  # already gone
    event(
        "slack.reply.failed_file",
        f"reply {name} moved to failed/: {reason}",
        worker=WORKER,
        level=logging.ERROR,
        file=name,
        reason=reason,
    )
