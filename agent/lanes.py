"""Per-conversation lanes: strict order inside a conversation, parallel across them.

Pure bookkeeping, no threads: the dispatcher asks which job may start next, and tells
when one finished or must wait (a retry's backoff). A waiting lane keeps its head job
(order stays strict) but frees its run slot for other conversations.
"""

import heapq
from collections import deque
from collections.abc import Hashable
from typing import Any


class Lanes:
    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self._jobs: dict[Hashable, deque[Any]] = {}
        self._ready: deque[Hashable] = deque()  # idle lanes with work, first come first
        self._running: set[Hashable] = set()
        self._waiting: list[tuple[float, int, Hashable]] = []  # (due, seq, lane)
        self._seq = 0
        self._count = 0  # jobs in all lanes: health() reads it from another thread

    def add(self, lane: Hashable, job: Any) -> None:
        jobs = self._jobs.setdefault(lane, deque())
        jobs.append(job)
        self._count += 1
        if len(jobs) == 1 and lane not in self._running:
            self._ready.append(lane)

    def start_next(self) -> tuple[Hashable, Any] | None:
        """The next (lane, job) to run, marking its lane running; None if none may start."""
        if len(self._running) >= self.concurrency or not self._ready:
            return None
        lane = self._ready.popleft()
        self._running.add(lane)
        return lane, self._jobs[lane][0]

    def finished(self, lane: Hashable) -> None:
        """The lane's head job is over (done or failed for good)."""
        self._running.discard(lane)
        jobs = self._jobs[lane]
        jobs.popleft()
        self._count -= 1
        if jobs:
            self._ready.append(lane)
        else:
            del self._jobs[lane]

    def retry_at(self, lane: Hashable, due: float) -> None:
        """The head job runs again at `due`; until then the lane waits without a slot."""
        self._running.discard(lane)
        self._seq += 1
        heapq.heappush(self._waiting, (due, self._seq, lane))

    def release_due(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, _, lane = heapq.heappop(self._waiting)
            self._ready.append(lane)

    def next_due(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def pending(self) -> int:
        """Jobs not running now (queued behind others, or waiting to retry)."""
        return self._count - len(self._running)
