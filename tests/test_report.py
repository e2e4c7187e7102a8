"""The leaderboard: hand-computed means, validation-only decisions against the dense_ft control,
ranking, budgets as groups, kept-epoch-0 notes, infeasible vs failed, plots, Pareto frontiers."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from bench.report import aggregate, compact_config, pareto_front, within_tolerance, write_report
from bench.run.results import read_results, rows_to_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = [0, 1, 2]
LONG_ERROR = "RuntimeError: CUDA out of memory. " + "x" * 400

# Per dataset: metric name, the dense_ft control's (test, val) per seed, the plain dense base's
# (test, val) per seed, and {(method, config): (ratio, test per seed, val per seed)}.
POINTS = {
    "mnist": ("accuracy", ([92.0, 92.5, 93.0], [92.5, 93.0, 93.5]), ([91.5, 92.0, 92.5], [92.0, 92.5, 93.0]), {
        ("foo", '{"K": 16}'): (8.0, [90.0, 91.0, 92.0], [91.5, 92.0, 92.5]),   # val Δ = -1.0: at the tolerance
        ("foo", '{"K": 4}'): (30.0, [85.0, 86.0, 87.0], [86.0, 87.0, 88.0]),   # val Δ = -6.0: outside
        ("bar", '{"p": 0.5}'): (2.0, [91.5, 92.0, 92.5], [92.5, 93.0, 93.5]),
        ("bar", '{"p": 0.9}'): (12.0, [91.2, 91.5, 91.8], [92.0, 92.5, 93.0]),  # val Δ = -0.5
    }),
    "feynman": ("rmse", ([0.10] * 3, [0.10] * 3), ([0.11] * 3, [0.11] * 3), {   # dense: +10 % val: outside
        ("foo", '{"K": 16}'): (8.0, [0.104] * 3, [0.104] * 3),  # +4 %: inside 5 %
        ("foo", '{"K": 4}'): (30.0, [0.2] * 3, [0.2] * 3),      # outside
        ("bar", '{"p": 0.5}'): (2.0, [0.1] * 3, [0.1] * 3),
        ("bar", '{"p": 0.9}'): (12.0, [0.103] * 3, [0.103] * 3),
    }),
}


def _row(dataset, metric_name, method, config, seed, metric, val, ratio, control=(None, None), dense=(None, None),
         requested=None, basis="bspline", finetune_best_epoch=float("nan"), **extra):
    row = {
        "run_id": f"{dataset}-{basis}-{method}-{config}-{seed}-{extra}", "sweep": "t",
        "dataset": dataset, "task": "classification" if metric_name == "accuracy" else "regression",
        "model": "kan", "arch": "kan[4,8,3]", "basis": basis, "method": method,
        "method_config": config, "seed": seed, "status": "ok", "error": None,
        "metric_name": metric_name, "metric": metric, "val_metric": val,
        "control_metric": control[0], "control_val_metric": control[1],
        "dense_metric": dense[0], "dense_val_metric": dense[1],
        "metric_delta": metric - control[0] if control[0] is not None else None,
        "compression_ratio": ratio, "coef_compression_ratio": ratio * 1.2, "file_compression_ratio": ratio * 0.9,
        "requested_ratio": requested,
        "stored_bits": 8 * 1024 * 100 / ratio, "dense_bits": 8 * 1024 * 100, "file_bytes": 1024 * 101 / ratio,
        "header_bytes": 64, "params_trainable": 1000, "train_seconds": 1.5, "peak_memory_bytes": 2**20,
        "theoretical_speedup": 1.0, "best_epoch": 7, "epochs_run": 10, "finetune_best_epoch": finetune_best_epoch,
        "epochs": 10, "finetune_epochs": 3, "lr": 1e-3, "batch_size": 64, "finetune_lr_scale": 0.1,
    }
    row.update(extra)
    return row


def synthetic_rows():
    rows = []
    for dataset, (metric_name, (ctest, cval), (dtest, dval), points) in POINTS.items():
        for seed in SEEDS:
            ctrl, dense = (ctest[seed], cval[seed]), (dtest[seed], dval[seed])
            rows.append(_row(dataset, metric_name, "dense", "{}", seed, *dense, 1.0, ctrl, dense))
            rows.append(_row(dataset, metric_name, "dense_ft", "{}", seed, *ctrl, 1.0, ctrl, dense,
                             finetune_best_epoch=2))
            for (method, config), (ratio, test, val) in points.items():
                requested = ratio if method == "foo" else float("nan")
                rows.append(_row(dataset, metric_name, method, config, seed, test[seed], val[seed], ratio, ctrl,
                                 dense, requested, finetune_best_epoch=3))
    rows.append({"run_id": "boom", "sweep": "t", "dataset": "mnist", "model": "kan", "basis": "bspline",
                 "method": "foo", "method_config": json.dumps({"K": 64}), "seed": 0, "status": "failed",
                 "error": LONG_ERROR})
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(rows_to_frame(synthetic_rows()), out, title="Test board", header_lines=["machine: test"])
    return out, path.read_text()


def _section(md: str, heading: str) -> str:
    start = md.index(heading)
    end = md.find("\n## ", start + 1)
    return md[start:end if end != -1 else None]


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def _table_dicts(section: str) -> list[dict]:
    """The first markdown table of a section as {header: cell} dicts."""
    lines, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_header_counts_tolerance_and_caller_lines(report):
    _, md = report
    assert md.startswith("# Test board")
    assert "Runs: 37 (36 ok, 1 failed, 0 diverged, 0 infeasible)" in md
    assert "at most 1 percentage point" in md and "at most 5% above" in md
    assert "decided on validation against the fine-tuned dense control; test reported once" in md
    assert "- machine: test" in md


def test_mean_std_by_hand(report):
    _, md = report
    mnist = _section(md, "## mnist (accuracy)")
    foo16 = {r["config"]: r for r in _table_dicts(mnist) if r["method"] == "foo"}["K=16"]
    assert foo16["test accuracy (mean ± std)"] == "91.00 ± 1.00"  # mean and sample std of 90, 91, 92
    assert foo16["test Δ vs control"] == "-1.50"  # vs dense_ft's 92.5, not dense's 92.0
    assert foo16["val Δ vs control"] == "-1.00" and foo16["within tol. (val)"] == "✓"  # at a 1-point tolerance
    assert foo16["ratio (file, coef)"] == "8.00× (7.20×, 9.60×)"
    assert foo16["epochs best/run"] == "7/10"
    feyn = _section(md, "## feynman (rmse)")
    foo16_r = next(r for r in _table_rows(feyn) if "| foo | K=16 |" in r)
    assert "0.1040 ± 0.0000" in foo16_r and "+4.0%" in foo16_r


@pytest.mark.parametrize("heading, order, marks", [
    ("## mnist (accuracy)",
     [("dense_ft (control)", ""), ("bar", "p=0.9"), ("foo", "K=16"), ("bar", "p=0.5"), ("dense", ""), ("foo", "K=4")],
     ["control", "✓", "✓", "✓", "✓", "✗"]),
    ("## feynman (rmse)",  # the plain dense base is 10 % worse on validation than the fine-tuned control
     [("dense_ft (control)", ""), ("bar", "p=0.9"), ("foo", "K=16"), ("bar", "p=0.5"), ("foo", "K=4"), ("dense", "")],
     ["control", "✓", "✓", "✓", "✗", "✗"]),
])
def test_ranking_control_first_then_within_tolerance_by_ratio(report, heading, order, marks):
    _, md = report
    rows = _table_dicts(_section(md, heading))
    assert [(r["method"], r["config"]) for r in rows] == order
    assert [r["within tol. (val)"] for r in rows] == marks


def test_stored_and_file_size(report):
    _, md = report
    rows = {(r["method"], r["config"]): r for r in _table_dicts(_section(md, "## mnist (accuracy)"))}
    assert rows["bar", "p=0.9"]["stored KiB (file; ONNX)"] == "8.3 (8.4; —)"  # 100, 101 KiB / 12; no ONNX here


def _headline(md: str) -> list[dict]:
    """Every row of every table under the headline section, with its group heading as "group"."""
    head = _section(md, "## Headline")
    rows = []
    for part in head.split("\n### ")[1:]:
        title = part.splitlines()[0]
        rows += [dict(r, group=title) for r in _table_dicts(part)]
    return rows


def test_headline_ranks_methods_by_bits_within_each_budget(report):
    _, md = report
    rows = [(r["group"], r["accuracy budget"], r["rank"], r["method"], r["config"], r["stored KiB"])
            for r in _headline(md)]
    assert rows == [
        # feynman: bar p=0.9 (+3 %) stores 8.3 KiB, foo K=16 (+4 %) 12.5 KiB; foo K=4 (+100 %) is outside
        ("feynman, kan[4,8,3]", "within 5% RMSE", "★ 1", "bar", "p=0.9", "8.3"),
        ("feynman, kan[4,8,3]", "within 5% RMSE", "2", "foo", "K=16", "12.5"),
        # mnist: within 0.5 pt only bar p=0.9 (val Δ -0.5); within 1 pt foo K=16 (val Δ -1.0) joins
        ("mnist, kan[4,8,3]", "within 0.5 pt", "★ 1", "bar", "p=0.9", "8.3"),
        ("mnist, kan[4,8,3]", "within 1 pt", "★ 1", "bar", "p=0.9", "8.3"),
        ("mnist, kan[4,8,3]", "within 1 pt", "2", "foo", "K=16", "12.5"),
    ]
    bar = _headline(md)[2]
    assert (bar["ratio"], bar["basis"], bar["test (mean ± std)"], bar["control test"]) == (
        "12.0×", "bspline", "91.50 ± 0.30", "92.50 ± 0.50")
    assert bar["test Δ vs control"] == "-1.00" and bar["val Δ vs control"] == "-0.50"
    assert _headline(md)[1]["test Δ vs control"] == "+0.0040 (+4.0%)"
    # a method with nothing within a budget says what it was tried at and how close it came (on validation)
    assert ("Nothing within 0.5 pt: foo (2 operating points, 8.00×–30.0×; closest -1.00 pt at 8.00×)."
            in _section(md, "## Headline"))


def test_summary_names_the_winner_in_plain_words(report):
    _, md = report
    summary = _section(md, "## Summary")
    assert ("**mnist, kan[4,8,3]** (accuracy, higher is better). Within 0.5 pt of the fine-tuned control on "
            "validation, **bar** (p=0.9, bspline) stores the model in **8.3 KiB** (12.0× smaller than the dense "
            "100.0 KiB); test accuracy 91.50 ± 0.30 vs the control's 92.50 ± 0.50.") in summary
    assert ("Nothing within 0.5 pt: foo (2 operating points, 8.00×–30.0×; closest -1.00 pt at 8.00×). Within 1 pt: "
            "the same winner; foo now also qualifies.") in summary
    assert "Next: foo 12.5 KiB (8.00×)." in summary  # feynman's runner-up


def _decision_frame(metric_name="accuracy"):
    """Per seed, two bases with their own control. ``valgood`` is within tolerance on validation and far
    outside on test; ``testgood`` the other way round. On basis ``b`` valgood reaches more compression
    but only on test, so the headline must credit basis ``a``."""
    acc = metric_name == "accuracy"
    rows = []
    for seed in SEEDS:
        for basis, ctrl in (("a", (90.0, 91.0) if acc else (0.10, 0.10)), ("b", (80.0, 81.0) if acc else (0.20, 0.20))):
            def val_near(c):
                return c - 0.2 if acc else c * 1.02

            def far(c):
                return c - 10.0 if acc else c * 2.0

            r = dict(control=ctrl, dense=ctrl, basis=basis, metric_name=metric_name, seed=seed, dataset="d")
            rows.append(_row(method="dense", config="{}", metric=ctrl[0], val=ctrl[1], ratio=1.0, **r))
            rows.append(_row(method="dense_ft", config="{}", metric=ctrl[0], val=ctrl[1], ratio=1.0, **r))
            rows.append(_row(method="valgood", config='{"k": 1}', metric=far(ctrl[0]), val=val_near(ctrl[1]),
                             ratio=20.0 if basis == "a" else 50.0, **r))
            rows.append(_row(method="testgood", config='{"k": 2}', metric=ctrl[0], val=far(ctrl[1]), ratio=40.0,
                             **r))
            if basis == "b":  # valgood's bigger ratio on b: good on test, outside on validation
                rows.append(_row(method="valgood", config='{"k": 9}', metric=ctrl[0], val=far(ctrl[1]), ratio=99.0,
                                 **r))
    return rows


@pytest.mark.parametrize("metric_name", ["accuracy", "rmse"])
def test_tolerance_and_headline_read_validation_never_test(tmp_path, metric_name):
    df = rows_to_frame(_decision_frame(metric_name))
    pts = aggregate(df)
    within = dict(zip(zip(pts["basis"], pts["method"], pts["config"]), within_tolerance(pts)))
    assert within["a", "valgood", "k=1"] and within["b", "valgood", "k=1"]
    assert not within["a", "testgood", "single config"] and not within["b", "testgood", "single config"]
    assert not within["b", "valgood", "k=9"]  # perfect on test, outside on validation
    md = write_report(df, tmp_path).read_text()
    rows = [r for r in _headline(md) if r["accuracy budget"] in ("within 1 pt", "within 5% RMSE")]
    assert [r["method"] for r in rows] == ["valgood"]  # testgood: never within on validation
    best = rows[0]
    assert (best["ratio"], best["basis"], best["config"]) == ("50.0×", "b", "k=1")  # fewest bits: basis b
    # beside it, that basis's own control (b), never basis a's
    assert best["control test"].startswith("80.00" if metric_name == "accuracy" else "0.2000")
    assert "testgood" in _section(md, "## Headline").split("Nothing within")[-1]


def test_budgets_are_separate_groups_not_seeds(tmp_path):
    rows = []
    for epochs, base in ((10, 90.0), (20, 95.0)):
        for seed in (0, 1):
            ctrl = (base + seed, base + seed)
            for method, ratio in (("dense", 1.0), ("dense_ft", 1.0), ("foo", 4.0)):
                rows.append(_row("mnist", "accuracy", method, "{}" if ratio == 1 else '{"K": 4}', seed, ctrl[0],
                                 ctrl[1], ratio, ctrl, ctrl, epochs=epochs))
    df = rows_to_frame(rows)
    pts = aggregate(df)
    foo = pts[pts["method"] == "foo"]
    assert len(foo) == 2 and (foo["n_seeds"] == 2).all()
    assert sorted(foo["metric"]) == [90.5, 95.5]
    assert sorted(foo["budget"]) == ["epochs=10, lr=0.001, batch=64, ft epochs=3, ft lr scale=0.1",
                                     "epochs=20, lr=0.001, batch=64, ft epochs=3, ft lr scale=0.1"]
    md = write_report(df, tmp_path).read_text()
    assert md.count("### mnist / kan / bspline / epochs=") == 2
    groups = sorted({r["group"] for r in _headline(md)})
    assert [g.split("(")[1].split(",")[0] for g in groups] == ["epochs=10", "epochs=20"]


def test_finetune_kept_epoch_0_is_noted(tmp_path):
    rows = []
    for seed, kept in zip(SEEDS, (0, 0, 4)):
        ctrl = (92.0, 92.0)
        rows.append(_row("mnist", "accuracy", "dense_ft", "{}", seed, 92.0, 92.0, 1.0, ctrl, ctrl,
                         finetune_best_epoch=3))
        rows.append(_row("mnist", "accuracy", "foo", '{"K": 8}', seed, 91.9, 91.9, 8.0, ctrl, ctrl,
                         finetune_best_epoch=kept))
        rows.append(_row("mnist", "accuracy", "bar", '{"p": 1}', seed, 91.9, 91.9, 8.0, ctrl, ctrl,
                         finetune_best_epoch=0))
        rows.append(_row("mnist", "accuracy", "baz", '{"q": 1}', seed, 91.9, 91.9, 8.0, ctrl, ctrl))  # no fine-tune
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    table = {r["method"]: r for r in _table_dicts(_section(md, "## mnist (accuracy)"))}
    assert table["foo"]["note"] == "fine-tune kept epoch 0 (2/3)"
    assert table["bar"]["note"] == "fine-tune kept epoch 0 (3/3)"
    assert table["baz"]["note"] == "" and table["dense_ft (control)"]["note"] == ""
    assert "changed nothing" in _section(md, "## mnist (accuracy)")
    head = {r["method"]: r for r in _headline(md) if r["accuracy budget"] == "within 1 pt"}
    assert head["foo"]["note"] == "fine-tune kept epoch 0 (2/3)"


def test_infeasible_rows_have_their_own_table_and_are_not_failures(tmp_path):
    rows = [r for r in synthetic_rows() if r["dataset"] == "mnist"]
    reason = "Infeasible: ratio 1000 is below the smallest connected model (max 41.2x)"
    for seed in SEEDS:
        rows.append({"run_id": f"inf{seed}", "dataset": "mnist", "model": "kan", "basis": "bspline", "method": "prune",
                     "method_config": '{"ratio": 1000}', "seed": seed, "status": "infeasible", "error": reason})
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    assert "Runs: 22 (18 ok, 1 failed, 0 diverged, 3 infeasible)" in md
    (row,) = _table_dicts(_section(md, "## Infeasible settings"))
    assert (row["dataset"], row["basis"], row["method"], row["config"]) == ("mnist", "bspline", "prune", "ratio=1000")
    assert row["seeds"] == "0, 1, 2" and row["reason"] == reason
    fail = _section(md, "## Failed and diverged runs")
    assert "prune" not in fail and "seed0" in fail  # only the failed foo run


def test_failed_run_listed_with_truncated_error(report):
    _, md = report
    fail = _section(md, "## Failed and diverged runs")
    assert "mnist/kan/bspline/foo(K=64)/seed0" in fail
    assert "RuntimeError: CUDA out of memory." in fail
    assert LONG_ERROR not in fail and "…" in fail
    assert "K=64" not in _section(md, "## mnist (accuracy)")  # failed rows never enter tables
    assert "## Infeasible settings" not in md


def test_plots_are_pngs_linked_from_markdown(report):
    out, md = report
    links = re.findall(r"!\[[^\]]*\]\((metric_vs_bits[^)]+\.png)\)", md)
    assert sorted(links) == ["metric_vs_bits_feynman.png", "metric_vs_bits_mnist.png"]
    for name in links:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_single_seed_and_missing_control_runs():
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["seed"] == 0
            and r["method"] not in ("dense", "dense_ft")]
    pts = aggregate(rows_to_frame(rows))
    mnist = pts[pts["dataset"] == "mnist"].set_index("method")
    assert mnist.loc["dense_ft", "synthetic"] and mnist.loc["dense", "synthetic"]  # built from the run columns
    assert mnist.loc["dense_ft", "metric"] == pytest.approx(92.0)  # control_metric
    assert mnist.loc["dense_ft", "val_metric"] == pytest.approx(92.5)  # control_val_metric
    assert mnist.loc["dense", "metric"] == pytest.approx(91.5)  # dense_metric
    assert (pts["control"] == "dense_ft").all()
    assert (pts["n_seeds"] == 1).all() and pts["metric_std"].isna().all()  # one seed: no spread to show


def test_old_rows_fall_back_to_the_dense_control(tmp_path):
    """No dense_ft and no control columns (an older runner): the dense runs' val_metric decides."""
    drop = {"control_metric", "control_val_metric", "dense_val_metric", "finetune_best_epoch"}
    rows = [{k: v for k, v in r.items() if k not in drop} for r in synthetic_rows()
            if r["method"] != "dense_ft" and r["dataset"] == "mnist"]
    for r in rows:
        r["metric_delta"] = r.get("metric", np.nan) - r.get("dense_metric", np.nan) if r["status"] == "ok" else None
    df = rows_to_frame(rows)
    pts = aggregate(df)
    assert (pts["control"] == "dense").all()
    pts["within_tol"] = within_tolerance(pts)
    foo = pts.set_index(["method", "config"])
    assert foo.loc[("foo", "K=16"), "val_delta"] == pytest.approx(-0.5)  # vs dense val 92.5
    assert foo.loc[("foo", "K=16"), "metric_delta"] == pytest.approx(-1.0)  # vs dense test 92.0
    md = write_report(df, tmp_path).read_text()
    assert "No `dense_ft` control in these rows" in md
    assert _table_dicts(_section(md, "## mnist (accuracy)"))[0]["method"] == "dense (control)"


