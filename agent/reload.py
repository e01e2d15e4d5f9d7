"""Live reload: what a new configuration changes, and what it may not.

`plan_reload(old, new)` compares the two configs section by section. Settings that cannot
change while the supervisor runs (LIVE_FIXED) make the reload a ConfigError naming them:
the old configuration keeps running. Otherwise the plan names the workers to give the new
config: a worker that can take it in place (`Worker.reconfigure` returns True: the
dispatcher and the queue, whose in-memory work must not be lost) gets it so; any other is
stopped and built anew from the new config (Slack, heartbeat), or started or switched off
when the reload enables or disables it. Runs in flight finish under the settings they
started with.
"""

from dataclasses import dataclass

from agent.config import Config
from agent.errors import ConfigError

LIVE_FIXED = {
    "state_dir": lambda c: c.state_dir,
    "[logging] sink": lambda c: c.logging.sink,
    # the workers hold the Metrics object they were built with (agent.metrics)
    "[metrics] listen": lambda c: c.metrics.listen,
}
# which parts of the config each worker reads (the queue checks a message's agent)
WORKER_INPUTS = {
    "queue": lambda c: (c.queue_dir, c.queue, c.agents),
    "dispatcher": lambda c: (c.agents, c.dispatcher),
    # the Slack profiles' memory is in the queue database with backend = "postgres"
    "slack": lambda c: (c.slack, c.agents, c.queue.backend, c.queue.postgres),
    "heartbeat": lambda c: (c.heartbeat, c.agents),
}
SECTIONS = ("supervisor", "logging", "heartbeat", "dispatcher", "slack")


@dataclass(frozen=True)
class ReloadPlan:
    config: Config
    workers: tuple[str, ...]  # workers whose inputs changed, in registry order
    changed: tuple[str, ...]  # what changed, for people: "agents", "[dispatcher]", ...

    @property
    def summary(self) -> str:
        return ", ".join(self.changed) if self.changed else "no change"


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    fixed = [name for name, get in LIVE_FIXED.items() if get(old) != get(new)]
    if fixed:
        raise ConfigError(
            f"{new.display_path}: {', '.join(fixed)} cannot change while the supervisor "
            "runs; restart it to apply (the old configuration keeps running)"
        )
    changed = [f"[{s}]" for s in SECTIONS if getattr(old, s) != getattr(new, s)]
    if old.agents != new.agents:
        changed.insert(0, "agents")
    if old.queue != new.queue:
        changed.append("[queue]")
    workers = tuple(name for name, get in WORKER_INPUTS.items() if get(old) != get(new))
    return ReloadPlan(new, workers, tuple(changed))
