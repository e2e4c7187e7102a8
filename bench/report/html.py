"""``index.html``: the leaderboard as one self-contained, interactive page that opens offline.

The page is rendered from ``LEADERBOARD.md`` (headings, paragraphs, bullet lists, pipe tables, images,
``**bold**`` and ```code```), so it says exactly what the markdown says, and then made interactive:

* each dataset's static PNG is replaced by a plotly figure of the same operating points: stored size
  (log) against the test metric (log for lower-is-better metrics), one trace per method (the control a
  black star, ``dense`` a grey diamond), hover with config, basis, seeds, mean ± std, Δ vs control,
  ratio and file size, and the dataset's Pareto frontier chosen on validation;
* every table sorts on a click of its header (numbers as numbers, blanks last) and filters on the text
  typed above it (space-separated words, all must match);
* plotly.js is inlined once (no CDN), the other PNGs are inlined as data URIs.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import pandas as pd

from .numbers import CONTROL, DENSE, REFERENCES, _first, _isnan, is_control, pareto_front, single_point_methods
from .tables import _decimals, fmt_delta, fmt_kib, fmt_mean_std, fmt_ratio

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; box-sizing: border-box; }
h1 { border-bottom: 2px solid #333; padding-bottom: .3rem; font-size: 1.7rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
h3 { margin-top: 1.6rem; }
.tablewrap { max-width: 100%; overflow-x: auto; margin: .3rem 0 1.4rem; }
table { border-collapse: collapse; font-size: .78rem; }
th, td { border: 1px solid #d0d0d0; padding: .2rem .35rem; text-align: left; vertical-align: top; }
td { max-width: 26rem; overflow-wrap: break-word; }
th { background: #f1f3f5; position: sticky; top: 0; cursor: pointer; user-select: none; }
th:hover { background: #e2e6ea; }
th[aria-sort=ascending]::after { content: " ▲"; font-size: .7em; }
th[aria-sort=descending]::after { content: " ▼"; font-size: .7em; }
tr:nth-child(even) td { background: #fafafa; }
input.filter { font-size: .8rem; padding: .15rem .4rem; margin-top: .3rem; width: 18rem; border: 1px solid #bbb;
               border-radius: 3px; }
span.count { font-size: .75rem; color: #666; margin-left: .5rem; }
img { max-width: 100%; border: 1px solid #e3e3e3; margin: .5rem 0; }
.plot { border: 1px solid #e3e3e3; margin: .5rem 0; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
p.static { font-size: .8rem; color: #555; }
"""

