"""agentctl(1), written from the click commands of agent.cli and the exit codes of agent.errors,
so the manual cannot drift from the program. Plain man(7) roff, by hand (click-man is not in
Debian 12).

    PYTHONPATH=. python3 packaging/manpage.py > agentctl.1     # what debian/rules does
    man -l agentctl.1

The date is $SOURCE_DATE_EPOCH's when set (dpkg-buildpackage sets it from debian/changelog),
so the package builds reproducibly.
"""

import inspect
import os
import re
import sys
import time

import click

from agent import __version__
from agent.cli import main as agentctl
from agent.config import SYSTEM_CONFIG, SYSTEM_STATE_DIR
from agent.errors import EXIT_STATUS
from agent.faults import ENV_VAR as FAULT_VAR
from agent.faults import FAULT_KINDS

PROG = "agentctl"
# Options every command accepts; described once, under OPTIONS, not in each command.
SHARED_OPTIONS = ("--config", "--help")

# Not in the click objects: what the runtime reads from its environment besides them.
ENVIRONMENT = (
    (
        "AGENT_MANAGER",
        "standalone: manage a supervisor of its own even where systemd manages agent.service "
        "(see DESCRIPTION).",
    ),
    (
        "STATE_DIRECTORY",
        "The state_dir when the config file names none (systemd sets it for agent.service).",
    ),
    (
        "CREDENTIALS_DIRECTORY",
        "Where relative Slack token file names are resolved (systemd sets it from the unit's "
        "LoadCredential=).",
    ),
    ("XDG_CONFIG_HOME", "A user's config is $XDG_CONFIG_HOME/agent/agent.toml."),
    ("XDG_STATE_HOME", "A user's default state_dir is $XDG_STATE_HOME/agent."),
    (
        FAULT_VAR,
        f"WORKER:KIND[,WORKER:KIND], KIND one of {', '.join(FAULT_KINDS)}: faults the "
        "supervisor injects into its workers, for tests and drills.",
    ),
)

FILES = (
    (str(SYSTEM_CONFIG), "The system config (TOML), used when present; a conffile."),
    (
        "~/.config/agent/agent.toml",
        "A user's own config (not root's); before the system one. agentctl init writes it.",
    ),
    (
        str(SYSTEM_STATE_DIR),
        "The state_dir of agent.service and of the system config: agent.lock, state.json, "
        "logs/, queue/, sessions.json, the agents' homes under home/.",
    ),
    ("~/.local/state/agent", "The state_dir without a config file naming one."),
    (
        "/etc/credstore/agent.slack-bot-token, /etc/credstore/agent.slack-app-token",
        "Slack tokens, given to agent.service by LoadCredential=.",
    ),
    ("/lib/systemd/system/agent.service", "The systemd unit."),
)

DESCRIPTION = (
    "agentctl runs the supervisor of an always-on AI agent gateway, which keeps its workers "
    "(queue, dispatcher, Slack, heartbeat) alive and reports their health, and starts, stops, "
    "inspects and talks to it.",
    "When systemd manages the agent (systemd is PID 1, agent.service is installed and the "
    f"config is {SYSTEM_CONFIG}), start, stop and restart run systemctl, status adds what "
    "systemd knows about the unit, and logs reads the journal. Otherwise agentctl start "
    "launches a supervisor of its own.",
)


