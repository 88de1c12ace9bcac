"""One report, two renderings: a list of blocks written as markdown and as a self-contained HTML page.

Blocks are tuples: ("h", level, text), ("p", text), ("table", markdown table text, as
`ablate.format_table` writes it: `| a | b |` rows, a `|---|` rule, then optional note lines),
("img", file name, alt text) and ("ul", [items]). Text may use `**bold**` and `` `code` ``.
The HTML page embeds every image as base64 PNG data, so it is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import os
import re

_INLINE = re.compile(r"\*\*(.+?)\*\*|`(.+?)`")


def inline_html(text: str) -> str:
    """`text` HTML-escaped, with **bold** and `code` marked up."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[last:m.start()]))
        out.append(f"<b>{html.escape(m.group(1))}</b>" if m.group(1) is not None
                   else f"<code>{html.escape(m.group(2))}</code>")
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out).replace("&lt;br&gt;", "<br>")


def table_cells(markdown: str) -> tuple[list[list[str]], list[str]]:
    """The rows (header first) of a markdown table's `| a | b |` lines, and the other non-empty lines."""
    rows, notes = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # not the |---| rule
                rows.append(cells)
        elif line.strip():
            notes.append(line.strip())
    return rows, notes


def to_markdown(blocks: list[tuple]) -> str:
    """The blocks as a markdown page."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(block[1].rstrip("\n"))
        elif kind == "img":
            parts.append(f"![{block[2]}]({block[1]})")
        elif kind == "ul":
            parts.append("\n".join(f"- {item}" for item in block[1]))
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n\n".join(parts) + "\n"


def _html_table(markdown: str) -> str:
    rows, notes = table_cells(markdown)
    if not rows:
        return ""
    head = "".join(f"<th>{inline_html(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    out = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return out + "".join(f"<p class=\"note\">{inline_html(n)}</p>" for n in notes)


def _html_image(folder: str, name: str, alt: str) -> str:
    with open(os.path.join(folder, name), "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f"<figure><img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{data}\"></figure>"


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
          "text-align:right}td:first-child,th:first-child{text-align:left}.note{font-size:90%;color:#555}"
          "img{max-width:100%}code{background:#f3f3f3}")


def to_html(blocks: list[tuple], title: str, image_folder: str) -> str:
    """The blocks as one HTML page; images are read from `image_folder` and embedded."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{inline_html(block[1])}</p>")
        elif kind == "table":
            parts.append(_html_table(block[1]))
        elif kind == "img":
            parts.append(_html_image(image_folder, block[1], block[2]))
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in block[1]) + "</ul>")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
