"""The comparison protocol (issue: trustworthy comparisons): a converged control trained under a
schedule with patience on validation, the fine-tuned ``dense_ft`` control in every group, one
fine-tune learning-rate rule, QAT that really trains, infeasible settings recorded once."""

import math

import pytest
import torch
import torch.nn.functional as F

from bench.data import get_dataset
from bench.model.kan import KAN
from bench.run.results import ResultsStore
from bench.run.runner import RunEnv, run_one, run_sweep
from bench.run.sweep import build_sweep
from bench.run.train import Trainer

TRAIN = {"epochs": 3, "finetune_epochs": 2, "batch_size": 32, "lr": 3e-3}


def sweep_of(methods, method_tables=None, datasets=("tiny_images",), train=None, **over):
    data = {"name": "p", "datasets": list(datasets), "models": ["kan"], "bases": ["bspline"],
            "methods": list(methods), "seeds": [0], "train": dict(train or TRAIN), "device": "cpu",
            "method": method_tables or {}}
    data.update(over)
    return build_sweep(data)


def test_patience_stops_when_validation_stops_improving():
    ds = get_dataset("tiny_regression")
    splits = ds.load(".", 0)
    # lr 0: validation never changes; a tie with the starting model goes to epoch 1, and training
    # stops once `patience` more epochs bring nothing better
    fit = Trainer(splits, ds.task, lr=0.0, patience=2, schedule="cosine").fit(KAN([2, 3, 1], "bspline"), 10)
    assert (fit.best_epoch, fit.epochs_run) == (1, 3)
    fit = Trainer(splits, ds.task, lr=1e-2, patience=0, schedule="cosine").fit(KAN([2, 3, 1], "bspline"), 4)
    assert fit.epochs_run == 4 and fit.best_epoch >= 1 and fit.lr == 1e-2


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_sets_the_rate_of_every_step(monkeypatch, schedule):
    ds = get_dataset("tiny_regression")
    splits = ds.load(".", 0)
    rates = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        rates.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    model = KAN([2, 3, 1], "bspline")
    groups = [{"params": list(model.layers[0].parameters()), "lr_scale": 0.5},
              {"params": list(model.layers[1].parameters())}]
    Trainer(splits, ds.task, lr=1e-2, batch_size=36, schedule=schedule).fit(model, 5, param_groups=groups)
    assert len(rates) == 5 * 5  # 180 training rows / batch 36
    assert rates[0] == [5e-3, 1e-2]
    if schedule == "constant":
        assert all(r == [5e-3, 1e-2] for r in rates)
    else:  # cosine: non-increasing, every group scaled alike, last step close to 0
        firsts = [r[1] for r in rates]
        assert all(a >= b for a, b in zip(firsts, firsts[1:]))
        assert all(r[0] == pytest.approx(r[1] / 2) for r in rates)
        assert firsts[-1] < 0.01 * firsts[0]


def test_the_fused_optimiser_steps_as_the_per_parameter_one_whatever_the_gradient_layout():
    """The trainer's AdamW is PyTorch's fused kernel, which reads a parameter and its gradient as flat
    buffers of one layout: given a permuted parameter (a dense KAN layer's edge tensor is one) and a
    gradient in another layout, the raw kernel silently applies gradients to the wrong entries. Ours copies
    such a gradient into the parameter's layout first and steps as the per-parameter implementation does."""
    from bench.run.train import adamw

    base = torch.randn(9, 30, 20, generator=torch.Generator().manual_seed(0))
    after = {}
    for kind in ("per-parameter", "ours"):
        p = torch.nn.Parameter(torch.empty(9, 30, 20).permute(2, 1, 0).copy_(base.permute(2, 1, 0)))
        opt = adamw([p], lr=3e-3) if kind == "ours" else torch.optim.AdamW([p], lr=3e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            p.grad = torch.randn(20, 30, 9, generator=g)  # contiguous: not the parameter's layout
            opt.step()
        after[kind] = p.detach().clone()
    assert opt.defaults["fused"]
    assert torch.allclose(after["ours"], after["per-parameter"], atol=1e-6)  # without the copy: off by ~0.1


def test_the_fused_optimiser_sees_permuted_parameters_in_memory_order_bit_for_bit():
    """A dense KAN's edge tensors have permuted strides; the CPU's fused kernel would copy each into a
    contiguous buffer and back every step. Ours hands it a contiguous view of the same storage instead:
    the training must be bit-identical to the plain fused AdamW's, zero_grad must clear the model's
    gradients (not only the views'), and the memory a step holds must be counted as before."""
    from bench.model.kan import KAN
    from bench.run.train import MemoryOrderAdamW, adamw, memory_order, step_bytes

    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    after, held = {}, {}
    for kind in ("plain fused", "ours"):
        torch.manual_seed(0)
        model = KAN([12, 16, 3], "bspline")
        params = list(model.parameters())
        assert any(memory_order(p) is not None for p in params)  # the layer-1 and head edge tensors
        opt = adamw(params, lr=3e-3) if kind == "ours" else torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0,
                                                                               fused=True)
        for _ in range(15):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        held[kind] = step_bytes([], opt)
        after[kind] = [p.detach().clone() for p in params]
        if kind == "ours":
            assert isinstance(opt, MemoryOrderAdamW)
            views = [v for g in opt.param_groups for v in g["params"]]
            assert all(v.is_contiguous() for v in views)
            assert {v.untyped_storage().data_ptr() for v in views} == {p.untyped_storage().data_ptr() for p in params}
            opt.zero_grad(set_to_none=False)
            assert all(p.grad is not None and not p.grad.any() for p in params)
            opt.zero_grad()
            assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(after["ours"], after["plain fused"]))
    assert held["ours"] == held["plain fused"]
    # a closure's gradients are the ones the step applies
    torch.manual_seed(0)
    model = KAN([12, 16, 3], "bspline")
    params = list(model.parameters())
    opt, before = adamw(params, lr=3e-3), [p.detach().clone() for p in params]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    assert all(not torch.equal(a, p) for a, p in zip(before, params) if a.dim() > 1)


