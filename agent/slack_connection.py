"""The Socket Mode connection of one profile: open it, tell whether it is dead, close it.

open_socket() asks apps.connections.open for a WebSocket URL with the app token and
starts slack_sdk's built-in Socket Mode client on it, one envelope at a time (order of a
thread). The SDK notices a closed peer only when a ping fails, so is_dead() peeks at the
raw socket and at the last pong; close() wakes the SDK's reader before closing, because
the reader holds the lock close() needs for up to 3 s.
"""

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.slack_api import API_FAILURE, SlackApi, SlackProblem, api_problem

PING_INTERVAL = 5.0  # Socket Mode ping; a connection silent for 3 intervals is dropped
CLOSE_WAIT = 1.5  # how long a shutdown waits for the SDK client to close


def open_socket(api: SlackApi, app_token: str, on_envelope: Callable[[Any, Any], None]) -> Any:
    """A connected SocketModeClient (SlackProblem when Slack refuses or the handshake fails)."""
    from slack_sdk.socket_mode.builtin import SocketModeClient

    url = api.connections_open(app_token)
    client = SocketModeClient(
        app_token=app_token,
        web_client=api.web,
        auto_reconnect_enabled=False,
        concurrency=1,  # one envelope at a time keeps the order of a thread
        ping_interval=PING_INTERVAL,
        logger=api.logger,
    )
    client.socket_mode_request_listeners.append(on_envelope)
    client.wss_uri = url
    try:
        client.connect()
    except Exception as exc:
        close(client, "connect")
        raise api_problem(exc, tuple(api.secrets), "socket mode connect") from None
    if not client.is_connected():
        close(client, "connect")
        raise SlackProblem(API_FAILURE, "socket mode connect: the WebSocket handshake failed")
    return client


def is_dead(client: Any) -> bool:
    """The peer closed the socket, or the connection has been silent too long."""
    if not client.is_connected():
        return True
    session = getattr(client, "current_session", None)
    raw = getattr(session, "sock", None)
    if raw is not None and _peer_closed(raw):
        return True
    last = getattr(session, "last_ping_pong_time", None)
    return last is not None and time.time() - last > PING_INTERVAL * 3


def close(client: Any, name: str) -> None:
    session = getattr(client, "current_session", None)
    raw = getattr(session, "sock", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
    closer = threading.Thread(
        target=_close_quietly, args=(client,), name=f"slack-{name}-close", daemon=True
    )
    closer.start()
    closer.join(CLOSE_WAIT)


def _peer_closed(sock: Any) -> bool:
    """True when the peer has closed the TCP connection. Peeks at the raw socket below any
    TLS layer, consuming nothing."""
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
