"""The leaderboard: ``LEADERBOARD.md`` and metric-vs-compression plots from a results frame.

One table per (dataset, model, basis) lists every operating point (method, method_config) as the
mean ± sample std over seeds, ranked: the points within tolerance of the dense control first, by
whole-model compression ratio, then the rest. A headline table gives each method's best ratio
within tolerance per dataset; failed and diverged runs are listed with their error. Each dataset
gets one PNG: metric against compression ratio (log x), one colour per method, error bars over
seeds, the dense control as a point at 1× and a reference line, and each method's Pareto frontier.

Only ``status == "ok"`` rows enter tables and plots. ``aggregate`` and ``pareto_front`` are public
so other code (notebooks, checks) can reuse the exact numbers the report shows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

GROUP = ["dataset", "model", "basis"]
POINT = GROUP + ["method", "method_config"]
LOWER_IS_BETTER = {"rmse", "mse", "mae", "loss", "nll"}
DENSE = "dense"
ERROR_CHARS = 200
DPI = 120

# Per-operating-point means (same names as the run columns, so pareto_front works on either frame).
_MEANS = ["metric", "dense_metric", "metric_delta", "compression_ratio", "coef_compression_ratio",
          "requested_ratio", "stored_bits", "file_bytes", "params_trainable", "theoretical_speedup",
          "train_seconds", "peak_memory_bytes"]
_STDS = ["metric", "metric_delta", "compression_ratio"]


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

def higher_is_better(metric_name) -> bool:
    """Accuracy-like metrics are maximised; error metrics (rmse, ...) are minimised."""
    return not (isinstance(metric_name, str) and metric_name.lower() in LOWER_IS_BETTER)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The successful runs, with a missing method_config read as ``{}`` (no hyperparameters)."""
    if df.empty or "status" not in df.columns:
        return df.iloc[0:0]
    ok = df[df["status"] == "ok"].copy()
    ok["method_config"] = ok["method_config"].fillna("{}")
    return ok


def method_defaults(method) -> dict:
    """The registered method's default hyperparameters ({} if it is not registered here)."""
    from .methods import METHODS

    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        return {}
    try:
        return cls().config_dict()
    except Exception:  # a method without defaults for every field: show its whole config
        return {}


def compact_config(config, method=None) -> str:
    """``'{"K": 16, "d": 1}'`` -> ``"K=16, d=1"``; empty for no hyperparameters. With ``method``
    given (and registered), only the values that differ from its defaults are shown, or
    ``default``."""
    if config is None or (isinstance(config, float) and math.isnan(config)):
        return ""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return config
    if not isinstance(config, dict):
        return json.dumps(config)
    defaults = method_defaults(method) if method is not None else {}
    shown = {k: v for k, v in config.items() if k not in defaults or defaults[k] != v}
    if config and defaults and not shown:
        return "default"
    return ", ".join(f"{k}={_config_value(v)}" for k, v in shown.items())


