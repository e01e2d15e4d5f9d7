"""Prometheus metrics: what the agent counts, what a scrape reads, and the HTTP server.

Off by default. `[metrics] listen = "host:port"` turns them on: `start_metrics` then
imports prometheus_client (only then: `agentctl status` never pays for it), fills a
private CollectorRegistry and serves it in the Prometheus text format. With metrics off
it returns NO_METRICS, a `Metrics` whose methods do nothing: counting costs one call.

Who writes what (docs/operations.md lists every metric):
  - counters and the run-duration histogram are bumped by their owners through the typed
    methods of `Metrics`: the queue worker (claimed, rejected), the dispatcher (done,
    failed, retried, runs), WorkerRunner (restarts), the supervisor (watchdog pings
    withheld), the Slack units (events, posts, 429s); the supervisor wires the object in;
  - worker states and health: the supervisor's main loop publishes a `SupervisorView`
    (immutable, swapped in by one assignment) every tick; a scrape reads the last one,
    and a view older than the health rules allow (agent.health.loop_silent) reads as
    degraded, as a silent state file does for `agentctl status`;
  - queue depth and oldest age: counted on disk at scrape time through agent/queue.py
    (`Queue.census`), at most once a second and one count at a time.
Invariants:
  - a scrape never calls into the supervisor or a worker and never waits for a lock they
    hold; its errors stay in its own thread: each collector catches its own (logged,
    rate-limited) and a broken connection ends only itself;
  - the server is ours, not prometheus_client's start_http_server (which in 0.16 cannot
    be stopped and keeps a thread per silent client forever): daemon threads, at most
    MAX_CONNECTIONS at once (more are closed at once), each connection closed
    CONNECTION_SECONDS after it was accepted, whatever it sends or does not send.
"""

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import TYPE_CHECKING, Any

from agent.config import Config, listen_address
from agent.errors import ConfigError
from agent.health import DEGRADED, HEALTHY, loop_silent
from agent.ratelimit import RepeatLimiter
from agent.states import WORKER_NAMES, WorkerState

if TYPE_CHECKING:
    from agent.queue import Queue, Tally

# Agent runs last from a hundredth of a second (`cat`) to the 30-minute timeouts of
# long coding sessions.
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
MAX_CONNECTIONS = 16  # scrapes served at once; Prometheus needs one
CONNECTION_SECONDS = 10.0  # a connection's whole life, however slowly it talks
READ_SECONDS = 5.0  # a request that does not come within this ends its connection
CENSUS_SECONDS = 1.0  # queue directories are counted at most this often
REJECTED = ("invalid", "duplicate", "unknown_agent")  # why the queue worker failed an entry


@dataclass(frozen=True)
class SupervisorView:
    """What the supervisor's main loop last knew: its health and each worker's state."""

    health: str
    workers: tuple[tuple[str, str], ...]  # (name, state) of every known worker
    hang_timeout: float
    at: float = field(default_factory=time.monotonic)


class Metrics:
    """What the agent counts; this base class is the no-op used while metrics are off."""

    enabled = False

    def message_claimed(self, agent: str) -> None:
        """The queue worker handed a message for `agent` to the dispatcher."""

    def message_rejected(self, why: str) -> None:
        """The queue worker moved an entry to failed/ without a run (one of REJECTED)."""

    def message_done(self, agent: str) -> None:
        """The dispatcher wrote a reply."""

    def message_failed(self, agent: str | None) -> None:
        """The dispatcher gave up on a message (None: before an agent was chosen)."""

    def message_retried(self, agent: str) -> None:
        """A run failed and the message will run again after a backoff."""

    def agent_run(self, agent: str, seconds: float) -> None:
        """One run of an agent command ended (not cut short by a stop)."""

    def worker_restarted(self, worker: str) -> None:
        """A crashed worker is started again."""

    def watchdog_withheld(self) -> None:
        """A watchdog ping was due and not sent: a worker is hung or stalled."""

    def slack_event(self, profile: str) -> None:
        """A Socket Mode envelope arrived."""

    def slack_post(self, profile: str) -> None:
        """A Web API call that posts into Slack succeeded."""

    def slack_rate_limited(self, profile: str) -> None:
        """Slack answered a Web API call with 429 (ratelimited)."""

    def publish(self, view: SupervisorView) -> None:
        """The supervisor's main loop tells what it knows now."""

    def close(self) -> None:
        """Stop serving."""


