"""Text between Slack and the agent: mrkdwn in, safe mrkdwn out, long replies split."""

from agent.slack_text import EMPTY_REPLY, PART_LIMIT, from_slack, split, to_slack


def names(user: str) -> str:
    return {"U1": "alice"}.get(user, user)


def test_incoming_markup_becomes_what_the_user_saw():
    text = (
        "<@UBOT> ask <@U1> and <@U2|bob> in <#C9|general> about "
        "<https://x.org/a?b=1&amp;c=2|the doc>, <https://y.org> &lt;b&gt; &amp; <!here>"
    )
    assert from_slack(text, "UBOT", names) == (
        "ask @alice and @bob in #general about the doc (https://x.org/a?b=1&c=2), "
        "https://y.org <b> & @here"
    )
    assert from_slack("<mailto:a@b.c|a@b.c> <!subteam^S1|@devs>", None, names) == "a@b.c @devs"


def test_agent_output_can_never_ping_anyone():
    out = to_slack("<!channel> <!here> <!everyone> <!subteam^S1> <@U1> @channel @here & done")
    assert "<" not in out and ">" not in out
    assert "&lt;!channel&gt;" in out and "&amp; done" in out
    assert "@channel" not in out and "@here" not in out  # an invisible joiner breaks them


def test_common_markdown_becomes_mrkdwn():
    out = to_slack(
        "# Plan\n\n**bold**, *italic*, ~~gone~~, [docs](https://d.org/x?a=1&b=2)\n"
        "- one\n\n```python\nif a < b and **c**:\n    pass\n```\n`x<y`"
    )
    assert out.startswith("*Plan*\n\n*bold*, _italic_, ~gone~, <https://d.org/x?a=1&amp;b=2|docs>")
    assert "• one" in out
    assert "```\nif a &lt; b and **c**:\n    pass\n```" in out  # code is escaped, not formatted
    assert "`x&lt;y`" in out
    assert to_slack("  \n") == EMPTY_REPLY


def test_long_text_is_split_at_paragraphs_and_fences_in_order():
    paragraphs = [f"paragraph {i} " + "x" * 200 for i in range(60)]
    code = "```\n" + "\n".join(f"line {i}" for i in range(800)) + "\n```"
    text = "\n\n".join([*paragraphs[:30], code, *paragraphs[30:]])
    parts = split(text)
    assert len(parts) > 3 and all(len(p) <= PART_LIMIT for p in parts)
    assert all(p.count("```") % 2 == 0 for p in parts)  # a cut fence is closed and reopened
    joined = "\n\n".join(parts)
    assert [p for p in paragraphs if p not in joined] == []
    assert joined.index("paragraph 29 ") < joined.index("line 0") < joined.index("paragraph 30 ")
    assert all(f"line {i}\n" in joined for i in range(799))
    assert split("short") == ["short"]
    assert [len(p) for p in split("y" * 8000)] == [PART_LIMIT, PART_LIMIT, 1000]


def test_attach_lines_name_files_inside_the_workdir_only(tmp_path):
    from agent.slack_attach import extract

    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("a")
    (work / "big.bin").write_bytes(b"x" * 100)
    (tmp_path / "outside.txt").write_text("no")
    (work / "link.txt").symlink_to(tmp_path / "outside.txt")
    text = (
        "Done.\nATTACH: a.txt\nATTACH: link.txt\nATTACH: /etc/passwd\n"
        "ATTACH: big.bin\nATTACH: missing.txt\nnot ATTACH: here"
    )
    got = extract(text, work, 50)
    assert got.text == "Done.\nnot ATTACH: here"
    assert got.paths == (work / "a.txt",)
    assert got.problems == (
        "link.txt: outside the agent's workdir",
        "/etc/passwd: outside the agent's workdir",
        "big.bin: larger than max_file_bytes (50)",
        "missing.txt: not a file",
    )
    assert extract("no files", work, 50).paths == ()
