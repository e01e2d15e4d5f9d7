"""Small pieces of the Slack worker, without a supervisor: redaction, tokens, cursors."""

import pytest

from agent.slack_api import (
    AUTH_FAILED,
    AUTH_MISSING,
    SlackProblem,
    api_error_code,
    api_problem,
    read_token,
    redact,
    resolve_token_path,
    retry_after,
)
from agent.slack_store import SEEN_LIMIT, ChannelCursor, ProfileStore, ts_key


def test_redact_removes_known_and_token_shaped_strings_and_tickets():
    text = "bad xoxb-123-456-abc and xapp-1-A1-999-def at wss://x/link/?ticket=abc123&app_id=A1"
    clean = redact(text, ("secretvalue",))
    assert "xoxb-" not in clean and "xapp-" not in clean and "abc123" not in clean
    assert "app_id=A1" in clean
    assert redact("token secretvalue here", ("secretvalue",)) == "token [redacted] here"


def test_token_path_absolute_or_under_credentials_directory(tmp_path):
    from pathlib import Path

    assert resolve_token_path("/etc/x/bot", {}) == Path("/etc/x/bot")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_token_path("slack-bot", env) == tmp_path / "slack-bot"
    assert resolve_token_path(str(tmp_path / "abs"), env) == tmp_path / "abs"


def test_read_token_reports_auth_missing_without_the_token(tmp_path):
    with pytest.raises(SlackProblem) as missing:
        read_token(str(tmp_path / "nope"), "bot")
    assert missing.value.state == AUTH_MISSING
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SlackProblem) as empty:
        read_token(str(tmp_path / "empty"), "app")
    assert empty.value.state == AUTH_MISSING and "empty" in str(empty.value)
    (tmp_path / "good").write_text("xoxb-1-2-3\n")
    assert read_token(str(tmp_path / "good"), "bot") == "xoxb-1-2-3"


def test_api_errors_become_safe_problems():
    from slack_sdk.errors import SlackApiError
    from slack_sdk.web import SlackResponse

    def response(body, status=200, headers=None):
        return SlackResponse(
            client=None,
            http_verb="POST",
            api_url="http://x/api/auth.test",
            req_args={"headers": {"Authorization": "Bearer xoxb-leak-me"}},
            data=body,
            headers=headers or {},
            status_code=status,
        )

    auth = api_problem(
        SlackApiError("x", response({"ok": False, "error": "invalid_auth"})), (), "a"
    )
    assert auth.state == AUTH_FAILED and str(auth) == "a: invalid_auth"
    boom = api_problem(OSError("connect to xoxb-leak-me failed"), ("xoxb-leak-me",), "b")
    assert "leak" not in str(boom)
    limited = response({"ok": False, "error": "ratelimited"}, 429, {"Retry-After": "7"})
    assert retry_after(limited) == 7.0
    assert retry_after(response({"ok": False}, 429)) == 1.0


def test_cursor_remembers_seen_and_threads(tmp_path):
    cursor = ChannelCursor(tmp_path / "c.json")
    assert cursor.cursor is None and not cursor.already_seen("1.000001")
    cursor.record("1.000002", "1.000002")
    cursor.record("1.000001", "1.000002")  # out of order: still recorded, cursor keeps max
    again = ChannelCursor(tmp_path / "c.json")
    assert again.cursor == "1.000002"
    assert again.already_seen("1.000001") and again.already_seen("1.000002")
    assert again.threads == ["1.000002"]


def test_cursor_is_pinned_until_its_backfill_succeeds(tmp_path):
    store = ProfileStore(tmp_path, "main")
    store.prepare()
    store.channel("C1").record("5.000000", "5.000000")
    assert store.pin(["C1", "C2"]) == {"C1": "5.000000"}  # C2 has no cursor: nothing to fetch
    cursor = store.channel("C1")
    cursor.record("9.000000", "9.000000")  # arrived while the backfill is due or running
    cursor.advance("10.000000")
    assert ChannelCursor(cursor.path).cursor == "5.000000"  # a crash now loses nothing
    assert ChannelCursor(cursor.path).already_seen("9.000000")
    store.unpin("C1")
    assert ChannelCursor(cursor.path).cursor == "10.000000"
    cursor.advance("11.000000")
    assert ChannelCursor(cursor.path).cursor == "11.000000"


