"""`agentctl send`: enqueue a `local` message and, optionally, wait for its reply."""

import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import lock as locks
from agent.config import Config
from agent.dirwatch import DirWatcher
from agent.errors import AgentError
from agent.queue import Queue, new_message, reply_name

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
        raise ConfigError(
            f"{config.display_path}: {exc}; e.g. add\n  [agents.default]\n  "
            'command = ["claude", "-p"]\n(or run: agentctl init)'
        ) from None
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
    name = reply_name(CHANNEL, message_id)
    reply_path, failed_path = queue.outgoing / name, queue.failed / f"{name}.reason"
    watcher = DirWatcher(queue.outgoing)
    deadline = time.monotonic() + timeout
    try:
        while True:
            reply = _read(reply_path)
            if reply is not None:
                reply_path.unlink(missing_ok=True)
                return reply
            reason = _read(failed_path)
            if reason is not None and (queue.failed / name).exists():
                raise NoReply(f"message {message_id} failed: {reason.get('reason')}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReply(f"no reply to message {message_id} within {timeout:g}s")
            watcher.wait(min(remaining, 0.2))
    finally:
        watcher.close()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
