"""Tests generated over every registered method x basis x model: a new method file under
``methods/`` is tested the moment it exists."""

import math

import pytest
import torch

from bench.bases import BASES
from bench.kan import kan_layers
from bench.methods import METHODS
from bench.registry import load_plugins
from bench.runner import RunEnv, run_one
from bench.storage import load_model
from bench.sweep import build_sweep

load_plugins()
REAL_METHODS = sorted(n for n, c in METHODS.items() if not getattr(c, "test_only", False))
TRAIN = {"epochs": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    return RunEnv(out, out, "cpu")


def spec_for(method: str, basis: str, model: str):
    cls = METHODS[method]
    data = {"name": "gen", "datasets": ["tiny_images"], "models": [model], "bases": [basis], "methods": [method],
            "seeds": [0], "train": TRAIN, "model": {"convkan": {"channels": [3]}},
            "method": {method: dict(cls.test_config)} if cls.test_config else {}}
    (spec,) = build_sweep(data).runs
    return spec


@pytest.mark.parametrize("model", ["kan", "convkan"])
@pytest.mark.parametrize("basis", sorted(BASES))
@pytest.mark.parametrize("method", REAL_METHODS)
def test_method_runs_counts_and_reloads(env, method, basis, model):
    spec = spec_for(method, basis, model)
    row = run_one(spec, env)
    assert row["status"] == "ok", row.get("error")
    assert math.isfinite(row["metric"]) and 0 <= row["metric"] <= 100
    assert row["reload_max_abs_diff"] < 1e-4
    assert row["stored_bits"] <= row["file_bytes"] * 8 <= row["stored_bits"] + 8 * 8192
    assert row["compression_ratio"] == pytest.approx(row["dense_bits"] / row["stored_bits"])
    if method in ("dense", "dense_ft"):
        assert row["compression_ratio"] == 1.0
        assert row["metric_delta"] == pytest.approx(row["metric"] - row["control_metric"])
    if method == "dense":
        assert row["finetune_best_epoch"] is None and row["dense_delta"] == 0.0
        return
    if method == "dense_ft":  # the control row is the cached control model itself
        assert row["metric"] == row["control_metric"] and row["val_metric"] == row["control_val_metric"]
        if row["finetune_best_epoch"] == 0:
            return  # the fine-tune kept the base, and the row says so
    # A method that changes no weight is a bug: the exported model must differ from the dense base.
    ds, splits = env.splits(spec)
    base, _ = env.trained(spec, ds, env.trainer(spec, ds, splits))
    final = load_model(env.out / "models" / f"{spec.run_id}.kanb")
    changed = any(not torch.equal(a.edge_tensor().detach().cpu(), b.edge_tensor().detach().cpu())
                  for (_, a), (_, b) in zip(kan_layers(base), kan_layers(final)))
    assert changed, f"{method} left every edge tensor of the dense base untouched"


@pytest.mark.parametrize("method", REAL_METHODS)
def test_method_declares_valid_grid_and_test_config(method):
    cls = METHODS[method]
    cls(**cls.test_config)
    for key, values in cls.grid.items():
        assert values, key
        for v in values:
            cls(**{key: v})
    assert (cls.__doc__ or "").strip(), "a method needs a one-line docstring for `bench list`"
