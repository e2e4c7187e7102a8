"""Tucker source, the `tucker` (post-training) and `slimkan` (from scratch) methods."""

import copy
import math
import re

import pytest
import tensorly as tl
import torch

from bench.compression.methods import METHODS, CompressContext
from bench.compression.storage import export_model, load_model, storage_report
from bench.compression.tucker_factors import (
    ORDERS,
    LoTRASource,
    TuckerSource,
    component_lrs,
    requested_coef_ratio,
    resolve_ranks,
)
from bench.data import get_dataset
from bench.errors import Infeasible, UserError
from bench.model.bases import basis_major as basis_major_layout
from bench.model.kan import KAN, kan_layers
from bench.run.train import Trainer

HEADER_SLACK_BYTES = 4096


def _random_source(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = resolve_ranks(shape, ranks)
    return TuckerSource(torch.randn(*r, generator=g), *(torch.randn(s, k, generator=g) for s, k in zip(shape, r)))


# (shape, ranks, batch): the cheapest order differs between these cases
CASES = [((6, 20, 9), (3, 10, 5), 4), ((64, 50, 9), (4, 6, 3), 128), ((10, 64, 9), (10, 64, 9), 1024),
         ((5, 7, 4), (2, 3, 2), 1), ((32, 40, 9), (30, 39, 9), 64), ((64, 64, 9), (8, 4, 9), 64)]


@pytest.mark.parametrize("shape,ranks,batch", CASES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("basis_major", [False, True])
def test_every_contraction_order_matches_rebuilt_tensor(shape, ranks, batch, order, basis_major):
    """Features as eager layers give them, and basis-major as compiled ones do (``[B, n+1, in]`` underneath,
    which the merged order reads without a copy)."""
    src = _random_source(shape, ranks, seed=sum(shape)).double()  # float64: the orders agree to rounding
    g1 = torch.Generator().manual_seed(1)
    if basis_major:
        x = torch.randn(batch, shape[2], shape[1], generator=g1, dtype=torch.float64).transpose(1, 2).requires_grad_()
        assert basis_major_layout(x) or batch == 1 or shape[2] < 2
    else:
        x = torch.randn(batch, shape[1], shape[2], generator=g1, dtype=torch.float64, requires_grad=True)
    ref_src = copy.deepcopy(src)
    ref = x.reshape(batch, -1) @ ref_src.edge_tensor().reshape(shape[0], -1).t()  # full tensor, one matmul
    out = src.contract(x, order=order)
    assert out.shape == (batch, shape[0])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-9)
    g = torch.randn_like(out)
    gx_ref, = torch.autograd.grad(ref, x, g, retain_graph=True)
    (ref * g).sum().backward()
    gx, = torch.autograd.grad(out, x, g, retain_graph=True)
    (out * g).sum().backward()
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-9)
    for name, p in src.factors().items():
        torch.testing.assert_close(p.grad, ref_src.factors()[name].grad, rtol=1e-10, atol=1e-8, msg=name)


