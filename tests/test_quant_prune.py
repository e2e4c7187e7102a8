"""Scalar quantisation (bench.compression.quant, methods/quantize.py) and pruning
(bench.compression.pruning, methods/prune.py):
hand-counted bits, bit-packed files, exact reloads, budgets met, structured node removal exact."""

import copy
import json
import math
import struct

import pytest
import torch

from bench.compression.methods import METHODS
from bench.compression.pruning import (
    MaskedSource,
    apply_masks,
    attribution_scores,
    chain_links,
    clean_chain,
    coef_dense_bits,
    connected_masks,
    edge_masks,
    magnitude_scores,
    plan_bits,
    plan_selection,
    remove_dead_nodes,
    smallest_connected_bits,
)
from bench.compression.quant import FakeQuantSource, QFormat, QuantSource, search_clip
from bench.compression.storage import MAGIC, export_model, load_model, storage_report
from bench.errors import Infeasible, UserError
from bench.model.kan import KAN, ConvKAN, kan_layers
from bench.registry import load_plugins
from bench.run.runner import RunEnv, run_one
from bench.run.sweep import build_sweep

load_plugins()
N_EDGES = 784 * 64 + 64 * 10  # [784, 64, 10]
E = 9  # 8 basis functions + base branch


def header_bytes(path) -> int:
    raw = open(path, "rb").read()
    return len(MAGIC) + 4 + struct.unpack_from("<I", raw, len(MAGIC))[0]


def quantized(model, **kw):
    m = copy.deepcopy(model)
    for _, layer in kan_layers(m):
        layer.set_source(QuantSource.from_float(layer.edge_tensor().detach(), **kw))
    return m


@pytest.fixture(scope="module")
def big():
    torch.manual_seed(0)
    return KAN([784, 64, 10], "bspline")


# ----------------------------------------------------------------------------- quantisation
def test_quant_storage_hand_count(big):
    dense = storage_report(big)
    assert dense.coef_stored_bits == N_EDGES * E * 32
    width = 2 * 4  # every layer stores its width as a uint4
    for bits in (8, 6, 4, 3, 2):
        rep = storage_report(quantized(big, bits=bits, granularity="node"))
        assert rep.coef_stored_bits == N_EDGES * E * bits + (64 + 10) * 32 + width
    r8 = storage_report(quantized(big, bits=8))
    assert r8.coef_compression_ratio == pytest.approx(4.0, rel=2e-3)
    assert storage_report(quantized(big, bits=4)).coef_compression_ratio == pytest.approx(8.0, rel=3e-3)
    # per-layer and per-edge scales, float16 scales, asymmetric zero points
    assert storage_report(quantized(big, bits=4, granularity="layer")).coef_stored_bits == \
        N_EDGES * E * 4 + 2 * 32 + width
    edge4 = storage_report(quantized(big, bits=4, granularity="edge")).coef_stored_bits
    assert edge4 == N_EDGES * E * 4 + N_EDGES * 32 + width == N_EDGES * 68 + width
    assert storage_report(quantized(big, bits=4, granularity="edge", scale_dtype="float16")).coef_stored_bits == \
        N_EDGES * E * 4 + N_EDGES * 16 + width
    assert storage_report(quantized(big, bits=3, symmetric=False)).coef_stored_bits == \
        N_EDGES * E * 3 + 74 * (32 + 3) + width
    # per-edge float32 scales cost about as much as going to 8-bit values: 4-bit+edge scales ~ 8-bit+node scales
    assert 0.9 < edge4 / r8.coef_stored_bits < 1.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_changes_weights_outputs_close_at_8_bits(symmetric):
    torch.manual_seed(1)
    model = KAN([16, 8, 3], "bspline")
    x = torch.randn(64, 16)
    ref = model(x).detach()
    errs = {}
    for bits in (8, 4, 2):
        q = quantized(model, bits=bits, symmetric=symmetric)
        for (_, a), (_, b) in zip(kan_layers(model), kan_layers(q)):
            assert not torch.equal(a.edge_tensor(), b.edge_tensor())
            step = (a.edge_tensor() - b.edge_tensor()).abs().max()
            assert step <= a.edge_tensor().abs().max() / (2 ** (bits - 1) - 1)  # at most one quantisation step
        errs[bits] = float((q(x) - ref).detach().abs().max() / ref.abs().max())
    assert 0 < errs[8] < 0.02
    assert errs[8] < errs[4] < errs[2]


