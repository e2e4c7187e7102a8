"""Tests generated over every registry (benchopt-style): a dataset, source or model kind that is
registered is tested the moment it exists, and a new one without what its test needs fails here.

- every **dataset**: shapes and dtypes as declared, train / val / test disjoint, the same splits
  for the same seed and different ones for another seed (datasets that need files are loaded
  through their real code from fixture files in the real formats, written by ``FIXTURES``);
- every **source**: export / reload gives the same outputs, the file is exactly the counted bits
  (each tensor ``ceil(bits / 8)`` bytes) plus the header, and the same model writes the same bytes;
- every **model kind**: builds for a compatible dataset, refuses an incompatible one with one
  line, and rebuilds from its ``config()``.

Methods are generated in ``test_methods.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE
from test_datasets import idx_arrays, write_cifar, write_idx_set

from bench.compression import codebook, generated
from bench.compression.entropy import EntropyCodedSource
from bench.compression.pruning import MaskedSource
from bench.compression.quant import FakeQuantSource, LayerGrid, QFormat, QuantSource
from bench.compression.storage import export_model, header_bytes, load_model, storage_report
from bench.compression.tucker_factors import LoTRASource, TuckerSource
from bench.data import DATASETS, get_dataset
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers
from bench.model.kinds import MODELS, from_config
from bench.model.sources import SOURCES
from bench.registry import REPO_ROOT, defining_file, load_plugins

load_plugins()

# ------------------------------------------------------------------------------------ datasets
# Datasets that need files: how to write a small fixture in the real format into ``root``.
# (CIFAR's torchvision loader checks the official archives' md5 sums, which no fixture can match:
# the fixture test replaces that check by an existence check; test_datasets.py shows it in force.)
FIXTURES = {
    "mnist": lambda root: write_idx_set(root / "MNIST" / "raw", idx_arrays()),
    "fashion_mnist": lambda root: write_idx_set(root / "FashionMNIST" / "raw", idx_arrays()),
    "cifar10": lambda root: write_cifar(root, hundred=False),
    "cifar100": lambda root: write_cifar(root, hundred=True),
}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    import os

    import torchvision.datasets.cifar as tv_cifar

    empty = tmp_path / "no-debian-files"
    empty.mkdir()
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(empty))  # never the machine's own copy
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path / "data"


def _load(name: str, root, seed: int):
    options = {"download": False} if name in FIXTURES else {}
    ds = get_dataset(name, **options)
    ds.check_available(root)
    return ds, ds.load(root, seed=seed)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_splits_shapes_disjoint_and_seeded(name, data_root):
    data_root.mkdir()
    if name in FIXTURES:
        FIXTURES[name](data_root)
    try:
        ds, s = _load(name, data_root, seed=0)
    except UserError as exc:
        pytest.fail(f"dataset {name!r} cannot load offline and has no fixture in FIXTURES: {exc}")
    for split in ("train", "val", "test"):
        x, y = s.split(split)
        assert len(x) == len(y) > 0, split
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == tuple(ds.input_shape), split
        assert torch.isfinite(x).all(), split
        if ds.task == "classification":
            assert y.dtype == torch.int64 and y.dim() == 1 and 0 <= int(y.min()) and int(y.max()) < ds.n_outputs
        else:
            assert y.dtype == torch.float32 and y.shape == (len(x), ds.n_outputs) and torch.isfinite(y).all()
    train, val, test = (_rows(s.split(k)[0]) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test, "splits share examples"
    _, again = _load(name, data_root, seed=0)
    for a, b in zip(s.split("train") + s.split("val"), again.split("train") + again.split("val")):
        assert torch.equal(a, b), "the same seed must give the same splits"
    _, other = _load(name, data_root, seed=1)
    assert not torch.equal(s.x_train, other.x_train), "another seed must give other splits"


# ------------------------------------------------------------------------------------- sources
def _each_layer(model, make):
    for _, layer in kan_layers(model):
        layer.set_source(make(layer.edge_tensor().detach(), layer))


def _masked(w, layer):
    flat = torch.arange(0, w.shape[0] * w.shape[1], 2)  # every other edge survives
    return MaskedSource(w.shape[0], w.shape[1], w.shape[2], flat, w.reshape(-1, w.shape[2])[flat])


def _branches(w, bits=(3, 5)):
    n = w.shape[-1] - 1
    return [("coef", slice(0, n), QFormat(bits[0])), ("base", slice(n, n + 1), QFormat(bits[1]))]


def _branch_quant(w, _):  # branch-aware codes: coefficients and base weights on their own grids
    grid = LayerGrid(w, _branches(w))
    return grid.source(grid.round_to_nearest(w))


# How to put each registered source on every layer of a small KAN (a new source needs an entry).
EXAMPLES = {
    "DenseSource": lambda m: None,
    "CodebookSource": lambda m: codebook.cluster_model(m, 4, "layer"),
    "EntropyCodedSource": lambda m: (_each_layer(m, _masked), codebook.cluster_model(m, 3, "layer"),  # forced:
                                     _each_layer(m, lambda w, la: EntropyCodedSource(la.source, ["index", "mask"]))),
    "MaskedCodebookSource": lambda m: (_each_layer(m, _masked), codebook.cluster_model(m, 3, "layer")),
    "SharedCodebookSource": lambda m: codebook.cluster_model(m, 4, "global"),
    "GeneratedSource": lambda m: generated.generate_model(m, 2, 8, shared=True),  # an owner and a borrower
    "MaskedSource": lambda m: _each_layer(m, _masked),
    "QuantSource": lambda m: _each_layer(m, lambda w, _: QuantSource.from_float(w, bits=3)),
    "FakeQuantSource": lambda m: _each_layer(m, lambda w, _: FakeQuantSource(w, bits=3)),
    "BranchSource": lambda m: _each_layer(m, _branch_quant),
    "LSQSource": lambda m: _each_layer(m, lambda w, _: LayerGrid(w, [("all", slice(0, w.shape[-1]), QFormat(4))])
                                       .lsq_source(w)),
    "TuckerSource": lambda m: _each_layer(m, lambda w, _: TuckerSource.from_tensor(w, [0.5, 0.5, 0.5])),
    "LoTRASource": lambda m: _each_layer(m, lambda w, _: LoTRASource(w, TuckerSource.random(
        tuple(w.shape), [2, 2, 2], rms=0.1, generator=torch.Generator().manual_seed(0)))),
}


def _bundled(registry) -> list[str]:
    """Names registered by the harness itself (bench/, methods/, datasets/), not by a test's plugin."""
    roots = [REPO_ROOT / d for d in ("bench", "methods", "datasets")]
    return sorted(n for n, obj in registry.items() if any(Path(defining_file(obj)).is_relative_to(r) for r in roots))


