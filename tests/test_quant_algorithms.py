"""Quantisation algorithms beyond round to nearest (bench.compression.ptq, bench.compression.quant,
bench.compression.mixed_precision,
methods/quantize.py): GPTQ against a straightforward reference, AdaRound and GPTQ against RTN on the
layer objective, LSQ step sizes that train, branch-aware and mixed-precision bits against hand
counts, exact export/reload, every algorithm end to end."""

import copy
import json

import pytest
import torch

from bench.compression.methods import METHODS
from bench.compression.mixed_precision import allocate_widths
from bench.compression.ptq import adaround_codes, gptq_codes, layer_hessian, layer_objective
from bench.compression.quant import BranchSource, LayerGrid, LSQSource, QFormat, QuantSource, branch_slices
from bench.compression.storage import export_model, load_model, storage_report
from bench.errors import Infeasible
from bench.model.kan import KAN, kan_layers
from bench.registry import load_plugins
from bench.run.runner import RunEnv, run_one
from bench.run.sweep import build_sweep

load_plugins()
E = 9  # 8 basis functions + base branch


class Ctx:
    """The slice of CompressContext that post-training quantisation uses (no fine-tune)."""

    seed = 0

    def __init__(self, x):
        self.x = x
        self.result = type("R", (), {"details": {}, "theoretical_speedup": 1.0})()

    def calibration_batch(self, n):
        return self.x[:n]

    def finetune(self, model, desc=""):
        raise AssertionError("post-training quantisation must not fine-tune")


def tiny_layer(bits=3, seed=0):
    torch.manual_seed(seed)
    layer = KAN([6, 5], "bspline").layers[0]
    x = torch.randn(256, 6)
    with torch.no_grad():
        feats = layer.features(x)
    w = layer.edge_tensor().detach()
    grid = LayerGrid(w, [("all", slice(0, E), QFormat(bits))])
    return w, feats.reshape(256, -1), grid


def reference_gptq(w, h, scale, zero, qmin, qmax, order):
    """Optimal Brain Quantizer, one column at a time in ``order`` and in float64: quantise the column,
    move its error onto the columns still to do through the inverse Hessian of those columns, drop it."""
    w, h = w.double().clone(), h.double()
    todo = list(order)
    codes = torch.zeros(w.shape, dtype=torch.int64)
    while todo:
        j, hinv = todo[0], torch.linalg.inv(h[todo][:, todo])
        q = (torch.round(w[:, j] / scale[:, j]) + zero[:, j]).clamp(qmin[:, j], qmax[:, j])
        codes[:, j] = q.long()
        err = (w[:, j] - (q - zero[:, j]) * scale[:, j]) / hinv[0, 0]
        w[:, todo] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
        todo = todo[1:]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_reference_and_beats_round_to_nearest(act_order):
    w, x, grid = tiny_layer(bits=3)
    w2d = w.reshape(5, -1)
    flat = [t.reshape(5, -1) for t in grid.expand()]
    h = layer_hessian(x)
    codes = gptq_codes(w2d, h, *flat, block=8, act_order=act_order)  # several blocks of 8 columns
    damped = h.double() + torch.eye(h.shape[0], dtype=torch.float64) * 0.01 * torch.diag(h).double().mean()
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act_order else list(range(h.shape[0]))
    ref = reference_gptq(w2d, damped, *(t.double() for t in flat), order)
    assert torch.equal(codes, ref)
    rtn = grid.round_to_nearest(w).reshape(5, -1)
    assert not torch.equal(codes, rtn)
    deq = grid.dequantize(codes.reshape(w.shape)).reshape(5, -1)
    err_gptq = layer_objective(x, w2d, deq)
    err_rtn = layer_objective(x, w2d, grid.dequantize(rtn.reshape(w.shape)).reshape(5, -1))
    assert err_gptq < 0.6 * err_rtn
    assert layer_objective(x, w2d, w2d) == 0.0 and layer_objective(x, w2d, 0 * w2d) == pytest.approx(1.0)


def test_adaround_beats_round_to_nearest_and_stays_within_one_step():
    w, x, grid = tiny_layer(bits=3, seed=1)
    w2d = w.reshape(5, -1)
    flat = [t.reshape(5, -1) for t in grid.expand()]
    codes = adaround_codes(w2d, x, *flat, iters=300)
    rtn = grid.round_to_nearest(w).reshape(5, -1)
    assert (codes - rtn).abs().max() <= 1  # it only chooses between rounding down and up
    err = layer_objective(x, w2d, grid.dequantize(codes.reshape(w.shape)).reshape(5, -1))
    assert err < 0.9 * layer_objective(x, w2d, grid.dequantize(rtn.reshape(w.shape)).reshape(5, -1))


def test_lsq_step_sizes_train_and_freeze_exactly():
    torch.manual_seed(3)
    model = KAN([4, 6, 1], "bspline")
    x = torch.rand(128, 4) * 2 - 1
    y = (x[:, :1] * x[:, 1:2]).sin()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        layer.set_source(LayerGrid(w, [(n, c, QFormat(3, scale_dtype="float16")) for n, c in branch_slices(E, True)])
                         .lsq_source(w))
    steps0 = [p.step.detach().clone() for p in model.modules() if isinstance(p, LSQSource)]
    assert len(steps0) == 4  # two layers x two branches
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        assert all(float(p.step.grad.abs().sum()) > 0 for p in model.modules() if isinstance(p, LSQSource))
        opt.step()
    assert loss.item() < 0.5 * first
    steps = [p.step.detach() for p in model.modules() if isinstance(p, LSQSource)]
    assert all(float((s / s0 - 1).abs().mean()) > 0.01 for s, s0 in zip(steps, steps0))  # the steps moved
    before = model(x).detach()
    for _, layer in kan_layers(model):
        layer.set_source(layer.source.freeze())
    assert all(type(layer.source.coef) is QuantSource for layer in model.layers)
    assert torch.equal(model(x), before)


