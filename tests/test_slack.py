"""The slack worker against a fake Slack on loopback, inside a real supervisor process."""

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fake_slack import BOT_USER, FakeSlack
from tests.helpers import AgentEnv, wait_for

pytestmark = pytest.mark.integration

BOT_TOKEN = "xoxb-1111-2222-secretbottoken"
APP_TOKEN = "xapp-1-A1-3333-secretapptoken"
WRONG_TOKEN = "xoxb-9999-wrong-secretwrongtoken"
TOKENS = (BOT_TOKEN, APP_TOKEN, WRONG_TOKEN)
CHANNEL = "C100"


@pytest.fixture
def fake():
    slack = FakeSlack(BOT_TOKEN, APP_TOKEN).start()
    yield slack
    slack.stop()


@pytest.fixture
def slack_env(agent_env: AgentEnv, fake: FakeSlack):
    """An agent wired to the fake Slack; afterwards, no token may appear in any log."""
    yield agent_env
    agent_env.stop()
    assert_no_tokens(agent_env)


def assert_no_tokens(env: AgentEnv) -> None:
    """No token in any log (JSON events, supervisor stdout/stderr) nor anywhere in state."""
    assert (env.state_dir / "logs" / "agent.jsonl").exists(), "no logs were captured"
    files = [p for p in env.state_dir.rglob("*") if p.is_file()]
    texts = {p: p.read_text(errors="replace") for p in files}
    for token in TOKENS:
        for secret in (token, token.rsplit("-", 1)[-1]):
            leaks = [str(p) for p, text in texts.items() if secret in text]
            assert not leaks, f"a token leaked into {leaks}"


def write_tokens(env: AgentEnv, bot: str = BOT_TOKEN, app: str = APP_TOKEN) -> Path:
    creds = env.root / "credentials"
    creds.mkdir(exist_ok=True)
    (creds / "bot").write_text(bot + "\n")
    (creds / "app").write_text(app + "\n")
    return creds


def profile(creds: Path, **extra: Any) -> dict[str, Any]:
    return {
        "bot_token_file": str(creds / "bot"),
        "app_token_file": str(creds / "app"),
        "agent": "default",
        "channels": [CHANNEL],
        "progress_after": 0,  # no "working on it" post unless a test asks for one
        **extra,
    }


def configure(env: AgentEnv, fake: FakeSlack, command: list[str], **profiles: dict) -> None:
    tables = {f"slack.profiles.{name}": values for name, values in profiles.items()}
    env.write_config(
        slack={"enabled": True, "api_base_url": fake.api_url},
        dispatcher={"max_attempts": 1},
        **{"agents.default": {"command": command, "timeout": 120}},
        **tables,
    )


# The agent in most tests never answers in time: these tests write replies themselves.
SILENT_AGENT = ["sleep", "600"]


def profile_state(env: AgentEnv, name: str = "main") -> str | None:
    detail = env.worker("slack").get("detail") or {}
    return (detail.get("profiles") or {}).get(name, {}).get("state")


def wait_running(env: AgentEnv, name: str = "main") -> None:
    wait_for(lambda: profile_state(env, name) == "running", 20, what=f"profile {name} running")


