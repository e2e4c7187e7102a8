"""Exact import of models trained by other KAN libraries (bench.interop, ``python -m bench import``).

The fixtures were made by each library's own code (tests/fixtures/interop/README.md); an import is
proven by reproducing the library's recorded outputs, in float32 and in float64. pykan is on PyPI:
fresh pykan models (fitted with grid updates, refined, pruned, saved with saveckpt) are checked
against pykan's own forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.compression.storage import export_model, header_bytes, load_model, set_small_dtype, storage_report
from bench.errors import UserError
from bench.interop import check_outputs, import_model, read_import_file
from bench.model.kan import ConvKAN

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
FILES = sorted(p.name for p in FIXTURES.glob("*.pt"))


def load(name: str) -> dict:
    return read_import_file(FIXTURES / name)


def imported(d: dict, dtype=torch.float32):
    shape = tuple(d["x"].shape[1:]) if d["x"].dim() == 4 else None
    return import_model(d["state_dict"], d["library"], d["constructor"], d["model_class"], dtype=dtype,
                        input_shape=shape)


def test_the_five_libraries_have_a_fixture():
    assert {load(f)["library"] for f in FILES} == {"efficient-kan", "fast-kan", "pykan", "torch-conv-kan", "ChebyKAN"}


@pytest.mark.parametrize("name", FILES)
def test_fixture_imports_exactly_in_float32_and_float64(name):
    d = load(name)
    assert check_outputs(imported(d), d["x"], d["y"]) <= 1e-5
    assert check_outputs(imported(d, torch.float64), d["x"], d["y_float64"]) <= 1e-10


@pytest.mark.parametrize("name", FILES)
def test_imported_file_holds_the_counted_bits_and_reloads_exactly(name, tmp_path):
    d = load(name)
    model = imported(d)
    path = tmp_path / "m.kanb"
    size = export_model(model, path)
    rep = storage_report(model)
    assert size == header_bytes(path) + sum(math.ceil(it.bits / 8) for _, it in rep.items)
    reloaded = load_model(path)
    x = d["x"]
    assert torch.equal(reloaded(x), model(x))
    names = {n for n, _ in rep.items}
    if d["library"] in ("pykan", "efficient-kan"):  # per-input knots are data: stored and counted
        assert {"layers.0.basis.knots", "layers.1.basis.knots"} <= names
    if d["library"] == "torch-conv-kan":  # learned betas too
        assert "features.0.kan.basis.beta" in names


def test_small_dtype_keeps_knots_at_float32():
    d = load("pykan_4-3-2_g5k3_fit.pt")
    model = imported(d)
    knots = model.layers[0].basis.knots.clone()
    set_small_dtype(model, "float16")
    assert torch.equal(model.layers[0].basis.knots, knots)
    items = dict(storage_report(model).items)
    assert items["layers.0.basis.knots"].bits_per_value == 32 and items["layers.0.bias"].bits_per_value == 16


def test_import_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    imported(load("efficient_kan_6-5-3.pt"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", FILES)
def test_cli_import_writes_a_loadable_model_and_prints_the_error(name, tmp_path, capsys):
    out = tmp_path / "model.kanb"
    assert main(["import", str(FIXTURES / name), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |error| against the file's y:" in text
    err = float(text.split("against the file's y: ")[1].split()[0])
    assert err <= 1e-5
    d = load(name)
    assert check_outputs(load_model(out), d["x"], d["y"]) == pytest.approx(err, rel=0.01)


def test_cli_import_of_a_bare_state_dict_needs_the_library(tmp_path, capsys):
    d = load("fastkan_6-5-3.pt")
    bare = tmp_path / "sd.pt"
    torch.save(d["state_dict"], bare)
    out = tmp_path / "m.kanb"
    assert main(["import", str(bare), "--out", str(out)]) == 2
    assert "--from" in capsys.readouterr().err and not out.exists()
    assert main(["import", str(bare), "--out", str(out), "--from", "fast-kan", "--class", "fastkan.FastKAN"]) == 0
    assert "no x/y" in capsys.readouterr().out
    assert check_outputs(load_model(out), d["x"], d["y"]) <= 1e-5


def _refusal(tmp_path, capsys, args, *, file=None, obj=None):
    if obj is not None:
        file = tmp_path / "in.pt"
        torch.save(obj, file)
    out = tmp_path / "never.kanb"
    code = main(["import", str(file), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(tmp_path.glob("*.partial"))
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _changed(name: str, **changes) -> dict:
    raw = torch.load(FIXTURES / name, weights_only=True)
    for key, value in changes.items():
        if key == "state":
            raw["state_dict"] = {**raw["state_dict"], **value}
        elif key == "drop":
            raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if k != value}
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("case, expect", [
    ({"file": "pykan_4-3-2_g5k3_fit.pt", "args": ["--constructor", '{"width": [4, [3, 1], 2]}']},
     "multiplication nodes"),
    ({"obj": ("pykan_4-3-2_g5k3_fit.pt", {"state": {"symbolic_fun.0.mask": torch.ones(3, 4)}})}, "symbolic"),
    ({"file": "pykan_4-3-2_g5k3_fit.pt", "args": ["--constructor", '{"base_fun": "identity"}']}, "base_fun"),
    ({"file": "kagn_conv2d_2-4_k3_deg3.pt", "args": ["--constructor", '{"groups": 2}']}, "groups=2"),
    ({"file": "kagn_conv2d_2-4_k3_deg3.pt", "args": ["--constructor", '{"dilation": 2}']}, "dilation=2"),
    ({"file": "kagn_conv2d_2-4_k3_deg3.pt", "args": ["--constructor", '{"norm_layer": "torch.nn.GroupNorm"}']},
     "GroupNorm"),
    ({"file": "efficient_kan_6-5-3.pt", "args": ["--class", "efficient_kan.Nope"]}, "has no importer"),
    ({"file": "efficient_kan_6-5-3.pt", "args": ["--from", "nokan"]}, "unknown library"),
    ({"file": "efficient_kan_6-5-3.pt", "args": ["--constructor", '{"layers_hidden": [6, 4, 3]}']},
     "does not fit"),
    ({"file": "efficient_kan_6-5-3.pt", "args": ["--constructor", '{"base_activation": "torch.nn.ReLU"}']},
     "base_activation"),
    ({"obj": ("efficient_kan_6-5-3.pt", {"drop": "layers.1.spline_scaler"})}, "does not fit"),
    ({"obj": ("efficient_kan_6-5-3.pt", {"state": {"extra_buffer": torch.zeros(1)}})}, "unexpected keys"),
    ({"file": "fastkan_6-5-3.pt", "args": ["--constructor", '{"grid_min": -1}']}, "not linspace"),
    ({"obj": ("chebykan_6-5-3_deg4_ln.pt", {"constructor": {"sequential": [
        {"class": "torch.nn.LayerNorm", "normalized_shape": 6}, {"class": "ChebyKANLayer"},
        {"class": "ChebyKANLayer"}]}})}, "LayerNorm first"),
    ({"obj": ("chebykan_6-5-3_deg4_ln.pt", {"constructor": {"sequential": [
        {"class": "ChebyKANLayer"}, {"class": "torch.nn.ReLU"}, {"class": "ChebyKANLayer"}]}})}, "ReLU"),
    ({"obj": ("fastkan_6-5-3.pt", {"y": torch.zeros(16, 3)})}, "differs from the file's y"),
    ({"file": "fastkan_6-5-3.pt", "args": ["--constructor", "{nope"]}, "not JSON"),
    ({"file": "kagn_conv2d_2-4_k3_deg3.pt", "args": ["--input-shape", "2,6"]}, "--input-shape"),
    ({"file": "missing.pt"}, "no such file"),
])
def test_every_refusal_is_one_line_exit_2_and_writes_nothing(case, expect, tmp_path, capsys):
    args = case.get("args", [])
    if "obj" in case:
        name, changes = case["obj"]
        line = _refusal(tmp_path, capsys, args, obj=_changed(name, **changes))
    else:
        line = _refusal(tmp_path, capsys, args, file=FIXTURES / case["file"])
    assert expect in line, line


def test_import_model_refuses_a_module_of_no_supported_library():
    with pytest.raises(UserError, match="not a class of a supported library"):
        import_model(torch.nn.Linear(2, 3))
    with pytest.raises(UserError, match="needs library="):
        import_model({"w": torch.zeros(1)})


def test_kagn_conv_import_is_a_bare_feature_padded_convolution():
    model = imported(load("kagn_conv2d_2-4_k3_deg3.pt"))
    assert isinstance(model, ConvKAN) and model.head is None
    conv = model.features[0]
    x = load("kagn_conv2d_2-4_k3_deg3.pt")["x"]
    assert conv.pad == "features" and torch.allclose(conv(x), conv.forward_unfold(x), atol=1e-5)


# -- pykan's own code ---------------------------------------------------------------------------------------
pykan = pytest.importorskip("kan", reason="pykan is not installed (pip install -e '.[interop]')")


@pytest.fixture
def pykan_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pykan logs into ./model after refine() and prune()
    (tmp_path / "model").mkdir()
    return tmp_path


def _fit(model, steps: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 3, generator=g) * 2 - 1
    y = torch.stack([torch.sin(3 * x[:, 0]) + x[:, 1] ** 2, x[:, 2] * x[:, 0]], 1)
    data = {"train_input": x, "train_label": y, "test_input": x, "test_label": y}
    model.fit(data, opt="Adam", steps=steps, lr=0.01, lamb=0.01, update_grid=True)
    return model


def _check_against_pykan(ours, theirs, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(128, theirs.width_in[0], generator=g) * 2).to(dtype)  # beyond the knots too
    with torch.no_grad():
        return float((ours(x) - theirs(x)).abs().max())


def test_fresh_pykan_models_import_exactly_after_fit_refine_and_prune(pykan_dir):
    torch.manual_seed(0)
    model = _fit(pykan.KAN(width=[3, 4, 2], grid=5, k=3, seed=0, auto_save=False), 20)
    knots = model.act_fun[0].grid
    assert not torch.allclose(knots[0], knots[1])  # fit() left per-input, non-uniform knots
    assert _check_against_pykan(import_model(model), model) <= 1e-5
    refined = model.refine(8)
    refined.auto_save = False  # pykan's refine() turns auto_save back on
    _fit(refined, 10)
    assert _check_against_pykan(import_model(refined), refined) <= 1e-5
    pruned = refined.prune(node_th=0.2, edge_th=0.2)
    assert pruned.width != refined.width or bool((pruned.act_fun[0].mask == 0).any())
    assert _check_against_pykan(import_model(pruned), pruned) <= 1e-5
    pruned.saveckpt("./ckpt")
    d = read_import_file(pykan_dir / "ckpt")
    assert _check_against_pykan(import_model(d["state_dict"], "pykan", d["constructor"]), pruned) <= 1e-5
    pruned.to(torch.float64)
    assert _check_against_pykan(import_model(pruned, dtype=torch.float64), pruned, torch.float64) <= 1e-10


def test_pykan_per_layer_grids_and_zero_base_import(pykan_dir):
    model = _fit(pykan.KAN(width=[3, 3, 2], grid=[4, 6], k=[3, 2], base_fun="zero", seed=2, auto_save=False), 10)
    ours = import_model(model)
    assert [layer.basis.grid_size for layer in ours.layers] == [4, 6]
    assert [layer.basis.order for layer in ours.layers] == [3, 2]
    assert all(float(layer.edge_tensor().detach()[..., -1].abs().max()) == 0 for layer in ours.layers)
    assert _check_against_pykan(ours, model) <= 1e-5


def test_pykan_refusals_name_what_has_no_mapping(pykan_dir):
    mult = pykan.KAN(width=[2, [2, 1], 1], grid=3, k=3, seed=0, auto_save=False)
    with pytest.raises(UserError, match="multiplication nodes"):
        import_model(mult)
    ident = pykan.KAN(width=[2, 2, 1], grid=3, k=3, seed=0, base_fun="identity", auto_save=False)
    with pytest.raises(UserError, match="base_fun='identity'"):
        import_model(ident)
    sym = pykan.KAN(width=[2, 2, 1], grid=3, k=3, seed=0, auto_save=False)
    sym.fix_symbolic(0, 0, 0, "sin", fit_params_bool=False, verbose=False)
    with pytest.raises(UserError, match="symbolic"):
        import_model(sym)
    sym.saveckpt("./sym")
    with pytest.raises(UserError, match="symbolic functions"):
        read_import_file(pykan_dir / "sym")


def test_a_live_chebykan_stack_is_recognised_by_its_class():
    """A module of another library is recognised by its class name (ChebyKAN's is a bare
    ``ChebyKANLayer`` module); here a stand-in written from ChebyKAN's formula, loaded with the fixture."""

    class ChebyKANLayer(torch.nn.Module):
        def __init__(self, input_dim, output_dim, degree):
            super().__init__()
            self.inputdim, self.outdim, self.degree = input_dim, output_dim, degree
            self.cheby_coeffs = torch.nn.Parameter(torch.empty(input_dim, output_dim, degree + 1))
            self.register_buffer("arange", torch.arange(0, degree + 1, 1))

        def forward(self, x):
            t = torch.tanh(x).reshape(-1, self.inputdim, 1).expand(-1, -1, self.degree + 1)
            return torch.einsum("bid,iod->bo", (t.acos() * self.arange).cos(), self.cheby_coeffs)

    ChebyKANLayer.__module__ = "ChebyKANLayer"
    live = torch.nn.Sequential(ChebyKANLayer(6, 5, 4), torch.nn.LayerNorm(5), ChebyKANLayer(5, 3, 4))
    d = load("chebykan_6-5-3_deg4_ln.pt")
    live.load_state_dict(d["state_dict"])
    with torch.no_grad():
        assert float((live(d["x"]) - d["y"]).abs().max()) <= 1e-5  # the stand-in is ChebyKAN's forward
    ours = import_model(live)
    assert ours.imported_from == {"library": "ChebyKAN", "class": "Sequential"}
    assert check_outputs(ours, d["x"], d["y"]) <= 1e-5
    live.insert(0, torch.nn.LayerNorm(6))
    with pytest.raises(UserError, match="LayerNorm first"):
        import_model(live)


