#!/usr/bin/env python3
"""Fails on a broken internal link of the book, or from the top-level docs into it.

Checked, outside fenced code blocks and inline code:

* every relative link in docs/src/**/*.md: the file must exist inside docs/src (links
  that leave the book do not work in the built book), and a `#anchor` must be the id
  of a heading of the target page, computed as mdBook computes it (lowercase, spaces to
  `-`, punctuation dropped, `-1`, `-2`... for repeated headings);
* every relative link of README.md and SECURITY.md: the file must exist, and for links
  into docs/src the anchor must resolve too.

External links (http:, https:, mailto:...) are not followed. Standard library only.

    python3 scripts/check-book-links.py [REPO_ROOT]
"""

import re
import sys
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
BOOK = (ROOT / "docs" / "src").resolve()
TOP_LEVEL = ["README.md", "SECURITY.md"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
# [text](target "title") and ![alt](target); the text may hold inline code.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(text):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and line.strip() == m.group(1):
            fence = None


def normalize_id(text):
    """mdBook's normalize_id: keep letters, digits, `_` and `-` (lowercased), turn
    whitespace into `-`, drop everything else."""
    out = []
    for ch in text:
        if ch.isalnum() or ch in "_-":
            out.append(ch.lower())
        elif ch.isspace():
            out.append("-")
    return "".join(out)


def heading_text(raw):
    """The text mdBook sees in a heading once its markup is rendered and stripped."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", raw)  # links
    text = text.replace("`", "")
    text = re.sub(r"\*\*|__", "", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)|(?<=\S)\*(?![\w*])", "", text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return text.strip()


_ids = {}


def heading_ids(path):
    """Every id mdBook gives the headings of the page at `path`."""
    if path not in _ids:
        counts = {}
        ids = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = normalize_id(heading_text(m.group(2)))
            n = counts.get(base, 0)
            counts[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
        _ids[path] = ids
    return _ids[path]


def links(path):
    """(line number, target) of every link in the prose of `path`."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            yield number, m.group(1)
            continue
        without_code = CODE_SPAN.sub(lambda c: " " * len(c.group(0)), line)
        for m in INLINE_LINK.finditer(without_code):
            yield number, m.group(1)


def check(path, in_book):
    problems = []
    shown = path.relative_to(ROOT)
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        where = f"{shown}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        inside_book = dest == BOOK or BOOK in dest.parents
        if in_book and not inside_book:
            problems.append(f"{where}: leaves docs/src, so it breaks in the built book "
                            "(name the file in code instead)")
            continue
        if not anchor or not (in_book or inside_book):
            continue
        if dest.suffix != ".md":
            problems.append(f"{where}: an anchor on a file that is not a chapter")
        elif anchor not in heading_ids(dest):
            problems.append(f"{where}: no heading of {dest.relative_to(ROOT)} has the id "
                            f"#{anchor}")
    return problems


def main():
    if not BOOK.is_dir():
        print(f"check-book-links: {BOOK} is not a directory", file=sys.stderr)
        return 2
    problems = []
    pages = sorted(BOOK.rglob("*.md"))
    for page in pages:
        problems += check(page, in_book=True)
    for name in TOP_LEVEL:
        if (ROOT / name).exists():
            problems += check(ROOT / name, in_book=False)
    for p in problems:
        print(p)
    if problems:
        print(f"check-book-links: {len(problems)} broken link(s)", file=sys.stderr)
        return 1
    print(f"check-book-links: ok ({len(pages)} pages, {', '.join(TOP_LEVEL)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
