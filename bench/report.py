"""The leaderboard: ``LEADERBOARD.md`` and metric-vs-compression plots from a results frame.

**Every decision reads validation; the test metric is only reported.** Each run scores its final
model on the test split once (``metric``). Which operating points are within tolerance, which point
and which basis a method is credited with, the order inside a table and the Pareto frontiers are all
decided on ``val_metric`` against the control's validation metric; the test metric (mean ± std over
seeds) is then shown for what was chosen, never used to choose.

**The control is** ``dense_ft``: the dense base model fine-tuned with exactly the fine-tune budget
every compressed method gets, so no method is credited with what the fine-tune alone does. Every row
carries ``control_metric`` / ``control_val_metric`` (that model's test / validation metric, same
dataset, model, basis, seed and budget); a group without ``dense_ft`` runs gets a synthetic control
row built from those columns. Rows from older runners without them fall back to the plain ``dense``
model as the control (``dense_metric``; the ``dense`` runs' ``val_metric``). Where no validation
metric exists nothing is decided: no point is within tolerance, and the report says so.

A point (mean over its seeds) is **within tolerance** when

* accuracy (percentage points): ``mean(val_metric - control_val_metric) >= -tolerance_acc``;
* rmse (relative): ``mean(val_metric) <= mean(control_val_metric) * (1 + tolerance_rmse_rel)``.

A **group** is (dataset, model, basis, training budget); the budget is whichever of ``epochs``,
``lr``, ``batch_size``, ``finetune_epochs``, ``finetune_lr_scale``, ``schedule``, ``patience``,
``weight_decay``, ``threads`` and the ``*_options`` JSON columns the
rows carry (its text is the ``budget`` column), so different base models are never mixed and seeds are
averaged only when everything but the seed is equal. One table per group lists the control first, then
every operating point (method, method_config): those within tolerance by whole-model compression
ratio, then the rest, ties broken on validation; ``dense`` is a plain row. The headline gives, per
dataset, model and budget, each method's highest ratio above 1× within tolerance, at the basis where
it is highest, beside that basis's own control. A point whose fine-tune kept epoch 0 (the fine-tune
changed nothing) carries a note. Failed and diverged runs are listed with their error; ``infeasible``
settings (cannot be met on the model) have their own table and are not failures.

Each dataset gets one PNG: test metric against compression ratio (log x), one colour per method
(filled: within tolerance on validation; hollow: outside), error bars over seeds, the control as a
star at 1× with a reference line, ``dense`` as a grey diamond, and each method's Pareto frontier
(chosen on validation, drawn at the test metric).

Only ``status == "ok"`` rows enter tables and plots. ``aggregate``, ``within_tolerance`` and
``pareto_front`` are public so other code (notebooks, checks) can reuse the exact numbers and
decisions the report shows.
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

from .metrics import higher_is_better

GROUP = ["dataset", "model", "basis", "budget"]
POINT = GROUP + ["method", "method_config"]
# The training budget that defines a base model (whichever of these the rows carry).
BUDGET = ["epochs", "lr", "batch_size", "finetune_epochs", "finetune_lr_scale", "schedule", "patience",
          "weight_decay", "threads", "dataset_options", "model_options", "basis_options"]
_BUDGET_NAMES = {"epochs": "epochs", "lr": "lr", "batch_size": "batch", "finetune_epochs": "ft epochs",
                 "finetune_lr_scale": "ft lr scale", "schedule": "schedule", "patience": "patience",
                 "weight_decay": "wd", "threads": "threads", "dataset_options": "data", "model_options": "model",
                 "basis_options": "basis"}
DENSE = "dense"
CONTROL = "dense_ft"
REFERENCES = (DENSE, CONTROL)
ERROR_CHARS = 200
DPI = 120

# Per-operating-point means (same names as the run columns, so pareto_front works on either frame).
_MEANS = ["metric", "val_metric", "control_metric", "control_val_metric", "metric_delta", "val_delta",
          "dense_metric", "dense_val_metric", "dense_delta", "compression_ratio", "coef_compression_ratio",
          "file_compression_ratio", "requested_ratio", "stored_bits", "file_bytes", "header_bytes",
          "params_trainable", "theoretical_speedup", "train_seconds", "peak_memory_bytes", "best_epoch",
          "epochs_run", "finetune_best_epoch"]
_STDS = ["metric", "val_metric", "control_metric", "metric_delta", "val_delta", "compression_ratio"]
_ROW_NUMBERS = list(dict.fromkeys(_MEANS + ["dense_bits", "seed"]))
_VAL_COLUMNS = ["val_metric", "val_metric_std", "control_val_metric", "val_delta", "val_delta_std"]


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

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
    if _isnan(config):
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


def _isnan(v) -> bool:
    """True for None, NaN and pandas' missing values (never for text or containers)."""
    if v is None:
        return True
    if isinstance(v, (str, bytes, dict, list, tuple)):
        return False
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _first(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else None


def _nan(v) -> float:
    return np.nan if _isnan(v) else v


def budget_columns(df: pd.DataFrame) -> list[str]:
    """The training-budget columns these rows carry (in ``BUDGET`` order)."""
    return [c for c in BUDGET if c in df.columns and df[c].notna().any()]


def _budget_value(v) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(x)) if x.is_integer() else repr(x)


