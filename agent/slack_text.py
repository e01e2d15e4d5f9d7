"""Text between Slack and the agent: readable in, safe and well formed out (docs/slack.md).

In (`from_slack`): the bot's own mention is removed, `<@U…>` becomes `@name`, `<#C…|name>`
`#name`, `<!here>` `@here`, `<url|label>` `label (url)`, and `&lt; &gt; &amp;` are
unescaped: the agent reads what the user saw.
Out (`to_slack`): `& < >` are escaped everywhere, so no agent output can produce a
control sequence (`<!channel>`, `<!here>`, `<!everyone>`, `<!subteam^…>`, `<@U…>`), and
the words `@channel`, `@here`, `@everyone` get an invisible joiner; common Markdown
(bold, italics, strikethrough, links, headings, bullets, fenced code) becomes mrkdwn.
`split` cuts a long text at paragraph or code-fence boundaries into parts of at most
PART_LIMIT characters, closing and reopening a fence that has to be cut.
"""

import re
from collections.abc import Callable

PART_LIMIT = 3500  # characters per posted message (Slack truncates text near 40,000)
EMPTY_REPLY = "_(The agent finished without writing a reply.)_"
FENCE = "```"

_SLACK_TOKEN = re.compile(r"<([^<>\n]*)>")
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_FENCED = re.compile(r"^```[^\n`]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_LINK = re.compile(r"!?\[([^\]\n]+)\]\(((?:https?://|mailto:)[^\s)]+)\)")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.MULTILINE)
_BOLD_MARK = "\x01"
_JOINER = "\u2060"


# ---- in


def from_slack(text: str, bot_user: str | None, name_of: Callable[[str], str]) -> str:
    """What the agent reads: Slack's markup turned back into plain text."""
    if bot_user:
        text = re.sub(rf"<@{re.escape(bot_user)}(\|[^>]*)?>", "", text)
    text = _SLACK_TOKEN.sub(lambda m: _plain(m.group(1), name_of), text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _plain(inner: str, name_of: Callable[[str], str]) -> str:
    target, _, label = inner.partition("|")
    if target.startswith("@"):
        return "@" + (label or name_of(target[1:]))
    if target.startswith("#"):
        return "#" + (label or target[1:])
    if target.startswith("!"):
        command = target[1:].split("^", 1)[0]
        if command == "subteam":
            return label or "@group"
        return label or f"@{command}"
    if label and label != target.removeprefix("mailto:"):
        return f"{label} ({target})"
    return target.removeprefix("mailto:")


# ---- out


def escape(text: str) -> str:
    """Slack's three control characters, escaped: no `<!channel>`, no `<@U…>` from text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_slack(markdown: str) -> str:
    """The agent's Markdown as safe Slack mrkdwn (an empty reply says so)."""
    if not markdown.strip():
        return EMPTY_REPLY
    parts: list[str] = []
    position = 0
    for block in _FENCED.finditer(markdown):
        parts.append(_prose(markdown[position : block.start()]))
        parts.append(f"{FENCE}\n{escape(block.group(1))}{FENCE}")
        position = block.end()
    parts.append(_prose(markdown[position:]))
    return "".join(parts).strip()


def _prose(text: str) -> str:
    """Markdown outside fenced code; inline code is escaped but not formatted."""
    out: list[str] = []
    position = 0
    for code in _INLINE_CODE.finditer(text):
        out.append(_format(text[position : code.start()]))
        out.append(escape(code.group(0)))
        position = code.end()
    out.append(_format(text[position:]))
    return "".join(out)


def _format(text: str) -> str:
    text = _BROADCAST.sub(lambda m: "@" + _JOINER + m.group(1), escape(text))
    links: list[str] = []

    def keep_link(match: re.Match[str]) -> str:
        label = match.group(1).replace("|", "/")
        links.append(f"<{match.group(2)}|{label}>")
        return f"\x02{len(links) - 1}\x02"

    text = _LINK.sub(keep_link, text)
    text = _HEADING.sub(lambda m: _BOLD_MARK + m.group(1).replace("**", "") + _BOLD_MARK, text)
    text = _BOLD.sub(lambda m: _BOLD_MARK + m.group(2) + _BOLD_MARK, text)
    text = _ITALIC.sub(r"_\1_", text)
    text = _STRIKE.sub(r"~\1~", text)
    text = _BULLET.sub(lambda m: m.group(1) + "• ", text)
    text = text.replace(_BOLD_MARK, "*")
    return re.sub("\x02(\\d+)\x02", lambda m: links[int(m.group(1))], text)


# ---- splitting


def split(text: str, limit: int = PART_LIMIT) -> list[str]:
    """Ordered parts of at most `limit` characters, cut between paragraphs or code blocks."""
    parts: list[str] = []
    current = ""
    for block in _blocks(text):
        for piece in _fit(block, limit):
            joined = f"{current}\n\n{piece}" if current else piece
            if len(joined) <= limit:
                current = joined
            else:
                parts.append(current)
                current = piece
    if current or not parts:
        parts.append(current)
    return parts


def _blocks(text: str) -> list[str]:
    """Paragraphs and whole fenced code blocks, in order."""
    blocks: list[str] = []
    position = 0
    for fence in re.finditer(r"^```\n.*?^```$", text, re.DOTALL | re.MULTILINE):
        blocks += _paragraphs(text[position : fence.start()])
        blocks.append(fence.group(0))
        position = fence.end()
    return blocks + _paragraphs(text[position:])


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _fit(block: str, limit: int) -> list[str]:
    """One block as pieces within limit: code by lines (fence reopened), prose by lines/words."""
    if len(block) <= limit:
        return [block]
    if block.startswith(FENCE):
        body = block[len(FENCE) + 1 : -len(FENCE)]
        room = limit - 2 * len(FENCE) - 2
        return [f"{FENCE}\n{piece}\n{FENCE}" for piece in _cut(body.rstrip("\n"), room, "\n")]
    return _cut(block, limit, "\n")


def _cut(text: str, limit: int, separator: str) -> list[str]:
    pieces: list[str] = []
    current = ""
    for unit in text.split(separator):
        if len(unit) > limit:
            smaller = _cut(unit, limit, " ") if separator == "\n" else _hard(unit, limit)
        else:
            smaller = [unit]
        for piece in smaller:
            joined = f"{current}{separator}{piece}" if current else piece
            if len(joined) <= limit:
                current = joined
            else:
                pieces.append(current)
                current = piece
    if current:
        pieces.append(current)
    return pieces


def _hard(text: str, limit: int) -> list[str]:
    pieces = []
    while len(text) > limit:
        cut = limit
        entity = text.rfind("&", 0, cut)
        if entity > cut - 5 and ";" not in text[entity:cut]:
            cut = entity  # never cut inside &amp; &lt; &gt;
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text] if text else pieces
