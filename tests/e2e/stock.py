"""A stock Debian 12, as a person has it before following the README's quickstart.

Standard library only, like guest.py (whose pieces it reuses).

- rootfs: `debootstrap --variant=minbase bookworm` with python3 and sudo only; an ordinary
  user `admin` whose sudo needs no password (as on Debian's cloud images), /etc/hostname
  and /etc/hosts as the installer writes them, and no apt package lists (as in Debian's
  container images, or on a machine whose lists went stale: `apt-get update` comes first).
  No python3-venv, no ca-certificates. Cached under CACHE_DIR as stock-HASH, keyed by this
  recipe, apart from the e2e guest's rootfs.
- machine: each run gets an overlayfs over the cache, its writable layer on a tmpfs, so it
  starts from the stock tree, the cache stays pristine and nothing is synced or deleted on
  disk afterwards. systemd-nspawn runs it without --boot (PID 1 is nspawn's stub init, the
  payload only waits for the end) and without --private-network, so apt and pip reach the
  registries as on the host. Commands enter with nsenter; `login()` runs a script in
  `su - admin`, a login shell in the user's home.
- trust: the host's extra CAs (/usr/local/share/ca-certificates, e.g. a TLS-intercepting
  proxy's) are bound read-only under the guest's /usr/local/share/ca-certificates, where
  Debian's update-ca-certificates picks them up when ca-certificates gets installed; the
  venv's pip (Debian's wheel) trusts /etc/ssl/certs/ca-certificates.crt. Nothing else of
  the host's package-client configuration (pip.conf, PIP_*, wheel dirs) goes in.

    python3 -m tests.e2e.stock rootfs   # build (or reuse) the cached stock rootfs
    python3 -m tests.e2e.stock shell    # a stock machine with this checkout in ~admin/agent
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.guest import (
    CACHE_DIR,
    STOP_TIMEOUT,
    SUITE,
    Container,
    GuestError,
    _child_of,
    _host_run,
    cached_debootstrap,
    cannot_boot_reason,
    command_line,
    copy_sources,
    keep_up,
    sigterm_interrupts,
)

STOCK_PACKAGES = ("python3", "sudo")
USER = "admin"
HOSTNAME = "debian"
HOST_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "chroot")
HOST_CAS = Path("/usr/local/share/ca-certificates")
GUEST_CAS = "/usr/local/share/ca-certificates/host"
UP = "/run/stock-up"  # the payload's sign that the machine runs
SCRATCH = "2g"  # the tmpfs under the overlay: apt, the venv and pip's cache take ~200 MB
START_TIMEOUT = 30.0


def cannot_run_reason() -> str | None:
    return cannot_boot_reason(HOST_TOOLS)


def stock_key() -> str:
    text = "\n".join([SUITE, "minbase", *sorted(STOCK_PACKAGES), USER, HOSTNAME, "no-lists", "v1"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_stock_rootfs() -> Path:
    """The cached stock rootfs, made by debootstrap (~35-75 s) the first time."""
    return cached_debootstrap(CACHE_DIR / f"stock-{stock_key()}", STOCK_PACKAGES, _make_stock)


def _make_stock(tree: Path) -> None:
    """What an installed machine has beyond debootstrap: a name, a user with sudo."""
    (tree / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (tree / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
    )
    done = _host_run(
        ["chroot", str(tree), "useradd", "--create-home", "--shell", "/bin/bash", USER]
    )
    if done.returncode != 0:
        raise GuestError(f"useradd {USER} in the stock rootfs failed: {done.stderr.strip()}")
    sudoers = tree / "etc/sudoers.d" / USER
    sudoers.write_text(f"{USER} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    # no package lists and no downloaded .debs: the state of Debian's container images
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin"):
        for path in tree.glob(pattern):
            if path.is_file():
                path.unlink()


def _user_ids(tree: Path) -> tuple[int, int]:
    for line in (tree / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == USER:
            return int(fields[2]), int(fields[3])
    raise GuestError(f"no user {USER} in {tree}/etc/passwd")


class Machine(Container):
    """One stock machine on an overlay of the cached rootfs. A context manager."""

    def __init__(self, rootfs: Path, name: str | None = None):
        super().__init__(name or f"agent-stock-{os.getpid()}", rootfs)
        # leader: the container's PID 1 (nspawn's stub init)
        self.payload: int | None = None  # its child that waits for the end
        self.exit_code: int | None = None

    def _setup(self) -> None:
        self.mount()

    def mount(self) -> None:
        """The overlay, its writable layer in memory: nothing to sync or delete on disk."""
        assert self.rootfs is not None
        self._mount_overlay(self.rootfs, tmpfs_size=SCRATCH)

    @property
    def home(self) -> Path:
        """The user's home, seen from the host."""
        assert self.merged is not None
        return self.merged / "home" / USER

    def copy_checkout(self, dirname: str = "agent") -> str:
        """This checkout's files in ~USER/dirname, owned by the user; returns the guest path."""
        assert self.merged is not None
        uid, gid = _user_ids(self.merged)
        dest = self.home / dirname
        copy_sources(dest)
        for path in [dest, *dest.rglob("*")]:
            os.lchown(path, uid, gid)
        return f"/home/{USER}/{dirname}"

    def start(self) -> None:
        """Run the container: nspawn's stub init as PID 1 and a payload that waits for stop().

        The payload reads its standard input (our pipe, through --console=pipe) and ends at
        its end: when stop() closes it, or when this process dies."""
        binds = []
        if any(HOST_CAS.glob("*.crt")):
            binds.append(f"--bind-ro={HOST_CAS}:{GUEST_CAS}")
        payload = f"touch {UP}; read -r _; exit 0"
        self._spawn(
            [
                f"--hostname={HOSTNAME} --as-pid2 --console=pipe",
                *binds,
                f"/bin/bash -c '{payload}'",
            ],
            stdin=subprocess.PIPE,
        )
        self.leader = self._wait_leader(
            time.monotonic() + START_TIMEOUT,
            lambda root: (root / UP.lstrip("/")).exists(),
            "the stock machine",
        )
        self.payload = _child_of(self.leader)

    def run(
        self, argv: Sequence[str], timeout: float = 60.0, merge_output: bool = False
    ) -> subprocess.CompletedProcess:
        """Run a command as root inside (all its namespaces, a clean environment)."""
        if self.leader is None:
            raise GuestError("the stock machine is not running")
        return subprocess.run(
            self._nsenter(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )

    def login(self, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a shell script as USER in a login shell (`su - USER`), stderr into stdout."""
        return self.run(["su", "-", USER, "-c", script], timeout=timeout, merge_output=True)

    def processes(self) -> list[str]:
        """What runs in the machine besides its PID 1 and the payload: pid and command line."""
        if self.leader is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self.leader}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (self.leader, self.payload):
                continue
            try:
                if os.readlink(entry / "ns/pid") != ns:
                    continue
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if state != "Z":
                found.append(f"{entry.name} {argv}")
        return found

    def stop(self) -> int:
        """End the payload, so nspawn exits by itself; returns nspawn's exit code."""
        assert self.proc is not None
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.exit_code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"systemd-nspawn did not exit\n{self.tail()}") from exc
        self.leader = None
        return self.exit_code

    def _end_nspawn(self) -> None:
        # not booted: nspawn answers SIGTERM with SIGKILL to the container's PID 1
        self._signal([signal.SIGTERM, signal.SIGKILL])

    def teardown(self) -> list[str]:
        """Stop everything this machine made; returns what could not be cleaned."""
        problems = super().teardown()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        return problems


def _shell() -> None:
    with sigterm_interrupts(), Machine(ensure_stock_rootfs()) as machine:
        workdir = machine.copy_checkout()
        machine.start()
        keep_up(
            machine, f"stock machine up: nsenter -t {machine.leader} -a su - {USER}  (~ {workdir})"
        )


def main(argv: list[str]) -> int:
    commands = {"rootfs": lambda: print(ensure_stock_rootfs()), "shell": _shell}
    return command_line(argv, commands, cannot_run_reason())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
