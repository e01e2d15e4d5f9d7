"""start / stop / restart: standalone, or delegated to systemctl when systemd manages agent.

Standalone `start` speaks systemd's own readiness protocol: it gives the detached
supervisor a private NOTIFY_SOCKET and returns once READY=1 arrives, or reports why the
supervisor died first (its last STATUS= line, its state, or its stderr).
"""

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent import lock as locks
from agent.agentenv import check_agent_commands
from agent.clock import iso_utc
from agent.config import SYSTEM_CONFIG, Config
from agent.errors import (
    EXIT_CONFIG,
    EXIT_PERMISSION,
    AgentError,
    AlreadyRunning,
    ConfigError,
    NotRunning,
)
from agent.state import UnreadableState, read_state, record_killed

START_TIMEOUT = 60.0
STOP_MARGIN = 5.0  # beyond stop_timeout before `stop` escalates to SIGKILL
KILL_WAIT = 5.0
UNIT = "agent.service"
UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
)
SCRUBBED_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "LISTEN_FDS",
    "LISTEN_PID",
)


@dataclass(frozen=True)
class StopResult:
    pid: int | None
    message: str
    warning: str | None = None


# ---- who manages the supervisor


def systemd_manages(config: Config, environ: dict[str, str] | None = None) -> bool:
    """True when systemd is PID 1, agent.service is installed, and this is its config."""
    environ = os.environ if environ is None else environ
    if environ.get("AGENT_MANAGER") == "standalone":
        return False
    if not os.path.isdir("/run/systemd/system"):
        return False
    if not any(os.path.exists(os.path.join(d, UNIT)) for d in UNIT_DIRS):
        return False
    return config.path is None or config.path == SYSTEM_CONFIG


# ---- standalone


def start_standalone(config: Config, timeout: float = START_TIMEOUT) -> int:
    from agent.trust import check_state_dir, tighten_umask

    held = locks.probe(config.lock_path)
    if held.held:
        raise AlreadyRunning(held.pid)
    check_state_dir(config.state_dir)
    tighten_umask()  # what this creates (state_dir, logs/) must pass the supervisor's check
    check_agent_commands(config)  # the supervisor checks too; this says it once, exit 78
    config.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    with _notify_socket() as (sock, address):
        out_before = _size(config.log_dir / "supervisor.out")  # what earlier runs wrote
        proc = _spawn_supervisor(config, address)
        status = _wait_for_ready(proc, sock, timeout)
    if status is None:
        return proc.pid
    failure = AgentError(_start_failure(config, proc, status, out_before))
    if _exit_code(proc) in (EXIT_CONFIG, EXIT_PERMISSION):  # keep the supervisor's verdict
        failure.exit_code = proc.returncode
    raise failure


