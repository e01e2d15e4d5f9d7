# ruff: noqa: F811  (pytest fixtures imported from tests.test_slack)
"""The Slack bot as its users meet it (issue 11): who may talk to it, what it says back.

Real supervisors against the fake Slack on loopback, like tests/test_slack.py.
"""

import json
import time
from typing import Any

import pytest

from tests.fake_slack import BOT_ID, BOT_USER, FakeSlack
from tests.helpers import AgentEnv, wait_for
from tests.test_slack import (  # noqa: F401  (fake and slack_env are fixtures)
    CHANNEL,
    SILENT_AGENT,
    configure,
    enqueued_events,
    events,
    fake,
    mention,
    profile,
    queued,
    slack_env,
    wait_running,
    write_reply,
    write_tokens,
)

pytestmark = pytest.mark.integration


def start(env: AgentEnv, slack: FakeSlack, command: list[str] | None = None, **extra: Any) -> None:
    creds = write_tokens(env)
    configure(env, slack, command or SILENT_AGENT, main=profile(creds, **extra))
    env.start()
    wait_running(env)


def dm(ts: str, user: str = "U9", text: str = "hi") -> dict[str, Any]:
    return {
        "type": "message",
        "channel": "D1",
        "channel_type": "im",
        "user": user,
        "text": text,
        "ts": ts,
    }


def in_thread(ts: str, thread: str, user: str, text: str = "and?") -> dict[str, Any]:
    return {
        "type": "message",
        "channel": CHANNEL,
        "channel_type": "channel",
        "user": user,
        "text": text,
        "ts": ts,
        "thread_ts": thread,
    }


def sentinel(env: AgentEnv, slack: FakeSlack, ts: str) -> None:
    """A mention after the others: once it is enqueued, every earlier envelope was handled."""
    slack.push_event(mention(ts, "sentinel"))
    wait_for(lambda: enqueued_events(env, ts), what=f"the sentinel {ts} enqueued")


def denied(env: AgentEnv) -> list[dict[str, Any]]:
    return events(env, "slack.sender.denied")


def test_a_dm_from_a_stranger_runs_nothing_and_is_answered_once(slack_env, fake):
    start(slack_env, fake, deny_notice="Sorry, I only work in #team.")
    fake.push_event(dm("1700000100.000100", text="secret plans"))
    fake.push_event(dm("1700000100.000200", text="again"))
    wait_for(lambda: len(denied(slack_env)) == 2, what="two slack.sender.denied events")
    record = denied(slack_env)[0]
    assert record["user"] == "U9" and record["slack_channel"] == "D1"
    assert "secret plans" not in str(record)  # never the text
    assert not queued(slack_env, "1700000100.000100", "D1")
    assert not events(slack_env, "slack.message.enqueued")
    notices = wait_for(fake.posted, what="the deny notice")
    assert notices[0].params["channel"] == "D1"
    assert notices[0].params["text"] == "Sorry, I only work in #team."
    sentinel(slack_env, fake, "1700000100.000300")
    assert len(fake.posted()) == 1  # once, not per message


def test_allow_dm_lets_allowed_users_in_and_keeps_others_out(slack_env, fake):
    start(slack_env, fake, allow_dm=True, allowed_users=["U1"])
    fake.push_event(dm("1700000101.000100", user="U1"))
    fake.push_event(mention("1700000101.000200") | {"user": "U7"})
    wait_for(lambda: enqueued_events(slack_env, "1700000101.000100", "D1"), what="U1's DM")
    wait_for(lambda: denied(slack_env), what="U7's mention denied")
    assert denied(slack_env)[0]["reason"] == "not in allowed_users"
    assert not fake.posted()  # no deny_notice configured: silence


def test_bot_messages_never_run_the_agent(slack_env, fake):
    start(slack_env, fake, ["cat"], allow_dm=True)
    thread = "1700000102.000100"
    fake.push_event(mention(thread, "start"))
    wait_for(lambda: fake.posted(), 30, what="the reply to the first mention")
    # Another bot mentions us, this bot's own post lands in the thread, a bot DMs us.
    other_bot = mention("1700000102.000200") | {"bot_id": "B9", "user": "U55"}
    own_post = in_thread("1700000102.000300", thread, BOT_USER, f"<@{BOT_USER}> me") | {
        "bot_id": BOT_ID
    }
    bot_dm = dm("1700000102.000400") | {"subtype": "bot_message", "bot_id": "B9"}
    for body in (other_bot, own_post, bot_dm):
        fake.push_event(body)
    sentinel(slack_env, fake, "1700000102.000500")
    assert len(events(slack_env, "slack.message.enqueued")) == 2  # the first and the sentinel
    assert not denied(slack_env)


