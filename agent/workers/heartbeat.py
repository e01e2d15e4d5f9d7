"""The heartbeat worker: every `[heartbeat] interval` seconds it will prompt each agent.

Skeleton for the runtime: it keeps its schedule and heartbeats between ticks.
"""

import time
from typing import Any

from agent.clock import iso_utc
from agent.config import Config
from agent.worker import Worker, WorkerContext


class HeartbeatWorker(Worker):
    name = "heartbeat"

    def __init__(self, config: Config):
        self.interval = config.heartbeat.interval
        self.last_tick: float | None = None

    def run(self, ctx: WorkerContext) -> None:
        next_tick = time.monotonic() + self.interval
        while not ctx.wait(max(next_tick - time.monotonic(), 0)):
            if time.monotonic() >= next_tick:
                self.last_tick = time.time()
                next_tick += self.interval

    def health(self) -> dict[str, Any]:
        return {"last_tick": iso_utc(self.last_tick) if self.last_tick else None}
