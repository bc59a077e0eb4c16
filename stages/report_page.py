"""The report page as data: a list of blocks (:data:`Block`), rendered as Markdown and as HTML.

The page is assembled once (:func:`stages.report.page_blocks`) and rendered twice, so report.md and
report.html cannot disagree. Rendering is a pure function of the blocks: no dates, no versions, the
figures linked by relative paths and the style inline, so the HTML page is self-contained and the
same inputs give byte-identical pages. Text is escaped, with `code`, **bold** and *italics*
recognised (:func:`_inline`); the study's own notes may also use paragraphs, ``- `` lists and ``#``
headings (:func:`markdown_html`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stages.report_plan import Planned


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    """A paragraph of plain text; `code` spans are shown as code."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A list of plain-text items; `code` spans are shown as code."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Notes:
    """Markdown written by the study's author (the ``notes`` parameter)."""

    text: str


@dataclass
class Drawn:
    """A drawn figure: its plan, its files, its source artifact versions and upstream jobs."""

    plan: Planned
    files: list[str]
    records: list[dict[str, Any]]
    upstream: list[dict[str, Any]]


Block = Heading | Para | Bullets | Table | Notes | Drawn


def _sources_text(records: Sequence[Mapping[str, Any]]) -> str:
    by_input: dict[str, list[str]] = {}
    for r in records:
        by_input.setdefault(r["input"], []).append(r["ref"])
    return "; ".join(f"{name}: {', '.join(refs)}" for name, refs in by_input.items())


def _upstream_text(drawn: Drawn) -> str:
    jobs = [str(u.get("job_label") or u.get("ref")) for u in drawn.upstream]
    return f" Upstream jobs: {', '.join(jobs)}." if jobs else ""


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        out += _md_block(b) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_block(b: Block) -> list[str]:
    if isinstance(b, Heading):
        return ["#" * b.level + " " + b.text]
    if isinstance(b, Para):
        return [b.text]
    if isinstance(b, Bullets):
        return [f"- {item}" for item in b.items]
    if isinstance(b, Table):
        return _md_table(b.header, b.rows)
    if isinstance(b, Notes):
        return [b.text.strip()]
    png, pdf = _files(b)
    return [f"### {b.plan.title}", "", f"![{b.plan.title}]({png})", "",
            f"{_caption(b.plan)} Data: {_sources_text(b.records)}.{_upstream_text(b)} [PDF]({pdf})"]


def _files(drawn: Drawn) -> tuple[str, str]:
    return (next(f for f in drawn.files if f.endswith(".png")), next(f for f in drawn.files if f.endswith(".pdf")))


def sentence(text: str) -> str:
    """``text`` with its first letter capitalised."""
    return text[:1].upper() + text[1:]


def _caption(plan: Planned) -> str:
    return " ".join([sentence(plan.caption), *(f"Not shown: {g}" for g in plan.gaps)])


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 2em 0; border-top: 1px solid #ddd; padding-top: 1em; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.92em; color: #333; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
code, .ref { font-family: ui-monospace, monospace; font-size: 0.9em; }
.notes { border-left: 3px solid #bbb; padding-left: 1em; }
"""


def render_html(blocks: Sequence[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "Report")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    parts += [_html_block(b) for b in blocks]
    return "\n".join([*parts, "</body>", "</html>"]) + "\n"


def _html_block(b: Block) -> str:
    e = html.escape
    if isinstance(b, Heading):
        return f"<h{b.level}>{e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>\n" + "\n".join(f"<li>{_inline(item)}</li>" for item in b.items) + "\n</ul>"
    if isinstance(b, Table):
        return _html_table(b.header, b.rows)
    if isinstance(b, Notes):
        return f'<div class="notes">\n{markdown_html(b.text)}\n</div>'
    return _html_figure(b)


def _html_figure(drawn: Drawn) -> str:
    e = html.escape
    plan = drawn.plan
    png, pdf = _files(drawn)
    refs = "; ".join(f'{e(r["input"])}: <span class="ref" title="job {e(r["job_key"])}">{e(r["ref"])}</span>'
                     for r in drawn.records)
    return (f'<figure id="{e(plan.name)}">\n<h3>{e(plan.title)}</h3>\n'
            f'<img src="{e(png)}" alt="{e(plan.title)}">\n'
            f"<figcaption>{e(_caption(plan))}<br>Data: {refs}.{e(_upstream_text(drawn))} Files: "
            f'<a href="{e(png)}">PNG</a>, <a href="{e(pdf)}">PDF</a>.</figcaption>\n</figure>')


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_BULLET = re.compile(r"^\s*[-*] ")
_HEADING = re.compile(r"^(#{1,6}) (.*)$")


def markdown_html(text: str) -> str:
    """The small Markdown the ``notes`` parameter may use, as HTML (everything else escaped):
    paragraphs, ``- `` lists, ``#`` headings (shown below the section's level), `code`, **bold**, *italics*."""
    out = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = chunk.splitlines()
        if all(_BULLET.match(line) for line in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(_BULLET.sub('', line))}</li>" for line in lines) + "</ul>")
        elif len(lines) == 1 and (m := _HEADING.match(lines[0])):
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        else:
            out.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped text with `code`, **bold** and *italics* (code spans are left as they are)."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        out.append(re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", s))
    return "".join(out)
