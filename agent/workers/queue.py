"""The queue worker: claims incoming messages oldest first and hands them to the dispatcher.

At the first start in a process it moves whatever a previous run left in processing/
back to incoming/ (original order). It notices new files at once through inotify and
still heartbeats while idle. A file that is not a valid message goes to failed/ with
its reason; nothing in a file can stop the loop.
"""

import logging
import time
from typing import Any

from agent.clock import iso_utc
from agent.config import Config
from agent.dirwatch import DirWatcher
from agent.handoff import Handoff, handoff_for
from agent.log import event
from agent.queue import InvalidMessage, Queue
from agent.worker import Worker, WorkerContext

IDLE_WAIT = 0.5  # seconds between heartbeats while nothing arrives


class QueueWorker(Worker):
    name = "queue"

    def __init__(self, config: Config, handoff: Handoff | None = None):
        self.queue = Queue(config.queue_dir)
        self.handoff = handoff or handoff_for(config.queue_dir)
        self.watcher: DirWatcher | None = None
        self.depth = 0
        self.claimed = 0
        self.last_claimed: float | None = None
        self.last_error: str | None = None

    def initialize(self, ctx: WorkerContext) -> None:
        self.queue.ensure_dirs()
        self.watcher = DirWatcher(self.queue.incoming)
        self.handoff.on_room = self.watcher.wake
        if self.watcher.mode != "inotify":
            event(
                "queue.poll",
                f"inotify unavailable ({self.watcher.error}); polling incoming/ instead",
                worker=self.name,
                level=logging.WARNING,
            )
        if not self.handoff.recovered.is_set():
            moved = self.queue.recover()
            if moved:
                event(
                    "queue.recovered",
                    f"moved {len(moved)} unfinished message(s) from processing/ back to incoming/",
                    worker=self.name,
                    level=logging.WARNING,
                    count=len(moved),
                )
            self.handoff.recovered.set()

    def run(self, ctx: WorkerContext) -> None:
        assert self.watcher is not None
        while not ctx.stopping:
            ctx.beat()
            self._claim_batch(ctx)
            if ctx.stopping:
                break
            self.watcher.wait(IDLE_WAIT)

    def wake(self) -> None:
        if self.watcher is not None:
            self.watcher.wake()

    def shutdown(self, ctx: WorkerContext) -> None:
        self.handoff.on_room = None
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def health(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "claimed": self.claimed,
            "last_claimed": iso_utc(self.last_claimed) if self.last_claimed else None,
            "watch": self.watcher.mode if self.watcher else None,
            "last_error": self.last_error,
        }

    def _claim_batch(self, ctx: WorkerContext) -> None:
        room = self.handoff.room()
        if room <= 0:  # the dispatcher has enough; the rest waits in incoming/
            self.depth = self.queue.depth()
            return
        try:
            names = self.queue.claim_all(limit=room)
        except OSError as exc:  # a full disk or a lost directory: report, retry next round
            self._error(f"claim failed: {exc}")
            return
        for index, name in enumerate(names):
            ctx.beat()  # a batch can be long (up to the hand-off limit)
            try:
                self._hand_over(name)
            except Exception as exc:
                # Nothing claimed may be stranded in processing/: this message and the rest
                # of the batch go back to incoming/, in order, for the next round.
                self._error(f"cannot hand over {name}: {type(exc).__name__}: {exc}")
                self._give_back(names[index:])
                break
        self.depth = self.queue.depth()

    def _give_back(self, names: list[str]) -> None:
        try:
            self.queue.unclaim(names)
        except OSError as exc:  # still in processing/: the next start recovers them
            self._error(f"cannot return {len(names)} message(s) to incoming/: {exc}")

    def _hand_over(self, name: str) -> None:
        """Raises OSError when the file cannot be read; invalid content goes to failed/."""
        try:
            message = self.queue.load(name)
        except InvalidMessage as exc:
            self._reject(name, str(exc))
            return
        self.claimed += 1
        self.last_claimed = time.time()
        event(
            "message.claimed",
            f"claimed {message.channel} message {message.message_id}",
            worker=self.name,
            message_id=message.message_id,
            channel=message.channel,
            file=name,
        )
        self.handoff.put(message)

    def _reject(self, name: str, reason: str) -> None:
        target = self.queue.fail(name, reason)  # OSError: the batch goes back to incoming/
        self.last_error = f"{name}: {reason}"
        event(
            "message.failed",
            f"invalid message {name}: {reason}",
            worker=self.name,
            level=logging.ERROR,
            message_id=None,
            file=name,
            failed_as=target,
            reason=reason,
        )

    def _error(self, text: str) -> None:
        self.last_error = text
        event("queue.error", text, worker=self.name, level=logging.ERROR, error=text)
