"""Errors an operator can cause or meet, each with its documented exit code.

The CLI turns these into one clear line on stderr and the exit code; it never shows a
traceback for them.
"""

# Exit codes of agentctl (documented in README.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # generic failure; also `start` when a supervisor is already running
EXIT_USAGE = 2  # bad command line (click's own code)
EXIT_CONFIG = 78  # EX_CONFIG: unreadable or invalid configuration; an untrusted state_dir
EXIT_PERMISSION = 77  # EX_NOPERM: not allowed (systemctl or journal access denied)

# Exit codes of `agentctl status`.
STATUS_HEALTHY = 0
STATUS_CRASHED = 1
STATUS_DEGRADED = 2
STATUS_NOT_RUNNING = 3

# Exit codes of `agentctl run` (the supervisor process itself).
RUN_SHUTDOWN_TIMEOUT = 70  # workers did not stop within stop_timeout; process ended itself
RUN_FORCED = 71  # a second stop signal escalated the graceful stop


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