def test_without_validation_metric_nothing_is_within_tolerance(tmp_path):
    rows = [dict(r, val_metric=None, control_val_metric=None, dense_val_metric=None) for r in synthetic_rows()]
    df = rows_to_frame(rows)
    pts = aggregate(df)
    assert not within_tolerance(pts).any()
    md = write_report(df, tmp_path).read_text()
    assert "no decision could be made on validation" in md
    assert _headline(md) == [] and "Nothing within 1 pt: bar (" in md and "), foo (" in md
    marks = {r["within tol. (val)"] for r in _table_dicts(_section(md, "## mnist (accuracy)"))}
    assert marks == {"control", "—"}


def test_ratio_below_one_is_never_headline_compression(tmp_path):
    ctrl = (92.0, 92.0)
    rows = [_row("mnist", "accuracy", m, c, s, 92.0, 92.0, ratio, ctrl, ctrl)
            for s in SEEDS for m, c, ratio in (("dense_ft", "{}", 1.0), ("foo", '{"K": 1}', 0.99))]
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    assert _headline(md) == []  # within tolerance, but it stores more than the control: not compression
    assert "Nothing within 0.5 pt: foo (" in md and "No compressed point is within 1 pt" in md


def test_single_seed_renders_honestly(tmp_path):
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["seed"] == 0]
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    assert "90.00 (1 seed)" in md and "± nan" not in md.lower()


