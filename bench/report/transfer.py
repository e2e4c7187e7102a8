"""The LoTRA transfer benchmark's section: target RMSE vs per-task stored bits (table and plot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from .numbers import _first, _isnan
from .plots import DPI
from .tables import _decimals, fmt_int, fmt_mean_std, fmt_num, markdown_table, truncate

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
        "test RMSE (mean ± std)": [fmt_mean_std(m, s, n, _decimals("rmse", m, False)) for m, s, n in
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
    from .html import write_html

    write_html(path, out_dir / "index.html", title=title)
    return path

