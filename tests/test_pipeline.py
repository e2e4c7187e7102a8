"""Pipelines (bench/compression/pipeline.py): a chain equals its stages applied by hand, a one-stage pipeline is
the method itself, illegal chains are one-line user errors, the stage-1 cache is the first stage's,
and clustering a pruned model keeps the pruned edges at exactly zero and counts the pattern."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.compression.codebook import MaskedCodebookSource
from bench.compression.methods import METHODS
from bench.compression.pipeline import Pipeline, method_class, parse_entry
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.errors import UserError
from bench.model.kan import kan_layers
from bench.registry import load_plugins
from bench.run.plan import stage_cache
from bench.run.runner import RunEnv, run_one, seed_everything
from bench.run.sweep import build_sweep

load_plugins()
PLUGINS = str(Path(__file__).parent / "plugins")
TRAIN = {"epochs": 1, "finetune_epochs": 2, "batch_size": 32, "lr": 3e-3}


def sweep(methods, method_tables=None, **extra):
    return build_sweep({"name": "p", "datasets": ["tiny_images"], "bases": ["bspline"], "methods": methods,
                        "seeds": [0], "train": TRAIN, "method": method_tables or {}, **extra})


def test_budget_split_shares_the_one_finetune_budget():
    assert Pipeline.budget_split(2, 2) == [1, 1]
    assert Pipeline.budget_split(2, 3) == [0, 1, 1]
    assert Pipeline.budget_split(5, 2) == [2, 3]
    for e in range(7):
        for n in range(1, 4):
            assert sum(Pipeline.budget_split(e, n)) == e


def test_one_stage_is_the_method_itself():
    assert method_class("kmeans") is METHODS["kmeans"]
    (a,) = sweep(["kmeans"], {"kmeans": {"K": 4}}).runs
    (b,) = sweep(["kmeans(K=4)"]).runs
    assert a.run_id == b.run_id and a.method == "kmeans" and a.method_config == b.method_config


def test_sweep_file_and_inline_syntax_give_the_same_runs():
    tables = {"prune>kmeans": {"prune": {"ratio": [2.0, 4.0]}, "kmeans": {"K": 4}}}
    runs = sweep(["prune>kmeans"], tables).runs
    assert [r.method for r in runs] == ["prune>kmeans"] * 2
    assert sorted(r.method_config["prune"]["ratio"] for r in runs) == [2.0, 4.0]
    assert all(r.method_config["kmeans"]["K"] == 4 for r in runs)
    (inline,) = sweep(["prune(ratio=2.0)>kmeans(K=4)"]).runs
    assert inline.run_id == runs[0].run_id
    assert parse_entry("prune(ratio=2,score=magnitude)>kmeans") == ("prune>kmeans",
                                                                     {"prune": {"ratio": 2, "score": "magnitude"}})
    with pytest.raises(UserError, match="has no option 'nope'"):
        sweep(["prune>kmeans"], {"prune>kmeans": {"kmeans": {"nope": 1}}})
    with pytest.raises(UserError, match="no stage 'quantize'"):
        sweep(["prune>kmeans"], {"prune>kmeans": {"quantize": {"bits": 4}}})


@pytest.mark.parametrize("chain,fragment", [
    ("prune>metacluster", "trains its own model"),
    ("kmeans>metakan", "trains its own model"),
    ("prune>prune", "names a stage twice"),
    ("prune>nosuch", "unknown method 'nosuch'"),
])
def test_illegal_chain_is_one_line_exit_2_before_training(capsys, tmp_path, chain, fragment):
    code = main(["run", "--plugin", PLUGINS, "--datasets", "tiny_images", "--methods", f"dense,{chain}",
                 "--epochs", "1", "--quiet", "--device", "cpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "r" / "cache").exists()  # nothing trained


def test_stage_one_cache_is_the_first_stages():
    (mc,) = sweep(["metacluster"], {"metacluster": METHODS["metacluster"].test_config}).runs
    (chain,) = sweep(["metacluster>kmeans"], {"metacluster>kmeans": {
        "metacluster": METHODS["metacluster"].test_config, "kmeans": {"K": 4}}}).runs
    cls = method_class(chain.method)
    assert cls.trains_own_model()
    assert stage_cache(chain, cls(**chain.method_config)) == stage_cache(mc, METHODS["metacluster"](**mc.method_config))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    return RunEnv(out, out, "cpu")


def test_pipeline_equals_its_stages_applied_by_hand(env, tmp_path):
    (spec,) = sweep(["prune(ratio=2.0)>kmeans(K=4)"]).runs
    row = run_one(spec, env)
    assert row["status"] == "ok" and row["method"] == "prune>kmeans"
    assert row["reload_max_abs_diff"] == 0.0
    path = env.out / "models" / f"{spec.run_id}.kanb"
    assert row["file_bytes"] == path.stat().st_size == header_bytes(path) + sum(
        math.ceil(it.bits / 8) for _, it in storage_report(load_model(path)).items)

    # by hand: the cached dense base, prune (1 fine-tune epoch), then kmeans (1 epoch), same seed
    ds, splits = env.splits(spec)
    trainer = env.trainer(spec, ds, splits)
    base, _ = env.trained(spec, ds, trainer)
    model = copy.deepcopy(base)
    ctx = env.context(spec, trainer, env.device)
    seed_everything(ctx.seed)
    prune, kmeans = METHODS["prune"](ratio=2.0), METHODS["kmeans"](K=4)
    ctx.finetune_epochs = 1
    prune.compress(model, ctx)
    kmeans.compress(model, ctx)
    model.eval()
    export_model(model.cpu(), tmp_path / "hand.kanb")
    assert (tmp_path / "hand.kanb").read_bytes() == path.read_bytes()  # the same stored bits
    x = splits.x_test[:64].cpu()
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model(x))
    assert sum(f.epochs_run > 0 for f in ctx.finetunes) == 2

    # clustering on the pruned model: the pattern is kept (pruned edges exactly zero) and counted
    kept, total = 0, 0
    for _, layer in kan_layers(model):
        src = layer.source
        assert isinstance(src, MaskedCodebookSource)
        w = src.edge_tensor().detach()
        alive = torch.zeros(src.out_features * src.in_features, dtype=torch.bool)
        alive[src.flat_index] = True
        assert torch.all(w.reshape(-1, src.edge_dim)[~alive] == 0)
        names = {it.name: it for it in src.storage()}
        assert names["index"].count == src.kept
        assert ("mask" in names) != ("positions" in names)
        kept, total = kept + src.kept, total + src.out_features * src.in_features
    assert kept < total


def test_kmeans_after_prune_stores_fewer_bits_than_kmeans_alone(env):
    (chain,) = sweep(["prune(ratio=2.0)>kmeans(K=4)"]).runs
    (single,) = sweep(["kmeans(K=4)"]).runs
    a, b = run_one(chain, env), run_one(single, env)
    assert a["stored_bits"] < b["stored_bits"], (a["stored_bits"], b["stored_bits"])
    assert a["method_config_nondefault"] == '{"prune.ratio": 2.0, "kmeans.K": 4}'


def test_deep_chain_with_quantised_centroids_runs_counts_and_reloads(env):
    (spec,) = sweep(["prune(ratio=2.0)>kmeans(K=4,centroid_bits=4)"]).runs
    (plain,) = sweep(["prune(ratio=2.0)>kmeans(K=4)"]).runs
    row, ref = run_one(spec, env), run_one(plain, env)
    assert row["status"] == "ok" and row["reload_max_abs_diff"] == 0.0
    assert row["stored_bits"] < ref["stored_bits"]
    path = env.out / "models" / f"{spec.run_id}.kanb"
    assert row["file_bytes"] == path.stat().st_size == header_bytes(path) + sum(
        math.ceil(it.bits / 8) for _, it in storage_report(load_model(path)).items)


def test_small_dtype_as_the_last_stage_saves_16_bits_per_small_value(env):
    (spec,) = sweep(["prune(ratio=2.0)>kmeans(K=4)>small_dtype"]).runs
    (plain,) = sweep(["prune(ratio=2.0)>kmeans(K=4)"]).runs
    row, ref = run_one(spec, env), run_one(plain, env)
    assert row["status"] == "ok" and row["reload_max_abs_diff"] == 0.0
    info = json.loads(row["info"])["stages"][-1]
    assert info["method"] == "small_dtype" and info["finetune_epochs"] == 0
    assert ref["stored_bits"] - row["stored_bits"] == info["small_bits_before"] - info["small_bits_after"] > 0