def escape(text: str) -> str:
    """Text for roff: backslashes kept; every dash the ASCII one (\\-), so that options and
    paths copied from the rendered page still work."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def line(text: str) -> str:
    """One output line of text; one starting with a roff control character is kept as text."""
    return "\\&" + text if text[:1] in (".", "'") else text


def paragraphs(help_text: str | None, between: str = ".PP") -> list[str]:
    """click help text (a docstring) as paragraphs, each one line of escaped text."""
    text = inspect.cleandoc(help_text or "").split("\f")[0]
    found = [line(escape(" ".join(p.split()))) for p in text.split("\n\n") if p.strip()]
    return [item for p in found for item in (between, p)][1:]


def usage(path: str, pieces: list[str]) -> str:
    """A usage line: the command's words bold, placeholders (TEXT, OPTIONS) italic (usage lines
    contain no quotes, so one serves as the argument of .SS too)."""
    rest = re.sub(r"\b([A-Z][A-Z_]+)\b", r"\\fI\1\\fR", escape(" ".join(pieces)))
    return f"\\fB{escape(path)}\\fR {rest}"


def option_item(record: tuple[str, str]) -> list[str]:
    """An option's tagged paragraph from click's own help record ("-n, --lines INTEGER", help)."""
    names, help_text = record
    found = re.match(r"((?:-{1,2}[\w-]+(?:, | / )?)+)(?: (.*))?$", names)
    assert found, f"unexpected option names {names!r}"
    opts = re.sub(r"(-{1,2}[\w-]+)", lambda m: f"\\fB{escape(m.group(1))}\\fR", found.group(1))
    metavar = f" \\fI{escape(found.group(2))}\\fR" if found.group(2) else ""
    return [".TP", line(opts + metavar), *(paragraphs(help_text, ".IP") or [""])]


def commands(
    group: click.Group, ctx: click.Context
) -> list[tuple[str, click.Command, click.Context]]:
    """Every visible command under group, depth first, as (its words, it, its context)."""
    found = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        found.append((sub.command_path, command, sub))
        if isinstance(command, click.Group):
            found += commands(command, sub)
    return found


def options(command: click.Command, ctx: click.Context, shared: bool) -> list[tuple[str, str]]:
    """The help records of command's visible options (the shared ones only when asked)."""
    records = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        if not shared and any(opt in SHARED_OPTIONS for opt in param.opts):
            continue
        record = param.get_help_record(ctx)
        if record is not None:  # None: hidden
            records.append(record)
    return records


def render(group: click.Group = agentctl) -> str:
    root = click.Context(group, info_name=PROG)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    short = paragraphs(group.help)[0].rstrip(".")
    every = commands(group, root)
    out = [
        '.\\" Generated by packaging/manpage.py from agent.cli and agent.errors; do not edit.',
        f'.TH {PROG.upper()} 1 {date} "agent {__version__}" "User Commands"',
        ".SH NAME",
        f"{PROG} \\- {short[0].lower()}{short[1:]}",
        ".SH SYNOPSIS",
        usage(PROG, group.collect_usage_pieces(root)),
    ]
    for path, command, ctx in every:
        out += [".br", usage(path, command.collect_usage_pieces(ctx))]
    out += [".SH DESCRIPTION"]
    out += paragraphs("\n\n".join(DESCRIPTION))
    out += [".SH OPTIONS"]
    for names, help_text in options(group, root, shared=True):
        if names == "--help":  # click's own text speaks of "this message"
            help_text = "Print the help and exit; after a command, that command's help."
        out += option_item((names, help_text))
    out += [
        ".PP",
        line(
            escape(
                f"{' and '.join(SHARED_OPTIONS)} also work after the command "
                f"({PROG} status --config PATH); a --config there wins over one before it."
            )
        ),
        ".SH COMMANDS",
    ]
    for path, command, ctx in every:
        out += [f".SS {usage(path, command.collect_usage_pieces(ctx))}"]
        out += paragraphs(command.help)
        for record in options(command, ctx, shared=False):
            out += option_item(record)
    out += [".SH EXIT STATUS"]
    for scope in dict.fromkeys(scope for scope, _, _ in EXIT_STATUS):
        title = f"{PROG} {scope}" if scope else "Every command"
        out += [".PP", f"\\fB{escape(title)}\\fR:"]
        for _, code, meaning in (row for row in EXIT_STATUS if row[0] == scope):
            out += [".TP", f"\\fB{code}\\fR", line(escape(meaning))]
    out += [".SH ENVIRONMENT"]
    from_click = [
        (param.envvar, f"The value of {param.opts[-1]} when it is not given.")
        for command in [group, *(command for _, command, _ in every)]
        for param in command.params
        if isinstance(param.envvar, str)
    ]
    for name, text in [*from_click, *ENVIRONMENT]:
        out += [".TP", f"\\fB{escape(name)}\\fR", line(escape(text))]
    out += [".SH FILES"]
    for path, text in FILES:
        out += [".TP", f"\\fI{escape(path)}\\fR", line(escape(text))]
    out += [".SH SEE ALSO", "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