# -- torch-conv-kan's fully connected KAGN and SimpleConvKAGN: no fixture file, so their forwards are
# written out here from the library's code (kans/layers.py GRAMLayer, kan_convs/kagn_conv.py,
# models/baselines/conv_kagn_baseline.py) and run on random weights in the library's state_dict layout.
def _gram_basis(t, beta, degree, dim):
    polys = [torch.ones_like(t), t][: degree + 1]
    for i in range(2, degree + 1):
        n, m = i - 1, i
        polys.append(t * polys[-1] - ((m + n) * (m - n) * n ** 2) / (m ** 2 / (4.0 * n ** 2 - 1.0)) * beta[n]
                     * polys[-2])
    return torch.stack(polys, dim=-1) if dim == -1 else torch.cat(polys, dim=1)


def _gram_layer(sd, p, x):
    silu = torch.nn.functional.silu
    degree = sd[p + "beta_weights"].shape[0] - 1
    basis = torch.nn.functional.linear(silu(x), sd[p + "base_weights"])
    g = silu(_gram_basis(torch.tanh(x), sd[p + "beta_weights"], degree, -1))
    y = torch.einsum("bld,lod->bo", g, sd[p + "grams_basis_weights"])
    out = y.shape[1]
    return silu(torch.nn.functional.layer_norm(y + basis, (out,), sd[p + "norm.weight"], sd[p + "norm.bias"]))


