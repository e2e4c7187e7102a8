"""Formatting and tables: numbers as text, the markdown tables of ``LEADERBOARD.md`` (and the rows the
HTML page sorts), the headline ranked by stored bits, its plain-words summary, and the header, failed
and infeasible sections. Every decision comes from :mod:`bench.report.numbers`; nothing here chooses."""

from __future__ import annotations

import math

import pandas as pd

from .numbers import (
    BUDGET,
    CONTROL,
    DENSE,
    REFERENCES,
    _first,
    _isnan,
    _val_delta,
    accuracy_budgets,
    budget_labels,
    compressed,
    config_labels,
    higher_is_better,
    is_control,
    rank_points,
    smallest_within,
    validation_available,
)

ERROR_CHARS = 200


def _decimals(metric_name, reference, higher=None) -> int:
    """2 decimals for accuracy-like metrics; about 4 significant digits for error metrics."""
    up = higher_is_better(metric_name) if higher is None else higher
    if up or _isnan(reference) or not reference or not math.isfinite(reference):
        return 2
    return max(2, 3 - math.floor(math.log10(abs(reference))))


def fmt_mean_std(mean, std, n, decimals: int) -> str:
    if _isnan(mean):
        return "—"
    if n <= 1 or _isnan(std):
        return f"{mean:.{decimals}f} (1 seed)"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def fmt_delta(delta, dense, metric_name, decimals: int, higher=None) -> str:
    if _isnan(delta):
        return "—"
    text = f"{round(delta, decimals) + 0.0:+.{decimals}f}"  # + 0.0: no "-0.00"
    if not (higher_is_better(metric_name) if higher is None else higher) and not _isnan(dense) and dense:
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
    return f"fine-tune kept epoch 0 ({int(kept)}/{int(seeds)})"


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


ZSTD_WASTE = 0.03  # a file zstandard shrinks by more than this stores redundancy; the table says by how much


def zstd_note(file_bytes, zstd_bytes) -> str:
    """``; zstd -12%`` when zstandard shrinks the model file by more than :data:`ZSTD_WASTE`."""
    if _isnan(file_bytes) or _isnan(zstd_bytes) or not file_bytes:
        return ""
    saved = 1 - zstd_bytes / file_bytes
    return f"; zstd −{saved:.0%}" if saved > ZSTD_WASTE else ""


def point_table(points: pd.DataFrame, group_arch) -> pd.DataFrame:
    """The display table of one group, rows already ranked (control first)."""
    name, up = _first(points["metric_name"]), bool(points["higher_better"].iloc[0])
    dec = _decimals(name, _first(points["control_metric"]), up)
    show_arch = points["arch"].dropna().nunique() > 1 or points["arch"].dropna().ne(group_arch).any()
    recs = points.to_dict("records")
    table = pd.DataFrame({
        "method": [_method_label(r) for r in recs],
        "config": points["config"].to_numpy(),
        **({"arch": points["arch"].fillna("—").to_numpy()} if show_arch else {}),
        "seeds": points["n_seeds"].map(fmt_int).to_numpy(),
        "val Δ vs control": [fmt_delta(d, c, name, dec, up) for d, c in
                             zip(points["val_delta"], points["control_val_metric"])],
        "within tol. (val)": [_tolerance_mark(r) for r in recs],
        f"test {name} (mean ± std)": [fmt_mean_std(m, s, n, dec) for m, s, n in
                                      zip(points["metric"], points["metric_std"], points["n_seeds"])],
        "test Δ vs control": [fmt_delta(d, c, name, dec, up) for d, c in
                              zip(points["metric_delta"], points["control_metric"])],
        "stored KiB (file; ONNX)": [f"{fmt_kib(b / 8)} ({fmt_kib(f)}{zstd_note(f, z)}; {fmt_kib(o)})" for b, f, z, o in
                                    zip(points["stored_bits"], points["file_bytes"], points["zstd_file_bytes"],
                                        points["onnx_bytes"])],
        "ratio (file, coef)": [f"{fmt_ratio(r)} ({fmt_ratio(f)}, {fmt_ratio(c)})" for r, f, c in
                               zip(points["compression_ratio"], points["file_compression_ratio"],
                                   points["coef_compression_ratio"])],
        "speedup": points["theoretical_speedup"].map(
            lambda v: fmt_num(v, ".2f") + ("×" if not _isnan(v) else "")).to_numpy(),
        "params trainable": points["params_trainable"].map(fmt_int).to_numpy(),
        "epochs best/run": [fmt_epochs(b, r) for b, r in zip(points["best_epoch"], points["epochs_run"])],
        "train s, peak MiB": [f"{fmt_num(t, '.1f')}, {fmt_mib(m)}" for t, m in
                              zip(points["train_seconds"], points["peak_memory_bytes"])],
        "note": [kept_epoch0_note(k, n) for k, n in zip(points["ft_kept0"], points["ft_seeds"])],
    })
    return table




