"""Entropy coding of every integer stream (bench/compression/entropy.py, the ``entropy_code`` stage): quantised
values, pruning masks, codebook indices; coded sizes within reach of the empirical entropy, the
file on disk equal to the counted bits, exact reload, flat streams left plain, and the chain rules."""

import math

import numpy as np
import pytest
import torch

from bench.compression import codebook
from bench.compression.entropy import CodedStream, EntropyCodedSource, entropy_code_model, lowest
from bench.compression.pipeline import method_class, parse_entry
from bench.compression.pruning import MaskedSource
from bench.compression.quant import QuantSource
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers


def _skewed_quant(w, _):  # 4-bit codes, most of them near zero (a peaked histogram)
    return QuantSource.from_float(w * (torch.rand_like(w) < 0.2), bits=4)


def _sparse_mask(w, _):  # one edge in eight survives: a mask of entropy H(1/8) ~ 0.54 bits per edge
    n = w.shape[0] * w.shape[1]
    flat = torch.nonzero(torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.125).reshape(-1)
    return MaskedSource(w.shape[0], w.shape[1], w.shape[2], flat, w.reshape(n, -1)[flat])


def _model(make):
    torch.manual_seed(0)
    model = KAN([48, 24, 6], basis="bspline")
    for _, layer in kan_layers(model):
        layer.set_source(make(layer.edge_tensor().detach(), layer))
    return model.eval()


@pytest.mark.parametrize("kind", ["quant", "mask", "masked_codebook"])
def test_coded_streams_shrink_to_near_entropy_and_the_file_reloads_exactly(kind, tmp_path):
    make = {"quant": _skewed_quant, "mask": _sparse_mask, "masked_codebook": _sparse_mask}[kind]
    model = _model(make)
    if kind == "masked_codebook":
        codebook.cluster_model(model, 4, "layer")
    x = torch.randn(9, 48)
    with torch.no_grad():
        before = model(x)
    plain_bits = storage_report(model).stored_bits
    info = entropy_code_model(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # only the storage changed
    assert info["coded_coded_bits"] < info["coded_plain_bits"]
    assert storage_report(model).stored_bits == plain_bits - info["coded_plain_bits"] + info["coded_coded_bits"]
    for layer_streams in info["entropy_coded"].values():
        for r in layer_streams.values():
            # never below the entropy; within 1 % of it plus the code table and the last word
            assert r["entropy_bits"] <= r["coded_bits"] - r["table_bits"] <= r["entropy_bits"] * 1.01 + 64
    expected = {"quant": {"q"}, "mask": {"mask"}, "masked_codebook": {"mask"}}[kind]
    assert expected <= {n for s in info["entropy_coded"].values() for n in s}
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    rep = storage_report(model)
    assert size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in rep.items)
    back = load_model(path)
    with torch.no_grad():
        assert torch.equal(back(x), before)
    assert storage_report(back).stored_bits == rep.stored_bits
    for (_, a), (_, b) in zip(kan_layers(model), kan_layers(back)):
        assert type(a.source) is type(b.source)
        assert torch.equal(a.source.edge_tensor(), b.source.edge_tensor())


def test_a_flat_stream_stays_plain():
    torch.manual_seed(0)
    model = KAN([32, 16, 4], basis="bspline")
    for _, layer in kan_layers(model):  # uniform 3-bit indices: no code beats 3 bits plus a table
        n = layer.out_features * layer.in_features
        index = torch.arange(n) % 8
        layer.set_source(codebook.CodebookSource(torch.randn(8, layer.edge_dim), index.reshape(layer.out_features, -1)))
    bits = storage_report(model).stored_bits
    info = entropy_code_model(model)
    assert info["entropy_coded"] == {"layers.0": {}, "layers.1": {}}
    assert storage_report(model).stored_bits == bits
    assert all(type(layer.source) is codebook.CodebookSource for _, layer in kan_layers(model))


def test_signed_codes_use_the_encodings_lowest_value():
    assert lowest("uint3") == 0 and lowest("int4") == -8
    v = np.array([-8, -1, 0, 0, 0, 7, 0, 0])
    s = CodedStream(v, lowest("int4"))
    back = CodedStream.decode("q", v.size, -8, {f"q.{it.name.split('.')[-1]}": it.tensor for it in s.items("q")})
    assert back.tolist() == v.tolist()
    with pytest.raises(ValueError):
        CodedStream(np.array([-9]), lowest("int4"))


