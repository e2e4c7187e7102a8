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