def run_label(row) -> str:
    cfg = str(row.get("config") or "").replace(", ", ",")
    seed = row.get("seed")
    seed = "?" if _isnan(seed) else int(seed)
    return f"{row.get('dataset')}/{row.get('model')}/{row.get('basis')}/{row.get('method')}({cfg})/seed{seed}"


def truncate(text, n: int = ERROR_CHARS) -> str:
    text = "" if _isnan(text) else " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _with_config(df: pd.DataFrame, status) -> pd.DataFrame:
    """The rows of ``df`` with a status in ``status``, each with its ``config`` label (the keys that vary
    are found over every row of ``df``, so a failed run is named as its finished siblings are)."""
    rows = df.copy()
    for c in ("dataset", "model", "basis", "method", "method_config", "seed", "error"):
        if c not in rows.columns:
            rows[c] = None
    rows["method_config"] = rows["method_config"].fillna("{}")
    rows["config"] = config_labels(rows, full_when_single=True)
    return rows[rows["status"].isin(status)]


def failures_table(df: pd.DataFrame) -> pd.DataFrame:
    """Failed and diverged runs (``infeasible`` settings are not failures), sorted by status, dataset,
    model, basis, method, config and seed: run, status, truncated error."""
    bad = _with_config(df, ["failed", "diverged"]) if "status" in df.columns else df.iloc[0:0]
    if bad.empty:
        return pd.DataFrame(columns=["run", "status", "error"])
    bad = bad.assign(_s=pd.to_numeric(bad["seed"], errors="coerce")).sort_values(
        ["status", "dataset", "model", "basis", "method", "config", "_s"], kind="stable", na_position="last")
    return pd.DataFrame({
        "run": [run_label(r) for r in bad.to_dict("records")],
        "status": bad["status"].to_numpy(),
        "error": bad["error"].map(truncate).to_numpy(),
    })


def failures_section(df: pd.DataFrame) -> list[str]:
    """Failed and diverged runs with their error (``infeasible`` settings are not failures)."""
    table = failures_table(df)
    lines = ["## Failed and diverged runs", ""]
    if table.empty:
        return lines + ["None.", ""]
    return lines + [markdown_table(table), ""]


def infeasible_table(df: pd.DataFrame) -> pd.DataFrame:
    """Settings that cannot be met on the model (``status == "infeasible"``), one row per setting with
    its seeds and reason, sorted by dataset, basis, method and config. Not failures."""
    if "status" not in df.columns or not (df["status"] == "infeasible").any():
        return pd.DataFrame()
    rows = _with_config(df, ["infeasible"]).reindex(columns=list(dict.fromkeys(
        ["dataset", "model", "basis", "method", "config", "seed", "error", *BUDGET])))
    rows["budget"] = budget_labels(rows)
    rows["reason"] = rows["error"].map(truncate)
    keys = ["dataset", "basis", "method", "config", "model", "budget", "reason"]
    for c in keys:
        rows[c] = rows[c].astype(object).where(rows[c].notna(), "").astype(str)
    table = (rows.groupby(keys, sort=True)["seed"]
             .agg(lambda s: ", ".join(fmt_int(v) for v in sorted(s.dropna())) or "—").reset_index())
    cols = ["dataset", "model", "basis"] + (["budget"] if table["budget"].ne("").any() else []) + \
        ["method", "config", "seed", "reason"]
    return table[cols].rename(columns={"seed": "seeds"})


INFEASIBLE_TEXT = ("Configurations that cannot be met on this model (e.g. a pruning budget below the smallest "
                   "connected model). They are not failures, are not retried, and are not counted as failed.")


