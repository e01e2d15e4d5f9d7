"""The on-disk queue contract, the lanes scheduler and the directory watcher, on real files."""

import json
import os
import sys
import threading
import time

import pytest

from agent.dirwatch import DirWatcher
from agent.lanes import Lanes
from agent.queue import InvalidMessage, Queue, make_reply, new_message, parse, reply_name
from tests.helpers import wait_for


@pytest.fixture
def q(tmp_path):
    queue = Queue(tmp_path / "queue")
    queue.ensure_dirs()
    return queue


def put(q: Queue, name: str, data, mtime_ns: int | None = None) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    staged = q.tmp / name
    staged.write_bytes(raw)
    if mtime_ns is not None:
        os.utime(staged, ns=(mtime_ns, mtime_ns))
    os.rename(staged, q.incoming / name)


def msg(i: int, **extra) -> dict:
    return new_message("local", f"text {i}", "me", "1", message_id=f"m{i}", **extra)


def test_claims_oldest_first_by_mtime_then_name(q):
    base = time.time_ns() - 10**9
    put(q, "b.json", msg(1), base + 3)
    put(q, "c.json", msg(2), base + 1)
    put(q, "a.json", msg(3), base + 3)
    put(q, ".hidden.json", msg(4), base)  # a producer's temp file: never claimed
    put(q, "notes.txt", b"not a message", base)
    assert q.claim_all() == ["c.json", "a.json", "b.json"]
    assert sorted(os.listdir(q.incoming)) == [".hidden.json", "notes.txt"]
    assert q.load("c.json").message_id == "m2"


def test_claim_never_overwrites_a_claimed_file_of_the_same_name(q):
    put(q, "x.json", msg(1))
    assert q.claim_all() == ["x.json"]
    put(q, "x.json", msg(2))
    [second] = q.claim_all()
    assert second != "x.json"
    assert {q.load(n).message_id for n in ("x.json", second)} == {"m1", "m2"}


def test_recover_moves_processing_back_in_original_order(q):
    base = time.time_ns() - 10**9
    for i, name in enumerate(["z.json", "y.json", "x.json"]):
        put(q, name, msg(i), base + i)
    claimed = q.claim_all()
    (q.processing / ".x.json.123.tmp").write_text("half")  # a write cut short by a crash
    assert q.recover() == claimed
    assert os.listdir(q.processing) == []
    assert q.claim_all() == ["z.json", "y.json", "x.json"]


def test_reply_is_named_by_channel_and_message_id_and_overwrites(q):
    put(q, "a.json", msg(1))
    [name] = q.claim_all()
    message = q.load(name)
    q.write_reply(message, make_reply(message, "first", "default"))
    q.write_reply(message, make_reply(message, "second", "default"))
    q.done(name)
    assert os.listdir(q.outgoing) == ["local_m1.json"]
    assert json.loads((q.outgoing / "local_m1.json").read_text())["message"] == "second"
    assert os.listdir(q.processing) == []
    assert reply_name("slack", "C1/17.2") == "slack_C1%2F17.2.json"


def test_record_attempt_keeps_payload_and_place_in_order(q):
    original = msg(1, conversationId="t1", files=[str(q.files / "f")])
    put(q, "a.json", original, time.time_ns() - 10**9)
    [name] = q.claim_all()
    before = os.stat(q.processing / name).st_mtime_ns
    message = q.load(name)
    q.record_attempt(message, "exit status 1")
    q.record_attempt(message, "exit status 2")
    again = q.load(name)
    assert again.attempts == 2
    assert again.data["lastError"] == "exit status 2"
    assert {k: again.data[k] for k in original} == original
    assert os.stat(q.processing / name).st_mtime_ns == before


