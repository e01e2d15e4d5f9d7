"""The README's quickstart, taken literally from README.md, on a stock Debian 12.

The first code block of README.md is the command for a fresh machine (the second is the
test suite's, which .ci/run runs). It runs on a
debootstrap'd bookworm with python3 and sudo only (stock.py: no python3-venv, no apt lists),
as the ordinary user `admin` in a login shell, in a copy of this checkout in their home; apt
and pip fetch from the real registries. Then the README's next code block that ends in
`agentctl send --wait TEXT` (give it an agent, talk to it), then `agentctl stop`; nothing
may be left running.

It needs no booted systemd and none of conftest.py's fixtures: it does not touch the
session's guest. Needs root and the registries; skips without them (fails under CI).
"""

import os
import re
import time
import urllib.request

import pytest

from agent.errors import STATUS_DEGRADED, STATUS_NOT_RUNNING
from tests.e2e.guest import REPO, SUITE, GuestError, _mirror, log, sigterm_interrupts
from tests.e2e.stock import USER, Machine, cannot_run_reason, ensure_stock_rootfs
from tests.helpers import skip_or_fail

pytestmark = pytest.mark.e2e

README = REPO / "README.md"
QUICKSTART_TIMEOUT = 300.0  # apt-get update + install, a venv, pip from PyPI, start
# what the README promises right after the first command
DEGRADED_HEADLINE = "agent supervisor: running (degraded)"
NO_AGENT = "no agent configured"


def code_blocks(markdown: str) -> list[str]:
    """The code blocks of a Markdown text, in order: fenced (``` or ~~~) or indented (four
    spaces or a tab, after a blank line). Indented ones lose their indentation."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i, after_blank = 0, True
    while i < len(lines):
        line = lines[i]
        fence = line.lstrip()[:3]
        if fence in ("```", "~~~"):
            body = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(fence):
                body.append(lines[i])
                i += 1
            blocks.append("\n".join(body))
            i, after_blank = i + 1, False
            continue
        if after_blank and line.strip() and line.startswith(("    ", "\t")):
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(("    ", "\t"))):
                body.append(lines[i][4:] if lines[i].startswith("    ") else lines[i][1:])
                i += 1
            blocks.append("\n".join(body).strip("\n"))
            continue
        after_blank = not line.strip()
        i += 1
    return blocks


def readme_commands() -> tuple[str, str]:
    """The README's quickstart (its first code block) and the block that gives it an agent
    (the first later one ending in `agentctl send --wait TEXT`); its second block must be
    the test suite's command."""
    if not README.is_file():
        pytest.fail(f"{README} is missing: its first code block is the quickstart under test")
    blocks = code_blocks(README.read_text())
    if len(blocks) < 3:
        pytest.fail(
            f"{README} has {len(blocks)} code block(s); it must open with the command for a "
            "fresh machine (start, status), then the test suite's, then later the one that "
            "configures an agent and sends it a message"
        )
    first = blocks[0]
    for needed in ("agentctl start", "agentctl status"):
        if needed not in first:
            pytest.fail(f"README.md's first code block no longer runs `{needed}`:\n{first}")
    if blocks[1].strip() != "bash scripts/test.sh":
        pytest.fail(f"README.md's second code block is not `bash scripts/test.sh`:\n{blocks[1]}")
    talk = [b for b in blocks[2:] if re.search(r"agentctl send --wait \S+\s*$", b)]
    if not talk:
        pytest.fail(
            "no code block of README.md after the first two ends with "
            "`agentctl send --wait TEXT`, whose reply this test checks"
        )
    return first, talk[0]


def expected_reply(command: str) -> str:
    """What the `cat` agent answers to the README's `send --wait TEXT`: TEXT."""
    match = re.search(r"agentctl send --wait (\S+)\s*$", command)
    assert match, command
    return match.group(1).strip("'\"")


