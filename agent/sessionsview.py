"""`agentctl sessions`: the session map shown to operators, and forgetting one."""

import json
from dataclasses import asdict

from agent.clock import iso_utc
from agent.config import Config
from agent.errors import AgentError
from agent.sessions import open_session_store


def print_sessions(config: Config, as_json: bool) -> None:
    shared = config.queue.backend == "postgres"
    sessions = _all(config) if shared or config.state_dir.is_dir() else []
    if as_json:
        for session in sessions:
            print(json.dumps({**asdict(session), "last_used": iso_utc(session.last_used)}))
        return
    if not sessions:
        print("no agent sessions")
        return
    rows = [("CONVERSATION", "AGENT", "SESSION", "LAST USED")]
    rows += [(s.conversation, s.agent, s.session_id, iso_utc(s.last_used)) for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + row[3]
        )


def reset_session(config: Config, conversation: str, agent: str | None) -> None:
    store = open_session_store(config)
    try:
        gone = store.forget(conversation, agent)
    finally:
        store.close()
    if not gone:
        raise AgentError(f"no session for conversation {conversation!r}")
    for session in gone:
        print(f"forgot session {session.session_id} ({session.agent}, {conversation})")


def _all(config: Config) -> list:
    store = open_session_store(config)
    try:
        return store.all()
    finally:
        store.close()
