"""efficient-kan (Blealtan/efficient-kan): ``KAN`` and ``KANLinear``.

Per layer, ``y = linear(silu(x), base_weight) + linear(B(x), spline_weight * spline_scaler)`` with
``B`` the order-``k`` B-splines on the layer's own knot rows (``grid [in, G + 2k + 1]``, a persistent
buffer that ``update_grid`` makes non-uniform), evaluated with no clamp. No bias, no norm.

Mapping: ``W[o, i, :G+k] = spline_weight[o, i] * spline_scaler[o, i]`` (folded in float64),
``W[o, i, G+k] = base_weight[o, i]``; basis ``bspline(order=k, grid=G, extrapolate=True,
knots="per_input")`` with the knots copied, so a grid update is imported as it is; no bias.
"""

from __future__ import annotations

from bench.model.kan import KAN

from .common import Refused, StateReader, build, copy_into, option, set_edges, silu_only

LIBRARY = "efficient-kan"
MAIN_CLASS = "KAN"
MODULE_PREFIX = "efficient_kan"


def _layer(r: StateReader, prefix: str, scaled: bool):
    base = r.get(f"{prefix}base_weight")
    out, inp = base.shape
    spline = r.get(f"{prefix}spline_weight")
    if spline.shape[:2] != (out, inp):
        raise Refused(f"state_dict does not fit {r.what}: {prefix}spline_weight is {list(spline.shape)}, "
                      f"base_weight {list(base.shape)}")
    grid = r.get(f"{prefix}grid")
    n = spline.shape[2]
    order = grid.shape[-1] - n - 1
    if grid.shape[0] != inp or order < 0 or n - order < 1:
        raise Refused(f"state_dict does not fit {r.what}: {prefix}grid is {list(grid.shape)} for "
                      f"{inp} inputs and {n} spline coefficients")
    if scaled:
        spline = spline * r.get(f"{prefix}spline_scaler", (out, inp)).unsqueeze(-1)
    edges = spline.new_zeros(out, inp, n + 1)
    edges[..., :n], edges[..., n] = spline, base
    return inp, out, n - order, order, grid, edges


def _model(r: StateReader, prefixes: list[str], constructor: dict, what: str):
    silu_only(constructor, "base_activation", what)
    scaled = bool(option(constructor, "enable_standalone_scale_spline", True, what))
    lo, hi = (float(v) for v in option(constructor, "grid_range", [-1, 1], what))
    layers = [_layer(r, p, scaled) for p in prefixes]
    for (_, out, *_), (inp, *_) in zip(layers[:-1], layers[1:]):
        if out != inp:
            raise Refused(f"state_dict does not fit {what}: a layer of {out} outputs feeds one of {inp} inputs")
    for key, idx in (("grid_size", 2), ("spline_order", 3)):
        if key in constructor and any(int(constructor[key]) != lay[idx] for lay in layers):
            raise Refused(f"state_dict does not fit {what}: {key}={constructor[key]} but the tensors say "
                          f"{[lay[idx] for lay in layers]}")
    widths = [layers[0][0]] + [lay[1] for lay in layers]
    if "layers_hidden" in constructor and [int(w) for w in constructor["layers_hidden"]] != widths:
        raise Refused(f"state_dict does not fit {what}: layers_hidden={constructor['layers_hidden']} but the "
                      f"tensors say {widths}")
    r.done()
    kwargs = [{"grid": g, "order": k, "lo": lo, "hi": hi, "extrapolate": True, "knots": "per_input"}
              for _, _, g, k, _, _ in layers]
    model = build(lambda: KAN(widths, "bspline", kwargs, bias=False))
    for layer, (_, _, _, _, knots, edges) in zip(model.layers, layers):
        copy_into(layer.basis, "knots", knots)
        set_edges(layer, edges)
    return model


def import_kan(state, constructor):
    what = f"efficient-kan KAN({constructor or ''})"
    r = StateReader(state, what)
    return _model(r, r.numbered("layers."), constructor, what)


def import_kanlinear(state, constructor):
    what = f"efficient-kan KANLinear({constructor or ''})"
    return _model(StateReader(state, what), [""], constructor, what)


CLASSES = {"KAN": import_kan, "KANLinear": import_kanlinear}


def describe_live(module) -> dict:
    """The constructor arguments a live module was built with, as far as the import needs them."""
    layers = list(module.layers) if hasattr(module, "layers") else [module]
    first = layers[0]
    act = first.base_activation
    return {"grid_size": first.grid_size, "spline_order": first.spline_order,
            "enable_standalone_scale_spline": first.enable_standalone_scale_spline,
            "base_activation": type(act).__name__ if not isinstance(act, type) else act.__name__}
