"""ONNX export keeping the compressed form: every basis and model kind, every stored width, and the
file size against the counted bits. (Every method x basis x model is exported and checked by the
runner in tests/test_methods.py: its rows carry onnx_bytes and onnx_max_diff.)"""

import pytest
import torch

from bench.cli import main
from bench.compression.quant import QuantSource
from bench.compression.storage import export_model, storage_report
from bench.deploy import ExportRefused, check_onnx, export_onnx, onnx_row
from bench.model.kan import KAN, ConvKAN, kan_layers
from bench.model.sources import CodebookSource

BASES = [("bspline", {}), ("bspline", {"order": 2}), ("bspline", {"knots": "per_input"}),
         ("bspline", {"extrapolate": True}), ("rbf", {}), ("rbf", {"norm": False}), ("chebyshev", {}), ("gram", {}),
         ("fourier", {}), ("kagn", {})]
OVERHEAD = 6000  # bytes of graph (operators, shapes, small constants) a 2-layer KAN's file adds to its tensors


def _kan(basis="bspline", kwargs=None, **options):
    torch.manual_seed(0)
    return KAN([12, 7, 3], basis, basis_kwargs=kwargs or {}, **options).eval()


@pytest.mark.parametrize("basis,kwargs", BASES)
def test_every_basis_exports_and_matches_pytorch(tmp_path, basis, kwargs):
    model = _kan(basis, kwargs)
    export = export_onnx(model, tmp_path / "m.onnx")
    x = 3 * torch.randn(64, 12)  # inside and well outside the grids
    assert check_onnx(model, tmp_path / "m.onnx", x) <= 1e-5
    assert set(export.forms.values()) == {"DenseSource: dense"}


def test_layer_options_export(tmp_path):
    model = _kan("chebyshev", bias=[False, True], norms=["layer", "none"], acts=["silu", "none"])
    export_onnx(model, tmp_path / "m.onnx")
    assert check_onnx(model, tmp_path / "m.onnx", torch.randn(32, 12)) <= 1e-5


@pytest.mark.parametrize("basis", ["bspline", "gram", "rbf"])
@pytest.mark.parametrize("options", [{}, {"norm": "instance", "pad": "features", "act": "silu"},
                                     {"norm": "layer", "head": False}])
def test_convkan_exports_and_matches_pytorch(tmp_path, basis, options):
    torch.manual_seed(0)
    model = ConvKAN((2, 12, 12), 4, [3, 5], basis=basis, **options).eval()
    export_onnx(model, tmp_path / "c.onnx")
    assert check_onnx(model, tmp_path / "c.onnx", torch.randn(5, 2, 12, 12)) <= 1e-5


@pytest.mark.parametrize("stride,padding,source", [(1, None, "dense"), (2, 0, "dense"), (2, 2, "dense"),
                                                    (1, None, "codebook"), (1, None, "quant")])