@pytest.mark.parametrize("basis_major", [False, True])
def test_lotra_contracts_either_feature_layout_as_its_full_tensor(basis_major):
    """``A0 + update`` through ``LoTRASource.contract`` equals one matmul with its rebuilt edge tensor, for
    features laid out as eager layers give them and basis-major as compiled ones do."""

    g = torch.Generator().manual_seed(3)
    shape, batch = (12, 20, 9), 64
    src = LoTRASource(torch.randn(*shape, generator=g, dtype=torch.float64),
                      _random_source(shape, (4, 6, 3), seed=5)).double()
    if basis_major:
        x = torch.randn(batch, shape[2], shape[1], generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        x = torch.randn(batch, shape[1], shape[2], generator=g, dtype=torch.float64)
    assert basis_major_layout(x) == basis_major
    ref = x.reshape(batch, -1) @ src.edge_tensor().reshape(shape[0], -1).t()
    torch.testing.assert_close(src.contract(x), ref, rtol=1e-10, atol=1e-9)


def test_cost_estimate_picks_different_orders_and_default_uses_it():
    chosen = [_random_source(s, r).choose_order(b) for s, r, b in CASES]
    assert chosen == ["basis_first", "merged", "full", "basis_first", "merged", "in_first"]
    src = _random_source((64, 50, 9), (4, 6, 3))
    costs = src.contraction_costs(128)
    assert src.choose_order(128) == min(costs, key=costs.get)
    # hand count of the merged order: fold [4,6,3] with U_basis and U_in, then B x (50*9*4 + 4*64)
    assert costs["merged"] == 4 * 6 * 3 * 9 + 4 * 6 * 50 * 9 + 128 * (50 * 9 * 4 + 4 * 64)
    assert costs["full"] > 128 * 64 * 50 * 9  # rebuilding costs at least the dense product
    x = torch.randn(128, 50, 9, dtype=torch.float64)
    src = src.double()
    torch.testing.assert_close(src.contract(x), src.contract(x, order="merged"), rtol=0, atol=0)
    torch.testing.assert_close(src.contract(x), src.contract(x, order="full"), rtol=1e-10, atol=1e-9)


def test_full_rank_tucker_reconstructs_and_restores_tensorly_backend():
    a = torch.randn(10, 64, 9, generator=torch.Generator().manual_seed(3))
    before = tl.get_backend()
    src = TuckerSource.from_tensor(a, [1.0, 1.0, 1.0])
    assert tl.get_backend() == before
    assert src.ranks == (10, 64, 9)
    err = float((src.edge_tensor().detach() - a).norm() / a.norm())
    assert err < 1e-5
    assert all(p.dtype == torch.float32 and p.requires_grad for p in src.factors().values())
    # factors are orthonormal (HOOI), so a truncation keeps the largest part of the energy
    torch.testing.assert_close(src.u_in.t() @ src.u_in, torch.eye(64), atol=1e-5, rtol=0)
    low = TuckerSource.from_tensor(a, [4, 16, 3])
    low_err = float((low.edge_tensor().detach() - a).norm() / a.norm())
    assert 0.1 < low_err < 1.0


def test_storage_equals_hand_count_and_file_size(tmp_path):
    m = KAN([20, 6, 4], basis="bspline")
    dense_coef = storage_report(m).coef_stored_bits
    for _, layer in kan_layers(m):
        layer.set_source(TuckerSource.from_tensor(layer.edge_tensor(), [0.5, 0.5, 0.5]))
    rep = storage_report(m)
    # layer 1 [6, 20, 9] -> ranks (3, 10, 5); layer 2 [4, 6, 9] -> ranks (2, 3, 5)
    assert [layer.source.ranks for _, layer in kan_layers(m)] == [(3, 10, 5), (2, 3, 5)]
    per_layer = [3 * 10 * 5 + 6 * 3 + 20 * 10 + 9 * 5, 2 * 3 * 5 + 4 * 2 + 6 * 3 + 9 * 5]
    assert per_layer == [413, 101]
    assert rep.coef_stored_bits == (413 + 101) * 32
    assert rep.coef_compression_ratio == pytest.approx(dense_coef / ((413 + 101) * 32))
    size = export_model(m, tmp_path / "t.kanb")
    assert rep.stored_bits / 8 <= size <= rep.stored_bits / 8 + HEADER_SLACK_BYTES


def test_export_reload_identical_predictions(tmp_path):
    torch.manual_seed(0)
    m = KAN([12, 5, 3], basis="rbf")
    for _, layer in kan_layers(m):
        layer.set_source(TuckerSource.from_tensor(layer.edge_tensor(), [0.6, 0.5, 4]))
    x = torch.randn(64, 12)
    export_model(m, tmp_path / "t.kanb")
    back = load_model(tmp_path / "t.kanb")
    assert all(isinstance(layer.source, TuckerSource) for _, layer in kan_layers(back))
    assert [layer.source.ranks for _, layer in kan_layers(back)] == [(3, 6, 4), (2, 3, 4)]
    with torch.no_grad():
        assert float((back(x) - m.eval()(x)).abs().max()) < 1e-6


@pytest.mark.parametrize("ranks,msg", [([0, 2, 2], "mode 'out' must be > 0"),
                                       ([0.5, 1.5, 0.5], "mode 'in' must be in (0, 1]"),
                                       ([2, 2], "3 numbers")])
def test_bad_ranks_are_user_errors_naming_the_mode(ranks, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        resolve_ranks((10, 20, 9), ranks)


@pytest.mark.parametrize("ranks,mode,size", [([3, 30, 2], "in", 20), ([11, 2, 2], "out", 10),
                                             ([2, 2, 10], "basis", 9)])
def test_int_rank_above_its_mode_is_infeasible(ranks, mode, size):
    with pytest.raises(Infeasible) as err:
        resolve_ranks((10, 20, 9), ranks)
    assert not isinstance(err.value, UserError)
    r = ranks[["out", "in", "basis"].index(mode)]
    assert str(err.value) == (f"Tucker rank {r} for mode {mode!r} exceeds that mode's size {size} in tensor shape "
                              f"[10, 20, 9]; largest feasible rank {size}")
    model = KAN([2, 8, 1], basis="bspline")  # layers [8, 2, 9] and [1, 8, 9]: an in-rank of 3 fits neither
    with pytest.raises(Infeasible, match="mode 'in' exceeds that mode's size 2"):
        METHODS["slimkan"](ranks=[2, 3, 2]).prepare(model)


def test_rank_resolution_fractions_and_redundant_rank():
    assert resolve_ranks((10, 20, 9), [0.5, 0.25, 1.0]) == (5, 5, 9)
    assert resolve_ranks((10, 20, 9), [0.01, 0.01, 0.01]) == (2, 2, 2)  # rounded up, at least 2
    assert resolve_ranks((10, 20, 9), [0.11, 0.11, 0.12]) == (2, 3, 2)
    assert resolve_ranks((1, 8, 9), [0.5, 0.125, 0.5]) == (1, 2, 2)  # a size-1 mode keeps 1; 5 > 1*2 lowered
    assert resolve_ranks((8, 2, 9), [0.25, 0.0625, 0.34]) == (2, 2, 4)
    assert resolve_ranks((10, 20, 9), [1, 0.01, 1]) == (1, 1, 1)  # ints as asked; the 2 lowered to 1*1
    assert resolve_ranks((10, 20, 9), [10, 2, 2]) == (4, 2, 2)  # r1 > r2*r3 adds nothing
    assert resolve_ranks((10, 20, 9), [1, 1.0, 1]) == (1, 1, 1)  # r2 = 20 lowered to r1*r3 = 1


@pytest.mark.parametrize("method", ["tucker", "slimkan"])
def test_method_config_rejects_bad_ranks(method):
    cls = METHODS[method]
    for bad in ([0.5, 0.5], [0.5, -1, 0.5], [0.5, 2.5, 0.5], [0.5, "a", 0.5]):
        with pytest.raises(UserError):
            cls(ranks=bad)
    with pytest.raises(UserError, match="lr_rule"):
        cls(lr_rule="fast")


def test_requested_ratio_hand_count_and_grid_spans_2x_to_30x():
    shapes = [(64, 784, 9), (10, 64, 9)]
    # [0.5, 0.25, 0.5] asks for (32, 196, 4.5) and (5, 16, 4.5)
    asked = (32 * 196 * 4.5 + 64 * 32 + 784 * 196 + 9 * 4.5) + (5 * 16 * 4.5 + 10 * 5 + 64 * 16 + 9 * 4.5)
    assert requested_coef_ratio(shapes, [0.5, 0.25, 0.5]) == pytest.approx((451_584 + 5_760) / asked)
    # a fraction below 2 whole ranks asks for 2: [2, 8, 1] at [0.5, 0.125, 0.5] asks (4, 2, 4.5) and (1, 2, 4.5)
    small = [(8, 2, 9), (1, 8, 9)]
    asked = (4 * 2 * 4.5 + 8 * 4 + 2 * 2 + 9 * 4.5) + (1 * 2 * 4.5 + 1 * 1 + 8 * 2 + 9 * 4.5)
    assert requested_coef_ratio(small, [0.5, 0.125, 0.5]) == pytest.approx(216 / asked)
    m = KAN([784, 64, 10], basis="bspline")
    ratios = []
    for ranks in METHODS["slimkan"].grid["ranks"]:
        for _, layer in kan_layers(m):
            layer.set_source(TuckerSource.random(layer.source.shape, ranks, rms=0.01))
        ratios.append(storage_report(m).coef_compression_ratio)
        assert ratios[-1] == pytest.approx(requested_coef_ratio(shapes, ranks), rel=0.05)
    assert ratios == sorted(ratios) and ratios[0] < 3 and ratios[-1] > 25, ratios
    assert METHODS["tucker"].grid == {"ratio": [2.0, 4.0, 8.0, 16.0]}  # tucker: ranks chosen per layer


def test_rank_allocation_meets_the_ratio_keeps_small_layers_dense_and_prefers_low_error_splits():
    """allocate_ranks: the edge tensors stored ratio times smaller; a layer under 5 % of the values stays
    dense; within a layer the split with the smallest truncation bound (a tensor that is exactly low rank
    in two modes gets exactly those ranks)."""
    from bench.compression.tucker_factors import allocate_ranks, best_ranks, mode_tails, tucker_count

    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(64, 784, 9, generator=g), torch.randn(10, 64, 9, generator=g)
    for ratio in (2.0, 4.8, 16.0):
        r_big, r_small = allocate_ranks([big, small], ratio)
        assert r_small is None
        assert tucker_count(big.shape, r_big) + small.numel() <= (big.numel() + small.numel()) / ratio
        assert tucker_count(big.shape, r_big) > 0.9 * ((big.numel() + small.numel()) / ratio - small.numel())
    # exactly rank (3, *, 2) in the out and basis modes: the budget goes to the input mode
    low = torch.einsum("oa,aic,ec->oie", torch.randn(16, 3, generator=g), torch.randn(3, 100, 2, generator=g),
                       torch.randn(9, 2, generator=g))
    r = best_ranks(low, 16 * 100 * 9 / 4)
    assert r[0] >= 3 and r[2] >= 2 and sum(float(t[k]) for t, k in zip(mode_tails(low), r)) < 1e-9 * float(
        mode_tails(low)[0][0])
    assert allocate_ranks([small], 2.0)[0] is not None  # a model of small layers only: every layer decomposed
    with pytest.raises(Infeasible):
        allocate_ranks([torch.randn(2, 3, 2, generator=g)], 50.0)


def test_tucker_ratio_allocation_beats_the_uniform_fraction_rule_on_a_trained_output_layer(monkeypatch):
    """The implementation fix of issue 26, on a model with a trained (structured) output layer: the same
    fractions in every layer (ratio = 0) cut the small output layer; the allocation leaves it dense and
    the reconstruction of the model's outputs is closer at a similar stored size. (The tiny data's
    output layer holds 6 % of the edge values: the small-layer share is raised to 10 % here.)"""
    from bench.compression import tucker_factors

    monkeypatch.setattr(tucker_factors, "SMALL_LAYER_SHARE", 0.10)
    torch.manual_seed(0)
    trainer = _tiny_trainer(lr=1e-2)
    model = KAN([64, 16, 4], basis="bspline")
    trainer.fit(model, epochs=8)
    x = trainer.splits.x_val
    with torch.no_grad():
        want = model(x)
    outs = {}
    for ratio in (0.0, 3.0):
        m = copy.deepcopy(model)
        method = METHODS["tucker"](ranks=[0.5, 0.25, 0.5], ratio=ratio)
        ctx = CompressContext(trainer=trainer, finetune_epochs=0, seed=0, device=torch.device("cpu"),
                              finetune_lr=trainer.lr)
        method.compress(m, ctx)
        with torch.no_grad():
            outs[ratio] = (float((m(x) - want).norm() / want.norm()), storage_report(m).coef_compression_ratio,
                           ctx.result.details["tucker_ranks"])
    assert outs[3.0][2]["layers.1"] == "dense" and outs[0.0][2]["layers.1"] != "dense"
    assert outs[3.0][1] >= 0.95 * 3.0
    assert outs[3.0][0] < outs[0.0][0], outs


def test_balanced_learning_rates_follow_component_scale():
    a = torch.randn(16, 100, 9, generator=torch.Generator().manual_seed(0))
    src = TuckerSource.from_tensor(a, [8, 20, 4])
    shared = component_lrs(src, 1e-3, "shared", {"core": 2.0})
    assert shared == {"core": 2e-3, "u_out": 1e-3, "u_in": 1e-3, "u_basis": 1e-3}
    lrs = component_lrs(src, 1e-3, "balanced")
    # orthonormal factors have rms 1/sqrt(mode size): rates fall as sqrt of the mode size
    assert lrs["u_in"] / lrs["u_basis"] == pytest.approx(math.sqrt(9 / 100), rel=1e-4)
    assert lrs["u_out"] / lrs["u_in"] == pytest.approx(math.sqrt(100 / 16), rel=1e-4)
    rms_a = float(src.edge_tensor().detach().pow(2).mean().sqrt())
    rms_g = float(src.core.detach().pow(2).mean().sqrt())
    assert lrs["core"] == pytest.approx(1e-3 * rms_g / (4 * rms_a), rel=1e-4)
    assert component_lrs(src, 1e-3, "balanced", {"u_in": 3.0})["u_in"] == pytest.approx(3 * lrs["u_in"])


def _tiny_trainer(lr=3e-3):
    splits = get_dataset("tiny_images").load(None, 0)
    return Trainer(splits, "classification", "cpu", batch_size=32, lr=lr, seed=0)


def test_tucker_finetune_changes_every_factor_and_records_info():
    torch.manual_seed(0)
    trainer = _tiny_trainer()
    model = KAN([64, 6, 4], basis="bspline")  # untrained: fine-tuning surely improves validation
    method = METHODS["tucker"](ranks=[0.5, 0.5, 0.5], ratio=0)  # the same fractions in every layer
    decomposed = copy.deepcopy(model)
    for _, layer in kan_layers(decomposed):
        layer.set_source(TuckerSource.from_tensor(layer.edge_tensor(), [0.5, 0.5, 0.5]))
    val0 = trainer.evaluate(decomposed, "val")
    # an untrained model: fine-tune at the full training rate (the sweep's rule would be 0.1x)
    ctx = CompressContext(trainer=trainer, finetune_epochs=4, seed=0, device=torch.device("cpu"),
                          finetune_lr=trainer.lr)
    method.compress(model, ctx)
    assert trainer.evaluate(model, "val") > val0
    for (_, a), (_, b) in zip(kan_layers(decomposed), kan_layers(model)):
        for name, p in a.source.factors().items():
            assert not torch.allclose(p, b.source.factors()[name]), name
    assert set(ctx.result.details["component_lrs"]) >= {"layers.0.core", "layers.0.u_in", "layers.1.u_basis", "other"}
    assert len(set(ctx.result.details["component_lrs"].values())) > 3  # the balanced rule gives different rates
    assert ctx.result.details["tucker_ranks"] == {"layers.0": [3, 15, 5], "layers.1": [2, 3, 5]}  # 32 > 3*5: lowered
    assert ctx.result.requested_ratio == pytest.approx(requested_coef_ratio([(6, 64, 9), (4, 6, 9)], [0.5, 0.5, 0.5]))
    assert ctx.result.theoretical_speedup > 0


def test_slimkan_prepares_tucker_sources_and_trains_from_scratch():
    torch.manual_seed(0)
    model = KAN([64, 6, 4], basis="rbf")
    method = METHODS["slimkan"](ranks=[0.5, 0.25, 3])
    method.prepare(model)
    srcs = [layer.source for _, layer in kan_layers(model)]
    assert all(isinstance(s, TuckerSource) for s in srcs)
    assert [s.ranks for s in srcs] == [(3, 9, 3), (2, 2, 3)]  # 16 > 3*3: lowered
    rms = float(srcs[0].edge_tensor().detach().pow(2).mean().sqrt())
    assert rms == pytest.approx(0.5 / math.sqrt(64), rel=0.3)  # the dense initialisation's scale
    groups = method.param_groups(model)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert len(groups) == 4 * 2 + 1 and all(g["lr_scale"] > 0 for g in groups)
    trainer = _tiny_trainer()
    before = copy.deepcopy(model)
    fit = trainer.fit(model, 3, param_groups=groups)
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    assert fit.best_val > 40  # 4 classes: chance is 25 %
    assert not torch.allclose(before.layers[0].source.u_in, model.layers[0].source.u_in)
    assert METHODS["slimkan"].trains_own_model() and not METHODS["tucker"].trains_own_model()
    assert method.stage_key()["ranks"] == [0.5, 0.25, 3]
