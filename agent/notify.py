"""The sd_notify protocol toward whoever started us: systemd, or `agentctl start`.

Outside a manager (no NOTIFY_SOCKET) every call is a no-op. The variables are removed
from our environment once read, so the agent commands our workers run cannot speak for us.
"""

import os
import time

import sdnotify

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.socket = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = _watchdog_interval(environ)
        # sdnotify reads NOTIFY_SOCKET when constructed; build it before we unset it.
        self._notifier = sdnotify.SystemdNotifier() if self.socket else None
        for name in NOTIFY_VARS:
            environ.pop(name, None)

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={_ascii(status)}")

    def reloading(self) -> None:
        """RELOADING=1; systemd 253+ also wants the time it was sent (CLOCK_MONOTONIC)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def status(self, text: str) -> None:
        self.send(f"STATUS={_ascii(text)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={_ascii(status)}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def failed(self, reason: str) -> None:
        self.send(f"STATUS=failed: {_ascii(reason)}")


def _watchdog_interval(environ: dict[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\n", " ")
