"""Fault injection for tests and operator drills: AGENT_FAULT_INJECT=WORKER:KIND[,...].

KIND is one of:
  crash      the worker raises after initializing (its last_error says "fault injection")
  hang       the worker stops heartbeating but does not exit
  slow-stop  the worker ignores its stop event for longer than stop_timeout
"""

from agent.errors import ConfigError

FAULT_KINDS = ("crash", "hang", "slow-stop")
ENV_VAR = "AGENT_FAULT_INJECT"


class InjectedFault(RuntimeError):
    pass


def parse_faults(text: str | None, known_workers: tuple[str, ...]) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        worker, _, kind = item.partition(":")
        if worker not in known_workers or kind not in FAULT_KINDS:
            raise ConfigError(
                f"{ENV_VAR}: '{item}' is not WORKER:KIND with WORKER one of "
                f"{', '.join(known_workers)} and KIND one of {', '.join(FAULT_KINDS)}"
            )
        faults[worker] = kind
    return faults