def test_wrapper_passes_through_the_inner_source():
    model = _model(_sparse_mask)
    entropy_code_model(model)
    src = kan_layers(model)[0][1].source
    assert isinstance(src, EntropyCodedSource) and src.kept == src.inner.kept  # attributes reach the inner source
    with pytest.raises(ValueError, match="already"):
        EntropyCodedSource(src)
    entropy_code_model(model)  # coding again re-chooses, never nests
    assert isinstance(kan_layers(model)[0][1].source.inner, MaskedSource)


@pytest.mark.parametrize("name,fragment", [
    ("entropy_code", "later stage of a pipeline"),
    ("entropy_code>small_dtype", "cannot be the first stage"),
    ("kmeans>entropy_code>prune", "must be the last stage"),
])
def test_entropy_code_only_ends_a_chain(name, fragment):
    with pytest.raises(UserError, match=fragment):
        method_class(name)
    assert method_class("kmeans>entropy_code>small_dtype").stage_classes[-1].name == "small_dtype"
    assert method_class("kmeans>small_dtype>entropy_code")().shares(2) == [2, 0, 0]


def test_inline_lists_are_grid_axes():
    assert parse_entry("prune(ratio=[2,4])>kmeans(K=16)>entropy_code") == (
        "prune>kmeans>entropy_code", {"prune": {"ratio": [2, 4]}, "kmeans": {"K": 16}})


def _round_trip(model, tmp_path, x):
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    assert size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in storage_report(model).items)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), before)


def test_global_codebook_branch_codes_asymmetric_zeros_and_constant_streams_round_trip(tmp_path):
    from bench.compression.quant import LayerGrid, QFormat

    x = torch.randn(5, 48)
    model = KAN([48, 24, 6], "bspline").eval()
    codebook.cluster_model(model, 4, "global")  # shared centroids: each layer's indices under its own histogram
    for _, layer in kan_layers(model):
        layer.set_source(EntropyCodedSource(layer.source, ["index"]))
    _round_trip(model, tmp_path, x)

    def branch(w, _):  # basis coefficients and base weights on their own grids: items coef.q and base.q
        n, w = w.shape[-1] - 1, w * (torch.rand_like(w) < 0.2)
        grid = LayerGrid(w, [("coef", slice(0, n), QFormat(4)), ("base", slice(n, n + 1), QFormat(3))])
        return grid.source(grid.round_to_nearest(w))

    model = _model(branch)
    info = entropy_code_model(model)
    assert {"coef.q"} <= set(info["entropy_coded"]["layers.0"])
    _round_trip(model, tmp_path, x)

    model = _model(lambda w, _: QuantSource.from_float(w.abs() * (torch.rand_like(w) < 0.2), bits=4,
                                                       granularity="edge", symmetric=False))
    for _, layer in kan_layers(model):  # asymmetric: a uint4 zero point per edge, coded with the codes
        layer.set_source(EntropyCodedSource(layer.source, ["q", "zero"]))
    _round_trip(model, tmp_path, x)

    model = KAN([48, 24, 6], "bspline").eval()
    for _, layer in kan_layers(model):  # one value only: a one-entry table and a stream of almost nothing
        index = torch.zeros(layer.out_features, layer.in_features, dtype=torch.long)
        layer.set_source(codebook.CodebookSource(torch.randn(2, layer.edge_dim), index))
    info = entropy_code_model(model)
    assert info["coded_coded_bits"] < info["coded_plain_bits"] / 10
    _round_trip(model, tmp_path, x)


def test_entropy_code_after_a_float_only_method_is_infeasible():
    from bench.compression.methods import METHODS
    from bench.errors import Infeasible

    model = KAN([8, 4, 2], "bspline")
    with pytest.raises(Infeasible, match="no integer stream"):
        METHODS["entropy_code"]().compress(model, None)


def test_inline_list_expands_to_one_run_per_value():
    from bench.run.sweep import build_sweep

    runs = build_sweep({"name": "g", "datasets": ["digits"], "bases": ["bspline"], "seeds": [0],
                        "methods": ["prune(ratio=[2,4])>kmeans(K=16)>entropy_code"]}).runs
    assert sorted(r.method_config["prune"]["ratio"] for r in runs) == [2, 4]
    assert {r.method for r in runs} == {"prune>kmeans>entropy_code"}
