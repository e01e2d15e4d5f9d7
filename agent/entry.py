"""The agentctl entry point.

`agentctl status` is what monitoring runs every few seconds and `agentctl logs` what an
operator runs in a hurry, so their plain forms (after an optional `--config PATH`) skip
importing click, which alone costs more than the whole interpreter start (see
bench/bench_runtime.py and bench/bench_journal_logs.py). Every other command line, --help
and anything invalid included, goes through click in agent.cli, which owns the errors.
"""

import sys


def main() -> None:
    args = sys.argv[1:]
    config_path = None
    if len(args) >= 2 and args[0] == "--config":
        config_path, args = args[1], args[2:]
    elif args and args[0].startswith("--config="):
        config_path, args = args[0].split("=", 1)[1], args[1:]
    if args in (["status"], ["status", "--json"]):
        sys.exit(_quick(config_path, _status, as_json=len(args) == 2))
    logs_options = _plain_logs_options(args)
    if logs_options is not None:
        sys.exit(_quick(config_path, _logs, **logs_options))
    from agent.cli import main as click_main

    click_main()


LOGS_VALUES = {
    "-n": "limit",
    "--lines": "limit",
    "--worker": "worker",
    "--event": "event",
    "--level": "level",
    "--since": "since",
}
LOGS_FLAGS = {"-f": "follow", "--follow": "follow", "--json": "as_json"}
LEVELS = ("debug", "info", "warning", "error", "critical")


def _plain_logs_options(args: list[str]) -> dict | None:
    """`logs` options when they are all plainly valid; None sends the line to click."""
    if not args or args[0] != "logs":
        return None
    options: dict = {"limit": 20, "follow": False, "as_json": False}
    rest = args[1:]
    while rest:
        word = rest.pop(0)
        if word in LOGS_FLAGS:
            options[LOGS_FLAGS[word]] = True
        elif word in LOGS_VALUES and rest:
            options[LOGS_VALUES[word]] = rest.pop(0)
        else:
            return None
    if not str(options["limit"]).isdigit() or int(options["limit"]) < 1:
        return None
    if options.get("level") not in (None, *LEVELS):
        return None
    options["limit"] = int(options["limit"])
    return options


def _quick(config_path: str | None, command, **options) -> int:
    import os

    from agent.config import config_for_finding
    from agent.errors import AgentError, os_error

    try:
        config, broken = config_for_finding(config_path or os.environ.get("AGENT_CONFIG"))
        if broken:
            print(f"agentctl: warning: {broken}", file=sys.stderr)
        return command(config, **options)
    except AgentError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader closed the pipe (`| head`): not an error
        from agent.output import reader_gone

        reader_gone()
        return 0
    except OSError as exc:
        error = os_error(exc)
        print(f"agentctl: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def _status(config, as_json: bool) -> int:
    from agent.status import print_status

    return print_status(config, as_json)


def _logs(config, **options) -> int:
    from agent.logquery import print_logs

    print_logs(config, **options)
    return 0
