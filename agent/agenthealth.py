"""Whether an agent's runs work: the rule that makes the dispatcher `degraded`.

A supervisor whose every agent run fails is not healthy, whatever its threads do. For each
agent the dispatcher reports every finished run here (a run cut short by a stop does not
count). The agent is failing, with the last run's reason, when
- its last FAILURE_STREAK runs all failed, or
- it has had runs but no success for longer than STALL_SECONDS (runs keep failing, slowly).
One successful run clears both. Pure bookkeeping on a monotonic clock: no I/O, no threads
of its own; the dispatcher holds it under its lock.
"""

from dataclasses import dataclass

FAILURE_STREAK = 5
STALL_SECONDS = 900.0  # 15 min of runs without a success


@dataclass
class AgentRunHealth:
    streak: int = 0  # runs failed in a row since the last success
    failing_since: float | None = None  # monotonic time of the streak's first failure
    last_reason: str | None = None

    def succeeded(self) -> None:
        self.streak, self.failing_since, self.last_reason = 0, None, None

    def failed(self, reason: str, now: float) -> None:
        self.streak += 1
        self.last_reason = reason
        if self.failing_since is None:
            self.failing_since = now

    def problem(self, now: float) -> str | None:
        """Why this agent counts as failing now, or None."""
        if self.streak >= FAILURE_STREAK:
            return f"{self.streak} runs failed in a row: {self.last_reason}"
        if self.failing_since is not None and now - self.failing_since >= STALL_SECONDS:
            minutes = (now - self.failing_since) / 60
            return f"no successful run for {minutes:.0f} min: {self.last_reason}"
        return None


class AgentsHealth:
    """AgentRunHealth per agent name, and the dispatcher's degraded reason from them."""

    def __init__(self) -> None:
        self.by_agent: dict[str, AgentRunHealth] = {}

    def record(self, agent: str, ok: bool, reason: str | None, now: float) -> None:
        health = self.by_agent.setdefault(agent, AgentRunHealth())
        if ok:
            health.succeeded()
        else:
            health.failed(reason or "failed", now)

    def degraded(self, now: float) -> str | None:
        problems = [
            f"agent {name}: {problem}"
            for name, health in sorted(self.by_agent.items())
            if (problem := health.problem(now))
        ]
        return "; ".join(problems) or None