def test_threads_are_followed_for_the_mentioner_unless_follow_threads_is_all(slack_env, fake):
    start(slack_env, fake)
    thread = "1700000103.000100"
    fake.push_event(mention(thread))
    fake.push_event(in_thread("1700000103.000200", thread, "U2"))  # a bystander: ignored
    fake.push_event(in_thread("1700000103.000300", thread, "U1"))  # the mentioner: followed
    wait_for(lambda: enqueued_events(slack_env, "1700000103.000300"), what="U1's reply")
    assert not enqueued_events(slack_env, "1700000103.000200")
    # The bystander mentions the bot: from then on the thread is theirs too.
    fake.push_event(in_thread("1700000103.000400", thread, "U2", f"<@{BOT_USER}> me too"))
    fake.push_event(in_thread("1700000103.000500", thread, "U2"))
    wait_for(lambda: enqueued_events(slack_env, "1700000103.000500"), what="U2 followed")


def test_follow_threads_all_hears_everyone_in_the_thread(slack_env, fake):
    start(slack_env, fake, follow_threads="all")
    thread = "1700000104.000100"
    fake.push_event(mention(thread))
    fake.push_event(in_thread("1700000104.000200", thread, "U2"))
    wait_for(lambda: enqueued_events(slack_env, "1700000104.000200"), what="U2's reply")


def replies_in(slack: FakeSlack, channel: str, thread: str) -> list[str]:
    return [
        c.params["text"]
        for c in slack.posted()
        if c.params.get("channel") == channel and c.params.get("thread_ts") == thread
    ]


def test_the_agent_reads_plain_text_with_names_and_links(slack_env, fake):
    start(slack_env, fake)
    ts = "1700000105.000100"
    fake.push_event(
        mention(ts, "ask <@U1> in <#C9|general> about <https://x.org/?a=1&amp;b=2|this> &lt;3")
    )
    item = wait_for(lambda: queued(slack_env, ts), what="the queue message")[0]
    assert item["message"] == "ask @alice in #general about this (https://x.org/?a=1&b=2) <3"


def test_channel_pings_in_agent_output_arrive_escaped(slack_env, fake):
    start(
        slack_env, fake, ["sh", "-c", "cat >/dev/null; echo '<!channel> <!here> **done** & <@U1>'"]
    )
    ts = "1700000106.000100"
    fake.push_event(mention(ts))
    posted = wait_for(lambda: replies_in(fake, CHANNEL, ts), 30, what="the reply")
    assert posted == ["&lt;!channel&gt; &lt;!here&gt; *done* &amp; &lt;@U1&gt;"]
    assert fake.posted()[0].params.get("link_names") is False


def test_a_10000_character_reply_arrives_as_ordered_messages_in_the_thread(slack_env, fake):
    script = "print('\\n\\n'.join(f'paragraph {i:03d} ' + 'x' * 90 for i in range(100)))"
    start(slack_env, fake, ["python3", "-c", script])
    ts = "1700000107.000100"
    fake.push_event(mention(ts))
    wait_for(lambda: events(slack_env, "slack.reply.posted"), 60, what="the whole reply posted")
    parts = replies_in(fake, CHANNEL, ts)
    assert len(parts) >= 3 and all(len(p) <= 3500 for p in parts)
    numbers = [int(line.split()[1]) for p in parts for line in p.split("\n\n")]
    assert numbers == list(range(100))  # every paragraph once, in order, none cut
    assert events(slack_env, "slack.reply.posted")[0]["parts"] == len(parts)


def test_an_empty_reply_says_why(slack_env, fake):
    start(slack_env, fake, ["sh", "-c", "cat >/dev/null"])
    ts = "1700000108.000100"
    fake.push_event(mention(ts))
    posted = wait_for(lambda: replies_in(fake, CHANNEL, ts), 30, what="the reply")
    assert posted == ["_(The agent finished without writing a reply.)_"]


