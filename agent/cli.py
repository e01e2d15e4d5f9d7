"""agentctl: parses arguments and calls the library; nothing else lives here.

Modules are imported inside each command so that `agentctl status` stays about as quick
as a bare interpreter start.
"""

import json
import sys

import click

from agent.errors import AgentError


class AgentGroup(click.Group):
    """Turns every expected failure into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            click.echo(f"agentctl: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            ctx.exit(130)


@click.group(cls=AgentGroup)
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="AGENT_CONFIG",
    help="Config file (TOML). Default: $AGENT_CONFIG, /etc/agent/agent.toml, "
    "else embedded defaults.",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Run and inspect the agent supervisor."""
    ctx.obj = config_path


def _config(ctx: click.Context):
    from agent.config import load_config

    return load_config(ctx.obj)


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the supervisor in the foreground (what the systemd unit executes)."""
    from agent.log import choose_sink, setup_logging
    from agent.supervisor import Supervisor

    config = _config(ctx)
    sink = choose_sink(config)
    setup_logging(config, sink, echo=sys.stderr.isatty())
    ctx.exit(Supervisor(config, sink).run())


@main.command()
@click.pass_context
def start(ctx: click.Context) -> None:
    """Start one supervisor; returns once it is ready and prints its pid."""
    from agent import control

    config = _config(ctx)
    if control.systemd_manages(config):
        pid = control.start_systemd()
    else:
        pid = control.start_standalone(config)
    click.echo(f"started (pid {pid})")


@main.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the running supervisor gracefully (SIGKILL after the stop timeout)."""
    from agent import control

    config = _config(ctx)
    if control.systemd_manages(config):
        result = control.stop_systemd()
    else:
        result = control.stop_standalone(config)
    click.echo(result.message)
    if result.warning:
        click.echo(f"agentctl: warning: {result.warning}", err=True)


@main.command()
@click.pass_context
def restart(ctx: click.Context) -> None:
    """Stop, then start with the same config file: a fresh runtime."""
    from agent import control
    from agent.config import load_config
    from agent.status import collect_status

    config = _config(ctx)
    if control.systemd_manages(config):
        pid = control.restart_systemd()
    else:
        recorded = collect_status(config)["supervisor"]["config"]
        if recorded and str(config.path) != recorded:
            config = load_config(recorded)
        stopped, pid = control.restart_standalone(config)
        click.echo(stopped.message)
    click.echo(f"started (pid {pid})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Supervisor and per-worker health. Exit: 0 healthy, 1 crashed, 2 degraded, 3 stopped."""
    from agent.status import collect_status, render_status, status_exit_code

    report = collect_status(_config(ctx))
    click.echo(json.dumps(report, indent=2) if as_json else render_status(report))
    ctx.exit(status_exit_code(report))


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
@click.option("--worker", help="Only events about this worker.")
@click.option("--event", "event_name", help="Only this event, e.g. worker.error.")
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
    from agent.logquery import LogFilter, parse_since, show_logs

    flt = LogFilter(
        worker=worker, event=event_name, level=level, since=parse_since(since) if since else None
    )
    for line in show_logs(_config(ctx), flt, limit, follow, as_json):
        click.echo(line)
