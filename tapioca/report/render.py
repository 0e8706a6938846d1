"""Rendering a report's blocks as Markdown and as one self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

# ("h", level, text[, anchor]) | ("p", text[, css class]) | ("table", headers, rows) | ("img", file, caption)
Block = tuple


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Blocks as GitHub-flavoured markdown (images linked by relative file name)."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            anchor = f'<a id="{block[3]}"></a>\n' if len(block) > 3 else ""
            out.append(anchor + "#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                     "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def _inline_html(text: Any) -> str:
    """Escape text, then render **bold**, `code` and [links](#within-the-page)."""
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"\[([^\]]+)\]\((#[\w-]+)\)", r'<a href="\2">\1</a>', s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1200px; margin: 1.2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; margin: 0 0 0.2em; font-size: 1.7em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h2#findings, h2#verdicts { font-size: 1.1em; border: none; margin: 0.6em 0 0.2em; }
p.lead { font-size: 1.02em; margin: 0.2em 0 0.4em; }
p.note { font-size: 0.85em; color: #555; margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
table.verdicts { margin: 0.3em 0; font-size: 0.82em; } table.verdicts td { padding: 1px 6px; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
.lead-grid { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
.lead-grid > div { flex: 1 1 420px; min-width: 0; } .lead-grid > div:first-child { flex: 1.7 1 560px; }
.lead-grid figure { margin: 0.3em 0; } table.verdicts td:nth-child(n+3) { white-space: nowrap; }
"""


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    kind = block[0]
    if kind == "h":
        anchor = f' id="{html.escape(block[3])}"' if len(block) > 3 else ""
        return f"<h{block[1]}{anchor}>{_inline_html(block[2])}</h{block[1]}>"
    if kind == "p":
        css = f' class="{html.escape(block[2])}"' if len(block) > 2 else ""
        return f"<p{css}>{_inline_html(block[1])}</p>"
    if kind == "table":
        head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
        rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
        css = ' class="verdicts"' if block[1][:1] == ["claim"] else ""
        return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if kind == "img":
        data = base64.b64encode(images[block[1]]).decode("ascii")
        return (f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(block[2])}</figcaption></figure>")
    return ""


def render_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """Blocks as one self-contained HTML page (PNGs embedded as base64 data URIs). The verdict table and the
    headline figure sit side by side on a wide screen, so that the first screen holds the answer."""
    body = [_html_block(b, images) for b in blocks]
    verdicts = next((i for i, b in enumerate(blocks) if b[0] == "h" and b[3:4] == ("verdicts",)), None)
    figure = next((i for i, b in enumerate(blocks) if b[0] == "img" and b[1] == "headline.png"), None)
    if verdicts is not None and figure is not None and figure > verdicts:
        body[verdicts:figure + 1] = ['<div class="lead-grid"><div>' + "\n".join(body[verdicts:figure])
                                     + "</div><div>" + body[figure] + "</div></div>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>tapioca study report</title>\n<style>" + CSS + "</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------
