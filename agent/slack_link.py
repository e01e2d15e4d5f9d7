"""One Slack profile's life: connect, serve, reconnect; its state and health.

A ProfileLink owns one [slack.profiles.NAME] in its own thread and wires the units that
do the work: SlackApi (Web API calls, redaction), slack_connection (Socket Mode),
Envelopes (ack first, then handle), Inbound (Slack message -> queue message), Backfill
(history since the cursors), Outbound (replies, notices, reactions: one lane per
channel), SharedFiles (files in). The connect order is the cursor protocol's:
auth.test, pin the cursors, open the socket, backfill. When the connection drops, or an
auth error happens anywhere, or the shared database (backend = "postgres") fails, it
reconnects by itself with backoff; tokens are read again each time. Every state change is
an event; a repeated failure is logged once.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from agent.agentenv import agent_workdir
from agent.backoff import Backoff
from agent.config import Config, SlackProfileConfig
from agent.errors import DatabaseError
from agent.log import event
from agent.metrics import NO_METRICS, Metrics
from agent.queue import Queue
from agent.slack_api import (
    CONNECTING,
    DISCONNECTED,
    RUNNING,
    WORKER,
    ApiFailure,
    SlackApi,
    SlackProblem,
    read_token,
)
from agent.slack_backfill import Backfill
from agent.slack_connection import close, is_dead, open_socket
from agent.slack_cursors import Cursors, FileSlack
from agent.slack_envelopes import Envelopes
from agent.slack_feedback import Reactions
from agent.slack_files import SharedFiles
from agent.slack_inbound import Inbound
from agent.slack_outbound import Outbound, ReplySettings
from agent.slack_store import ROUTE_MAX_AGE, ProfileStore


class SlackStores(Protocol):
    """Where the profiles' memory is: slack_cursors.FileSlack, agent.pg.slackstore.PgSlack."""

    def profile(self, state_dir: Path, name: str) -> tuple[ProfileStore, Cursors]: ...


RECONNECT_BACKOFF = 0.5  # first reconnect delay; doubles up to RECONNECT_BACKOFF_MAX
RECONNECT_BACKOFF_MAX = 30.0
STABLE_SECONDS = 30.0  # a connection up this long resets the reconnect backoff
SERVE_TICK = 0.5


