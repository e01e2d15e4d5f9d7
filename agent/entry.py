"""The agentctl entry point.

`agentctl status` is what monitoring runs every few seconds and `agentctl logs` what an
operator runs in a hurry, so their plain forms (global options included) skip
importing click, which alone costs more than the whole interpreter start (see
bench/bench_runtime.py and bench/bench_journal_logs.py). Every other command line, --help
and anything invalid included, goes through click in agent.cli, which owns the errors. So
does a shell asking for completions ($_AGENTCTL_COMPLETE set, see agentctl(1)): click
answers those without running any command.
"""

import os
import sys

COMPLETE_VAR = "_AGENTCTL_COMPLETE"  # click's shell completion protocol for `agentctl`


def main() -> None:
    # a shell asking for completions: click's to answer, whatever the line looks like
    plain = None if COMPLETE_VAR in os.environ else plain_command(sys.argv[1:])
    if plain is not None:
        command, config_path, options = plain
        sys.exit(_quick(config_path, _status if command == "status" else _logs, **options))
    from agent.cli import main as click_main

    click_main()


# The plain grammar of `status` and `logs`, a subset of theirs in agent.cli (a test checks
# each option here against the click definitions): anything else goes to click.
STATUS_FLAGS = {"--json": "as_json", "-l": "full", "--full": "full"}
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


def plain_command(args: list[str]) -> tuple[str, str | None, dict] | None:
    """(command, config path, options) for a plainly valid status or logs line, else None."""
    config_path, as_json, rest = None, False, list(args)
    while rest and rest[0] not in ("status", "logs"):
        word = rest.pop(0)
        if word == "--json":
            as_json = True
        elif _is_config(word, rest):
            config_path = _config_value(word, rest)
        else:
            return None
    if not rest:
        return None
    command = rest.pop(0)
    if command == "status":
        options = {"as_json": as_json, "full": False}
        flags, values = STATUS_FLAGS, {}
    else:
        options = {"limit": 20, "follow": False, "as_json": as_json}
        flags, values = LOGS_FLAGS, LOGS_VALUES
    while rest:
        word = rest.pop(0)
        if word in flags:
            options[flags[word]] = True
        elif word in values and rest:
            options[values[word]] = rest.pop(0)
        elif _is_config(word, rest):
            config_path = _config_value(word, rest)
        else:
            return None
    if command == "logs" and not _plainly_valid_logs(options):
        return None
    return command, config_path, options


def _is_config(word: str, rest: list[str]) -> bool:
    return (word == "--config" and bool(rest)) or word.startswith("--config=")


def _config_value(word: str, rest: list[str]) -> str:
    """The path of `--config PATH` (taken from rest) or `--config=PATH`."""
    return word.split("=", 1)[1] if "=" in word else rest.pop(0)


def _plainly_valid_logs(options: dict) -> bool:
    from agent.events import is_known

    if not str(options["limit"]).isdigit() or int(options["limit"]) < 1:
        return False
    if options.get("level") not in (None, *LEVELS):
        return False
    if options.get("event") is not None and not is_known(options["event"]):
        return False
    options["limit"] = int(options["limit"])
    return True


def _quick(config_path: str | None, command, **options) -> int:
    from agent.config import config_for_finding
    from agent.errors import EXIT_INTERRUPTED, AgentError, os_error

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
        return EXIT_INTERRUPTED


def _status(config, as_json: bool, full: bool) -> int:
    from agent.status import print_status

    return print_status(config, as_json, full)


def _logs(config, **options) -> int:
    from agent.logquery import print_logs

    print_logs(config, **options)
    return 0
