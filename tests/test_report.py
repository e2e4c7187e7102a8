"""The leaderboard: hand-computed means, ranking, failures, plots, Pareto frontiers, empty input."""

import json
import re

import pandas as pd
import pytest

from bench.report import aggregate, compact_config, pareto_front, write_report
from bench.results import read_results, rows_to_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = [0, 1, 2]
LONG_ERROR = "RuntimeError: CUDA out of memory. " + "x" * 400

# (dataset, metric_name, dense per seed, {(method, config): (ratio, metrics per seed)})
ACC_DENSE = [91.5, 92.0, 92.5]
RMSE_DENSE = [0.10, 0.10, 0.10]
POINTS = {
    "mnist": ("accuracy", ACC_DENSE, {
        ("foo", '{"K": 16}'): (8.0, [90.0, 91.0, 92.0]),     # Δ = -1.0: exactly at the tolerance
        ("foo", '{"K": 4}'): (30.0, [85.0, 86.0, 87.0]),     # Δ = -6.0: outside
        ("bar", '{"p": 0.5}'): (2.0, [91.5, 92.0, 92.5]),
        ("bar", '{"p": 0.9}'): (12.0, [91.2, 91.5, 91.8]),
    }),
    "feynman": ("rmse", RMSE_DENSE, {
        ("foo", '{"K": 16}'): (8.0, [0.104, 0.104, 0.104]),  # +4 %: inside 5 %
        ("foo", '{"K": 4}'): (30.0, [0.2, 0.2, 0.2]),        # outside
        ("bar", '{"p": 0.5}'): (2.0, [0.1, 0.1, 0.1]),
        ("bar", '{"p": 0.9}'): (12.0, [0.103, 0.103, 0.103]),
    }),
}


def _row(dataset, metric_name, method, config, seed, metric, dense, ratio, requested=None):
    return {
        "run_id": f"{dataset}-{method}-{config}-{seed}", "sweep": "t",
        "dataset": dataset, "task": "classification" if metric_name == "accuracy" else "regression",
        "model": "kan", "arch": "kan[4,8,3]", "basis": "bspline", "method": method,
        "method_config": config, "seed": seed, "status": "ok", "error": None,
        "metric_name": metric_name, "metric": metric, "dense_metric": dense, "metric_delta": metric - dense,
        "compression_ratio": ratio, "coef_compression_ratio": ratio * 1.2, "requested_ratio": requested,
        "stored_bits": 8 * 1024 * 100 / ratio, "dense_bits": 8 * 1024 * 100, "file_bytes": 1024 * 101 / ratio,
        "params_trainable": 1000, "train_seconds": 1.5, "peak_memory_bytes": 2**20,
        "theoretical_speedup": 1.0,
    }


def synthetic_rows():
    rows = []
    for dataset, (metric_name, dense, points) in POINTS.items():
        for seed, d in zip(SEEDS, dense):
            rows.append(_row(dataset, metric_name, "dense", "{}", seed, d, d, 1.0))
            for (method, config), (ratio, metrics) in points.items():
                requested = ratio if method == "foo" else float("nan")
                rows.append(_row(dataset, metric_name, method, config, seed, metrics[seed], d, ratio, requested))
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
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_header_counts_tolerance_and_caller_lines(report):
    _, md = report
    assert md.startswith("# Test board")
    assert "Runs: 31 (30 ok, 1 failed, 0 diverged)" in md
    assert "at most 1 percentage point" in md and "at most 5% above" in md
    assert "- machine: test" in md


def test_mean_std_by_hand(report):
    _, md = report
    mnist = _section(md, "## mnist (accuracy)")
    foo16 = next(r for r in _table_rows(mnist) if "| foo | K=16 |" in r)
    assert "91.00 ± 1.00" in foo16  # mean and sample std of 90, 91, 92
    assert "-1.00" in foo16 and "8.00×" in foo16 and "9.60×" in foo16  # Δ, ratio, coef ratio
    assert "| ✓ |" in foo16  # -1.0 is within a 1-point tolerance
    feyn = _section(md, "## feynman (rmse)")
    foo16_r = next(r for r in _table_rows(feyn) if "| foo | K=16 |" in r)
    assert "0.1040 ± 0.0000" in foo16_r and "+4.0%" in foo16_r


@pytest.mark.parametrize("heading", ["## mnist (accuracy)", "## feynman (rmse)"])
def test_ranking_within_tolerance_by_ratio_then_the_rest(report, heading):
    _, md = report
    rows = _table_dicts(_section(md, heading))
    assert [(r["method"], r["config"]) for r in rows] == [
        ("bar", "p=0.9"), ("foo", "K=16"), ("bar", "p=0.5"), ("dense", ""), ("foo", "K=4")]
    assert [r["within tol."] for r in rows] == ["✓", "✓", "✓", "✓", "✗"]
    assert [r["ratio"] for r in rows] == ["12.0×", "8.00×", "2.00×", "1.00×", "30.0×"]