def mention(ts: str, text: str = "hello", thread_ts: str | None = None) -> dict[str, Any]:
    event = {
        "type": "app_mention",
        "user": "U1",
        "text": f"<@{BOT_USER}> {text}",
        "ts": ts,
        "channel": CHANNEL,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message_id(ts: str, channel: str = CHANNEL, name: str = "main") -> str:
    """A Slack message's queue messageId: unique across profiles and channels."""
    return f"{name}.{channel}.{ts}"


def queued(env: AgentEnv, ts: str, channel: str = CHANNEL) -> list[dict[str, Any]]:
    """Every queue message (incoming, claimed, or failed) for this Slack message ts."""
    wanted = message_id(ts, channel)
    found = []
    for sub in ("incoming", "processing", "failed"):
        for path in (env.state_dir / "queue" / sub).glob("*.json"):
            try:
                item = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if item.get("channel") == "slack" and item.get("messageId") == wanted:
                found.append(item)
    return found


def events(env: AgentEnv, name: str) -> list[dict[str, Any]]:
    """Logged events by name; a line the supervisor is still writing is skipped."""
    path = env.state_dir / "logs" / "agent.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def enqueued_events(env: AgentEnv, ts: str, channel: str = CHANNEL) -> list[dict[str, Any]]:
    wanted = message_id(ts, channel)
    return [r for r in events(env, "slack.message.enqueued") if r.get("message_id") == wanted]


def write_reply(env: AgentEnv, item: dict[str, Any], text: str) -> Path:
    """What the dispatcher writes for a processed message (the issue-5 contract)."""
    outgoing = env.state_dir / "queue" / "outgoing"
    path = outgoing / f"slack_{item['messageId']}.json"
    reply = {
        "channel": "slack",
        "channelProfileId": item["channelProfileId"],
        "conversationId": item["conversationId"],
        "messageId": item["messageId"],
        "sender": item["sender"],
        "message": text,
        "originalMessage": item["message"],
        "agent": item.get("agent"),
        "timestamp": int(time.time() * 1000),
    }
    tmp = env.root / "reply.tmp"
    tmp.write_text(json.dumps(reply))
    tmp.replace(path)
    return path


def test_mention_becomes_one_queue_message_and_reply_is_posted_in_thread(slack_env, fake):
    creds = write_tokens(slack_env)
    # Under systemd the token files are relative to $CREDENTIALS_DIRECTORY.
    rel = {"bot_token_file": "bot", "app_token_file": "app"}
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds, **rel))
    slack_env.start(CREDENTIALS_DIRECTORY=str(creds))
    wait_running(slack_env)

    ts = "1700000000.000100"
    envelope = fake.push_event(mention(ts, "what is up?"))
    wait_for(lambda: fake.acked(envelope), what="the envelope acknowledged")
    items = wait_for(lambda: queued(slack_env, ts), what="the queue message")
    assert len(items) == 1
    item = items[0]
    assert item["channelProfileId"] == "main"
    assert item["conversationId"] == f"{CHANNEL}.{ts}"  # a mention outside a thread starts one
    assert item["message"] == "what is up?"
    assert item["senderId"] == "U1" and item["sender"] == "alice"
    assert item["agent"] == "default"
    assert item["timestamp"] == 1700000000000

    # A reply in that thread is for the bot too.
    reply_ts = "1700000000.000200"
    in_thread = {**mention(reply_ts, "more"), "type": "message", "text": "more"}
    in_thread["thread_ts"] = ts
    fake.push_event(in_thread)
    threaded = wait_for(lambda: queued(slack_env, reply_ts), what="the thread reply queued")
    assert threaded[0]["conversationId"] == f"{CHANNEL}.{ts}"

    reply = write_reply(slack_env, item, "all good")
    wait_for(lambda: fake.posted(), what="chat.postMessage")
    post = fake.posted()[0]
    assert post.params["channel"] == CHANNEL
    assert post.params["thread_ts"] == ts
    assert post.params["text"] == "all good"
    assert post.token == BOT_TOKEN
    wait_for(lambda: not reply.exists(), what="the posted reply removed from outgoing/")


def test_retried_delivery_is_not_duplicated(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)

    ts = "1700000001.000100"
    first = fake.push_event(mention(ts))
    wait_for(lambda: fake.acked(first), what="first delivery acknowledged")
    # Slack retries the same event (and the message also arrives as a plain message event).
    again = fake.push_event(mention(ts), retry_attempt=1)
    plain = fake.push_event({**mention(ts), "type": "message", "channel_type": "channel"})
    wait_for(lambda: fake.acked(again) and fake.acked(plain), what="retries acknowledged")
    # An unrelated later message proves the worker went on past the duplicates.
    later = "1700000001.000200"
    fake.push_event(mention(later))
    wait_for(lambda: queued(slack_env, later), what="the later message")
    assert len(queued(slack_env, ts)) == 1
    assert len(enqueued_events(slack_env, ts)) == 1


def test_bot_messages_edits_and_unmentioned_chatter_are_ignored(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds, allow_dm=True))
    slack_env.start()
    wait_running(slack_env)

    base = {"type": "message", "channel": CHANNEL, "channel_type": "channel"}
    fake.push_event({**base, "ts": "1700000002.000100", "user": "U1", "text": "no mention"})
    fake.push_event({**base, "ts": "1700000002.000200", "bot_id": "B9", "text": f"<@{BOT_USER}>"})
    fake.push_event(
        {**base, "ts": "1700000002.000300", "subtype": "message_changed", "text": "<@UBOT> x"}
    )
    other = {**mention("1700000002.000400"), "channel": "C999"}  # not a configured channel
    fake.push_event(other)
    dm = {"type": "message", "channel": "D1", "channel_type": "im", "user": "U2", "text": "hi"}
    fake.push_event({**dm, "ts": "1700000002.000500"})
    wait_for(lambda: queued(slack_env, "1700000002.000500", "D1"), what="the DM queued")
    # Envelopes are handled in order: once the DM's event is logged, the rest were seen.
    wait_for(lambda: enqueued_events(slack_env, "1700000002.000500", "D1"), what="DM's event")
    assert len(events(slack_env, "slack.message.enqueued")) == 1