def _config_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _first(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else None


def _dense_controls(ok: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """A ``dense`` point built from ``dense_metric`` for each group that has no ``dense`` runs.

    Every row carries the metric of its uncompressed base model, so the control is always known;
    one value per seed (all methods of a seed share the base model).
    """
    have = set(map(tuple, points.loc[points["method"] == DENSE, GROUP].itertuples(index=False)))
    rows = ok[[tuple(k) not in have for k in ok[GROUP].itertuples(index=False)]]
    if rows.empty:
        return points.iloc[0:0]
    per_seed = rows.groupby(GROUP + ["seed"], dropna=False).agg(
        arch=("arch", _first), metric_name=("metric_name", _first), metric=("dense_metric", "mean"),
        stored_bits=("dense_bits", "mean")).reset_index()
    control = per_seed.groupby(GROUP, dropna=False).agg(
        arch=("arch", _first), metric_name=("metric_name", _first), n_seeds=("seed", "size"),
        metric=("metric", "mean"), metric_std=("metric", "std"), stored_bits=("stored_bits", "mean"),
    ).reset_index()
    control["method"], control["method_config"] = DENSE, "{}"
    control["dense_metric"], control["metric_delta"], control["metric_delta_std"] = control["metric"], 0.0, 0.0
    control["compression_ratio"], control["coef_compression_ratio"], control["compression_ratio_std"] = 1.0, 1.0, 0.0
    control["theoretical_speedup"], control["synthetic"] = 1.0, True
    return control


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per operating point (dataset, model, basis, method, method_config), ok runs only.

    Means keep the run-column names (``metric``, ``compression_ratio``, ...); ``<col>_std`` is the
    sample std over seeds (NaN for a single seed); ``n_seeds`` counts runs; ``config`` is the compact
    config text. Groups without ``dense`` runs get a dense control from ``dense_metric``
    (``synthetic`` True), so the control is always a row.
    """
    ok = ok_rows(df)
    if ok.empty:
        return pd.DataFrame(columns=POINT + ["config", "n_seeds", "metric_name", "arch", "synthetic"]
                            + _MEANS + [f"{c}_std" for c in _STDS])
    named = {c: (c, "mean") for c in _MEANS}
    named.update({f"{c}_std": (c, "std") for c in _STDS})
    points = ok.groupby(POINT, dropna=False, sort=True).agg(
        n_seeds=("seed", "size"), metric_name=("metric_name", _first), arch=("arch", _first), **named,
    ).reset_index()
    points["synthetic"] = False
    points = pd.concat([points, _dense_controls(ok, points)], ignore_index=True)
    points["config"] = [compact_config(c, m) for c, m in zip(points["method_config"], points["method"])]
    return points.sort_values(POINT, kind="stable").reset_index(drop=True)


def within_tolerance(points: pd.DataFrame, tolerance_acc: float = 1.0,
                     tolerance_rmse_rel: float = 0.05) -> pd.Series:
    """True where a point is within tolerance of its dense base model (over the same seeds).

    Higher-is-better metrics (accuracy, in points): mean metric_delta >= -tolerance_acc.
    Lower-is-better metrics (rmse): mean metric <= mean dense_metric * (1 + tolerance_rmse_rel).
    """
    hib = points["metric_name"].map(higher_is_better).astype(bool)
    acc_ok = points["metric_delta"] >= -tolerance_acc - 1e-12
    err_ok = points["metric"] <= points["dense_metric"] * (1 + tolerance_rmse_rel) + 1e-12
    return (hib & acc_ok) | (~hib & err_ok) | (points["method"] == DENSE)


def rank_points(points: pd.DataFrame) -> pd.DataFrame:
    """Within-tolerance points first, each block by compression ratio (descending), then metric."""
    hib = higher_is_better(_first(points["metric_name"]))
    return points.assign(_m=points["metric"] * (-1 if hib else 1)).sort_values(
        ["within_tol", "compression_ratio", "_m"], ascending=[False, False, True], kind="stable",
    ).drop(columns="_m")


def pareto_front(points_df: pd.DataFrame, higher_is_better: bool, x: str = "compression_ratio",
                 y: str = "metric") -> pd.DataFrame:
    """Points not dominated by another (ratio at least as high and metric at least as good, one strictly).

    Returns those rows (original index kept) sorted by ``x`` ascending; rows with NaN are ignored.
    Of exact duplicates one is kept.
    """
    pts = points_df.dropna(subset=[x, y])
    ordered = pts.sort_values([x, y], ascending=[False, not higher_is_better], kind="stable")
    keep, best = [], None
    for idx, value in ordered[y].items():
        if best is None or (value > best if higher_is_better else value < best):
            keep.append(idx)
            best = value
    return pts.loc[keep].sort_values(x, kind="stable")


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def _decimals(metric_name, reference) -> int:
    """2 decimals for accuracy; about 4 significant digits for error metrics."""
    if higher_is_better(metric_name) or not reference or not math.isfinite(reference):
        return 2
    return max(2, 3 - math.floor(math.log10(abs(reference))))


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_mean_std(mean, std, n, decimals: int) -> str:
    if _isnan(mean):
        return "—"
    if n <= 1 or _isnan(std):
        return f"{mean:.{decimals}f} (1 seed)"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def fmt_delta(delta, dense, metric_name, decimals: int) -> str:
    if _isnan(delta):
        return "—"
    text = f"{round(delta, decimals) + 0.0:+.{decimals}f}"  # + 0.0: no "-0.00"
    if not higher_is_better(metric_name) and dense and not _isnan(dense):
        text += f" ({delta / dense:+.1%})"
    return text


def fmt_ratio(r) -> str:
    if _isnan(r):
        return "—"
    if r < 10:
        return f"{r:.2f}×"
    return f"{r:.1f}×" if r < 1000 else f"{r:,.0f}×"


def fmt_kib(n_bytes) -> str:
    return "—" if _isnan(n_bytes) else f"{n_bytes / 1024:,.1f}"


def fmt_mib(n_bytes) -> str:
    return "—" if _isnan(n_bytes) else f"{n_bytes / 2**20:,.1f}"


def fmt_int(v) -> str:
    return "—" if _isnan(v) else f"{v:,.0f}"


def fmt_num(v, spec: str = ".2f") -> str:
    return "—" if _isnan(v) else format(v, spec)


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def point_table(points: pd.DataFrame, group_arch) -> pd.DataFrame:
    """The display table of one (dataset, model, basis) group, rows already ranked."""
    name = _first(points["metric_name"])
    dec = _decimals(name, _first(points["dense_metric"]))
    show_arch = points["arch"].dropna().nunique() > 1 or points["arch"].dropna().ne(group_arch).any()
    table = pd.DataFrame({
        "method": points["method"] + np.where(points["synthetic"].astype(bool), " (from dense_metric)", ""),
        "config": points["config"],
        **({"arch": points["arch"].fillna("—")} if show_arch else {}),
        "seeds": points["n_seeds"].map(fmt_int),
        f"{name} (mean ± std)": [fmt_mean_std(m, s, n, dec) for m, s, n in
                                 zip(points["metric"], points["metric_std"], points["n_seeds"])],
        "Δ vs dense": [fmt_delta(d, b, name, dec) for d, b in zip(points["metric_delta"], points["dense_metric"])],
        "within tol.": points["within_tol"].map({True: "✓", False: "✗"}),
        "ratio": points["compression_ratio"].map(fmt_ratio),
        "coef ratio": points["coef_compression_ratio"].map(fmt_ratio),
        "requested": points["requested_ratio"].map(fmt_ratio),
        "speedup": points["theoretical_speedup"].map(lambda v: fmt_num(v, ".2f") + ("×" if not _isnan(v) else "")),
        "stored KiB": (points["stored_bits"] / 8).map(fmt_kib),
        "file KiB": points["file_bytes"].map(fmt_kib),
        "params trainable": points["params_trainable"].map(fmt_int),
        "train s": points["train_seconds"].map(lambda v: fmt_num(v, ".1f")),
        "peak MiB": points["peak_memory_bytes"].map(fmt_mib),
    })
    return table


def headline_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and method: the highest whole-model ratio reached within tolerance, and its metric."""
    compressed = points[points["method"] != DENSE]
    best = (compressed[compressed["within_tol"]]
            .sort_values(["compression_ratio", "metric_delta"], ascending=False, kind="stable")
            .groupby(["dataset", "method"], sort=False).head(1))
    pairs = compressed[["dataset", "method"]].drop_duplicates()
    best = pairs.merge(best, on=["dataset", "method"], how="left").sort_values(["dataset", "method"])
    return pd.DataFrame([_headline_row(row) for row in best.to_dict("records")])


def _headline_row(best: dict) -> dict:
    row = {"dataset": best["dataset"], "method": best["method"]}
    if _isnan(best.get("compression_ratio")):
        return row | {"best ratio within tol.": "none", "config": "", "metric (mean ± std)": "", "dense": "",
                      "Δ vs dense": "", "model / basis": ""}
    name = best["metric_name"]
    dec = _decimals(name, best["dense_metric"])
    return row | {
        "best ratio within tol.": fmt_ratio(best["compression_ratio"]),
        "config": best["config"],
        "metric (mean ± std)": f"{name} " + fmt_mean_std(best["metric"], best["metric_std"], best["n_seeds"], dec),
        "dense": fmt_num(best["dense_metric"], f".{dec}f"),
        "Δ vs dense": fmt_delta(best["metric_delta"], best["dense_metric"], name, dec),
        "model / basis": f"{best['model']} / {best['basis']}",
    }


def best_by_tolerance(points: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and method, the best whole-model (and coefficient) ratio within 0.5 and 1 point
    of dense for accuracy, within 5 % RMSE for regression (the operating points ShrinkBench-style
    comparisons quote)."""
    rows = []
    compressed = points[points["method"] != DENSE]
    for (dataset, method), grp in compressed.groupby(["dataset", "method"], sort=True):
        hib = higher_is_better(_first(grp["metric_name"]))
        ladder = [("≤ 0.5 pt", 0.5, 0.05), ("≤ 1 pt", 1.0, 0.05)] if hib else [("≤ 5% RMSE", 1.0, 0.05)]
        row = {"dataset": dataset, "method": method}
        for label, tol_acc, tol_rel in ladder:
            ok = grp[within_tolerance(grp, tol_acc, tol_rel)]
            if ok.empty:
                row[label] = "none"
                continue
            best = ok.sort_values(["compression_ratio", "metric_delta"], ascending=False).iloc[0]
            row[label] = (f"{fmt_ratio(best['compression_ratio'])} (coef {fmt_ratio(best['coef_compression_ratio'])}; "
                          f"{best['basis']}, {best['config'] or 'default'})")
        rows.append(row)
    table = pd.DataFrame(rows)
    cols = ["dataset", "method"] + [c for c in ("≤ 0.5 pt", "≤ 1 pt", "≤ 5% RMSE") if c in table.columns]
    return table[cols].fillna("—") if not table.empty else table


# The papers' headline claims, compared with what these results measure on the closest setting.
PAPER_CLAIMS = [
    {"claim": "MetaCluster: up to 80× smaller coefficient storage with no accuracy loss",
     "source": "Raffel, Renjith, Chen, arXiv 2510.19105", "datasets": {"mnist", "cifar10", "cifar100"},
     "task": "classification", "method": "metacluster"},
    {"claim": "MetaCluster: 124.1× on equation-fitting tasks", "source": "arXiv 2510.19105",
     "datasets": None, "task": "regression", "method": "metacluster"},
    {"claim": "MetaKAN: far fewer trainable parameters than the KAN it generates", "source": "Zhao et al., ICML 2025",
     "datasets": None, "task": None, "method": "metakan"},
]


def _claim_measurement(points: pd.DataFrame, claim: dict) -> tuple[str, str]:
    pts = points
    if claim["task"] == "classification":
        pts = pts[pts["metric_name"].map(higher_is_better)]
    elif claim["task"] == "regression":
        pts = pts[~pts["metric_name"].map(higher_is_better).astype(bool)]
    if pts.empty:
        return "not measured (no such dataset in these results)", "—"
    here = ", ".join(sorted(pts["dataset"].unique()))
    same = claim["datasets"] is None or set(pts["dataset"]) & claim["datasets"]
    setting = f"{here}" + ("" if same else f" — differs from the paper's ({', '.join(sorted(claim['datasets']))})")
    if claim["method"] == "metakan":
        dense = pts[pts["method"] == DENSE].set_index(GROUP)["params_trainable"]
        meta = pts[pts["method"] == "metakan"].groupby(GROUP)["params_trainable"].min()
        both = pd.concat([dense.rename("dense"), meta.rename("meta")], axis=1).dropna()
        if both.empty:
            return "not measured (no metakan runs)", setting
        red = both["dense"] / both["meta"]
        best, worst = red.idxmax(), red.idxmin()
        return (f"dense / metakan trainable parameters: {red.min():.2g}× ({'/'.join(map(str, worst))}) to "
                f"{red.max():.2g}× ({'/'.join(map(str, best))}); above 1× means fewer"), setting
    tol_acc, tol_rel = (0.5, 0.05) if claim["task"] == "classification" else (1.0, 0.05)
    m = pts[pts["method"] == claim["method"]]
    if m.empty:
        return f"not measured (no {claim['method']} runs)", setting
    ok = m[within_tolerance(m, tol_acc, tol_rel)]
    cond = "Δ ≥ −0.5 pt" if claim["task"] == "classification" else "RMSE within 5 % of dense"
    if ok.empty:
        worst = m.sort_values("metric_delta", ascending=not higher_is_better(_first(m["metric_name"]))).iloc[0]
        return f"no operating point with {cond} (closest: Δ {worst['metric_delta']:+.3g})", setting
    best = ok.sort_values("coef_compression_ratio", ascending=False).iloc[0]
    coef, whole = fmt_ratio(best["coef_compression_ratio"]), fmt_ratio(best["compression_ratio"])
    return (f"{coef} coefficient ratio ({whole} whole model) with {cond}: {best['dataset']}/{best['basis']}, "
            f"{best['config'] or 'default'}, "
            f"Δ {best['metric_delta']:+.3g}"), setting


def paper_claims_section(points: pd.DataFrame) -> list[str]:
    rows = []
    for claim in PAPER_CLAIMS:
        measured, setting = _claim_measurement(points, claim)
        rows.append({"claim (paper)": f"{claim['claim']} ({claim['source']})", "measured here": measured,
                     "datasets here": setting})
    return ["## Compared with the papers' headline claims", "",
            ("The papers' numbers come from their own training budgets and architectures; where the datasets "
             "differ the row says so. Coefficient ratios are the papers' comparable figure."), "",
            markdown_table(pd.DataFrame(rows)), ""]


def run_label(row) -> str:
    cfg = compact_config(row.get("method_config")).replace(", ", ",")
    seed = row.get("seed")
    seed = "?" if _isnan(seed) else int(seed)
    return f"{row.get('dataset')}/{row.get('model')}/{row.get('basis')}/{row.get('method')}({cfg})/seed{seed}"


def truncate(text, n: int = ERROR_CHARS) -> str:
    text = "" if _isnan(text) else " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def failures_section(df: pd.DataFrame) -> list[str]:
    bad = df[df["status"].isin(["failed", "diverged"])] if "status" in df.columns else df.iloc[0:0]
    lines = ["## Failed and diverged runs", ""]
    if bad.empty:
        return lines + ["None.", ""]
    table = pd.DataFrame({
        "run": [run_label(r) for r in bad.to_dict("records")],
        "status": bad["status"].to_numpy(),
        "error": bad["error"].map(truncate).to_numpy(),
    })
    return lines + [markdown_table(table), ""]


def tolerance_words(tolerance_acc: float, tolerance_rmse_rel: float) -> str:
    points = "point" if tolerance_acc == 1 else "points"
    return (f"A point is **within tolerance** when its mean test accuracy is at most {tolerance_acc:g} "
            f"percentage {points} below its dense base model's (mean metric_delta ≥ −{tolerance_acc:g}), or, "
            f"for RMSE, when its mean test RMSE is at most {tolerance_rmse_rel:.0%} above the dense base "
            "model's mean RMSE over the same seeds.")


def header_section(df: pd.DataFrame, title: str, tolerance_acc: float, tolerance_rmse_rel: float,
                   header_lines: list[str] | None) -> list[str]:
    counts = df["status"].value_counts() if "status" in df.columns else pd.Series(dtype=int)
    runs = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("ok", "failed", "diverged"))
    lines = [f"# {title}", "", f"Runs: {len(df)} ({runs}).", "", tolerance_words(tolerance_acc, tolerance_rmse_rel), "",
             ("Metrics are mean ± sample std over seeds; Δ vs dense is the mean of the per-seed difference "
              "from the same seed's dense base model. Ratios are whole-model stored bits (dense float32 / "
              "compressed); coef ratio counts edge coefficients only."), ""]
    if header_lines:
        lines += [f"- {line}" for line in header_lines] + [""]
    return lines


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def safe_name(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unnamed"


def _ratio_formatter(v, _pos) -> str:
    return f"{v:g}×"


def _axis_label(metric_name) -> str:
    if metric_name == "accuracy":
        return "test accuracy (%)  ↑ better"
    arrow = "↑" if higher_is_better(metric_name) else "↓"
    return f"test {str(metric_name).upper() if metric_name == 'rmse' else metric_name}  {arrow} better"


def _draw_facet(ax, points: pd.DataFrame, palette: dict, tolerance_acc: float, tolerance_rmse_rel: float) -> None:
    name = _first(points["metric_name"])
    hib = higher_is_better(name)
    dense = points[points["method"] == DENSE]
    dense_y = dense["metric"].mean()
    others = points[points["method"] != DENSE]
    if math.isfinite(dense_y):
        ax.axhline(dense_y, color="black", lw=1, ls="--", zorder=1)
        tol_y = dense_y - tolerance_acc if hib else dense_y * (1 + tolerance_rmse_rel)
        ax.axhline(tol_y, color="grey", lw=0.8, ls=":", zorder=1)
    for method, grp in others.groupby("method", sort=True):
        colour = palette[method]
        ax.errorbar(grp["compression_ratio"], grp["metric"], yerr=grp["metric_std"].fillna(0), fmt="none",
                    ecolor=colour, elinewidth=1, capsize=3, alpha=0.8, zorder=2)
        front = pareto_front(pd.concat([grp, dense]), hib)
        ax.plot(front["compression_ratio"], front["metric"], color=colour, lw=1.5, alpha=0.9, zorder=2)
    if not others.empty:
        sns.scatterplot(data=others, x="compression_ratio", y="metric", hue="method", palette=palette, s=45,
                        edgecolor="white", linewidth=0.5, legend=False, zorder=3, ax=ax)
    if not dense.empty:
        ax.errorbar(dense["compression_ratio"], dense["metric"], yerr=dense["metric_std"].fillna(0), fmt="*",
                    color="black", markersize=12, capsize=3, zorder=4)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(_ratio_formatter))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compression ratio, whole model (log scale)")
    ax.set_ylabel(_axis_label(name))
    ax.set_xlim(0.8, max(points["compression_ratio"].max() * 1.5, 2.0))


def _legend_handles(palette: dict, tolerance_acc: float, tolerance_rmse_rel: float, metric_name) -> list:
    handles = [Line2D([], [], color=c, marker="o", lw=1.5, label=m) for m, c in palette.items()]
    tol = f"−{tolerance_acc:g} pt" if higher_is_better(metric_name) else f"+{tolerance_rmse_rel:.0%}"
    handles += [Line2D([], [], color="black", marker="*", markersize=10, ls="--", lw=1, label="dense (1×)"),
                Line2D([], [], color="grey", ls=":", lw=0.8, label=f"tolerance ({tol})")]
    return handles


def plot_dataset(points: pd.DataFrame, dataset: str, path: Path, palette: dict,
                 tolerance_acc: float, tolerance_rmse_rel: float) -> Path:
    """One PNG for a dataset: a facet per (model, basis), metric against compression ratio."""
    groups = list(points.groupby(["model", "basis"], sort=True, dropna=False))
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.2 * ncols + 1.8, 4.2 * nrows))  # no pyplot: Agg canvas, no global state
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(nrows, ncols, squeeze=False)
    used = {}
    for ax, ((model, basis), grp) in zip(axes.flat, groups):
        _draw_facet(ax, grp, palette, tolerance_acc, tolerance_rmse_rel)
        arch = _first(grp.loc[grp["method"] == DENSE, "arch"]) or _first(grp["arch"])
        ax.set_title(f"{model} / {basis}" + (f"  {arch}" if arch else ""), fontsize=10)
        used.update({m: palette[m] for m in grp["method"] if m != DENSE})
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: test metric vs compression (mean ± std over seeds; lines = Pareto frontiers)",
                 fontsize=11)
    handles = _legend_handles(dict(sorted(used.items())), tolerance_acc, tolerance_rmse_rel,
                              _first(points["metric_name"]))
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
        hue = {**palette, DENSE: (0, 0, 0)}
        sns.scatterplot(data=grp, x="theoretical_speedup", y="metric", hue="method", style="basis", palette=hue,
                        s=50, ax=ax, legend=ax is axes[-1])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_ratio_formatter))
        ax.set_xlabel("theoretical speedup (dense MACs / remaining MACs, log)")
        ax.set_ylabel(_axis_label(_first(grp["metric_name"])))
        ax.set_title(dataset, fontsize=10)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8)
    fig.suptitle("test metric vs theoretical speedup (each point: mean over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_resources(points: pd.DataFrame, path: Path) -> Path | None:
    """Training peak memory and trainable parameters by method (median over operating points)."""
    cols = ["peak_memory_bytes", "params_trainable"]
    pts = points[~points["synthetic"].astype(bool)].dropna(subset=cols, how="all")
    if pts.empty:
        return None
    per = pts.groupby(["method", "basis"], sort=True)[cols].median().reset_index()
    per["peak MiB"] = per["peak_memory_bytes"] / 2**20
    fig = Figure(figsize=(12, 4.2))
    with sns.axes_style("whitegrid"):
        ax1, ax2 = fig.subplots(1, 2)
    sns.barplot(data=per, x="method", y="peak MiB", hue="basis", ax=ax1)
    sns.barplot(data=per, x="method", y="params_trainable", hue="basis", ax=ax2, legend=False)
    ax1.set_title("peak training memory (median over points)", fontsize=10)
    ax2.set_title("trainable parameters in the main training (median)", fontsize=10)
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        ax.set_xlabel("")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def method_palette(methods) -> dict:
    """One colour per (non-dense) method, stable across every figure of the report."""
    names = sorted(m for m in set(methods) if m != DENSE)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


# ----------------------------------------------------------------------------------------------
# Transfer benchmark (LoTRA): target RMSE vs per-task stored bits
# ----------------------------------------------------------------------------------------------

TRANSFER_PLOT = "transfer_rmse_vs_bits.png"
TRANSFER_MODES = ("zero_shot", "full", "lotra")
_TRANSFER_MODE_LABEL = {"zero_shot": "zero-shot", "full": "full fine-tune", "lotra": "LoTRA"}
_TRANSFER_SETUP = ["pretrain_epochs", "finetune_epochs", "lr_rule", "lr", "batch_size", "n_train", "hidden", "basis"]


def _transfer_setup(df: pd.DataFrame) -> list[str]:
    return [c for c in _TRANSFER_SETUP if c in df.columns]


def transfer_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, budget, mode, ranks) of the ``ok`` transfer rows: ``n_seeds``, mean
    per-task ``stored_bits``, mean and sample std of ``test_rmse`` and of ``rel_full`` (each seed's
    RMSE over the same seed's full fine-tune RMSE). Targets keep their order of appearance; within a
    target, rows are sorted by stored bits."""
    cols = ["target", "a", "b", "mode", "ranks", "layer_ranks", "n_seeds", "stored_bits", "test_rmse",
            "test_rmse_std", "rel_full", "rel_full_std", "val_rmse", "source_val_rmse"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    ok = df[df["status"].fillna("ok") == "ok"].copy() if "status" in df.columns else df.copy()
    if ok.empty:
        return pd.DataFrame(columns=cols)
    for c in ["ranks", "layer_ranks", *_transfer_setup(ok)]:
        ok[c] = ok[c].fillna("").astype(str) if c in ok.columns else ""
    for c in ("source_val_rmse", "val_rmse"):
        if c not in ok.columns:
            ok[c] = np.nan
    series = ["target", *_transfer_setup(ok)]
    full = ok[ok["mode"] == "full"].groupby(series + ["seed"])["test_rmse"].mean().rename("_full")
    ok = ok.join(full, on=series + ["seed"])
    ok["rel_full"] = ok["test_rmse"] / ok["_full"]
    pts = ok.groupby(series + ["mode", "ranks"], sort=False).agg(
        a=("a", "first"), b=("b", "first"), layer_ranks=("layer_ranks", "first"), n_seeds=("seed", "size"),
        stored_bits=("stored_bits", "mean"), test_rmse=("test_rmse", "mean"), test_rmse_std=("test_rmse", "std"),
        rel_full=("rel_full", "mean"), rel_full_std=("rel_full", "std"), val_rmse=("val_rmse", "mean"),
        source_val_rmse=("source_val_rmse", "mean"),
    ).reset_index()
    order = {t: i for i, t in enumerate(dict.fromkeys(ok["target"]))}
    pts["_t"] = pts["target"].map(order)
    pts["_m"] = pts["mode"].map({m: i for i, m in enumerate(TRANSFER_MODES)}).fillna(len(TRANSFER_MODES))
    return pts.sort_values(["_t", *series[1:], "stored_bits", "_m"], kind="stable").drop(
        columns=["_t", "_m"]).reset_index(drop=True)


def _budget_label(row, setup: list[str]) -> str:
    parts = []
    if "pretrain_epochs" in setup:
        parts.append(f"pre-train {row['pretrain_epochs']} ep")
    if "finetune_epochs" in setup:
        parts.append(f"adapt {row['finetune_epochs']} ep")
    parts += [f"{c}={row[c]}" for c in setup if c not in ("pretrain_epochs", "finetune_epochs")]
    return ", ".join(parts)


def transfer_table(points: pd.DataFrame, show_budget: bool = False) -> pd.DataFrame:
    """The display table of one target (rows already sorted by stored bits)."""
    setup = _transfer_setup(points)
    table = pd.DataFrame({
        "mode": points["mode"].map(lambda m: _TRANSFER_MODE_LABEL.get(m, m)),
        "ranks": points["ranks"].replace("", "—"),
        "layer ranks": points["layer_ranks"].replace("", "—"),
        "seeds": points["n_seeds"].map(fmt_int),
        "stored bits / task": points["stored_bits"].map(fmt_int),
        "KiB / task": (points["stored_bits"] / 8 / 1024).map(lambda v: fmt_num(v, ".3f")),
        "test RMSE (mean ± std)": [fmt_mean_std(m, s, n, _decimals("rmse", m)) for m, s, n in
                                   zip(points["test_rmse"], points["test_rmse_std"], points["n_seeds"])],
        "RMSE vs full FT": [("—" if _isnan(m) else f"{m:.2f}×" + ("" if n <= 1 or _isnan(s) else f" ± {s:.2f}"))
                            for m, s, n in zip(points["rel_full"], points["rel_full_std"], points["n_seeds"])],
    })
    if show_budget:
        table["budget"] = [_budget_label(r, setup) for r in points.to_dict("records")]
    return table


def plot_transfer(points: pd.DataFrame, path: Path) -> Path | None:
    """Target test RMSE against per-task stored bits (log-log): one colour per target, LoTRA ranks as
    points joined by a line, full fine-tuning as a star, zero-shot (nothing stored) as a dotted line."""
    if points.empty:
        return None
    setup = _transfer_setup(points)
    series = list(points.groupby(["target", *setup], sort=False))
    multi = points[setup].drop_duplicates().shape[0] > 1 if setup else False
    fig = Figure(figsize=(8.5, 5.2))
    with sns.axes_style("whitegrid"):
        ax = fig.subplots()
    colours = sns.color_palette("tab10" if len(series) <= 10 else "husl", len(series))
    handles = []
    for colour, (key, grp) in zip(colours, series):
        key = key if isinstance(key, tuple) else (key,)
        label = f"target {key[0]}" + (f" ({_budget_label(grp.iloc[0], setup)})" if multi else "")
        handles.append(Line2D([], [], color=colour, lw=2, label=label))
        lot = grp[grp["mode"] == "lotra"].sort_values("stored_bits")
        if not lot.empty:
            ax.errorbar(lot["stored_bits"], lot["test_rmse"], yerr=lot["test_rmse_std"].fillna(0), fmt="o-",
                        color=colour, capsize=3, lw=1.5, markersize=6, zorder=3)
            for x, y, r in zip(lot["stored_bits"], lot["test_rmse"], lot["ranks"]):
                ax.annotate(r, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        full = grp[grp["mode"] == "full"]
        if not full.empty:
            ax.errorbar(full["stored_bits"], full["test_rmse"], yerr=full["test_rmse_std"].fillna(0), fmt="*",
                        color=colour, markersize=14, markeredgecolor="black", capsize=3, zorder=4)
        for y in grp.loc[grp["mode"] == "zero_shot", "test_rmse"]:
            ax.axhline(y, color=colour, ls=":", lw=1.3, zorder=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}") if hi < 10 * lo else NullFormatter())
    ax.set_xlabel("stored bits per task (log scale)")
    ax.set_ylabel("target test RMSE  ↓ better (log scale)")
    handles += [Line2D([], [], color="grey", marker="o", lw=1.5, label="LoTRA (one point per rank)"),
                Line2D([], [], color="grey", marker="*", markersize=12, markeredgecolor="black", ls="none",
                       label="full fine-tune"),
                Line2D([], [], color="grey", ls=":", lw=1.3, label="zero-shot (nothing stored)")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    ax.set_title("LoTRA transfer: target RMSE vs per-task stored bits (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def transfer_section(df: pd.DataFrame, out_dir: str | Path | None = None) -> list[str]:
    """Markdown lines of the transfer benchmark: per target, a table of mode / ranks / per-task
    stored bits / test RMSE / RMSE relative to full fine-tuning, sorted by stored bits. With
    ``out_dir`` given, also writes ``transfer_rmse_vs_bits.png`` there and links it."""
    lines = ["## LoTRA transfer: target RMSE vs per-task stored bits", ""]
    pts = transfer_points(df)
    src = ""
    if {"source_a", "source_b"} <= set(df.columns) and not df.empty:
        src = f" (a={_first(df['source_a']):g}, b={_first(df['source_b']):g})"
    sv = pts.drop_duplicates(subset=["target"])["source_val_rmse"] if not pts.empty else pd.Series(dtype=float)
    lines += [(f"Per seed, a dense KAN is pre-trained on the source task{src} of exp(sin(a·π·x1) + b·x2²); each "
               "target changes the constants. Every adaptation gets the same epochs and selects its epoch on the "
               "target's validation split. **Stored bits / task** is what a task adds to the shared pre-trained "
               "model: nothing for zero-shot, every trained tensor (float32) for full fine-tuning, the Tucker "
               "update's core and factors (float32) for LoTRA. Test RMSE is mean ± sample std over seeds; "
               "**RMSE vs full FT** is the mean over seeds of the ratio to the same seed's full fine-tune "
               "(below 1× is better)." + (f" Source pre-training validation RMSE: {sv.mean():.4g}."
                                          if len(sv) and not _isnan(sv.mean()) else "")), ""]
    if pts.empty:
        lines += ["**No successful transfer rows.**", ""]
    else:
        setup = _transfer_setup(pts)
        multi = pts[setup].drop_duplicates().shape[0] > 1 if setup else False
        if out_dir is not None and plot_transfer(pts, Path(out_dir) / TRANSFER_PLOT):
            lines += [f"![transfer: target RMSE vs per-task stored bits]({TRANSFER_PLOT})", ""]
        for target, grp in pts.groupby("target", sort=False):
            a, b = grp["a"].iloc[0], grp["b"].iloc[0]
            lines += [f"### target {target} (a={a:g}, b={b:g})", "", markdown_table(transfer_table(grp, multi)), ""]
    bad = df[df["status"].fillna("ok") != "ok"] if "status" in df.columns else df.iloc[0:0]
    if not bad.empty:
        table = pd.DataFrame({"seed": bad["seed"].map(fmt_int).to_numpy(), "target": bad["target"].to_numpy(),
                              "mode": bad["mode"].to_numpy(), "ranks": bad["ranks"].fillna("").to_numpy(),
                              "status": bad["status"].to_numpy(), "error": bad["error"].map(truncate).to_numpy()})
        lines += ["### Transfer rows that did not finish", "", markdown_table(table), ""]
    return lines


def write_transfer_report(df: pd.DataFrame, out_dir: Path, title: str | None = None,
                          header_lines: list[str] | None = None) -> Path:
    """``LEADERBOARD.md`` (and ``index.html``) of a folder that holds only transfer results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = df["status"].value_counts() if "status" in df.columns else pd.Series(dtype=int)
    title = title or "LoTRA transfer benchmark"
    lines = [f"# {title}", "", f"Transfer rows: {len(df)} ({int(counts.get('ok', 0))} ok, "
             f"{len(df) - int(counts.get('ok', 0))} not ok).", ""]
    if header_lines:
        lines += [f"- {line}" for line in header_lines] + [""]
    lines += transfer_section(df, out_dir)
    path = out_dir / "LEADERBOARD.md"
    path.write_text("\n".join(lines))
    from .report_html import write_html

    write_html(path, out_dir / "index.html", title=title)
    return path


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def dataset_section(points: pd.DataFrame, dataset: str, plot_file: str | None) -> list[str]:
    name = _first(points["metric_name"])
    lines = [f"## {dataset} ({name})", ""]
    if plot_file:
        lines += [f"![{dataset}: {name} vs compression ratio]({plot_file})", ""]
    for (model, basis), grp in points.groupby(["model", "basis"], sort=True, dropna=False):
        arch = _first(grp.loc[grp["method"] == DENSE, "arch"]) or _first(grp["arch"])
        lines += [f"### {dataset} / {model} / {basis}" + (f" — `{arch}`" if arch else ""), ""]
        lines += [markdown_table(point_table(rank_points(grp), arch)), ""]
    return lines


def write_report(df: pd.DataFrame, out_dir: Path, title: str | None = None, tolerance_acc: float = 1.0,
                 tolerance_rmse_rel: float = 0.05, header_lines: list[str] | None = None,
                 transfer: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/LEADERBOARD.md`` and one ``metric_vs_ratio_<dataset>.png`` per dataset (and,
    given ``transfer`` rows, the transfer section with its plot)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = header_section(df, title or "KAN compression leaderboard", tolerance_acc, tolerance_rmse_rel,
                           header_lines)
    points = aggregate(df)
    if points.empty:
        lines += ["**No successful runs** — nothing to rank or plot.", ""]
    else:
        points["within_tol"] = within_tolerance(points, tolerance_acc, tolerance_rmse_rel)
        lines += ["## Headline: best compression within tolerance", ""]
        headline = headline_table(points)
        lines += [markdown_table(headline) if not headline.empty else "Only dense runs succeeded.", ""]
        ladder = best_by_tolerance(points)
        if not ladder.empty:
            lines += ["## Best whole-model ratio by accuracy budget", "",
                      "Accuracy within 0.5 or 1 point of dense; equation tasks within 5 % RMSE.", "",
                      markdown_table(ladder), ""]
        lines += paper_claims_section(points)
        palette = method_palette(points["method"])
        if plot_speedup(points, out_dir / "metric_vs_speedup.png", palette):
            lines += ["## Accuracy vs theoretical speedup", "", "![metric vs speedup](metric_vs_speedup.png)", ""]
        if plot_resources(points, out_dir / "training_resources.png"):
            lines += ["## Training memory and trainable parameters", "",
                      "![training resources](training_resources.png)", ""]
        used_names: set[str] = set()
        for dataset, grp in points.groupby("dataset", sort=True):
            plot_file = _unique(f"metric_vs_ratio_{safe_name(dataset)}", used_names) + ".png"
            plot_dataset(grp, str(dataset), out_dir / plot_file, palette, tolerance_acc, tolerance_rmse_rel)
            lines += dataset_section(grp, str(dataset), plot_file)
    if transfer is not None:
        lines += transfer_section(transfer, out_dir)
    lines += failures_section(df)
    path = out_dir / "LEADERBOARD.md"
    path.write_text("\n".join(lines))
    from .report_html import write_html

    write_html(path, out_dir / "index.html", title=title or "KAN compression leaderboard")
    return path


def _unique(stem: str, used: set[str]) -> str:
    name, i = stem, 2
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name