@pytest.mark.parametrize("bits,symmetric,scale_dtype,granularity", [(4, True, "float32", "node"),
                                                                    (3, False, "float16", "edge"),
                                                                    (8, True, "float16", "layer")])
def test_quant_export_bitpacks_and_reloads(tmp_path, bits, symmetric, scale_dtype, granularity):
    torch.manual_seed(2)
    model = KAN([40, 16, 5], "rbf")
    q = quantized(model, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, granularity=granularity)
    rep = storage_report(q)
    size = export_model(q, tmp_path / "q.kanb")
    dense_size = export_model(model, tmp_path / "d.kanb")
    # the payload after the header is exactly every tensor at its stored width (sub-byte codes packed)
    assert size - header_bytes(tmp_path / "q.kanb") == sum(math.ceil(it.bits / 8) for _, it in rep.items)
    codes = [it for n, it in rep.items if n.endswith("source.q")]
    assert [it.encoding for it in codes] == [f"{'' if symmetric else 'u'}int{bits}"] * 2
    hand = math.ceil(40 * 16 * E * bits / 8) + math.ceil(16 * 5 * E * bits / 8)
    assert sum(math.ceil(it.bits / 8) for it in codes) == hand
    payload, dense_payload = size - header_bytes(tmp_path / "q.kanb"), dense_size - header_bytes(tmp_path / "d.kanb")
    assert payload < dense_payload * (bits + 3) / 32
    re = load_model(tmp_path / "q.kanb")
    x = torch.randn(32, 40)
    assert torch.equal(re(x), q(x))
    assert type(re.layers[0].source) is QuantSource
    assert re.layers[0].source.scale.dtype == q.layers[0].source.scale.dtype


