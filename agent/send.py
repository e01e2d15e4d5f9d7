"""`agentctl send`: enqueue a `local` message and, optionally, wait for its reply."""

import getpass
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import lock as locks
from agent.config import Config
from agent.errors import AgentError
from agent.queue import Queue, new_message

CHANNEL = "local"


class NoReply(AgentError):
    pass


@dataclass(frozen=True)
class Sent:
    message_id: str
    path: Path
    supervisor_running: bool


def check_sendable(config: Config, agent: str | None, wait: bool) -> None:
    """Fail at once, before anything is queued, when the message could never be answered."""
    from agent.agentrun import choose_agent
    from agent.errors import ConfigError, NotRunning

    try:
        choose_agent(config.agents, agent)
    except ValueError as exc:
        hint = ""
        if not config.agents:
            hint = '; e.g. add\n  [agents.default]\n  command = ["claude", "-p"]\n'
            hint += "(or run: agentctl init)"
        raise ConfigError(f"{config.display_path}: {exc}{hint}") from None
    if wait and not locks.probe(config.lock_path).held:
        raise NotRunning("not running: start it first (agentctl start); nothing was queued")


def send(
    config: Config, text: str, agent: str | None = None, conversation: str | None = None
) -> Sent:
    queue = Queue(config.queue_dir)
    queue.ensure_dirs()
    data = new_message(
        CHANNEL,
        text,
        sender=getpass.getuser(),
        sender_id=str(os.getuid()),
        agent=agent,
        conversationId=conversation,
    )
    path = queue.enqueue(data)
    running = locks.probe(config.lock_path).held
    return Sent(data["messageId"], path, running)


def wait_for_reply(config: Config, message_id: str, timeout: float) -> dict[str, Any]:
    """The reply (then removed from outgoing/: it has reached its reader), or NoReply."""
    queue = Queue(config.queue_dir)
    watcher = queue.reply_watcher()
    deadline = time.monotonic() + timeout
    try:
        while True:
            reply = queue.take_reply(CHANNEL, message_id)
            if reply is not None:
                return reply
            failure = queue.failure(CHANNEL, message_id)
            if failure is not None:
                raise NoReply(f"message {message_id} failed: {failure.get('reason')}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReply(f"no reply to message {message_id} within {timeout:g}s")
            watcher.wait(min(remaining, 0.2))
    finally:
        watcher.close()
