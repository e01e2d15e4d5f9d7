"""The queue worker: watches state_dir/queue/incoming.

This is the runtime's skeleton of the worker: it owns the queue directories and reports
their depth. Claiming and handing messages to the dispatcher come with the queue issue.
"""

import os
from typing import Any

from agent.config import Config
from agent.worker import Worker, WorkerContext

QUEUE_DIRS = ("incoming", "processing", "outgoing", "failed")


class QueueWorker(Worker):
    name = "queue"

    def __init__(self, config: Config):
        self.root = config.queue_dir
        self.depth = 0

    def initialize(self, ctx: WorkerContext) -> None:
        for sub in QUEUE_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def run(self, ctx: WorkerContext) -> None:
        while not ctx.wait():
            self.depth = _count_json(self.root / "incoming")

    def health(self) -> dict[str, Any]:
        return {"depth": self.depth}


def _count_json(directory: os.PathLike) -> int:
    with os.scandir(directory) as entries:
        return sum(1 for entry in entries if entry.name.endswith(".json"))
