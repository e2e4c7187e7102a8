"""The numbers behind the leaderboard: runs -> operating points, and every decision made on them.

**Every decision reads validation; the test metric is only reported.** Each run scores its final
model on the test split once (``metric``). Which operating points are within tolerance, which point
and which basis a method is credited with, the order inside a table and the Pareto frontiers are all
decided on ``val_metric`` against the control's validation metric; the test metric (mean ± std over
seeds) is then shown for what was chosen, never used to choose.

**The control is** ``dense_ft``: the dense base model fine-tuned with exactly the fine-tune budget
every compressed method gets. Every row carries ``control_metric`` / ``control_val_metric``; a group
without ``dense_ft`` runs gets a synthetic control row built from those columns. Rows from older
runners without them fall back to the plain ``dense`` model as the control. Where no validation
metric exists nothing is decided: no point is within tolerance.

A point (mean over its seeds) is **within tolerance** when

* higher-is-better metrics (accuracy, percentage points): ``mean(val_metric - control_val_metric) >= -tol``;
* lower-is-better metrics (rmse, relative): ``mean(val_metric) <= mean(control_val_metric) * (1 + tol)``.

Which way a metric goes is the row's ``metric_direction`` (``higher`` / ``lower``, written by the
runner); rows from older runners without it fall back on ``metric_name`` (rmse, mse, mae, loss, nll are
lower-is-better). The hyperparameters a table shows are the row's ``method_config_nondefault`` (what
differs from the method's defaults, written by the runner); older rows show the keys that vary among
that method's configurations in these results. So the report never loads a plugin.

A **group** (one base model) is (dataset, model, basis, training budget); the budget is whichever of
``BUDGET`` the rows carry (its text is the ``budget`` column). An **operating point** is a group plus
(method, method_config): seeds are averaged only when everything but the seed is equal.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench import metrics

GROUP = ["dataset", "model", "basis", "budget"]
POINT = GROUP + ["method", "method_config"]
# The training budget that defines a base model (whichever of these the rows carry).
BUDGET = ["epochs", "lr", "batch_size", "finetune_epochs", "finetune_lr_scale", "schedule", "patience",
          "weight_decay", "threads", "bn_recalibration", "dataset_options", "model_options", "basis_options"]
_BUDGET_NAMES = {"epochs": "epochs", "lr": "lr", "batch_size": "batch", "finetune_epochs": "ft epochs",
                 "finetune_lr_scale": "ft lr scale", "schedule": "schedule", "patience": "patience",
                 "weight_decay": "wd", "threads": "threads", "bn_recalibration": "bn recal",
                 "dataset_options": "data", "model_options": "model",
                 "basis_options": "basis"}
DENSE = "dense"
CONTROL = "dense_ft"
REFERENCES = (DENSE, CONTROL)
# Accuracy budgets the headline ranks methods within: points below the control for higher-is-better
# metrics, relative excess for lower-is-better ones.
ACC_BUDGETS = (0.5, 1.0)
REL_BUDGETS = (0.05,)

# Per-operating-point means (same names as the run columns, so pareto_front works on either frame).
_MEANS = ["metric", "val_metric", "control_metric", "control_val_metric", "metric_delta", "val_delta",
          "dense_metric", "dense_val_metric", "dense_delta", "compression_ratio", "coef_compression_ratio",
          "file_compression_ratio", "requested_ratio", "stored_bits", "dense_bits", "file_bytes", "header_bytes",
          "zstd_file_bytes", "onnx_bytes", "runtime_bytes",
          "params_trainable", "theoretical_speedup", "train_seconds", "peak_memory_bytes", "best_epoch",
          "epochs_run", "finetune_best_epoch"]
_STDS = ["metric", "val_metric", "control_metric", "metric_delta", "val_delta", "compression_ratio"]
_ROW_NUMBERS = list(dict.fromkeys(_MEANS + ["seed"]))
_VAL_COLUMNS = ["val_metric", "val_metric_std", "control_val_metric", "val_delta", "val_delta_std"]


def higher_is_better(metric_name, direction=None) -> bool:
    """Whether a metric is maximised: the row's ``metric_direction`` (``higher`` / ``lower``) where it
    has one, else by name (rmse, mse, mae, loss, nll are minimised; anything else, e.g. accuracy, is
    maximised)."""
    if isinstance(direction, str) and direction in ("higher", "lower"):
        return direction == "higher"
    return metrics.higher_is_better(metric_name)


def hib(frame: pd.DataFrame) -> pd.Series:
    """Per row of a run or point frame: True where its metric is higher-is-better."""
    direction = frame["metric_direction"] if "metric_direction" in frame.columns else pd.Series(None, index=frame.index)
    return pd.Series([higher_is_better(n, d) for n, d in zip(frame["metric_name"], direction)], index=frame.index,
                     dtype=bool)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The successful runs, with a missing method_config read as ``{}`` (no hyperparameters)."""
    if df.empty or "status" not in df.columns:
        return df.iloc[0:0]
    ok = df[df["status"] == "ok"].copy()
    ok["method_config"] = ok["method_config"].fillna("{}")
    return ok


