import numpy as np
import pytest
import torch

from bench.compression.storage import export_model, load_model, pack_bits, storage_report, unpack_bits
from bench.model.kan import KAN, ConvKAN, kan_layers
from bench.model.sources import CodebookSource, EdgeSource, index_bits

HEADER_SLACK_BYTES = 4096  # magic + compressed JSON header; plus <= 1 byte padding per tensor


def test_dense_bits_hand_count_784_64_10_bspline():
    m = KAN([784, 64, 10], basis="bspline")
    rep = storage_report(m)
    edges = 784 * 64 + 64 * 10
    assert edges == 50_816
    coef = edges * 9 * 32
    biases = (64 + 10) * 32  # uniform knots follow from the basis config: not stored, not counted
    assert rep.coef_dense_bits == rep.coef_stored_bits == coef == 14_635_008
    assert rep.stored_bits == rep.dense_bits == coef + biases == 457_418 * 32
    assert sum(it.count for _, it in rep.items) == edges * 9 + 64 + 10 == 457_418
    assert rep.compression_ratio == 1.0


def test_rbf_counts_layernorm():
    m = KAN([10, 4, 3], basis="rbf")
    rep = storage_report(m)
    coef = (10 * 4 + 4 * 3) * 9 * 32
    norms = 2 * (10 + 4) * 32  # LayerNorm weight + bias per layer; the centres follow from the config
    assert rep.stored_bits == coef + norms + (4 + 3) * 32


def test_codebook_hand_count_matches_issue_example():
    """[784, 64, 10] B-spline at K=16 per layer: coef ratio 14,635,008 / 212,480 = 68.9x."""
    m = KAN([784, 64, 10], basis="bspline")
    for _, layer in kan_layers(m):
        w = layer.edge_tensor().detach()
        layer.set_source(CodebookSource(w.reshape(-1, 9)[:16], torch.randint(0, 16, w.shape[:2])))
    rep = storage_report(m)
    assert rep.coef_stored_bits == 50_816 * 4 + 2 * 16 * 9 * 32 == 212_480
    assert rep.coef_compression_ratio == pytest.approx(14_635_008 / 212_480)
    assert round(rep.coef_compression_ratio, 1) == 68.9


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11])
def test_bit_packing_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 2**bits, size=1001)
    data = pack_bits(v, bits)
    assert len(data) == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(data, 1001, bits), v)
    with pytest.raises(ValueError):
        pack_bits(np.array([2**bits]), bits)


def test_index_bits():
    assert [index_bits(k) for k in (2, 3, 4, 5, 16, 17, 256)] == [1, 2, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("basis", ["bspline", "rbf", "gram"])
def test_export_load_round_trip_and_file_size(tmp_path, basis):
    torch.manual_seed(0)
    m = KAN([20, 8, 3], basis=basis)
    path = tmp_path / "m.kanb"
    nbytes = export_model(m, path)
    assert nbytes == path.stat().st_size
    rep = storage_report(m)
    n_tensors = len(rep.items)
    assert rep.stored_bits <= nbytes * 8 <= rep.stored_bits + 8 * (HEADER_SLACK_BYTES + n_tensors)
    m2 = load_model(path)
    x = torch.randn(16, 20)
    assert torch.equal(m(x), m2(x))


def test_export_bitpacks_codebook_indices(tmp_path):
    torch.manual_seed(0)
    m = ConvKAN((1, 8, 8), 4, channels=[16], basis="bspline")
    for _, layer in kan_layers(m):
        w = layer.edge_tensor().detach()
        layer.set_source(CodebookSource(w.reshape(-1, w.shape[-1])[:5], torch.randint(0, 5, w.shape[:2])))
    rep = storage_report(m)
    index_bits_total = sum(it.bits for n, it in rep.items if n.endswith("index"))
    assert index_bits_total == (16 * 9 + 4 * 16) * 3
    path = tmp_path / "cb.kanb"
    nbytes = export_model(m, path)
    assert nbytes * 8 <= rep.stored_bits + 8 * (HEADER_SLACK_BYTES + len(rep.items))
    m2 = load_model(path)
    assert all(isinstance(layer.source, CodebookSource) for _, layer in kan_layers(m2))
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(m.eval()(x), m2(x), atol=1e-6)  # eval: BatchNorm's running statistics


def test_codebook_fast_path_equals_full_tensor_path():
    torch.manual_seed(0)
    src = CodebookSource(torch.randn(4, 9, dtype=torch.double), torch.randint(0, 4, (40, 6))).double()
    f = torch.randn(5, 6, 9, dtype=torch.double, requires_grad=True)
    assert torch.allclose(src.contract_gather(f), EdgeSource.contract(src, f))
    g = torch.randn(5, 40, dtype=torch.double)
    fast = torch.autograd.grad(src.contract_gather(f), (src.centroids, f), g)
    dense = torch.autograd.grad(EdgeSource.contract(src, f), (src.centroids, f), g)
    assert all(torch.allclose(a, b) for a, b in zip(fast, dense))
    # the cost model: long edge vectors and a small codebook take the gather path; 9 values per edge never do
    assert CodebookSource(torch.randn(2, 65), torch.randint(0, 2, (64, 6))).use_fast_path()  # 64 basis functions
    assert not CodebookSource(torch.randn(16, 9), torch.randint(0, 16, (64, 784))).use_fast_path()


def test_file_is_counted_bits_plus_header(tmp_path):
    """The exported file holds exactly the counted tensors plus its header: no knots, no centres."""
    from bench.compression.storage import header_bytes

    for basis in ("bspline", "rbf"):
        m = KAN([6, 5, 2], basis=basis)
        rep = storage_report(m)
        path = tmp_path / f"{basis}.kanb"
        size = export_model(m, path)
        padded = sum(-(-it.bits // 8) for _, it in rep.items)
        assert size == header_bytes(path) + padded
        assert not any("knots" in n or "centers" in n for n, _ in rep.items)
        x = torch.randn(16, 6)
        assert torch.equal(load_model(path)(x), m.eval()(x))


def test_zstd_check_measures_redundancy_in_the_file(tmp_path):
    from bench.compression.storage import zstd_bytes
    from bench.report.tables import zstd_note

    noise = tmp_path / "noise.bin"
    noise.write_bytes(torch.randint(0, 256, (50_000,), dtype=torch.uint8).numpy().tobytes())
    assert zstd_bytes(noise) >= 0.99 * 50_000  # incompressible: no waste to report
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(50_000))
    assert zstd_bytes(zeros) < 100  # all redundancy
    assert zstd_note(1000, 990) == "" and zstd_note(1000, 880) == "; zstd −12%" and zstd_note(1000, float("nan")) == ""
