"""What a Slack thread sees of its message's fate, besides the reply (docs/slack.md).

On receipt the bot adds `ack_reaction`; a run that outlasts `progress_after` gets one
"working on it" post that the reply (or the notice) replaces; when the reply is posted
it swaps the reaction for `done_reaction`; when the message finally fails (the queue
moved it to failed/) it swaps it for `failed_reaction` and posts one short notice in the
thread. The notice names a reason
class and a hint, never the raw reason: that may hold a stack trace, a path or a secret,
and stays in `agentctl logs --event message.failed` for the operator.
"""

from dataclasses import dataclass

from agent.config import SlackProfileConfig


@dataclass(frozen=True)
class Reactions:
    ack: str
    done: str
    failed: str

    @classmethod
    def of(cls, profile: SlackProfileConfig) -> "Reactions":
        return cls(profile.ack_reaction, profile.done_reaction, profile.failed_reaction)


@dataclass(frozen=True)
class FailureClass:
    label: str
    hint: str


# The first class whose marker is in the queue's reason wins.
_CLASSES = (
    ("timed out", FailureClass("it took too long", "Try a smaller request.")),
    (
        "output exceeded",
        FailureClass("the answer was too large", "Ask for a shorter answer."),
    ),
    (
        "cannot start",
        FailureClass("the agent could not start", "The operator needs to check its command."),
    ),
    ("unknown agent", FailureClass("no agent is set up for this", "Tell the operator.")),
)
_DEFAULT = FailureClass("the agent failed", "Try again in a while.")


def failure_class(reason: str) -> FailureClass:
    for marker, found in _CLASSES:
        if marker in reason:
            return found
    return _DEFAULT


def failure_notice(reason: str, attempts: int) -> str:
    """The one notice a thread gets when its message finally failed."""
    found = failure_class(reason)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return (
        f":warning: Sorry, I could not answer this: {found.label}{tries}. {found.hint} "
        "(The operator can see why with `agentctl logs --event message.failed`.)"
    )