def infeasible_counts(df: pd.DataFrame) -> dict[tuple, int]:
    """(dataset, model, method) -> how many distinct settings of it were infeasible on that model (so a
    method's "what was tried" counts them beside its feasible operating points)."""
    if "status" not in df.columns:
        return {}
    bad = df[df["status"] == "infeasible"]
    if bad.empty:
        return {}
    return {k: int(n) for k, n in bad.groupby(["dataset", "model", "method"])["method_config"].nunique().items()}


def infeasible_section(df: pd.DataFrame) -> list[str]:
    table = infeasible_table(df)
    if table.empty:
        return []
    return ["## Infeasible settings", "",
            INFEASIBLE_TEXT, "", markdown_table(table), ""]


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
    if "source" in df.columns and df["source"].notna().any():  # rows merged in (bench merge, run --against)
        by = df["source"].fillna("this folder").value_counts()
        lines += ["Rows by where they were run (`source`; `run --against` copies a reference's rows in, `bench "
                  "merge` combines folders): " + "; ".join(f"{int(n)} from `{src}`" for src, n in by.items())
                  + ". Each keeps its own host, device, git commit and torch version (`runs.csv`).", ""]
    return lines


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
        lines += [f"![{dataset}: test {name} vs stored size]({plot_file})", ""]
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



# ----------------------------------------------------------------------------------------------
# Headline: per dataset and base model, methods ranked by the bits of their smallest point
# ----------------------------------------------------------------------------------------------

WINNER = "★"


def _arch_of(points: pd.DataFrame):
    return _first(points.loc[points["method"].isin(REFERENCES), "arch"]) or _first(points["arch"])


def headline_groups(points: pd.DataFrame):
    """(dataset, model, budget) keys with compressed points, sorted; a key's budget text is shown only
    where a dataset and model carry several budgets."""
    comp = compressed(points)
    if comp.empty:
        return []
    return list(comp.groupby(["dataset", "model", "budget"], sort=True, dropna=False).groups)


def group_title(points: pd.DataFrame, dataset, model, budget) -> str:
    sub = points[(points["dataset"] == dataset) & (points["model"] == model)]
    arch = _arch_of(sub[sub["budget"] == budget]) or model
    multi = sub["budget"].nunique() > 1
    given = ""
    if "base_library" in sub and (lib := _first(sub["base_library"])):  # a given base: say so, it was not trained
        given = f", {lib} {_first(sub['base_class']) or ''} given as the base (not trained here)".replace("  ", " ")
    return f"{dataset}, {arch}{given}" + (f" ({budget})" if multi and budget else "")


def _metric_words(name, higher: bool) -> str:
    return f"{name}, {'higher' if higher else 'lower'} is better"


def headline_table(points: pd.DataFrame, tolerance_acc: float = 1.0, tolerance_rmse_rel: float = 0.05
                   ) -> pd.DataFrame:
    """Every (dataset, model, budget) × accuracy budget × method with a point within that budget on
    validation and a ratio above 1×: its smallest such point (at its best basis), ranked by stored
    bits; the winner (rank 1) marked. Columns: dataset, model, budget, accuracy budget, rank, method,
    stored KiB, ratio, basis, config, test metric, the same basis's control's test metric, test Δ, val Δ,
    seeds, note; plus hidden numbers (``_bits``, ``_higher``) the summary reads."""
    rows = []
    for dataset, model, budget in headline_groups(points):
        grp = points[(points["dataset"] == dataset) & (points["model"] == model) & (points["budget"] == budget)]
        up = bool(grp["higher_better"].iloc[0])
        for label, tol_acc, tol_rel in accuracy_budgets(up, tolerance_acc, tolerance_rmse_rel):
            for r in smallest_within(grp, tol_acc, tol_rel).to_dict("records"):
                rows.append(_headline_row(r, label, group_title(points, dataset, model, budget)))
    return pd.DataFrame(rows)


