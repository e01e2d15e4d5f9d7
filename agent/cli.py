"""agentctl: parses arguments and calls the library; nothing else lives here.

Modules are imported inside each command so that `agentctl status` stays about as quick
as a bare interpreter start.
"""

import sys
from dataclasses import dataclass

import click

from agent.errors import EXIT_INTERRUPTED, AgentError, os_error
from agent.states import WORKER_NAMES

JSON_COMMANDS = ("status", "logs", "sessions", "doctor", "db")


@dataclass
class Invocation:
    """The global options: given before the command, or (--config) after it."""

    config_path: str | None = None
    json: bool = False


class AgentGroup(click.Group):
    """Turns every expected failure into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            click.echo(f"agentctl: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # the reader closed the pipe (`| head`): not an error
            from agent.output import reader_gone

            reader_gone()
            ctx.exit(0)
        except OSError as exc:  # the machine said no (permissions, a full disk): say what
            error = os_error(exc)
            click.echo(f"agentctl: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=AgentGroup)
@click.version_option(package_name="agent", prog_name="agentctl")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="AGENT_CONFIG",
    help="Config file (TOML). Default: $AGENT_CONFIG, /etc/agent/agent.toml, "
    "else embedded defaults.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=f"JSON output, for the commands that have it ({', '.join(JSON_COMMANDS)}).",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Run and inspect the agent supervisor."""
    ctx.obj = Invocation(config_path, as_json)
    if as_json and ctx.invoked_subcommand not in (None, *JSON_COMMANDS):
        raise click.UsageError(
            f"--json applies to {', '.join(JSON_COMMANDS)}, not to {ctx.invoked_subcommand}"
        )


