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

import ctypes
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.children import ChildProcesses
from agent.config import AgentConfig
from agent.runledger import RunLedger

POLL_SECONDS = 0.25  # how often a running agent checks for a stop request
REAP_SECONDS = 5.0
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved now: the child between fork and exec only calls it


@dataclass(frozen=True)
class RunResult:
    ok: bool
    reply: str = ""
    error: str | None = None
    stopped: bool = False  # cut short by a stop request: not the message's fault


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
) -> RunResult:
    """Run the agent's command once. `env` is its whole environment (see agentenv)."""
    try:
        proc = children.spawn(
            list(agent.command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return RunResult(False, error=f"cannot start {agent.command[0]}: {_os_reason(exc)}")
    try:
        if ledger is not None:
            ledger.record(proc.pid)
        return _communicate(children, proc, agent, text.encode(), stop)
    except BaseException:
        children.kill_group(proc)  # e.g. the ledger could not be written: no orphan run
        proc.wait()
        raise
    finally:
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


def _communicate(
    children: ChildProcesses,
    proc: subprocess.Popen,
    agent: AgentConfig,
    data: bytes,
    stop: threading.Event,
) -> RunResult:
    deadline = _now() + agent.timeout
    feed: bytes | None = data
    while True:
        if stop.is_set():
            _kill(children, proc)
            return RunResult(False, error="stopped", stopped=True)
        remaining = deadline - _now()
        if remaining <= 0:
            _kill(children, proc)
            return RunResult(False, error=f"timed out after {agent.timeout:g}s")
        try:
            out, err = proc.communicate(feed, timeout=min(POLL_SECONDS, remaining))
            break
        except subprocess.TimeoutExpired:
            feed = None  # communicate keeps what it has not written yet
        except BrokenPipeError:  # the agent exited without reading all its input
            feed = None
    if stop.is_set():
        return RunResult(False, error="stopped", stopped=True)
    if proc.returncode != 0:
        return RunResult(False, error=_exit_reason(proc.returncode, err or out))
    return RunResult(True, reply=out.decode("utf-8", errors="replace").rstrip())


def _kill(children: ChildProcesses, proc: subprocess.Popen) -> None:
    children.kill_group(proc)
    try:
        proc.communicate(timeout=REAP_SECONDS)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        # something outside the group holds the pipes; reap the child and move on
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait(timeout=REAP_SECONDS)


def _exit_reason(code: int, output: bytes) -> str:
    """`exit status N: <last line>` of stderr, or of stdout when stderr is empty (the
    Claude Code CLI prints `API Error: ...` on stdout)."""
    tail = output.decode("utf-8", errors="replace").strip().splitlines()
    what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"{what}: {tail[-1][:300]}" if tail else what


def _now() -> float:
    return time.monotonic()