def test_control_row_and_columns_share_one_fine_tuned_model(tmp_path):
    sweep = sweep_of(["dense", "dense_ft", "quantize"], {"quantize": {"bits": 4, "algorithm": "ste"}})
    env = RunEnv(tmp_path, tmp_path, "cpu")
    rows = {r.method: run_one(r, env) for r in sweep.runs}
    dense, control, qat = rows["dense"], rows["dense_ft"], rows["quantize"]
    # one control per base: every row carries the same control scores, and the dense_ft row is that model
    assert dense["control_metric"] == control["control_metric"] == qat["control_metric"] == control["metric"]
    assert control["val_metric"] == control["control_val_metric"] == qat["control_val_metric"]
    for r in rows.values():
        assert r["metric_delta"] == pytest.approx(r["metric"] - r["control_metric"])
        assert r["dense_delta"] == pytest.approx(r["metric"] - r["dense_metric"])
        assert r["best_epoch"] >= 1 and r["epochs_run"] >= 1
        assert r["threads"] == torch.get_num_threads() == sweep.runs[0].train["threads"]
    assert dense["finetune_best_epoch"] is None  # the plain base: no fine-tune
    # one fine-tune rule: the control and QAT fine-tune at the same rate, finetune_lr_scale x lr
    rate = TRAIN["lr"] * sweep.runs[0].train["finetune_lr_scale"]
    assert control["finetune_lr"] == pytest.approx(rate) and qat["finetune_lr"] == pytest.approx(rate)
    assert control["finetune_epochs_run"] >= 1 and qat["finetune_epochs_run"] >= 1
    assert (tmp_path / "cache").is_dir() and len(list((tmp_path / "cache").glob("dense_ft-*.pt"))) == 1


def test_methods_that_train_their_own_model_get_the_fine_tune_too(tmp_path):
    sweep = sweep_of(["metakan", "slimkan"], {"metakan": {"h": 8}, "slimkan": {"ranks": [0.5, 0.5, 0.5]}})
    env = RunEnv(tmp_path, tmp_path, "cpu")
    for spec in sweep.runs:
        row = run_one(spec, env)
        assert row["status"] == "ok"
        assert row["epochs_run"] >= 1 and row["finetune_epochs_run"] >= 1, spec.method
        assert row["finetune_lr"] is not None


def test_qat_beats_ptq_where_ptq_loses_accuracy(tmp_path):
    """2-bit per-layer quantisation of a trained digits KAN: PTQ loses accuracy; QAT, fine-tuned
    under the shared rule, must recover part of it on validation (it may not silently keep PTQ)."""
    train = {"epochs": 6, "finetune_epochs": 3, "batch_size": 64, "lr": 3e-3}
    sweep = sweep_of(["quantize"], {"quantize": {"bits": 2, "granularity": "layer",
                                                  "algorithm": ["rtn", "ste"]}},
                     datasets=["digits"], train=train, dataset={"digits": {"hidden": [16]}})
    env = RunEnv(tmp_path, tmp_path, "cpu")
    rows = {r.method_config["algorithm"]: run_one(r, env) for r in sweep.runs}
    ptq, qat = rows["rtn"], rows["ste"]
    assert ptq["val_metric"] < ptq["dense_val_metric"] - 0.5  # PTQ really loses accuracy here
    assert qat["finetune_best_epoch"] >= 1  # QAT kept a trained epoch, not the PTQ starting point
    assert qat["val_metric"] > ptq["val_metric"]
    assert qat["stored_bits"] == ptq["stored_bits"]