@pytest.mark.parametrize("rows", [[], [{"run_id": "x", "dataset": "d", "method": "foo", "seed": 0,
                                         "status": "failed", "error": "bad config"}]])
def test_no_successful_runs(tmp_path, rows):
    path = write_report(rows_to_frame(rows), tmp_path)
    md = path.read_text()
    assert path.name == "LEADERBOARD.md" and "no successful runs" in md.lower()
    assert not list(tmp_path.glob("*.png"))
    if rows:
        assert "bad config" in md


def test_pareto_front_higher_is_better():
    pts = pd.DataFrame({"compression_ratio": [1, 2, 4, 8, 16, 8, 32],
                        "metric": [92, 92, 91, 91.5, 80, 85, float("nan")]})
    front = pareto_front(pts, higher_is_better=True, y="metric")
    assert list(zip(front["compression_ratio"], front["metric"])) == [(2, 92), (8, 91.5), (16, 80)]


def test_pareto_front_lower_is_better():
    pts = pd.DataFrame({"compression_ratio": [1, 2, 4, 8, 16, 16],
                        "metric": [0.1, 0.1, 0.12, 0.11, 0.3, 0.3]})
    front = pareto_front(pts, higher_is_better=False, y="metric")
    assert list(zip(front["compression_ratio"], front["metric"])) == [(2, 0.1), (8, 0.11), (16, 0.3)]