def test_convkan_whose_basis_mixes_a_patch_exports_its_unfold_form(tmp_path, stride, padding, source):
    from bench.model.kan import KANConv2d

    torch.manual_seed(0)
    model = ConvKAN((3, 11, 9), 4, [5], basis="rbf", basis_kwargs={"norm": True}).eval()  # not square
    conv = next(m for m in model.modules() if isinstance(m, KANConv2d))
    assert not conv.fast  # RBF with its LayerNorm over the 27 inputs of a patch
    conv.stride, conv.padding = stride, (conv.kernel // 2 if padding is None else padding)
    w = conv.kan.edge_tensor().detach()
    if source == "codebook":
        conv.kan.set_source(CodebookSource(w.reshape(-1, w.shape[-1])[:6].clone(), torch.randint(0, 6, w.shape[:2])))
    elif source == "quant":
        conv.kan.set_source(QuantSource.from_float(w, 4, "node", True))
    export = export_onnx(model, tmp_path / "c.onnx")
    assert export.forms["features.0"].endswith("dense" if source == "dense" else "compressed")
    assert check_onnx(model, tmp_path / "c.onnx", 2 * torch.randn(4, 3, 11, 9)) <= 1e-5


def _quantised(bits, granularity, symmetric, scale_dtype):
    model = _kan()
    for _, layer in kan_layers(model):
        layer.set_source(QuantSource.from_float(layer.edge_tensor().detach(), bits, granularity, symmetric,
                                                scale_dtype))
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("granularity,symmetric,scale_dtype", [("node", True, "float32"), ("layer", False, "float32"),
                                                               ("edge", True, "float16"), ("edge", False, "float32")])
def test_quantised_codes_keep_their_width(tmp_path, bits, granularity, symmetric, scale_dtype):
    """Integer codes at exactly their width (INT4/UINT4 and 8/16-bit types, others bit-packed and
    unpacked in the graph), DequantizeLinear per tensor, per node or per edge: equal to PyTorch, and
    the file is the counted bytes plus the graph."""
    model = _quantised(bits, granularity, symmetric, scale_dtype)
    export = export_onnx(model, tmp_path / "q.onnx")
    assert check_onnx(model, tmp_path / "q.onnx", 3 * torch.randn(64, 12)) <= 1e-5
    assert set(export.forms.values()) == {"QuantSource: compressed"}
    counted = storage_report(model).stored_bits / 8
    assert export.bytes <= counted + OVERHEAD, (export.bytes, counted)


def _codebook(k, centroid_bits):
    model = _kan()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        flat = w.reshape(-1, w.shape[-1])
        src = CodebookSource(flat[torch.randperm(flat.shape[0])[:k]], torch.randint(0, k, w.shape[:2]))
        src.set_centroid_format(centroid_bits)
        layer.set_source(src)
    return model


@pytest.mark.parametrize("k,centroid_bits", [(16, 32), (16, 16), (8, 8), (5, 6), (3, 32)])
def test_codebook_keeps_centroids_and_narrow_indices(tmp_path, k, centroid_bits):
    model = _codebook(k, centroid_bits)
    export = export_onnx(model, tmp_path / "k.onnx")
    assert check_onnx(model, tmp_path / "k.onnx", 3 * torch.randn(64, 12)) <= 1e-5
    assert set(export.forms.values()) == {"CodebookSource: compressed"}
    counted = storage_report(model).stored_bits / 8
    assert export.bytes <= counted + OVERHEAD, (export.bytes, counted)


def test_a_larger_codebook_model_is_its_counted_bytes_plus_a_fixed_graph(tmp_path):
    """On kan [784, 64, 10] (K = 16): the ONNX file over the counted bytes is the graph alone."""
    torch.manual_seed(0)
    model = KAN([784, 64, 10]).eval()
    for _, layer in kan_layers(model):
        w = layer.edge_tensor().detach()
        layer.set_source(CodebookSource(w.reshape(-1, w.shape[-1])[:16], torch.randint(0, 16, w.shape[:2])))
    export = export_onnx(model, tmp_path / "big.onnx")
    counted = storage_report(model).stored_bits / 8
    assert counted < export.bytes <= counted + OVERHEAD
    assert export.bytes <= 1.3 * counted
    assert check_onnx(model, tmp_path / "big.onnx", torch.randn(16, 784)) <= 1e-5


@pytest.mark.parametrize("extrapolate", [False, True])
def test_per_input_knots_are_stored_once(tmp_path, extrapolate):
    """Per-input knots (an import's non-uniform grids, repeated knots included: 0/0 is 0) are one
    initializer; their differences and reciprocals are nodes folded at load, not copies in the file."""
    torch.manual_seed(0)
    model = KAN([784, 64, 10], basis_kwargs={"knots": "per_input", "extrapolate": extrapolate}).eval()
    for _, layer in kan_layers(model):
        t = layer.basis.knots
        t.copy_(torch.sort(t + 0.3 * torch.rand_like(t), dim=-1).values)
        t[:, 5] = t[:, 4]  # a repeated knot inside the grid
        w = layer.edge_tensor().detach()
        layer.set_source(CodebookSource(w.reshape(-1, w.shape[-1])[:16], torch.randint(0, 16, w.shape[:2])))
    export = export_onnx(model, tmp_path / "knots.onnx")
    counted = storage_report(model).stored_bits / 8
    # the recursion's ~100 nodes a layer (about 8 KB here; 7x the counted bytes when every slice and
    # reciprocal was a constant copy of the knot rows)
    assert counted < export.bytes <= min(counted + 2 * OVERHEAD, 1.3 * counted), (export.bytes, counted)
    x = torch.cat([2 * torch.randn(30, 784), torch.full((1, 784), 50.0), torch.full((1, 784), -50.0)])
    assert check_onnx(model, tmp_path / "knots.onnx", x) <= 1e-5


def test_no_onnx_form_is_refused_in_one_line_and_recorded_in_the_row(tmp_path):
    from bench.model.bases import Basis, register_basis

    @register_basis("test_only_square")
    class Square(Basis):
        def __init__(self, in_features, degree=2):
            super().__init__(in_features)
            self.n_basis = 2

        def forward(self, x):
            return torch.stack([x, x * x], dim=-1)

    try:
        model = KAN([4, 3, 2], "test_only_square").eval()
        with pytest.raises(ExportRefused, match="basis 'test_only_square' has no ONNX form"):
            export_onnx(model, tmp_path / "s.onnx")
        row = onnx_row(model, tmp_path / "s.onnx", torch.randn(8, 4))
        assert row["onnx_bytes"] is None and "has no ONNX form" in row["onnx_error"]
    finally:
        from bench.model.bases import BASES as REGISTRY

        REGISTRY.pop("test_only_square", None)
        REGISTRY._origins.pop("test_only_square", None)


def test_export_command_writes_checks_and_refuses_mistakes_in_one_line(tmp_path, capsys):
    model = _quantised(4, "node", True, "float32")
    kanb = tmp_path / "m.kanb"
    export_model(model, kanb)
    assert main(["export", str(kanb), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "layers.0: QuantSource: compressed" in out and "max |difference|" in out
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert main(["export", str(tmp_path / "none.kanb"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    (tmp_path / "bad.kanb").write_bytes(b"not a model")
    assert main(["export", str(tmp_path / "bad.kanb"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", str(kanb), "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_small_dtype_tensors_are_written_at_16_bits(tmp_path, dtype):
    """small_dtype stores biases and norms at 16 bits; the ONNX file keeps them at 16 bits too (the
    values are already rounded, so the cast back is exact)."""
    import onnx

    from bench.compression.storage import set_small_dtype

    model = _kan("rbf", norms=["layer", "none"])
    set_small_dtype(model, dtype)
    export_onnx(model, tmp_path / "s.onnx")
    assert check_onnx(model, tmp_path / "s.onnx", torch.randn(16, 12)) <= 1e-5
    types = {t.name.rsplit("_", 1)[0]: t.data_type for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    want = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.BFLOAT16
    assert types["bias"] == types["ln_w"] == want


def test_files_are_stamped_with_the_oldest_ir_version_their_opset_needs(tmp_path):
    """onnx 1.23 stamps IR 14 by default, which onnxruntime 1.30 refuses to load ("Unsupported model IR
    version"): every test_methods ONNX check failed on a GPU machine with that pair. A file needs only the
    IR version of its opset (opset 21: IR 10), the one the widest range of runtimes loads."""
    import onnx

    from bench.deploy.onnx_export import OPSET

    model = _quantised(4, "node", True, "float32")
    export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import)) == 10
    assert check_onnx(model, tmp_path / "m.onnx", torch.randn(16, 12)) <= 1e-5


def test_a_runtime_failure_is_recorded_with_its_reason_not_only_its_path(tmp_path, monkeypatch):
    """onnxruntime's message starts with the file's path and its own source location and ends with the
    reason; a row's onnx_error keeps the reason (it once kept only the first 200 characters)."""
    import bench.deploy.onnx_export as ox

    reason = "Unsupported model IR version: 14, max supported IR version: 11"

    def refuse(model, path, x):
        raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : Load model from {tmp_path}/{'d' * 200}.onnx failed:"
                           f"/onnxruntime_src/onnxruntime/core/graph/model.cc:202 onnxruntime::Model::Model("
                           f"onnx::ModelProto&&, const PathString&, ...) {reason}")

    monkeypatch.setattr(ox, "check_onnx", refuse)
    row = onnx_row(_kan(), tmp_path / "m.onnx", torch.randn(8, 12))
    assert row["onnx_bytes"] is None and row["onnx_error"].endswith(reason) and len(row["onnx_error"]) < 450