SCRIPT = r"""
(function () {
  function key(text) {
    var t = text.replace(/^\s*\u2605\s*/, '').replace(/\u2212/g, '-').trim();
    if (t === '' || t === '\u2014' || t === 'none') return null;
    var m = t.replace(/,/g, '').match(/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?/i);
    return m ? parseFloat(m[0]) : t.toLowerCase();
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
    var keyed = rows.map(function (r, i) { return [key(r.cells[col] ? r.cells[col].textContent : ''), i, r]; });
    keyed.sort(function (a, b) {
      var x = a[0], y = b[0];
      if (x === null || y === null) return x === null && y === null ? a[1] - b[1] : (x === null ? 1 : -1);
      var nx = typeof x === 'number', ny = typeof y === 'number';
      var c = nx && ny ? x - y : (nx ? -1 : (ny ? 1 : (x < y ? -1 : (x > y ? 1 : 0))));
      return c !== 0 ? dir * c : a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }
  function filter(table, box, count) {
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean), shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      var text = r.textContent.toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) !== -1; });
      r.style.display = ok ? '' : 'none';
      shown += ok ? 1 : 0;
    });
    count.textContent = shown + ' of ' + table.tBodies[0].rows.length + ' rows';
  }
  document.querySelectorAll('table').forEach(function (table) {
    var box = document.createElement('input'), count = document.createElement('span');
    box.type = 'search'; box.className = 'filter'; box.placeholder = 'filter rows (words, all must match)';
    count.className = 'count';
    count.textContent = table.tBodies[0].rows.length + ' rows';
    var wrap = table.parentNode;
    wrap.parentNode.insertBefore(box, wrap);
    wrap.parentNode.insertBefore(count, wrap);
    box.addEventListener('input', function () { filter(table, box, count); });
    table.querySelectorAll('th').forEach(function (th, col) {
      th.title = 'click to sort';
      th.addEventListener('click', function () { sortBy(table, col, th); });
    });
  });
})();
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def _image(alt: str, src: str, base: Path) -> str:
    path = base / src
    if path.is_file():
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="{src}">'


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_body(text: str, base: Path, figures: dict[str, str] | None = None) -> list[str]:
    """HTML blocks of the markdown subset the report writes; an image named in ``figures`` becomes
    that interactive figure (the PNG stays a link beside it)."""
    figures = figures or {}
    lines = text.splitlines()
    body, i = [], 0
    while i < len(lines):
        line = lines[i]
        img = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif img and img.group(2) in figures:
            body.append(figures[img.group(2)])
            body.append(f'<p class="static">Static figure for papers: <a href="{html.escape(img.group(2))}">'
                        f"{html.escape(img.group(2))}</a> (in this folder).</p>")
            i += 1
        elif img:
            body.append(f"<p>{_image(img.group(1), img.group(2), base)}</p>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1].strip()):
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            body.append(f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead>'
                        f"<tbody>{''.join(rows)}</tbody></table></div>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    return body


def write_html(markdown_path: Path, out_path: Path, title: str, figures: dict[str, str] | None = None) -> Path:
    """Write the page for ``markdown_path``; ``figures`` maps an image file the markdown links to the
    interactive figure (``<div>``) that replaces it. plotly.js is inlined only when there is a figure."""
    base = Path(markdown_path).parent
    body = markdown_to_body(Path(markdown_path).read_text(), base, figures)
    head_script = ""
    if figures:
        from plotly.offline import get_plotlyjs

        head_script = f"<script>{get_plotlyjs()}</script>"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style>{head_script}</head><body>\n" + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    Path(out_path).write_text(page)
    return out_path


# ----------------------------------------------------------------------------------------------
# The interactive Pareto plot of a dataset
# ----------------------------------------------------------------------------------------------

BASIS_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "triangle-down", "pentagon", "hexagon", "cross"]


def _hex(colour) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour[:3])


def _hover(r: dict) -> str:
    name, up, n = r["metric_name"], bool(r["higher_better"]), r["n_seeds"]
    dec = _decimals(name, r["control_metric"], up)
    test = fmt_mean_std(r["metric"], r["metric_std"], n, dec)
    lines = [f"<b>{html.escape(str(r['method']))}</b> {html.escape(r['config'] or '')}",
             f"{html.escape(str(r['model']))} / {html.escape(str(r['basis']))}"
             + (f" — {html.escape(str(r['arch']))}" if not _isnan(r.get("arch")) and r.get("arch") else ""),
             f"seeds: {r['seeds']} (n={n})",
             f"test {name}: {test}",
             f"Δ vs control: test {fmt_delta(r['metric_delta'], r['control_metric'], name, dec, up)}, "
             f"val {fmt_delta(r['val_delta'], r['control_val_metric'], name, dec, up)}",
             f"stored: {fmt_kib(r['stored_bits'] / 8)} KiB ({r['stored_bits']:,.0f} bits), "
             f"ratio {fmt_ratio(r['compression_ratio'])}",
             f"file: {fmt_kib(r['file_bytes'])} KiB on disk; ONNX: {fmt_kib(r.get('onnx_bytes'))} KiB; "
             f"held at run time (deployed): {fmt_kib(r.get('runtime_bytes'))} KiB"]
    if r["method"] not in REFERENCES:
        within = r.get("within_tol")
        lines.append("within tolerance (validation): " + ("—" if _isnan(r.get("val_delta")) else
                                                           ("yes" if within else "no")))
    if r.get("budget"):
        lines.append(f"budget: {html.escape(str(r['budget']))}")
    return "<br>".join(lines)


def _error_y(points: pd.DataFrame, up: bool) -> dict:
    """± one std over seeds; on a log axis a lower bar that would reach 0 stops at a tenth of the mean."""
    std = points["metric_std"].fillna(0)
    minus = std if up else std.clip(upper=0.9 * points["metric"])
    return dict(type="data", symmetric=False, array=std.tolist(), arrayminus=minus.tolist(), thickness=1, width=3,
                color="#999999")


def _log_ticks(values: pd.Series) -> dict:
    """Tick marks at 1, 2, 5 × 10^k across the values, labelled plainly (no dangling minor labels)."""
    v = values[(values > 0) & values.notna()]
    if v.empty:
        return {}
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    ticks = [m * 10.0**e for e in range(lo - 1, hi + 1) for m in (1, 2, 5)
             if v.min() / 10 <= m * 10.0**e <= v.max() * 2]
    return dict(tickvals=ticks, ticktext=[f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks])


def pareto_figure(points: pd.DataFrame, dataset: str, palette: dict, div_id: str) -> str:
    """The ``<div>`` (and its script) of a dataset's interactive plot: stored KiB (log) against the test
    metric (log for lower-is-better metrics), one trace per method (markers by basis), the control a
    black star, and one more trace: the dataset's Pareto frontier, chosen on validation over every
    method and basis (fewest bits for a validation metric at least as good)."""
    import plotly.graph_objects as go

    up = bool(points["higher_better"].iloc[0])
    name = _first(points["metric_name"])
    bases = sorted(points["basis"].unique())
    symbol = {b: BASIS_SYMBOLS[i % len(BASIS_SYMBOLS)] for i, b in enumerate(bases)}
    fig = go.Figure()
    ctrl = is_control(points)
    methods = sorted(set(points["method"]), key=lambda m: (m != CONTROL, m != DENSE, m))
    single = single_point_methods(points)
    for method in methods:
        grp = points[points["method"] == method]
        recs = grp.to_dict("records")
        if method in REFERENCES:
            is_ctrl = bool(ctrl[grp.index].any())
            marker = dict(symbol="star" if is_ctrl else "diamond", size=16 if is_ctrl else 10,
                          color="black" if is_ctrl else "#888888", line=dict(width=1, color="white"))
            label = f"{method} (control)" if is_ctrl else f"{method} (no fine-tune)"
        else:
            inside = [bool(r.get("within_tol")) for r in recs]
            colour = _hex(palette[method])
            marker = dict(symbol=[symbol[r["basis"]] + ("" if i else "-open") for r, i in zip(recs, inside)],
                          size=10, color=colour, line=dict(width=1.5, color=colour))
            label = f"{method} (one operating point)" if method in single else method
        fig.add_trace(go.Scatter(
            x=(grp["stored_bits"] / 8 / 1024).tolist(), y=grp["metric"].tolist(), mode="markers", name=label,
            marker=marker, error_y=_error_y(grp, up),
            hovertext=[_hover(r) for r in recs], hoverinfo="text", meta=method))
    front = pareto_front(points, up, x="stored_bits", x_higher_is_better=False)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=(front["stored_bits"] / 8 / 1024).tolist(), y=front["metric"].tolist(),
                                 mode="lines", line=dict(color="rgba(0,0,0,0.4)", width=1.5, dash="dot"),
                                 name="Pareto frontier (validation)", hoverinfo="skip", meta="frontier"))
    ytitle = ("test accuracy (%) ↑ better" if name == "accuracy" else
              f"test {name} {'↑' if up else '↓'} better" + ("" if up else " (log scale)"))
    fig.update_layout(
        title=dict(text=f"{html.escape(dataset)}: test {name} vs stored size (mean ± std over seeds; hollow: outside "
                        "tolerance on validation; marker shape: basis " + ", ".join(
                            f"{b} {symbol[b].replace('-', ' ')}" for b in bases) + ")", font=dict(size=13)),
        xaxis=dict(title="stored size, whole model (KiB, log scale)", type="log",
                   **_log_ticks(points["stored_bits"] / 8 / 1024)),
        yaxis=dict(title=ytitle, type="linear" if up else "log",
                   **({} if up else _log_ticks(points["metric"]))),
        template="plotly_white", height=520, margin=dict(l=70, r=20, t=60, b=60),
        legend=dict(title="method"), hoverlabel=dict(align="left", bgcolor="white", font=dict(color="#1b1b1b")))
    return '<div class="plot">' + fig.to_html(include_plotlyjs=False, full_html=False, div_id=div_id,
                                              config={"displaylogo": False, "responsive": True}) + "</div>"
