"""``index.html``: the leaderboard as one self-contained page (tables and embedded PNGs).

Renders the small markdown subset :mod:`bench.report` writes (headings, paragraphs, bullet
lists, pipe tables, images, ``**bold**`` and ```code```), with every image inlined as a data
URI so the page can be mailed or opened from anywhere.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0 1.4rem; font-size: .86rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .5rem; text-align: left; white-space: nowrap; }
th { background: #f1f3f5; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #e3e3e3; margin: .5rem 0; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
"""


def _inline(text: str, base: Path) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def _image(alt: str, src: str, base: Path) -> str:
    path = base / src
    if path.is_file():
        data = base64.b64encode(path.read_bytes()).decode()
        src = f"data:image/png;base64,{data}"
    return f'<img alt="{html.escape(alt)}" src="{src}">'


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str, base: Path, title: str) -> str:
    lines = text.splitlines()
    body, i = [], 0
    while i < len(lines):
        line = lines[i]
        img = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2), base)}</h{level}>")
            i += 1
        elif img:
            body.append(f"<p>{_image(img.group(1), img.group(2), base)}</p>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1].strip()):
            head = "".join(f"<th>{_inline(c, base)}</th>" for c in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:], base)}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(para), base)}</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_html(markdown_path: Path, out_path: Path, title: str) -> Path:
    base = Path(markdown_path).parent
    out_path.write_text(markdown_to_html(Path(markdown_path).read_text(), base, title))
    return out_path