def test_reactions_show_receipt_then_done(slack_env, fake):
    start(slack_env, fake, ["cat"])
    ts = "1700000109.000100"
    fake.push_event(mention(ts))
    wait_for(
        lambda: fake.reactions_on(CHANNEL, ts) == ["white_check_mark"], 30, what="done reaction"
    )
    steps = [
        (c.method, c.params["name"])
        for c in fake.calls
        if c.method.startswith("reactions.") and c.params.get("timestamp") == ts
    ]
    assert steps == [
        ("reactions.add", "eyes"),
        ("reactions.remove", "eyes"),
        ("reactions.add", "white_check_mark"),
    ]
    assert replies_in(fake, CHANNEL, ts) == ["hello"]


def test_a_failing_agent_produces_one_notice_and_the_failed_reaction(slack_env, fake):
    crash = "cat >/dev/null; echo 'Traceback (most recent call last): xoxb-1-2-leak' >&2; exit 1"
    start(slack_env, fake, ["sh", "-c", crash])
    ts = "1700000110.000100"
    fake.push_event(mention(ts))
    wait_for(lambda: fake.reactions_on(CHANNEL, ts) == ["x"], 30, what="the failed reaction")
    notices = replies_in(fake, CHANNEL, ts)
    assert len(notices) == 1
    assert "could not answer" in notices[0] and "agent failed" in notices[0]
    assert "Traceback" not in notices[0] and "xoxb" not in notices[0]
    # A restart reads failed/ again: the thread is not told twice.
    assert slack_env.stop().returncode == 0
    slack_env.start()
    wait_running(slack_env)
    sentinel(slack_env, fake, "1700000110.000200")
    # The sentinel fails too: once its thread is told, failed/ was read after the restart.
    wait_for(
        lambda: fake.reactions_on(CHANNEL, "1700000110.000200") == ["x"], 30, what="2nd failure"
    )
    assert len(replies_in(fake, CHANNEL, ts)) == 1


def test_slash_commands_and_buttons_are_answered_not_supported(slack_env, fake):
    start(slack_env, fake)
    slash = fake.push_envelope(
        "slash_commands", {"command": "/ask", "text": "hi", "user_id": "U1", "channel_id": CHANNEL}
    )
    wait_for(lambda: fake.acked(slash), what="the slash command acknowledged")
    assert "not support" in fake.ack_payloads[slash]["text"]
    button = fake.push_envelope(
        "interactive",
        {"type": "block_actions", "user": {"id": "U1"}, "channel": {"id": CHANNEL}},
    )
    wait_for(lambda: fake.acked(button), what="the interactive envelope acknowledged")
    ephemeral = wait_for(lambda: fake.calls_of("chat.postEphemeral"), what="an ephemeral answer")
    assert ephemeral[0].params["user"] == "U1" and "not support" in ephemeral[0].params["text"]
    assert len(events(slack_env, "slack.unsupported")) == 2


def test_two_channels_with_the_same_ts_each_get_their_own_reply(slack_env, fake):
    # The agent answers with the text and its conversation: one per channel's thread.
    agent = ["sh", "-c", 'cat; printf " in %s" "$AGENT_CONVERSATION_ID"']
    start(slack_env, fake, agent, channels=[CHANNEL, "C200"])
    ts = "1700000111.000100"
    fake.push_event(mention(ts, "for C100"))
    fake.push_event(mention(ts, "for C200") | {"channel": "C200"})
    wait_for(lambda: len(fake.posted()) == 2, 30, what="two replies")
    assert replies_in(fake, CHANNEL, ts) == [f"for C100 in {CHANNEL}.{ts}"]
    assert replies_in(fake, "C200", ts) == [f"for C200 in C200.{ts}"]


def test_a_reply_to_a_message_enqueued_before_the_new_ids_still_finds_its_thread(slack_env, fake):
    start(slack_env, fake)
    routes = slack_env.state_dir / "slack" / "main" / "routes"
    old_ts = "1700000112.000100"
    (routes / f"{old_ts}.json").write_text(
        json.dumps({"channel": CHANNEL, "thread_ts": old_ts, "created": 1700000112})
    )
    item = {
        "channelProfileId": "main",
        "conversationId": old_ts,
        "messageId": old_ts,
        "sender": "alice",
        "message": "old",
    }
    write_reply(slack_env, item, "late but here")
    wait_for(lambda: replies_in(fake, CHANNEL, old_ts) == ["late but here"], what="old reply")