def test_infeasible_runs_are_recorded_with_reason_and_not_retried(tmp_path):
    sweep = sweep_of(["dense", "impossible"])
    counts = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert counts["ok"] == 1 and counts["infeasible"] == 1 and counts["failed"] == 0
    (row,) = [r for r in ResultsStore(tmp_path).rows() if r["method"] == "impossible"]
    assert row["status"] == "infeasible" and "impossible on purpose" in row["error"]
    again = run_sweep(sweep, tmp_path, tmp_path, quiet=True)
    assert again["skipped_finished"] == 2 and again["infeasible"] == 0


def test_epochs_below_one_is_a_user_error():
    from bench.errors import UserError

    with pytest.raises(UserError, match="epochs"):
        sweep_of(["dense"], train={**TRAIN, "epochs": 0})
    assert math.isclose(sweep_of(["dense"]).runs[0].train["finetune_lr_scale"], 0.1)


def test_zero_fine_tune_epochs_is_no_fine_tune_and_zero_rate_is_zero(tmp_path):
    sweep = sweep_of(["dense_ft", "quantize"], {"quantize": {"bits": 4, "algorithm": "ste"}},
                     train={**TRAIN, "finetune_epochs": 0})
    env = RunEnv(tmp_path, tmp_path, "cpu")
    for spec in sweep.runs:
        row = run_one(spec, env)
        assert row["finetune_best_epoch"] is None and row["finetune_epochs_run"] is None, spec.method
    ds = get_dataset("tiny_regression")
    fit = Trainer(ds.load(".", 0), ds.task, lr=1e-2).fit(KAN([2, 3, 1], "bspline"), 1, lr=0.0)
    assert fit.lr == 0.0  # an explicit rate of 0 is not "the default rate"


def test_executor_plan_prepares_the_control_of_each_fine_tune_budget(tmp_path):
    from bench.run.plan import plan_sweep
    from bench.run.sweep import Sweep

    a = sweep_of(["dense"]).runs[0]
    b = sweep_of(["dense"], train={**TRAIN, "finetune_lr_scale": 0.5}).runs[0]
    env = RunEnv(tmp_path, tmp_path, "cpu")
    run_one(a, env)  # caches the base and a's control
    plan = plan_sweep(Sweep("t", [a, b], "cpu", [], {}), tmp_path)
    assert plan.needs[a.run_id] == set() and len(plan.needs[b.run_id]) == 1  # b's control is missing


def test_a_stage_trains_for_the_epochs_that_one_function_decides(tmp_path):
    """bench.run.plan.stage_epochs decides a stage's epochs; the cache key, the training, the row and the
    plan's predicted cache file all follow it (a method that does not train its own model cannot set them)."""
    from bench.compression.methods import get_method_class
    from bench.run.plan import plan_sweep, stage_cache, stage_epochs

    sweep = sweep_of(["metakan", "kmeans"], {"metakan": {"joint_epochs": 2}, "kmeans": {"K": 2}},
                     datasets=["tiny_regression"], train={**TRAIN, "epochs": 1})
    (own,) = [s for s in sweep.runs if s.method == "metakan"]
    (post,) = [s for s in sweep.runs if s.method == "kmeans"]
    method = get_method_class("metakan")(**own.method_config)
    assert stage_epochs(own, method) == (2, True)
    assert stage_epochs(own) == stage_epochs(post, get_method_class("kmeans")(**post.method_config)) == (1, False)
    key, name = stage_cache(own, method)
    assert key["train"]["epochs"] == 2 and stage_cache(own)[0]["train"]["epochs"] == 1
    plan = plan_sweep(sweep, tmp_path)
    assert name in {f for st in plan.stages.values() if st.own for f in st.files}

    env = RunEnv(tmp_path, tmp_path, "cpu")
    rows = {s.method: run_one(s, env) for s in sweep.runs}
    assert rows["metakan"]["stage_epochs"] == 2 and rows["metakan"]["epochs"] == 1
    assert rows["metakan"]["epochs_run"] == 2  # patience 0: every one of the stage's epochs ran
    assert "stage_epochs" not in rows["kmeans"] and rows["kmeans"]["epochs_run"] == 1
    assert {p.name for p in (tmp_path / "cache").glob("*.pt")} == {f for st in plan.stages.values() for f in st.files}
