"""Files a reply attaches: `ATTACH: path` lines in the agent's output (docs/slack.md).

A line of the reply that is exactly `ATTACH: <path>` is taken out of the text and names a
file to upload into the reply's thread (files.getUploadURLExternal, the upload, then
files.completeUploadExternal, through slack_sdk's files_upload_v2). A relative path is
taken from the agent's workdir. Invariant: only a regular file inside that workdir (after
resolving symlinks), at most `max_file_bytes`, is ever uploaded, and at most MAX_FILES per
reply; any other line is reported in the text as not attached, with why.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_FILES = 10
_ATTACH_LINE = re.compile(r"^ATTACH:[ \t]*(\S.*?)[ \t]*$\n?", re.MULTILINE)


@dataclass(frozen=True)
class Attachments:
    text: str  # the reply without its ATTACH lines
    paths: tuple[Path, ...]
    problems: tuple[str, ...]  # "name: why", said in the reply

    def note(self) -> str:
        return "\n".join(f"_(not attached: {problem})_" for problem in self.problems)


def extract(text: str, workdir: Path | None, max_bytes: int) -> Attachments:
    """Split the reply into its text and the files it attaches."""
    wanted = _ATTACH_LINE.findall(text)
    if not wanted:
        return Attachments(text, (), ())
    paths: list[Path] = []
    problems: list[str] = []
    for name in wanted:
        why = _refusal(name, workdir, max_bytes) if len(paths) < MAX_FILES else "too many files"
        if why:
            problems.append(f"{name}: {why}")
        else:
            paths.append(_resolve(name, workdir))
    return Attachments(_ATTACH_LINE.sub("", text).strip(), tuple(paths), tuple(problems))


def _resolve(name: str, workdir: Path | None) -> Path:
    path = Path(name).expanduser()
    if not path.is_absolute() and workdir is not None:
        path = workdir / path
    return Path(os.path.realpath(path))


def _refusal(name: str, workdir: Path | None, max_bytes: int) -> str | None:
    if workdir is None:
        return "the agent has no workdir"
    path = _resolve(name, workdir)
    root = Path(os.path.realpath(workdir))
    if not path.is_relative_to(root):
        return "outside the agent's workdir"
    if not path.is_file():
        return "not a file"
    if path.stat().st_size > max_bytes:
        return f"larger than max_file_bytes ({max_bytes})"
    return None