def test_an_acknowledged_event_left_in_the_inbox_is_enqueued_at_the_next_start(slack_env, fake):
    inbox = slack_env.state_dir / "slack" / "main" / "inbox"
    inbox.mkdir(parents=True)
    ts = "1700000113.000100"
    (inbox / f"{CHANNEL}_{ts}.json").write_text(json.dumps(mention(ts, "from before")))
    start(slack_env, fake)
    item = wait_for(lambda: queued(slack_env, ts), what="the inbox message enqueued")[0]
    assert item["message"] == "from before"
    assert enqueued_events(slack_env, ts)[0]["source"] == "inbox"
    assert not list(inbox.iterdir())


def post_times(slack: FakeSlack, channel: str) -> list[float]:
    return [c.at for c in slack.calls_of("chat.postMessage") if c.params.get("channel") == channel]


def test_posts_are_paced_per_channel_and_a_429_in_one_channel_does_not_delay_another(
    slack_env, fake
):
    start(slack_env, fake, channels=[CHANNEL, "C200"])
    first, second, other = "1700000114.000100", "1700000114.000200", "1700000114.000300"
    fake.push_event(mention(first))
    fake.push_event(mention(second))
    fake.push_event(mention(other) | {"channel": "C200"})
    items = {
        ts: wait_for(lambda ts=ts, ch=ch: queued(slack_env, ts, ch), what=f"{ts} queued")[0]
        for ts, ch in ((first, CHANNEL), (second, CHANNEL), (other, "C200"))
    }
    fake.script(
        "chat.postMessage",
        {"ok": False, "error": "ratelimited"},
        429,
        {"Retry-After": "4"},
        channel=CHANNEL,
    )
    write_reply(slack_env, items[first], "one")
    write_reply(slack_env, items[second], "two")
    wait_for(lambda: post_times(fake, CHANNEL), what="the rate-limited attempt")
    written = time.monotonic()
    write_reply(slack_env, items[other], "elsewhere")
    wait_for(lambda: replies_in(fake, "C200", other), 3, what="C200's reply, not held up")
    assert post_times(fake, "C200")[0] - written < 1.5
    wait_for(
        lambda: len(replies_in(fake, CHANNEL, first) + replies_in(fake, CHANNEL, second)) == 2,
        15,
        what="C100's replies after Retry-After",
    )
    times = post_times(fake, CHANNEL)  # the 429, then "one" and "two"
    assert times[1] - times[0] >= 3.9  # Retry-After honoured
    assert times[2] - times[1] >= 0.9  # paced: about one post per second per channel
    assert [c.params["text"] for c in fake.posted() if c.params["channel"] == CHANNEL] == [
        "one",
        "two",
    ]


def test_the_envelope_is_acknowledged_before_a_slow_web_api_call(slack_env, fake):
    start(slack_env, fake)
    fake.script("users.info", {"ok": True, "user": {"id": "U1", "name": "al"}}, delay=3)
    ts = "1700000115.000100"
    envelope = fake.push_event(mention(ts))
    wait_for(lambda: fake.acked(envelope), 1.5, what="the ack while users.info is still slow")
    assert not queued(slack_env, ts)  # enqueued only after the lookup
    wait_for(lambda: queued(slack_env, ts), 10, what="the message enqueued after the lookup")


def test_backfill_covers_only_configured_channels_and_honours_retry_after(slack_env, fake):
    channels = slack_env.state_dir / "slack" / "main" / "channels"
    channels.mkdir(parents=True)
    for channel in (CHANNEL, "C999"):  # C999: heard before, no longer configured
        (channels / f"{channel}.json").write_text(json.dumps({"cursor": "1700000116.000000"}))
    missed = "1700000116.000100"
    fake.add_history(CHANNEL, mention(missed, "while away") | {"type": "message"})
    fake.add_history("C999", mention("1700000116.000200") | {"channel": "C999"})
    fake.script(
        "conversations.history", {"ok": False, "error": "ratelimited"}, 429, {"Retry-After": "1"}
    )
    start(slack_env, fake)
    wait_for(lambda: queued(slack_env, missed), what="the missed message backfilled")
    calls = fake.calls_of("conversations.history")
    assert {c.params["channel"] for c in calls} == {CHANNEL}
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 0.9


