"""Compressed forms that run compressed (bench.deploy.compact): the same outputs as the loaded model,
integer codes and narrow indices held instead of float copies, and no full edge tensor built by a
codebook layer."""

import pytest
import torch

from bench.compression.quant import QuantSource
from bench.compression.storage import export_model, load_model, storage_report
from bench.deploy import compact, held_bytes
from bench.model.kan import KAN, KANLayer, kan_layers
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
    """Up to native.MAX_ROWS samples, through the native kernel (larger batches, and every batch where no
    C compiler works, build it for one product: contract_blocked)."""
    _native_or_skip()
    deployed = compact(_model("codebook"))

    def refuse(*_):
        raise AssertionError("the full [out, in, n+1] tensor was built")

    monkeypatch.setattr(CodebookSource, "edge_tensor", refuse)
    monkeypatch.setattr(CodebookSource, "_block", refuse)
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


@pytest.mark.parametrize("major", [False, True])
def test_blocked_dense_products_equal_the_full_tensor(major, monkeypatch):
    """contract_blocked, the deployed path at large batches: blocks of 2 outputs (the last one short),
    features laid out input-major or basis-major (as compiled features are), equal to the full matmul."""
    from bench.model.sources import basis_major

    torch.manual_seed(0)
    src = CodebookSource(torch.randn(5, 9), torch.randint(0, 5, (7, 11)).to(torch.uint8))
    feats = torch.randn(40, 11, 9)
    if major:
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
        assert basis_major(feats)
    full = feats.reshape(40, -1) @ src.edge_tensor().reshape(7, -1).t()
    monkeypatch.setattr(CodebookSource, "BLOCK_BYTES", 2 * 11 * 9 * 4)
    with torch.no_grad():
        assert torch.allclose(src.contract_blocked(feats), full, atol=1e-5)


# ------------------------------------------------------------------------ the native codebook kernel
NATIVE_BASES = [("bspline", {}, 1), ("bspline", {"extrapolate": True}, 1), ("rbf", {}, 2), ("rbf", {"norm": False}, 2),
                ("chebyshev", {}, 3), ("gram", {}, 4), ("fourier", {}, 5),
                ("kagn", {}, 0), ("bspline", {"order": 2}, 0), ("bspline", {"knots": "per_input"}, 0)]


def _native_or_skip():
    """The native module, its kernel built: skipped only where this machine has no C compiler (a kernel
    that does not compile fails here)."""
    import os
    import shutil

    from bench.deploy import native

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: deployed codebook layers run their PyTorch path")
    assert native.library() is not None, native._LIB["failed"]
    return native


def _codebook_kan(basis, kwargs, k=16, **options):
    torch.manual_seed(0)
    model = KAN([30, 12, 4], basis, basis_kwargs=kwargs, **options).eval()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        cent = 3 * torch.randn(k, w.shape[-1]) * w.abs().mean()
        layer.set_source(CodebookSource(cent, torch.randint(0, k, w.shape[:2])))
    return model


def _assert_rows_close(got, want, rtol=1e-5):
    """Each row to ``rtol`` of that row's scale (rows far outside the grids do not widen the others')."""
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert ((got - want).abs() <= rtol * scale).all(), float(((got - want).abs() / scale).max())


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
            _assert_rows_close(deployed(rows), model(rows))
        h = x
        for layer in layers:  # the kernel itself ran, against the PyTorch forward of the same layer
            got = layer.native_forward(h)
            assert got is not None
            _assert_rows_close(layer.finish(got), KANLayer.forward(layer, h))
            h = KANLayer.forward(layer, h)
        _assert_rows_close(h, want)
    assert [native._STATE[layer][3][3] for layer in layers] == [kind, kind]


@pytest.mark.parametrize("options", [{"bias": False}, {"norms": "layer", "acts": "silu"}])
def test_native_kernel_keeps_the_layer_options_and_wide_indices(options):
    native = _native_or_skip()
    model = _codebook_kan("bspline", {}, k=300, **options)  # K > 256: an int16 index
    deployed = compact(model)
    assert {layer.source.index.dtype for _, layer in kan_layers(deployed)} == {torch.int16}
    x = torch.randn(3, 30)
    with torch.no_grad():
        _assert_rows_close(deployed(x), model(x))
    assert all(native._STATE[layer][3] is not None for _, layer in kan_layers(deployed))


def test_native_kernel_refuses_what_it_cannot_run():
    native = _native_or_skip()
    deployed = compact(_codebook_kan("bspline", {}))
    layer = next(layer for _, layer in kan_layers(deployed))
    with torch.no_grad():
        for bad in (torch.randn(2, 29), torch.randn(2, 30).double(), torch.randn(2, 1, 30)):
            assert layer.native_forward(bad) is None  # the PyTorch path then answers (or raises) as always
        assert layer.native_forward(torch.randn(native.MAX_ROWS + 1, 30)) is None  # blocked dense products
        assert (layer.path(native.MAX_ROWS), layer.path(native.MAX_ROWS + 1)) == (
            "native kernel", "PyTorch, blocked")
        with pytest.raises((RuntimeError, IndexError)):  # as the PyTorch layer does
            deployed(torch.randn(1, 29))
        src = layer.source
        src.index = src.index.t().contiguous().t()  # a transposed view: read as laid out, not as stored
        x = torch.randn(2, 30)
        _assert_rows_close(layer.finish(layer.native_forward(x)), KANLayer.forward(layer, x))
    assert native._STATE[layer][3] is not None


def test_native_state_follows_the_tensors_and_gradients_take_the_pytorch_path():
    native = _native_or_skip()
    model = _codebook_kan("rbf", {})
    deployed = compact(model)
    x = torch.randn(2, 30)

    def both(change):
        for m in (model, deployed):
            change(next(layer for _, layer in kan_layers(m)))
        with torch.no_grad():
            _assert_rows_close(deployed(x), model(x))

    with torch.no_grad():
        deployed(x)
        both(lambda layer: layer.source.centroids.mul_(2))  # changed in place
        both(lambda layer: layer.bias.add_(1))
        both(lambda layer: layer.basis.norm.weight.mul_(-0.5))  # RBF's LayerNorm
        both(lambda layer: setattr(layer.source, "index", (layer.source.index.long().flip(0) % 16).to(
            layer.source.index.dtype)))  # replaced
    layer = next(layer for _, layer in kan_layers(deployed))
    del native._STATE[layer]
    deployed(x)  # with gradients on: the PyTorch path, no native state built
    assert layer not in native._STATE
    import copy
    assert copy.deepcopy(deployed) not in native._STATE  # copies carry no state
    fresh = compact(model)
    assert held_bytes(fresh) == held_bytes(deployed)  # counted whether or not a forward ran


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
