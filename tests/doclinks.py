"""What the documentation tests read: the repository's Markdown documents, their relative links and headings,
and the text files that may cite them."""

from __future__ import annotations

import glob
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Documents linked before they are merged: written on another branch at the same time as the link. The entry
# exempts a path only while it is absent; once the file exists it is checked like every other (delete the entry
# then).
WRITTEN_ON_OTHER_BRANCHES: set[str] = set()


def documents() -> list[str]:
    """The Markdown documents of the repository, relative to its root."""
    docs = ["README.md", "CONTRIBUTING.md"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [d for d in docs if os.path.exists(os.path.join(ROOT, d))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (neither holds links or headings)."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: str) -> set[str]:
    """Every heading anchor of ``doc`` (a repository path), repeated headings numbered as GitHub does."""
    with open(os.path.join(ROOT, doc)) as f:
        text = re.sub(r"^```.*?^```[^\n]*$", "", f.read(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        s = slug(heading)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def relative_links(doc: str) -> list[tuple[str, str]]:
    """``(target, anchor)`` of every relative link and image of ``doc``: ``target`` is a repository path (``doc``
    itself for ``#anchor``), ``anchor`` is "" when there is none."""
    with open(os.path.join(ROOT, doc)) as f:
        text = _prose(f.read())
    out = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        path = doc if not path else os.path.normpath(os.path.join(os.path.dirname(doc), path))
        out.append((path, anchor))
    return out


def repository_text_files() -> list[str]:
    """Every text file of the checkout that git tracks or would track (not ignored), relative to the root."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    out = []
    for rel in filter(None, listed):
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(8192)
        if b"\0" not in head:
            out.append(rel)
    return out