def test_every_source_has_an_example():
    assert sorted(set(_bundled(SOURCES)) - set(EXAMPLES)) == [], "add the new source to EXAMPLES"


@pytest.mark.parametrize("name", _bundled(SOURCES))
def test_source_round_trips_and_file_is_counted_bits(name, tmp_path):
    torch.manual_seed(0)
    model = KAN([6, 5, 3], basis="rbf").to(TEST_DEVICE)  # every tensor a source creates lands on the model's device
    EXAMPLES[name](model)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {torch.device(TEST_DEVICE).type}
    assert {type(layer.source).__name__ for _, layer in kan_layers(model)} == {name}
    model.eval()
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    rep = storage_report(model)
    assert size == path.stat().st_size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in rep.items)
    reloaded = load_model(path)
    x = torch.randn(16, 6)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x.to(TEST_DEVICE)).cpu(), atol=1e-5 if TEST_DEVICE == "cuda" else 1e-6)
    assert storage_report(reloaded).stored_bits == rep.stored_bits
    assert {type(layer.source).__name__ for _, layer in kan_layers(reloaded)} <= {name, "QuantSource"}
    torch.manual_seed(0)  # the same model and the same source: the same file, byte for byte
    again = KAN([6, 5, 3], basis="rbf").to(TEST_DEVICE)
    EXAMPLES[name](again)
    export_model(again.eval(), tmp_path / "again.kanb")
    assert (tmp_path / "again.kanb").read_bytes() == path.read_bytes()


# --------------------------------------------------------------------------------- model kinds
@pytest.mark.parametrize("name", sorted(n for n, k in MODELS.items() if not k.given))  # imported: test_interop_methods
def test_model_kind_builds_refuses_and_rebuilds(name):
    kind = MODELS[name]
    images, table = get_dataset("digits"), get_dataset("eq_exp_sin")
    model = kind.build(kind.options({}), images, "rbf", None)
    assert kind.incompatibility(images) is None
    x = torch.randn(4, *images.input_shape)
    with torch.no_grad():
        assert model(x).shape == (4, images.n_outputs)
    rebuilt = from_config(model.config())
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    assert kind.arch(model.config()).startswith(name + "[")
    why = kind.incompatibility(table)
    if why is not None:  # a kind that cannot take tabular data says so in one line, before building
        assert "\n" not in why
        with pytest.raises(UserError):
            kind.build(kind.options({}), table, "rbf", None)


@pytest.mark.parametrize("name", ["MaskedSource", "FakeQuantSource", "LoTRASource"])  # the three CUDA failures
def test_a_source_made_from_cpu_tensors_lands_on_its_layers_device(name):
    """Found on a GPU machine: a pruning index, a quantiser's clip and LoTRA's random factors built on the CPU
    stayed there inside a CUDA model (index_copy then refused). ``set_source`` puts a source where its layer
    is; checked here with PyTorch's meta device standing in for a device other than the CPU."""
    model = KAN([6, 5, 3], basis="rbf").to("meta")
    EXAMPLES[name](model)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