def test_fail_moves_message_with_reason(q):
    put(q, "bad.json", b"{not json")
    [name] = q.claim_all()
    with pytest.raises(InvalidMessage) as err:
        q.load(name)
    target = q.fail(name, str(err.value))
    assert target == "bad.json"
    assert (q.failed / "bad.json").read_bytes() == b"{not json"
    reason = json.loads((q.failed / "bad.json.reason").read_text())
    assert "malformed JSON" in reason["reason"]
    put(q, "bad.json", b"[]")  # the same name again does not overwrite the first
    [name] = q.claim_all()
    assert q.fail(name, "x") != "bad.json"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "malformed JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1]", "expected a JSON object"),
        (json.dumps({"channel": "x"}).encode(), "missing required field 'messageId'"),
        (json.dumps({**msg(1), "timestamp": "now"}).encode(), "'timestamp' must be a finite"),
        (json.dumps({**msg(1), "message": 5}).encode(), "'message' must be a string"),
        (json.dumps({**msg(1), "files": ["rel/path"]}).encode(), "absolute paths"),
        (json.dumps({**msg(1), "channel": ""}).encode(), "'channel' must not be empty"),
    ],
)
def test_validation_names_the_problem(raw, reason):
    with pytest.raises(InvalidMessage, match=reason):
        parse(raw)


def test_enqueue_stages_then_renames_in(q):
    path = q.enqueue(msg(7))
    assert path.parent == q.incoming
    assert os.listdir(q.tmp) == []
    assert json.loads(path.read_text())["messageId"] == "m7"


def test_lanes_keep_conversation_order_and_limit_parallelism():
    lanes = Lanes(concurrency=2)
    for job in ["a1", "b1", "a2", "c1", "b2"]:
        lanes.add(job[0], job)
    assert lanes.start_next() == ("a", "a1")
    assert lanes.start_next() == ("b", "b1")
    assert lanes.start_next() is None  # two running: the limit
    lanes.finished("a")
    assert lanes.start_next() == ("c", "c1")  # a2 waits its turn behind c
    lanes.retry_at("b", due=100.0)  # b1 waits to retry: b2 must not overtake it
    assert lanes.start_next() == ("a", "a2")
    lanes.finished("a")
    assert lanes.start_next() is None
    assert lanes.next_due() == 100.0
    lanes.release_due(100.0)
    assert lanes.start_next() == ("b", "b1")
    lanes.finished("b")
    lanes.finished("c")
    assert lanes.start_next() == ("b", "b2")
    assert lanes.pending == 0
    assert lanes.running == 1


def test_dirwatch_wakes_at_once_on_a_rename_in(tmp_path):
    watched = tmp_path / "in"
    watched.mkdir()
    watcher = DirWatcher(watched)
    assert watcher.mode == "inotify", watcher.error
    try:
        (tmp_path / "m.json").write_text("{}")
        timer = threading.Timer(0.2, os.rename, (tmp_path / "m.json", watched / "m.json"))
        timer.start()
        started = time.monotonic()
        watcher.wait(30)
        assert time.monotonic() - started < 10  # woke on the event, not the 30 s timeout
        assert (watched / "m.json").exists()
        timer = threading.Timer(0.2, watcher.wake)
        timer.start()
        started = time.monotonic()
        watcher.wait(30)
        assert time.monotonic() - started < 10
    finally:
        watcher.close()


def test_dirwatch_falls_back_to_polling_without_inotify(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "inotify_simple", None)  # import fails
    watcher = DirWatcher(tmp_path)
    try:
        assert watcher.mode == "poll" and "inotify_simple" in watcher.error
        started = time.monotonic()
        watcher.wait(30)  # a slow poll: returns after POLL_SECONDS, not 30
        assert time.monotonic() - started < 10
    finally:
        watcher.close()
    watcher.wake()  # after close: harmless


def test_claim_all_respects_a_limit(q):
    base = time.time_ns() - 10**9
    for i in range(5):
        put(q, f"{i}.json", msg(i), base + i)
    assert q.claim_all(limit=2) == ["0.json", "1.json"]
    assert q.depth() == 3