def _headline_row(r: dict, label: str, title: str) -> dict:
    name, up, n = r["metric_name"], bool(r["higher_better"]), r["n_seeds"]
    dec = _decimals(name, r["control_metric"], up)
    control = fmt_mean_std(r["control_metric"], r["control_metric_std"], n, dec)
    return {
        "dataset / model": title, "accuracy budget": label,
        "rank": f"{WINNER} 1" if r["rank"] == 1 else str(r["rank"]),
        "method": r["method"], "stored KiB": fmt_kib(r["stored_bits"] / 8),
        "ratio": fmt_ratio(r["compression_ratio"]), "basis": r["basis"], "config": r["config"] or "default",
        "test (mean ± std)": fmt_mean_std(r["metric"], r["metric_std"], n, dec),
        "control test": control + ("" if r["control"] == CONTROL else f" ({r['control']})"),
        "test Δ vs control": fmt_delta(r["metric_delta"], r["control_metric"], name, dec, up),
        "val Δ vs control": fmt_delta(r["val_delta"], r["control_val_metric"], name, dec, up),
        "seeds": r["seeds"], "note": kept_epoch0_note(r["ft_kept0"], r["ft_seeds"]),
        "_bits": r["stored_bits"], "_dense_bits": r["dense_bits"], "_higher": up, "_metric": name,
        "_test": r["metric"], "_test_std": r["metric_std"], "_control": r["control_metric"],
        "_control_std": r["control_metric_std"], "_n": n, "_dataset": r["dataset"], "_model": r["model"],
        "_budget": r["budget"],
    }


def public_columns(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in table.columns if not str(c).startswith("_")]]


def missing_methods(points: pd.DataFrame, headline: pd.DataFrame, title: str, label: str,
                    infeasible: dict | None = None) -> list[str]:
    """Compressed methods of a (dataset, model, budget) with no point within an accuracy budget, each with
    what was tried (:func:`tried`): ``tucker (one operating point: 4.77×; closest -5.90 pt)``;
    ``infeasible`` (:func:`infeasible_counts`) adds the settings the model could not meet."""
    shown = set() if headline.empty else set(
        headline.loc[(headline["dataset / model"] == title) & (headline["accuracy budget"] == label), "method"])
    keyed = [(d, m, b) for d, m, b in headline_groups(points) if group_title(points, d, m, b) == title]
    grp = compressed(points)
    out = {}
    for d, m, b in keyed:
        sub = grp[(grp["dataset"] == d) & (grp["model"] == m) & (grp["budget"] == b)]
        for method in sorted(set(sub["method"]) - shown):
            out[method] = tried(sub[sub["method"] == method], (infeasible or {}).get((d, m, method), 0))
    return [f"{method} ({text})" for method, text in sorted(out.items())]


def tried(p: pd.DataFrame, infeasible: int = 0) -> str:
    """What a method was tried at, in words: its operating points (distinct configs), the span of whole-model
    ratios over them and every basis, the settings that were infeasible on the model, and its closest point to
    the control on validation."""
    n = p["config"].nunique()
    lo, hi = p["compression_ratio"].min(), p["compression_ratio"].max()
    span = fmt_ratio(lo) if fmt_ratio(lo) == fmt_ratio(hi) else f"{fmt_ratio(lo)}–{fmt_ratio(hi)}"
    head = f"one operating point: {span}" if n == 1 else f"{n} operating points, {span}"
    if infeasible:
        head += f", {infeasible} more infeasible"
    delta = p["val_delta"]
    if delta.isna().all():
        return head + "; undecided on validation"
    up = bool(p["higher_better"].iloc[0])
    if up:
        best = p.loc[delta.idxmax()]
        gap = f"{best['val_delta']:+.2f} pt"
    else:
        rel = delta / p["control_val_metric"].abs()
        best = p.loc[rel.idxmin()]
        gap = f"{float(rel.min()):+.1%} RMSE"
    return f"{head}; closest {gap} at {fmt_ratio(best['compression_ratio'])}"


def _size(bits) -> str:
    kib = bits / 8 / 1024
    return f"{kib / 1024:,.2f} MiB" if kib >= 1024 else f"{kib:,.1f} KiB"


