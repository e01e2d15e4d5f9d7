"""Property-based: arbitrary bytes and arbitrary JSON as message files.

In-process (fast, many examples): parse() either accepts a message that keeps every
invariant the dispatcher relies on, or raises InvalidMessage; never anything else. The
queue moves every claimed file to a single place: handed over, or failed/ with a reason.
End to end (a smaller sample, one supervisor): whatever the file held, it ends in
outgoing/ or failed/, and a good message written after it is answered.
"""

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.messages import FIELD_LIMITS, MAX_REPLY_NAME_BYTES, make_reply, reply_name
from agent.queue import InvalidMessage, Message, Queue, new_message, parse
from tests.helpers import AgentEnv, wait_for

# every code point, lone surrogates and NUL included
CHARS = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.just("\x00"))
TEXT = st.text(CHARS, max_size=40)
LONG_TEXT = st.one_of(TEXT, st.text(st.sampled_from("a/%é"), min_size=100, max_size=300))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | LONG_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)
FIELDS = [
    "channel",
    "messageId",
    "message",
    "sender",
    "senderId",
    "timestamp",
    "channelProfileId",
    "conversationId",
    "agent",
    "files",
    "attempts",
]
# a valid message with some fields replaced by anything, or removed
NEAR_VALID = st.dictionaries(st.sampled_from(FIELDS), JSON | st.just("REMOVE"), max_size=4).map(
    lambda changes: {
        k: v
        for k, v in {**new_message("local", "hi", "s", "1", "m-1"), **changes}.items()
        if v != "REMOVE"
    }
)
FILE_BYTES = st.one_of(
    st.binary(max_size=400),
    JSON.map(lambda v: json.dumps(v).encode()),
    NEAR_VALID.map(lambda v: json.dumps(v).encode()),
    NEAR_VALID.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)


def assert_safe_message(data: dict, files_dir: Path) -> None:
    """What the dispatcher, the environment of the agent and the reply file rely on."""
    text = json.dumps(data, ensure_ascii=False)
    text.encode("utf-8")  # no unpaired surrogate anywhere
    assert "\\u0000" not in json.dumps(data) and "\x00" not in text
    for key in ("channel", "messageId", "message", "sender", "senderId"):
        assert isinstance(data[key], str)
    for key, limit in FIELD_LIMITS.items():
        assert data.get(key) is None or len(data[key]) <= limit
    assert len(reply_name(data["channel"], data["messageId"]).encode()) <= MAX_REPLY_NAME_BYTES
    for path in data.get("files") or []:
        assert os.path.realpath(path).startswith(os.path.realpath(files_dir) + "/")
    reply = make_reply(Message("x.json", data), "ok", "default")
    json.dumps(reply, ensure_ascii=False).encode("utf-8")


@settings(max_examples=600, deadline=None)
@given(raw=FILE_BYTES)
def test_parse_accepts_only_safe_messages_and_otherwise_says_why(raw):
    files_dir = Path("/var/lib/agent/queue/files")
    try:
        data = parse(raw, files_dir)
    except InvalidMessage as exc:
        assert str(exc)  # a reason to write into failed/
        return
    assert_safe_message(data, files_dir)


@pytest.fixture(scope="module")
def disk_queue(tmp_path_factory):
    queue = Queue(tmp_path_factory.mktemp("props") / "queue")
    queue.ensure_dirs()
    return queue


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=FILE_BYTES)
def test_every_claimed_file_is_handed_over_or_failed_with_a_reason(raw, disk_queue):
    queue = disk_queue
    staged = queue.tmp / "h.json"
    staged.write_bytes(raw)
    os.rename(staged, queue.incoming / "h.json")
    [name] = queue.claim_all()
    try:
        message = queue.load(name)
    except InvalidMessage as exc:
        target = queue.fail(name, str(exc))
        assert json.loads((queue.failed / f"{target}.reason").read_text())["reason"]
        assert (queue.failed / target).read_bytes() == raw
    else:
        assert_safe_message(message.data, queue.files)
        queue.done(name)
    assert os.listdir(queue.processing) == [] and os.listdir(queue.incoming) == []


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    env = AgentEnv(tmp_path_factory.mktemp("props-e2e"))
    env.write_config(**{"agents.default": {"command": ["cat"]}, "logging": {"sink": "file"}})
    env.start()
    yield env, Queue(env.state_dir / "queue")
    env.agentctl("stop")


_counter = iter(range(10**9))


@pytest.mark.integration
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=FILE_BYTES)
def test_end_to_end_any_file_ends_in_outgoing_or_failed_and_good_ones_flow(raw, served):
    _, queue = served
    n = next(_counter)
    name = f"{n:06d}-h.json"
    staged = queue.tmp / name
    staged.write_bytes(raw)
    os.rename(staged, queue.incoming / name)
    good = new_message("local", "hi", "s", "1", f"good-{n}", conversationId="shared")
    queue.enqueue(good, name=f"{n:06d}-z.json")
    wait_for(
        lambda: (queue.outgoing / f"local_good-{n}.json").exists(),
        timeout=10,
        what=f"the good message after example {n}",
    )
    wait_for(lambda: _resolved(queue, name, raw), what=f"example {n} in outgoing/ or failed/")


def _resolved(queue: Queue, name: str, raw: bytes) -> bool:
    if os.path.lexists(queue.incoming / name) or os.path.lexists(queue.processing / name):
        return False
    if os.path.lexists(queue.failed / name):
        return True
    try:
        data = parse(raw, queue.files)
    except InvalidMessage:
        return False  # must be in failed/ (possibly under a name made unique)
    return os.path.exists(queue.outgoing / reply_name(data["channel"], data["messageId"])) or any(
        json.loads(p.read_text()).get("file") == name for p in queue.failed.glob("*.reason")
    )
