"""MetaKAN generated sources, K-means codebooks (MetaCluster / kmeans ablation): formulas,
hand-counted storage, fine-tune behaviour, sharing counted once, export/reload."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.compression import codebook, generated
from bench.compression.methods import METHODS, CompressContext
from bench.compression.storage import count_params, export_model, load_model, storage_report
from bench.data import get_dataset
from bench.errors import Infeasible, UserError
from bench.model.kan import KAN, ConvKAN, kan_layers
from bench.model.sources import _MEMBERS, CodebookSource
from bench.run.train import Trainer


def method(name, **cfg):
    return METHODS[name](**cfg)


def tiny_trainer(batch_size=32):
    ds = get_dataset("tiny_images")
    return ds, Trainer(ds.load(None, 0), ds.task, "cpu", batch_size=batch_size, lr=3e-3, seed=0)


# ------------------------------------------------------------------ generated source
def test_generated_source_equals_its_formula():
    torch.manual_seed(0)
    model = KAN([5, 4, 3], "rbf")
    generated.generate_model(model, d=2, h=7, shared=False)
    x = torch.randn(6, 5)
    h = x
    for _, layer in kan_layers(model):
        src = layer.source
        z, lrn = src.embedding, src.learner
        w = F.relu(z @ lrn.fc1.weight.t() + lrn.fc1.bias) @ lrn.fc2.weight.t() + lrn.fc2.bias
        w = w.reshape(layer.out_features, layer.in_features, layer.edge_dim)
        torch.testing.assert_close(src.edge_tensor(), w)
        # the layer's forward is sum_i w[o, i, :] . [phi(x_i), silu(x_i)] + b_o, edge by edge
        feats = layer.features(h)
        ref = torch.einsum("bif,oif->bo", feats, w) + layer.bias
        h_new = layer(h)
        torch.testing.assert_close(h_new, ref, rtol=1e-5, atol=1e-5)
        h = h_new
    # MetaKAN init: Xavier-normal embeddings [edges, d], learner biases zero
    lrn = kan_layers(model)[0][1].source.learner
    assert not lrn.fc1.bias.detach().any() and not lrn.fc2.bias.detach().any()


@pytest.mark.parametrize("d", [1, 2])  # d = 1: the learner's table of linear pieces (at any size here)
def test_generated_edges_are_laid_out_as_the_product_reads_them(d, monkeypatch):
    """A wide layer's generated edge tensor is written in the product matrix's layout (``[n+1, in, out]``
    underneath), so a step reads the product matrix as a view of it; values, forward and gradients are those of
    the plain formula ``learner(embedding)`` in (output, input) order."""
    monkeypatch.setattr(generated, "PIECES_MIN_WORK", 0)
    torch.manual_seed(0)
    model = KAN([30, 16, 3], "bspline")
    generated.generate_model(model, d=d, h=5, shared=False)
    x = torch.randn(8, 30)
    for _, layer in kan_layers(model):
        src = layer.source
        w = src.edge_tensor()
        plain = src.learner(src.embedding).reshape(w.shape)
        torch.testing.assert_close(w, plain)
        as_product = plain.transpose(1, 2).permute(1, 2, 0).reshape(-1, w.shape[0])
        torch.testing.assert_close(src.product_matrix(True), as_product)
        if w.shape[0] >= src.WIDE_OUT:
            assert w.transpose(1, 2).permute(1, 2, 0).reshape(-1, w.shape[0]).data_ptr() == w.data_ptr()
    params = [p for _, layer in kan_layers(model) for p in layer.source.parameters()]
    grads = torch.autograd.grad(model(x).square().sum(), params)
    for _, layer in kan_layers(model):  # the same loss through the plain formula
        src = layer.source
        src.edge_tensor = lambda s=src: s.learner(s.embedding).reshape(s.shape)
    for g, r in zip(grads, torch.autograd.grad(model(x).square().sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("h", [7, 8, 9])  # 7 kinks leave one padding slot in 8; 8 take a table of 16
@pytest.mark.parametrize("compiled", [True, False])
def test_one_input_learner_as_linear_pieces_equals_the_hidden_layer(compiled, h, monkeypatch):
    """At d = 1 the learner runs as a table of its linear pieces (``generated.piecewise_columns``): the same
    values and gradients as ``Linear -> ReLU -> Linear`` (float64, to rounding), with hidden units that never
    bend (w1 = 0, on and off), two units sharing a kink, inputs exactly on a kink (values only: there the
    derivative is either side's, as relu's at 0 is a convention) and far outside every one; compiled and
    eager alike."""
    from bench.model import bases

    monkeypatch.setitem(bases._FUSED, "compiled", {})  # what this test compiles, and nothing before it
    torch.manual_seed(0)
    lrn = generated.MetaLearner(1, h, 6).double()
    with torch.no_grad():
        lrn.fc1.bias.normal_()
        lrn.fc1.weight[2], lrn.fc1.bias[2] = 0.0, 0.5    # always on
        lrn.fc1.weight[3], lrn.fc1.bias[3] = 0.0, -0.5   # always off
        lrn.fc1.weight[5], lrn.fc1.bias[5] = -2 * lrn.fc1.weight[4], -2 * lrn.fc1.bias[4]  # kink of unit 4, flipped
    kinks = (-lrn.fc1.bias / lrn.fc1.weight[:, 0])[[0, 1, 4]].detach()
    z = torch.cat([torch.randn(3000, dtype=torch.float64), kinks, torch.tensor([-1e3, 1e3], dtype=torch.float64)])
    z.requires_grad_()
    g = torch.randn(6, z.shape[0], dtype=torch.float64)
    g[:, 3000:3003] = 0  # the inputs on a kink
    params = [z, *lrn.parameters()]
    ref = lrn(z.unsqueeze(1)).t()
    ref_grads = torch.autograd.grad(ref, params, g)
    old = bases.use_fused_features(compiled)
    try:
        out = generated.piecewise_columns(lrn, z)
        grads = torch.autograd.grad(out, params, g)
        assert bases._FUSED["failed"] is None and bases.features_path() == ("compiled" if compiled else "eager")
    finally:
        bases.use_fused_features(old)
    taken = {generated._pieces, generated._input_grad} & set(bases._FUSED["compiled"])
    assert taken == ({generated._pieces, generated._input_grad} if compiled else set())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert lrn.fc1.weight.grad is None  # nothing accumulated: autograd.grad only


def test_one_input_learner_takes_the_table_only_where_it_pays(monkeypatch):
    """``MetaLearner.columns`` at d = 1 uses the table of pieces from ``PIECES_MIN_WORK`` hidden values (edges x h)
    on, the hidden layer below (and at d >= 2); both give the same columns."""
    calls = []
    real = generated.piecewise_columns
    monkeypatch.setattr(generated, "piecewise_columns", lambda lrn, z: calls.append(z.shape[0]) or real(lrn, z))
    torch.manual_seed(0)
    lrn = generated.MetaLearner(1, 32, 9)
    n_min = generated.PIECES_MIN_WORK // 32
    for n in (n_min - 1, n_min):
        z = torch.randn(n, 1)
        torch.testing.assert_close(lrn.columns(z), lrn(z).t(), rtol=1e-5, atol=1e-5)
    assert calls == [n_min]
    generated.MetaLearner(2, 32, 9).columns(torch.randn(n_min, 2))
    assert calls == [n_min]


def test_metakan_storage_hand_count_784_64_10_per_layer():
    model = KAN([784, 64, 10], "bspline")
    dense_total, dense_trainable = count_params(model)
    method("metakan", d=1, h=32).prepare(model)
    rep = storage_report(model)
    edges = 784 * 64 + 64 * 10  # 50,816
    learner = (1 * 32 + 32) + (32 * 9 + 9)  # Linear(1, 32) + Linear(32, 9) = 361 values
    assert rep.coef_stored_bits == (edges * 1 + 2 * learner) * 32 == 1_649_216
    other = 64 + 10  # biases; uniform B-spline knots follow from the config and are not stored
    assert rep.stored_bits == rep.coef_stored_bits + other * 32
    assert rep.coef_dense_bits == edges * 9 * 32 == 14_635_008
    # MetaKAN's claim: far fewer trainable parameters than the dense KAN
    _, trainable = count_params(model)
    assert dense_trainable == edges * 9 + 74 == 457_418
    assert trainable == edges + 2 * learner + 74 == 51_612
    assert dense_trainable / trainable >= 5


def test_shared_meta_learner_is_trained_and_counted_once(tmp_path):
    torch.manual_seed(1)
    model = KAN([6, 5, 4, 3], "bspline")
    generated.generate_model(model, d=2, h=8, shared=True)
    learners = generated.meta_learners(model)
    assert len(learners) == 1 and all(layer.source.learner is learners[0] for _, layer in kan_layers(model))
    learner = 2 * 8 + 8 + 8 * 9 + 9  # 105
    edges = 6 * 5 + 5 * 4 + 4 * 3  # 62
    rep = storage_report(model)
    assert rep.coef_stored_bits == (edges * 2 + learner) * 32
    total, _ = count_params(model)
    assert total == edges * 2 + learner + (5 + 4 + 3)  # PyTorch sees the shared learner once too
    # one optimiser group holds it once
    groups = generated.param_groups(model, 1e-3, 1e-4)
    assert sum(p.numel() for p in groups[1]["params"]) == learner
    # export / reload: the non-owner layers get the owner's learner back
    path = tmp_path / "shared.kanb"
    size = export_model(model, path)
    assert rep.stored_bits <= size * 8 <= rep.stored_bits + 8 * 8192
    back = load_model(path)
    lb = generated.meta_learners(back)
    assert len(lb) == 1
    x = torch.randn(16, 6)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-6)
    assert storage_report(back).stored_bits == rep.stored_bits


@pytest.mark.parametrize("shared", [False, True])
def test_metakan_export_reload_identical_predictions(tmp_path, shared):
    torch.manual_seed(2)
    model = ConvKAN((1, 8, 8), 4, channels=[3, 4], basis="chebyshev")
    method("metakan", h=6, shared=shared).prepare(model)
    path = tmp_path / "mk.kanb"
    size = export_model(model, path)
    rep = storage_report(model)
    assert rep.stored_bits <= size * 8 <= rep.stored_bits + 8 * 8192
    back = load_model(path)
    assert all(type(layer.source).__name__ == "GeneratedSource" for _, layer in kan_layers(back))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=1e-6)  # eval: BatchNorm


def test_metakan_training_learns_with_default_lrs():
    ds, tr = tiny_trainer()
    torch.manual_seed(3)
    model = KAN([64, 6, 4], "bspline")
    m = method("metakan")
    m.prepare(model)
    before = tr.evaluate(model, "val")
    fit = tr.fit(model, 8, param_groups=m.param_groups(model))  # cosine: late epochs take small steps
    assert fit.history[-1]["train_loss"] < 0.7 * fit.history[0]["train_loss"]
    assert fit.best_val >= 90 and fit.best_val > before  # 4 classes: chance is 25 %


def test_stage_key_shared_between_metakan_and_metacluster():
    a = method("metakan", d=2).stage_key()
    b = method("metacluster", d=2, K=8, n_init=2, finetune_lr=1e-2).stage_key()
    assert a == b  # one cached stage-1 model per generator config: a K sweep does not retrain
    assert method("metacluster", d=1).stage_key() != b
    assert METHODS["metacluster"].trains_own_model() and not METHODS["kmeans"].trains_own_model()


# ------------------------------------------------------------------ clustering
def test_kmeans_hand_count_784_64_10_bspline_k16_per_layer():
    torch.manual_seed(4)
    model = KAN([784, 64, 10], "bspline")
    info = codebook.cluster_model(model, 16, "layer", n_init=1, seed=0)
    assert info["k_used"] == {"layers.0": 16, "layers.1": 16}
    assert info["index_bits"] == {"layers.0": 4, "layers.1": 4}
    rep = storage_report(model)
    assert rep.coef_dense_bits == 50_816 * 9 * 32 == 14_635_008
    assert rep.coef_stored_bits == 50_816 * 4 + 2 * 16 * 9 * 32 == 212_480
    assert rep.coef_compression_ratio == pytest.approx(14_635_008 / 212_480)
    assert round(rep.coef_compression_ratio, 1) == 68.9


def test_clustering_exactly_k_distinct_vectors_recovers_them():
    g = torch.Generator().manual_seed(5)
    truth = torch.randn(5, 9, generator=g)
    labels = torch.cat([torch.arange(5), torch.randint(0, 5, (7 * 6 - 5,), generator=g)])
    layer_edges = truth[labels].reshape(7, 6, 9)
    # exactly K distinct vectors: each is its own centroid, inertia 0, the edge tensor is unchanged
    cent, lab, inertia, k_used = codebook.kmeans_vectors(layer_edges.reshape(-1, 9).numpy(), 5, 2, 0)
    assert k_used == 5 and inertia == 0.0
    np.testing.assert_array_equal(cent[lab], layer_edges.reshape(-1, 9).numpy())
    # the same vectors with tiny noise go through scikit-learn's KMeans and come back
    noisy = layer_edges.reshape(-1, 9) + 1e-4 * torch.randn(42, 9, generator=g)
    cent, lab, inertia, k_used = codebook.kmeans_vectors(noisy.numpy(), 5, 4, 0)
    assert k_used == 5 and inertia < 42 * 9 * 1e-7
    np.testing.assert_allclose(cent[lab], layer_edges.reshape(-1, 9).numpy(), atol=1e-3)
    # a model layer: K above the number of distinct vectors (but not above the 42 edges) is capped to it
    model = KAN([6, 7], "bspline")
    with torch.no_grad():
        kan_layers(model)[0][1].source.weight.copy_(layer_edges)
    info = codebook.cluster_model(model, 16, "layer", n_init=1, seed=0)
    assert info["k_used"] == {"layers.0": 5} and info["index_bits"] == {"layers.0": 3}
    torch.testing.assert_close(kan_layers(model)[0][1].edge_tensor(), layer_edges)


def test_k_above_the_edges_of_a_scope_is_infeasible():
    torch.manual_seed(9)
    model = KAN([2, 8, 1], "bspline")  # 16 + 8 edges
    dense = [layer.edge_tensor().detach().clone() for _, layer in kan_layers(model)]
    with pytest.raises(Infeasible) as err:
        codebook.cluster_model(model, 64, "layer", n_init=1, seed=0)
    assert not isinstance(err.value, UserError)
    assert str(err.value) == "K=64 exceeds the 16 edges of layer layers.0; at most 16"
    with pytest.raises(Infeasible, match="^K=9 exceeds the 8 edges of layer layers.1; at most 8$"):
        codebook.cluster_model(model, 9, "layer", n_init=1, seed=0)
    with pytest.raises(Infeasible, match=r"^K=25 exceeds the 24 edges of all layers \(global codebook\); at most 24$"):
        codebook.cluster_model(model, 25, "global", n_init=1, seed=0)
    # nothing was changed by the refused requests
    assert all(not isinstance(layer.source, CodebookSource) for _, layer in kan_layers(model))
    assert all(torch.equal(a, layer.edge_tensor()) for a, (_, layer) in zip(dense, kan_layers(model)))
    # K equal to a scope's edges is feasible: every edge its own centroid
    info = codebook.cluster_model(model, 8, "layer", n_init=1, seed=0)
    assert info["k_used"] == {"layers.0": 8, "layers.1": 8} and info["inertia"]["layers.1"] == 0.0
    torch.testing.assert_close(kan_layers(model)[1][1].edge_tensor(), dense[1])


def test_global_codebook_shared_and_counted_once(tmp_path):
    torch.manual_seed(6)
    model = KAN([6, 5, 4], "rbf")
    dense_edges = [layer.edge_tensor().detach().clone() for _, layer in kan_layers(model)]
    info = codebook.cluster_model(model, 8, "global", n_init=2, seed=0)
    srcs = [layer.source for _, layer in kan_layers(model)]
    assert info["k_used"] == 8 and srcs[0].centroids is srcs[1].centroids
    assert storage_report(model).coef_stored_bits == 8 * 9 * 32 + (30 + 20) * 3
    groups = codebook.codebook_param_groups(model, 1e-2)
    assert len(groups[0]["params"]) == 1
    assert not all(torch.equal(a, layer.edge_tensor()) for a, (_, layer) in zip(dense_edges, kan_layers(model)))
    path = tmp_path / "g.kanb"
    export_model(model, path)
    back = load_model(path)
    bs = [layer.source for _, layer in kan_layers(back)]
    assert bs[0].centroids is bs[1].centroids
    x = torch.randn(9, 6)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tune_rest", [False, True])
def test_codebook_finetune_changes_centroids_not_indices(tune_rest):
    ds, tr = tiny_trainer()
    torch.manual_seed(7)
    model = KAN([64, 6, 4], "bspline")  # untrained: fine-tuning has something to gain
    codebook.cluster_model(model, 4, "layer", n_init=1, seed=0)
    idx = [layer.source.index.clone() for _, layer in kan_layers(model)]
    cent = [layer.source.centroids.detach().clone() for _, layer in kan_layers(model)]
    bias = [layer.bias.detach().clone() for _, layer in kan_layers(model)]
    ctx = CompressContext(trainer=tr, finetune_epochs=4, seed=0, device=torch.device("cpu"))
    val0 = tr.evaluate(model, "val")
    fit = ctx.finetune(model, codebook.codebook_param_groups(model, 1e-2, tune_rest))
    assert fit.best_epoch > 0 and fit.best_val > val0  # a fine-tuned epoch beat the clustered model
    for (_, layer), i0, c0, b0 in zip(kan_layers(model), idx, cent, bias):
        assert torch.equal(layer.source.index, i0)
        assert not torch.allclose(layer.source.centroids, c0)
        assert torch.equal(layer.bias, b0) != tune_rest


@pytest.mark.parametrize("name", ["metacluster", "kmeans"])
def test_compress_swaps_in_codebooks_and_reloads(tmp_path, name):
    ds, tr = tiny_trainer()
    torch.manual_seed(8)
    model = KAN([64, 6, 4], "rbf")
    m = method(name, K=4, n_init=1, finetune_epochs=1) if name == "kmeans" else \
        method(name, h=8, K=4, n_init=1, finetune_epochs=1)
    if m.trains_own_model():
        m.prepare(model)
        tr.fit(model, 2, param_groups=m.param_groups(model))
    ctx = CompressContext(trainer=tr, finetune_epochs=3, seed=0, device=torch.device("cpu"))
    m.compress(model, ctx)
    assert all(isinstance(layer.source, CodebookSource) for _, layer in kan_layers(model))
    assert not generated.meta_learners(model)  # the deployed model keeps no meta-learner
    assert ctx.result.details["k_used"] == {"layers.0": 4, "layers.1": 4} and ctx.result.details["k_requested"] == 4
    if name == "metacluster":
        assert ctx.result.details["meta_learner_params"] == 2 * (8 + 8 + 8 * 9 + 9)
    rep = storage_report(model)
    assert rep.coef_stored_bits == (64 * 6 + 6 * 4) * 2 + 2 * 4 * 9 * 32
    path = tmp_path / f"{name}.kanb"
    size = export_model(model, path)
    assert rep.stored_bits <= size * 8 <= rep.stored_bits + 8 * 8192
    x = tr.splits.x_test
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x), model(x), rtol=0, atol=1e-5)


def test_default_k_and_h_follow_the_model_kind():
    kan, conv = KAN([4, 3]), ConvKAN((1, 8, 8), 2, channels=[2])
    assert (codebook.paper_k(kan), codebook.paper_k(conv)) == (16, 256)
    assert (generated.paper_hidden(kan), generated.paper_hidden(conv)) == (32, 64)
    method("metakan").prepare(conv)
    assert {lrn.h for lrn in generated.meta_learners(conv)} == {64}


@pytest.mark.parametrize("name,cfg", [
    ("metacluster", {"K": 1}), ("metacluster", {"emb_lr": 0.0}), ("metacluster", {"scope": "row"}),
    ("metacluster", {"finetune_lr": -1.0}), ("metakan", {"d": 0}), ("metakan", {"meta_lr": math.inf}),
    ("kmeans", {"n_init": 0}), ("kmeans", {"K": "16"}),
])
def test_bad_hyperparameters_are_user_errors(name, cfg):
    with pytest.raises(UserError):
        method(name, **cfg)


def test_entropy_coded_indices_reach_the_entropy_and_reload_exactly(tmp_path):
    torch.manual_seed(0)
    model = KAN([64, 16, 4], "bspline")
    for _, layer in kan_layers(model):  # a skewed index histogram: most edges share centroid 0
        n = layer.out_features * layer.in_features
        probs = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05])
        index = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(1))
        layer.set_source(CodebookSource(torch.randn(5, layer.edge_dim), index.reshape(layer.out_features, -1)))
    x = torch.randn(7, 64)
    with torch.no_grad():
        before = model(x)
    details = codebook.entropy_code_indices(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # only the storage changed
    for name in details["index_plain_bits"]:
        plain, coded, entropy = (details[f"index_{k}_bits"][name] for k in ("plain", "coded", "entropy"))
        assert entropy < coded < plain  # 3 bits per index plainly, ~1.5 bits of entropy
        assert coded <= entropy * 1.02 + 5 * 11 + 64  # the stream within 2 % of the entropy, plus the code table
    path = tmp_path / "ec.kanb"
    export_model(model, path)
    back = load_model(path)
    for (_, a), (_, b) in zip(kan_layers(model), kan_layers(back)):
        assert torch.equal(a.source.index, b.source.index)
    with torch.no_grad():
        assert torch.allclose(back(x), before, atol=1e-6)
    METHODS["kmeans"](K=4, scope="global", entropy_coding=True)  # each layer's indices under its own histogram


def _index_gradient(src) -> torch.Tensor:
    """The centroids' gradient by autograd's own indexing (the reference for the sparse backward)."""
    c = src.centroids.detach().requires_grad_(True)
    w = c[src.index.long()]
    if hasattr(src, "flat_index"):  # a pruned layer's codebook: only surviving edges
        w = c.new_zeros(src.out_features * src.in_features, src.edge_dim).index_copy(0, src.flat_index, w)
    torch.manual_seed(1)
    g = torch.randn(src.shape)
    (w.reshape(src.shape) * g).sum().backward()
    return c.grad, g


@pytest.mark.parametrize("scope", ["layer", "global", "pruned"])
def test_codebook_gradient_is_the_sum_of_its_edges_gradients(scope):
    """The codebook's fast backward (one sparse product per step, bench.model.sources.gather_rows)
    equals autograd's indexing backward, for per-layer, shared and pruned codebooks."""
    from bench.compression.pruning import MaskedSource

    torch.manual_seed(3)
    model = KAN([12, 7, 5], "bspline")
    if scope == "pruned":  # a third of each layer's edges removed
        for _, layer in kan_layers(model):
            mask = torch.rand(layer.out_features, layer.in_features) > 0.33
            layer.set_source(MaskedSource.from_mask(layer.edge_tensor().detach(), mask))
    codebook.cluster_model(model, 4, "global" if scope == "global" else "layer", n_init=1, seed=0)
    for _, layer in kan_layers(model):
        src = layer.source
        expected, g = _index_gradient(src)
        src.centroids.grad = None
        (src.edge_tensor() * g).sum().backward()
        torch.testing.assert_close(src.centroids.grad, expected, rtol=1e-5, atol=1e-5)
        members = _MEMBERS[src][2]
        src.edge_tensor().sum().backward()
        assert _MEMBERS[src][2] is members  # built once per index, not per step
        src.index.copy_(src.index.flip(0))  # a new assignment: the membership matrix is rebuilt
        expected, g = _index_gradient(src)
        src.centroids.grad = None
        (src.edge_tensor() * g).sum().backward()
        torch.testing.assert_close(src.centroids.grad, expected, rtol=1e-5, atol=1e-5)
