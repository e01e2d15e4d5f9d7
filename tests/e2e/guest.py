"""A real systemd 252 + journald, booted in a container, for end-to-end tests and benches.

Standard library only: it runs under the dev venv's python and under Debian's /usr/bin/python3.

- rootfs: a minbase bookworm made by debootstrap once and cached under CACHE_DIR, keyed by a
  hash of its package list; every boot runs on an overlayfs over it, so the cache stays
  pristine and a session starts from a clean guest.
- boot: systemd-nspawn -b on that overlay, in a dedicated host cgroup (see
  ../shared/reference/README.md for the pitfalls each step avoids).
- run: commands inside the guest through nsenter.
- teardown: poweroff, then unmount the overlay, remove the run directory and the cgroups,
  and check that nothing was left behind.

    python3 -m tests.e2e.guest rootfs    # build (or reuse) the cached rootfs
    python3 -m tests.e2e.guest clis      # install (or reuse) the real agent CLIs from npm
    python3 -m tests.e2e.guest deb       # build the .deb from this checkout
    python3 -m tests.e2e.guest shell     # boot a guest with the .deb installed; keep it up
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("AGENT_E2E_CACHE", "/var/cache/agent-e2e"))
SUITE = "bookworm"
# Everything agent.deb needs from Debian, so dpkg -i works inside the guest (no network there).
GUEST_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "python3",
    "python3-click",
    "python3-systemd",
    "python3-sdnotify",
    "python3-pythonjsonlogger",
    "python3-prometheus-client",
    # the shared queue backend, as an operator installs it (the .deb's Recommends)
    "python3-psycopg",
    "python3-psycopg-pool",
    "postgresql",
)
SYSPATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOST_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage")
# The real provider CLIs from npm (../shared/reference/real-agent-clis.md), pinned; cached
# under CACHE_DIR and bound read-only into the guest at CLIS_IN_GUEST.
AGENT_CLIS = ("@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.169.0")
CLIS_IN_GUEST = "/opt/agent-clis"
CLAUDE_IN_GUEST = f"{CLIS_IN_GUEST}/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
CODEX_IN_GUEST = (
    f"{CLIS_IN_GUEST}/node_modules/@openai/codex-linux-x64/vendor/"
    "x86_64-unknown-linux-musl/bin/codex"
)
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


class GuestError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cannot_boot_reason(tools: Sequence[str] = HOST_TOOLS) -> str | None:
    """Why this machine cannot boot a systemd container (with these host tools), or None."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlay mounts, cgroups)"
    missing = [t for t in tools if not shutil.which(t, path=SYSPATH)]
    if missing:
        return (
            f"missing host tools: {', '.join(missing)}; install them with "
            "`bash tests/e2e/prepare.sh`"
        )
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup"
    return None


def _host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = SYSPATH
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _host_run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a host tool (debootstrap, chroot, dpkg-buildpackage) in _host_env, output captured."""
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env=_host_env(), check=False
    )


# ---- the cached root file system


def rootfs_key() -> str:
    text = "\n".join([SUITE, "minbase", *sorted(GUEST_PACKAGES), "v1"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _mirror() -> str:
    """The Debian mirror apt already uses on this machine."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                return parts[1]
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> Path:
    """The cached guest rootfs, made by debootstrap (~75 s) the first time."""
    root = CACHE_DIR / f"rootfs-{rootfs_key()}"

    def finish(tree: Path) -> None:
        # no first-boot logic in the guest: a fixed machine id, an empty journal
        (tree / "etc/machine-id").write_text(hashlib.md5(root.name.encode()).hexdigest() + "\n")
        for path in (tree / "var/log/journal").glob("*"):
            shutil.rmtree(path, ignore_errors=True)

    return cached_debootstrap(root, GUEST_PACKAGES, finish, sign="lib/systemd/systemd")


