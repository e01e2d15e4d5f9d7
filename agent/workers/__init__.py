"""The registry of workers: which exist, in which order, and which the config enables.
Each is given the supervisor's Metrics (agent.metrics; the no-op while metrics are off).
With [queue] backend = "postgres" the queue worker is PgQueueWorker; it and the
dispatcher's backend share this process's PgHost (agent.pg.host.pg_host_for)."""

from agent.config import Config
from agent.metrics import NO_METRICS, Metrics
from agent.states import WORKER_NAMES
from agent.worker import Worker


def build_workers(config: Config, metrics: Metrics = NO_METRICS) -> dict[str, Worker | None]:
    """Every known worker by name, in start order; None for one the config switches off."""
    return {name: build_worker(config, name, metrics) for name in WORKER_NAMES}


def build_worker(config: Config, name: str, metrics: Metrics = NO_METRICS) -> Worker | None:
    """One worker built from config; None when the config switches it off."""
    from agent.workers.dispatcher import DispatcherWorker
    from agent.workers.heartbeat import HeartbeatWorker
    from agent.workers.queue import QueueWorker
    from agent.workers.slack import SlackWorker

    if name == "queue":
        if config.queue.backend == "postgres":
            return _pg_queue_worker(config, metrics)
        return QueueWorker(config, metrics=metrics)
    if name == "dispatcher":  # its backend: agent.backend.backend_for(config)
        return DispatcherWorker(config, metrics=metrics)
    if name == "slack":
        return SlackWorker(config, metrics) if config.slack.enabled else None
    if name == "heartbeat":
        return HeartbeatWorker(config) if config.heartbeat.interval > 0 else None
    raise ValueError(f"unknown worker {name!r}")


def _pg_queue_worker(config: Config, metrics: Metrics) -> Worker:
    from agent.pg.host import pg_host_for
    from agent.workers.pgqueue import PgQueueWorker

    return PgQueueWorker(config, pg_host_for(config), metrics=metrics)
