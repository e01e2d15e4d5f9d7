import json
import threading

import pytest

from agent.fsutil import atomic_write_json
from agent.state import SupervisorRecord, UnreadableState, read_state, write_state


def test_state_round_trip_with_stable_key_order(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, {"workers": [], "supervisor": {"pid": 1, "phase": "ready"}})
    text = path.read_text()
    assert text.index('"schema"') < text.index('"supervisor"') < text.index('"workers"')
    assert read_state(path).supervisor == SupervisorRecord(phase="ready", pid=1)
    write_state(path, {"workers": [], "supervisor": {"phase": "ready", "pid": 1}})
    assert path.read_text() == text  # same content, same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_missing_state_is_none_and_garbage_is_named(tmp_path):
    path = tmp_path / "state.json"
    assert read_state(path) is None
    path.write_text("{not json")
    with pytest.raises(UnreadableState, match=r"state\.json: not valid JSON"):
        read_state(path)
    path.write_text("[1, 2]")
    with pytest.raises(UnreadableState, match="not an agent state file"):
        read_state(path)


BAD_SHAPES = {
    "[]": "expected an object, got a list",
    '{"pid": "x"}': "supervisor: expected an object, got null",
    '{"supervisor": {"pid": "x"}}': "supervisor.pid: expected a process id, got 'x'",
    '{"supervisor": {}, "workers": 5}': "workers: expected a list",
    '{"supervisor": {"pid": 1' + "0" * 30 + "}}": "supervisor.pid: expected a process id",
    '{"supervisor": {"pid": 1' + "0" * 5000 + "}}": "not valid JSON",
    '{"supervisor": {"hang_timeout": NaN}}': "not valid JSON",
    '{"supervisor": {"hang_timeout": 1e999}}': "hang_timeout: expected a number of seconds",
    '{"supervisor": {"started_at": "yesterday"}}': "started_at: expected an ISO 8601 time",
    '{"supervisor": {"phase": ["ready"]}}': "phase: expected one of",
    '{"supervisor": {}, "workers": [{"name": "q", "state": "running", "detail": [1]}]}': (
        "workers[0].detail: expected an object"
    ),
    '{"supervisor": {}, "workers": [{"name": {"a": 1}, "state": "running"}]}': "workers[0].name",
    '{"supervisor": {}, "workers": [{"name": "q", "state": "running", "restarts": -1}]}': (
        "restarts: expected a count"
    ),
    "[" * 100000 + "]" * 100000: "not valid JSON",
    "\xff\xfe": "not valid JSON",
}


@pytest.mark.parametrize("text", list(BAD_SHAPES))
def test_a_state_file_of_the_wrong_shape_is_unreadable_evidence_named_in_one_line(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(UnreadableState) as caught:
        read_state(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 300
    assert BAD_SHAPES[text] in message


def test_a_symlinked_or_oversized_state_file_is_not_followed_or_read(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"supervisor": {"pid": 1}}')
    path = tmp_path / "state.json"
    path.symlink_to(outside)
    with pytest.raises(UnreadableState, match="symlink"):
        read_state(path)
    path.unlink()
    path.write_text('{"supervisor": {}, "pad": "' + "x" * (2 * 1024 * 1024) + '"}')
    with pytest.raises(UnreadableState, match="larger than"):
        read_state(path)


def test_writing_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    path = tmp_path / "state.json"
    path.symlink_to(outside)
    write_state(path, {"supervisor": {"pid": 1}})
    assert outside.read_text() == "precious"
    assert not path.is_symlink() and read_state(path).supervisor.pid == 1
    assert path.stat().st_mode & 0o077 in (0o040, 0o000)  # 0640 at most


def test_readers_never_see_a_torn_file_while_it_is_rewritten(tmp_path):
    path = tmp_path / "state.json"
    big = {
        "supervisor": {"pid": 1},
        "workers": [
            {"name": f"w{i}", "state": "running", "detail": {"pad": "x" * 500}} for i in range(50)
        ],
    }
    write_state(path, big)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            atomic_write_json(path, {**big, "n": n})

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2000):
            assert len(json.loads(path.read_text())["workers"]) == 50
    finally:
        stop.set()
        thread.join()