def test_pareto_front_is_chosen_on_validation_by_default():
    pts = pd.DataFrame({"compression_ratio": [1, 4, 8], "val_metric": [92, 91, 90], "metric": [92, 80, 91]})
    front = pareto_front(pts, higher_is_better=True)
    assert list(front["compression_ratio"]) == [1, 4, 8]  # on test, 4× would be dominated by 8×


def test_compact_config():
    assert compact_config('{"K": 16, "d": 1}') == "K=16, d=1"
    assert compact_config("{}") == "" and compact_config(None) == ""
    assert compact_config('{"bits": 8, "lr": 0.001, "sizes": [2, 4]}') == "bits=8, lr=0.001, sizes=[2,4]"


def test_method_with_no_point_within_tolerance_says_none(tmp_path):
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["dataset"] == "mnist"
            and (r["method"] in ("dense", "dense_ft") or r["method_config"] == '{"K": 4}')]
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    assert _headline(md) == [] and "Nothing within 1 pt: foo (" in md


def test_reads_a_parquet_results_folder(tmp_path):
    rows_to_frame(synthetic_rows()).to_parquet(tmp_path / "runs.parquet", index=False)
    md = write_report(read_results(tmp_path), tmp_path / "board").read_text()
    assert "91.00 ± 1.00" in md and "seed0" in md


