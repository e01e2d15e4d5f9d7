"""agentctl(1) and the bash and zsh completion: made from the click commands, rendered by the
tools man uses, answered by real agentctl processes; and the .deb that installs them.

The generators run as the package build runs them (packaging/manpage.py, packaging/completion.py
with the source on PYTHONPATH); the .deb tests build the package with tests.e2e.guest.build_deb
(Debian's python3 and click 8.1.3) and check what it installs, with the package's own agentctl.
"""

import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from agent import errors
from agent.cli import main as agentctl_group
from agent.events import EVENTS
from agent.states import WORKER_NAMES
from tests.e2e.guest import SYSPATH, GuestError, build_deb
from tests.helpers import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the agentctl console script of this environment
SECTIONS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "COMMANDS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "SEE ALSO",
]
SHARED = ("--config", "--help")  # documented once, under OPTIONS
MAN_PAGE = "usr/share/man/man1/agentctl.1.gz"
BASH_FILE = "usr/share/bash-completion/completions/agentctl"
ZSH_FILE = "usr/share/zsh/vendor-completions/_agentctl"


def generate(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "packaging" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "1764000000"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def manpage() -> str:
    return generate("manpage.py")


def visible_commands(group=agentctl_group, path=("agentctl",)):
    """(words, command) for every command an operator can call, walked on the click objects."""
    found = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        found.append((" ".join((*path, name)), command))
        if isinstance(command, click.Group):
            found += visible_commands(command, (*path, name))
    return found


def visible_options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def plain(roff: str) -> str:
    """A roff line's text, without font changes and escapes."""
    return re.sub(r"\\f[BIR]", "", roff).replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")


def sections(roff: str) -> dict[str, list[str]]:
    """The page's .SH sections (and COMMANDS' .SS subsections, as 'agentctl logs'), in order."""
    found: dict[str, list[str]] = {}
    current = None
    for line in roff.splitlines():
        if line.startswith(".SH "):
            current = line[4:].strip('"')
        elif line.startswith(".SS "):
            heading = plain(line[4:])
            current = re.match(r"agentctl(?: [a-z][\w-]*)*", heading).group(0)
        else:
            found.setdefault(current, []).append(line)
            continue
        found.setdefault(current, [])
    return found


def option_names(lines: list[str]) -> set[str]:
    """The option names of a section's tagged paragraphs (.TP, then the tag line)."""
    names: set[str] = set()
    for before, tag in itertools.pairwise(lines):
        if before == ".TP":
            names.update(re.findall(r"\\fB((?:\\-)+[\w\\-]+)\\fR", tag))
    return {plain(name) for name in names}


def render(path: Path) -> str:
    """The page as man shows it (plain text, one paragraph a line), checked as lintian does."""
    groff = shutil.which("groff", path=SYSPATH)
    man = shutil.which("man", path=SYSPATH)
    if not groff or not man:
        skip_or_fail("groff and man are not installed (lintian brings them: tests/e2e/prepare.sh)")
    env = {"PATH": SYSPATH, "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80", "HOME": "/"}
    # lintian's own check: man --warnings; any message is a groff-message tag
    checked = subprocess.run(
        [man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    done = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-rLL=5000n", "-P-cbou", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return re.sub(r"[ \t]+", " ", done.stdout)


def words(text: str) -> str:
    return " ".join(text.split())


# ---- the man page


def test_manpage_has_a_subsection_for_every_command_and_every_option(manpage):
    found = sections(manpage)
    top = [name for name in found if name and not name.startswith("agentctl")]
    assert top == SECTIONS
    commands = visible_commands()
    documented = [name for name in found if name and name.startswith("agentctl")]
    assert documented == [path for path, _ in commands], "one subsection per command"
    for path, command in commands:
        wanted = {
            name
            for option in visible_options(command)
            for name in option.opts + option.secondary_opts
            if name not in SHARED
        }
        assert option_names(found[path]) == wanted, path
        hidden = {n for p in command.params if getattr(p, "hidden", False) for n in p.opts}
        assert not hidden & option_names(found[path]), f"{path}: a hidden option is documented"
    top_options = {n for option in visible_options(agentctl_group) for n in option.opts}
    assert option_names(found["OPTIONS"]) == top_options | {"--help"}
    # --config and --help, which every command accepts, are said once
    for path, command in commands:
        assert {n for o in command.get_params(click.Context(command)) for n in o.opts} >= set(
            SHARED
        ), path
    assert any("also work after the command" in plain(line) for line in found["OPTIONS"])


def test_manpage_renders_without_warnings_and_says_what_click_says(manpage, tmp_path):
    path = tmp_path / "agentctl.1"
    path.write_text(manpage)
    text = words(render(path))
    for path_words, command in visible_commands():
        usage = command.collect_usage_pieces(click.Context(command, info_name=path_words))
        assert f"{path_words} {' '.join(usage)}" in text
        assert words(inspect.cleandoc(command.help)) in text, path_words
        for option in visible_options(command):
            if option.help and not set(option.opts) & set(SHARED):
                assert words(option.help) in text, option.opts
    for worker in WORKER_NAMES:
        assert worker in text
    assert "SEE ALSO systemctl(1), journalctl(1)" in text
    assert "agentctl - run and inspect the agent supervisor" in text


def test_exit_status_section_is_every_code_of_agent_errors(manpage, tmp_path):
    codes = {
        value
        for name, value in vars(errors).items()
        if re.fullmatch(r"(EXIT|STATUS|RUN)_[A-Z_]+", name) and isinstance(value, int)
    }
    raised = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.AgentError)
    }
    table = {code for _, code, _ in errors.EXIT_STATUS}
    assert codes | raised <= table, "an exit code of agent/errors.py is missing from EXIT_STATUS"
    path = tmp_path / "agentctl.1"
    path.write_text(manpage)
    text = words(render(path))
    exit_section = text.split("EXIT STATUS", 1)[1].split("ENVIRONMENT", 1)[0]
    for scope, code, meaning in errors.EXIT_STATUS:
        assert f"{code} {words(meaning)}" in exit_section
        assert (f"agentctl {scope}:" if scope else "Every command:") in exit_section
    environment = text.split("ENVIRONMENT", 1)[1].split("FILES", 1)[0]
    for _, command in [("agentctl", agentctl_group), *visible_commands()]:
        for param in command.params:
            if isinstance(param.envvar, str):
                assert param.envvar in environment


# ---- shell completion, answered by the real agentctl


def completion_env(agent_env, **extra: str) -> dict[str, str]:
    env = agent_env.cmd_env(**extra)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', SYSPATH)}"
    return env


def bash_complete(script: Path, line: str, env: dict[str, str]) -> list[str]:
    """What bash offers at the end of `line` (a trailing space: a new word), through the real
    completion function that `script` registers for agentctl."""
    probe = (
        f"source {script}\n"
        f"COMP_LINE={line!r}; COMP_WORDS=({line}); "
        + ("COMP_WORDS+=(''); " if line.endswith(" ") else "")
        + "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        "complete -p agentctl >/dev/null || exit 3\n"
        '$(complete -p agentctl | sed -E "s/.* -F ([^ ]+) .*/\\1/") agentctl\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [word for word in done.stdout.splitlines() if word]


def zsh_complete(directory: Path, line: str, env: dict[str, str]) -> list[list[str]]:
    """What zsh's completion function `_agentctl`, autoloaded from `directory` on $fpath by
    compinit, offers at the end of `line`, on three TABs in a row (compadd and _describe stand in
    for the widgets, which need a terminal)."""
    probe = (
        f"fpath=({directory} $fpath); autoload -Uz compinit && compinit -u -D\n"
        'compadd() { print -rl -- "${completions[@]}" }\n'
        '_describe() { print -rl -- "${completions_with_descriptions[@]%%:*}" }\n'
        f"words=({line}); " + ("words+=(''); " if line.endswith(" ") else "") + "CURRENT=$#words\n"
        'for tab in 1 2 3; do print -- "-- TAB"; $_comps[agentctl]; done\n'
    )
    zsh = shutil.which("zsh", path=SYSPATH)
    if not zsh:
        skip_or_fail("zsh is not installed (scripts/test.sh installs it)")
    done = subprocess.run(
        [zsh, "-f", "-c", probe], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [tab.split() for tab in done.stdout.split("-- TAB")[1:]]


@pytest.fixture
def completion_scripts(tmp_path) -> Path:
    (tmp_path / "bash").write_text(generate("completion.py", "bash"))
    (tmp_path / "zsh").mkdir()
    (tmp_path / "zsh" / "_agentctl").write_text(generate("completion.py", "zsh"))
    return tmp_path


def test_bash_completion_offers_commands_and_worker_names(agent_env, completion_scripts):
    script, env = completion_scripts / "bash", completion_env(agent_env)
    assert bash_complete(script, "agentctl st", env) == ["start", "status", "stop"]
    everything = [path.split()[1] for path, _ in visible_commands() if path.count(" ") == 1]
    assert sorted(bash_complete(script, "agentctl ", env)) == sorted(everything)
    assert bash_complete(script, "agentctl logs --worker ", env) == list(WORKER_NAMES)
    assert bash_complete(script, "agentctl logs --worker d", env) == ["dispatcher"]
    assert bash_complete(script, "agentctl logs --level e", env) == ["error"]
    worker_events = [name for name in EVENTS if name.startswith("worker.")]
    assert bash_complete(script, "agentctl logs --event worker.", env) == worker_events
    assert bash_complete(script, "agentctl sessions r", env) == ["reset"]
    assert "--follow" in bash_complete(script, "agentctl logs --", env)


def test_zsh_completion_offers_them_from_the_first_tab(agent_env, completion_scripts):
    directory, env = completion_scripts / "zsh", completion_env(agent_env)
    assert (directory / "_agentctl").read_text().startswith("#compdef agentctl\n")
    assert zsh_complete(directory, "agentctl st", env) == [["start", "status", "stop"]] * 3
    assert zsh_complete(directory, "agentctl logs --worker ", env) == [list(WORKER_NAMES)] * 3


def test_completing_is_fast_and_never_runs_a_command(agent_env):
    # the protocol the scripts speak, straight to the console script; `run` and `start` as
    # the words being completed must start nothing, and no command module is even imported
    agentctl = VENV_BIN / "agentctl"
    for words_typed, cword in (("agentctl start ", 2), ("agentctl run --", 2), ("agentctl st", 1)):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", str(agentctl)],
            capture_output=True,
            text=True,
            env=completion_env(
                agent_env,
                COMP_WORDS=words_typed,
                COMP_CWORD=str(cword),
                _AGENTCTL_COMPLETE="bash_complete",
            ),
            timeout=30,
            check=False,
        )
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert elapsed < 3.0, f"completing {words_typed!r} took {elapsed:.1f} s"
        imported = set(re.findall(r"\|\s+(agent(?:\.\w+)*)$", done.stderr, re.M))
        assert imported <= {"agent", "agent.entry", "agent.cli", "agent.errors", "agent.states"}
        if cword == 1:
            assert done.stdout.splitlines() == ["plain,start", "plain,status", "plain,stop"]
    assert not agent_env.state_dir.exists(), "completion touched the state_dir"
    code, report = agent_env.status()
    assert (code, report["supervisor"]["state"]) == (3, "stopped")


def test_a_completion_request_is_clicks_even_for_a_quick_command_line(agent_env):
    # `status` and `logs` skip click (agent.entry); with the completion variable set the
    # line is click's to answer, whatever else is on it
    done = subprocess.run(
        [str(VENV_BIN / "agentctl"), "status"],
        capture_output=True,
        text=True,
        env=completion_env(
            agent_env,
            COMP_WORDS="agentctl logs --worker q",
            COMP_CWORD="3",
            _AGENTCTL_COMPLETE="zsh_complete",
        ),
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout.split()) == (0, ["plain", "queue", "_"]), done.stderr


# ---- the package


@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [t for t in ("dpkg-buildpackage", "dpkg-deb") if not shutil.which(t, path=SYSPATH)]
    if missing:
        skip_or_fail(
            f"cannot build the .deb: {', '.join(missing)} missing; install the build tools with "
            "`bash tests/e2e/prepare.sh --no-rootfs`"
        )
    try:
        return build_deb(tmp_path_factory.mktemp("deb"))
    except GuestError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def installed(built_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, unpacked as dpkg would install them (under a scratch root)."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(root)], check=True, env={"PATH": SYSPATH})
    return root


def test_deb_installs_the_man_page_and_completions(built_deb):
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(built_deb)],
        capture_output=True,
        text=True,
        env={"PATH": SYSPATH},
        check=True,
    ).stdout
    paths = {line.split()[-1].removeprefix("./") for line in listing.splitlines()}
    assert {MAN_PAGE, BASH_FILE, ZSH_FILE} <= paths


def test_lintian_finds_the_man_page_and_nothing_new(built_deb):
    if not shutil.which("lintian", path=SYSPATH):
        skip_or_fail("lintian is not installed; run `bash tests/e2e/prepare.sh --no-rootfs`")
    done = subprocess.run(
        ["lintian", str(built_deb)],  # as tests/e2e/test_systemd.py runs it
        capture_output=True,
        text=True,
        env={"PATH": SYSPATH, "HOME": os.environ.get("HOME", "/")},
        check=False,
    )
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert not [t for t in tags if "no-manual-page" in t], done.stdout
    assert not [t for t in tags if t.startswith("E:")], done.stdout
    about_this = re.compile(r"manpage|manual-page|groff|usr/share/man|completion|zsh")
    assert not [t for t in tags if about_this.search(t)], done.stdout


def test_deb_man_page_documents_every_command_as_built_by_debians_click(installed, tmp_path):
    # the package's page, made by Debian's python3 and click at build time
    page = tmp_path / "agentctl.1"
    subprocess.run(
        ["sh", "-c", f"gzip -dc {installed / MAN_PAGE} > {page}"], check=True, env={"PATH": SYSPATH}
    )
    found = sections(page.read_text())
    assert [name for name in found if name and name.startswith("agentctl")] == [
        path for path, _ in visible_commands()
    ]
    text = words(render(page))
    for _, code, meaning in errors.EXIT_STATUS:
        assert f"{code} {words(meaning)}" in text


def packaged_env(installed: Path, agent_env) -> dict[str, str]:
    """The package's agentctl (Debian's python3 and click) first on PATH."""
    env = agent_env.cmd_env()
    env.update(
        PATH=f"{installed / 'usr/bin'}{os.pathsep}{SYSPATH}",
        PYTHONPATH=str(installed / "usr/lib/python3/dist-packages"),
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def test_deb_bash_completion_works_with_the_packaged_agentctl(installed, agent_env):
    env = packaged_env(installed, agent_env)
    script = installed / BASH_FILE
    assert bash_complete(script, "agentctl st", env) == ["start", "status", "stop"]
    assert bash_complete(script, "agentctl logs --worker ", env) == list(WORKER_NAMES)
    assert not agent_env.state_dir.exists()


def test_deb_zsh_completion_works_with_the_packaged_agentctl(installed, agent_env):
    env = packaged_env(installed, agent_env)
    directory = installed / Path(ZSH_FILE).parent
    assert zsh_complete(directory, "agentctl st", env) == [["start", "status", "stop"]] * 3
    assert zsh_complete(directory, "agentctl logs --worker ", env) == [list(WORKER_NAMES)] * 3
