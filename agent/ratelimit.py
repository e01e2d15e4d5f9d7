"""Rate-limited events: an error that repeats is logged once per window, with a count.

A worker that hits the same trouble over and over (a full disk, a directory it cannot
read) must not write 1,500 lines a second. The first occurrence of a key is logged at
once; later ones within `window` seconds are only counted, and the next one after the
window is logged with `repeated=N` (how many were held back). Memory is bounded: at most
MAX_KEYS keys are remembered, the oldest forgotten first.
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.log import event

MAX_KEYS = 256


@dataclass
class _Seen:
    logged_at: float  # monotonic
    held_back: int = 0


class RepeatLimiter:
    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def event(
        self, key: str, name: str, message: str, level: int = logging.ERROR, **fields: Any
    ) -> bool:
        """Log the event unless key was logged within the window; True when logged."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.window:
            seen.held_back += 1
            return False
        held_back = seen.held_back if seen is not None else 0
        self._remember(key, _Seen(now))
        if held_back:
            message += f" (and {held_back} more time(s) in the last {self.window:g}s)"
        event(name, message, level=level, repeated=held_back, **fields)
        return True

    def _remember(self, key: str, seen: _Seen) -> None:
        self._seen.pop(key, None)
        self._seen[key] = seen
        while len(self._seen) > MAX_KEYS:
            self._seen.popitem(last=False)
