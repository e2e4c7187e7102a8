"""``bench.compress``: one model compressed in one call, on the runner's code path (bench/api.py)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import bench
from bench.cli import main
from bench.compression.methods import METHODS
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.data import Splits, get_dataset
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers
from bench.registry import load_plugins

load_plugins()
BUDGET = {"epochs": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3}
ENTRIES = sorted(n for n, c in METHODS.items() if not getattr(c, "test_only", False) and not c.needs_previous_stage)
ENTRIES += ["quantize(bits=4)>entropy_code", "prune(ratio=2)>kmeans(K=4)>small_dtype"]


def _model(seed=0):
    torch.manual_seed(seed)
    return KAN([6, 5, 3], "bspline")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("api")


def _inline(name: str) -> str:
    cls = METHODS.get(name)
    if cls is None or not cls.test_config:
        return name
    return f"{name}({','.join(f'{k}={json.dumps(v)}' for k, v in cls.test_config.items())})"  # TOML literals


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_method_and_pipeline_compresses_a_given_model(entry, work):
    model = _model()
    result = bench.compress(model, _inline(entry), "tiny_vec6", out=work, device="cpu", **BUDGET)
    row = result.row
    assert row["status"] == "ok", row.get("error")
    assert row["model"] == "imported" and row["base_library"] == "bench"
    items = storage_report(result.model).items
    assert row["file_bytes"] == result.path.stat().st_size == header_bytes(result.path) + sum(
        math.ceil(it.bits / 8) for _, it in items)
    assert math.isfinite(row["metric"]) and math.isfinite(row["control_metric"])
    if entry in ("dense", "dense_ft"):
        return
    changed = any(not torch.equal(a.edge_tensor().detach(), b.edge_tensor().detach()) or a.edge_dim != b.edge_dim
                  for (_, a), (_, b) in zip(kan_layers(model), kan_layers(result.model)))
    assert changed or len(kan_layers(model)) != len(kan_layers(result.model)) or entry == "small_dtype"


def test_row_equals_what_bench_run_records(tmp_path):
    path = tmp_path / "base.kanb"
    export_model(_model(3), path)
    out, sweep = tmp_path / "run", tmp_path / "s.toml"
    sweep.write_text('datasets = ["tiny_vec6"]\n[train]\nepochs = 1\nfinetune_epochs = 1\n')  # the defaults otherwise
    assert main(["run", "--config", str(sweep), "--base-model", str(path), "--methods", "kmeans(K=4)",
                 "--seeds", "1", "--device", "cpu", "--quiet", "--no-report", "--out", str(out)]) == 0
    ran = pd.read_parquet(out / "runs.parquet").iloc[0].to_dict()
    row = bench.compress(load_model(path), "kmeans(K=4)", "tiny_vec6", seed=1, epochs=1, finetune_epochs=1,
                         device="cpu", out=tmp_path / "api").row
    for key in ("metric", "val_metric", "control_metric", "control_val_metric", "dense_metric", "stored_bits",
                "compression_ratio", "file_bytes", "method_config", "finetune_best_epoch", "base_sha256", "arch"):
        assert row[key] == ran[key] or (pd.isna(row[key]) and pd.isna(ran[key])), key


def test_own_tensors_classification_and_regression(work):
    ds = get_dataset("tiny_vec6").load(None, 0)
    reg = bench.compress(_model(), "quantize(bits=4)", ds, out=work, device="cpu", **BUDGET).row
    assert reg["status"] == "ok" and reg["metric_name"] == "rmse" and reg["dataset"].startswith("user_")
    labels = Splits(ds.x_train, ds.y_train.argmax(1), ds.x_val, ds.y_val.argmax(1), ds.x_test, ds.y_test.argmax(1))
    cls = bench.compress(_model(), "prune(ratio=2)", labels, out=work, device="cpu", **BUDGET).row
    assert cls["status"] == "ok" and cls["metric_name"] == "accuracy"


def test_mistakes_are_one_line(work):
    with pytest.raises(UserError, match="expands to 2 configurations"):
        bench.compress(_model(), "kmeans(K=[2,4])", "tiny_vec6", out=work, **BUDGET)
    with pytest.raises(UserError, match="unknown"):
        bench.compress(_model(), "nomethod", "tiny_vec6", out=work, **BUDGET)
    with pytest.raises(UserError, match="project model"):
        bench.compress(torch.nn.Linear(6, 3), "dense", "tiny_vec6", out=work, **BUDGET)
    with pytest.raises(UserError, match="does not fit dataset"):
        bench.compress(KAN([4, 2]), "dense", "tiny_vec6", out=work, **BUDGET)
    with pytest.raises(UserError, match="sweep \\[train\\]|no option|unknown"):
        bench.compress(_model(), "dense", "tiny_vec6", out=work, epochz=3)
    x, y = torch.zeros(4, 6), torch.zeros(4)  # float targets need a [N, k] shape
    bad = Splits(x, y, x, y, x, y)
    with pytest.raises(UserError, match="targets must be"):
        bench.compress(_model(), "dense", bad, out=work, **BUDGET)
