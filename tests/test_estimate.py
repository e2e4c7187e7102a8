"""The dry run's wall-time estimate (bench/run/estimate.py): FLOPs by hand, scaling with the plan,
missing data, nothing trained."""

import math

import pytest

from bench.cli import main
from bench.run import estimate as est
from bench.run.plan import plan_sweep
from bench.run.sweep import build_sweep, read_sweep_file

DIGITS = {"datasets": ["digits"], "models": ["kan"], "bases": ["rbf"], "methods": ["dense", "prune"],
          "grid": False, "device": "cpu"}


def _estimate(tmp_path, monkeypatch, **overrides):
    def fixed_probe(s, device, deadline):  # 1 ms a sample: the estimate is the plan's arithmetic
        s.seconds_per_sample, s.probe_batch = 1e-3, 1

    monkeypatch.setattr(est, "probe", fixed_probe)
    sweep = build_sweep(read_sweep_file(None, "quick"), {**DIGITS, **overrides})
    return est.estimate(plan_sweep(sweep, tmp_path / "out"), tmp_path / "data", "cpu")


def test_estimate_scales_with_epochs_and_runs(tmp_path, monkeypatch):
    n_train, n_val, n_test = est.get_dataset("digits").split_sizes()
    a = _estimate(tmp_path, monkeypatch, seeds=[0], epochs=4, finetune_epochs=1)
    b = _estimate(tmp_path, monkeypatch, seeds=[0], epochs=8, finetune_epochs=1)
    c = _estimate(tmp_path, monkeypatch, seeds=[0, 1], epochs=4, finetune_epochs=1)
    (sa,), (sb,) = a["setups"], b["setups"]
    # the dense base (4 epochs) and its control (1), then prune fine-tunes 1 epoch (dense: none)
    assert sa.train_samples == (4 + 1 + 1) * n_train
    assert sb.train_samples - sa.train_samples == 4 * n_train
    assert b["seconds"] > a["seconds"] and b["flops"] > a["flops"]
    assert c["seconds"] == pytest.approx(2 * a["seconds"])  # twice the seeds: twice the runs and bases
    assert c["flops"] == pytest.approx(2 * a["flops"])
    assert a["flops"] == pytest.approx(sa.flops_per_sample * (sa.train_samples + sa.eval_samples / 3))


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_kan_step_flops_match_a_hand_count(basis):
    sweep = build_sweep(read_sweep_file(None, "quick"), {**DIGITS, "bases": [basis], "seeds": [0],
                                                         "methods": ["dense"]})
    spec = sweep.runs[0]
    model = est.build_probe_model(spec, "cpu")[1]
    widths, edge = model.widths, model.layers[0].edge_dim  # n_basis + 1 values an edge
    assert widths[0] == 64 and widths[-1] == 10 and len(widths) == 3
    # per layer: forward 2 * in * out * edge, the weight gradient as much again, and the gradient of
    # the layer's features as much again where they need one: every layer but the first, and the first
    # too for rbf (its input LayerNorm is trained); elementwise work is not counted
    first = 6 if basis == "rbf" else 4
    hand = sum((first if i == 0 else 6) * a * b * edge for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
    assert est.step_flops(spec) == pytest.approx(hand, rel=0.02)
    assert est.step_flops(spec, 4, "cpu") == pytest.approx(hand, rel=0.02)  # meta and CPU agree


def test_dry_run_with_missing_data_warns_estimates_and_trains_nothing(tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("a dry run trained")

    monkeypatch.setattr("bench.run.train.Trainer.fit", no_training)
    data, out = tmp_path / "data", tmp_path / "out"
    argv = ["run", "--sweep", "paper", "--dry-run", "--data-dir", str(data), "--out", str(out), "--datasets",
            "mnist,cifar10", "--models", "kan", "--bases", "rbf", "--methods", "dense,prune", "--seeds", "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"warning: data not in {data} for mnist, cifar10" in text
    assert "estimated wall time on this machine (CPU" in text
    assert "at an assumed 100 TFLOP/s sustained (H100-class, bf16)" in text and "not measured" in text
    assert not out.exists() and not data.exists()  # no cache, no rows, no download


@pytest.mark.parametrize("name", ["digits", "eq_exp_sin"])
def test_split_sizes_are_the_sizes_load_returns(name, tmp_path):
    ds = est.get_dataset(name)
    s = ds.load(tmp_path, 0)
    assert ds.split_sizes() == (len(s.y_train), len(s.y_val), len(s.y_test))


def test_image_split_sizes_follow_val_fraction_and_caps():
    assert est.get_dataset("mnist").split_sizes() == (54000, 6000, 10000)
    assert est.get_dataset("fashion_mnist", n_train=1000, n_test=500).split_sizes() == (1000, 6000, 500)
    assert est.get_dataset("cifar10").split_sizes() == (45000, 5000, 10000)
    assert est.get_dataset("cifar100", val_fraction=0.2).split_sizes() == (40000, 10000, 10000)


def test_gpu_estimate_is_never_faster_than_the_measured_launch_floor(tmp_path, monkeypatch):
    """Small KAN steps are launch-bound on a GPU: the estimate is at least the per-layer step time measured on
    an H200 for every optimiser step and evaluation batch, whatever the FLOPs say."""
    a = _estimate(tmp_path, monkeypatch, seeds=[0], epochs=4, finetune_epochs=1)
    (s,) = a["setups"]
    n_train, n_val, n_test = est.get_dataset("digits").split_sizes()
    batch = int(s.spec.train["batch_size"])
    # kan [64, 64, 10]: two KAN layers
    assert s.gpu_step_floor_s == pytest.approx(2 * est.GPU_STEP_S_PER_KAN_LAYER)
    assert s.steps == 6 * math.ceil(n_train / batch)  # the base's 4 epochs, its control's 1, prune's 1
    # validation: after each of the base's 4 epochs and before the first, the same for the control's 1, then the
    # control's score; each run's score (dense, prune) and prune's fit (1 epoch); test: base, control, each run
    assert s.eval_batches == (5 + 2 + 1 + 1 + (2 + 1)) * math.ceil(n_val / 1024) + 4 * math.ceil(n_test / 1024)
    floor = s.gpu_step_floor_s * (s.steps + est.GPU_EVAL_SHARE * s.eval_batches)
    assert s.flops / est.ASSUMED_GPU_FLOPS < floor  # this model is far below the assumed throughput
    assert a["gpu_assumed_seconds"] == pytest.approx(floor)


def test_gpu_step_floor_counts_kan_convolutions_apart():
    sweep = build_sweep(read_sweep_file(None, "conv"), {"seeds": [0], "methods": ["dense"], "bases": ["bspline"]})
    # convkan [8, 16, 32]: three KAN convolutions and a KAN head
    assert est.gpu_step_floor(sweep.runs[0]) == pytest.approx(3 * est.GPU_STEP_S_PER_KAN_CONV
                                                             + est.GPU_STEP_S_PER_KAN_LAYER)
