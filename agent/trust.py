"""Whether state_dir deserves the supervisor's trust, in the manner of sshd's StrictModes.

The supervisor (often root) acts on what it finds under state_dir: it kills the process
groups runs/ names, signals the holder of agent.lock, appends to logs/, restarts with the
config state.json names. So before it takes the lock (and before `agentctl start`
launches one) it checks that nobody else could have planted anything there:

- state_dir and every directory of the runtime's own under it (RUNTIME_ENTRIES: logs,
  runs, slack, queue and everything below them) are real directories (no symlinks), owned
  by the user running the supervisor or by root, and neither group- nor world-writable;
- except the queue's ingress, QUEUE_INGRESS (queue/incoming and the producers' staging
  area queue/tmp), which may be group-writable for a producers' group, never
  world-writable; the files inside the queue's directories are the queue's business
  (agent.queue treats every entry as untrusted input);
- nothing else of the runtime's (agent.lock, state.json, the files under logs, runs,
  slack) is a symlink.

Other entries of state_dir (an agent's home, say) are not the runtime's: it neither
checks them nor acts on anything in them.

A violation is UntrustedStateDir (exit 78, EX_CONFIG: the installation needs fixing), one
line naming the path, the owner and mode found and what is expected. Whatever the
supervisor creates is at most 0750 / 0640 (SUPERVISOR_UMASK), so it never makes a
directory it would refuse at the next start.
"""

import os
import stat
from pathlib import Path

from agent.errors import UntrustedStateDir

RUNTIME_ENTRIES = ("agent.lock", "state.json", "logs", "runs", "slack", "queue")
QUEUE_INGRESS = ("queue/incoming", "queue/tmp")
QUEUE_DIRS = ("queue/tmp", "queue/incoming", "queue/processing", "queue/outgoing", "queue/failed")
MAX_DEPTH = 4  # state_dir/slack/<profile>/routes is the deepest the runtime goes
SUPERVISOR_UMASK = 0o027  # never group-writable, never world-anything


def tighten_umask() -> None:
    """At least SUPERVISOR_UMASK for everything this process and its children create."""
    os.umask(os.umask(SUPERVISOR_UMASK) | SUPERVISOR_UMASK)


def check_state_dir(state_dir: Path, owner: int | None = None) -> None:
    """Raise UntrustedStateDir unless state_dir and what is under it deserve trust.
    A state_dir that does not exist yet is fine: the supervisor creates it 0750.
    `owner`: the uid the supervisor will run as (doctor, run by root for the `agent`
    user's service); by default this process's."""
    owner = os.geteuid() if owner is None else owner
    try:
        top = os.stat(state_dir)  # the operator's own path: a symlink at the top is theirs
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        raise UntrustedStateDir(f"{state_dir}: not a directory; expected the agent's state_dir")
    _check_directory(state_dir, top, "", owner)
    for name in RUNTIME_ENTRIES:
        try:
            info = os.lstat(state_dir / name)
        except FileNotFoundError:
            continue
        _check_entry(state_dir / name, info, name, 1, owner)


def _check_entry(path: Path, info: os.stat_result, relative: str, depth: int, owner: int) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedStateDir(
            f"{path}: a symlink; expected the agent's own file or directory (remove it)"
        )
    if not stat.S_ISDIR(info.st_mode):
        return
    _check_directory(path, info, relative, owner)
    if relative in QUEUE_DIRS or depth >= MAX_DEPTH:
        return
    with os.scandir(path) as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            _check_entry(Path(entry.path), info, f"{relative}/{entry.name}", depth + 1, owner)


def _check_directory(path: Path, info: os.stat_result, relative: str, me: int) -> None:
    writable = info.st_mode & (0o002 if relative in QUEUE_INGRESS else 0o022)
    if info.st_uid in (me, 0) and not writable:
        return
    found = f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"
    allowed = "not world-writable" if relative in QUEUE_INGRESS else "not group/world-writable"
    owners = f"uid {me} (the supervisor's user)" + (" or root" if me else "")
    raise UntrustedStateDir(
        f"{path}: {found}; expected owner {owners}, "
        f"{allowed} (fix: chown/chmod it, e.g. chmod go-w {path})"
    )


def config_file_problem(path: Path) -> str | None:
    """Why a config file named by a state file must not be trusted, or None."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path} cannot be used: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid not in (os.geteuid(), 0):
        return f"{path} is owned by uid {info.st_uid}, not by root or uid {os.geteuid()}"
    if info.st_mode & 0o022:
        return f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; others may write it"
    return None


def credential_path(path: str, env: dict[str, str] | None = None) -> Path:
    """Where a secret file named in the config is (a Slack token, the queue's DSN): absolute
    as given; else relative to $CREDENTIALS_DIRECTORY (systemd LoadCredential=) when set,
    else to the current directory."""
    env = os.environ if env is None else env
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials:
        return Path(credentials) / candidate
    return candidate.resolve()


def loose_secret_files(paths: list[Path]) -> list[str]:
    """One line per secret file (a Slack token) that its group or the world may read."""
    found = []
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # missing or unreadable: the Slack worker says so itself
        if mode & 0o044:
            found.append(
                f"{path}: mode {stat.S_IMODE(mode):04o} lets others read a secret; "
                f"expected 0600 or 0400 (chmod go-rwx {path})"
            )
    return found
