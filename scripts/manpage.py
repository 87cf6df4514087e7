"""Man pages from the reference docs: docs/mount.fusestream.md -> mount.fusestream(8) and
docs/fusestream.md -> fusestream(1), so the pages and the docs never drift apart.

The docs use a small part of Markdown, and this turns exactly that part into man(7) roff: a
title line ``# NAME(SECTION)``, ``##`` and ``###`` headings, paragraphs, ``-`` and ``1.`` lists
(continued by indented lines), fenced code blocks, tables (kept as preformatted text), and
inline code, bold and italics.

    .venv/bin/python scripts/manpage.py DOC.md              print the page
    .venv/bin/python scripts/manpage.py --install [PREFIX]  both pages under PREFIX/share/man
                                                            (default /usr/local; scripts/setup does it)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ("mount.fusestream.md", "fusestream.md")
TITLE = re.compile(r"^# ([\w.-]+)\((\d)\)\s*$")
LIST_ITEM = re.compile(r"^(\s*)(- |\d+\. )(.*)$")


def escape(text: str) -> str:
    """Roff-escape plain text: backslashes, and a line that would start with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def inline(text: str) -> str:
    """`code` and **bold** in bold, *emphasis* in italics; the rest escaped."""
    out = []
    for part in re.split(r"(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*)", text):
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"\\fB{escape(part[1:-1])}\\fR")
        elif part.startswith("**") and part.endswith("**") and len(part) > 3:
            out.append(f"\\fB{escape(part[2:-2])}\\fR")
        elif part.startswith("*") and part.endswith("*") and len(part) > 1:
            out.append(f"\\fI{escape(part[1:-1])}\\fR")
        else:
            out.append(escape(part))
    result = "".join(out)
    return "\\&" + result if result.startswith((".", "'")) else result


def cells(row: str) -> list[str]:
    """The cells of a table row; `\\|` is a | inside a cell."""
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def table(rows: list[str]) -> list[str]:
    """A two-column table (a term and what it means) as a tagged list; wider ones as text."""
    body = [cells(row) for row in rows[2:]]  # the header and the rule line are dropped
    if all(len(row) == 2 for row in body):
        return [line for term, meaning in body for line in (".TP", inline(term), inline(meaning))]
    widths = [max(len(row[k]) for row in body if k < len(row)) for k in range(max(map(len, body)))]
    text = ["  ".join(cell.ljust(widths[k]) for k, cell in enumerate(row)).rstrip() for row in [cells(rows[0]), *body]]
    return [".PP", ".RS 4", ".nf", *(escape(line) for line in text), ".fi", ".RE"]


def to_roff(markdown: str, version: str) -> str:
    lines = markdown.splitlines()
    match = TITLE.match(lines[0]) if lines else None
    if not match:
        raise ValueError("the first line must be '# NAME(SECTION)'")
    name, section = match.groups()
    out = [f'.TH "{name.upper()}" "{section}" "" "fusestream {version}" "fusestream"']
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(inline(" ".join(paragraph)))
            paragraph.clear()

    i = 1
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out += [".PP", ".RS 4", ".nf", *(escape(text) for text in lines[i + 1 : end]), ".fi", ".RE"]
            i = end + 1
            continue
        if line.startswith("|"):
            flush()
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            out += table(lines[i:end])
            i = end
            continue
        if line.startswith("### ") or line.startswith("## "):
            flush()
            level, heading = line.split(" ", 1)
            out.append((".SS " if level == "###" else ".SH ") + f'"{escape(heading.strip())}"')
        elif (item := LIST_ITEM.match(line)) and not paragraph:
            indent, marker, text = item.groups()
            body = [text]
            while i + 1 < len(lines) and lines[i + 1].startswith(indent + " " * len(marker)) \
                    and lines[i + 1].strip() and not LIST_ITEM.match(lines[i + 1]):
                i += 1
                body.append(lines[i].strip())
            bullet = "\\(bu" if marker == "- " else marker.strip()
            out += [f'.IP "{bullet}" {len(marker) + 1}', inline(" ".join(body))]
        elif not line.strip():
            flush()
            if out[-1] not in (".PP",) and not out[-1].startswith((".SH", ".SS")):
                out.append(".PP")
        else:
            if LIST_ITEM.match(line) is None and not paragraph and out[-1].startswith(".IP"):
                out.append(".PP")
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(out) + "\n"


def page_name(doc: Path) -> tuple[str, str]:
    match = TITLE.match(doc.read_text().splitlines()[0])
    if not match:
        raise ValueError(f"{doc}: the first line must be '# NAME(SECTION)'")
    return match.groups()


def render(doc: Path) -> str:
    from fusestream import __version__

    return to_roff(doc.read_text(), __version__)


def install(prefix: Path) -> list[Path]:
    written = []
    for doc in (DOCS / page for page in PAGES):
        name, section = page_name(doc)
        target = prefix / "share" / "man" / f"man{section}" / f"{name}.{section}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(doc))
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    if argv[:1] == ["--install"]:
        for path in install(Path(argv[1] if len(argv) > 1 else "/usr/local")):
            print(f"manpage: installed {path}")
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(render(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