def _options_text(v) -> str:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return v
    return compact_config(dict(sorted(v.items())) if isinstance(v, dict) else v)


def budget_labels(df: pd.DataFrame) -> pd.Series:
    """One text per row naming its training budget (``"epochs=20, lr=0.001, ft epochs=5"``); equal
    text means an equal budget, so it is the group key. Empty where the rows carry no budget."""
    cols = budget_columns(df)
    labels = []
    for rec in df[cols].to_dict("records") if cols else [{}] * len(df):
        parts = []
        for c in cols:
            v = rec[c]
            if _isnan(v):
                continue
            if c.endswith("_options"):
                text = _options_text(v)
                if text:
                    parts.append(f"{_BUDGET_NAMES[c]}({text})")
            else:
                parts.append(f"{_BUDGET_NAMES[c]}={_budget_value(v)}")
        labels.append(", ".join(parts))
    return pd.Series(labels, index=df.index, dtype=object)


def _info_number(info, key: str) -> float:
    if not isinstance(info, str):
        return np.nan
    try:
        d = json.loads(info)
        return float(d[key]) if isinstance(d, dict) and d.get(key) is not None else np.nan
    except (json.JSONDecodeError, TypeError, ValueError):
        return np.nan


def _synthetic_rows(grp: pd.DataFrame, method: str, test_col: str, val_col: str) -> list[dict]:
    """Per seed, a run row of ``method`` (``dense`` or ``dense_ft``) built from the metrics every run
    of the group carries (``dense_metric`` / ``control_metric`` and their validation twins)."""
    out = []
    for seed, s in grp.groupby("seed", sort=True, dropna=False):
        metric = _first(s[test_col])
        if metric is None:
            continue
        bits = _nan(_first(s["dense_bits"]))
        row = {c: s[c].iloc[0] for c in GROUP + budget_columns(s)}
        row.update(seed=seed, method=method, method_config="{}", status="ok", synthetic=True,
                   metric_name=_first(s["metric_name"]), arch=None, metric=metric, val_metric=_nan(_first(s[val_col])),
                   stored_bits=bits, dense_bits=bits, compression_ratio=1.0, coef_compression_ratio=1.0,
                   file_compression_ratio=1.0, theoretical_speedup=1.0)
        row.update({c: _nan(_first(s[c])) for c in ("control_metric", "control_val_metric", "dense_metric",
                                                     "dense_val_metric")})
        out.append(row)
    return out