def test_seen_memory_is_bounded(tmp_path):
    cursor = ChannelCursor(tmp_path / "c.json")
    for i in range(SEEN_LIMIT + 10):
        cursor.seen.append(f"{1000 + i}.000000")
    cursor.record(f"{5000}.000000", "1.0")
    assert len(cursor.seen) == SEEN_LIMIT
    assert cursor.already_seen("1000.000000")  # older than anything remembered
    assert ts_key("1700000000.0001") == (1700000000, 100)


def test_routes_round_trip(tmp_path):
    store = ProfileStore(tmp_path, "main")
    store.prepare()
    store.write_route("1.5", "C1", "1.0")
    assert store.route("1.5")["channel"] == "C1"
    store.drop_route("1.5")
    assert store.route("1.5") is None


def test_an_api_error_page_that_echoes_a_token_is_redacted():
    from types import SimpleNamespace

    page = "<html>Bad gateway. Authorization: Bearer xoxb-1234-5678-abcdefSECRET</html>"
    exc = SimpleNamespace(response={"error": page})
    error = api_error_code(exc, ("xoxb-1234-5678-abcdefSECRET",))
    assert "SECRET" not in error and "[redacted]" in error


def test_shared_files_send_the_bot_token_only_to_slack_hosts(tmp_path):
    from agent.slack_api import SlackApi
    from agent.slack_files import SharedFiles

    api = SlackApi("main", "http://127.0.0.1:9/api/")
    files = SharedFiles(tmp_path, api, 1024)
    assert files._trusted("https://files.slack.com/files-pri/T1-F1/download/a.txt")
    assert files._trusted("http://127.0.0.1:9/files/a.txt")  # the configured API host
    assert not files._trusted("https://slack.com.evil.example/a.txt")
    assert not files._trusted("https://evil.example/a.txt")
    got = files.download(
        "m1", [{"name": "a.txt", "url_private_download": "https://evil.example/a"}]
    )
    assert got.paths == [] and got.skipped == ["a.txt: no download URL on a Slack host"]


def test_an_idle_lane_ends_its_thread_and_a_new_job_starts_another(tmp_path, monkeypatch):
    import threading

    from agent import slack_lane
    from agent.queue import Queue
    from agent.slack_api import SlackApi
    from agent.slack_feedback import Reactions
    from agent.slack_files import SharedFiles
    from agent.slack_jobs import Reaction
    from agent.slack_outbound import Outbound, ReplySettings
    from tests.helpers import wait_for

    monkeypatch.setattr(slack_lane, "LANE_IDLE", 0.2)
    monkeypatch.setattr(slack_lane, "IDLE_WAIT", 0.05)
    calls = []
    api = SlackApi("main", "http://127.0.0.1:9/api/")
    api.call = lambda method, **params: calls.append((method, params["timestamp"])) or {}
    stop = threading.Event()
    outbound = Outbound(
        "main",
        api,
        ProfileStore(tmp_path, "main"),
        Queue(tmp_path / "queue"),
        stop,
        ready=lambda: True,
        on_problem=lambda failure: None,
        files=SharedFiles(tmp_path / "files", api, 1024),
        settings=ReplySettings(Reactions("eyes", "ok", "x"), 0.0, lambda agent: None),
    )
    try:
        outbound.submit("C1", Reaction("C1", "1.0", "eyes"))
        first = wait_for(lambda: outbound.lanes.get("C1"), what="the lane")
        wait_for(lambda: calls == [("reactions.add", "1.0")], what="the first job done")
        wait_for(lambda: "C1" not in outbound.lanes, what="the idle lane retired")
        wait_for(lambda: not first.thread.is_alive(), what="its thread ended")
        outbound.submit("C1", Reaction("C1", "2.0", "eyes"))
        wait_for(lambda: len(calls) == 2, what="a job after the retirement done")
    finally:
        stop.set()


