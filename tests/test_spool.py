"""The outage spool (agent/pg/spool.py) in state_dir: what a broken disk or a planted file
there does. No database needed."""

import json
import os

import pytest

from agent.pg.spool import COMPLETE, SPOOL_NAME, Pending, Spool


def test_a_spool_survives_a_new_process_and_is_private(tmp_path):
    spool = Spool(tmp_path)
    spool.add(Pending(COMPLETE, 7, reply={"message": "kept"}))
    assert (tmp_path / SPOOL_NAME).stat().st_mode & 0o777 == 0o600
    again = Spool(tmp_path)
    assert [(p.op, p.id, p.reply) for p in again.items()] == [(COMPLETE, 7, {"message": "kept"})]


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory", "garbage"])
def test_a_planted_or_broken_spool_is_set_aside_never_followed_or_waited_on(tmp_path, plant):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps([{"op": COMPLETE, "id": 1, "reply": {"message": "not ours"}}]))
    path = tmp_path / "state" / SPOOL_NAME
    path.parent.mkdir()
    if plant == "symlink":
        path.symlink_to(secret)
    elif plant == "fifo":
        os.mkfifo(path)  # opening it for reading would block without O_NONBLOCK
    elif plant == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\x00{not json")
    spool = Spool(path.parent)
    assert spool.items() == []  # nothing read through the link, nothing waited for
    assert os.path.lexists(path.parent / (SPOOL_NAME + ".bad")), "not set aside"
    spool.add(Pending(COMPLETE, 2, reply={"message": "new"}))
    assert secret.read_text().count("not ours") == 1  # the link's target never written
    assert [p.id for p in Spool(path.parent).items()] == [2]
