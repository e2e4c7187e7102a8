"""``LEADERBOARD.md``, its static PNGs and the interactive ``index.html`` of one results frame.

Order of the page: the header (runs, how decisions are made, provenance), a plain-words summary, the
headline (per dataset and model, methods ranked by the stored bits of their smallest point within each
accuracy budget), then per dataset its Pareto plot and one table per base model, then the speedup and
training-resource figures, the papers' claims, the transfer section (when given), infeasible settings
and failed runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .claims import paper_claims_section
from .html import pareto_figure, write_html
from .numbers import aggregate, within_tolerance
from .plots import method_palette, plot_dataset, plot_resources, plot_speedup, safe_name
from .tables import (
    dataset_section,
    failures_section,
    header_section,
    headline_section,
    infeasible_counts,
    infeasible_section,
)
from .transfer import transfer_section

DEFAULT_TITLE = "KAN compression leaderboard"


def write_report(df: pd.DataFrame, out_dir: Path, title: str | None = None, tolerance_acc: float = 1.0,
                 tolerance_rmse_rel: float = 0.05, header_lines: list[str] | None = None,
                 transfer: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/LEADERBOARD.md``, one ``metric_vs_bits_<dataset>.png`` per dataset (plus the
    speedup and training-resource figures), and ``index.html``; given ``transfer`` rows, also the
    transfer section with its plot. Every decision is made on validation against the ``dense_ft``
    control (see :mod:`bench.report.numbers`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or DEFAULT_TITLE
    points = aggregate(df)
    if not points.empty:
        points["within_tol"] = within_tolerance(points, tolerance_acc, tolerance_rmse_rel)
    lines = header_section(df, title, tolerance_acc, tolerance_rmse_rel, header_lines, points)
    figures: dict[str, str] = {}
    if points.empty:
        lines += ["**No successful runs** — nothing to rank or plot.", ""]
    else:
        lines += headline_section(points, tolerance_acc, tolerance_rmse_rel, infeasible_counts(df))
        palette = method_palette(points["method"])
        used_names: set[str] = set()
        for i, (dataset, grp) in enumerate(points.groupby("dataset", sort=True)):
            plot_file = _unique(f"metric_vs_bits_{safe_name(dataset)}", used_names) + ".png"
            plot_dataset(grp, str(dataset), out_dir / plot_file, palette, tolerance_acc, tolerance_rmse_rel)
            figures[plot_file] = pareto_figure(grp, str(dataset), palette, div_id=f"pareto-{i}")
            lines += dataset_section(grp, str(dataset), plot_file)
        if plot_speedup(points, out_dir / "metric_vs_speedup.png", palette):
            lines += ["## Accuracy vs theoretical speedup", "", "![metric vs speedup](metric_vs_speedup.png)", ""]
        if plot_resources(points, out_dir / "training_resources.png"):
            lines += ["## Training memory and trainable parameters", "",
                      "Per dataset (never pooled): median over each method's operating points, per basis.", "",
                      "![training resources](training_resources.png)", ""]
        lines += paper_claims_section(points)
    if transfer is not None:
        lines += transfer_section(transfer, out_dir)
    lines += infeasible_section(df)
    lines += failures_section(df)
    path = out_dir / "LEADERBOARD.md"
    path.write_text("\n".join(lines))
    write_html(path, out_dir / "index.html", title=title, figures=figures)
    return path


def _unique(stem: str, used: set[str]) -> str:
    name, i = stem, 2
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name

