"""One run of an agent command: message text on stdin, reply from stdout.

The child runs in its own process group (ChildProcesses.spawn); on timeout or a stop
request the whole group is killed, so no helper it started survives it. Should the
supervisor itself be killed outright, the child gets SIGKILL from the kernel: between fork
and exec it asks for PR_SET_PDEATHSIG with one prctl(2) call. Not util-linux `setpriv`:
setpriv always calls capset(2), which the unit's `SystemCallFilter=~@privileged` refuses, so
no agent could start under the shipped unit. The run ledger lets the next start kill what
is left of the group.

The death signal is tied to the thread that forked the child (the run's own thread), which
lives exactly as long as the run.
"""

import contextlib
import ctypes
import functools
import os
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.adapters import Answer, RunOutput, adapter_for
from agent.children import ChildProcesses, kill_marked
from agent.config import AgentConfig
from agent.runledger import RunLedger

POLL_SECONDS = 0.25  # how often a running agent checks for a stop request
DRAIN_SECONDS = 0.5  # after the agent exits, how long its output may still arrive
PIPE_CHUNK = 65536
STDERR_TAIL = 65536
RUN_MARKER = "AGENT_RUN_ID"  # the end of stderr is kept for the failure reason, no more
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved now: the child between fork and exec only calls it


@dataclass(frozen=True)
class RunResult:
    ok: bool
    reply: str = ""
    error: str | None = None
    stopped: bool = False  # cut short by a stop request: not the message's fault
    session_id: str | None = None  # the agent CLI's session, to resume the conversation
    resume_rejected: bool = False  # the CLI did not know the session it was asked to resume

    @classmethod
    def from_answer(cls, answer: Answer) -> "RunResult":
        return cls(
            answer.ok, answer.reply, answer.error, False, answer.session_id, answer.resume_rejected
        )


def choose_agent(agents: Mapping[str, AgentConfig], requested: str | None) -> str:
    """The message's agent, else `default`, else the only one; ValueError says why not."""
    if requested:
        if requested in agents:
            return requested
        known = ", ".join(sorted(agents)) or "none"
        raise ValueError(f"unknown agent '{requested}' (configured: {known})")
    if "default" in agents:
        return "default"
    if len(agents) == 1:
        return next(iter(agents))
    if not agents:
        raise ValueError("no agent is configured (add an [agents.NAME] table with a command)")
    raise ValueError(
        f"the message names no agent and none is called 'default' (configured: "
        f"{', '.join(sorted(agents))})"
    )


def run_agent(
    children: ChildProcesses,
    agent: AgentConfig,
    text: str,
    stop: threading.Event,
    env: Mapping[str, str],
    cwd: Path,
    ledger: RunLedger | None = None,
    session_id: str | None = None,
) -> RunResult:
    """Run the agent's command once, through the adapter of its kind (resuming session_id
    when given). `env` is its whole environment (see agentenv), plus RUN_MARKER, by which
    helpers that left the run's process group are found."""
    adapter = adapter_for(agent.kind)
    marker = uuid.uuid4().hex
    try:
        proc = children.spawn(
            adapter.argv(agent.command, session_id),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={**env, RUN_MARKER: marker},
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return RunResult(False, error=f"cannot start {agent.command[0]}: {_os_reason(exc)}")
    try:
        if ledger is not None:
            ledger.record(proc.pid)
        result = _communicate(children, proc, agent, text.encode(), stop)
        if isinstance(result, RunOutput):
            return RunResult.from_answer(adapter.answer(result, resumed=session_id is not None))
        return result
    except BaseException:
        children.kill_group(proc)  # e.g. the ledger could not be written: no orphan run
        proc.wait()
        raise
    finally:
        kill_marked(RUN_MARKER, marker)
        children.forget(proc)
        if ledger is not None:
            ledger.forget(proc.pid)


def die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the forking thread dies (no parent, no run).

    If the supervisor died between fork and this call, the signal will never come: the
    child has been re-parented already, so it ends itself.
    """
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    return str(exc)


class _Pipes:
    """The run's three pipes, pumped without blocking: stdin fed, stdout kept up to the
    agent's max_output_bytes, only the last STDERR_TAIL bytes of stderr kept."""

    def __init__(self, proc: subprocess.Popen, data: bytes, max_output: int):
        self.max_output = max_output
        self.out = bytearray()
        self.err = bytearray()
        self.overflow = False
        self.pending = memoryview(data)
        self.selector = selectors.DefaultSelector()
        streams = [(proc.stdout, selectors.EVENT_READ), (proc.stderr, selectors.EVENT_READ)]
        streams.append((proc.stdin, selectors.EVENT_WRITE))
        for stream, mask in streams:
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, mask)
        self.stdout, self.stdin = proc.stdout, proc.stdin

    @property
    def open(self) -> bool:
        return bool(self.selector.get_map())

    @property
    def reading(self) -> bool:
        return any(k.events & selectors.EVENT_READ for k in self.selector.get_map().values())

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.stdin:
                self._feed()
            else:
                self._read(key.fileobj)

    def _feed(self) -> None:
        try:
            written = os.write(self.stdin.fileno(), self.pending[:PIPE_CHUNK])  # type: ignore[union-attr]
        except BrokenPipeError:  # the agent does not read (all of) its input
            written = len(self.pending)
        self.pending = self.pending[written:]
        if not self.pending:
            self._close(self.stdin)

    def _read(self, stream: Any) -> None:
        try:
            chunk = os.read(stream.fileno(), PIPE_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._close(stream)
        elif stream is self.stdout:
            self.out += chunk
            if len(self.out) > self.max_output:
                self.overflow = True
                del self.out[self.max_output :]
        else:
            self.err += chunk
            del self.err[:-STDERR_TAIL]

    def _close(self, stream: Any) -> None:
        self.selector.unregister(stream)
        stream.close()

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            self._close(key.fileobj)
        self.selector.close()


def _communicate(
    children: ChildProcesses,
    proc: subprocess.Popen,
    agent: AgentConfig,
    data: bytes,
    stop: threading.Event,
) -> RunResult | RunOutput:
    """Pump the pipes until the agent process exits (and its output is drained), a stop,
    the time limit or too much output; then nothing the run started may live on."""
    pipes = _Pipes(proc, data, agent.max_output_bytes)
    deadline = _now() + agent.timeout
    exited_at: float | None = None
    result: RunResult | RunOutput | None = None
    try:
        while result is None:
            now = _now()
            if stop.is_set():
                result = RunResult(False, error="stopped", stopped=True)
            elif pipes.overflow:
                result = RunResult(
                    False, error=f"output exceeded max_output_bytes ({agent.max_output_bytes})"
                )
            elif now >= deadline:
                result = RunResult(False, error=f"timed out after {agent.timeout:g}s")
            elif exited_at is not None and (not pipes.reading or now - exited_at > DRAIN_SECONDS):
                # (a helper may still hold stdout: the agent's exit is what counts)
                result = RunOutput(proc.returncode, bytes(pipes.out), bytes(pipes.err))
            else:
                _wait_for_output_or_exit(proc, pipes, min(POLL_SECONDS, deadline - now))
                if exited_at is None and proc.poll() is not None:
                    exited_at = _now()
    finally:
        pipes.close()
        children.kill_group(proc)  # helpers left in the run's group die with it
        proc.wait()
    return result


def _wait_for_output_or_exit(proc: subprocess.Popen, pipes: _Pipes, timeout: float) -> None:
    if pipes.open:
        pipes.pump(timeout)
    else:  # every pipe is closed: nothing to select on, only the exit to wait for
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)


def _now() -> float:
    return time.monotonic()
