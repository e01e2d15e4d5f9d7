"""Queue and dispatcher workers in this process under real WorkerRunners: back-pressure
and a dispatcher crash in the middle of the work (real threads, files and children)."""

import os

import pytest

from agent.children import ChildProcesses
from agent.config import load_config
from agent.handoff import Handoff
from agent.queue import Queue, new_message
from agent.worker import RestartPolicy, WorkerRunner
from agent.workers.dispatcher import DispatcherWorker
from agent.workers.queue import QueueWorker
from tests.helpers import wait_for

FAST = RestartPolicy(backoff=0.01, backoff_max=0.05, limit=5, window=60)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[agents.default]\ncommand = ["cat"]\n'
        "[dispatcher]\nconcurrency = 2\n"
    )
    return load_config(str(path), env={})


@pytest.fixture
def runners():
    started: list[WorkerRunner] = []
    children = ChildProcesses()

    def start(worker) -> WorkerRunner:
        runner = WorkerRunner(worker, FAST, children)
        runner.start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.request_stop()
    for runner in started:
        runner.join(10)
        assert not runner.is_alive()
    assert len(children) == 0


def enqueue(queue: Queue, count: int, conversation: str | None = None) -> None:
    queue.ensure_dirs()
    for i in range(count):
        data = new_message("local", f"t{i}", "me", "1", message_id=f"m{i}")
        if conversation:
            data["conversationId"] = conversation
        queue.enqueue(data, name=f"{i:04d}.json")


def test_claims_stop_when_the_dispatcher_has_enough(config, runners):
    handoff = Handoff(limit=3)
    queue = Queue(config.queue_dir)
    enqueue(queue, 10)
    worker = QueueWorker(config, handoff)
    runners(worker)
    wait_for(lambda: worker.claimed == 3, what="three claims")
    assert queue.depth() == 7
    assert sorted(os.listdir(queue.processing)) == ["0000.json", "0001.json", "0002.json"]
    handoff.finished()  # the dispatcher finished one: room for exactly one more, at once
    wait_for(lambda: worker.claimed == 4, what="a fourth claim")
    assert queue.depth() == 6


class CrashesOnce(DispatcherWorker):
    """Its loop raises once, when the fifth run has finished: mid-way through the work."""

    finished_runs = 0

    def _handle(self, item: tuple) -> None:
        if item[0] == "finished":
            self.finished_runs += 1
            if self.finished_runs == 5:
                raise RuntimeError("injected dispatcher crash")
        super()._handle(item)


def test_dispatcher_crash_requeues_its_unfinished_work_in_order(config, runners):
    handoff = Handoff()
    queue = Queue(config.queue_dir)
    enqueue(queue, 20, conversation="one")
    d_runner = runners(CrashesOnce(config, handoff))
    runners(QueueWorker(config, handoff))
    wait_for(lambda: len(os.listdir(queue.outgoing)) == 20, what="all 20 replies")
    assert d_runner.restarts == 1
    # (the reply is written before its claim is removed: wait for the last removal)
    wait_for(lambda: os.listdir(queue.processing) == [], what="processing/ empty")
    wait_for(lambda: handoff.room() == handoff.limit, what="nothing outstanding")
    moments = [os.stat(queue.outgoing / f"local_m{i}.json").st_mtime_ns for i in range(20)]
    assert moments == sorted(moments)


def test_a_reused_file_name_is_a_new_message_each_time(config, runners):
    handoff = Handoff()
    queue = Queue(config.queue_dir)
    queue.ensure_dirs()
    runners(DispatcherWorker(config, handoff))
    runners(QueueWorker(config, handoff))
    for i in range(8):  # a producer that always writes incoming/msg.json
        data = new_message("local", f"t{i}", "me", "1", message_id=f"n{i}")
        queue.enqueue(data, name="msg.json")
        wait_for(lambda: not (queue.incoming / "msg.json").exists(), what=f"n{i} claimed")
    wait_for(lambda: len(os.listdir(queue.outgoing)) == 8, what="eight replies")
    # the reply is written before the claimed copy leaves processing/
    wait_for(lambda: os.listdir(queue.processing) == [], what="processing/ empty")