class ProfileLink:
    """One profile: its connection thread, its state, its units."""

    def __init__(
        self,
        name: str,
        profile: SlackProfileConfig,
        config: Config,
        queue: Queue,
        metrics: Metrics = NO_METRICS,
        stores: SlackStores | None = None,
    ):
        self.name = name
        self.profile = profile
        # files by default; the shared database's with [queue] backend = "postgres"
        self.store, cursors = (stores or FileSlack()).profile(config.state_dir, name)
        self.api = SlackApi(name, config.slack.api_base_url, metrics)
        self.stop_event = threading.Event()
        self.kick = threading.Event()  # wakes the serve loop (a problem, stop)
        # under the queue's files/: the only place a message's `files` may point to
        shared = queue.files / "slack" / name
        self.files = SharedFiles(shared, self.api, profile.max_file_bytes)
        self.outbound = Outbound(
            name,
            self.api,
            self.store,
            queue,
            self.stop_event,
            ready=lambda: self.state == RUNNING and self._problem is None,
            on_problem=self._problem_elsewhere,
            files=self.files,
            settings=ReplySettings(
                Reactions.of(profile),
                profile.progress_after,
                lambda agent: _workdir(config, agent or profile.agent),
            ),
        )
        self.inbound = Inbound(
            name, profile, self.api, self.store, queue, self.outbound, self.files, cursors
        )
        self.envelopes = Envelopes(self.inbound, metrics)
        self.backfill = Backfill(
            name, self.api, self.inbound, self._backfill_channels, self.stop_event.wait
        )
        self.state = CONNECTING
        self.last_error: str | None = None
        self.since = time.time()
        self._last_failure: tuple[str, str | None] | None = None
        self._problem: SlackProblem | None = None  # from another thread: reconnect
        self.socket: Any = None
        self._session: str | None = None
        self.thread: threading.Thread | None = None
        self.crash: BaseException | None = None

    @property
    def secrets(self) -> list[str]:
        return self.api.secrets

    @property
    def pending(self) -> set[str]:
        return self.outbound.pending

    def offer(self, name: str) -> None:
        """Post the reply outgoing/<name> (once)."""
        self.outbound.offer(name)

    # ---- state

    def _set(self, state: str, error: str | None = None) -> None:
        previous = self.state
        if state != previous:
            self.since = time.time()
        self.state = state
        if error is not None or state == RUNNING:
            self.last_error = error
        if state == previous:
            return
        # A profile that keeps failing the same way logs it once, not at every retry.
        failure = state not in (RUNNING, CONNECTING)
        repeated = (state, error) == self._last_failure or (
            state == CONNECTING and self._last_failure is not None
        )
        if failure:
            self._last_failure = (state, error)
        elif state == RUNNING:
            self._last_failure = None
        level = logging.DEBUG if repeated else logging.WARNING if failure else logging.INFO
        event(
            f"slack.profile.{state}",
            f"slack profile {self.name}: {state}" + (f" ({error})" if error else ""),
            worker=WORKER,
            level=level,
            profile=self.name,
            state=state,
            error=error,
        )

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "last_error": self.last_error,
            "enqueued": self.inbound.enqueued,
            "posted": self.outbound.posted,
            "outbox": len(self.outbound.pending),
            "lanes": len(self.outbound.lanes),
        }

    # ---- thread

    def start(self) -> None:
        self.store.prepare()
        self.files.prune(ROUTE_MAX_AGE)  # files of messages whose reply never came
        self.thread = threading.Thread(target=self._main, name=f"slack-{self.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.kick.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.thread is not None:
            self.thread.join(timeout)
        self.outbound.join(max(deadline - time.monotonic(), 0.1))

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _main(self) -> None:
        try:
            self._live()
        except BaseException as exc:  # reported by the worker loop, which then crashes
            self.crash = exc
        finally:
            self._close()

    def _live(self) -> None:
        backoff = Backoff(RECONNECT_BACKOFF, RECONNECT_BACKOFF_MAX)
        while not self.stop_event.is_set():
            connected = None
            try:
                self._connect()
                connected = time.monotonic()
                self._serve()
                if self.stop_event.is_set():
                    return
                self._set(DISCONNECTED, "the Socket Mode connection closed")
            except SlackProblem as problem:
                self._set(problem.state, str(problem))
            except DatabaseError as exc:  # the shared store (backend = "postgres") is away
                self._set(DISCONNECTED, str(exc))
            finally:
                self._close()
            # Only a connection that held for a while resets the backoff: one that Slack
            # closes at once must not turn into a reconnect loop.
            if connected is not None and time.monotonic() - connected > STABLE_SECONDS:
                backoff.reset()
            if self.stop_event.wait(backoff.next()):
                return

    def _close(self) -> None:
        client, self.socket = self.socket, None
        if client is not None:
            close(client, self.name)

    def _connect(self) -> None:
        self._set(CONNECTING)
        self._problem = None
        bot_token = read_token(self.profile.bot_token_file, "bot")
        app_token = read_token(self.profile.app_token_file, "app")
        self.api.login(bot_token, app_token)
        self.envelopes.replay_inbox()  # acknowledged before a crash, not enqueued yet
        plan = self.backfill.plan()  # before the socket opens: nothing slips between
        self.socket = open_socket(self.api, app_token, self.envelopes.on_envelope)
        self._session = self.socket.session_id()
        self.backfill.run(plan)
        self._set(RUNNING)

    def _backfill_channels(self) -> list[str]:
        """The configured channels; without any, every channel the bot has seen."""
        if self.profile.channels:
            return sorted(self.profile.channels)
        known = self.inbound.cursors.known_channels()
        return [c for c in known if self.profile.allow_dm or not c.startswith("D")]

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            client = self.socket
            if client is None or is_dead(client):
                return
            if self._problem is not None:
                raise self._problem
            if client.session_id() != self._session:  # the SDK moved to a new endpoint
                self._session = client.session_id()
                self.backfill.run(self.backfill.plan())
            else:
                plan = self.backfill.retry_plan()
                if plan is not None:
                    self.backfill.run(plan)
            self.outbound.tick()
            self.kick.wait(SERVE_TICK)
            self.kick.clear()

    def _problem_elsewhere(self, failure: ApiFailure) -> None:
        """An auth failure in a lane: the serve loop ends the connection and reconnects."""
        self._problem = failure.problem()
        self.kick.set()


def _workdir(config: Config, agent: str | None) -> Path | None:
    """Where an agent's ATTACH paths may point: its workdir, None for an unknown agent."""
    if agent in config.agents:
        return agent_workdir(config, agent)
    if not agent and len(config.agents) == 1:
        return agent_workdir(config, next(iter(config.agents)))
    return None