def test_config_labels_read_the_rows_never_the_plugins():
    """The runner writes what differs from the method's defaults; older rows show what varies."""
    from bench.compression.methods import METHODS
    from bench.registry import load_plugins
    from bench.report import config_labels
    from bench.run.runner import nondefault_config

    load_plugins()
    full = METHODS["quantize"](bits=4).config_dict()
    assert len(full) > 1 and nondefault_config("quantize", full) == '{"bits": 4}'
    assert nondefault_config("quantize", METHODS["quantize"]().config_dict()) == "{}"
    assert nondefault_config("not_registered", {"K": 3}) is None
    frame = pd.DataFrame({"method": ["q", "q", "q", "m", "m"],
                          "method_config": ['{"bits": 4, "mode": "qat"}', '{"bits": 8, "mode": "qat"}',
                                            '{"bits": 2, "mode": "qat"}', '{"K": 8, "d": 1}', '{"K": 8, "d": 1}'],
                          "method_config_nondefault": ['{"bits": 4}', "{}", None, None, None]})
    assert list(config_labels(frame)) == ["bits=4", "default", "bits=2", "single config", "single config"]
    assert list(config_labels(frame, full_when_single=True))[3] == "K=8, d=1"


def test_metric_direction_column_decides_over_the_metric_name(tmp_path):
    """A metric the report has never heard of ("nll_bits") is lower-is-better because the rows say so."""
    rows = [dict(r, metric_name="nll_bits", metric_direction="lower") for r in synthetic_rows()
            if r["dataset"] == "feynman"]
    pts = aggregate(rows_to_frame(rows))
    pts["within_tol"] = within_tolerance(pts)
    within = dict(zip(pts["config"], pts["within_tol"]))
    assert within["K=16"] and not within["K=4"]  # +4 % inside 5 %, +100 % outside
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    assert "within 5% RMSE" in md and "(nll_bits, lower is better)" in md


