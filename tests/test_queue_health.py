"""The queue's side of "a stalled queue is visible", and the trust rules that need a
supervisor running as an unprivileged user (root reads every file and moves every entry)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent.queue import Queue, new_message
from agent.ratelimit import RepeatLimiter
from tests.helpers import AgentEnv, skip_or_fail, wait_for
from tests.test_notify import NotifyListener, run_supervisor

pytestmark = pytest.mark.integration

NOBODY = 65534


def stage(
    queue: Queue, name: str, data: dict | bytes, owner: int | None = None, mode: int = 0o644
) -> None:
    staged = queue.tmp / name
    staged.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    if owner is not None:
        os.chown(staged, owner, owner)
    os.chmod(staged, mode)
    os.rename(staged, queue.incoming / name)


def test_a_stalled_queue_is_degraded_and_withholds_the_watchdog(agent_env, tmp_path):
    """1,001 messages for an agent that sleeps: the hand-off holds 1,000, one waits and
    nothing is claimed for longer than stall_timeout."""
    agent_env.write_config(
        **{
            "agents.default": {"command": ["sleep", "60"]},
            "dispatcher": {"concurrency": 1},
            "queue": {"stall_timeout": 1},
            "logging": {"sink": "file"},
        }
    )
    listener = NotifyListener(tmp_path / "notify")
    proc = run_supervisor(agent_env, tmp_path / "notify")
    try:
        wait_for(lambda: "READY=1" in listener.poll(), what="READY=1")
        queue = Queue(agent_env.state_dir / "queue")
        for i in range(1001):
            stage(queue, f"{i:05d}.json", new_message("local", "x", "t", "t", f"s{i}"))
        detail = wait_for(
            lambda: (d := agent_env.worker("queue")["detail"]).get("stalled") and d,
            what="the queue worker reporting a stall",
        )
        assert detail["depth"] == 1 and "none claimed for" in detail["degraded"]
        assert detail["oldest_age_s"] >= 0
        code, report = agent_env.status()
        assert code == 2 and report["supervisor"]["health"] == "degraded"
        assert any(m.startswith("STATUS=degraded") for m in listener.poll())
        assert listener.silent_for(1.5, "WATCHDOG=1")
        [stalled] = agent_env.events("queue.stalled")
        assert stalled["depth"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_a_repeated_error_is_logged_once_per_window_with_a_count(caplog):
    now = [0.0]
    limiter = RepeatLimiter(window=30.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="agent"):
        for step in range(1500):
            now[0] = step * 0.001  # 1,500 times in 1.5 s
            limiter.event("k", "queue.error", "disk full")
        now[0] = 31.0
        limiter.event("k", "queue.error", "disk full")
    first, second = [r for r in caplog.records if r.name == "agent"]
    assert first.getMessage() == "disk full"
    assert "1499 more time(s)" in second.getMessage()
    assert second.fields["repeated"] == 1499


@pytest.fixture
def unprivileged(tmp_path):
    """A supervisor running as nobody, in a directory tree nobody owns."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        skip_or_fail("needs root and setpriv to run the supervisor as another user")
    root = Path(tempfile.mkdtemp(prefix="agent-unpriv-", dir="/tmp"))
    os.chmod(root, 0o755)
    os.chown(root, NOBODY, NOBODY)
    env = AgentEnv(root)
    env.write_config(**{"agents.default": {"command": ["cat"]}, "logging": {"sink": "file"}})
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*drop, sys.executable, "-c", "import agent"], capture_output=True)
    if probe.returncode != 0:
        skip_or_fail(f"nobody cannot run this Python: {probe.stderr.decode()[-200:]}")
    proc = subprocess.Popen(
        [*drop, sys.executable, "-m", "agent", "run"],
        env=env.cmd_env(HOME=str(root)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or env.status()[0] == 0,
            what="the unprivileged supervisor running",
        )
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield env, Queue(env.state_dir / "queue")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        shutil.rmtree(root, ignore_errors=True)


def test_an_unreadable_file_fails_and_an_unmovable_one_is_quarantined(unprivileged):
    env, queue = unprivileged
    wait_for(lambda: queue.incoming.is_dir(), what="the queue directories")
    stage(queue, "0-unreadable.json", new_message("local", "x", "t", "t", "u"), mode=0o000)
    stage(queue, "1-good.json", new_message("local", "hi", "t", "t", "g1"), owner=NOBODY)
    wait_for(lambda: (queue.outgoing / "local_g1.json").exists(), what="the good message answered")
    reason = json.loads(
        wait_for(lambda: _read(queue.failed / "0-unreadable.json.reason"), what="its reason")
    )
    assert "Permission denied" in reason["reason"]

    # incoming/ owned by root and sticky: nobody may not rename root's files out of it
    os.chown(queue.incoming, 0, 0)
    os.chmod(queue.incoming, 0o1777)
    stage(queue, "2-stuck.json", new_message("local", "x", "t", "t", "st"))
    stage(queue, "3-good.json", new_message("local", "hi", "t", "t", "g2"), owner=NOBODY)
    wait_for(lambda: (queue.outgoing / "local_g2.json").exists(), what="the next good message")
    for i in range(3):  # more rounds: the quarantined entry is not tried again
        stage(queue, f"4-good-{i}.json", new_message("local", "hi", "t", "t", f"g3{i}"), NOBODY)
        time.sleep(0)  # each rename wakes the worker for a round of its own
    wait_for(
        lambda: all((queue.outgoing / f"local_g3{i}.json").exists() for i in range(3)),
        what="three more good messages",
    )
    assert (queue.incoming / "2-stuck.json").exists()
    note = json.loads(wait_for(lambda: _read(queue.failed / "2-stuck.json.reason"), what="note"))
    assert note["quarantined"] is True and "Operation not permitted" in note["reason"]
    assert len([e for e in env.events("message.quarantined") if e["file"] == "2-stuck.json"]) == 1
    detail = wait_for(  # a snapshot may be taken while a good message is being claimed
        lambda: (d := env.worker("queue")["detail"])["quarantined"] == 1 and d["depth"] == 0 and d,
        what="status counting one quarantined entry, and not in depth",
    )
    assert "degraded" not in detail


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@pytest.fixture
def small_queue_fs(agent_env):
    """state_dir/queue on a 512 KiB tmpfs of its own (state file and logs stay on disk)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        skip_or_fail("needs root to mount a small tmpfs for the full-disk case")
    mountpoint = agent_env.state_dir / "queue"
    mountpoint.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0750", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        agent_env.agentctl("stop")
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_defers_entries_with_backoff_and_loses_nothing(agent_env, small_queue_fs):
    agent_env.write_config(
        **{
            "agents.default": {"command": ["cat"]},
            "dispatcher": {"retry_backoff": 0.1, "retry_backoff_max": 0.5},
            "logging": {"sink": "file"},
        }
    )
    agent_env.start()
    queue = Queue(small_queue_fs)
    (queue.tmp / "poison.json").write_bytes(b"{poison")
    (queue.tmp / "good.json").write_text(json.dumps(new_message("local", "hi", "t", "t", "full")))
    filler = queue.tmp / "filler"
    with open(filler, "wb") as handle, pytest.raises(OSError):
        while True:  # until ENOSPC
            handle.write(b"\0" * 65536)
            handle.flush()
    os.rename(queue.tmp / "poison.json", queue.incoming / "poison.json")
    os.rename(queue.tmp / "good.json", queue.incoming / "good.json")
    wait_for(
        lambda: agent_env.events("queue.retry_later"),
        what="the poison file deferred (its reason file cannot be written)",
    )
    time.sleep(3)  # a window in which a spinning worker would log hundreds of lines
    assert len(agent_env.events("queue.retry_later")) <= 4
    assert not (queue.failed / "poison.json").exists()
    assert agent_env.status()[0] in (0, 2)  # alive (the dispatcher may say its retries)
    filler.unlink()
    wait_for(
        lambda: (queue.outgoing / "local_full.json").exists(),
        timeout=90,  # the deferral backs off: 1, 2, 4 ... s
        what="the good message answered once space returned",
    )
    reason = wait_for(lambda: _read(queue.failed / "poison.json.reason"), timeout=90, what="reason")
    assert "malformed JSON" in json.loads(reason)["reason"]
    # a reply is written before its claimed copy leaves processing/
    wait_for(lambda: os.listdir(queue.processing) == [], what="processing/ empty")


def test_a_mount_point_in_incoming_is_quarantined_once_and_skipped(agent_env):
    """Root moves any file, but not a mount point (EBUSY): it stays, skipped, not retried."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        skip_or_fail("needs root to bind-mount a file onto an entry of incoming/")
    agent_env.write_config(**{"agents.default": {"command": ["cat"]}, "logging": {"sink": "file"}})
    queue = Queue(agent_env.state_dir / "queue")
    queue.ensure_dirs()
    target = queue.incoming / "0-mounted.json"
    target.write_text("{}")
    source = agent_env.root / "source.json"
    source.write_text(json.dumps(new_message("local", "x", "t", "t", "mounted")))
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot bind-mount: {done.stderr.decode().strip()}")
    try:
        agent_env.start()
        for i in range(3):  # several rounds: the quarantined entry is never tried again
            stage(queue, f"1-good-{i}.json", new_message("local", "hi", "t", "t", f"m{i}"))
            wait_for(lambda i=i: (queue.outgoing / f"local_m{i}.json").exists(), what=f"m{i}")
        reason_file = queue.failed / "0-mounted.json.reason"
        note = json.loads(wait_for(lambda: _read(reason_file), what="the quarantine note"))
        assert note["quarantined"] is True and "EBUSY" in note["reason"]
        assert len(agent_env.events("message.quarantined")) == 1
        wait_for(  # a snapshot may be taken while a good message is being claimed
            lambda: (
                (d := agent_env.worker("queue")["detail"])["quarantined"] == 1 and d["depth"] == 0
            ),
            what="status counting the quarantined entry, and not in depth",
        )
        code, report = agent_env.status()
        assert code == 0, report
    finally:
        agent_env.agentctl("stop")
        subprocess.run(["umount", str(target)], check=False)
