"""The machine failing under a running supervisor: a full state_dir (a small real tmpfs).

The supervisor stays up, says degraded with the reason, keeps trying, loses no message,
and recovers by itself when space returns.
"""

import contextlib
import os
import subprocess

import pytest

from tests.helpers import pid_alive, skip_or_fail, wait_for
from tests.test_dispatcher import enqueue, reply

pytestmark = pytest.mark.integration


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory) -> None:
    """Write until the file system says ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as handle:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)


def test_a_full_state_dir_degrades_and_recovers_without_losing_a_message(agent_env, small_tmpfs):
    agent_env.root = small_tmpfs  # state_dir and config on the small file system
    agent_env.write_config(
        **{
            "agents.default": {"command": ["cat"]},
            "dispatcher": {"retry_backoff": 0.1, "retry_backoff_max": 0.5, "max_attempts": 50},
        }
    )
    pid = agent_env.start()
    enqueue(agent_env, "before the disk filled", "b1")
    assert wait_for(lambda: reply(agent_env, "b1"), what="b1's reply")
    enqueue(agent_env, "written while full", "w1")  # queued, then the disk fills
    fill(small_tmpfs)

    def degraded():
        code, report = agent_env.status()
        return report if code == 2 else None

    report = wait_for(degraded, what="status degraded while the disk is full")
    assert pid_alive(pid) and report["supervisor"]["pid"] == pid
    (small_tmpfs / "filler").unlink()
    got = wait_for(lambda: reply(agent_env, "w1"), timeout=30, what="w1 answered after")
    assert got["message"] == "written while full"
    wait_for(lambda: agent_env.status()[0] == 0, timeout=30, what="healthy again")
    # (supervisor.state.error itself may be lost: the log file is on the full disk too)
    [recovered] = agent_env.events("supervisor.state.recovered")
    assert recovered["pid"] == pid
    assert not list((agent_env.state_dir / "queue" / "failed").glob("*"))
