"""FastKAN (ZiyaoLi/fast-kan): ``FastKAN`` and ``FastKANLayer``.

Per layer, ``y = spline_linear(exp(-((LN(x) - c_k) / d)^2)) + base_linear(silu(x))`` with centres
``c = linspace(grid_min, grid_max, G)`` (``rbf.grid``, a frozen parameter) and ``d = (grid_max -
grid_min) / (G - 1)``; ``FastKAN`` always has the LayerNorm.

Mapping (exact): ``W[o, i, :G] = spline_linear.weight.view(out, in, G)[o, i]``, ``W[o, i, G] =
base_linear.weight[o, i]``, bias ``base_linear.bias``; basis ``rbf(centers=G, lo, hi, norm=True)``
with the LayerNorm's weight and bias (``norm`` forced on: ``"auto"`` would drop it below 4 inputs).
Without ``use_base_update`` the base weights are 0 and there is no bias.
"""

from __future__ import annotations

import torch

from bench.model.kan import KAN

from .common import Refused, StateReader, build, copy_into, option, set_edges, silu_only

LIBRARY = "fast-kan"
MAIN_CLASS = "FastKAN"
MODULE_PREFIX = "fastkan"


def _layer(r: StateReader, prefix: str, lo: float, hi: float, use_norm: bool, base: bool):
    grid = r.get(f"{prefix}rbf.grid")
    g = grid.shape[0]
    ref = torch.linspace(lo, hi, g, dtype=torch.float32).double()
    if g < 2 or (grid - ref).abs().max() > 1e-6 * (hi - lo):
        raise Refused(f"{r.what}: {prefix}rbf.grid is not linspace({lo}, {hi}, {g}) (set grid_min / grid_max in "
                      "the constructor to the values the model was built with)")
    spline = r.get(f"{prefix}spline_linear.weight")
    out = spline.shape[0]
    if spline.shape[1] % g:
        raise Refused(f"state_dict does not fit {r.what}: {prefix}spline_linear.weight is {list(spline.shape)} "
                      f"for {g} centres")
    inp = spline.shape[1] // g
    edges = spline.new_zeros(out, inp, g + 1)
    edges[..., :g] = spline.reshape(out, inp, g)
    bias = None
    if base:
        edges[..., g] = r.get(f"{prefix}base_linear.weight", (out, inp))
        bias = r.get(f"{prefix}base_linear.bias", (out,))
    norm = (r.get(f"{prefix}layernorm.weight", (inp,)), r.get(f"{prefix}layernorm.bias", (inp,))) if use_norm else None
    return inp, out, g, edges, bias, norm


def _model(r: StateReader, prefixes: list[str], constructor: dict, what: str, use_norm: bool):
    lo = float(option(constructor, "grid_min", -2.0, what))
    hi = float(option(constructor, "grid_max", 2.0, what))
    base = bool(option(constructor, "use_base_update", True, what))
    if base:
        silu_only(constructor, "base_activation", what)
    layers = [_layer(r, p, lo, hi, use_norm, base) for p in prefixes]
    widths = [layers[0][0]] + [lay[1] for lay in layers]
    if "layers_hidden" in constructor and [int(w) for w in constructor["layers_hidden"]] != widths:
        raise Refused(f"state_dict does not fit {what}: layers_hidden={constructor['layers_hidden']} but the "
                      f"tensors say {widths}")
    if "num_grids" in constructor and any(lay[2] != int(constructor["num_grids"]) for lay in layers):
        raise Refused(f"state_dict does not fit {what}: num_grids={constructor['num_grids']}")
    r.done()
    kwargs = [{"centers": g, "lo": lo, "hi": hi, "norm": use_norm} for _, _, g, *_ in layers]
    model = build(lambda: KAN(widths, "rbf", kwargs, bias=base))
    for layer, (_, _, _, edges, bias, norm) in zip(model.layers, layers):
        set_edges(layer, edges, bias)
        if norm is not None:
            copy_into(layer.basis.norm, "weight", norm[0])
            copy_into(layer.basis.norm, "bias", norm[1])
    return model


def import_fastkan(state, constructor):
    what = f"fast-kan FastKAN({constructor or ''})"
    r = StateReader(state, what)
    return _model(r, r.numbered("layers."), constructor, what, use_norm=True)


def import_fastkan_layer(state, constructor):
    what = f"fast-kan FastKANLayer({constructor or ''})"
    use_norm = bool(option(constructor, "use_layernorm", True, what))
    return _model(StateReader(state, what), [""], constructor, what, use_norm)


CLASSES = {"FastKAN": import_fastkan, "FastKANLayer": import_fastkan_layer}


def describe_live(module) -> dict:
    layers = list(module.layers) if hasattr(module, "layers") else [module]
    first = layers[0]
    cfg = {"grid_min": first.rbf.grid_min, "grid_max": first.rbf.grid_max, "num_grids": first.rbf.num_grids,
           "use_base_update": first.use_base_update}
    if first.use_base_update:
        cfg["base_activation"] = getattr(first.base_activation, "__name__", type(first.base_activation).__name__)
    if not hasattr(module, "layers"):
        cfg["use_layernorm"] = first.layernorm is not None
    return cfg