def _complete_workers(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list:
    return [name for name in WORKER_NAMES if name.startswith(incomplete)]


def _complete_events(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list:
    from agent.events import EVENTS

    return [name for name in EVENTS if name.startswith(incomplete)]


def _config(ctx: click.Context):
    from agent.config import load_config

    return load_config(ctx.obj.config_path)


def _config_for_finding(ctx: click.Context):
    """The config, or (the file became invalid) enough of it to find the supervisor."""
    from agent.config import config_for_finding

    config, broken = config_for_finding(ctx.obj.config_path)
    if broken:
        click.echo(f"agentctl: warning: {broken}", err=True)
    return config


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the supervisor in the foreground (what the systemd unit executes)."""
    from agent.log import choose_sink, setup_logging
    from agent.supervisor import Supervisor
    from agent.trust import check_state_dir, tighten_umask

    config = _config(ctx)
    tighten_umask()
    check_state_dir(config.state_dir)  # before anything is opened there, the log included
    sink = choose_sink(config)
    setup_logging(config, sink, echo=sys.stderr.isatty())
    ctx.exit(Supervisor(config, sink).run())


@main.command()
@click.pass_context
def start(ctx: click.Context) -> None:
    """Start one supervisor; returns once it is ready and prints its pid."""
    from agent import control
    from agent.state import readable_problem

    config = _config(ctx)
    problem = readable_problem(config.state_path)
    if control.systemd_manages(config):
        pid = control.start_systemd()
    else:
        pid = control.start_standalone(config)
    click.echo(f"started (pid {pid})")
    if problem:
        click.echo(f"agentctl: warning: {problem}; the new supervisor replaces it", err=True)


@main.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the running supervisor gracefully (SIGKILL after the stop timeout)."""
    from agent import control

    config = _config_for_finding(ctx)
    if control.systemd_manages(config):
        result = control.stop_systemd()
    else:
        result = control.stop_standalone(config)
    click.echo(result.message)
    if result.warning:
        click.echo(f"agentctl: warning: {result.warning}", err=True)


@main.command()
@click.option(
    "--pid",
    type=click.IntRange(min=1),
    hidden=True,
    help="Signal this process (systemd's $MAINPID, for ExecReload=) instead of the lock holder.",
)
@click.pass_context
def reload(ctx: click.Context, pid: int | None) -> None:
    """Re-read the config file without dropping a message; exit 78 (and the old config keeps
    running) when the new one is invalid."""
    from agent import control
    from agent.config import load_config, locate_only
    from agent.errors import ConfigError

    try:
        config = load_config(ctx.obj.config_path)
    except ConfigError:  # the supervisor reads it too, refuses it and says why ...
        config = locate_only(ctx.obj.config_path)
        if pid is None and not control.supervisor_found(config):
            raise  # ... unless it cannot be found without the file: then we say it

    if pid is None and control.systemd_manages(config):
        click.echo(control.reload_systemd(config))
    else:
        click.echo(control.reload_supervisor(config, pid))


@main.command()
@click.pass_context
def restart(ctx: click.Context) -> None:
    """Stop, then start: with --config or $AGENT_CONFIG when given, else the config the
    running supervisor recorded (only if that file is trusted), else the default."""
    from agent import control

    config = _config(ctx)
    if control.systemd_manages(config):
        pid = control.restart_systemd()
    else:
        if (
            ctx.obj.config_path is None
        ):  # neither --config nor $AGENT_CONFIG: what the last run used
            config = control.recorded_config(config)
        stopped, pid = control.restart_standalone(config)
        click.echo(stopped.message)
    click.echo(f"started (pid {pid})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("-l", "--full", is_flag=True, help="Do not cut long values to the terminal's width.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, full: bool) -> None:
    """Supervisor and per-worker health. Exit: 0 healthy, 1 crashed, 2 degraded, 3 stopped."""
    from agent.status import print_status

    ctx.exit(print_status(_config_for_finding(ctx), as_json or ctx.obj.json, full))


@main.command()
@click.option(
    "-n",
    "--lines",
    "limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many recent events.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until interrupted.")
@click.option(
    "--worker",
    shell_complete=_complete_workers,
    help=f"Only events about this worker: {', '.join(WORKER_NAMES)}.",
)
@click.option(
    "--event",
    "event_name",
    shell_complete=_complete_events,
    help="Only this event, e.g. worker.error (the names: docs/operations.md).",
)
@click.option(
    "--level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"]),
    help="Only events at this severity or worse.",
)
@click.option("--since", help="Only events since a time (ISO 8601) or an age (30s, 10m, 2h, 1d).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def logs(
    ctx: click.Context,
    limit: int,
    follow: bool,
    worker: str | None,
    event_name: str | None,
    level: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Recent structured events, from journald or the JSON-lines log file."""
    from agent.logquery import print_logs

    print_logs(
        _config_for_finding(ctx),
        limit,
        follow,
        as_json or ctx.obj.json,
        worker,
        event_name,
        level,
        since,
    )


@main.command()
@click.option("--agent", "agent_name", metavar="NAME", help="Target agent (default: 'default').")
@click.option("--conversation", metavar="ID", help="Conversation id: messages in one run in order.")
@click.option("--wait", is_flag=True, help="Wait for the reply and print it.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="With --wait: seconds to wait before giving up (exit 1).",
)
@click.argument("text")
@click.pass_context
def send(
    ctx: click.Context,
    agent_name: str | None,
    conversation: str | None,
    wait: bool,
    timeout: float,
    text: str,
) -> None:
    """Enqueue a local message (TEXT, or - to read it from standard input) for an agent;
    with --wait, print its reply."""
    from agent.send import check_sendable, wait_for_reply
    from agent.send import send as enqueue

    config = _config(ctx)
    if text == "-":  # the message on standard input
        text = sys.stdin.read()
    check_sendable(config, agent_name, wait)
    sent = enqueue(config, text, agent=agent_name, conversation=conversation)
    if not sent.supervisor_running:
        click.echo("agentctl: warning: no supervisor is running; the message waits", err=True)
    if not wait:
        click.echo(f"queued local message {sent.message_id}")
        return
    reply = wait_for_reply(config, sent.message_id, timeout)
    click.echo(reply.get("message", ""))


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session.")
@click.pass_context
def sessions(ctx: click.Context, as_json: bool) -> None:
    """Agent sessions that continue conversations (claude and codex agents)."""
    if ctx.invoked_subcommand is not None:
        return
    from agent.sessionsview import print_sessions

    print_sessions(_config(ctx), as_json or ctx.obj.json)


@sessions.command("reset")
@click.option("--agent", "agent_name", metavar="NAME", help="Only this agent's session.")
@click.argument("conversation")
@click.pass_context
def sessions_reset(ctx: click.Context, agent_name: str | None, conversation: str) -> None:
    """Forget a conversation's session: its next message starts a new one."""
    from agent.sessionsview import reset_session

    reset_session(_config(ctx), conversation, agent_name)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
@click.option("--offline", is_flag=True, help="Skip the checks that need the network.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, offline: bool) -> None:
    """Check the installation: ok / warn / fail per check, with a fix. Exit 1 if any fails."""
    from agent.doctor import run_doctor

    ctx.exit(run_doctor(ctx.obj.config_path, as_json or ctx.obj.json, offline))


@main.command()
@click.option(
    "--agent",
    "agent",
    type=click.Choice(["claude", "codex", "cat"]),
    help="The agent to configure (default: the first of claude, codex on PATH; cat: a smoke test).",
)
@click.option("--force", is_flag=True, help="Replace an existing config file.")
@click.pass_context
def init(ctx: click.Context, agent: str | None, force: bool) -> None:
    """Write a commented starter config (root: /etc/agent/agent.toml; others:
    ~/.config/agent/agent.toml) and print the next command to run."""
    from agent.init import init_config

    written = init_config(ctx.obj.config_path, agent, force)
    click.echo(f"wrote {written.path} (agent {written.agent})")
    click.echo(f"next: {written.next_step}")


@main.group()
def db() -> None:
    """The shared PostgreSQL queue ([queue] backend = "postgres"): status, migrate."""


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.pass_context
def db_status(ctx: click.Context, as_json: bool) -> None:
    """Backend, server (never its password), reachability and latency, schema version (the
    database's and this build's), depth and oldest message. Exit 1 unless it answers with
    this build's schema."""
    from agent.pg.dbstatus import print_status

    ctx.exit(print_status(_config(ctx), as_json or ctx.obj.json))


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Bring the queue database's schema to this build's version (safe with other hosts
    migrating at the same time); refuses a schema newer than this build."""
    from agent.pg.dbstatus import run_migrate

    if ctx.obj.json:
        raise click.UsageError("--json applies to db status, not to db migrate")
    click.echo(run_migrate(_config(ctx)))


def _subcommand_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.obj.config_path = value  # after the subcommand it wins over the one before it


def _accept_config_after_subcommands(group: click.Group) -> None:
    """`agentctl status --config X` as well as `agentctl --config X status`."""
    for command in group.commands.values():
        command.params.insert(
            0,
            click.Option(
                ["--config"],
                metavar="PATH",
                expose_value=False,
                is_eager=True,
                callback=_subcommand_config,
                help="Config file (TOML); the same as before the command.",
            ),
        )
        if isinstance(command, click.Group):
            _accept_config_after_subcommands(command)


_accept_config_after_subcommands(main)
