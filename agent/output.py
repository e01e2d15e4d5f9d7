"""Standard output for a reader that may go away: `agentctl status | head -1`.

A closed pipe is not an error (SIGPIPE is how `head` says it has enough). Whoever meets
BrokenPipeError calls `reader_gone()`: stdout then points at /dev/null, so nothing more
(not even the interpreter's last flush) complains, and the command ends with its own exit
code and nothing on stderr.
"""

import os
import sys


def write(text: str, flush: bool = False) -> bool:
    """Print one line; False once the reader has gone."""
    try:
        print(text, flush=flush)
        return True
    except BrokenPipeError:
        reader_gone()
        return False


def flush() -> bool:
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        reader_gone()
        return False


def reader_gone() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
