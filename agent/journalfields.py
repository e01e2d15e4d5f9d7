"""How our event fields are named in journald, for the writer (agent.log) and the reader
(agent.logquery) alike. A module of its own so that the quick `agentctl logs` path can use
it without importing the logging setup.
"""

import re

# Our lower_snake_case field -> journal field, where plain upper-casing would collide
# (journald reserves MESSAGE_ID for catalog ids).
JOURNAL_RENAMES = {"message_id": "QUEUE_MESSAGE_ID"}
KEY_OF_FIELD = {field: key for key, field in JOURNAL_RENAMES.items()}

# journald reserves these names or systemd-python sets them itself.
RESERVED_JOURNAL_FIELDS = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "LOGGER",
    }
)


def journal_field_name(key: str) -> str:
    """message_id -> QUEUE_MESSAGE_ID style: upper-case, and never a reserved name."""
    if key in JOURNAL_RENAMES:
        return JOURNAL_RENAMES[key]
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_") or "FIELD"
    if name[0].isdigit() or name in RESERVED_JOURNAL_FIELDS:
        name = f"AGENT_{name}"
    return name


def key_of_field(field: str) -> str:
    """The reader's way back: QUEUE_MESSAGE_ID -> message_id, ERROR -> error."""
    return KEY_OF_FIELD.get(field, field.lower())