def test_fake_quant_ste_trains_and_freezes_exactly():
    torch.manual_seed(3)
    model = KAN([4, 6, 1], "bspline")
    x = torch.rand(128, 4) * 2 - 1
    y = (x[:, :1] * x[:, 1:2]).sin()
    for _, layer in kan_layers(model):
        layer.set_source(FakeQuantSource(layer.edge_tensor().detach(), bits=4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        assert model.layers[0].source.weight.grad.abs().sum() > 0  # the STE passes gradients
        opt.step()
    assert loss.item() < 0.5 * first
    before = model(x).detach()
    for _, layer in kan_layers(model):
        layer.set_source(layer.source.freeze())
    assert torch.allclose(model(x), before, atol=1e-6)
    assert storage_report(model).coef_stored_bits == (4 * 6 + 6 * 1) * E * 4 + 7 * 32 + 2 * 4


def test_calibrated_clipping_lowers_layer_error():
    torch.manual_seed(4)
    model = KAN([30, 8], "bspline")
    x = torch.randn(256, 30)
    with torch.no_grad():
        clip = search_clip(model.layers[0].edge_tensor().detach(), model.layers[0].features(x), slice(0, E), QFormat(3))
    assert clip.shape == (8,) and bool((clip <= 1).all()) and bool((clip < 1).any())
    ref = model(x).detach()
    plain = quantized(model, bits=3)
    tuned = copy.deepcopy(model)
    tuned.layers[0].set_source(QuantSource.from_float(model.layers[0].edge_tensor().detach(), bits=3, clip=clip))
    assert ((tuned(x) - ref) ** 2).mean() < ((plain(x) - ref) ** 2).mean()


def test_quantize_bad_hyperparameters():
    for bad in ({"bits": 1}, {"bits": 9}, {"granularity": "row"}, {"algorithm": "both"}, {"scale_dtype": "int8"},
                {"mode": "ptq"}, {"base_bits": 4}, {"branch_aware": True, "base_bits": 4, "avg_bits": 3.0},
                {"avg_bits": 0.0}, {"adaround_iters": 0}):
        with pytest.raises(UserError):
            METHODS["quantize"](**bad)


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scope,structured", [("global", True), ("layer", False)])
def test_prune_budget_met_within_5_percent(big, scope, structured):
    dense = coef_dense_bits(big)
    scores = magnitude_scores(big)
    for ratio in (2, 4, 8, 16, 32):
        m = copy.deepcopy(big)
        masks, bits = plan_selection(scores, edge_masks(m), [E, E], dense // ratio, scope, structured)
        apply_masks(m, masks, clean=structured)
        if structured:
            remove_dead_nodes(m)
        rep = storage_report(m)
        assert rep.coef_stored_bits == bits
        # hand count: survivors at float32 plus the cheaper of mask and index lists
        hand = 0
        for layer in m.layers:
            n, cells = layer.source.kept, layer.out_features * layer.in_features
            hand += n * E * 32 + min(cells, n * math.ceil(math.log2(cells)))
        assert hand == bits
        assert ratio <= rep.coef_compression_ratio <= 1.05 * ratio


def test_mask_or_index_switches_at_the_right_sparsity(tmp_path):
    out, inp = 64, 784  # 50176 cells: an index costs 16 bits, so index lists win below 50176 / 16 = 3136 edges
    w = torch.randn(out, inp, E)
    for kept, pattern, pbits in ((3136, "mask", 50176), (3135, "index", 3135 * 16), (10, "index", 160),
                                 (20000, "mask", 50176)):
        idx = torch.randperm(out * inp)[:kept].sort().values
        src = MaskedSource(out, inp, E, idx, w.reshape(-1, E)[idx])
        assert src.pattern == pattern
        items = {it.name: it for it in src.storage()}
        assert items["values"].bits == kept * E * 32
        assert (items.get("mask") or items.get("index")).bits == pbits
        assert (items["mask"].encoding == "uint1") if pattern == "mask" else (items["index"].encoding == "uint16")


@pytest.mark.parametrize("kept", [40, 200])
def test_masked_sparse_path_matches_dense_and_reloads(tmp_path, kept):
    torch.manual_seed(5)
    model = KAN([30, 20, 4], "chebyshev")
    m = torch.zeros(20 * 30, dtype=torch.bool)
    m[torch.randperm(600)[:kept]] = True
    apply_masks(model, [m.reshape(20, 30), torch.ones(4, 20, dtype=torch.bool)], clean=False)
    src = model.layers[0].source
    assert src.use_fast_path() == (kept <= 150)
    feats = torch.randn(16, 30, 4 * 0 + src.edge_dim)
    dense = feats.reshape(16, -1) @ src.edge_tensor().reshape(20, -1).t()
    assert torch.allclose(src.contract(feats), dense, atol=1e-5)
    size = export_model(model, tmp_path / "p.kanb")
    items = storage_report(model).items
    assert size - header_bytes(tmp_path / "p.kanb") == sum(math.ceil(it.bits / 8) for _, it in items)
    assert any(it.encoding == "uint1" for _, it in items) or any(n.endswith("index") for n, _ in items)
    x = torch.randn(8, 30)
    assert torch.allclose(load_model(tmp_path / "p.kanb")(x), model(x), atol=1e-6)


def test_structured_node_removal_is_exact_and_smaller(tmp_path):
    torch.manual_seed(6)
    model = KAN([10, 8, 6, 3], "bspline")
    with torch.no_grad():
        for layer in model.layers:
            layer.bias.normal_()
    masks = [torch.rand(8, 10) < 0.6, torch.rand(6, 8) < 0.6, torch.rand(3, 6) < 0.7]
    masks[0][0] = False  # hidden node 0 of layer 1: no inputs -> constant, folded into the next bias
    masks[1][:, 1] = False  # hidden node 1 of layer 1: nobody reads it
    masks[0][2], masks[1][:, 2] = False, False  # node 2: nothing at all
    masks[2][:, 4] = False  # node 4 of layer 2 unread -> its in-edges go, possibly killing more
    masks[1][:, 0] = True  # make sure node 0's outputs matter before folding
    raw = copy.deepcopy(model)
    apply_masks(raw, masks, clean=False)
    small = copy.deepcopy(model)
    apply_masks(small, masks, clean=True)
    removed = remove_dead_nodes(small)
    assert small.widths[0] == 10 and small.widths[-1] == 3
    assert small.widths[1] <= 5 and small.widths[2] <= 5 and sum(removed) >= 4
    x = torch.randn(64, 10) * 1.5
    assert torch.allclose(small(x), raw(x), atol=1e-5)
    assert storage_report(small).stored_bits < storage_report(raw).stored_bits
    export_model(small, tmp_path / "s.kanb")
    re = load_model(tmp_path / "s.kanb")
    assert re.widths == small.widths
    assert torch.allclose(re(x), small(x), atol=1e-6)


def test_attribution_ignores_dead_paths():
    torch.manual_seed(7)
    model = KAN([6, 5, 2], "bspline")
    with torch.no_grad():
        model.layers[1].source.weight[:, 3] = 0  # hidden node 3 feeds nothing
        model.layers[0].source.weight[1, 4] = 0  # one dead edge
    scores = attribution_scores(model, torch.randn(128, 6))
    assert [tuple(s.shape) for s in scores] == [(5, 6), (2, 5)]
    assert float(scores[0][3].abs().max()) < 1e-6  # edges into an unread node carry no attribution
    assert float(scores[0][1, 4]) == 0.0 and float(scores[1][:, 3].abs().max()) == 0.0
    assert bool((scores[0][[0, 1, 2, 4]].sum(1) > 0).all())


def test_prune_bad_hyperparameters_and_infeasible_budget(big):
    for bad in ({"ratio": 1.0}, {"ratio": 0.5}, {"score": "random"}, {"scope": "row"}, {"steps": 0}):
        with pytest.raises(UserError):
            METHODS["prune"](**bad)
    with pytest.raises(Infeasible, match="below the 602 bits of the smallest connected model"):
        plan_selection(magnitude_scores(big), edge_masks(big), [E, E], 100)


def test_prune_ratio_above_smallest_connected_model_is_infeasible():
    # KAN [2, 8, 1], edge_dim 9: one path is [1, 2] + [1, 1] after node removal,
    # 2 * 9 * 32 + min(2, 1) + min(1, 1) = 578 bits of 6912 -> largest feasible coef ratio 11.96
    small = KAN([2, 8, 1], "bspline")
    assert smallest_connected_bits([(8, 2), (1, 8)], [E, E], structured=True) == 578
    assert smallest_connected_bits([(8, 2), (1, 8)], [E, E], structured=False) == 583  # + mask/index of full layers
    with pytest.raises(Infeasible, match="below the 578 bits"):
        plan_selection(magnitude_scores(small), edge_masks(small), [E, E], 577, structured=True)
    masks, bits = plan_selection(magnitude_scores(small), edge_masks(small), [E, E], 578, structured=True)
    assert bits == 578 and [int(m.sum()) for m in masks] == [1, 1]
    method = METHODS["prune"](ratio=16.0)
    layers = [la for _, la in kan_layers(small)]
    with pytest.raises(Infeasible) as err:
        method._check_feasible(layers, True, coef_dense_bits(small), 10_000, 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("prune ratio 16 needs <= 432 coefficient bits but the smallest connected model (1 edge per layer) "
                   "stores 578; largest feasible ratio 11.9")
    METHODS["prune"](ratio=11.9)._check_feasible(layers, True, coef_dense_bits(small), 10_000, 0)  # feasible


def test_prune_one_plus_one_plan_is_a_connected_path():
    torch.manual_seed(11)
    model = KAN([2, 8, 1], "bspline")
    with torch.no_grad():
        for layer in model.layers:
            layer.bias.normal_()
    # the top edge of each layer does not connect: layer 0's best reaches node 3, layer 1's best reads node 5
    s0, s1 = torch.rand(8, 2) * 0.5, torch.rand(1, 8) * 0.5
    s0[3, 1], s1[0, 5] = 10.0, 10.0
    s0[5, 0], s1[0, 3] = 2.0, 1.0  # paths: 0 -> 5 -> out sums 12, 1 -> 3 -> out sums 11
    budget = 600  # fits 2 edges (578 bits), not 3 (>= 866)
    for structured in (True, False):
        masks, bits = plan_selection([s0, s1], edge_masks(model), [E, E], budget, structured=structured)
        assert [m.nonzero().tolist() for m in masks] == [[[5, 0]], [[0, 5]]]
        assert bits == (578 if structured else 583)
    m = copy.deepcopy(model)
    apply_masks(m, masks, clean=True)
    assert remove_dead_nodes(m) == [7] and m.widths == [2, 1, 1]
    assert storage_report(m).coef_stored_bits == 578
    x = torch.zeros(64, 2)
    x[:, 0] = torch.linspace(-1.5, 1.5, 64)
    y = m(x).detach().reshape(-1)
    assert float(y.std()) > 1e-4  # depends on input 0 ...
    x2 = x.clone()
    x2[:, 1] = 0.7
    assert torch.equal(m(x2).detach().reshape(-1), y)  # ... and not on input 1 (no edge reads it)


def _is_connected(masks, links):
    return all(torch.equal(a, b) for a, b in zip(connected_masks(masks, links), masks))


@pytest.mark.parametrize("seed", range(6))
def test_plans_are_always_connected(seed):
    g = torch.Generator().manual_seed(seed)
    widths = [int(w) for w in torch.randint(2, 9, (int(torch.randint(2, 5, (1,), generator=g)) + 1,), generator=g)]
    shapes = [(o, i) for i, o in zip(widths[:-1], widths[1:])]
    links = chain_links(shapes)
    assert links == [1] * len(shapes)
    dense = sum(o * i * E * 32 for o, i in shapes)
    for trial in range(8):
        scores = [torch.rand(s, generator=g) ** 4 for s in shapes]
        alive = [torch.rand(s, generator=g) < 0.8 for s in shapes] if trial % 2 else \
            [torch.ones(s, dtype=torch.bool) for s in shapes]
        alive = connected_masks(alive, links)  # what an earlier pruning step leaves
        if not alive[0].any():
            continue
        structured = trial % 4 < 2
        least = smallest_connected_bits(shapes, [E] * len(shapes), structured)
        budget = int(least + torch.rand(1, generator=g) * (dense - least))
        masks, bits = plan_selection(scores, alive, [E] * len(shapes), budget, "global" if trial % 3 else "layer",
                                     structured)
        assert least <= bits <= budget and bits == plan_bits(masks, [E] * len(shapes), structured)
        assert all(m.any() for m in masks)  # at least one path
        assert _is_connected(masks, links)
        assert all(torch.equal(a, b) for a, b in zip(clean_chain(masks), masks))  # the same as clean_chain
        assert all(not bool((m & ~a).any()) for m, a in zip(masks, alive))  # nothing revived
        with pytest.raises(Infeasible):
            plan_selection(scores, alive, [E] * len(shapes), least - 1, "global", structured)


def test_conv_plans_connect_through_channels():
    torch.manual_seed(12)
    model = ConvKAN((1, 8, 8), 3, channels=[2, 4])
    shapes = [(la.out_features, la.in_features) for _, la in kan_layers(model)]
    links = chain_links(shapes)
    assert shapes == [(2, 9), (4, 18), (3, 4)] and links == [1, 9, 1]  # 3x3 patches per channel, then the head
    dense = coef_dense_bits(model)
    for budget in (smallest_connected_bits(shapes, [E] * 3), 900, dense // 8, dense // 2):
        masks, bits = plan_selection(magnitude_scores(model), edge_masks(model), [E] * 3, budget)
        assert bits <= budget and _is_connected(masks, links) and all(m.any() for m in masks)
    masks, _ = plan_selection(magnitude_scores(model), edge_masks(model), [E] * 3, 900)
    (o0, i0), (o1, i1), (o2, i2) = (m.nonzero().tolist()[0] for m in masks)
    assert i1 // 9 == o0 and i2 == o1  # one path: channel o0 -> channel o1 -> output o2


def test_prune_method_iterative_attribution_run(tmp_path):
    env = RunEnv(tmp_path, tmp_path, "cpu")
    data = {"name": "t", "datasets": ["tiny_images"], "models": ["kan"], "bases": ["bspline"], "methods": ["prune"],
            "seeds": [0], "train": {"epochs": 2, "finetune_epochs": 2, "batch_size": 32, "lr": 3e-3},
            "method": {"prune": {"ratio": 4.0, "score": "attribution", "scope": "layer", "steps": 2}}}
    (spec,) = build_sweep(data).runs
    row = run_one(spec, env)
    assert row["status"] == "ok", row["error"]
    info = json.loads(row["info"])
    assert row["requested_ratio"] == 4.0
    assert 4.0 <= info["achieved_coef_ratio"] <= 4.2  # against the original dense KAN
    assert info["achieved_coef_ratio"] == pytest.approx(row["coef_stored_bits"] and
                                                         (64 * 6 + 6 * 4) * E * 32 / row["coef_stored_bits"])
    assert [s["finetune_epochs"] for s in info["steps"]] == [1, 1]
    assert row["theoretical_speedup"] > 3.0
    assert row["reload_max_abs_diff"] < 1e-5


def test_masked_fast_path_skips_dead_inputs_and_matches_dense():
    from bench.compression.pruning import MaskedSource
    from bench.model.sources import EdgeSource

    torch.manual_seed(0)
    w = torch.randn(5, 12, 9, dtype=torch.double)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[:, :4] = torch.rand(5, 4) < 0.7  # inputs 4..11 are dead
    mask[0, 0] = True
    src = MaskedSource.from_mask(w, mask).double()
    assert src.use_fast_path() and src.active_inputs().max() < 4
    f = torch.randn(3, 12, 9, dtype=torch.double, requires_grad=True)
    assert torch.allclose(src.contract(f), EdgeSource.contract(src, f))
    g = torch.randn(3, 5, dtype=torch.double)
    fast = torch.autograd.grad(src.contract(f), (src.values, f), g)
    dense = torch.autograd.grad(EdgeSource.contract(src, f), (src.values, f), g)
    assert all(torch.allclose(a, b) for a, b in zip(fast, dense))
    # at inference the layer keeps only the active columns (its smaller shape), for either feature layout,
    # and rebuilds them when a value changes
    with torch.no_grad():
        by_basis = f.detach().transpose(1, 2).contiguous().transpose(1, 2)  # [B, in, n+1] view of [B, n+1, in]
        for feats in (f.detach(), by_basis):
            fast = src.contract(feats)
            assert src._cache[1].numel() == 5 * src.active_inputs().numel() * 9 < w.numel()
            assert torch.allclose(fast, EdgeSource.contract(src, feats))
        src.values.mul_(2.0)
        fast = src.contract(f.detach())
        assert torch.allclose(fast, EdgeSource.contract(src, f.detach()))