def _kagn_conv(sd, p, x, stride, padding, norm):
    silu, F = torch.nn.functional.silu, torch.nn.functional
    degree = sd[p + "beta_weights"].shape[0] - 1
    basis = F.conv2d(silu(x), sd[p + "base_conv.0.weight"], stride=stride, padding=padding)
    g = silu(_gram_basis(torch.tanh(x), sd[p + "beta_weights"], degree, 1))  # degree-major channels
    y = F.conv2d(g, sd[p + "poly_weights"][0], stride=stride, padding=padding) + basis
    n = p + "layer_norm.0."
    y = F.batch_norm(y, sd[n + "running_mean"], sd[n + "running_var"], sd[n + "weight"], sd[n + "bias"]) \
        if norm == "batch" else F.instance_norm(y)
    return silu(y)


def _random_gram_state(prefix, inp, out, degree, g):
    return {prefix + "beta_weights": torch.randn(degree + 1, generator=g) * 0.1,
            prefix + "grams_basis_weights": torch.randn(inp, out, degree + 1, generator=g) * 0.3,
            prefix + "base_weights": torch.randn(out, inp, generator=g) * 0.3,
            prefix + "norm.weight": 1 + 0.1 * torch.randn(out, generator=g),
            prefix + "norm.bias": 0.1 * torch.randn(out, generator=g)}


