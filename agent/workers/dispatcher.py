"""The dispatcher worker: will run the configured agent command for each message.

Skeleton for the runtime: a genuine loop that waits for work and heartbeats.
"""

import queue
from typing import Any

from agent.config import Config
from agent.worker import HEARTBEAT_SECONDS, Worker, WorkerContext


class DispatcherWorker(Worker):
    name = "dispatcher"

    def __init__(self, config: Config):
        self.inbox: queue.Queue = queue.Queue()
        self.in_flight = 0

    def run(self, ctx: WorkerContext) -> None:
        while not ctx.stopping:
            ctx.beat()
            try:
                self.inbox.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                continue

    def wake(self) -> None:
        self.inbox.put(None)

    def health(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight}
