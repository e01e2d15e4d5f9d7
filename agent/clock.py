"""Wall-clock timestamps as shown to people; all durations inside use time.monotonic()."""

import time
from datetime import UTC, datetime


def iso_utc(epoch: float | None = None) -> str:
    """2026-11-24T06:00:00.123Z"""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float:
    """Inverse of iso_utc; accepts any ISO 8601 form datetime understands (naive = UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