def test_old_shared_files_are_pruned(tmp_path):
    import os

    from agent.slack_api import SlackApi
    from agent.slack_files import SharedFiles

    files = SharedFiles(tmp_path, SlackApi("main", "http://127.0.0.1:9/api/"), 1024)
    old, new = files.directory("main.C1.1.0"), files.directory("main.C1.2.0")
    for directory in (old, new):
        directory.mkdir()
        (directory / "0_a.txt").write_text("a")
    os.utime(old, (1_000_000, 1_000_000))
    files.prune(3600)
    assert not old.exists() and new.exists()


def test_threads_are_followed_for_their_mentioners_and_old_cursors_for_everyone(tmp_path):
    import json

    from agent.slack_cursors import Cursors

    store = ProfileStore(tmp_path, "main")
    store.prepare()
    cursors = Cursors(store, "main")
    assert cursors.settle("C1", "5.0", "5.0", lambda: None, follower="U1")
    assert cursors.follows("C1", "5.0", "U1", everyone=False)
    assert not cursors.follows("C1", "5.0", "U2", everyone=False)
    assert cursors.follows("C1", "5.0", "U2", everyone=True)
    assert not cursors.follows("C1", "6.0", "U1", everyone=True)  # not a thread of the bot
    # A cursor written before followers were kept: its threads stay open to everyone.
    (store.channels_dir / "C2.json").write_text(json.dumps({"cursor": "7.0", "threads": ["7.0"]}))
    assert cursors.follows("C2", "7.0", "U9", everyone=False)


def test_a_reply_another_host_is_posting_is_offered_again_only_after_a_while(tmp_path, monkeypatch):
    import json
    import threading
    import time

    from agent import slack_outbound
    from agent.queue import Queue
    from agent.slack_api import SlackApi
    from agent.slack_feedback import Reactions
    from agent.slack_files import SharedFiles
    from agent.slack_outbound import Outbound, ReplySettings
    from agent.slack_store import POST_BUSY
    from tests.helpers import wait_for

    monkeypatch.setattr(slack_outbound, "RECHECK_SECONDS", 0.5)
    claims = []

    class Busy(ProfileStore):  # the database's answer while another host posts the reply
        def claim_post(self, message_id: str) -> str:
            claims.append(message_id)
            return POST_BUSY

    store = Busy(tmp_path, "main")
    store.prepare()
    store.write_route("main.C1.1.0", "C1", "1.0")
    queue = Queue(tmp_path / "queue")
    queue.ensure_dirs()
    name = "slack_main.C1.1.0.json"
    reply = {"channel": "slack", "channelProfileId": "main", "messageId": "main.C1.1.0"}
    (queue.outgoing / name).write_text(json.dumps({**reply, "message": "hi"}))
    api = SlackApi("main", "http://127.0.0.1:9/api/")
    api.call = lambda method, **params: pytest.fail(f"{method} called")
    stop = threading.Event()
    outbound = Outbound(
        "main",
        api,
        store,
        queue,
        stop,
        ready=lambda: True,
        on_problem=lambda failure: None,
        files=SharedFiles(tmp_path / "files", api, 1024),
        settings=ReplySettings(Reactions("eyes", "ok", "x"), 0.0, lambda agent: None),
    )
    try:
        outbound.offer(name)
        wait_for(lambda: claims == ["main.C1.1.0"], what="the claim asked for")
        time.sleep(0.2)
        outbound.tick()
        assert name in outbound.pending  # not handed over again at the next scan
        time.sleep(0.4)
        outbound.tick()
        assert name not in outbound.pending  # the next scan offers it again
        assert (queue.outgoing / name).exists()
    finally:
        stop.set()