def summary_lines(points: pd.DataFrame, headline: pd.DataFrame, tolerance_acc: float = 1.0,
                  tolerance_rmse_rel: float = 0.05, infeasible: dict | None = None) -> list[str]:
    """One plain-words paragraph per (dataset, model, budget): who stores the model in the fewest bits
    within each accuracy budget, how much smaller that is, its test metric beside the control's, the
    runners-up, and the methods with nothing within the budget."""
    out = []
    for dataset, model, budget in headline_groups(points):
        title = group_title(points, dataset, model, budget)
        grp = points[(points["dataset"] == dataset) & (points["model"] == model) & (points["budget"] == budget)]
        up = bool(grp["higher_better"].iloc[0])
        sentences, previous = [], None
        for label, _, _ in accuracy_budgets(up, tolerance_acc, tolerance_rmse_rel):
            sub = headline[(headline["dataset / model"] == title) & (headline["accuracy budget"] == label)] \
                if not headline.empty else headline
            budget_words = label + " of the fine-tuned control on validation"
            missing = missing_methods(points, headline, title, label, infeasible)
            if sub.empty:
                sentences.append(f"No compressed point is {budget_words}.")
                continue
            w = sub.iloc[0]
            if previous is not None and previous[0] == (w["method"], w["basis"], w["config"]):
                added = sorted(set(sub["method"]) - previous[1])
                sentences.append(f"{label[0].upper() + label[1:]}: the same winner"
                                 + (f"; {', '.join(added)} now also qualif{'ies' if len(added) == 1 else 'y'}."
                                    if added else "."))
                previous = (previous[0], set(sub["method"]))
                continue
            previous = ((w["method"], w["basis"], w["config"]), set(sub["method"]))
            dec = _decimals(w["_metric"], w["_control"], up)
            test = fmt_mean_std(w["_test"], w["_test_std"], w["_n"], dec)
            ctrl = fmt_mean_std(w["_control"], w["_control_std"], w["_n"], dec)
            cfg = "" if w["config"] in ("", "default") else f"{w['config']}, "
            text = (f"{budget_words}, **{w['method']}** ({cfg}{w['basis']}) stores the model in "
                    f"**{_size(w['_bits'])}** ({w['ratio']} smaller than the dense {_size(w['_dense_bits'])}); "
                    f"test {w['_metric']} {test} vs the control's {ctrl}.")
            text = text[0].upper() + text[1:]
            rest = sub.iloc[1:4]
            if not rest.empty:
                text += " Next: " + "; ".join(f"{r['method']} {_size(r['_bits'])} ({r['ratio']})"
                                             for r in rest.to_dict("records")) + "."
            if missing:
                text += f" Nothing {label}: {', '.join(missing)}."
            sentences.append(text)
        out += [f"**{title}** ({_metric_words(_first(grp['metric_name']), up)}). " + " ".join(sentences), ""]
    return out


HEADLINE_TEXT = ("Per dataset and model (and training budget where there are several): for each accuracy budget, "
                 "every method's point with the fewest stored bits among those within the budget on validation "
                 "against the fine-tuned dense control (`dense_ft`), at whichever basis that is; ranked by stored "
                 "bits, the winner marked " + WINNER + ". Only points smaller than the control count (ratio above "
                 "1×). Beside each, the test metric of the chosen point and of that basis's control (mean ± std "
                 "over seeds): reported, never used to choose.")


def headline_section(points: pd.DataFrame, tolerance_acc: float, tolerance_rmse_rel: float,
                     infeasible: dict | None = None) -> list[str]:
    headline = headline_table(points, tolerance_acc, tolerance_rmse_rel)
    summary = summary_lines(points, headline, tolerance_acc, tolerance_rmse_rel, infeasible)
    lines = ["## Summary", "", *summary] if summary else []
    lines += ["## Headline: fewest stored bits within each accuracy budget", "", HEADLINE_TEXT, ""]
    if not headline_groups(points):
        return lines + ["Only `dense` and `dense_ft` runs succeeded: no compression method to rank.", ""]
    for dataset, model, budget in headline_groups(points):
        title = group_title(points, dataset, model, budget)
        grp = headline[headline["dataset / model"] == title] if not headline.empty else headline
        lines += [f"### {title}", ""]
        if not grp.empty:
            lines += [markdown_table(public_columns(grp).drop(columns="dataset / model")), ""]
        up = bool(points.loc[points["dataset"] == dataset, "higher_better"].iloc[0])
        for label, _, _ in accuracy_budgets(up, tolerance_acc, tolerance_rmse_rel):
            missing = missing_methods(points, headline, title, label, infeasible)
            if missing:
                lines += [f"Nothing {label}: {', '.join(missing)}.", ""]
    if not headline.empty and headline["note"].astype(bool).any():
        lines += [KEPT_EPOCH0_TEXT, ""]
    return lines
