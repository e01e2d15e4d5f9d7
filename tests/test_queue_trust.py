"""The queue's trust boundary: bad entries in incoming/ fed to one running supervisor.

Every case plants one bad entry next to two good messages, one in the conversation the
bad one names and one in a conversation of its own. Both good ones must be answered
within seconds, the bad one must be in failed/ with its reason (and exactly one event),
and nothing of it may stay in incoming/ or processing/. One supervisor (agent: `cat`)
serves the whole corpus, so the suite stays fast; its RSS and status are checked after.
"""

import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.messages import MAX_MESSAGE_BYTES
from agent.queue import Queue, new_message
from tests.helpers import AgentEnv, wait_for

pytestmark = pytest.mark.integration

SHARED = "shared"  # the conversation every bad JSON object claims to be part of
SECRET = "top-secret-0600-content"
FAILED_SO_FAR: list[str] = []  # corpus cases that ran in this module's supervisor
ANSWER_SECONDS = 10.0


def good(message_id: str, conversation: str, **extra) -> dict:
    return new_message("local", f"hello {message_id}", "tester", "u1", message_id, **{
        "conversationId": conversation, **extra
    })  # fmt: skip


def raw_json(**changes) -> bytes:
    data = good("bad", SHARED)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


@dataclass(frozen=True)
class Case:
    kind: str
    expect: str  # a piece of the reason
    plant: Callable[[Queue, Path, str], None]  # (queue, scratch dir, entry name)


def file_with(raw: bytes) -> Callable[[Queue, Path, str], None]:
    def plant(q: Queue, scratch: Path, name: str) -> None:
        staged = scratch / name
        staged.write_bytes(raw)
        os.rename(staged, q.incoming / name)

    return plant


def moved_in(make: Callable[[Path], None]) -> Callable[[Queue, Path, str], None]:
    """Create the entry in scratch/ (any kind of file), then rename it into incoming/."""

    def plant(q: Queue, scratch: Path, name: str) -> None:
        make(scratch / name)
        os.rename(scratch / name, q.incoming / name)

    return plant


