"""Every bundled sweep parses and every name in it resolves."""

import pytest

from bench.registry import load_plugins
from bench.run.sweep import build_sweep, bundled_sweeps, read_sweep_file

load_plugins()


@pytest.mark.parametrize("name", sorted(bundled_sweeps()))
def test_bundled_sweep_builds(name):
    data = read_sweep_file(name=name)
    assert data.get("description"), "a bundled sweep needs a description for `bench list`"
    sweep = build_sweep(data)
    assert sweep.runs
    assert len({r.run_id for r in sweep.runs}) == len(sweep.runs)


def test_expected_sweeps_are_bundled():
    assert {"quick", "cpu", "conv", "paper"} <= set(bundled_sweeps())


def test_quick_sweep_covers_every_method_once_per_cell():
    from bench.compression.methods import METHODS

    sweep = build_sweep(read_sweep_file(name="quick"))
    real = {n for n, c in METHODS.items() if not getattr(c, "test_only", False) and c.in_all}
    assert {r.method for r in sweep.runs} >= real
    cells = {(r.dataset, r.basis) for r in sweep.runs}
    assert cells == {(d, b) for d in ("digits", "eq_exp_sin") for b in ("bspline", "rbf")}


def test_paper_sweep_has_the_published_convkan():
    sweep = build_sweep(read_sweep_file(name="paper"))
    conv = [r for r in sweep.runs if r.model == "convkan"]
    assert conv and conv[0].model_options["channels"] == [16, 32, 64, 128, 256, 256, 512, 512]
    assert {r.dataset for r in sweep.runs} == {"mnist", "cifar10", "cifar100"}
    assert conv[0].train["amp"] is True


def test_per_dataset_method_settings_replace_the_global_ones():
    data = {"datasets": ["digits", "eq_exp_sin"], "bases": ["bspline"], "methods": ["prune"],
            "method": {"prune": {"ratio": [2, 8, 32], "score": "attribution"}},
            "dataset": {"eq_exp_sin": {"method": {"prune": {"ratio": [2, 8]}}}}}
    runs = build_sweep(data).runs
    ratios = {d: sorted(r.method_config["ratio"] for r in runs if r.dataset == d) for d in ("digits", "eq_exp_sin")}
    assert ratios == {"digits": [2, 8, 32], "eq_exp_sin": [2, 8]}
    assert all(r.method_config["score"] == "attribution" for r in runs)  # keys not replaced are kept


def test_an_array_of_per_dataset_method_tables_unites_their_grids():
    data = {"datasets": ["digits"], "bases": ["bspline"], "methods": ["quantize"],
            "method": {"quantize": {"granularity": "edge"}},
            "dataset": {"digits": {"method": {"quantize": [{"bits": [4, 2], "algorithm": ["rtn", "gptq"]},
                                                          {"avg_bits": 2.5, "algorithm": "gptq"},
                                                          {"bits": 4, "algorithm": "gptq"}]}}}}
    points = sorted((r.method_config["bits"], r.method_config["algorithm"], r.method_config["avg_bits"])
                    for r in build_sweep(data).runs)
    assert points == [(2, "gptq", None), (2, "rtn", None), (4, "gptq", None), (4, "rtn", None), (8, "gptq", 2.5)]
    assert all(r.method_config["granularity"] == "edge" for r in build_sweep(data).runs)


def test_per_dataset_method_settings_are_validated():
    from bench.errors import UserError

    with pytest.raises(UserError, match="unknown method 'nope'"):
        build_sweep({"datasets": ["digits"], "dataset": {"digits": {"method": {"nope": {}}}}})
    with pytest.raises(UserError, match="has no option 'K'"):
        build_sweep({"datasets": ["digits"], "methods": ["prune"],
                     "dataset": {"digits": {"method": {"prune": {"K": 3}}}}})
    with pytest.raises(UserError, match="must be a table or an array of tables"):
        build_sweep({"datasets": ["digits"], "methods": ["prune"],
                     "dataset": {"digits": {"method": {"prune": [{"ratio": 2}, 3]}}}})


def test_an_array_of_general_method_tables_unites_their_grids_and_each_takes_the_dataset_settings():
    from bench.errors import UserError

    data = {"datasets": ["digits"], "bases": ["bspline"], "methods": ["quantize"],
            "method": {"quantize": [{"bits": [8, 2], "algorithm": "rtn"}, {"bits": 2, "algorithm": "ste"}]},
            "dataset": {"digits": {"method": {"quantize": {"granularity": "edge"}}}}}
    runs = build_sweep(data).runs
    assert sorted((r.method_config["bits"], r.method_config["algorithm"]) for r in runs) == [
        (2, "rtn"), (2, "ste"), (8, "rtn")]
    assert all(r.method_config["granularity"] == "edge" for r in runs)
    with pytest.raises(UserError, match="sweep key 'method.quantize' must be a table or an array of tables"):
        build_sweep({"datasets": ["digits"], "methods": ["quantize"], "method": {"quantize": [{"bits": 2}, 3]}})


def test_all_methods_leaves_out_the_pipeline_only_stages():
    names = {r.method for r in build_sweep({"datasets": ["digits"], "bases": ["bspline"], "methods": ["all"]}).runs}
    assert "small_dtype" not in names and {"dense", "dense_ft", "metacluster", "quantize"} <= names


def test_n_seeds_runs_a_tables_points_at_the_first_seeds_and_the_larger_count_wins():
    from bench.errors import UserError

    data = {"datasets": ["digits"], "bases": ["bspline"], "methods": ["prune", "prune>kmeans"], "seeds": [4, 1, 7],
            "method": {"prune": [{"ratio": 4}, {"ratio": [2, 4, 8], "n_seeds": 1}],
                       "prune>kmeans": {"prune": {"ratio": 2}, "kmeans": {"K": 4}, "n_seeds": 2}}}
    runs = build_sweep(data).runs
    seeds = {}
    for r in runs:
        seeds.setdefault((r.method, r.method_config.get("ratio")), []).append(r.seed)
    assert seeds == {("prune", 2): [4], ("prune", 4): [4, 1, 7], ("prune", 8): [4], ("prune>kmeans", None): [4, 1]}
    # the same run keeps its id: n_seeds only leaves runs out
    full = {r.run_id for r in build_sweep({**data, "method": {"prune": {"ratio": [2, 4, 8]}}}).runs}
    assert {r.run_id for r in runs if r.method == "prune"} < full
    for bad in (0, 1.5, True, "1"):
        with pytest.raises(UserError, match="n_seeds must be a positive integer"):
            build_sweep({"datasets": ["digits"], "methods": ["prune"], "method": {"prune": {"n_seeds": bad}}})


@pytest.mark.parametrize("sweep, entry, key", [("cpu", "kmeans(K=8)", "K"),
                                                ("deep", "quantize(bits=4)>entropy_code", None)])
def test_inline_options_apply_to_every_table_of_an_array(sweep, entry, key):
    """A bundled sweep's method given as an array of tables (`[[method.kmeans]]`, some with n_seeds) still takes
    inline options from --methods: every table gets them, and the point runs at the larger seed count."""
    data = read_sweep_file(name=sweep)
    runs = build_sweep({**data, "datasets": ["fashion_mnist"], "methods": [entry]}).runs
    assert runs and {r.seed for r in runs} == {0, 1, 2}
    if key:
        assert {r.method_config[key] for r in runs} == {8}
    else:
        assert {r.method_config["quantize"]["bits"] for r in runs} == {4}