def test_a_shared_file_reaches_the_agent_and_is_cleaned_up(slack_env, fake):
    # The agent echoes its prompt, then the contents of every file listed in $AGENT_FILES.
    agent = ["sh", "-c", 'cat; echo; printf "%s\\n" "$AGENT_FILES" | xargs cat']
    start(slack_env, fake, agent, max_file_bytes=1024)
    ts = "1700000117.000100"
    notes = fake.share_file("notes.txt", b"the quarterly numbers\n")
    huge = fake.share_file("huge.bin", b"x" * 2048)
    fake.push_event(mention(ts, "summarize") | {"files": [notes, huge], "subtype": "file_share"})
    reply = wait_for(lambda: replies_in(fake, CHANNEL, ts), 30, what="the reply")[0]
    prompt, _, contents = reply.partition("summarize")
    assert prompt.startswith("[Files shared with this message (also in $AGENT_FILES):\n/")
    assert "notes.txt]" in prompt
    assert "[File not passed on: huge.bin: larger than max_file_bytes (1024)]" in prompt
    assert contents.strip() == "the quarterly numbers"
    assert [name for name, _ in fake.downloads] == ["notes.txt"]  # the big one never fetched
    assert fake.downloads[0][1] == fake.bot_token
    files = slack_env.state_dir / "queue" / "files" / "slack" / "main"
    wait_for(lambda: not any(files.iterdir()), what="the message's files deleted")


def test_a_reply_attaches_files_from_the_agent_workdir_only(slack_env, fake):
    workdir = slack_env.root / "work"
    workdir.mkdir()
    (workdir / "chart.txt").write_text("42\n")
    (slack_env.root / "secret.txt").write_text("do not send\n")
    agent = [
        "sh",
        "-c",
        "cat >/dev/null; printf 'Here.\\nATTACH: chart.txt\\nATTACH: ../secret.txt\\n'",
    ]
    creds = write_tokens(slack_env)
    slack_env.write_config(
        slack={"enabled": True, "api_base_url": fake.api_url},
        dispatcher={"max_attempts": 1},
        **{"agents.default": {"command": agent, "workdir": str(workdir)}},
        **{"slack.profiles.main": profile(creds)},
    )
    slack_env.start()
    wait_running(slack_env)
    ts = "1700000118.000100"
    fake.push_event(mention(ts))
    completed = wait_for(
        lambda: fake.calls_of("files.completeUploadExternal"), 30, what="the upload completed"
    )
    assert completed[0].params["channel_id"] == CHANNEL
    assert completed[0].params["thread_ts"] == ts
    assert list(fake.uploads.values()) == [b"42\n"]
    assert list(fake.upload_names.values()) == ["chart.txt"]
    text = replies_in(fake, CHANNEL, ts)[0]
    assert text.startswith("Here.") and "ATTACH" not in text
    assert "_(not attached: ../secret.txt: outside the agent's workdir)_" in text
    wait_for(lambda: events(slack_env, "slack.reply.posted"), what="the reply done")
    assert events(slack_env, "slack.reply.posted")[0]["attached"] == 1


def test_a_long_run_shows_working_on_it_and_the_reply_replaces_it(slack_env, fake):
    start(slack_env, fake, ["sh", "-c", "sleep 2.5; cat"], progress_after=1)
    ts = "1700000119.000100"
    fake.push_event(mention(ts, "take your time"))
    working = wait_for(lambda: replies_in(fake, CHANNEL, ts), 10, what="the working-on-it post")
    assert working == ["_Working on it…_"]
    update = wait_for(lambda: fake.calls_of("chat.update"), 30, what="the reply replacing it")[0]
    assert update.params["text"] == "take your time"
    assert update.params["ts"] == fake.posted()[0].body["ts"]
    wait_for(lambda: events(slack_env, "slack.reply.posted"), what="the reply done")
    assert len(fake.posted()) == 1  # no second message in the thread


def test_a_long_run_that_fails_turns_working_on_it_into_the_notice(slack_env, fake):
    start(slack_env, fake, ["sh", "-c", "sleep 2.5; exit 3"], progress_after=1)
    ts = "1700000121.000100"
    fake.push_event(mention(ts))
    working = wait_for(lambda: replies_in(fake, CHANNEL, ts), 10, what="the working-on-it post")
    assert working == ["_Working on it…_"]
    wait_for(lambda: fake.reactions_on(CHANNEL, ts) == ["x"], 30, what="the failed reaction")
    update = fake.calls_of("chat.update")[0]
    assert update.params["ts"] == fake.posted()[0].body["ts"]
    assert "could not answer" in update.params["text"]
    assert len(fake.posted()) == 1  # the notice took the place of "working on it"
