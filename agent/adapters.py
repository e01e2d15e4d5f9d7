"""How each kind of agent command is called and how its output becomes a reply.

`[agents.NAME] kind` picks one:
- plain:  the message on stdin, the reply is stdout; exit 0 means success. No sessions.
- claude: the Claude Code CLI (`claude -p`). Adds `--output-format json` and, to continue a
          conversation, `--resume <session_id>`; reads one JSON result object
          (`result`, `session_id`, `is_error`). A run succeeded when the exit status is 0
          and `is_error` is false (`subtype` may say "success" on an error).
- codex:  the Codex CLI (`codex exec`). Adds `--json`, `resume <thread_id>` to continue,
          and `-` (prompt on stdin); reads JSON lines: `thread.started` gives the thread id,
          the last `item.completed` of type `agent_message` the reply, `turn.failed` /
          `error` the reason.
A resume the CLI rejects (an unknown or expired session) is reported as `resume_rejected`,
so the dispatcher can start the conversation afresh once.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("plain", "claude", "codex")
REASON_CHARS = 300


@dataclass(frozen=True)
class RunOutput:
    """What a finished agent process left: its exit status, stdout and stderr's tail."""

    code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Answer:
    ok: bool
    reply: str = ""
    error: str | None = None
    session_id: str | None = None
    resume_rejected: bool = False


class PlainAdapter:
    kind = "plain"
    keeps_sessions = False

    def argv(self, command: Sequence[str], session_id: str | None) -> list[str]:
        return list(command)

    def answer(self, output: RunOutput, resumed: bool) -> Answer:
        if output.code != 0:
            return Answer(False, error=exit_reason(output.code, output.stderr or output.stdout))
        return Answer(True, reply=_text(output.stdout).rstrip())


class ClaudeAdapter:
    kind = "claude"
    keeps_sessions = True
    REJECTED = "No conversation found with session ID"

    def argv(self, command: Sequence[str], session_id: str | None) -> list[str]:
        argv = [*command, "--output-format", "json"]
        return [*argv, "--resume", session_id] if session_id else argv

    def answer(self, output: RunOutput, resumed: bool) -> Answer:
        said = _text(output.stderr) + _text(output.stdout)
        if resumed and output.code != 0 and self.REJECTED in said:
            return Answer(False, error=_last_line(said), resume_rejected=True)
        result = _last_json_object(output.stdout, lambda o: o.get("type") == "result")
        if result is None:
            reason = exit_reason(output.code, output.stderr or output.stdout)
            if output.code == 0:
                reason = "no JSON result from the claude CLI: " + _last_line(said)
            return Answer(False, error=reason)
        session_id = result.get("session_id") if isinstance(result.get("session_id"), str) else None
        text = result.get("result") if isinstance(result.get("result"), str) else ""
        if output.code != 0 or result.get("is_error") is not False:
            what = f"exit status {output.code}" if output.code else "is_error"
            return Answer(False, error=f"{what}: {_clip(text or _last_line(said))}")
        return Answer(True, reply=text.rstrip(), session_id=session_id)


class CodexAdapter:
    kind = "codex"
    keeps_sessions = True
    REJECTED = ("no rollout found", "thread/resume failed")

    def argv(self, command: Sequence[str], session_id: str | None) -> list[str]:
        argv = [*command, "--json"]
        return [*argv, "resume", session_id, "-"] if session_id else [*argv, "-"]

    def answer(self, output: RunOutput, resumed: bool) -> Answer:
        said = _text(output.stderr)
        if resumed and output.code != 0 and any(r in said for r in self.REJECTED):
            return Answer(False, error=_last_line(said), resume_rejected=True)
        thread_id, reply, failure = None, None, None
        for event in _json_lines(output.stdout):
            kind = event.get("type")
            if kind == "thread.started" and isinstance(event.get("thread_id"), str):
                thread_id = event["thread_id"]
            elif kind == "item.completed":
                item = event.get("item")
                if isinstance(item, dict) and item.get("type") == "agent_message":
                    reply = item.get("text") if isinstance(item.get("text"), str) else ""
            elif kind in ("turn.failed", "error"):  # (`error` also while reconnecting)
                failure = _error_message(event) or failure
            elif kind == "turn.completed":
                failure = None
        if output.code != 0 or failure is not None:
            reason = failure or _last_line(said) or _last_line(_text(output.stdout))
            return Answer(False, error=f"exit status {output.code}: {_clip(reason)}")
        if reply is None:
            return Answer(False, error="the codex CLI gave no agent message")
        return Answer(True, reply=reply.rstrip(), session_id=thread_id)


ADAPTERS = {a.kind: a for a in (PlainAdapter(), ClaudeAdapter(), CodexAdapter())}


def adapter_for(kind: str) -> PlainAdapter | ClaudeAdapter | CodexAdapter:
    return ADAPTERS[kind]


def exit_reason(code: int, output: bytes) -> str:
    """`exit status N: <last line>` (or `killed by signal N: ...`)."""
    what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    tail = _last_line(_text(output))
    return f"{what}: {tail}" if tail else what


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return _clip(lines[-1]) if lines else ""


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _json_lines(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in _text(data).splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events


def _last_json_object(data: bytes, wanted: Any) -> dict[str, Any] | None:
    candidates = [e for e in _json_lines(data) if wanted(e)]
    if not candidates:  # one object, perhaps pretty-printed over several lines
        try:
            value = json.loads(_text(data))
        except ValueError:
            return None
        return value if isinstance(value, dict) and wanted(value) else None
    return candidates[-1]


def _error_message(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    message = event.get("message")
    return message if isinstance(message, str) else None