def _as_dict(config):
    if isinstance(config, str):
        try:
            return json.loads(config)
        except json.JSONDecodeError:
            return config
    return config


def compact_config(config, keys=None) -> str:
    """``'{"K": 16, "d": 1}'`` -> ``"K=16, d=1"``; empty for no hyperparameters. With ``keys``
    given, only those keys are shown."""
    if _isnan(config):
        return ""
    config = _as_dict(config)
    if isinstance(config, str):
        return config
    if not isinstance(config, dict):
        return json.dumps(config)
    return ", ".join(f"{k}={_config_value(v)}" for k, v in config.items() if keys is None or k in keys)


def config_labels(frame: pd.DataFrame, full_when_single: bool = False) -> pd.Series:
    """Per row, the hyperparameters worth showing: ``method_config_nondefault`` (what the runner found
    different from the method's defaults; ``default`` when nothing differs) where the row has it, else
    the keys whose value varies among the rows of that method in ``frame`` (``single config`` when none
    does, or the whole config with ``full_when_single``). No plugin is loaded: the rows say it all."""
    nondefault = (frame["method_config_nondefault"] if "method_config_nondefault" in frame.columns
                  else pd.Series(None, index=frame.index, dtype=object))
    configs = [_as_dict(c) if not _isnan(c) else {} for c in frame["method_config"]]
    varying: dict = {}
    for method, cfg in zip(frame["method"], configs):
        if isinstance(cfg, dict):
            seen = varying.setdefault(method, {})
            for k, v in cfg.items():
                seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    labels = []
    for method, cfg, nd in zip(frame["method"], configs, nondefault):
        if not isinstance(cfg, dict):
            labels.append(str(cfg))
        elif not cfg:
            labels.append("")
        elif not _isnan(nd):
            labels.append(compact_config(nd) or "default")
        else:
            keys = {k for k, vs in varying.get(method, {}).items() if len(vs) > 1}
            labels.append(compact_config(cfg, keys) if keys else
                          (compact_config(cfg) if full_when_single else "single config"))
    return pd.Series(labels, index=frame.index, dtype=object)


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
                   metric_name=_first(s["metric_name"]), metric_direction=_first(s["metric_direction"]),
                   arch=None, metric=metric, val_metric=_nan(_first(s[val_col])),
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
    for c in ("arch", "metric_name", "metric_direction", "method_config_nondefault"):
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
    rows["higher_better"] = hib(rows)
    rows["config"] = config_labels(rows)
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


def _seed_list(values: pd.Series) -> str:
    return ", ".join(str(int(v)) for v in sorted(values.dropna()))


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
        return pd.DataFrame(columns=POINT + ["config", "n_seeds", "seeds", "metric_name", "higher_better", "arch",
                                             "control", "synthetic", "ft_kept0", "ft_seeds"]
                            + _MEANS + [f"{c}_std" for c in _STDS])
    named = {c: (c, "mean") for c in _MEANS}
    named.update({f"{c}_std": (c, "std") for c in _STDS})
    if "base_library" in rows:  # a given base model (imported): where it came from, for the titles
        named.update(base_library=("base_library", _first), base_class=("base_class", _first))
    points = rows.groupby(POINT, dropna=False, sort=True).agg(
        n_seeds=("seed", "size"), seeds=("seed", _seed_list), metric_name=("metric_name", _first),
        higher_better=("higher_better", "first"), config=("config", "first"), arch=("arch", _first),
        control=("control", "first"), synthetic=("synthetic", "all"),
        ft_kept0=("finetune_best_epoch", _count_zero), ft_seeds=("finetune_best_epoch", "count"),
        val_seeds=("val_delta", "count"), **named,
    ).reset_index()
    points.loc[points["val_seeds"] < points["n_seeds"], _VAL_COLUMNS] = np.nan  # undecided, not half-decided
    return points.drop(columns="val_seeds").sort_values(POINT, kind="stable").reset_index(drop=True)


