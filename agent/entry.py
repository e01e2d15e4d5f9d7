"""The agentctl entry point.

`agentctl status` is what monitoring runs every few seconds, so its plain forms
(`status`, `status --json`, after an optional `--config PATH`) skip importing click,
which alone costs more than the whole interpreter start (see bench/bench_runtime.py).
Every other command line, --help included, goes through click in agent.cli.
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
        sys.exit(quick_status(config_path, as_json=len(args) == 2))
    from agent.cli import main as click_main

    click_main()


def quick_status(config_path: str | None, as_json: bool) -> int:
    import os

    from agent.config import load_config
    from agent.errors import AgentError
    from agent.status import print_status

    try:
        return print_status(load_config(config_path or os.environ.get("AGENT_CONFIG")), as_json)
    except AgentError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