def test_paper_claims(report):
    out, md = report
    claims = _section(md, "## Compared with the papers' headline claims")
    assert "80×" in claims and "124.1×" in claims and "MetaKAN" in claims
    assert "not measured" in claims  # no metacluster / metakan runs in the synthetic frame


def test_extra_figures_and_self_contained_html(report):
    out, md = report
    for name in ("metric_vs_speedup.png", "training_resources.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    # the per-dataset PNGs become interactive plots; the other figures are inlined
    assert page.count('class="plotly-graph-div"') == 2
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == md.count("![") - 2
    assert 'src="metric' not in page and 'src="http' not in page  # nothing fetched: it opens offline
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"?https?:", page)  # no CDN, no remote file
    assert "Plotly.newPlot" in page


@pytest.mark.parametrize("metric_name", ["accuracy", "rmse"])
def test_nothing_within_budget_says_what_was_tried(tmp_path, metric_name):
    """A method tried at one size has not been compared: the report flags it and names its range."""
    acc = metric_name == "accuracy"
    ctrl = (90.0, 90.0) if acc else (0.10, 0.10)
    rows = []
    for seed in SEEDS:
        r = dict(dataset="d", metric_name=metric_name, seed=seed, control=ctrl, dense=ctrl)
        rows += [_row(method="dense", config="{}", metric=ctrl[0], val=ctrl[1], ratio=1.0, **r),
                 _row(method="dense_ft", config="{}", metric=ctrl[0], val=ctrl[1], ratio=1.0, **r),
                 _row(method="single", config='{"r": 1}', metric=ctrl[0] - 6 if acc else 0.2,
                      val=ctrl[1] - 6 if acc else 0.2, ratio=4.7, **r)]
        for k, (gap, ratio) in enumerate(((3.0, 2.0), (8.0, 4.0), (20.0, 8.0), (40.0, 16.0))):
            val = ctrl[1] - gap if acc else ctrl[1] * (1 + gap / 10)
            rows.append(_row(method="curve", config=json.dumps({"k": k}), metric=val, val=val, ratio=ratio, **r))
        for k in (2, 3):  # settings the model could not meet: counted as tried, not as points
            rows.append({**_row(method="single", config=json.dumps({"r": k}), metric=float("nan"), val=float("nan"),
                                ratio=float("nan"), **r), "status": "infeasible"})
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    head = _section(md, "## Headline")
    if acc:
        assert "curve (4 operating points, 2.00×–16.0×; closest -3.00 pt at 2.00×)" in head
        assert "single (one operating point: 4.70×, 2 more infeasible; closest -6.00 pt at 4.70×)" in head
    else:
        assert "curve (4 operating points, 2.00×–16.0×; closest +30.0% RMSE at 2.00×)" in head
        assert "single (one operating point: 4.70×, 2 more infeasible; closest +100.0% RMSE at 4.70×)" in head