def test_missed_history_is_backfilled_after_restart(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    first = "1700000003.000100"
    fake.add_history(CHANNEL, mention(first))
    fake.push_event(mention(first))
    wait_for(lambda: queued(slack_env, first), what="the first message")
    assert slack_env.stop().returncode == 0

    # While the service is down: a mention, a reply in the bot's thread, some chatter,
    # and the bot's own message.
    missed = "1700000003.000200"
    in_thread = "1700000003.000250"
    fake.add_history(
        CHANNEL,
        {"type": "message", "user": "U1", "text": "and?", "ts": in_thread, "thread_ts": first},
    )
    fake.add_history(CHANNEL, {**mention(missed, "while you were out"), "type": "message"})
    fake.add_history(
        CHANNEL, {"type": "message", "user": "U3", "text": "chat", "ts": "1700000003.000300"}
    )
    fake.add_history(
        CHANNEL,
        {
            "type": "message",
            "bot_id": "BBOT",
            "user": BOT_USER,
            "text": "<@UBOT>",
            "ts": "1700000003.000400",
        },
    )

    slack_env.start()
    wait_running(slack_env)
    items = wait_for(lambda: queued(slack_env, missed), what="the missed message backfilled")
    assert items[0]["message"] == "while you were out"
    assert len(queued(slack_env, first)) == 1  # not enqueued a second time
    threaded = wait_for(lambda: queued(slack_env, in_thread), what="the thread reply backfilled")
    assert threaded[0]["conversationId"] == f"{CHANNEL}.{first}"
    history_calls = fake.calls_of("conversations.history")
    assert history_calls and history_calls[-1].params["oldest"] == first
    wait_for(lambda: enqueued_events(slack_env, in_thread), what="the backfill's events")
    sources = [r["source"] for r in enqueued_events(slack_env, missed)]
    assert sources == ["backfill"]
    assert len(events(slack_env, "slack.message.enqueued")) == 3


def test_rate_limit_waits_retry_after_and_transient_errors_back_off(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    ts = "1700000004.000100"
    fake.push_event(mention(ts))
    item = wait_for(lambda: queued(slack_env, ts), what="the queue message")[0]

    fake.script(
        "chat.postMessage", {"ok": False, "error": "ratelimited"}, 429, {"Retry-After": "1"}
    )
    # ... and then a transient server error, retried with backoff.
    fake.script("chat.postMessage", {"ok": False, "error": "service_unavailable"}, 503)
    reply = write_reply(slack_env, item, "slowly")
    wait_for(lambda: fake.posted(), what="the reply posted after the rate limit")
    attempts = fake.calls_of("chat.postMessage")
    assert [c.status for c in attempts] == [429, 503, 200]
    assert attempts[1].at - attempts[0].at >= 0.9  # waited for Retry-After
    assert attempts[2].at - attempts[1].at >= 0.9  # and backed off
    assert len(fake.posted()) == 1
    wait_for(lambda: not reply.exists(), what="the reply removed from outgoing/")
    assert events(slack_env, "slack.ratelimited")
    assert events(slack_env, "slack.reply.retry")[0]["error"] == "service_unavailable"


def test_permanent_error_moves_reply_to_failed(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    ts = "1700000005.000100"
    fake.push_event(mention(ts))
    item = wait_for(lambda: queued(slack_env, ts), what="the queue message")[0]

    fake.script("chat.postMessage", {"ok": False, "error": "channel_not_found"})
    reply = write_reply(slack_env, item, "nowhere to go")
    failed = slack_env.state_dir / "queue" / "failed" / reply.name
    wait_for(failed.exists, what="the reply in failed/")
    assert not reply.exists()
    assert "channel_not_found" in Path(f"{failed}.reason").read_text()
    assert json.loads(failed.read_text())["message"] == "nowhere to go"
    assert len(fake.calls_of("chat.postMessage")) == 1

    # A reply for a profile that does not exist cannot be posted anywhere either.
    ghost = write_reply(slack_env, {**item, "channelProfileId": "ghost", "messageId": "1.5"}, "?")
    wait_for(lambda: (failed.parent / ghost.name).exists(), what="the ghost reply in failed/")
    assert (
        "unknown slack profile 'ghost'" in Path(f"{failed.parent / ghost.name}.reason").read_text()
    )


def test_auth_error_while_posting_keeps_the_reply_and_reconnects(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    ts = "1700000008.000100"
    fake.push_event(mention(ts))
    item = wait_for(lambda: queued(slack_env, ts), what="the queue message")[0]

    fake.script("chat.postMessage", {"ok": False, "error": "token_revoked"})
    reply = write_reply(slack_env, item, "after all")
    wait_for(lambda: fake.posted(), what="the reply posted after reconnecting")
    assert [c.body.get("error") for c in fake.calls_of("chat.postMessage")] == [
        "token_revoked",
        None,
    ]
    assert fake.ws_opened == 2  # the profile reconnected
    wait_for(lambda: not reply.exists(), what="the reply removed from outgoing/")
    assert events(slack_env, "slack.profile.auth_failed")[0]["error"] == (
        "chat.postMessage: token_revoked"
    )


def test_invalid_auth_and_missing_token_show_in_status_and_degrade(slack_env, fake):
    good = write_tokens(slack_env)
    bad = slack_env.root / "bad"
    bad.mkdir()
    (bad / "bot").write_text(WRONG_TOKEN)
    (bad / "app").write_text(APP_TOKEN)
    configure(
        slack_env,
        fake,
        SILENT_AGENT,
        main=profile(good),
        broken=profile(bad),
        absent=profile(slack_env.root / "nowhere"),
    )
    slack_env.start()
    wait_running(slack_env, "main")  # one profile's trouble does not hold back another
    wait_for(lambda: profile_state(slack_env, "broken") == "auth_failed", what="auth_failed")
    wait_for(lambda: profile_state(slack_env, "absent") == "auth_missing", what="auth_missing")

    code, report = slack_env.status()
    worker = next(w for w in report["workers"] if w["name"] == "slack")
    profiles = worker["detail"]["profiles"]
    assert profiles["broken"]["last_error"] == "auth.test: invalid_auth"
    assert "not found" in profiles["absent"]["last_error"]
    assert "broken auth_failed" in worker["detail"]["degraded"]
    assert report["supervisor"]["health"] == "degraded"
    assert code != 0
    text = slack_env.agentctl("status").stdout + json.dumps(report)
    assert not any(token in text for token in TOKENS)

    # Fixing the token file is picked up by the reconnect loop, and health recovers.
    (bad / "bot").write_text(BOT_TOKEN)
    wait_running(slack_env, "broken")


def test_dropped_websocket_reconnects_and_catches_up(slack_env, fake):
    creds = write_tokens(slack_env)
    configure(slack_env, fake, SILENT_AGENT, main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    first = "1700000006.000100"
    fake.push_event(mention(first))
    wait_for(lambda: queued(slack_env, first), what="the first message")

    fake.refuse_connections = True  # Slack is away for a moment
    fake.drop()
    wait_for(
        lambda: profile_state(slack_env) in ("disconnected", "api_failure"),
        what="the profile noticing the drop",
    )
    missed = "1700000006.000200"
    fake.add_history(CHANNEL, {**mention(missed, "during the outage"), "type": "message"})
    fake.refuse_connections = False
    wait_for(lambda: fake.live() == 1 and fake.ws_opened == 2, what="a new WebSocket")
    wait_running(slack_env)
    wait_for(lambda: queued(slack_env, missed), what="the outage message backfilled")

    after = "1700000006.000300"
    envelope = fake.push_event(mention(after))
    wait_for(lambda: fake.acked(envelope), what="events flowing on the new connection")
    wait_for(lambda: queued(slack_env, after), what="the message after the reconnect")
    assert events(slack_env, "slack.profile.disconnected") or events(
        slack_env, "slack.profile.api_failure"
    )

    # Slack asks for a refresh: the SDK moves to a new endpoint, events keep flowing.
    fake.send_raw({"type": "disconnect", "reason": "refresh_requested"})
    wait_for(lambda: fake.ws_opened == 3 and fake.live() == 1, what="the refreshed WebSocket")
    refreshed = "1700000006.000400"
    envelope = fake.push_event(mention(refreshed))
    wait_for(lambda: fake.acked(envelope), what="events flowing after the refresh")
    assert len(wait_for(lambda: queued(slack_env, refreshed), what="message after refresh")) == 1

    # The network drops the TCP connection without a close frame: noticed at once too.
    fake.cut()
    wait_for(lambda: fake.ws_opened == 4 and fake.live() == 1, what="a WebSocket after the cut")
    wait_running(slack_env)
    cut = "1700000006.000500"
    envelope = fake.push_event(mention(cut))
    wait_for(lambda: fake.acked(envelope), what="events flowing after the cut")


def test_full_path_mention_to_threaded_reply(slack_env, fake):
    """Fake Slack -> slack worker -> queue -> dispatcher (cat) -> threaded chat.postMessage."""
    creds = write_tokens(slack_env)
    configure(slack_env, fake, ["cat"], main=profile(creds))
    slack_env.start()
    wait_running(slack_env)
    ts = "1700000007.000100"
    fake.push_event(mention(ts, "echo me"))
    wait_for(lambda: fake.posted(), 30, what="the agent's reply posted")
    post = fake.posted()[0]
    assert post.params["thread_ts"] == ts
    assert post.params["channel"] == CHANNEL
    assert post.params["text"] == "echo me"
    outgoing = slack_env.state_dir / "queue" / "outgoing"
    wait_for(lambda: not list(outgoing.glob("slack_*.json")), what="outgoing/ emptied")
