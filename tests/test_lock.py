import fcntl
import os
import subprocess
import sys
import threading

import pytest

from agent.errors import AlreadyRunning
from agent.lock import SupervisorLock, probe


def test_lock_transitions_free_held_free(tmp_path):
    path = tmp_path / "agent.lock"
    assert probe(path).held is False  # no file yet
    lock = SupervisorLock(path)
    lock.acquire()
    assert lock.held
    assert probe(path).held and probe(path).pid == os.getpid()
    lock.release()
    assert not lock.held
    assert probe(path).held is False
    assert path.exists()  # never deleted: deleting lock files races


def test_second_holder_is_refused_with_the_first_pid(tmp_path):
    path = tmp_path / "agent.lock"
    first = SupervisorLock(path)
    first.acquire()
    with pytest.raises(AlreadyRunning, match=rf"already running \(pid {os.getpid()}\)"):
        SupervisorLock(path).acquire()
    first.release()
    second = SupervisorLock(path)
    second.acquire()  # free again
    second.release()


def test_stale_pid_in_an_unheld_lock_file_means_not_running(tmp_path):
    path = tmp_path / "agent.lock"
    path.write_text("999999\n")  # left by a killed supervisor
    assert probe(path).held is False
    lock = SupervisorLock(path)
    lock.acquire(pid=4242)
    assert path.read_text() == "4242\n"
    lock.release()


def test_lock_held_by_another_process_is_seen(tmp_path):
    path = tmp_path / "agent.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from agent.lock import SupervisorLock;"
            f"SupervisorLock(__import__('pathlib').Path({str(path)!r})).acquire();"
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        seen = probe(path)
        assert seen.held and seen.pid == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert probe(path).held is False  # the kernel dropped it with the process


def test_a_readers_shared_probe_does_not_make_a_start_fail(tmp_path):
    path = tmp_path / "agent.lock"
    path.touch()
    reader_fd = os.open(path, os.O_RDONLY)
    fcntl.flock(reader_fd, fcntl.LOCK_SH)
    release = threading.Timer(0.2, lambda: os.close(reader_fd))
    release.start()
    lock = SupervisorLock(path)
    lock.acquire()  # waits out the reader instead of claiming "already running"
    assert lock.held
    lock.release()
    release.join()
