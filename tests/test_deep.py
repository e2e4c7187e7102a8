"""Deep-compression options: quantised codebook centroids (float16, b-bit integers with scales),
counted at their width, exported and reloaded exactly, trained through a straight-through estimator."""

import math

import pytest
import torch

from bench.compression import codebook
from bench.compression.entropy import EntropyCodedSource
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.model.kan import KAN, kan_layers
from bench.model.sources import centroid_qmax


def _clustered(bits=32, per="centroid", scope="layer", masked=False, entropy=False):
    torch.manual_seed(0)
    model = KAN([6, 5, 3], basis="rbf")
    if masked:
        from test_registries import _each_layer, _masked

        _each_layer(model, _masked)
    codebook.cluster_model(model, 4, scope)
    if bits < 32:
        codebook.quantize_centroids(model, bits, per)
    if entropy:  # forced: this model's streams are too short for a code table to pay on its own
        for _, layer in kan_layers(model):
            layer.set_source(EntropyCodedSource(layer.source, ["index"]))
    return model.eval()


def _centroid_bits(model):
    return sum(it.bits for _, it in storage_report(model).items if it.name.startswith("centroid"))


# integer centroids need scope layer (a global one is a UserError, tested below): global only at 16 bits
_WIDTHS = [(16, "centroid"), (8, "centroid"), (4, "codebook"), (3, "centroid")]
_CASES = [(kind, bits, per) for kind in ("plain", "masked", "entropy", "masked_entropy", "global")
          for bits, per in _WIDTHS if kind != "global" or bits >= 16]


@pytest.mark.parametrize("kind,bits,per", _CASES)
def test_quantised_centroids_count_export_and_reload_exactly(tmp_path, bits, per, kind):
    make = dict(scope="global" if kind == "global" else "layer", masked=kind.startswith("masked"),
                entropy=kind.endswith("entropy"))
    ref, model = _clustered(**make), _clustered(bits, per, **make)
    x = torch.randn(32, 6)
    with torch.no_grad():
        assert not torch.equal(model(x), ref(x)), "quantising the centroids must change the outputs"
    # counted at their width: K*(n+1) values at `bits`, plus the float32 scales below 16
    for (_, a), (_, b) in zip(kan_layers(ref), kan_layers(model)):
        if getattr(a.source, "owns_centroids", True):
            n = a.source.centroids.numel()
            scales = 0 if bits >= 16 else 32 * (a.source.k if per == "centroid" else 1)
            assert sum(it.bits for it in b.source.centroid_items()) == n * bits + scales
            assert not torch.equal(b.source.edge_tensor(), a.source.edge_tensor())
    assert _centroid_bits(model) < _centroid_bits(ref)
    assert storage_report(model).stored_bits < storage_report(ref).stored_bits
    if bits < 16:  # the forward uses integer codes times the scale
        src = kan_layers(model)[0][1].source
        q = src.codebook().detach() / src.centroid_scale.reshape(-1, 1)
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= centroid_qmax(bits) + 1e-3
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    rep = storage_report(model)
    assert size == path.stat().st_size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in rep.items)
    back = load_model(path)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert storage_report(back).stored_bits == rep.stored_bits


def test_quantised_centroids_train_through_the_straight_through_estimator():
    model = _clustered(4, "centroid")
    src = kan_layers(model)[0][1].source
    out = model(torch.randn(8, 6)).square().sum()
    out.backward()
    assert src.centroids.grad is not None and src.centroids.grad.abs().sum() > 0


def test_integer_centroids_need_layer_scope():
    from bench.compression.methods import METHODS
    from bench.errors import UserError

    with pytest.raises(UserError, match="needs scope = 'layer'"):
        METHODS["kmeans"](centroid_bits=4, scope="global")
    METHODS["kmeans"](centroid_bits=16, scope="global")


@pytest.mark.parametrize("basis", ["rbf", "bspline"])
def test_small_tensors_at_float16_change_bits_by_the_expected_amount(tmp_path, basis):
    from bench.compression.storage import other_tensors, set_small_dtype

    torch.manual_seed(0)
    model = KAN([6, 5, 3], basis=basis).eval()
    with torch.no_grad():
        for t in other_tensors(model).values():
            t.add_(torch.randn_like(t) * 0.3)  # values that float16 must round
    x = torch.randn(32, 6)
    with torch.no_grad():
        before_out = model(x)
    before = storage_report(model).stored_bits
    small = sum(t.numel() for t in other_tensors(model).values() if t.is_floating_point())
    assert small > 0
    info = set_small_dtype(model, "float16")
    assert info == {"small_bits_before": 32 * small, "small_bits_after": 16 * small}
    assert storage_report(model).stored_bits == before - 16 * small  # exactly 16 bits fewer per small value
    with torch.no_grad():
        assert not torch.equal(model(x), before_out)  # evaluated with the rounded values
        for t in other_tensors(model).values():
            assert torch.equal(t, t.half().float())
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    assert size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in storage_report(model).items)
    back = load_model(path)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert storage_report(back).stored_bits == storage_report(model).stored_bits


def test_small_dtype_must_end_a_pipeline_and_takes_no_budget_share():
    from bench.compression.pipeline import method_class
    from bench.errors import UserError

    with pytest.raises(UserError, match="must be the last stage"):
        method_class("small_dtype>kmeans")
    chain = method_class("prune>kmeans>small_dtype")()
    assert chain.shares(2) == [1, 1, 0] and chain.shares(3) == [1, 2, 0]


def test_entropy_coded_pruned_codebook_records_entropy_next_to_coded_size(tmp_path):
    torch.manual_seed(0)
    model = KAN([64, 32, 16], basis="rbf")
    gen = torch.Generator().manual_seed(1)
    for _, layer in kan_layers(model):  # every other edge survives; skewed K=4 indices over the survivors
        flat = torch.arange(0, layer.out_features * layer.in_features, 2)
        index = torch.multinomial(torch.tensor([0.7, 0.2, 0.05, 0.05]), flat.numel(), replacement=True, generator=gen)
        layer.set_source(codebook.MaskedCodebookSource(layer.out_features, layer.in_features,
                                                       torch.randn(4, layer.edge_dim), index, flat))
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
    info = codebook.entropy_code_indices(model)
    for name, layer in kan_layers(model):
        src = layer.source
        assert type(src).__name__ == "EntropyCodedSource" and src.names == ["index"]  # the pattern stays plain
        assert info["index_plain_bits"][name] == src.kept * 2  # K=4: 2 bits per surviving edge
        # the coded size is the stream plus the code table, never below the empirical entropy
        stream = [it for it in src.storage() if it.name.startswith("index.")]
        assert info["index_entropy_bits"][name] <= info["index_coded_bits"][name] == sum(it.bits for it in stream)
        assert info["index_coded_bits"][name] < info["index_plain_bits"][name]
    export_model(model, tmp_path / "m.kanb")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.kanb")(x), before)
