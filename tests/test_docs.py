"""README.md, BUILD.md and docs/*.md: BUILD.md indexes every page; every relative link names a file that exists and, for a Markdown
file, an anchor that one of its headings makes (GitHub's rule: lower case, punctuation but
``-`` and ``_`` dropped, spaces to hyphens, ``-1``, ``-2`` … for repeats; headings inside code
fences do not count)."""
from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor outside code fences; a repeated one gets -1, -2, …"""
    out: set[str] = set()
    for m in re.finditer(r"^#+ (.*)$", FENCE.sub("", text), re.M):
        s = base = slug(m.group(1))
        i = 0
        while s in out:
            i += 1
            s = f"{base}-{i}"
        out.add(s)
    return out


def broken_links(path: str) -> list[str]:
    """The relative links of one Markdown file whose target file or anchor is missing."""
    text = open(path, encoding="utf-8").read()
    bad = []
    for m in LINK.finditer(FENCE.sub("", text)):
        link = m.group(1)
        if re.match(r"[a-z]+:", link):
            continue
        target, _, frag = link.partition("#")
        tpath = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.exists(tpath):
            bad.append(f"{link} (no such file)")
        elif frag and tpath.endswith(".md") and frag not in anchors(
                open(tpath, encoding="utf-8").read()):
            bad.append(f"{link} (no such heading)")
    return bad


def test_slugs_follow_github():
    assert slug("FSDD, leave one speaker out (`configs/fsdd.flags`)") == \
        "fsdd-leave-one-speaker-out-configsfsddflags"
    assert slug("Adapting to the speaker (`--adapt_batchnorm`, `tools/adapt.py`)") == \
        "adapting-to-the-speaker---adapt_batchnorm-toolsadaptpy"
    assert anchors("# A\n```\n# B\n```\n## A\n") == {"a", "a-1"}


def test_the_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n[ok](#top) [x](#nope) [y](b.md#top) [z](c.md)\n"
                                   "```\n[fenced](#ignored)\n```\n")
    (tmp_path / "b.md").write_text("# Other\n")
    assert broken_links(str(tmp_path / "a.md")) == [
        "#nope (no such heading)", "b.md#top (no such heading)", "c.md (no such file)"]


def _pages() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_every_relative_link_resolves():
    files = [os.path.join(ROOT, n) for n in ("README.md", "BUILD.md")] + _pages()
    bad = {os.path.relpath(f, ROOT): b for f in files if (b := broken_links(f))}
    assert not bad, bad


def test_build_md_indexes_every_page():
    index = open(os.path.join(ROOT, "BUILD.md"), encoding="utf-8").read()
    missing = [p for p in _pages() if f"(docs/{os.path.basename(p)})" not in index]
    assert not missing, missing