def test_requested_ratio_nan_renders_as_dash(report):
    _, md = report
    rows = {(r["method"], r["config"]): r for r in _table_dicts(_section(md, "## mnist (accuracy)"))}
    assert rows["bar", "p=0.9"]["requested"] == "—" and rows["foo", "K=16"]["requested"] == "8.00×"
    assert rows["bar", "p=0.9"]["stored KiB"] == "8.3"  # 100 KiB / 12


def test_headline_best_ratio_within_tolerance(report):
    _, md = report
    head = _section(md, "## Headline")
    rows = {(r["dataset"], r["method"]): r for r in _table_dicts(head)}
    assert set(rows) == {("mnist", "foo"), ("mnist", "bar"), ("feynman", "foo"), ("feynman", "bar")}
    assert (rows["mnist", "bar"]["best ratio within tol."], rows["mnist", "bar"]["config"]) == ("12.0×", "p=0.9")
    assert rows["mnist", "bar"]["metric (mean ± std)"] == "accuracy 91.50 ± 0.30"
    assert rows["mnist", "foo"]["metric (mean ± std)"] == "accuracy 91.00 ± 1.00"
    assert rows["feynman", "foo"]["best ratio within tol."] == "8.00×"  # 30× is +100 % RMSE
    assert rows["feynman", "foo"]["Δ vs dense"] == "+0.0040 (+4.0%)"


def test_failed_run_listed_with_truncated_error(report):
    _, md = report
    fail = _section(md, "## Failed and diverged runs")
    assert "mnist/kan/bspline/foo(K=64)/seed0" in fail
    assert "RuntimeError: CUDA out of memory." in fail
    assert LONG_ERROR not in fail and "…" in fail
    assert "K=64" not in _section(md, "## mnist (accuracy)")  # failed rows never enter tables


def test_plots_are_pngs_linked_from_markdown(report):
    out, md = report
    links = re.findall(r"!\[[^\]]*\]\((metric_vs_ratio[^)]+\.png)\)", md)
    assert sorted(links) == ["metric_vs_ratio_feynman.png", "metric_vs_ratio_mnist.png"]
    for name in links:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_single_seed_and_missing_dense_runs():
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["seed"] == 0 and r["method"] != "dense"]
    pts = aggregate(rows_to_frame(rows))
    dense = pts[(pts["dataset"] == "mnist") & (pts["method"] == "dense")]
    assert len(dense) == 1 and bool(dense["synthetic"].iloc[0])  # control built from dense_metric
    assert dense["metric"].iloc[0] == pytest.approx(91.5)
    assert pts["metric_std"].isna().all() or (pts["n_seeds"] == 1).all()


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
    front = pareto_front(pts, higher_is_better=True)
    assert list(zip(front["compression_ratio"], front["metric"])) == [(2, 92), (8, 91.5), (16, 80)]


def test_pareto_front_lower_is_better():
    pts = pd.DataFrame({"compression_ratio": [1, 2, 4, 8, 16, 16],
                        "metric": [0.1, 0.1, 0.12, 0.11, 0.3, 0.3]})
    front = pareto_front(pts, higher_is_better=False)
    assert list(zip(front["compression_ratio"], front["metric"])) == [(2, 0.1), (8, 0.11), (16, 0.3)]


def test_compact_config():
    assert compact_config('{"K": 16, "d": 1}') == "K=16, d=1"
    assert compact_config("{}") == "" and compact_config(None) == ""
    assert compact_config('{"bits": 8, "lr": 0.001, "sizes": [2, 4]}') == "bits=8, lr=0.001, sizes=[2,4]"


def test_method_with_no_point_within_tolerance_says_none(tmp_path):
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["dataset"] == "mnist"
            and (r["method"] == "dense" or r["method_config"] == '{"K": 4}')]
    md = write_report(rows_to_frame(rows), tmp_path).read_text()
    (row,) = _table_dicts(_section(md, "## Headline"))
    assert (row["method"], row["best ratio within tol."]) == ("foo", "none")


def test_reads_a_parquet_results_folder(tmp_path):
    rows_to_frame(synthetic_rows()).to_parquet(tmp_path / "runs.parquet", index=False)
    md = write_report(read_results(tmp_path), tmp_path / "board").read_text()
    assert "91.00 ± 1.00" in md and "seed0" in md


def test_compact_config_shows_only_non_defaults_of_registered_methods():
    from bench.methods import METHODS
    from bench.registry import load_plugins
    from bench.report import compact_config

    load_plugins()
    cfg = METHODS["quantize"](bits=4).config_dict()
    assert compact_config(json.dumps(cfg), "quantize") == "bits=4"
    assert compact_config(json.dumps(METHODS["quantize"]().config_dict()), "quantize") == "default"
    assert compact_config('{"K": 3}', "not_registered") == "K=3"


def test_budget_ladder_and_paper_claims(report):
    out, md = report
    ladder = _section(md, "## Best whole-model ratio by accuracy budget")
    assert "≤ 0.5 pt" in ladder and "≤ 1 pt" in ladder and "≤ 5% RMSE" in ladder
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
    assert page.count("data:image/png;base64,") == md.count("![")
    assert 'src="metric' not in page  # every image inlined: the page stands alone