def cached_debootstrap(
    root: Path,
    packages: Sequence[str],
    finish: Callable[[Path], None],
    sign: str = "",
) -> Path:
    """root: a minbase SUITE with packages, then finish(tree), made once (under CACHE_DIR's
    lock, in a scratch tree renamed into place when complete) and reused while root/sign
    exists."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others reuse its result
        if (root / sign).exists():
            return root
        tmp = CACHE_DIR / f".build-{root.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"debootstrap {SUITE} minbase + {','.join(packages)} -> {root} (once; ~35-75 s)")
        started = time.monotonic()
        include = f"--include={','.join(packages)}"
        done = _host_run(["debootstrap", "--variant=minbase", include, SUITE, str(tmp), _mirror()])
        try:
            if done.returncode != 0:
                output = (done.stdout + done.stderr)[-3000:]
                raise GuestError(f"debootstrap failed ({done.returncode}):\n{output}")
            finish(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(root)
        log(f"{root.name} ready in {time.monotonic() - started:.0f} s")
        return root


# ---- the real agent CLIs


def ensure_agent_clis() -> Path:
    """The pinned Claude Code and Codex CLIs, installed by npm once (~15 s) and cached."""
    key = hashlib.sha256("\n".join(AGENT_CLIS).encode()).hexdigest()[:12]
    prefix = CACHE_DIR / f"clis-{key}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (prefix / ".complete").exists():
            return prefix
        npm = shutil.which("npm")
        if npm is None:
            raise GuestError("npm is not installed: the real agent CLIs come from the npm registry")
        tmp = CACHE_DIR / f".clis-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"npm install {' '.join(AGENT_CLIS)} (once)")
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(tmp), *AGENT_CLIS],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GuestError(f"npm install failed:\n{(done.stdout + done.stderr)[-3000:]}")
        (tmp / ".complete").touch()
        shutil.rmtree(prefix, ignore_errors=True)
        tmp.rename(prefix)
        return prefix


# ---- the package


def build_deb(out_dir: Path) -> Path:
    """Build agent_*.deb from this checkout (tracked and untracked files) in a scratch copy."""
    src = out_dir / "src"
    copy_sources(src)
    if not (src / "README.md").exists():  # pyproject names it; the lead's README may be pending
        (src / "README.md").write_text("# agent\n")
    log("dpkg-buildpackage -us -uc -b")
    started = time.monotonic()
    done = _host_run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    if done.returncode != 0:
        raise GuestError(f"dpkg-buildpackage failed:\n{(done.stdout + done.stderr)[-4000:]}")
    debs = sorted(out_dir.glob("agent_*_all.deb"))
    if not debs:
        raise GuestError(f"dpkg-buildpackage made no agent_*_all.deb in {out_dir}")
    log(f"built {debs[-1].name} in {time.monotonic() - started:.0f} s")
    return debs[-1]


def copy_sources(dest: Path) -> None:
    """Copy this checkout's files (see _source_files) under dest."""
    for name in _source_files():
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def _source_files() -> list[str]:
    """The work tree's files: git's view (tracked + untracked, not ignored), else a walk."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if done.returncode == 0:
        return [f.decode() for f in done.stdout.split(b"\0") if f]
    skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
    names = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p in skip or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() or path.is_symlink():
            names.append(str(path.relative_to(REPO)))
    return names


# ---- host cgroups


def _cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    if (base / "unified").is_dir():  # hybrid (v1 + a named systemd hierarchy + unified)
        return [base / "systemd", base / "unified"]
    if (base / "cgroup.controllers").exists():  # pure v2
        return [base]
    return [base / "systemd"]


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


# ---- a container on an overlay


class Container:
    """What Guest and stock.Machine share: systemd-nspawn on an overlay of a cached rootfs.

    The overlay's layers live in a run directory under /var/tmp (on a tmpfs, if asked), the
    container in a dedicated host cgroup; __enter__ sets up (tearing down if that fails),
    __exit__ and teardown() stop the container and remove all of it, and leftovers() names
    what is still there. A subclass says how to set up (_setup) and how to end a running
    nspawn (_end_nspawn).
    """

    def __init__(self, name: str, rootfs: Path | None):
        self.name = name
        self.rootfs = rootfs
        self.run_dir: Path | None = None
        self.merged: Path | None = None
        self.cgroups = [root / self.name for root in _cgroup_roots()]
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.console_log: Path | None = None

    def __enter__(self) -> Self:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _setup(self) -> None:
        raise NotImplementedError

    def _end_nspawn(self) -> None:
        """End the running nspawn (called by teardown only while it runs)."""
        raise NotImplementedError

    # -- up

    def _mount_overlay(self, lower: Path, tmpfs_size: str | None = None) -> None:
        """A fresh run directory (a tmpfs of tmpfs_size, if given) and the overlay in it."""
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir="/var/tmp"))
        if tmpfs_size is not None:
            scratch = f"mode=0700,size={tmpfs_size}"
            _check(["mount", "-t", "tmpfs", "-o", scratch, "tmpfs", str(self.run_dir)])
        upper, work, self.merged = (self.run_dir / d for d in ("upper", "work", "root"))
        for d in (upper, work, self.merged):
            d.mkdir()
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        _check(["mount", "-t", "overlay", "overlay", "-o", options, str(self.merged)])

    def _spawn(self, options: Sequence[str], stdin: int) -> None:
        """Start systemd-nspawn on the overlay, in this container's cgroups, with these
        options (and the command to run, if any, last); its output goes to console_log."""
        assert self.merged is not None and self.run_dir is not None
        into_cgroup = "; ".join(
            f"mkdir -p {cg} && echo $$ > {cg}/cgroup.procs" for cg in self.cgroups
        )
        nspawn = " ".join(
            [
                "exec systemd-nspawn --register=no --keep-unit",
                f"-M {self.name} -D {self.merged}",
                *options,
            ]
        )
        self.console_log = self.run_dir / "console.log"
        with open(self.console_log, "wb") as console:
            self.proc = subprocess.Popen(
                ["bash", "-c", f"{into_cgroup}; {nspawn}"],
                stdin=stdin,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_host_env(),
            )

    def _wait_leader(self, deadline: float, ready: Callable[[Path], bool], what: str) -> int:
        """The container's PID 1, once ready(its root seen from the host) holds."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise GuestError(f"systemd-nspawn exited with {code}:\n{self.tail()}")
            leader = _child_of(self.proc.pid)
            if leader and ready(Path(f"/proc/{leader}/root")):
                return leader
            time.sleep(0.05)
        raise GuestError(f"{what} did not start in time\n{self.tail()}")

    def tail(self) -> str:
        """The last lines of the container's console."""
        if self.console_log and self.console_log.exists():
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-30:])
        return ""

    def _nsenter(self, argv: Sequence[str], variables: Sequence[str] = ()) -> list[str]:
        """argv run inside (all the container's namespaces, a clean environment)."""
        assert self.leader is not None
        env = [f"PATH={SYSPATH}", *variables]
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *env, *argv]

    # -- down

    def teardown(self) -> list[str]:
        """Stop everything this container made; returns what could not be cleaned (empty: all)."""
        if self.proc is not None and self.proc.poll() is None:
            self._end_nspawn()
        self.leader = None
        mounts = (self.merged, self.run_dir)  # the overlay, then the tmpfs under it (if any)
        for mount in mounts:
            if mount is not None and os.path.ismount(mount):
                done = subprocess.run(["umount", str(mount)], capture_output=True, check=False)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        for cg in self.cgroups:
            _remove_cgroup(cg)
        for d in (
            "/run/systemd/nspawn/propagate",
            "/run/systemd/nspawn/locks",
            "/run/systemd/nspawn",
            "/run/systemd/nspawn-root",
        ):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if self.run_dir is not None and not any(m and os.path.ismount(m) for m in mounts):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        problems = self.leftovers()
        if problems:
            log(f"teardown left: {problems}")
        return problems

    def _signal(self, signals: Sequence[signal.Signals | None]) -> None:
        """Send nspawn each signal in turn (None: none, just wait) until it exits."""
        assert self.proc is not None
        for sig in signals:
            if sig is not None and self.proc.poll() is None:
                log(f"{self.name} still up: sending {sig.name} to nspawn")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
                break

    def leftovers(self) -> list[str]:
        found = []
        if self.proc is not None and self.proc.poll() is None:
            found.append(f"systemd-nspawn pid {self.proc.pid} still running")
        if self.run_dir is not None:
            if str(self.run_dir) in Path("/proc/self/mounts").read_text():
                found.append(f"mount under {self.run_dir}")
            if self.run_dir.exists():
                found.append(f"directory {self.run_dir}")
        found += [f"cgroup {cg}" for cg in self.cgroups if cg.exists()]
        return found


