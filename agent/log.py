"""Structured events: one record per lifecycle event, with a stable `event` name.

Under journald the record goes to the journal with upper-case fields (EVENT, WORKER,
ERROR, ...); elsewhere to a JSON-lines file under state_dir with keys ts, level, event,
worker, message, pid. Callers only ever use `event(...)`.
"""

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from agent.clock import iso_utc
from agent.config import Config
from agent.journalfields import journal_field_name

LOGGER_NAME = "agent"
SYSLOG_IDENTIFIER = "agent"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
MAX_LOG_BYTES = 20 * 1024 * 1024
LOG_BACKUPS = 4
LOG_FILE_MODE = 0o640
LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
_logger = logging.getLogger(LOGGER_NAME)


def event(
    name: str, message: str, *, worker: str | None = None, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one structured event. Field names are lower_snake_case."""
    _logger.log(level, message, extra={"event": name, "worker": worker, "fields": fields})


def journald_available() -> bool:
    if not JOURNAL_SOCKET.exists():
        return False
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return True


def choose_sink(config: Config) -> str:
    """'journald' or 'file'; ConfigError for a journald sink that cannot work here (its
    events would be lost, or the handler would fail at the first one)."""
    if config.logging.sink == "journald" and not journald_available():
        from agent.errors import ConfigError

        raise ConfigError(
            f"{config.display_path}: [logging] sink: expected a sink that works here, got "
            f"'journald' but {JOURNAL_SOCKET} or systemd-python is missing (use \"auto\" "
            'or "file")'
        )
    if config.logging.sink != "auto":
        return config.logging.sink
    return "journald" if journald_available() else "file"


def setup_logging(config: Config, sink: str, echo: bool = False) -> None:
    _logger.handlers.clear()
    _logger.propagate = False
    _logger.setLevel(config.logging.level.upper())
    if sink == "journald":
        _logger.addHandler(JournaldHandler())
    else:
        _logger.addHandler(json_file_handler(config.log_path))
    if echo:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(HumanFormatter())
        _logger.addHandler(stream)


def json_file_handler(path: Path) -> logging.Handler:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    handler = NoFollowRotatingFileHandler(
        path, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(JsonLinesFormatter())
    return handler


class NoFollowRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Opens (and reopens after rotation) without following a symlink, creating 0640: a
    symlink planted at logs/agent.jsonl never gets its target appended to."""

    def _open(self):
        import os

        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, LOG_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def set_level(level: str) -> None:
    """[logging] level, changed live by a reload."""
    _logger.setLevel(level.upper())


def shutdown_logging() -> None:
    for handler in list(_logger.handlers):
        handler.flush()
        handler.close()
        _logger.removeHandler(handler)


def _json_formatter_base() -> type:
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # python-json-logger < 3 (Debian 12 ships 2.0.x)
        from pythonjsonlogger.jsonlogger import JsonFormatter
    return JsonFormatter


class JsonLinesFormatter(_json_formatter_base()):
    """One JSON object per line: ts, level, event, worker, message, pid, then fields."""

    def __init__(self) -> None:
        super().__init__(json_ensure_ascii=False)

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_record["ts"] = iso_utc(record.created)
        log_record["level"] = LEVEL_NAMES.get(record.levelno, record.levelname.lower())
        log_record["event"] = getattr(record, "event", None)
        log_record["worker"] = getattr(record, "worker", None)
        log_record["message"] = record.getMessage()
        log_record["pid"] = record.process
        for key, value in getattr(record, "fields", {}).items():
            log_record.setdefault(key, value)


class JournaldHandler(logging.Handler):
    """Sends each event to journald with upper-case fields a journal match can select."""

    def __init__(self) -> None:
        super().__init__()
        from systemd import journal

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "PRIORITY": str(_syslog_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
                "EVENT": getattr(record, "event", None) or "",
            }
            if getattr(record, "worker", None):
                fields["WORKER"] = record.worker
            for key, value in getattr(record, "fields", {}).items():
                fields[journal_field_name(key)] = "" if value is None else str(value)
            self._send(record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        worker = getattr(record, "worker", None)
        extra = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        parts = [
            iso_utc(record.created),
            LEVEL_NAMES.get(record.levelno, "?"),
            getattr(record, "event", "") or "-",
            f"[{worker}]" if worker else "",
            record.getMessage(),
            extra,
        ]
        return " ".join(p for p in parts if p)