def _unreachable_registry() -> str | None:
    for url in (f"{_mirror()}/dists/{SUITE}/Release", "https://pypi.org/simple/pip/"):
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20).close()
        except (OSError, ValueError) as exc:
            return f"{url}: {exc}"
    return None


def test_code_blocks_are_found_in_order() -> None:
    text = (
        "# t\n\nintro\n\n    one && two\n\nprose\n- item\n    not code\n\n"
        "```sh\nthree\n```\n\n\tfour\n"
    )
    assert code_blocks(text) == ["one && two", "three", "four"]
    assert code_blocks("no code here\n    still prose\n") == []


def test_readme_opens_with_the_quickstart() -> None:
    first, second = readme_commands()
    assert "\n" not in first.strip(), f"the quickstart is one line to paste:\n{first}"
    assert expected_reply(second)


def test_readme_quickstart_on_stock_debian() -> None:
    reason = cannot_run_reason()
    if reason:
        skip_or_fail(f"the quickstart test cannot run a container here: {reason}")
    first, second = readme_commands()
    unreachable = _unreachable_registry()
    if unreachable:
        skip_or_fail(f"the quickstart fetches from the package registries: {unreachable}")
    began = time.monotonic()
    try:
        rootfs = ensure_stock_rootfs()
    except GuestError as exc:
        skip_or_fail(f"cannot make the stock Debian root file system (debootstrap): {exc}")
    timings = {"rootfs": time.monotonic() - began}

    machine = Machine(rootfs, name=f"agent-quickstart-{os.getpid()}")
    with sigterm_interrupts():  # a SIGTERM to pytest still tears the machine down
        try:
            _quickstart(machine, first, second, timings)
        finally:
            left = machine.teardown()
    timings["total"] = time.monotonic() - began
    log("quickstart test: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    assert not left, f"the stock machine left things behind: {left}"


def _quickstart(machine: Machine, first: str, second: str, timings: dict[str, float]) -> None:
    step = time.monotonic()
    machine.mount()
    workdir = machine.copy_checkout()
    machine.start()
    timings["start"] = time.monotonic() - step
    venv = machine.run(["dpkg", "-s", "python3-venv"])
    assert venv.returncode != 0, f"the stock machine must not have python3-venv:\n{venv.stdout}"

    step = time.monotonic()
    one = machine.login(f"cd {workdir} || exit 1\n{first}", timeout=QUICKSTART_TIMEOUT)
    timings["first command"] = time.monotonic() - step
    log(f"README's first command exited {one.returncode}:\n{one.stdout}")
    out = f"README's first command, as {USER} in {workdir}, exited {one.returncode}:\n{one.stdout}"
    assert re.search(r"^started \(pid \d+\)$", one.stdout, re.M), out
    assert DEGRADED_HEADLINE in one.stdout, out
    assert NO_AGENT in one.stdout, out
    # status is the last command of the chain: its code for degraded is the chain's
    assert one.returncode == STATUS_DEGRADED, out
    assert machine.run(["dpkg", "-s", "python3-venv"]).returncode == 0

    step = time.monotonic()
    two = machine.login(f"cd {workdir} || exit 1\n{second}", timeout=120)
    timings["second command"] = time.monotonic() - step
    log(f"README's second command exited {two.returncode}:\n{two.stdout}")
    out = f"README's second command exited {two.returncode}:\n{two.stdout}"
    assert two.returncode == 0, out
    assert two.stdout.splitlines()[-1:] == [expected_reply(second)], out
    assert (machine.home / ".config/agent/agent.toml").is_file(), out

    stop = machine.login(f"cd {workdir} && .venv/bin/agentctl stop", timeout=60)
    assert stop.returncode == 0 and "stopped (pid" in stop.stdout, stop.stdout
    status = machine.login(f"cd {workdir} && .venv/bin/agentctl status", timeout=60)
    assert status.returncode == STATUS_NOT_RUNNING, status.stdout
    assert machine.processes() == [], "still running after agentctl stop"
    assert machine.stop() == 0, f"systemd-nspawn failed:\n{machine.tail()}"