def fifo(path: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the socket file stays


def listening_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    _KEEP.append(sock)  # open (with a listener) while the supervisor looks at it


_KEEP: list[socket.socket] = []


def directory(path: Path) -> None:
    path.mkdir()
    (path / "inner.json").write_text("{}")


def symlink_to(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def secret_symlink(path: Path) -> None:
    secret = path.parent / "secret.txt"
    secret.write_text(json.dumps(good("secret", SHARED) | {"message": SECRET}))
    secret.chmod(0o600)
    path.symlink_to(secret)


def sparse_huge(path: Path) -> None:
    with open(path, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)


def partial_write(path: Path) -> None:
    whole = json.dumps(good("partial", SHARED)).encode()
    path.write_bytes(whole[: len(whole) // 2])


def files_symlink_escape(q: Queue, scratch: Path, name: str) -> None:
    link = q.files / f"escape-{name}"
    if not os.path.lexists(link):
        link.symlink_to("/etc")
    file_with(raw_json(files=[str(link / "passwd")]))(q, scratch, name)


CORPUS = [
    Case("not-utf8", "not UTF-8", file_with(b'{"a": "\xff\xfe"}')),
    Case("utf16", "not UTF-8", file_with(json.dumps(good("u16", SHARED)).encode("utf-16"))),
    Case("malformed", "malformed JSON", file_with(b"{not json")),
    Case("empty", "malformed JSON", file_with(b"")),
    Case("partial-write", "malformed JSON", moved_in(partial_write)),
    Case("nul-byte-raw", "malformed JSON", file_with(raw_json() + b"\x00")),
    Case("array", "expected a JSON object", file_with(b"[1, 2]")),
    Case("string", "expected a JSON object", file_with(b'"hi"')),
    Case("null", "expected a JSON object", file_with(b"null")),
    Case("deep-nesting", "unreadable JSON", file_with(b"[" * 200_000)),
    Case("huge-int", "unreadable JSON", file_with(b'{"n": ' + b"9" * 5000 + b"}")),
    Case("missing-channel", "missing required field 'channel'", file_with(raw_json(channel=None))),
    Case("missing-id", "missing required field 'messageId'", file_with(raw_json(messageId=None))),
    Case("missing-text", "missing required field 'message'", file_with(raw_json(message=None))),
    Case("missing-time", "missing required field 'timestamp'", file_with(raw_json(timestamp=None))),
    Case("text-number", "'message' must be a string", file_with(raw_json(message=5))),
    Case("sender-list", "'sender' must be a string", file_with(raw_json(sender=["a"]))),
    Case("empty-channel", "'channel' must not be empty", file_with(raw_json(channel=""))),
    Case("time-string", "finite number", file_with(raw_json(timestamp="now"))),
    Case("time-bool", "finite number", file_with(raw_json(timestamp=True))),
    Case(
        "time-nan",
        "finite number",
        file_with(raw_json().replace(b'"timestamp": ', b'"x": ')[:-1] + b', "timestamp": NaN}'),
    ),
    Case(
        "attempts-negative", "'attempts' must be a whole number", file_with(raw_json(attempts=-1))
    ),
    Case(
        "conversation-number",
        "'conversationId' must be a string",
        file_with(raw_json(conversationId=7)),
    ),
    Case("nul-in-text", "contains a NUL", file_with(raw_json(message="a\x00b"))),
    Case("nul-in-sender", "'sender' contains a NUL", file_with(raw_json(sender="\x00"))),
    Case("nul-in-key", "contains a NUL", file_with(raw_json(extra={"k\x00": 1}))),
    Case("surrogate-text", "unpaired surrogate", file_with(raw_json(message="x\ud800"))),
    Case("surrogate-deep", "unpaired surrogate", file_with(raw_json(extra=[[{"a": "\udfff"}]]))),
    Case(
        "long-message-id", "'messageId' is 129 characters", file_with(raw_json(messageId="i" * 129))
    ),
    Case("long-channel", "'channel' is 65 characters", file_with(raw_json(channel="c" * 65))),
    Case(
        "long-conversation",
        "'conversationId' is 257",
        file_with(raw_json(conversationId="c" * 257)),
    ),
    Case("long-sender", "'sender' is 257 characters", file_with(raw_json(sender="s" * 257))),
    Case("long-reply-name", "reply file name would be", file_with(raw_json(messageId="/" * 100))),
    Case(
        "files-outside", "not under the files directory", file_with(raw_json(files=["/etc/shadow"]))
    ),
    Case("files-relative", "absolute paths", file_with(raw_json(files=["a/b"]))),
    Case("files-dotdot", "normalized", file_with(raw_json(files=["/x/../etc/passwd"]))),
    Case("files-not-list", "array of absolute paths", file_with(raw_json(files="/etc/passwd"))),
    Case("files-too-many", "'files' has 65 entries", file_with(raw_json(files=["/f"] * 65))),
    Case("files-symlink-escape", "not under the files directory", files_symlink_escape),
    Case("too-large", "larger than", file_with(b" " * (MAX_MESSAGE_BYTES + 1))),
    Case("huge-sparse", "larger than", moved_in(sparse_huge)),
    Case("fifo", "not a regular file (a FIFO)", moved_in(fifo)),
    Case("socket", "not a regular file", moved_in(unix_socket)),
    Case("listening-socket", "not a regular file", moved_in(listening_socket)),
    Case("directory", "not a regular file (a directory)", moved_in(directory)),
    Case("symlink-dev-zero", "symbolic link", moved_in(symlink_to("/dev/zero"))),
    Case("symlink-secret", "symbolic link", moved_in(secret_symlink)),
    Case("symlink-dangling", "symbolic link", moved_in(symlink_to("/nonexistent/x.json"))),
    Case("symlink-dir", "symbolic link", moved_in(symlink_to("/etc"))),
    Case("long-name", "expected a JSON object", file_with(b"[]")),  # a 250-byte name
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One supervisor for the whole corpus, agent `cat`."""
    env = AgentEnv(tmp_path_factory.mktemp("trust"))
    env.write_config(**{"agents.default": {"command": ["cat"]}, "logging": {"sink": "file"}})
    pid = env.start()
    queue = Queue(env.state_dir / "queue")
    scratch = env.root / "scratch"
    scratch.mkdir()
    yield env, queue, scratch, pid
    env.agentctl("stop")
    for sock in _KEEP:
        sock.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def answered(queue: Queue, *message_ids: str) -> bool:
    return all(os.path.exists(queue.outgoing / f"local_{m}.json") for m in message_ids)


def failed_entry(queue: Queue, name: str) -> dict | None:
    """The reason file of the failed/ entry that came from incoming/<name> (a name over
    200 bytes is shortened, its head kept, when claimed)."""
    for reason_file in queue.failed.glob("*.reason"):
        reason = json.loads(reason_file.read_text())
        if reason.get("file") == name or (len(name) > 200 and reason["file"][:150] == name[:150]):
            return reason | {"_path": str(reason_file)}
    return None


@pytest.mark.parametrize("case", CORPUS, ids=[c.kind for c in CORPUS])
def test_a_bad_entry_goes_to_failed_and_never_holds_up_good_messages(served, case):
    env, queue, scratch, _ = served
    name = f"0-bad-{case.kind}.json"
    if case.kind == "long-name":
        name = "n" * (250 - len(name)) + name
    case.plant(queue, scratch, name)
    same, other = f"same-{case.kind}", f"other-{case.kind}"
    queue.enqueue(good(same, SHARED), name=f"1-{same}.json")
    queue.enqueue(good(other, f"own-{case.kind}"), name=f"1-{other}.json")
    wait_for(
        lambda: answered(queue, same, other),
        timeout=ANSWER_SECONDS,
        what=f"both good messages next to {case.kind} answered",
    )
    reason = wait_for(lambda: failed_entry(queue, name), what=f"the reason file for {case.kind}")
    assert case.expect in reason["reason"], reason
    reason_path = Path(reason["_path"])
    assert stat.S_IMODE(os.lstat(reason_path).st_mode) == 0o600
    assert os.path.lexists(reason_path.with_suffix(""))  # failed/<name> itself
    assert not os.path.lexists(queue.incoming / name)
    wait_for(  # (the good messages match too: their reply is written before the claim goes)
        lambda: not any(n.endswith(case.kind + ".json") for n in os.listdir(queue.processing)),
        what=f"{case.kind} gone from processing/",
    )
    for message_id in (same, other):
        path = queue.outgoing / f"local_{message_id}.json"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert SECRET not in path.read_text()
    records = [r for r in env.events("message.failed") if r.get("file") == reason["file"]]
    assert len(records) == 1, records
    FAILED_SO_FAR.append(case.kind)


def test_after_the_corpus_status_is_truthful_and_memory_bounded(served):
    env, queue, _, pid = served
    detail = wait_for(  # the state file is written about once a second
        lambda: (d := env.worker("queue")["detail"])["failed"] >= len(FAILED_SO_FAR) and d,
        what=f"status counting at least {len(FAILED_SO_FAR)} failed (the corpus cases run)",
    )
    code, report = env.status()
    assert code == 0 and report["supervisor"]["health"] == "healthy", report
    assert detail["depth"] == 0 and detail["oldest_age_s"] is None
    assert "degraded" not in detail
    print(f"supervisor RSS after the corpus: {rss_kb(pid)} kB")
    assert rss_kb(pid) < 100_000, f"supervisor RSS {rss_kb(pid)} kB after the corpus"
    assert not any(SECRET in p.read_text() for p in queue.outgoing.glob("*.json"))


def test_a_different_message_with_a_known_id_is_a_duplicate_and_overwrites_nothing(served):
    _, queue, _, _ = served
    queue.enqueue(good("dup-1", "d1"), name="dup-a.json")
    wait_for(lambda: answered(queue, "dup-1"), what="the first dup-1 answered")
    first = (queue.outgoing / "local_dup-1.json").read_bytes()
    queue.enqueue(good("dup-1", "d2") | {"message": "another text"}, name="dup-b.json")
    queue.enqueue(good("after-dup", "d1"), name="dup-c.json")
    wait_for(lambda: answered(queue, "after-dup"), what="the message after the duplicate")
    reason = wait_for(lambda: failed_entry(queue, "dup-b.json"), what="the duplicate's reason")
    assert "duplicate messageId" in reason["reason"]
    assert (queue.outgoing / "local_dup-1.json").read_bytes() == first
    assert Path(reason["_path"]).name != "local_dup-1.json.reason"


def test_a_burst_of_10000_poison_files_does_not_starve_good_messages(served):
    env, queue, scratch, pid = served
    before = len(env.events("message.failed"))
    base = time.time_ns() - 10**9
    for i in range(10_000):
        staged = scratch / f"p{i:05d}.json"
        staged.write_bytes(b"{poison" if i % 2 else b"[]")
        os.utime(staged, ns=(base + i, base + i))
        os.rename(staged, queue.incoming / staged.name)
    queue.enqueue(good("after-burst-1", SHARED), name="z-after-1.json")
    queue.enqueue(good("after-burst-2", "burst-own"), name="z-after-2.json")
    began = time.monotonic()
    wait_for(
        lambda: answered(queue, "after-burst-1", "after-burst-2"),
        timeout=120,
        interval=0.2,
        what="good messages behind 10,000 poison files answered",
    )
    print(f"good messages behind 10,000 poison files answered in {time.monotonic() - began:.1f}s")
    wait_for(
        lambda: len(env.events("message.failed")) - before >= 10_000,
        timeout=60,
        interval=0.5,
        what="10,000 message.failed events",
    )
    assert len(env.events("message.failed")) - before == 10_000  # one event per entry
    assert not [n for n in os.listdir(queue.incoming) if n.startswith("p")]
    assert os.listdir(queue.processing) == []
    print(f"supervisor RSS after the burst: {rss_kb(pid)} kB")
    assert rss_kb(pid) < 100_000, f"supervisor RSS {rss_kb(pid)} kB after the burst"
    wait_for(lambda: env.worker("queue")["detail"]["depth"] == 0, what="status depth 0")


def test_a_message_for_an_unknown_agent_fails_before_the_hand_off(served):
    """It is judged by the queue worker, like any bad entry: it never takes a place."""
    _, queue, _, _ = served
    queue.enqueue(good("no-agent", SHARED, agent="nobody-here"), name="na-1.json")
    queue.enqueue(good("after-no-agent", SHARED), name="na-2.json")
    wait_for(lambda: answered(queue, "after-no-agent"), what="the message after it")
    reason = wait_for(lambda: failed_entry(queue, "na-1.json"), what="the failed entry")
    assert "nobody-here" in reason["reason"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_failed_directory_removed_by_hand_comes_back(served):
    env, queue, scratch, _ = served
    saved = env.root / "failed-saved"
    os.rename(queue.failed, saved)  # an operator "cleaning up"
    file_with(b"{gone")(queue, scratch, "0-after-rm.json")
    queue.enqueue(good("after-rm", SHARED), name="1-after-rm.json")
    wait_for(lambda: answered(queue, "after-rm"), what="the good message")
    reason = wait_for(lambda: failed_entry(queue, "0-after-rm.json"), what="failed/ recreated")
    assert "malformed JSON" in reason["reason"]
    # a reply is written before its claimed copy leaves processing/
    wait_for(lambda: os.listdir(queue.processing) == [], what="processing/ empty")
