"""The registry of workers: which exist, in which order, and which the config enables."""

from agent.config import Config
from agent.worker import Worker

WORKER_NAMES = ("queue", "dispatcher", "slack", "heartbeat")


def build_workers(config: Config) -> dict[str, Worker | None]:
    """Every known worker by name, in start order; None for one the config switches off."""
    from agent.workers.dispatcher import DispatcherWorker
    from agent.workers.heartbeat import HeartbeatWorker
    from agent.workers.queue import QueueWorker
    from agent.workers.slack import SlackWorker

    return {
        "queue": QueueWorker(config),
        "dispatcher": DispatcherWorker(config),
        "slack": SlackWorker(config) if config.slack.enabled else None,
        "heartbeat": HeartbeatWorker(config) if config.heartbeat.interval > 0 else None,
    }
