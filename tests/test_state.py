import json
import threading

import pytest

from agent.fsutil import atomic_write_json
from agent.state import UnreadableState, read_state, write_state


def test_state_round_trip_with_stable_key_order(tmp_path):
    path = tmp_path / "state.json"
    write_state(path, {"workers": [], "supervisor": {"pid": 1, "phase": "ready"}})
    text = path.read_text()
    assert text.index('"schema"') < text.index('"supervisor"') < text.index('"workers"')
    assert read_state(path)["supervisor"] == {"phase": "ready", "pid": 1}
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


def test_readers_never_see_a_torn_file_while_it_is_rewritten(tmp_path):
    path = tmp_path / "state.json"
    big = {
        "supervisor": {"pid": 1},
        "workers": [{"name": f"w{i}", "pad": "x" * 500} for i in range(50)],
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
