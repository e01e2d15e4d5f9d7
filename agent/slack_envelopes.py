"""Socket Mode envelopes of one profile: acknowledged at once, then handled.

Slack wants an acknowledgement within 3 seconds, and redelivers what it does not get one
for. So an envelope is acknowledged after local checks only, before any Web API call: a
message for the bot is first written to the profile's inbox (slack_store, durable), then
acknowledged, then gets its ack reaction and goes to the queue through Inbound (which may
call users.info and download files). Invariant: a message for the bot is, at every
moment, either unacknowledged (Slack redelivers), in the inbox (replayed at the next
connect), or enqueued. Slash commands and interactive payloads are answered "not
supported"; any other envelope is acknowledged and ignored.
"""

from typing import Any

from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.slack_api import WORKER
from agent.slack_inbound import Inbound, SlackMessage
from agent.slack_jobs import Notice

NOT_SUPPORTED = (
    "Sorry, this bot does not support slash commands or buttons. "
    "Mention it in a channel (or send it a direct message, where allowed) instead."
)


class Envelopes:
    def __init__(self, inbound: Inbound, metrics: Metrics = NO_METRICS):
        self.inbound = inbound
        self.name = inbound.name
        self.store = inbound.store
        self.metrics = metrics

    def on_envelope(self, client: Any, request: Any) -> None:
        """The Socket Mode client's listener: one envelope at a time."""
        self.metrics.slack_event(self.name)
        try:
            if request.type == "events_api":
                self._event(client, request)
            elif request.type == "slash_commands":
                _ack(client, request, {"response_type": "ephemeral", "text": NOT_SUPPORTED})
                self._unsupported(request.type, request.payload)
            else:
                _ack(client, request)
                if request.type == "interactive":
                    self._unsupported(request.type, request.payload)
        except Exception as exc:  # not acknowledged: Slack redelivers, backfill catches up
            self.inbound.error(exc)

    def _event(self, client: Any, request: Any) -> None:
        body = request.payload.get("event") or {}
        if body.get("type") not in ("message", "app_mention") or not body.get("channel"):
            _ack(client, request)
            return
        message = SlackMessage.parse(body["channel"], body, body.get("channel_type"))
        if not self.inbound.admit(message):
            _ack(client, request)
            return
        self.store.inbox_put(message.channel, message.ts, {"channel": message.channel, **body})
        _ack(client, request)
        self.inbound.react_received(message)
        try:
            self.inbound.enqueue(message, source="socket")
        except Exception as exc:  # stays in the inbox: replayed at the next connect
            self.inbound.error(exc)
            return
        self.store.inbox_drop(message.channel, message.ts)

    def replay_inbox(self) -> None:
        """Enqueue what was acknowledged but not enqueued before a crash or disconnect."""
        for body in self.store.inbox():
            channel = str(body.get("channel") or "")
            message = SlackMessage.parse(channel, body, body.get("channel_type"))
            try:
                if not self.inbound.cursors.seen(channel, message.ts):
                    self.inbound.enqueue(message, source="inbox")
            except Exception as exc:  # stays in the inbox for the next connect
                self.inbound.error(exc)
                continue
            self.store.inbox_drop(channel, message.ts)

    def _unsupported(self, kind: str, payload: dict[str, Any]) -> None:
        user = (payload.get("user") or {}).get("id") or payload.get("user_id")
        channel = (payload.get("channel") or {}).get("id") or payload.get("channel_id")
        event(
            "slack.unsupported",
            f"slack profile {self.name}: {kind} from {user} answered 'not supported'",
            worker=WORKER,
            profile=self.name,
            kind=kind,
            user=user,
            slack_channel=channel,
        )
        if kind == "interactive" and user and channel:
            self.inbound.outbound.notice(
                Notice(str(channel), None, NOT_SUPPORTED, "unsupported", ephemeral_to=str(user))
            )


def _ack(client: Any, request: Any, payload: dict[str, Any] | None = None) -> None:
    from slack_sdk.socket_mode.response import SocketModeResponse

    response = SocketModeResponse(envelope_id=request.envelope_id, payload=payload)
    client.send_socket_mode_response(response)
