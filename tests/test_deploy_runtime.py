"""Compressed forms that run compressed (bench.deploy.compact): the same outputs as the loaded model,
integer codes and narrow indices held instead of float copies, and no full edge tensor built by a
codebook layer."""

import pytest
import torch

from bench.compression.quant import QuantSource
from bench.compression.storage import export_model, load_model, storage_report
from bench.deploy import compact, held_bytes
from bench.model.kan import KAN, kan_layers
from bench.model.sources import CodebookSource


def _model(kind: str, bits: int = 8):
    torch.manual_seed(0)
    model = KAN([784, 64, 10]).eval()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        if kind == "codebook":
            src = CodebookSource(w.reshape(-1, w.shape[-1])[:16], torch.randint(0, 16, w.shape[:2]))
        else:
            src = QuantSource.from_float(w, bits, "node", True)
        layer.set_source(src)
    return model


@pytest.mark.parametrize("kind,bits", [("codebook", 8), ("quant", 8), ("quant", 4)])
def test_compact_form_gives_the_same_outputs_and_holds_at_most_twice_the_counted_bytes(tmp_path, kind, bits):
    model = _model(kind, bits)
    export_model(model, tmp_path / "m.kanb")
    loaded = load_model(tmp_path / "m.kanb").eval()
    deployed = compact(loaded)
    x = torch.randn(33, 784)
    with torch.no_grad():
        want = loaded(x)
        assert torch.allclose(deployed(x), want, atol=1e-5)
        assert torch.allclose(deployed(x[:1]), want[:1], atol=1e-5)
    counted = storage_report(loaded).stored_bits / 8
    assert held_bytes(deployed) <= 2 * counted, (held_bytes(deployed), counted)
    # as the harness evaluates it, the loaded form keeps a float copy of every edge tensor
    assert held_bytes(loaded) > 4 * counted if kind == "codebook" or bits == 4 else held_bytes(loaded) > 2 * counted
    assert storage_report(deployed).stored_bits == storage_report(loaded).stored_bits  # the same model


def test_a_deployed_codebook_layer_never_builds_its_edge_tensor(monkeypatch):
    deployed = compact(_model("codebook"))

    def refuse(self):
        raise AssertionError("the full [out, in, n+1] tensor was built")

    monkeypatch.setattr(CodebookSource, "edge_tensor", refuse)
    with torch.no_grad():
        assert deployed(torch.randn(4, 784)).shape == (4, 10)
    assert all(src.index.dtype == torch.uint8 for src in (layer.source for _, layer in kan_layers(deployed)))


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_both_gather_paths_equal_the_full_tensor(batch, monkeypatch):
    """contract_gather: one indexing gather for few rows, the embedding-bag sum for many (the switch
    moved so that both run here), each equal to the matmul over the rebuilt edge tensor."""
    torch.manual_seed(0)
    src = CodebookSource(torch.randn(5, 9), torch.randint(0, 5, (6, 11)))
    feats = torch.randn(batch, 11, 9)
    full = feats.reshape(batch, -1) @ src.edge_tensor().reshape(6, -1).t()
    for direct in (1 << 20, 0):
        monkeypatch.setattr(CodebookSource, "GATHER_DIRECT", direct)
        with torch.no_grad():
            assert torch.allclose(src.contract_gather(feats), full, atol=1e-5)


# ------------------------------------------------------------------------ the native codebook kernel
NATIVE_BASES = [("bspline", {}, 1), ("bspline", {"extrapolate": True}, 1), ("rbf", {}, 2), ("rbf", {"norm": False}, 2),
                ("chebyshev", {}, 3), ("gram", {}, 4), ("fourier", {}, 5),
                ("kagn", {}, 0), ("bspline", {"order": 2}, 0), ("bspline", {"knots": "per_input"}, 0)]


def _native_or_skip():
    from bench.deploy import native

    if native.library() is None:
        pytest.skip(f"no native kernel here: {native._LIB['failed']}")
    return native


def _codebook_kan(basis, kwargs, k=16, **options):
    torch.manual_seed(0)
    model = KAN([30, 12, 4], basis, basis_kwargs=kwargs, **options).eval()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        cent = 3 * torch.randn(k, w.shape[-1]) * w.abs().mean()
        layer.set_source(CodebookSource(cent, torch.randint(0, k, w.shape[:2])))
    return model


@pytest.mark.parametrize("basis,kwargs,kind", NATIVE_BASES)
def test_native_kernel_equals_the_pytorch_layer_for_every_basis(basis, kwargs, kind):
    """Basis values, centroid table and index gather-sum in C against the PyTorch layer, at batch 1 and a
    few rows, inside and far outside the grids (+-1e3)."""
    native = _native_or_skip()
    model = _codebook_kan(basis, kwargs)
    deployed = compact(model)
    layers = [layer for _, layer in kan_layers(deployed)]
    assert all(type(layer) is native.NativeCodebookLayer for layer in layers)
    x = torch.cat([3 * torch.randn(5, 30), torch.full((1, 30), 1e3), torch.full((1, 30), -1e3),
                   torch.linspace(-1e3, 1e3, 30)[None]])
    with torch.no_grad():
        want = model(x)
        for rows in (x[:1], x[5:6], x):
            got = deployed(rows)
            assert (got - want[: len(rows)] if len(rows) > 1 else got - model(rows)).abs().max() \
                <= 1e-5 * want.abs().max()
    assert [layer.native_state()[4] for layer in layers] == [kind, kind]


@pytest.mark.parametrize("options", [{"bias": False}, {"norms": "layer", "acts": "silu"}])
def test_native_kernel_keeps_the_layer_options_and_wide_indices(options):
    _native_or_skip()
    model = _codebook_kan("bspline", {}, k=300, **options)  # K > 256: an int16 index
    deployed = compact(model)
    assert {layer.source.index.dtype for _, layer in kan_layers(deployed)} == {torch.int16}
    x = torch.randn(3, 30)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)


def test_native_state_follows_the_tensors_and_gradients_take_the_pytorch_path():
    _native_or_skip()
    model = _codebook_kan("rbf", {})
    deployed = compact(model)
    x = torch.randn(2, 30)
    with torch.no_grad():
        deployed(x)
        for m in (model, deployed):  # a changed centroid is read on the next call
            for _, layer in kan_layers(m):
                layer.source.centroids.mul_(2)
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
    layer = next(layer for _, layer in kan_layers(deployed))
    layer._native = None
    deployed(x)  # with gradients on: the PyTorch path, no native state built
    assert layer._native is None
    assert held_bytes(compact(model)) < held_bytes(deployed)  # the transposed codebook is counted


def test_without_a_compiler_one_line_and_the_pytorch_path(monkeypatch, tmp_path, capsys):
    from bench.deploy import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIB", {"lib": None, "failed": None})
    model = _codebook_kan("bspline", {})
    deployed = compact(model)
    x = torch.randn(2, 30)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
        deployed(x)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "native codebook kernel unavailable" in err[0] and "PyTorch path" in err[0]