def test_the_figure_flags_a_method_tried_at_one_operating_point(tmp_path):
    """Issue 26: a method with a single point per facet is a point, not a curve; the figure's legend
    labels it so."""
    from bench.report.numbers import single_point_methods
    from bench.report.plots import _legend_handles

    rows = [r for r in synthetic_rows() if r["status"] == "ok"]
    assert single_point_methods(aggregate(rows_to_frame(rows))) == set()  # foo and bar: two points each
    foo_configs = sorted({r["method_config"] for r in rows if r["method"] == "foo"})
    one_foo = [r for r in rows if r["method"] != "foo" or r["method_config"] == foo_configs[0]]
    assert single_point_methods(aggregate(rows_to_frame(one_foo))) == {"foo"}
    labels = [h.get_label() for h in _legend_handles({"foo": "red", "bar": "blue"}, {"dense_ft"}, True, 1.0,
                                                     0.05, {"foo"})]
    assert labels[:2] == ["foo (one operating point)", "bar"]
    write_report(rows_to_frame(one_foo), tmp_path, title="t")  # the interactive page's legend too
    page = (tmp_path / "index.html").read_text()
    assert "foo (one operating point)" in page and "bar (one operating point)" not in page


def test_header_names_the_versions_the_rows_were_made_with_not_the_renderers():
    """Results made on a GPU machine (Python 3.12, torch 2.11) and rendered here once printed this machine's
    Python and torch as theirs."""
    import pandas as pd

    from bench.report.cli import provenance_lines

    rows = pd.DataFrame({"host": ["gpu-box", "gpu-box"], "device": ["cuda", "cuda"], "python": ["3.12.3", "3.12.3"],
                         "torch_version": ["2.11.0+cu130", "2.11.0+cu130"], "git_sha": ["5da63c7", "5da63c7"]})
    assert provenance_lines(rows) == ["Machine: hosts: gpu-box | devices: cuda",
                                      "Versions: python 3.12.3, torch 2.11.0+cu130 | git: 5da63c7"]
    assert provenance_lines(rows[["host"]])[1] == "Versions: python ?, torch ? | git: ?"  # old rows say nothing