def test_branch_aware_bits_hand_count_and_reload(tmp_path):
    torch.manual_seed(4)
    model = KAN([784, 64, 10], "bspline")
    x = torch.randn(64, 784)
    q = copy.deepcopy(model)
    METHODS["quantize"](bits=4, branch_aware=True, base_bits=8, calibrate=False).compress(q, Ctx(x))
    src = q.layers[0].source
    assert type(src) is BranchSource and src.coef.bits == 4 and src.base.bits == 8
    hand = 0
    for out, inp in ((64, 784), (10, 64)):  # codes + one float32 scale per node + a 4-bit width, per branch
        hand += out * inp * 8 * 4 + out * 32 + 4
        hand += out * inp * 1 * 8 + out * 32 + 4
    assert storage_report(q).coef_stored_bits == hand
    # separate scales: the base branch's scale comes from the base weights alone
    w = model.layers[0].edge_tensor().detach()
    assert torch.allclose(src.base.scale.reshape(-1), w[:, :, -1].abs().amax(1) / 127)
    export_model(q, tmp_path / "b.kanb")
    re = load_model(tmp_path / "b.kanb")
    assert type(re.layers[0].source) is BranchSource
    assert torch.equal(re(x), q(x))


def test_allocate_widths_greedy_under_budget():
    costs = {"a": {2: 20, 4: 40, 8: 80}, "b": {2: 2, 4: 4, 8: 8}}
    sens = {"a": {2: 1.0, 4: 0.1, 8: 0.0}, "b": {2: 5.0, 4: 1.0, 8: 0.0}}
    assert allocate_widths(costs, sens, 88) == {"a": 8, "b": 8}
    assert allocate_widths(costs, sens, 60) == {"a": 4, "b": 8}  # narrowing a costs least per bit saved
    assert allocate_widths(costs, sens, 28) == {"a": 2, "b": 8}
    assert allocate_widths(costs, sens, 25) == {"a": 2, "b": 4}
    with pytest.raises(Infeasible, match="narrowest"):
        allocate_widths(costs, sens, 21)


@pytest.mark.parametrize("branch_aware", [False, True])
def test_mixed_precision_meets_budget_with_hand_counted_bits(tmp_path, branch_aware):
    torch.manual_seed(5)
    model = KAN([40, 16, 5], "rbf")
    x = torch.randn(256, 40)
    q = copy.deepcopy(model)
    ctx = Ctx(x)
    METHODS["quantize"](bits=8, avg_bits=3.0, branch_aware=branch_aware, algorithm="gptq").compress(q, ctx)
    widths = ctx.result.details["layer_bits"]
    hand = 0
    for layer, wd in zip(q.layers, widths):
        for name, cut in branch_slices(E, branch_aware):
            n = layer.out_features * layer.in_features * (cut.stop - cut.start)
            hand += n * wd[name] + layer.out_features * 32 + 4
    values = (40 * 16 + 16 * 5) * E
    rep = storage_report(q)
    assert rep.coef_stored_bits == hand <= 3.0 * values
    assert ctx.result.details["avg_bits"] == pytest.approx(hand / values)
    assert len({b for wd in widths for b in wd.values()}) > 1  # really mixed
    units = {f"{k}.{n}" for k in range(2) for n, _ in branch_slices(E, branch_aware)}
    assert set(ctx.result.details["sensitivity"]) == units
    export_model(q, tmp_path / "m.kanb")
    assert torch.equal(load_model(tmp_path / "m.kanb")(x), q(x))
    with pytest.raises(Infeasible, match="narrowest"):  # MetaCluster K=16's ~0.5 bits per value is out of reach
        METHODS["quantize"](avg_bits=0.5).compress(copy.deepcopy(model), Ctx(x))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant_algorithms")
    return RunEnv(out, out, "cpu")


@pytest.mark.parametrize("config", [{"algorithm": "rtn"}, {"algorithm": "gptq", "branch_aware": True},
                                    {"algorithm": "adaround", "adaround_iters": 50},
                                    {"algorithm": "ste", "symmetric": False},
                                    {"algorithm": "lsq", "granularity": "edge", "scale_dtype": "float16"},
                                    {"algorithm": "gptq", "avg_bits": 3.5, "branch_aware": True}])
def test_every_algorithm_runs_end_to_end(env, config):
    data = {"name": "q", "datasets": ["tiny_images"], "models": ["kan"], "bases": ["gram"], "methods": ["quantize"],
            "seeds": [0], "train": {"epochs": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3},
            "method": {"quantize": {"bits": 3, **config}}}
    (spec,) = build_sweep(data).runs
    row = run_one(spec, env)
    assert row["status"] == "ok", row.get("error")
    assert row["reload_max_abs_diff"] == 0.0
    info = json.loads(row["info"])
    assert info["algorithm"] == config["algorithm"] and len(info["layer_bits"]) == 2
    assert (row["finetune_epochs_run"] is not None) == (config["algorithm"] in ("ste", "lsq"))
    if config["algorithm"] in ("gptq", "adaround"):
        assert len(info["layer_error"][config["algorithm"]]) == len(info["layer_error"]["rtn"]) == 2
    if config["algorithm"] == "lsq" and row["finetune_best_epoch"] >= 1:  # epoch 0 kept: the steps are the initial ones
        assert all(change > 0 for layer in info["lsq_step_change"] for change in layer)
    if "avg_bits" in config:
        assert row["requested_ratio"] == pytest.approx(32 / 3.5) and info["avg_bits"] <= 3.5
