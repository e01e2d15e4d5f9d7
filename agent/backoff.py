"""Exponential backoff: a delay that doubles up to a ceiling and starts over on success.

One helper for every retry loop (reconnects, transient post errors), so the doubling and
the ceiling are written once. Not thread-safe: each loop owns its own Backoff.
"""

from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float
    ceiling: float
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.first

    def next(self) -> float:
        """The delay to wait now; the following one is twice as long (at most `ceiling`)."""
        delay = self.current
        self.current = min(self.current * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self.current = self.first
