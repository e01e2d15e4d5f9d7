"""The in-process hand-off from the queue worker to the dispatcher.

Both workers are built separately by the registry; they meet here, by queue directory.
The queue worker puts each claimed message; the dispatcher takes them in that order.
`recovered` records that this process already moved processing/ back to incoming/ once:
after that, processing/ belongs to the dispatcher (a restarted worker must not undo it).
"""

import queue
import threading
from collections.abc import Callable
from pathlib import Path

from agent.queue import Message

_lock = threading.Lock()
_by_root: dict[Path, "Handoff"] = {}
MAX_OUTSTANDING = 1000


class Handoff:
    """Claimed messages in order, and how many the dispatcher has not finished yet.

    The queue worker claims only while fewer than MAX_OUTSTANDING are outstanding, so a
    flood of files waits in incoming/ (where `depth` counts it), not in memory.
    """

    def __init__(self, limit: int = MAX_OUTSTANDING) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.recovered = threading.Event()
        self.limit = limit
        self.on_room: Callable[[], None] | None = None  # called when a full hand-off frees up
        self.on_finished: Callable[[], None] | None = None  # called when any message is done
        self._lock = threading.Lock()
        self._outstanding = 0

    def put(self, message: Message) -> None:
        with self._lock:
            self._outstanding += 1
        self.inbox.put(("message", message))

    def finished(self) -> None:
        """One handed-over message is done with (replied, failed, or a duplicate)."""
        with self._lock:
            was_full = self._outstanding >= self.limit
            self._outstanding -= 1
        if was_full and self.on_room is not None:
            self.on_room()
        if self.on_finished is not None:
            self.on_finished()

    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def room(self) -> int:
        with self._lock:
            return self.limit - self._outstanding


def handoff_for(root: Path) -> Handoff:
    key = Path(root).resolve()
    with _lock:
        if key not in _by_root:
            _by_root[key] = Handoff()
        return _by_root[key]