def _exit_code(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        return None


class _notify_socket:
    """An abstract-namespace datagram socket: nothing on disk to clean up."""

    def __enter__(self) -> tuple[socket.socket, str]:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"agentctl-start-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock.bind("\0" + name)
        return self.sock, "@" + name

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _spawn_supervisor(config: Config, notify_address: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_VARS}
    env.update(NOTIFY_SOCKET=notify_address, AGENT_MANAGER="standalone")
    argv = [sys.executable, "-m", "agent"]
    if config.path:
        argv += ["--config", str(config.path)]
    else:  # embedded defaults: pin the state_dir we resolved, whatever the child's env
        env["STATE_DIRECTORY"] = str(config.state_dir)
    argv.append("run")
    with _open_append(config.log_dir / "supervisor.out") as out:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


def _open_append(path: Path):
    """Append to a file of ours in state_dir: never through a symlink, created 0640."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return open(os.open(path, flags, 0o640), "ab")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AgentError(f"{path}: is a symlink; refusing to write through it") from None
        raise


def _wait_for_ready(proc: subprocess.Popen, sock: socket.socket, timeout: float) -> str | None:
    """None once READY=1 arrives; otherwise the reason the supervisor is not ready."""
    last_status = ""
    pidfd = os.pidfd_open(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock, pidfd], [], [], remaining)
            if sock in readable:
                lines = sock.recv(65536).decode(errors="replace").splitlines()
                for line in lines:
                    if line.startswith("STATUS="):
                        last_status = line[len("STATUS=") :]
                if "READY=1" in lines:
                    return None
            elif pidfd in readable:
                return _drain_status(sock, last_status) or f"exited with code {proc.wait()}"
        _terminate(proc)
        return f"not ready after {timeout:.0f}s; stopped it"
    finally:
        os.close(pidfd)


def _drain_status(sock: socket.socket, last_status: str) -> str:
    sock.setblocking(False)
    try:
        while True:
            for line in sock.recv(65536).decode(errors="replace").splitlines():
                if line.startswith("STATUS="):
                    last_status = line[len("STATUS=") :]
    except BlockingIOError:
        return last_status


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_failure(config: Config, proc: subprocess.Popen, status: str, out_before: int) -> str:
    """Why this child failed: its last STATUS=, its own saved error, its own output; never
    what an earlier run left in the state file or in supervisor.out."""
    reason = status.removeprefix("failed: ")
    if "already running" in reason:
        return reason
    saved_error = _saved_last_error(config, proc.pid)
    detail = saved_error or _tail(config.log_dir / "supervisor.out", start=out_before)
    # the child's own "agentctl: <reason>" line says nothing the reason does not
    detail = "\n".join(
        line for line in detail.splitlines() if line.removeprefix("agentctl: ") not in reason
    )
    message = f"supervisor (pid {proc.pid}) failed to start: {reason}"
    return f"{message}\n{detail}" if detail else message


def _saved_last_error(config: Config, pid: int) -> str | None:
    try:
        saved = read_state(config.state_path)
    except UnreadableState:
        return None
    if saved is None or saved.supervisor.pid != pid:
        return None  # an earlier run's, or nothing written yet
    return saved.supervisor.last_error


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _tail(path: Path, lines: int = 5, limit: int = 65536, start: int = 0) -> str:
    """The last lines of what was written to path from byte `start` on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        offset = max(size - limit, start)
        text = os.pread(fd, max(size - offset, 0), offset).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    return "\n".join(text.strip().splitlines()[-lines:])


def stop_standalone(config: Config) -> StopResult:
    holder = locks.probe(config.lock_path)
    if not holder.held:
        return StopResult(None, "not running")
    if holder.pid is None:
        raise AgentError(
            f"{config.lock_path}: a supervisor holds the lock, but the kernel does not say "
            f"which process ({locks.PROC_LOCKS} unreadable?); not signalling anyone"
        )
    pid = holder.pid  # proven by the kernel, never merely read from a file
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return StopResult(None, "not running")
    try:
        if not _still_holder(config, pid):  # it ended, or the pid was reused, meanwhile
            return StopResult(None, "not running")
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if _wait_exit(pidfd, config.supervisor.stop_timeout + STOP_MARGIN):
            return StopResult(pid, f"stopped (pid {pid})", _stop_warning(config))
        _kill(config, pidfd, pid)
        return StopResult(
            pid,
            f"killed (pid {pid})",
            f"supervisor did not exit within {config.supervisor.stop_timeout:g}s "
            f"+ {STOP_MARGIN:g}s; sent SIGKILL",
        )
    finally:
        os.close(pidfd)


def _still_holder(config: Config, pid: int) -> bool:
    """Once a pidfd is open, the pid cannot be reused: if the kernel still names it as the
    lock's holder, the pidfd is the holder's."""
    again = locks.probe(config.lock_path)
    return again.held and again.pid == pid


def _wait_exit(pidfd: int, timeout: float) -> bool:
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


def _kill(config: Config, pidfd: int, pid: int) -> None:
    """The forced fallback: SIGKILL, then record what happened where the supervisor would."""
    from agent.log import choose_sink, event, setup_logging

    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if not _wait_exit(pidfd, KILL_WAIT):
        raise AgentError(f"supervisor pid {pid} is still alive after SIGKILL")
    setup_logging(config, choose_sink(config))
    reason = (
        f"agentctl stop sent SIGKILL: no exit within stop_timeout "
        f"{config.supervisor.stop_timeout:g}s + {STOP_MARGIN:g}s"
    )
    event("supervisor.killed", reason, level=logging.ERROR, pid=pid)
    _record_killed(config, reason)


def _record_killed(config: Config, reason: str) -> None:
    """Mark the killed run's state as ended, holding the lock so no new run is overwritten."""
    lock = locks.SupervisorLock(config.lock_path)
    try:
        lock.acquire()
    except AgentError:
        return  # a new supervisor already started; its state is the one that matters
    try:
        from agent.runledger import RunLedger

        RunLedger(config.state_dir / "runs").kill_leftovers()  # its agent runs die with it
        record_killed(config.state_path, reason, iso_utc())
    finally:
        lock.release()


def _stop_warning(config: Config) -> str | None:
    try:
        saved = read_state(config.state_path)
    except UnreadableState as exc:
        return f"{exc}; ignoring it"
    error = saved.supervisor.last_error if saved else None
    return f"the supervisor reported: {error}" if error else None


def recorded_config(config: Config) -> Config:
    """The config the last supervisor recorded in state.json, when restart was given none.
    Only a regular file owned by root or us and writable by nobody else is used: whoever
    can write state.json must not choose what we run."""
    from agent.config import load_config
    from agent.errors import ConfigError
    from agent.trust import config_file_problem

    try:
        saved = read_state(config.state_path)
    except UnreadableState:
        return config
    recorded = saved.supervisor.config if saved else None
    if not recorded or (config.path is not None and str(config.path) == recorded):
        return config
    problem = config_file_problem(Path(recorded))
    if problem:
        raise ConfigError(
            f"{config.state_path}: the recorded config {problem}; not using it "
            "(give restart --config PATH)"
        )
    return load_config(recorded)


def restart_standalone(config: Config) -> tuple[StopResult, int]:
    stopped = stop_standalone(config)
    return stopped, start_standalone(config)


# ---- systemd


def systemctl(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AgentError("systemctl not found, but systemd seems to manage agent") from None


def systemctl_action(action: str) -> None:
    from agent.errors import PermissionDenied

    done = systemctl(action, UNIT)
    if done.returncode == 0:
        return
    err = done.stderr.strip()
    if any(s in err for s in ("Access denied", "authentication required", "Permission denied")):
        raise PermissionDenied(
            f"systemctl {action} {UNIT}: permission denied; run it as root (e.g. with sudo)"
        )
    raise AgentError(
        f"systemctl {action} {UNIT} failed: {err or f'exit {done.returncode}'}; "
        f"see: journalctl -u {UNIT}"
    )


def unit_properties(*names: str) -> dict[str, str]:
    done = systemctl("show", UNIT, *(f"--property={n}" for n in names))
    props = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        props[key] = value
    return props


def start_systemd() -> int:
    if unit_properties("ActiveState")["ActiveState"] == "active":
        raise AlreadyRunning(int(unit_properties("MainPID")["MainPID"]) or None)
    systemctl_action("start")
    return int(unit_properties("MainPID").get("MainPID") or 0)


def stop_systemd() -> StopResult:
    props = unit_properties("ActiveState", "MainPID")
    if props.get("ActiveState") not in ("active", "activating", "reloading", "deactivating"):
        return StopResult(None, "not running")
    pid = int(props.get("MainPID") or 0) or None
    systemctl_action("stop")
    result = unit_properties("Result")["Result"]
    return StopResult(
        pid,
        f"stopped (pid {pid})",
        None if result == "success" else f"systemd reports Result={result}",
    )


def restart_systemd() -> int:
    systemctl_action("restart")
    return int(unit_properties("MainPID").get("MainPID") or 0)


# ---- reload


RELOAD_TIMEOUT = 30.0


def supervisor_found(config: Config) -> bool:
    """A supervisor holds this config's lock (standalone), or systemd runs the unit."""
    if systemd_manages(config):
        return unit_properties("ActiveState")["ActiveState"] == "active"
    return locks.probe(config.lock_path).held


def reload_supervisor(config: Config, pid: int | None = None) -> str:
    """SIGHUP to the running supervisor, then its verdict from the state file: a summary
    of what changed, or the ConfigError that made it keep the old configuration. `pid`
    is systemd's $MAINPID (ExecReload=); otherwise the kernel says who holds the lock."""
    if pid is None:
        holder = locks.probe(config.lock_path)
        if not holder.held:
            raise NotRunning("not running: nothing to reload")
        if holder.pid is None:
            raise AgentError(f"{config.lock_path}: the kernel does not say which process holds it")
        pid = holder.pid
        proven = True
    else:
        proven = False  # systemd's own knowledge
    before = _reload_count(config)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunning("not running: nothing to reload") from None
    try:
        if proven and not _still_holder(config, pid):
            raise NotRunning("not running: nothing to reload")
        signal.pidfd_send_signal(pidfd, signal.SIGHUP)
        return _reload_verdict(config, pid, pidfd, before)
    finally:
        os.close(pidfd)


def _reload_count(config: Config) -> int:
    try:
        saved = read_state(config.state_path)
    except UnreadableState:
        return 0
    return saved.supervisor.reloads if saved else 0


def _reload_verdict(config: Config, pid: int, pidfd: int, before: int) -> str:
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(UnreadableState):
            saved = read_state(config.state_path)
            sup = saved.supervisor if saved else None
            if sup is not None and sup.pid == pid and sup.reloads > before:
                if sup.last_reload_error:
                    raise ConfigError(sup.last_reload_error)
                return f"reloaded (pid {pid}): {sup.last_reload_changes or 'no change'}"
        if _wait_exit(pidfd, 0.05):
            raise AgentError(f"the supervisor (pid {pid}) exited while reloading")
    raise AgentError(
        f"no reload verdict from the supervisor (pid {pid}) within {RELOAD_TIMEOUT:g}s"
    )


def reload_systemd(config: Config) -> str:
    """`systemctl reload agent` (its ExecReload= runs `agentctl reload --pid $MAINPID`)."""
    if unit_properties("ActiveState")["ActiveState"] != "active":
        raise NotRunning(f"{UNIT} is not active: nothing to reload")
    before = _reload_count(config)
    try:
        systemctl_action("reload")
    except AgentError:
        saved = None
        with contextlib.suppress(UnreadableState):
            saved = read_state(config.state_path)
        if saved and saved.supervisor.reloads > before and saved.supervisor.last_reload_error:
            raise ConfigError(saved.supervisor.last_reload_error) from None
        raise
    saved = read_state(config.state_path)
    changes = saved.supervisor.last_reload_changes if saved else None
    return f"reloaded ({UNIT}): {changes or 'no change'}"
