"""Static figures for papers and GitHub (seaborn on matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .numbers import CONTROL, DENSE, REFERENCES, _first, is_control, pareto_front, single_point_methods

DPI = 120


def safe_name(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unnamed"


def _ratio_formatter(v, _pos) -> str:
    return f"{v:g}×"


def _kib_formatter(v, _pos) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def _axis_label(metric_name, higher: bool = True) -> str:
    if metric_name == "accuracy":
        return "test accuracy (%)  ↑ better"
    arrow = "↑" if higher else "↓"
    scale = "" if higher else " (log scale)"
    return f"test {str(metric_name).upper() if metric_name == 'rmse' else metric_name}  {arrow} better{scale}"


def error_bars(points: pd.DataFrame, up: bool):
    """± one std over seeds; on a log axis (lower-is-better metrics) the lower bar stops at a tenth of
    the mean where the std reaches below it (a log axis has no zero)."""
    std = points["metric_std"].fillna(0).to_numpy()
    if up:
        return std
    return [np.minimum(std, 0.9 * points["metric"].to_numpy()), std]


def _tolerance_line(control_y: float, higher: bool, tolerance_acc: float, tolerance_rmse_rel: float) -> float:
    return control_y - tolerance_acc if higher else control_y * (1 + tolerance_rmse_rel)


def _draw_facet(ax, points: pd.DataFrame, palette: dict, tolerance_acc: float, tolerance_rmse_rel: float) -> None:
    """Test metric against stored KiB (log x; log y for lower-is-better metrics), every point drawn."""
    up = bool(points["higher_better"].iloc[0])
    ctrl_mask = is_control(points)
    control = points[ctrl_mask]
    dense = points[(points["method"] == DENSE) & ~ctrl_mask]
    others = points[~points["method"].isin(REFERENCES)]
    control_y = control["metric"].mean()
    if math.isfinite(control_y):
        ax.axhline(control_y, color="black", lw=1, ls="--", zorder=1)
        ax.axhline(_tolerance_line(control_y, up, tolerance_acc, tolerance_rmse_rel), color="black", lw=0.8,
                   ls=":", zorder=1)
    kib = points["stored_bits"] / 8 / 1024
    for method, grp in others.groupby("method", sort=True):
        colour = palette[method]
        x = grp["stored_bits"] / 8 / 1024
        ax.errorbar(x, grp["metric"], yerr=error_bars(grp, up), fmt="none", ecolor=colour, elinewidth=1,
                    capsize=3, alpha=0.8, zorder=2)
        front = pareto_front(grp, up, x="stored_bits", x_higher_is_better=False)  # chosen on validation
        if len(front) > 1:  # a frontier needs two points; one point is just a point
            ax.plot(front["stored_bits"] / 8 / 1024, front["metric"], color=colour, lw=1.5, alpha=0.9, zorder=2)
        inside = grp["within_tol"].astype(bool) if "within_tol" in grp.columns else pd.Series(False, index=grp.index)
        ax.scatter(x[inside], grp.loc[inside, "metric"], s=45, color=colour, edgecolors="white", linewidths=0.5,
                   zorder=3)
        ax.scatter(x[~inside], grp.loc[~inside, "metric"], s=45, facecolors="none", edgecolors=[colour],
                   linewidths=1.3, zorder=3)
    if not dense.empty:
        ax.errorbar(kib[dense.index], dense["metric"], yerr=error_bars(dense, up), fmt="D", color="grey",
                    markersize=6, capsize=3, zorder=4)
    if not control.empty:
        ax.errorbar(kib[control.index], control["metric"], yerr=error_bars(control, up), fmt="*",
                    color="black", markersize=12, capsize=3, zorder=5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_kib_formatter))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if not up:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("stored size, whole model (KiB, log scale)")
    ax.set_ylabel(_axis_label(_first(points["metric_name"]), up))
    ax.margins(x=0.08, y=0.06)  # autoscaled: every point is inside the axes


def _legend_handles(palette: dict, controls: set, up: bool, tolerance_acc: float, tolerance_rmse_rel: float,
                    single: set = frozenset()) -> list:
    """The legend; a method in ``single`` is labelled as tried at one operating point (not a curve)."""
    handles = [Line2D([], [], color=c, marker="o", lw=0 if m in single else 1.5,
                      label=f"{m} (one operating point)" if m in single else m) for m, c in palette.items()]
    label = "control: dense_ft" if controls == {CONTROL} else f"control: {'/'.join(sorted(controls))}"
    handles += [Line2D([], [], color="black", marker="*", markersize=10, ls="--", lw=1, label=label + " (test)")]
    tol = f"−{tolerance_acc:g} pt" if up else f"+{tolerance_rmse_rel:.0%}"
    handles += [Line2D([], [], color="black", ls=":", lw=0.8, label=f"control {tol} (tolerance, drawn on test)")]
    if CONTROL in controls:
        handles += [Line2D([], [], color="grey", marker="D", markersize=6, ls="none", label="dense (no fine-tune)")]
    handles += [Line2D([], [], color="grey", marker="o", ls="none", label="within tolerance (validation)"),
                Line2D([], [], color="grey", marker="o", markerfacecolor="none", ls="none",
                       label="outside tolerance / undecided"),
                Line2D([], [], color="grey", lw=1.5, label="Pareto frontier of a method (≥ 2 points, validation)")]
    return handles


def plot_dataset(points: pd.DataFrame, dataset: str, path: Path, palette: dict, tolerance_acc: float = 1.0,
                 tolerance_rmse_rel: float = 0.05) -> Path:
    """One PNG for a dataset: a facet per (model, basis, budget), test metric against stored KiB; the
    facets share both axes, so bases compare at a glance."""
    groups = list(points.groupby(["model", "basis", "budget"], sort=True, dropna=False))
    multi_budget = points["budget"].nunique() > 1
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.2 * ncols + 2.6, 4.2 * nrows))  # no pyplot: Agg canvas, no global state
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    used, up = {}, bool(points["higher_better"].iloc[0])
    for ax, ((model, basis, budget), grp) in zip(axes.flat, groups):
        _draw_facet(ax, grp, palette, tolerance_acc, tolerance_rmse_rel)
        arch = _first(grp.loc[grp["method"].isin(REFERENCES), "arch"]) or _first(grp["arch"])
        title = f"{model} / {basis}" + (f"  {arch}" if arch else "") + (f"\n{budget}" if multi_budget else "")
        ax.set_title(title, fontsize=9 if multi_budget else 10)
        used.update({m: palette[m] for m in grp["method"] if m not in REFERENCES})
        ax.tick_params(labelleft=True, labelbottom=True)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: test metric vs stored size (mean ± std over seeds"
                 + ("" if up else "; a lower bar that would reach 0 stops at a tenth of the mean") + ")",
                 fontsize=11)
    handles = _legend_handles(dict(sorted(used.items())), set(points["control"]), up, tolerance_acc,
                              tolerance_rmse_rel, single_point_methods(points))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_speedup(points: pd.DataFrame, path: Path, palette: dict) -> Path | None:
    """Metric against theoretical speedup (dense MACs / remaining MACs), one panel per dataset."""
    pts = points.dropna(subset=["theoretical_speedup", "metric"])
    if pts.empty:
        return None
    datasets = sorted(pts["dataset"].unique())
    fig = Figure(figsize=(5.2 * len(datasets) + 1.8, 4.2))
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        grp = pts[pts["dataset"] == dataset]
        hue = {**palette, DENSE: (0.5, 0.5, 0.5), CONTROL: (0, 0, 0)}
        sns.scatterplot(data=grp, x="theoretical_speedup", y="metric", hue="method", style="basis", palette=hue,
                        s=50, ax=ax, legend=ax is axes[-1])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_ratio_formatter))
        ax.set_xlabel("theoretical speedup (dense MACs / remaining MACs, log)")
        up = bool(grp["higher_better"].iloc[0])
        if not up:
            ax.set_yscale("log")
        ax.set_ylabel(_axis_label(_first(grp["metric_name"]), up))
        ax.set_title(dataset, fontsize=10)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8)
    fig.suptitle("test metric vs theoretical speedup (each point: mean over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_resources(points: pd.DataFrame, path: Path) -> Path | None:
    """Training peak memory and trainable parameters by method and basis (median over a method's operating
    points), one row of panels per dataset: datasets of different sizes are never pooled."""
    cols = ["peak_memory_bytes", "params_trainable"]
    pts = points[~points["synthetic"].astype(bool)].dropna(subset=cols, how="all")
    if pts.empty:
        return None
    per = pts.groupby(["dataset", "method", "basis"], sort=True)[cols].median().reset_index()
    per["peak MiB"] = per["peak_memory_bytes"] / 2**20
    datasets = sorted(per["dataset"].unique())
    fig = Figure(figsize=(12, 3.8 * len(datasets)))
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(len(datasets), 2, squeeze=False)
    for i, (dataset, (ax1, ax2)) in enumerate(zip(datasets, axes)):
        sub = per[per["dataset"] == dataset]
        sns.barplot(data=sub, x="method", y="peak MiB", hue="basis", ax=ax1, legend=i == 0)
        sns.barplot(data=sub, x="method", y="params_trainable", hue="basis", ax=ax2, legend=False)
        ax1.set_title(f"{dataset}: peak training memory (median over points)", fontsize=10)
        ax2.set_title(f"{dataset}: trainable parameters in the main training (median)", fontsize=10)
        ax2.set_ylabel("trainable parameters")
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=30)
            ax.set_xlabel("")
    legend = axes[0][0].get_legend()
    if legend is not None:  # one legend above the panels, covering no bar
        handles, labels = axes[0][0].get_legend_handles_labels()
        legend.remove()
        fig.legend(handles, labels, title="basis", loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=len(labels), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def method_palette(methods) -> dict:
    """One colour per compressed method (not dense / dense_ft), stable across every figure of the report."""
    names = sorted(m for m in set(methods) if m not in REFERENCES)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))

