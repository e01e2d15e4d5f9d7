"""Errors an operator can cause or meet, each with its documented exit code.

The CLI turns these into one clear line on stderr and the exit code; it never shows a
traceback for them.
"""

# Exit codes of agentctl (documented in README.md, and in agentctl(1) from EXIT_STATUS below).
EXIT_OK = 0
EXIT_FAILURE = 1  # generic failure; also `start` when a supervisor is already running
EXIT_USAGE = 2  # bad command line (click's own code)
EXIT_CONFIG = 78  # EX_CONFIG: unreadable or invalid configuration; an untrusted state_dir
EXIT_PERMISSION = 77  # EX_NOPERM: not allowed (systemctl or journal access denied)
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C), as a shell reports SIGINT

# Exit codes of `agentctl status`.
STATUS_HEALTHY = 0
STATUS_CRASHED = 1
STATUS_DEGRADED = 2
STATUS_NOT_RUNNING = 3

# Exit codes of `agentctl run` (the supervisor process itself).
RUN_SHUTDOWN_TIMEOUT = 70  # workers did not stop within stop_timeout; process ended itself
RUN_FORCED = 71  # a second stop signal escalated the graceful stop

# Every exit code above with what it means, by the command that returns it ("" for every
# command). The man page's EXIT STATUS section is generated from this (packaging/manpage.py),
# and a test checks that each code above is here.
EXIT_STATUS: tuple[tuple[str, int, str], ...] = (
    ("", EXIT_OK, "success"),
    (
        "",
        EXIT_FAILURE,
        "failure, said in one line on standard error (e.g. start: a supervisor is already "
        "running, or it died before it was ready; send --wait: the message failed or the "
        "wait timed out; doctor: a check failed)",
    ),
    ("", EXIT_USAGE, "bad command line"),
    (
        "",
        STATUS_NOT_RUNNING,
        "the command needs a running supervisor and none is running (send --wait, reload)",
    ),
    ("", EXIT_PERMISSION, "permission denied (systemctl, the journal, or files in state_dir)"),
    (
        "",
        EXIT_CONFIG,
        "bad configuration: the message names the file, the key and what was expected; also an "
        "untrusted state_dir (start, run) or an untrusted recorded config (restart)",
    ),
    ("", EXIT_INTERRUPTED, "interrupted (SIGINT, Ctrl-C)"),
    ("status", STATUS_HEALTHY, "running and healthy"),
    ("status", STATUS_CRASHED, "crashed: the state says running, no process holds the lock"),
    (
        "status",
        STATUS_DEGRADED,
        "running but degraded (a worker in error or hung, an agent failing, the state file "
        "not writable)",
    ),
    ("status", STATUS_NOT_RUNNING, "not running"),
    (
        "run",
        RUN_SHUTDOWN_TIMEOUT,
        "workers did not stop within stop_timeout; the process ended itself",
    ),
    ("run", RUN_FORCED, "a second SIGTERM or SIGINT cut the graceful stop short"),
)


class AgentError(Exception):
    """An expected failure with a message for the operator and an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(AgentError):
    """A bad argument on the command line (exit 2, as click's own usage errors)."""

    exit_code = EXIT_USAGE


class NotRunning(AgentError):
    """The command needs a running supervisor and there is none (exit 3, as `status`)."""

    exit_code = STATUS_NOT_RUNNING


class ConfigError(AgentError):
    exit_code = EXIT_CONFIG


class UntrustedStateDir(ConfigError):
    """state_dir, or something under it, could have been written by somebody else (exit 78:
    the installation needs fixing, like a bad config; see agent.trust, docs/security.md)."""


class AlreadyRunning(AgentError):
    def __init__(self, pid: int | None):
        self.pid = pid
        shown = pid if pid is not None else "unknown"
        super().__init__(f"agent supervisor already running (pid {shown})")


class PermissionDenied(AgentError):
    exit_code = EXIT_PERMISSION


class DatabaseError(AgentError):
    """The PostgreSQL queue could not do what was asked: unreachable, timed out, refused.
    The text names the server (host, database) but never the connection string's content."""


class SchemaMismatch(AgentError):
    """The queue database's schema is not the one this build runs on: ahead of it (a newer
    agent migrated it), or behind it with auto_migrate off. The installation needs fixing."""

    exit_code = EXIT_CONFIG


def os_error(exc: OSError) -> AgentError:
    """An OSError met while serving an operator, as one line naming the file."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{where}permission denied (run as root or as the agent's user)")
    return AgentError(f"{where}{reason}")