def _hib_points(points: pd.DataFrame) -> pd.Series:
    if "higher_better" in points.columns:
        return points["higher_better"].astype(bool)
    return hib(points)


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
    up = _hib_points(points)
    delta = _val_delta(points)
    acc_ok = delta >= -tolerance_acc - 1e-12
    err_ok = points["val_metric"] <= points["control_val_metric"] * (1 + tolerance_rmse_rel) + 1e-12
    decided = delta.notna()
    return (decided & ((up & acc_ok) | (~up & err_ok))).fillna(False).astype(bool)


def val_score(points: pd.DataFrame) -> pd.Series:
    """Higher is better, comparable across bases: validation Δ vs control for accuracy, minus the
    validation RMSE relative to the control's for error metrics (NaN where undecided)."""
    rel = -(points["val_metric"] / points["control_val_metric"])
    return _val_delta(points).where(_hib_points(points), rel)


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
                 y: str = "val_metric", x_higher_is_better: bool = True) -> pd.DataFrame:
    """Points not dominated by another (``x`` at least as good and ``y`` at least as good, one strictly):
    a higher ratio, or with ``x="stored_bits", x_higher_is_better=False`` fewer bits.

    ``y`` defaults to the **validation** metric: the frontier is chosen on validation, and the caller
    shows the chosen points' test metric. Returns those rows (original index kept) sorted by ``x``
    ascending; rows with NaN are ignored. Of exact duplicates one is kept.
    """
    pts = points_df.dropna(subset=[x, y])
    ordered = pts.sort_values([x, y], ascending=[not x_higher_is_better, not higher_is_better], kind="stable")
    keep, best = [], None
    for idx, value in ordered[y].items():
        if best is None or (value > best if higher_is_better else value < best):
            keep.append(idx)
            best = value
    return pts.loc[keep].sort_values(x, kind="stable")



def validation_available(points: pd.DataFrame) -> bool:
    """Whether any point could be decided on validation."""
    return not points.empty and bool(_val_delta(points).notna().any())


def compressed(points: pd.DataFrame) -> pd.DataFrame:
    """The operating points of compression methods (neither ``dense`` nor ``dense_ft``)."""
    return points[~points["method"].isin(REFERENCES)]


HEADLINE_KEYS = ["dataset", "model", "budget"]


def accuracy_budgets(higher: bool, tolerance_acc: float = 1.0, tolerance_rmse_rel: float = 0.05) -> list[tuple]:
    """The accuracy budgets a headline ranks within, as (label, tolerance_acc, tolerance_rmse_rel):
    0.5 and 1 point (and the report's own tolerance) for higher-is-better metrics; 5 % (and the report's
    relative tolerance) for lower-is-better ones."""
    if higher:
        return [(f"within {t:g} pt", t, tolerance_rmse_rel) for t in sorted({*ACC_BUDGETS, tolerance_acc})]
    return [(f"within {t:.0%} RMSE" if t * 100 == round(t * 100) else f"within {t:.1%} RMSE", tolerance_acc, t)
            for t in sorted({*REL_BUDGETS, tolerance_rmse_rel})]


def smallest_within(points: pd.DataFrame, tolerance_acc: float, tolerance_rmse_rel: float,
                    keys: list[str] = HEADLINE_KEYS) -> pd.DataFrame:
    """Per ``keys`` (dataset, model, budget) and method: the point that stores the fewest bits among
    those within tolerance **on validation** with a whole-model ratio above 1× (storing as much as the
    control is not compression), at whichever basis that is; ties by the validation score. Sorted by
    ``keys`` then stored bits, with ``rank`` (1 = the winner of its ``keys``)."""
    comp = compressed(points)
    cand = comp[within_tolerance(comp, tolerance_acc, tolerance_rmse_rel) & (comp["compression_ratio"] > 1)]
    if cand.empty:
        return cand.assign(rank=pd.Series(dtype=int))
    best = (cand.assign(_v=val_score(cand))
            .sort_values(["stored_bits", "_v"], ascending=[True, False], kind="stable", na_position="last")
            .groupby(keys + ["method"], sort=False, dropna=False).head(1))
    best = best.sort_values(keys + ["stored_bits", "_v"], ascending=[True] * len(keys) + [True, False],
                            kind="stable", na_position="last")
    best["rank"] = best.groupby(keys, sort=False, dropna=False).cumcount() + 1
    return best.drop(columns="_v")


def single_point_methods(points: pd.DataFrame) -> set:
    """Methods (not the references) tried at a single operating point in every facet of ``points``: a
    point, not a curve; the figures' legends say so."""
    others = points[~points["method"].isin(REFERENCES)]
    if others.empty:
        return set()
    facet = [c for c in ("dataset", "model", "basis", "budget") if c in others.columns]
    per_facet = others.groupby([*facet, "method"], dropna=False).size()
    return {m for m, n in per_facet.groupby(level="method").max().items() if n == 1}