def test_kagn_fully_connected_imports_exactly():
    g = torch.Generator().manual_seed(5)
    widths, degree = [6, 5, 3], 3
    sd = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        sd.update(_random_gram_state(f"layers.{i}.", a, b, degree, g))
    x = torch.randn(16, 6, generator=g) * 2
    y = x
    for i in range(2):
        y = _gram_layer(sd, f"layers.{i}.", y)
    model = import_model(sd, "torch-conv-kan", {"layers_hidden": widths, "degree": degree}, "kans.KAGN")
    assert check_outputs(model, x, y) <= 1e-5
    sd64 = {k: v.double() for k, v in sd.items()}
    y64 = x.double()
    for i in range(2):
        y64 = _gram_layer(sd64, f"layers.{i}.", y64)
    assert check_outputs(import_model(sd, "torch-conv-kan", {}, "KAGN", dtype=torch.float64), x, y64) <= 1e-10


def test_simple_conv_kagn_imports_exactly():
    g = torch.Generator().manual_seed(6)
    sizes, degree, classes = [4, 6, 6, 8], 3, 5
    sd, c_in = {}, 1
    for i, c in enumerate(sizes):
        p = "layers.0." if i == 0 else f"layers.{i}.module."  # layers 1-3 sit in utils.L1
        sd[p + "poly_weights"] = torch.randn(1, c, c_in * (degree + 1), 3, 3, generator=g) * 0.2
        sd[p + "beta_weights"] = torch.randn(degree + 1, generator=g) * 0.1
        sd[p + "base_conv.0.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * 0.2
        n = p + "layer_norm.0."
        sd.update({n + "weight": 1 + 0.1 * torch.randn(c, generator=g), n + "bias": 0.1 * torch.randn(c, generator=g),
                   n + "running_mean": 0.1 * torch.randn(c, generator=g),
                   n + "running_var": 1 + torch.rand(c, generator=g), n + "num_batches_tracked": torch.tensor(7)})
        c_in = c
    sd.update(_random_gram_state("output.layers.0.", sizes[-1], classes, degree, g))
    x = torch.randn(8, 1, 12, 12, generator=g)
    y = x
    for i, stride in enumerate([1, 2, 2, 1]):
        y = _kagn_conv(sd, "layers.0." if i == 0 else f"layers.{i}.module.", y, stride, 1, "batch")
    y = _gram_layer(sd, "output.layers.0.", y.mean(dim=(2, 3)))
    model = import_model(sd, "torch-conv-kan", {"layer_sizes": sizes, "num_classes": classes, "degree": degree},
                         "SimpleConvKAGN", input_shape=(1, 12, 12))
    assert check_outputs(model, x, y) <= 1e-5
    with pytest.raises(UserError, match="groups=2"):
        import_model(sd, "torch-conv-kan", {"groups": 2}, "SimpleConvKAGN")


def test_pykan_selected_inputs_and_a_linear_kagn_head_are_refused(pykan_dir):
    model = pykan.KAN(width=[3, 2, 1], grid=3, k=3, seed=0, auto_save=False)
    model.input_id = torch.tensor([2, 0, 1])  # what prune_input leaves: the model reads its inputs reordered
    with pytest.raises(UserError, match="input_id"):
        import_model(model)
    with pytest.raises(UserError, match="degree_out < 2"):
        import_model({}, "torch-conv-kan", {"degree_out": 1}, "SimpleConvKAGN")