# ---- the guest


class Guest(Container):
    """One booted systemd container. Use as a context manager, or boot() / teardown()."""

    def __init__(
        self,
        name: str | None = None,
        rootfs: Path | None = None,
        binds: Sequence[tuple[Path, str]] = (),
    ):
        super().__init__(name or f"agent-e2e-{os.getpid()}", rootfs)
        self.binds = list(binds)  # (host path, guest path), bound read-only
        self.install_path: str | None = None  # where the .deb was copied into the guest

    # -- boot

    def _setup(self) -> None:
        self.boot()

    def boot(self) -> None:
        self._mount_overlay(self.rootfs or ensure_rootfs())
        started = time.monotonic()
        self._spawn(
            [
                "--private-network --console=read-only",
                *(f"--bind-ro={host}:{inside}" for host, inside in self.binds),
                "-b",
            ],
            stdin=subprocess.DEVNULL,
        )
        self.leader = self._wait_leader(
            started + BOOT_TIMEOUT,
            lambda root: (root / "run/systemd/private").is_socket(),
            "guest systemd",
        )
        state = self.run(
            ["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT
        ).stdout.strip()
        if state not in ("running", "degraded"):
            raise GuestError(f"guest did not come up: state {state!r}\n{self.tail()}")
        log(f"guest {self.name} up ({state}) in {time.monotonic() - started:.1f} s")

    # -- inside the guest

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command inside the guest (all its namespaces, a clean environment)."""
        if self.leader is None:
            raise GuestError("guest is not booted")
        variables = ["LANG=C.UTF-8", *(f"{k}={v}" for k, v in (env or {}).items())]
        done = subprocess.run(
            self._nsenter(argv, variables),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and done.returncode != 0:
            raise GuestError(
                f"in guest: {' '.join(argv)} exited {done.returncode}\n"
                f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
            )
        return done

    def sh(self, script: str, check: bool = True, timeout: float = 120.0) -> str:
        return self.run(["sh", "-c", script], check=check, timeout=timeout).stdout

    def path(self, guest_path: str) -> Path:
        """The host's view of a path inside the guest (not under the guest's /tmp tmpfs)."""
        return Path(f"/proc/{self.leader}/root") / guest_path.lstrip("/")

    def write(self, guest_path: str, text: str, mode: int = 0o644) -> None:
        target = self.path(guest_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def copy_in(self, host_file: Path, guest_dir: str = "/root") -> str:
        target = self.path(guest_dir) / host_file.name
        shutil.copy2(host_file, target)
        return f"{guest_dir.rstrip('/')}/{host_file.name}"

    def unit(self, *props: str, unit: str = "agent.service") -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    # -- teardown

    def _end_nspawn(self) -> None:
        """Power the guest off; signal nspawn if that does not end it in time."""
        if self.leader is not None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    self._nsenter(["systemctl", "poweroff", "--no-block"]),
                    capture_output=True,
                    timeout=STOP_TIMEOUT,
                    check=False,
                )
        self._signal([None, signal.SIGTERM, signal.SIGKILL])


def _child_of(pid: int) -> int | None:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        first = children.read_text().split()
        if first:
            return int(first[0])
    return None


def _check(argv: Sequence[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While a guest is up, SIGTERM unwinds like Ctrl-C, so its teardown still runs."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def install_deb(guest: Guest, deb: Path) -> None:
    path = guest.copy_in(deb)
    guest.run(["dpkg", "-i", path], timeout=180)


def keep_up(container: Container, enter: str) -> None:
    """Say how to enter; wait for Ctrl-C, SIGTERM (see sigterm_interrupts) or nspawn's end."""
    print(enter)
    print(f"stop it with Ctrl-C or: kill {os.getpid()}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while container.proc is not None and container.proc.poll() is None:
            time.sleep(0.5)


def command_line(
    argv: list[str], commands: dict[str, Callable[[], object]], reason: str | None
) -> int:
    """`python3 -m MODULE [COMMAND]`: run commands[COMMAND] (the first one by default), unless
    reason (why this host cannot) says no."""
    what = argv[1] if len(argv) > 1 else next(iter(commands))
    if reason:
        print(f"cannot: {reason}", file=sys.stderr)
        return 1
    if what not in commands:
        *others, last = commands
        expected = f"{', '.join(others)} or {last}" if others else last
        print(f"unknown command {what!r}: expected {expected}", file=sys.stderr)
        return 2
    commands[what]()
    return 0


def _shell() -> None:
    out = Path(tempfile.mkdtemp(prefix="agent-deb-"))
    deb = build_deb(out)
    with sigterm_interrupts(), Guest() as guest:
        install_deb(guest, deb)
        keep_up(guest, f"guest up: nsenter -t {guest.leader} -a env -i PATH={SYSPATH} bash")
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str]) -> int:
    commands = {
        "rootfs": lambda: print(ensure_rootfs()),
        "clis": lambda: print(ensure_agent_clis()),
        "deb": lambda: print(build_deb(Path(tempfile.mkdtemp(prefix="agent-deb-")))),
        "shell": _shell,
    }
    return command_line(argv, commands, cannot_boot_reason())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