@pytest.mark.usefixtures("queue_backend")  # both backends: local ingress is the same
def test_a_poison_file_goes_to_failed_and_never_stalls_the_queue(agent_env):
    from agent.queue import Queue

    agent_env.write_config(**{"agents.default": {"command": ["cat"]}})
    agent_env.start()
    queue = Queue(agent_env.state_dir / "queue")
    (queue.tmp / "poison.json").write_text("[" * 200_000)
    os.rename(queue.tmp / "poison.json", queue.incoming / "0-poison.json")
    for i in range(3):
        queue.enqueue(
            {
                "channel": "local",
                "messageId": f"ok{i}",
                "message": f"m{i}",
                "sender": "t",
                "senderId": "t",
                "timestamp": 1,
            },
            name=f"1-ok{i}.json",
        )
    wait_for(
        lambda: sorted(os.listdir(queue.outgoing)) == [f"local_ok{i}.json" for i in range(3)],
        what="the three good messages answered",
    )
    assert "0-poison.json" in os.listdir(queue.failed)
    assert "unreadable JSON: RecursionError" in (queue.failed / "0-poison.json.reason").read_text()
    # a reply is written before its claimed copy leaves processing/
    wait_for(lambda: os.listdir(queue.processing) == [], what="processing/ empty")
    assert agent_env.worker("queue")["state"] == "running"


def test_files_must_resolve_under_the_files_directory(q):
    inside = str(q.files / "report.pdf")
    assert parse(json.dumps(msg(1, files=[inside])).encode(), q.files)["files"] == [inside]
    (q.files / "out").symlink_to("/etc")
    for bad in ("/etc/passwd", str(q.files / "out" / "passwd"), f"{q.files}/../x"):
        with pytest.raises(InvalidMessage, match="files"):
            parse(json.dumps(msg(1, files=[bad])).encode(), q.files)


def test_a_long_incoming_name_is_shortened_when_claimed_and_failed(q):
    name = "x" * 240 + ".json"
    put(q, name, b"[]")
    [claimed] = q.claim_all()
    assert len(claimed.encode()) <= 200 and claimed.startswith("x" * 100)
    target = q.fail(claimed, "not an object")
    assert (q.failed / f"{target}.reason").exists()


def test_a_reply_to_another_message_of_the_same_id_is_never_overwritten(q):
    put(q, "a.json", msg(1))
    put(q, "b.json", {**msg(1), "message": "something else"})
    first, second = (q.load(n) for n in q.claim_all())
    q.write_reply(first, make_reply(first, "answer one", "default"))
    diverted = q.write_reply(second, make_reply(second, "answer two", "default"))
    assert diverted.parent == q.failed
    assert json.loads((q.outgoing / "local_m1.json").read_text())["message"] == "answer one"
    reason = json.loads(diverted.with_name(diverted.name + ".reason").read_text())
    assert reason["reason"].startswith("duplicate messageId")
    assert (reason["channel"], reason["messageId"]) == ("local", "m1")
    assert oct(os.stat(q.outgoing / "local_m1.json").st_mode & 0o777) == "0o600"


def test_a_channel_reads_its_failed_messages_and_replies_through_the_queue(q):
    slack = {"channelProfileId": "main"}
    put(q, "m.json", new_message("slack", "hi", "me", "1", message_id="s1", **slack))
    put(q, "x.json", msg(1))
    for name in q.claim_all():
        message = q.load(name)
        message.data["attempts"] = 3
        q.fail(name, "agent failed", message)
    put(q, "r.json", new_message("slack", "yo", "me", "1", message_id="s2", **slack))
    [name] = q.claim_all()
    message = q.load(name)
    q.write_reply(message, make_reply(message, "answer", "default"))
    q.done(name)
    reason = "chat.postMessage: channel_not_found"
    q.fail_reply("slack_s2.json", reason, q.read_reply("slack_s2.json"))
    (q.failed / "slack_s3.json.reason").write_text("{}")  # its entry is gone: not a record

    names = q.failure_names("slack")
    assert names == ["slack_s1.json.reason", "slack_s2.json.reason", "slack_s3.json.reason"]
    failed = q.read_failure("slack_s1.json.reason")
    assert failed is not None and not failed.is_reply
    assert failed.name == "slack_s1.json" and failed.content["channelProfileId"] == "main"
    assert (failed.failure.reason, failed.failure.attempts) == ("agent failed", 3)
    assert (failed.failure.channel, failed.failure.message_id) == ("slack", "s1")
    reply = q.read_failure("slack_s2.json.reason")
    assert reply is not None and reply.is_reply
    assert reply.failure.reason == reason
    assert q.read_failure("slack_s3.json.reason") is None
    assert q.failure_names("nobody") == []
