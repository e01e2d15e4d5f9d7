"""Talking to Slack's Web API safely: one call path, error classes, redaction, tokens.

Every Web API call of the Slack worker goes through SlackApi.call, which turns whatever
slack_sdk raised into an ApiFailure of one kind: `ratelimited` (wait `retry_after`),
`auth` (the token is bad: reconnect), `transient` (retry with backoff) or `permanent`.
Invariant: no text that leaves this module (exceptions, events, status) holds a token:
every error passes through redact(), which removes the known tokens, anything shaped like
a Slack token and WebSocket tickets. slack_sdk's own log lines are redacted the same way.
Being the one path, it also counts for agent.metrics: posts that succeeded, and 429s.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.slack_store import safe_name
from agent.trust import credential_path

WORKER = "slack"
HTTP_TIMEOUT = 15

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
# Web API methods that post into a channel: paced per channel (slack_lane), counted as posts
POSTS = frozenset({"chat.postMessage", "chat.postEphemeral", "chat.update", "files.upload"})
RETRY_AFTER_DEFAULT = 1.0
RETRY_AFTER_MAX = 300.0

# ApiFailure kinds
RATELIMITED, AUTH, TRANSIENT, PERMANENT = "ratelimited", "auth", "transient", "permanent"

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


class ApiFailure(Exception):
    """One failed Web API call, classified; the text (`method: error`) is redacted."""

    def __init__(self, method: str, kind: str, error: str, retry_after: float = 0.0):
        super().__init__(f"{method}: {error}")
        self.method, self.kind, self.error, self.retry_after = method, kind, error, retry_after

    def problem(self) -> SlackProblem:
        """What the profile reports when this failure stops it."""
        return SlackProblem(AUTH_FAILED if self.kind == AUTH else API_FAILURE, str(self))


def api_problem(exc: BaseException, secrets: tuple[str, ...], what: str) -> SlackProblem:
    """Turn anything a slack_sdk call raised into a SlackProblem without token or URL noise."""
    return classify(exc, secrets, what).problem()


def classify(exc: BaseException, secrets: tuple[str, ...], method: str) -> ApiFailure:
    from slack_sdk.errors import SlackApiError

    if not isinstance(exc, SlackApiError):  # network trouble
        return ApiFailure(method, TRANSIENT, f"{type(exc).__name__}: {redact(str(exc), secrets)}")
    error = api_error_code(exc, secrets)
    status = getattr(exc.response, "status_code", None)
    if status == 429 or error == "ratelimited":
        return ApiFailure(method, RATELIMITED, error, retry_after(exc.response))
    if error in AUTH_ERRORS:
        return ApiFailure(method, AUTH, error)
    if error in TRANSIENT_ERRORS or (status is not None and status >= 500):
        return ApiFailure(method, TRANSIENT, error)
    return ApiFailure(method, PERMANENT, error)


def api_error_code(exc: Any, secrets: tuple[str, ...] = ()) -> str:
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


def retry_after(response: Any) -> float:
    """Seconds a 429 asks us to wait: Retry-After, else 1, at most 300."""
    headers = getattr(response, "headers", None) or {}
    value = None
    for key, item in dict(headers).items():
        if key.lower() == "retry-after":
            value = item[0] if isinstance(item, list) else item
    try:
        if value is None:
            return RETRY_AFTER_DEFAULT
        return min(max(float(value), 0.0), RETRY_AFTER_MAX)
    except ValueError:
        return RETRY_AFTER_DEFAULT


def resolve_token_path(path: str, env: dict[str, str] | None = None) -> Path:
    """Where a token file is: agent.trust.credential_path's rule, for every secret file."""
    return credential_path(path, env)


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


@dataclass
class Identity:
    """Who the bot is in this workspace (auth.test)."""

    user_id: str | None
    bot_id: str | None


class SlackApi:
    """One profile's Web API client; `secrets` are its tokens, for redaction.

    The client is replaced on every (re)connect; callers use it only through call().
    slack_sdk's WebClient opens one HTTP connection per call, so threads may share it.
    """

    def __init__(self, profile: str, base_url: str, metrics: Metrics = NO_METRICS):
        self.profile = profile
        self.base_url = base_url
        self.metrics = metrics
        self.secrets: list[str] = []
        self.web: Any = None
        self.identity = Identity(None, None)
        self.logger = _sdk_logger(profile, self.secrets)

    def login(self, bot_token: str, app_token: str) -> Identity:
        """A fresh client for these tokens, checked with auth.test (SlackProblem on failure)."""
        from slack_sdk import WebClient

        self.secrets[:] = [bot_token, app_token]
        self.web = WebClient(
            token=bot_token, base_url=self.base_url, timeout=HTTP_TIMEOUT, logger=self.logger
        )
        try:
            auth = self.call("auth.test")
        except ApiFailure as failure:
            raise failure.problem() from None
        self.identity = Identity(auth.get("user_id"), auth.get("bot_id"))
        return self.identity

    def call(self, method: str, *, read: bool = False, **params: Any) -> dict[str, Any]:
        """One Web API call; `read` ones send form parameters (GET), others a JSON body."""
        web = self.web
        if web is None:
            raise ApiFailure(method, TRANSIENT, "not connected")
        try:
            if read:
                response = web.api_call(method, http_verb="GET", params=params)
            else:
                response = web.api_call(method, json=params) if params else web.api_call(method)
        except Exception as exc:
            raise self._failure(exc, method) from None
        if method in POSTS:
            self.metrics.slack_post(self.profile)
        return dict(response.data) if isinstance(response.data, dict) else {}

    def upload(self, channel: str, thread_ts: str, paths: list[Path]) -> None:
        """Files into a thread: getUploadURLExternal, upload, completeUploadExternal."""
        uploads = [{"file": str(p), "filename": p.name, "title": p.name} for p in paths]
        try:
            self.web.files_upload_v2(file_uploads=uploads, channel=channel, thread_ts=thread_ts)
        except Exception as exc:
            raise self._failure(exc, "files.upload") from None
        self.metrics.slack_post(self.profile)

    def connections_open(self, app_token: str) -> str:
        """A Socket Mode WebSocket URL (apps.connections.open, with the app token)."""
        try:
            url = self.web.apps_connections_open(app_token=app_token).get("url")
        except Exception as exc:
            raise self._failure(exc, "apps.connections.open").problem() from None
        if not url:
            raise SlackProblem(API_FAILURE, "apps.connections.open: no url in the answer")
        return str(url)

    def redact(self, text: str) -> str:
        return redact(text, tuple(self.secrets))

    def _failure(self, exc: BaseException, method: str) -> ApiFailure:
        failure = classify(exc, tuple(self.secrets), method)
        if failure.kind == RATELIMITED:
            self.metrics.slack_rate_limited(self.profile)
        return failure


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