NO_METRICS = Metrics()


def start_metrics(config: Config) -> Metrics:
    """NO_METRICS when [metrics] listen is empty; else the registry, served from now on
    (ConfigError naming [metrics] listen when its address cannot be bound)."""
    address = listen_address(config.metrics.listen) if config.metrics.listen else None
    if address is None:
        return NO_METRICS
    return PrometheusMetrics(config, address)


class PrometheusMetrics(Metrics):
    enabled = True

    def __init__(self, config: Config, address: tuple[str, int]):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        from agent.queue import Queue

        self.errors = _Errors()
        self.registry = registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Any:
            return Counter(name, doc, labels, registry=registry)

        self.claimed = counter(
            "agent_messages_claimed_total", "Messages handed to the dispatcher", "agent"
        )
        self.rejected = counter(
            "agent_messages_rejected_total",
            "Queue entries moved to failed/ without a run (invalid, duplicate, unknown_agent)",
            "reason",
        )
        self.done = counter("agent_messages_done_total", "Messages answered", "agent")
        self.failed = counter(
            "agent_messages_failed_total", "Messages the dispatcher moved to failed/", "agent"
        )
        self.retried = counter(
            "agent_messages_retried_total", "Failed runs that will be retried", "agent"
        )
        self.runs = Histogram(
            "agent_run_duration_seconds",
            "Duration of agent command runs",
            ("agent",),
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.restarts = counter(
            "agent_worker_restarts_total", "Worker restarts after a crash", "worker"
        )
        self.withheld = counter(
            "agent_watchdog_pings_withheld_total",
            "Watchdog pings not sent because a worker was hung or stalled",
        )
        self.slack_events = counter(
            "agent_slack_events_received_total", "Socket Mode envelopes received", "profile"
        )
        self.slack_posts = counter(
            "agent_slack_posts_total", "Successful Slack Web API calls that post", "profile"
        )
        self.slack_429 = counter(
            "agent_slack_rate_limited_total", "Slack Web API calls answered 429", "profile"
        )
        self._view: SupervisorView | None = None
        self._census = _Census(Queue(config.queue_dir))
        registry.register(_Collector("supervisor", self._supervisor_families, self.errors))
        registry.register(_Collector("queue", self._queue_families, self.errors))
        ProcessCollector(registry=registry)
        self._label_known(config)
        self.server = _serve(address, registry, self.errors, config)

    def _label_known(self, config: Config) -> None:
        """Every series we can name already exists at 0, so rate() sees the first one."""
        for agent in config.agents:
            for family in (self.claimed, self.done, self.failed, self.retried, self.runs):
                family.labels(agent)
        for why in REJECTED:
            self.rejected.labels(why)
        for worker in WORKER_NAMES:
            self.restarts.labels(worker)
        for profile in config.slack.profiles if config.slack.enabled else ():
            for family in (self.slack_events, self.slack_posts, self.slack_429):
                family.labels(profile)

    # ---- counting (any thread)

    def message_claimed(self, agent: str) -> None:
        self.claimed.labels(agent).inc()

    def message_rejected(self, why: str) -> None:
        self.rejected.labels(why).inc()

    def message_done(self, agent: str) -> None:
        self.done.labels(agent).inc()

    def message_failed(self, agent: str | None) -> None:
        self.failed.labels(agent or "").inc()

    def message_retried(self, agent: str) -> None:
        self.retried.labels(agent).inc()

    def agent_run(self, agent: str, seconds: float) -> None:
        self.runs.labels(agent).observe(seconds)

    def worker_restarted(self, worker: str) -> None:
        self.restarts.labels(worker).inc()

    def watchdog_withheld(self) -> None:
        self.withheld.inc()

    def slack_event(self, profile: str) -> None:
        self.slack_events.labels(profile).inc()

    def slack_post(self, profile: str) -> None:
        self.slack_posts.labels(profile).inc()

    def slack_rate_limited(self, profile: str) -> None:
        self.slack_429.labels(profile).inc()

    def publish(self, view: SupervisorView) -> None:
        self._view = view

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- read at scrape time (a server thread)

    def _supervisor_families(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        view = self._view
        if view is None:
            return []
        silent = loop_silent(time.monotonic() - view.at, view.hang_timeout)
        health = DEGRADED if silent else view.health
        healthy = GaugeMetricFamily(
            "agent_health",
            "1 for the supervisor's health (healthy or degraded, as agentctl status says)",
            labels=["state"],
        )
        for state in (HEALTHY, DEGRADED):
            healthy.add_metric([state], 1.0 if state == health else 0.0)
        states = GaugeMetricFamily(
            "agent_worker_state", "1 for the state each worker is in", labels=["worker", "state"]
        )
        for worker, now in view.workers:
            for state in WorkerState:
                states.add_metric([worker, str(state)], 1.0 if state == now else 0.0)
        return [healthy, states]

    def _queue_families(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        census = self._census.read()
        depth = GaugeMetricFamily(
            "agent_queue_messages",
            "Messages not answered yet: waiting in incoming/, claimed in processing/",
            labels=["dir"],
        )
        oldest = GaugeMetricFamily(
            "agent_queue_oldest_message_age_seconds",
            "Age of the oldest message in the directory (0 when it is empty)",
            labels=["dir"],
        )
        now = time.time()
        for directory, tally in census.items():
            depth.add_metric([directory], tally.count)
            age = now - tally.oldest_mtime_ns / 1e9 if tally.oldest_mtime_ns else 0.0
            oldest.add_metric([directory], max(age, 0.0))
        return [depth, oldest]


class _Census:
    """Queue.census at most once per CENSUS_SECONDS; a scrape that finds another one
    counting takes the previous count rather than waiting for it."""

    def __init__(self, queue: "Queue"):
        self.queue = queue
        self._lock = threading.Lock()
        self._last: dict[str, Tally] = {}
        self._at = float("-inf")

    def read(self) -> "dict[str, Tally]":
        if time.monotonic() - self._at >= CENSUS_SECONDS and self._lock.acquire(blocking=False):
            try:
                self._last = self.queue.census()
                self._at = time.monotonic()
            finally:
                self._lock.release()
        return self._last


class _Errors:
    """Trouble on the scrape side, logged once per window per kind (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors = RepeatLimiter()

    def note(self, where: str, exc: BaseException) -> None:
        text = f"metrics {where}: {type(exc).__name__}: {exc}"
        with self._lock:
            self.errors.event(
                f"{where}:{type(exc).__name__}",
                "metrics.error",
                text,
                level=logging.WARNING,
                error=text,
            )


class _Collector:
    """A prometheus_client custom collector whose errors never reach the scrape."""

    def __init__(self, name: str, produce: Callable[[], Iterable[Any]], errors: _Errors):
        self.name, self.produce, self.errors = name, produce, errors

    def collect(self) -> list[Any]:
        try:
            return list(self.produce())
        except Exception as exc:  # this collector's series are missing from this scrape
            self.errors.note(self.name, exc)
            return []


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (or /): the registry in the text format; HTTP/1.0, one request."""

    server: "_Server"
    timeout = READ_SECONDS

    def do_GET(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "metrics are at /metrics")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """A scrape is not an event; a bad request is the client's business."""


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections and a deadline on each."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: Any, errors: _Errors):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry, self.errors = registry, errors
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}  # connection -> when it was accepted
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our name (getfqdn): not worth a slow start.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed at once, never queued in memory
            return
        with self._open_lock:
            self._open[request] = time.monotonic()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:  # forgotten before it is closed: service_actions never
            if self._open.pop(request, None) is not None:  # touches a closed socket
                self._slots.release()
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Every poll of serve_forever: connections past their deadline are cut (their
        handler thread then sees the end of the stream and finishes)."""
        now = time.monotonic()
        with self._open_lock:
            for connection, accepted in self._open.items():
                if now - accepted > CONNECTION_SECONDS:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
            self.errors.note("server", exc)


def _serve(address: tuple[str, int], registry: Any, errors: _Errors, config: Config) -> _Server:
    try:
        server = _Server(address, registry, errors)
    except OSError as exc:
        raise ConfigError(
            f"{config.display_path}: [metrics] listen: cannot listen on "
            f"{config.metrics.listen}: {exc.strerror or exc}"
        ) from None
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
    )
    thread.start()
    return server
