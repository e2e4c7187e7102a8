import json

import pandas as pd
import pytest

from bench.run.results import COLUMNS, ResultsStore
from bench.run.runner import RunEnv, derive_seed, run_one, run_sweep
from bench.run.sweep import build_sweep

TINY_TRAIN = {"epochs": 2, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3}


def tiny_sweep(**over):
    data = {"name": "t", "datasets": ["tiny_images"], "models": ["kan"], "bases": ["bspline"],
            "methods": ["dense"], "seeds": [0], "train": dict(TINY_TRAIN), "device": "cpu"}
    data.update(over)
    return build_sweep(data)


def test_sweep_writes_parquet_and_csv_with_all_columns(tmp_path):
    sweep = tiny_sweep(datasets=["tiny_images", "tiny_regression"], bases=["bspline", "rbf"])
    counts = run_sweep(sweep, tmp_path, tmp_path / "data", quiet=True)
    assert counts["ok"] == 4
    df = pd.read_parquet(tmp_path / "runs.parquet")
    csv = pd.read_csv(tmp_path / "runs.csv")
    assert len(df) == len(csv) == 4
    assert all(c in df.columns for c in COLUMNS)
    for c in ("metric", "stored_bits", "compression_ratio", "file_bytes", "train_seconds", "peak_memory_bytes"):
        assert pd.api.types.is_numeric_dtype(df[c]), c
    assert set(df.metric_name) == {"accuracy", "rmse"}
    assert (df.status == "ok").all()
    dense = df[df.method == "dense"]
    assert (dense.compression_ratio == 1.0).all() and (dense.metric == dense.dense_metric).all()
    assert (df.reload_max_abs_diff < 1e-5).all()
    assert (df.file_bytes * 8 >= df.stored_bits).all()
    assert (df.peak_memory_bytes > 0).all()
    assert df.run_id.is_unique
    json.loads(df.method_config.iloc[0])


def test_resume_skips_finished_runs(tmp_path):
    sweep = tiny_sweep(seeds=[0, 1])
    run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    first = {r["run_id"]: r["started_at"] for r in ResultsStore(tmp_path).rows()}
    counts = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert counts["skipped_finished"] == 2 and counts["ok"] == 0
    assert {r["run_id"]: r["started_at"] for r in ResultsStore(tmp_path).rows()} == first


def test_interrupted_sweep_resumes_without_losing_finished_runs(tmp_path, monkeypatch):
    import bench.run.runner as runner

    sweep = tiny_sweep(seeds=[0, 1, 2])
    real = runner.run_one
    calls = {"n": 0}

    def flaky(spec, env):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user hits Ctrl-C during the second run
        return real(spec, env)

    monkeypatch.setattr(runner, "run_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert len(ResultsStore(tmp_path).finished_ids()) == 1
    assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 1
    monkeypatch.setattr(runner, "run_one", real)
    counts = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert counts == {"ok": 2, "failed": 0, "diverged": 0, "infeasible": 0, "skipped_finished": 1}
    assert len(ResultsStore(tmp_path).finished_ids()) == 3


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tiny_sweep(methods=["explode", "nan_out", "dense"])
    counts = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert counts["ok"] == 1 and counts["failed"] == 1 and counts["diverged"] == 1
    df = pd.read_parquet(tmp_path / "runs.parquet").set_index("method")
    assert "boom on purpose" in df.loc["explode", "error"]
    assert df.loc["nan_out", "status"] == "diverged"
    # failed runs are tried again on the next call; ok runs are not
    counts = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert counts["skipped_finished"] == 1 and counts["failed"] == 1 and counts["diverged"] == 1


def test_dense_base_is_trained_once_and_shared(tmp_path):
    sweep = tiny_sweep(methods=["dense", "nan_out"])
    env = RunEnv(tmp_path, tmp_path, "cpu")
    run_one(sweep.runs[0], env)
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    assert [p.name.split("-")[0] for p in cached] == ["dense", "dense_ft"]  # the base and its control, once
    run_one(sweep.runs[1], env)
    assert sorted((tmp_path / "cache").glob("*.pt")) == cached


def test_seeds_depend_on_data_and_model_not_method():
    a = tiny_sweep(methods=["dense", "explode"]).runs
    assert a[0].run_id != a[1].run_id
    assert derive_seed(0, "d", "kan", "rbf") == derive_seed(0, "d", "kan", "rbf")
    assert derive_seed(0, "d", "kan", "rbf") != derive_seed(1, "d", "kan", "rbf")


def test_same_seed_same_result(tmp_path):
    sweep = tiny_sweep()
    r1 = run_one(sweep.runs[0], RunEnv(tmp_path / "a", tmp_path, "cpu"))
    r2 = run_one(sweep.runs[0], RunEnv(tmp_path / "b", tmp_path, "cpu"))
    assert r1["metric"] == r2["metric"] and r1["val_metric"] == r2["val_metric"]


def test_convkan_skips_non_image_datasets():
    sweep = tiny_sweep(datasets=["tiny_images", "tiny_regression"], models=["kan", "convkan"])
    pairs = {(r.dataset, r.model) for r in sweep.runs}
    assert ("tiny_regression", "convkan") not in pairs and ("tiny_images", "convkan") in pairs
    assert sweep.skipped == ["tiny_regression/convkan"]


def test_per_dataset_hidden_widths():
    sweep = tiny_sweep(datasets=["tiny_images", "tiny_regression"],
                       dataset={"tiny_regression": {"hidden": [2, 2]}}, model={"kan": {"hidden": [5]}})
    hidden = {r.dataset: r.model_options["hidden"] for r in sweep.runs}
    assert hidden == {"tiny_images": [5], "tiny_regression": [2, 2]}
