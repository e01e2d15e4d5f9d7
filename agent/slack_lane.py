"""A lane: one Slack channel's jobs, done in order in their own thread (slack_outbound).

Lanes keep channels apart: one channel's pace, rate limit or outage never holds up
another. In a lane a Web API call is retried through rate limits (Retry-After) and
transient errors (Backoff); posts are paced to one per POST_INTERVAL. A job waits while
the profile is not connected; an exception in a job is logged and never kills the lane.
A lane idle for LANE_IDLE seconds ends its thread (Outbound.retire, under the same lock
as Outbound.submit, so no job is ever put into a lane that has ended).
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.backoff import Backoff
from agent.log import event
from agent.slack_api import POSTS, RATELIMITED, TRANSIENT, WORKER, ApiFailure
from agent.slack_jobs import Delivery, Job

if TYPE_CHECKING:
    from agent.slack_outbound import Outbound

POST_INTERVAL = 1.0  # Slack allows about one message per second per channel
POST_BACKOFF = 1.0
POST_BACKOFF_MAX = 60.0
IDLE_WAIT = 0.5
LANE_IDLE = 60.0  # a lane with nothing to do for this long ends its thread


@dataclass(frozen=True)
class Attempted:
    """A call that succeeded: its answer, and how many attempts it took."""

    answer: Any
    attempts: int


class Stopping(Exception):
    """The profile is stopping: leave the job where it is."""


class Lane:
    """One Slack channel's posts, in order, in their own thread."""

    def __init__(self, outbound: "Outbound", channel: str):
        self.outbound = outbound
        self.channel = channel
        self.jobs: deque[Job] = deque()
        self.next_post = 0.0  # monotonic time before which this channel gets no post
        self.wakeup = threading.Condition()
        self.thread = threading.Thread(
            target=self._run, name=f"slack-{outbound.name}-{channel}", daemon=True
        )
        self.thread.start()

    def put(self, job: Job) -> None:
        with self.wakeup:
            self.jobs.append(job)
            self.wakeup.notify()

    def _next(self) -> Job | None:
        with self.wakeup:
            if not self.jobs:
                self.wakeup.wait(IDLE_WAIT)
            return self.jobs.popleft() if self.jobs else None

    def _run(self) -> None:
        stop = self.outbound.stop_event
        idle_since = time.monotonic()
        while not stop.is_set():
            job = self._next()
            if job is None:
                if time.monotonic() - idle_since > LANE_IDLE and self.outbound.retire(self):
                    return  # a channel with nothing to post holds no thread
                continue
            try:
                self._wait_ready()
                self.outbound.perform(self, job)
            except Stopping:
                return
            except Exception as exc:  # a bug must not kill the lane: the reply stays
                self._crashed(exc)
            finally:
                if isinstance(job, Delivery):  # the next scan may hand it over again
                    self.outbound.finish(job.name)
                idle_since = time.monotonic()

    def _wait_ready(self) -> None:
        while not self.outbound.ready():
            if self.outbound.stop_event.wait(0.1):
                raise Stopping

    def _crashed(self, exc: Exception) -> None:
        event(
            "slack.reply.error",
            f"slack profile {self.outbound.name}: posting in {self.channel} failed: "
            f"{type(exc).__name__}: {self.outbound.api.redact(str(exc))}",
            worker=WORKER,
            level=logging.ERROR,
            profile=self.outbound.name,
            slack_channel=self.channel,
        )
        if self.outbound.stop_event.wait(POST_BACKOFF):
            raise Stopping from None

    def call(self, method: str, **params: Any) -> "Attempted":
        """One Web API call, retried through rate limits and transient errors."""
        return self.retrying(method, lambda: self.outbound.api.call(method, **params))

    def retrying(self, method: str, attempt_once: Callable[[], Any]) -> "Attempted":
        """Run one call, retried through rate limits and transient errors.

        Returns its answer and the number of attempts; raises ApiFailure for auth and
        permanent errors, Stopping when the profile stops meanwhile.
        """
        backoff = Backoff(POST_BACKOFF, POST_BACKOFF_MAX)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pace(method)
                return Attempted(attempt_once(), attempt)
            except ApiFailure as failure:
                if failure.kind == RATELIMITED:
                    delay = failure.retry_after
                    self._ratelimited(method, delay)
                elif failure.kind == TRANSIENT:
                    delay = backoff.next()
                    self._retrying(method, failure, attempt, delay)
                else:
                    raise
            if self.outbound.stop_event.wait(delay):
                raise Stopping

    def _pace(self, method: str) -> None:
        """At most one post per POST_INTERVAL in this channel (other calls are not paced)."""
        if method not in POSTS:
            return
        delay = self.next_post - time.monotonic()
        if delay > 0 and self.outbound.stop_event.wait(delay):
            raise Stopping
        self.next_post = time.monotonic() + POST_INTERVAL

    def _ratelimited(self, method: str, delay: float) -> None:
        event(
            "slack.ratelimited",
            f"slack profile {self.outbound.name}: {method} in {self.channel} rate limited, "
            f"retrying in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.outbound.name,
            slack_channel=self.channel,
            retry_after_s=delay,
        )

    def _retrying(self, method: str, failure: ApiFailure, attempt: int, delay: float) -> None:
        event(
            "slack.reply.retry",
            f"slack profile {self.outbound.name}: {method} in {self.channel} failed "
            f"({failure.error}); retry in {delay:g}s",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.outbound.name,
            slack_channel=self.channel,
            error=failure.error,
            attempt=attempt,
        )
