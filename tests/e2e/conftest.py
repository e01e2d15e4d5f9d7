"""One booted systemd (with journald) per test session, with the freshly built .deb installed.

Needs root, systemd-nspawn, debootstrap and the Debian build tools: `bash tests/e2e/prepare.sh`.
Where the machine cannot boot a container the tests skip with the reason, and fail instead
under AGENT_TESTS_NO_SKIP=1 (CI). Set AGENT_E2E_DEB=path/to/agent_*.deb to test a prebuilt
package instead of building one.
"""

import os
from pathlib import Path

import pytest

from tests.e2e.guest import (
    CLIS_IN_GUEST,
    Guest,
    GuestError,
    build_deb,
    cannot_boot_reason,
    ensure_agent_clis,
    ensure_rootfs,
    sigterm_interrupts,
)
from tests.helpers import skip_or_fail


def _require_machine() -> None:
    reason = cannot_boot_reason()
    if reason:
        skip_or_fail(f"end-to-end tests cannot boot a systemd container here: {reason}")


@pytest.fixture(scope="session")
def agent_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_machine()
    prebuilt = os.environ.get("AGENT_E2E_DEB")
    if prebuilt:
        path = Path(prebuilt)
        if not path.is_file():
            pytest.fail(f"AGENT_E2E_DEB={prebuilt}: no such file")
        return path
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def bare_guest() -> Guest:
    """A booted guest without the package (the session's only one)."""
    _require_machine()
    try:
        rootfs = ensure_rootfs()
    except GuestError as exc:
        skip_or_fail(f"cannot make the guest root file system (debootstrap): {exc}")
    try:
        clis = ensure_agent_clis()
    except GuestError as exc:
        skip_or_fail(f"cannot install the real agent CLIs from npm: {exc}")
    # the CLIs, and the host's node (for the W+X memory measurement), read-only
    binds = [(clis, CLIS_IN_GUEST), (Path("/usr/bin/node"), "/usr/local/bin/node")]
    guest = Guest(rootfs=rootfs, binds=[b for b in binds if b[0].exists()])
    with sigterm_interrupts():  # a SIGTERM to pytest still tears the guest down
        try:
            guest.boot()
        except GuestError as exc:
            guest.teardown()
            skip_or_fail(f"cannot boot systemd in a container: {exc}")
        yield guest
        left = guest.teardown()
    assert not left, f"the e2e guest left things behind: {left}"


@pytest.fixture(scope="session")
def guest(bare_guest: Guest, agent_deb: Path) -> Guest:
    """The booted guest with agent_*.deb installed by dpkg (enabled and started)."""
    bare_guest.install_path = bare_guest.copy_in(agent_deb)
    bare_guest.run(["dpkg", "-i", bare_guest.install_path], timeout=180)
    return bare_guest
