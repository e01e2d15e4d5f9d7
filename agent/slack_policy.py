"""Who may talk to the agent through one Slack profile (docs/slack.md, Who may talk).

A message that is for the bot runs the agent only when its sender is allowed:
`allowed_users` (Slack user ids; empty means everyone in the channels the bot hears) and,
for a DM, `allow_dm` (default false). Anything else is denied: it runs nothing, is logged
as `slack.sender.denied` with the user and channel ids and never the text, and, when
`deny_notice` is set, that text answers it once per user and channel while the worker
runs. Bots never get this far: Inbound drops their messages before asking.
"""

import logging
import threading

from agent.config import SlackProfileConfig
from agent.log import event
from agent.slack_api import WORKER

NOT_ALLOWED = "not in allowed_users"
NO_DMS = "direct messages are not allowed (allow_dm = false)"
FOLLOW_ALL = "all"


class SenderPolicy:
    def __init__(self, profile_name: str, profile: SlackProfileConfig):
        self.profile_name = profile_name
        self.allowed = frozenset(profile.allowed_users)
        self.allow_dm = bool(profile.allow_dm)
        self.notice = str(profile.deny_notice or "")
        self.follow_all = profile.follow_threads == FOLLOW_ALL
        self._noticed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def denial(self, user: str, direct: bool) -> str | None:
        """Why this sender may not run the agent here, or None when they may."""
        if direct and not self.allow_dm:
            return NO_DMS
        if self.allowed and user not in self.allowed:
            return NOT_ALLOWED
        return None

    def deny(self, user: str, channel: str, reason: str) -> str | None:
        """Log a denial; the notice to post, the first time for this user and channel."""
        event(
            "slack.sender.denied",
            f"slack profile {self.profile_name}: message from {user} in {channel} denied: {reason}",
            worker=WORKER,
            level=logging.WARNING,
            profile=self.profile_name,
            user=user,
            slack_channel=channel,
            reason=reason,
        )
        if not self.notice:
            return None
        with self._lock:
            if (user, channel) in self._noticed:
                return None
            self._noticed.add((user, channel))
        return self.notice
