"""Every method and the deep-compression pipelines on imported models, generated over the interop
fixtures: a sweep names the imported file as the dataset's base model (bench.interop.base_model),
and each run must count what its file holds, reload exactly and change the weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE

from bench.compression.methods import METHODS
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.errors import UserError
from bench.interop import import_model, read_import_file
from bench.model.kan import ConvKAN, kan_layers
from bench.registry import load_plugins
from bench.run.runner import RunEnv, run_one
from bench.run.sweep import build_sweep

load_plugins()
FIXTURES = Path(__file__).parent / "fixtures" / "interop"
TRAIN = {"epochs": 2, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3}
BASES = {  # fixture -> the test dataset of its sizes
    "efficient_kan_6-5-3.pt": "tiny_vec6", "fastkan_6-5-3.pt": "tiny_vec6", "chebykan_6-5-3_deg4_ln.pt": "tiny_vec6",
    "pykan_4-3-2_g5k3_fit.pt": "tiny_vec4", "kagn_convkan": "tiny_images"}
METHOD_ENTRIES = sorted(n for n, c in METHODS.items() if not getattr(c, "test_only", False))
PIPELINES = ["prune(ratio=2)>kmeans(K=4)>entropy_code", "quantize(bits=4)>entropy_code>small_dtype"]


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    """Each fixture imported into a model file; plus a KAGN ConvKAN with the importer's options
    (feature padding, SiLU after InstanceNorm without affine, a LayerNorm + SiLU head) as the torch-conv-kan base."""
    folder = tmp_path_factory.mktemp("bases")
    files = {}
    for name in BASES:
        if name == "kagn_convkan":
            torch.manual_seed(0)
            model = ConvKAN((1, 8, 8), 4, [3], pool_every=0, basis="kagn", basis_kwargs={"degree": 3},
                            norm="instance_noaffine", act="silu", pad="features", bias=False, padding=1,
                            head_basis_kwargs={"degree": 3}, head_bias=False, head_norm="layer", head_act="silu")
            model.imported_from = {"library": "torch-conv-kan", "class": "SimpleConvKAGN-like"}
        else:
            d = read_import_file(FIXTURES / name)
            model = import_model(d["state_dict"], d["library"], d["constructor"], d["model_class"])
        files[name] = folder / f"{name}.kanb"
        export_model(model, files[name])
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return RunEnv(out, out, TEST_DEVICE)


def spec_for(entry: str, fixture: str, files) -> object:
    cls = METHODS.get(entry)
    tables = {}
    if cls is not None:
        tables = {entry: dict(cls.test_config)} if cls.test_config else {}
        if cls.needs_previous_stage:
            prev = cls.test_previous_stage
            tables = {f"{prev}>{entry}": {prev: dict(METHODS[prev].test_config), **tables}}
            entry = f"{prev}>{entry}"
    data = {"name": "imported", "datasets": [BASES[fixture]], "methods": [entry], "seeds": [0], "train": TRAIN,
            "method": tables, "dataset": {BASES[fixture]: {"base_model": str(files[fixture])}}}
    (spec,) = build_sweep(data).runs
    return spec


@pytest.mark.parametrize("entry", METHOD_ENTRIES + PIPELINES)
@pytest.mark.parametrize("fixture", sorted(BASES))
def test_method_on_an_imported_base(env, base_files, fixture, entry):
    spec = spec_for(entry, fixture, base_files)
    assert spec.model == "imported"
    row = run_one(spec, env)
    assert row["status"] == "ok", row.get("error")
    assert math.isfinite(row["metric"]) and row["reload_max_abs_diff"] < 1e-4
    assert row["base_sha256"] == spec.model_options["sha256"] and row["base_library"] != "bench"
    path = env.out / "models" / f"{spec.run_id}.kanb"
    reloaded = load_model(path)
    items = storage_report(reloaded).items
    assert row["file_bytes"] == path.stat().st_size == header_bytes(path) + sum(math.ceil(i.bits / 8) for _, i in items)
    names = {n for n, _ in items}
    if fixture.startswith(("pykan", "efficient")) and "metakan" not in entry and "metacluster" not in entry:
        assert any(n.endswith("basis.knots") for n in names)  # the imported knots travel with every method
    if fixture == "kagn_convkan":
        assert any(n.endswith("basis.beta") for n in names)
    method = METHODS.get(entry.split(">")[0].split("(")[0])
    if entry in ("dense", "dense_ft"):
        assert row["stored_bits"] == row["dense_bits"]
        if entry == "dense":  # the imported model as given: not trained
            assert row["train_seconds"] == 0 and row["metric"] == row["dense_metric"]
        return
    given = load_model(Path(spec.model_options["file"]))
    changed = any(not torch.equal(a.edge_tensor().detach(), b.edge_tensor().detach()) or a.edge_dim != b.edge_dim
                  for (_, a), (_, b) in zip(kan_layers(given), kan_layers(reloaded))) \
        or len(kan_layers(given)) != len(kan_layers(reloaded)) or entry == "small_dtype"
    assert changed, f"{entry} left the imported model's edges untouched"
    if method is not None and not method.trains_own_model() and entry != "small_dtype":
        assert row["compression_ratio"] > 1, json.dumps({k: row[k] for k in ("stored_bits", "dense_bits")})


def test_base_model_errors_are_one_line(base_files, tmp_path):
    data = {"datasets": ["tiny_vec4"], "methods": ["dense"], "dataset": {
        "tiny_vec4": {"base_model": str(base_files["efficient_kan_6-5-3.pt"])}}}
    with pytest.raises(UserError, match="does not fit dataset 'tiny_vec4'"):
        build_sweep(data)
    data["dataset"]["tiny_vec4"]["base_model"] = str(tmp_path / "none_{seed}.kanb")
    with pytest.raises(UserError, match="not found"):
        build_sweep(data)
    with pytest.raises(UserError, match="unknown model 'imported'"):
        build_sweep({"datasets": ["tiny_vec4"], "models": ["imported"], "methods": ["dense"]})


def test_seed_pattern_gives_one_base_per_seed_and_one_group(base_files, tmp_path):
    for seed in (0, 1):
        (tmp_path / f"b_seed{seed}.kanb").write_bytes(base_files["pykan_4-3-2_g5k3_fit.pt"].read_bytes())
    sweep = build_sweep({"datasets": ["tiny_vec4"], "methods": ["dense"], "seeds": [0, 1], "dataset": {
        "tiny_vec4": {"base_model": str(tmp_path / "b_seed{seed}.kanb")}}})
    assert [s.model_options["file"] for s in sweep.runs] == [str(tmp_path / f"b_seed{s}.kanb") for s in (0, 1)]
    from bench.run.runner import budget_columns

    assert len({budget_columns(s)["model_options"] for s in sweep.runs}) == 1


def test_a_changed_base_file_fails_the_run_not_silently(env, base_files, tmp_path):
    path = tmp_path / "b.kanb"
    path.write_bytes(base_files["fastkan_6-5-3.pt"].read_bytes())
    (spec,) = build_sweep({"datasets": ["tiny_vec6"], "methods": ["quantize"], "train": TRAIN,
                           "dataset": {"tiny_vec6": {"base_model": str(path)}}}).runs
    model = load_model(path)
    with torch.no_grad():
        kan_layers(model)[0][1].source.weight.mul_(2)
    export_model(model, path)
    env2 = RunEnv(tmp_path / "o", tmp_path, "cpu")
    with pytest.raises(UserError, match="changed since the sweep was built"):
        run_one(spec, env2)