def run_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` runs ready to aggregate, one row per run.

    Adds ``budget`` (the group's training budget as text), ``control`` (``dense_ft`` where the group
    has dense_ft runs or ``control_metric`` values, else ``dense``), ``synthetic`` (control and dense
    rows built per seed from the columns every run carries, for groups without such runs), and per run:
    ``control_metric`` / ``control_val_metric`` (the control's test / validation metric, same seed),
    ``metric_delta`` (test, vs control), ``val_delta`` (validation, vs control) and ``dense_delta``
    (test, vs the plain dense base). ``finetune_best_epoch`` missing as a column is read from ``info``.
    """
    ok = ok_rows(df)
    if ok.empty:
        return ok
    ok = ok.copy()
    for c in _ROW_NUMBERS + ["control_metric", "control_val_metric", "dense_val_metric"]:
        ok[c] = pd.to_numeric(ok[c], errors="coerce").astype("float64") if c in ok.columns else np.nan
    for c in ("arch", "metric_name"):
        if c not in ok.columns:
            ok[c] = None
    if "info" in ok.columns:
        ok["finetune_best_epoch"] = ok["finetune_best_epoch"].fillna(
            ok["info"].map(lambda s: _info_number(s, "finetune_best_epoch")).astype("float64"))
    for c in ("dataset", "model", "basis"):
        ok[c] = ok[c].astype(object).where(ok[c].notna(), "").astype(str) if c in ok.columns else ""
    ok["budget"] = budget_labels(ok)
    ok["synthetic"] = False
    control, synth = {}, []
    for key, grp in ok.groupby(GROUP, sort=False):
        methods = set(grp["method"])
        has_control = CONTROL in methods or grp[["control_metric", "control_val_metric"]].notna().any().any()
        control[key] = CONTROL if has_control else DENSE
        if DENSE not in methods:
            synth += _synthetic_rows(grp, DENSE, "dense_metric", "dense_val_metric")
        if has_control and CONTROL not in methods:
            synth += _synthetic_rows(grp, CONTROL, "control_metric", "control_val_metric")
    rows = ok.reset_index(drop=True)
    if synth:
        extra = pd.DataFrame(synth)
        rows = pd.concat([rows, extra.astype({c: rows[c].dtype for c in extra.columns
                                               if c in _ROW_NUMBERS and c in rows.columns})], ignore_index=True)
    rows["synthetic"] = rows["synthetic"].fillna(False).astype(bool)
    rows["control"] = [control[k] for k in rows[GROUP].itertuples(index=False, name=None)]

    # The control's own runs, per seed and (where a seed lacks one) per group, fill what rows lack.
    ref = rows[rows["method"] == rows["control"]]
    per_seed = ref.groupby(GROUP + ["seed"], dropna=False)[["metric", "val_metric"]].mean().add_prefix("_s_")
    per_group = ref.groupby(GROUP)[["metric", "val_metric"]].mean().add_prefix("_g_")
    rows = rows.merge(per_seed.reset_index(), on=GROUP + ["seed"], how="left").merge(
        per_group.reset_index(), on=GROUP, how="left")
    dense_control = rows["control"] == DENSE
    test = rows["dense_metric"].where(dense_control, rows["control_metric"])
    val = rows["dense_val_metric"].where(dense_control, rows["control_val_metric"])
    rows["control_metric"] = test.fillna(rows["_s_metric"]).fillna(rows["_g_metric"])
    rows["control_val_metric"] = val.fillna(rows["_s_val_metric"]).fillna(rows["_g_val_metric"])
    rows["metric_delta"] = rows["metric"] - rows["control_metric"]
    rows["val_delta"] = rows["val_metric"] - rows["control_val_metric"]
    rows["dense_delta"] = rows["metric"] - rows["dense_metric"]
    return rows.drop(columns=[c for c in rows.columns if c.startswith(("_s_", "_g_"))])


def _count_zero(values: pd.Series) -> int:
    return int((values == 0).sum())


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per operating point (dataset, model, basis, budget, method, method_config), ok runs only.

    Means keep the run-column names (``metric``, ``val_metric``, ``compression_ratio``, ...);
    ``<col>_std`` is the sample std over seeds (NaN for a single seed); ``n_seeds`` counts runs;
    ``config`` is the compact config text; ``control`` names the group's control (``dense_ft``, or
    ``dense`` for old rows). ``metric_delta`` / ``val_delta`` are the means of the per-seed test /
    validation differences from the control; ``control_metric`` / ``control_val_metric`` the control's
    means over the same seeds. The validation columns are NaN unless every seed has them (a point is
    then undecided). ``ft_kept0`` counts seeds whose fine-tune kept epoch 0, of ``ft_seeds`` seeds with
    a fine-tune. Groups without control or dense runs get rows built from the run columns
    (``synthetic`` True), so the control is always a row.
    """
    rows = run_rows(df)
    if rows.empty:
        return pd.DataFrame(columns=POINT + ["config", "n_seeds", "metric_name", "arch", "control", "synthetic",
                                             "ft_kept0", "ft_seeds"] + _MEANS + [f"{c}_std" for c in _STDS])
    named = {c: (c, "mean") for c in _MEANS}
    named.update({f"{c}_std": (c, "std") for c in _STDS})
    points = rows.groupby(POINT, dropna=False, sort=True).agg(
        n_seeds=("seed", "size"), metric_name=("metric_name", _first), arch=("arch", _first),
        control=("control", "first"), synthetic=("synthetic", "all"),
        ft_kept0=("finetune_best_epoch", _count_zero), ft_seeds=("finetune_best_epoch", "count"),
        val_seeds=("val_delta", "count"), **named,
    ).reset_index()
    points.loc[points["val_seeds"] < points["n_seeds"], _VAL_COLUMNS] = np.nan  # undecided, not half-decided
    points["config"] = [compact_config(c, m) for c, m in zip(points["method_config"], points["method"])]
    return points.drop(columns="val_seeds").sort_values(POINT, kind="stable").reset_index(drop=True)


def _val_delta(points: pd.DataFrame) -> pd.Series:
    if "val_delta" in points.columns:
        return points["val_delta"]
    return points["val_metric"] - points["control_val_metric"]


def within_tolerance(points: pd.DataFrame, tolerance_acc: float = 1.0,
                     tolerance_rmse_rel: float = 0.05) -> pd.Series:
    """True where a point is within tolerance of its control **on validation** (over the same seeds).

    Higher-is-better metrics (accuracy, in points): mean val_delta (val_metric - control_val_metric)
    >= -tolerance_acc. Lower-is-better metrics (rmse): mean val_metric <= mean control_val_metric *
    (1 + tolerance_rmse_rel). The test metric is never read. A point without a validation metric (or
    whose control has none) is False: nothing is decided without validation.
    """
    if points.empty:
        return pd.Series(False, index=points.index, dtype=bool)
    hib = points["metric_name"].map(higher_is_better).astype(bool)
    delta = _val_delta(points)
    acc_ok = delta >= -tolerance_acc - 1e-12
    err_ok = points["val_metric"] <= points["control_val_metric"] * (1 + tolerance_rmse_rel) + 1e-12
    decided = delta.notna()
    return (decided & ((hib & acc_ok) | (~hib & err_ok))).fillna(False).astype(bool)


def val_score(points: pd.DataFrame) -> pd.Series:
    """Higher is better, comparable across bases: validation Δ vs control for accuracy, minus the
    validation RMSE relative to the control's for error metrics (NaN where undecided)."""
    hib = points["metric_name"].map(higher_is_better).astype(bool)
    rel = -(points["val_metric"] / points["control_val_metric"])
    return _val_delta(points).where(hib, rel)


def is_control(points: pd.DataFrame) -> pd.Series:
    if "control" not in points.columns:
        return points["method"] == CONTROL
    return points["method"] == points["control"]


def rank_points(points: pd.DataFrame) -> pd.DataFrame:
    """The control first, then within-tolerance points, each block by compression ratio (descending),
    ties by the validation score; never by the test metric."""
    return points.assign(_c=is_control(points), _v=val_score(points)).sort_values(
        ["_c", "within_tol", "compression_ratio", "_v"], ascending=[False, False, False, False], kind="stable",
        na_position="last").drop(columns=["_c", "_v"])


def pareto_front(points_df: pd.DataFrame, higher_is_better: bool, x: str = "compression_ratio",
                 y: str = "val_metric") -> pd.DataFrame:
    """Points not dominated by another (ratio at least as high and ``y`` at least as good, one strictly).

    ``y`` defaults to the **validation** metric: the frontier is chosen on validation, and the caller
    shows the chosen points' test metric. Returns those rows (original index kept) sorted by ``x``
    ascending; rows with NaN are ignored. Of exact duplicates one is kept.
    """
    pts = points_df.dropna(subset=[x, y])
    ordered = pts.sort_values([x, y], ascending=[False, not higher_is_better], kind="stable")
    keep, best = [], None
    for idx, value in ordered[y].items():
        if best is None or (value > best if higher_is_better else value < best):
            keep.append(idx)
            best = value
    return pts.loc[keep].sort_values(x, kind="stable")


def validation_available(points: pd.DataFrame) -> bool:
    """Whether any point could be decided on validation."""
    return not points.empty and bool(_val_delta(points).notna().any())


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def _decimals(metric_name, reference) -> int:
    """2 decimals for accuracy; about 4 significant digits for error metrics."""
    if higher_is_better(metric_name) or _isnan(reference) or not reference or not math.isfinite(reference):
        return 2
    return max(2, 3 - math.floor(math.log10(abs(reference))))


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
    if not higher_is_better(metric_name) and not _isnan(dense) and dense:
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


def _fmt_epoch(v) -> str:
    return "—" if _isnan(v) else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")


def fmt_epochs(best, run) -> str:
    """``best/run`` epochs of the main training (means over seeds)."""
    if _isnan(best):
        return "—"
    return _fmt_epoch(best) + ("" if _isnan(run) else f"/{_fmt_epoch(run)}")


def kept_epoch0_note(kept, seeds) -> str:
    """The visible note of a point whose fine-tune kept epoch 0 (the un-fine-tuned model) on some seeds."""
    if _isnan(kept) or kept <= 0:
        return ""
    return f"fine-tune kept epoch 0 ({int(kept)}/{int(seeds)} seeds)"


KEPT_EPOCH0_TEXT = ("**fine-tune kept epoch 0**: on those seeds the method's fine-tune never did better on "
                    "validation than the model it started from, so it kept the un-fine-tuned model: the fine-tune "
                    "changed nothing and the row measures the compression alone.")


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _method_label(row: dict) -> str:
    method, synthetic = row["method"], bool(row["synthetic"])
    source = "control_metric" if method == CONTROL else "dense_metric"
    if method == row.get("control"):
        return f"{method} (control" + (f", from {source})" if synthetic else ")")
    return f"{method} (from {source})" if synthetic else method


def _tolerance_mark(row: dict) -> str:
    if row["method"] == row.get("control"):
        return "control"
    if _isnan(row.get("val_delta")):
        return "—"  # no validation metric: undecided
    return "✓" if row["within_tol"] else "✗"


def point_table(points: pd.DataFrame, group_arch) -> pd.DataFrame:
    """The display table of one group, rows already ranked (control first)."""
    name = _first(points["metric_name"])
    dec = _decimals(name, _first(points["control_metric"]))
    show_arch = points["arch"].dropna().nunique() > 1 or points["arch"].dropna().ne(group_arch).any()
    recs = points.to_dict("records")
    table = pd.DataFrame({
        "method": [_method_label(r) for r in recs],
        "config": points["config"].to_numpy(),
        **({"arch": points["arch"].fillna("—").to_numpy()} if show_arch else {}),
        "seeds": points["n_seeds"].map(fmt_int).to_numpy(),
        f"val {name} (mean)": [fmt_num(v, f".{dec}f") for v in points["val_metric"]],
        "val Δ vs control": [fmt_delta(d, c, name, dec) for d, c in
                             zip(points["val_delta"], points["control_val_metric"])],
        "within tol. (val)": [_tolerance_mark(r) for r in recs],
        f"test {name} (mean ± std)": [fmt_mean_std(m, s, n, dec) for m, s, n in
                                      zip(points["metric"], points["metric_std"], points["n_seeds"])],
        "test Δ vs control": [fmt_delta(d, c, name, dec) for d, c in
                              zip(points["metric_delta"], points["control_metric"])],
        "ratio": points["compression_ratio"].map(fmt_ratio).to_numpy(),
        "file ratio": points["file_compression_ratio"].map(fmt_ratio).to_numpy(),
        "coef ratio": points["coef_compression_ratio"].map(fmt_ratio).to_numpy(),
        "requested": points["requested_ratio"].map(fmt_ratio).to_numpy(),
        "speedup": points["theoretical_speedup"].map(
            lambda v: fmt_num(v, ".2f") + ("×" if not _isnan(v) else "")).to_numpy(),
        "stored KiB": (points["stored_bits"] / 8).map(fmt_kib).to_numpy(),
        "file KiB": points["file_bytes"].map(fmt_kib).to_numpy(),
        "params trainable": points["params_trainable"].map(fmt_int).to_numpy(),
        "best/run epochs": [fmt_epochs(b, r) for b, r in zip(points["best_epoch"], points["epochs_run"])],
        "train s": points["train_seconds"].map(lambda v: fmt_num(v, ".1f")).to_numpy(),
        "peak MiB": points["peak_memory_bytes"].map(fmt_mib).to_numpy(),
        "note": [kept_epoch0_note(k, n) for k, n in zip(points["ft_kept0"], points["ft_seeds"])],
    })
    return table


def _compressed(points: pd.DataFrame) -> pd.DataFrame:
    return points[~points["method"].isin(REFERENCES)]


def _best_within(points: pd.DataFrame, keys: list[str], mask: pd.Series) -> pd.DataFrame:
    """Per ``keys``: of the rows where ``mask`` holds and the ratio is above 1× (below is not
    compression), the highest whole-model ratio, ties by the validation score."""
    cands = points[mask & (points["compression_ratio"] > 1)]
    return (cands.assign(_v=val_score(cands))
            .sort_values(["compression_ratio", "_v"], ascending=False, kind="stable", na_position="last")
            .groupby(keys, sort=False, dropna=False).head(1).drop(columns="_v"))


def _show_budget(points: pd.DataFrame) -> bool:
    return bool(points.groupby(["dataset", "model"])["budget"].nunique().gt(1).any())


HEADLINE_KEYS = ["dataset", "model", "budget"]


def headline_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, model and budget, each method's best point at its best basis, both chosen on
    validation (highest ratio above 1× within tolerance, ties by validation), beside that basis's own
    control: control test metric, the point's test metric, test Δ vs control, ratio, stored KiB."""
    compressed = _compressed(points)
    if compressed.empty:
        return pd.DataFrame()
    keys = HEADLINE_KEYS + ["method"]
    best = _best_within(compressed, keys, compressed["within_tol"].astype(bool))
    pairs = compressed[keys].drop_duplicates()
    best = pairs.merge(best, on=keys, how="left").sort_values(keys, kind="stable")
    show_budget = _show_budget(points)
    return pd.DataFrame([_headline_row(row, show_budget) for row in best.to_dict("records")])


def _headline_row(best: dict, show_budget: bool) -> dict:
    row = {"dataset": best["dataset"], "model": best["model"],
           **({"budget": best["budget"] or "—"} if show_budget else {}), "method": best["method"]}
    if _isnan(best.get("compression_ratio")):
        return row | {"best ratio within tol.": "none", "basis": "", "config": "", "stored KiB": "", "metric": "",
                      "control test (mean ± std)": "", "test (mean ± std)": "", "test Δ vs control": "",
                      "val Δ vs control": "", "note": ""}
    name, n = best["metric_name"], best["n_seeds"]
    dec = _decimals(name, best["control_metric"])
    control = fmt_mean_std(best["control_metric"], best["control_metric_std"], n, dec)
    return row | {
        "best ratio within tol.": fmt_ratio(best["compression_ratio"]),
        "basis": best["basis"],
        "config": best["config"],
        "stored KiB": fmt_kib(best["stored_bits"] / 8),
        "metric": name,
        "control test (mean ± std)": control + ("" if best["control"] == CONTROL else f" ({best['control']})"),
        "test (mean ± std)": fmt_mean_std(best["metric"], best["metric_std"], n, dec),
        "test Δ vs control": fmt_delta(best["metric_delta"], best["control_metric"], name, dec),
        "val Δ vs control": fmt_delta(best["val_delta"], best["control_val_metric"], name, dec),
        "note": kept_epoch0_note(best["ft_kept0"], best["ft_seeds"]),
    }


def best_by_tolerance(points: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, model, budget and method, the best whole-model (and coefficient) ratio above 1×
    within 0.5 and 1 point of the control's validation accuracy, within 5 % of its validation RMSE for
    regression (the operating points ShrinkBench-style comparisons quote)."""
    rows = []
    compressed = _compressed(points)
    show_budget = _show_budget(points) if not points.empty else False
    for (dataset, model, budget, method), grp in compressed.groupby(HEADLINE_KEYS + ["method"], sort=True):
        hib = higher_is_better(_first(grp["metric_name"]))
        ladder = [("≤ 0.5 pt", 0.5, 0.05), ("≤ 1 pt", 1.0, 0.05)] if hib else [("≤ 5% RMSE", 1.0, 0.05)]
        row = {"dataset": dataset, "model": model, **({"budget": budget or "—"} if show_budget else {}),
               "method": method}
        for label, tol_acc, tol_rel in ladder:
            best = _best_within(grp, ["method"], within_tolerance(grp, tol_acc, tol_rel))
            if best.empty:
                row[label] = "none"
                continue
            best = best.iloc[0]
            row[label] = (f"{fmt_ratio(best['compression_ratio'])} (coef {fmt_ratio(best['coef_compression_ratio'])}; "
                          f"{best['basis']}, {best['config'] or 'default'})")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    cols = [c for c in ("dataset", "model", "budget", "method") if c in table.columns]
    cols += [c for c in ("≤ 0.5 pt", "≤ 1 pt", "≤ 5% RMSE") if c in table.columns]
    return table[cols].fillna("—")


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
        pts = pts[pts["metric_name"].map(higher_is_better).astype(bool)]
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
        return (f"dense / metakan trainable parameters: {red.min():.2g}× ({'/'.join(map(str, worst[:3]))}) to "
                f"{red.max():.2g}× ({'/'.join(map(str, best[:3]))}); above 1× means fewer"), setting
    tol_acc, tol_rel = (0.5, 0.05) if claim["task"] == "classification" else (1.0, 0.05)
    m = pts[pts["method"] == claim["method"]]
    if m.empty:
        return f"not measured (no {claim['method']} runs)", setting
    ok = m[within_tolerance(m, tol_acc, tol_rel) & (m["compression_ratio"] > 1)]
    cond = ("validation Δ ≥ −0.5 pt vs the control" if claim["task"] == "classification"
            else "validation RMSE within 5 % of the control's")
    if ok.empty:
        scored = m.assign(_v=val_score(m)).dropna(subset=["_v"])
        if scored.empty:
            return f"no operating point with {cond} (no validation metric to decide on)", setting
        closest = scored.sort_values("_v", ascending=False, kind="stable").iloc[0]
        return (f"no operating point with {cond} (closest on validation: val Δ {closest['val_delta']:+.3g}, "
                f"test Δ {closest['metric_delta']:+.3g})"), setting
    best = ok.assign(_v=val_score(ok)).sort_values(["coef_compression_ratio", "_v"], ascending=False,
                                                     kind="stable").iloc[0]
    coef, whole = fmt_ratio(best["coef_compression_ratio"]), fmt_ratio(best["compression_ratio"])
    return (f"{coef} coefficient ratio ({whole} whole model) with {cond}: {best['dataset']}/{best['basis']}, "
            f"{best['config'] or 'default'}, test Δ vs control {best['metric_delta']:+.3g}"), setting


def paper_claims_section(points: pd.DataFrame) -> list[str]:
    rows = []
    for claim in PAPER_CLAIMS:
        measured, setting = _claim_measurement(points, claim)
        rows.append({"claim (paper)": f"{claim['claim']} ({claim['source']})", "measured here": measured,
                     "datasets here": setting})
    return ["## Compared with the papers' headline claims", "",
            ("The papers' numbers come from their own training budgets and architectures; where the datasets "
             "differ the row says so. Coefficient ratios are the papers' comparable figure. Points are chosen on "
             "validation against the fine-tuned dense control; the test Δ is reported for the chosen point."), "",
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
    """Failed and diverged runs with their error (``infeasible`` settings are not failures)."""
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


def infeasible_section(df: pd.DataFrame) -> list[str]:
    """Settings that cannot be met on the model (``status == "infeasible"``), one row per setting with
    its seeds and reason, sorted by dataset, basis, method and config. Not failures."""
    rows = df[df["status"] == "infeasible"] if "status" in df.columns else df.iloc[0:0]
    if rows.empty:
        return []
    rows = rows.reindex(columns=list(dict.fromkeys(["dataset", "model", "basis", "method", "method_config", "seed",
                                                    "error", *BUDGET]))).copy()
    rows["budget"] = budget_labels(rows)
    rows["config"] = [compact_config(c, m) for c, m in zip(rows["method_config"], rows["method"])]
    rows["reason"] = rows["error"].map(truncate)
    keys = ["dataset", "basis", "method", "config", "model", "budget", "reason"]
    for c in keys:
        rows[c] = rows[c].astype(object).where(rows[c].notna(), "").astype(str)
    table = (rows.groupby(keys, sort=True)["seed"]
             .agg(lambda s: ", ".join(fmt_int(v) for v in sorted(s.dropna())) or "—").reset_index())
    cols = ["dataset", "model", "basis"] + (["budget"] if table["budget"].ne("").any() else []) + \
        ["method", "config", "seed", "reason"]
    table = table[cols].rename(columns={"seed": "seeds"})
    return ["## Infeasible settings", "",
            ("Configurations that cannot be met on this model (e.g. a pruning budget below the smallest connected "
             "model). They are not failures, are not retried, and are not counted as failed."), "",
            markdown_table(table), ""]


def tolerance_words(tolerance_acc: float, tolerance_rmse_rel: float) -> str:
    points = "point" if tolerance_acc == 1 else "points"
    return ("Tolerance and every choice in this report (within tolerance, each method's best point and best basis, "
            "the order of a table, the Pareto frontiers) are **decided on validation against the fine-tuned dense "
            "control; test reported once**. The control, `dense_ft`, is the dense base model fine-tuned with "
            "exactly the fine-tune budget every compressed method gets. A point is **within tolerance** when its "
            f"mean validation accuracy is at most {tolerance_acc:g} percentage {points} below the control's (mean "
            f"of val_metric − control_val_metric ≥ −{tolerance_acc:g}), or, for RMSE, when its mean validation RMSE "
            f"is at most {tolerance_rmse_rel:.0%} above the control's mean validation RMSE over the same seeds. "
            "Each run's test metric is evaluated once and only reported (mean ± std), never used to choose.")


def header_section(df: pd.DataFrame, title: str, tolerance_acc: float, tolerance_rmse_rel: float,
                   header_lines: list[str] | None, points: pd.DataFrame | None = None) -> list[str]:
    counts = df["status"].value_counts() if "status" in df.columns else pd.Series(dtype=int)
    runs = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("ok", "failed", "diverged", "infeasible"))
    other = len(df) - sum(int(counts.get(s, 0)) for s in ("ok", "failed", "diverged", "infeasible"))
    runs += f", {other} other" if other else ""
    lines = [f"# {title}", "", f"Runs: {len(df)} ({runs}).", "", tolerance_words(tolerance_acc, tolerance_rmse_rel), "",
             ("Metrics are mean ± sample std over seeds; a Δ vs control is the mean of the per-seed difference from "
              "the same seed's control (same dataset, model, basis and training budget). Ratios are whole-model "
              "stored bits (dense float32 / compressed); file ratio is dense file bytes / this file's bytes; coef "
              "ratio counts edge coefficients only. A ratio at or below 1× is not compression and never enters "
              "the headline. Infeasible settings (cannot be met on the model) are listed apart and are not "
              "failures."), ""]
    if points is not None and not points.empty:
        if not validation_available(points):
            lines += ["**No validation metric in these results: no decision could be made on validation, so no "
                      "point is marked within tolerance and the headline credits no method.**", ""]
        if (points["control"] == DENSE).any():
            lines += ["Some results carry no `dense_ft` control (an older runner): their groups use the plain "
                      "`dense` base model as the control, which got no fine-tune; their tables say so.", ""]
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


def _draw_facet(ax, points: pd.DataFrame, palette: dict) -> None:
    name = _first(points["metric_name"])
    hib = higher_is_better(name)
    ctrl_mask = is_control(points)
    control = points[ctrl_mask]
    dense = points[(points["method"] == DENSE) & ~ctrl_mask]
    others = points[~points["method"].isin(REFERENCES)]
    control_y = control["metric"].mean()
    if math.isfinite(control_y):
        ax.axhline(control_y, color="black", lw=1, ls="--", zorder=1)
    for method, grp in others.groupby("method", sort=True):
        colour = palette[method]
        ax.errorbar(grp["compression_ratio"], grp["metric"], yerr=grp["metric_std"].fillna(0), fmt="none",
                    ecolor=colour, elinewidth=1, capsize=3, alpha=0.8, zorder=2)
        front = pareto_front(pd.concat([grp, control]), hib)  # chosen on validation, drawn at test
        if len(front) > 1:
            ax.plot(front["compression_ratio"], front["metric"], color=colour, lw=1.5, alpha=0.9, zorder=2)
        inside = grp["within_tol"].astype(bool) if "within_tol" in grp.columns else pd.Series(False, index=grp.index)
        ax.scatter(grp.loc[inside, "compression_ratio"], grp.loc[inside, "metric"], s=45, color=colour,
                   edgecolors="white", linewidths=0.5, zorder=3)
        ax.scatter(grp.loc[~inside, "compression_ratio"], grp.loc[~inside, "metric"], s=45, facecolors="none",
                   edgecolors=[colour], linewidths=1.3, zorder=3)
    if not dense.empty:
        ax.errorbar(dense["compression_ratio"], dense["metric"], yerr=dense["metric_std"].fillna(0), fmt="D",
                    color="grey", markersize=6, capsize=3, zorder=4)
    if not control.empty:
        ax.errorbar(control["compression_ratio"], control["metric"], yerr=control["metric_std"].fillna(0), fmt="*",
                    color="black", markersize=12, capsize=3, zorder=5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(_ratio_formatter))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compression ratio, whole model (log scale)")
    ax.set_ylabel(_axis_label(name))
    lo, hi = points["compression_ratio"].min(), points["compression_ratio"].max()
    ax.set_xlim(min(0.8, lo * 0.8) if math.isfinite(lo) else 0.8, max(hi * 1.5, 2.0) if math.isfinite(hi) else 2.0)


def _legend_handles(palette: dict, controls: set) -> list:
    handles = [Line2D([], [], color=c, marker="o", lw=1.5, label=m) for m, c in palette.items()]
    label = "control: dense_ft (1×)" if controls == {CONTROL} else f"control: {'/'.join(sorted(controls))} (1×)"
    handles += [Line2D([], [], color="black", marker="*", markersize=10, ls="--", lw=1, label=label)]
    if CONTROL in controls:
        handles += [Line2D([], [], color="grey", marker="D", markersize=6, ls="none", label="dense (no fine-tune)")]
    handles += [Line2D([], [], color="grey", marker="o", ls="none", label="within tolerance (validation)"),
                Line2D([], [], color="grey", marker="o", markerfacecolor="none", ls="none",
                       label="outside tolerance / undecided")]
    return handles


def plot_dataset(points: pd.DataFrame, dataset: str, path: Path, palette: dict) -> Path:
    """One PNG for a dataset: a facet per (model, basis, budget), test metric against compression ratio."""
    groups = list(points.groupby(["model", "basis", "budget"], sort=True, dropna=False))
    multi_budget = points["budget"].nunique() > 1
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.2 * ncols + 2.2, 4.2 * nrows))  # no pyplot: Agg canvas, no global state
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(nrows, ncols, squeeze=False)
    used = {}
    for ax, ((model, basis, budget), grp) in zip(axes.flat, groups):
        _draw_facet(ax, grp, palette)
        arch = _first(grp.loc[grp["method"].isin(REFERENCES), "arch"]) or _first(grp["arch"])
        title = f"{model} / {basis}" + (f"  {arch}" if arch else "") + (f"\n{budget}" if multi_budget else "")
        ax.set_title(title, fontsize=9 if multi_budget else 10)
        used.update({m: palette[m] for m in grp["method"] if m not in REFERENCES})
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: test metric vs compression (mean ± std over seeds; lines = Pareto frontiers "
                 "chosen on validation)", fontsize=11)
    handles = _legend_handles(dict(sorted(used.items())), set(points["control"]))
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
    """One colour per compressed method (not dense / dense_ft), stable across every figure of the report."""
    names = sorted(m for m in set(methods) if m not in REFERENCES)
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

def group_notes(points: pd.DataFrame) -> list[str]:
    """The sentences under a group's table: what the control is, what could not be decided, and what
    a fine-tune that kept epoch 0 means."""
    notes = []
    control = _first(points["control"])
    ctrl = points[is_control(points)]
    if control == DENSE:
        notes.append("No `dense_ft` control in these rows (an older runner): the control is the plain `dense` base "
                     "model, which got no fine-tune, so compressed methods are credited with their fine-tune too.")
    elif not ctrl.empty and bool(ctrl["synthetic"].all()):
        notes.append("No `dense_ft` runs in this group: the control row is built from the rows' `control_metric` / "
                     "`control_val_metric`.")
    if not _val_delta(points[~is_control(points)]).notna().any():
        notes.append("**No validation metric for this group: nothing could be decided on validation, so no point is "
                     "marked within tolerance.**")
    if (points["ft_kept0"].fillna(0) > 0).any():
        notes.append(KEPT_EPOCH0_TEXT)
    return [line for n in notes for line in (n, "")]


def dataset_section(points: pd.DataFrame, dataset: str, plot_file: str | None) -> list[str]:
    name = _first(points["metric_name"])
    lines = [f"## {dataset} ({name})", ""]
    if plot_file:
        lines += [f"![{dataset}: {name} vs compression ratio]({plot_file})", ""]
    multi_budget = points["budget"].nunique() > 1
    for (model, basis, budget), grp in points.groupby(["model", "basis", "budget"], sort=True, dropna=False):
        arch = _first(grp.loc[grp["method"].isin(REFERENCES), "arch"]) or _first(grp["arch"])
        lines += [f"### {dataset} / {model} / {basis}" + (f" / {budget}" if multi_budget and budget else "")
                  + (f" — `{arch}`" if arch else ""), ""]
        if budget:
            lines += [f"Training budget: {budget}.", ""]
        lines += [markdown_table(point_table(rank_points(grp), arch)), ""]
        lines += group_notes(grp)
    return lines


HEADLINE_TEXT = ("Per dataset, model (and training budget): each method's highest whole-model ratio above 1× among "
                 "its points within tolerance, at the basis where that is highest, both chosen on validation (ties "
                 "by validation); beside it the control (`dense_ft`) of that same basis. The test metrics are "
                 "reported for the chosen point (mean ± std over seeds), never used to choose.")


def write_report(df: pd.DataFrame, out_dir: Path, title: str | None = None, tolerance_acc: float = 1.0,
                 tolerance_rmse_rel: float = 0.05, header_lines: list[str] | None = None,
                 transfer: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/LEADERBOARD.md`` and one ``metric_vs_ratio_<dataset>.png`` per dataset (and,
    given ``transfer`` rows, the transfer section with its plot). Every decision is made on
    validation against the ``dense_ft`` control (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = aggregate(df)
    if not points.empty:
        points["within_tol"] = within_tolerance(points, tolerance_acc, tolerance_rmse_rel)
    lines = header_section(df, title or "KAN compression leaderboard", tolerance_acc, tolerance_rmse_rel,
                           header_lines, points)
    if points.empty:
        lines += ["**No successful runs** — nothing to rank or plot.", ""]
    else:
        lines += ["## Headline: best compression within tolerance", "", HEADLINE_TEXT, ""]
        headline = headline_table(points)
        lines += [markdown_table(headline) if not headline.empty else "Only dense runs succeeded.", ""]
        if not headline.empty and headline.get("note", pd.Series(dtype=object)).astype(bool).any():
            lines += [KEPT_EPOCH0_TEXT, ""]
        ladder = best_by_tolerance(points)
        if not ladder.empty:
            lines += ["## Best whole-model ratio by accuracy budget", "",
                      ("Validation accuracy within 0.5 or 1 point of the control's; equation tasks within 5 % of "
                       "its validation RMSE. Ratios above 1× only."), "",
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
            plot_dataset(grp, str(dataset), out_dir / plot_file, palette)
            lines += dataset_section(grp, str(dataset), plot_file)
    if transfer is not None:
        lines += transfer_section(transfer, out_dir)
    lines += infeasible_section(df)
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
