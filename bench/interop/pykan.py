"""pykan 0.2.8 (KindXiaoming/pykan): ``KAN`` = ``MultKAN``, from a state_dict or ``saveckpt`` files.

Per layer ``l``, ``x_o = node_scale_o (subnode_scale_o sum_i mask_io (scale_base_io silu(x_i) +
scale_sp_io sum_k coef_iok B_k(x_i; grid_i)) + subnode_bias_o) + node_bias_o``, with ``B`` the
order-``k`` B-splines on each input's own knot row (``act_fun.l.grid [in, G + 2k + 1]``: ``fit()``
updates it from the samples, so fitted models have per-input, non-uniform knots), no clamp, 0/0 as 0.

Mapping, with ``a_o = subnode_scale_o node_scale_o`` (folded in float64):
``W[o, i, :G+k] = a_o mask_io scale_sp_io coef_io``, ``W[o, i, G+k] = a_o mask_io scale_base_io``,
``bias_o = node_scale_o subnode_bias_o + node_bias_o``; basis ``bspline(extrapolate=True,
knots="per_input")`` with the knots copied, one basis config per layer (``grid`` and ``k`` may be
lists). ``base_fun='zero'`` gives base weights of 0.

Refused (no exact mapping): multiplication nodes, a symbolic function in use (a non-zero
``symbolic_fun.l.mask``), ``base_fun='identity'`` or any other base function, selected inputs
(``input_id`` after ``prune_input``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.model.kan import KAN

from .common import Refused, StateReader, build, copy_into, set_edges

LIBRARY = "pykan"
MAIN_CLASS = "KAN"
MODULE_PREFIX = "kan"


def _width(entry) -> tuple[int, int]:
    return (int(entry[0]), int(entry[1])) if isinstance(entry, (list, tuple)) else (int(entry), 0)


def import_kan(state, constructor):
    what = f"pykan KAN({', '.join(f'{k}={v}' for k, v in (constructor or {}).items())})"
    r = StateReader(state, what)
    base_fun = constructor.get("base_fun", constructor.get("base_fun_name", "silu"))
    if base_fun not in ("silu", "zero"):
        raise Refused(f"{what}: base_fun={base_fun!r} has no exact mapping (the project's base branch is SiLU; "
                      "'silu' and 'zero' import)")
    if "width" in constructor:
        mult = [w for w in (_width(e) for e in constructor["width"]) if w[1]]
        if mult:
            raise Refused(f"{what}: multiplication nodes have no exact mapping (a node is a product, not a sum of "
                          "edges)")
    depth = len(r.numbered("act_fun."))
    layers = []
    for li in range(depth):
        p = f"act_fun.{li}."
        coef = r.get(p + "coef")
        inp, out, n = coef.shape
        grid = r.get(p + "grid")
        order = grid.shape[1] - n - 1
        if grid.shape[0] != inp or order < 0 or n - order < 1:
            raise Refused(f"state_dict does not fit {what}: {p}grid is {list(grid.shape)} for coef {list(coef.shape)}")
        mask = r.get(p + "mask", (inp, out))
        sp, sb = r.get(p + "scale_sp", (inp, out)), r.get(p + "scale_base", (inp, out))
        if r.has(f"symbolic_fun.{li}.mask"):
            if r.get(f"symbolic_fun.{li}.mask", (out, inp)).abs().max() > 0:
                raise Refused(f"{what}: layer {li} uses symbolic functions (symbolic_fun.{li}.mask is not 0); only "
                              "the spline branch has an exact mapping")
            r.ignore(f"symbolic_fun.{li}.affine")
        a = r.get(f"subnode_scale_{li}", (out,)) * r.get(f"node_scale_{li}", (out,))
        bias = r.get(f"node_scale_{li}") * r.get(f"subnode_bias_{li}", (out,)) + r.get(f"node_bias_{li}", (out,))
        fold = (mask * a.unsqueeze(0)).t()  # [out, in]
        edges = coef.new_zeros(out, inp, n + 1)
        edges[..., :n] = (fold * sp.t()).unsqueeze(-1) * coef.permute(1, 0, 2)
        if base_fun == "silu":
            edges[..., n] = fold * sb.t()
        layers.append((inp, out, n - order, order, grid, edges, bias))
    for (_, out, *_), (inp, *_) in zip(layers[:-1], layers[1:]):
        if out != inp:
            raise Refused(f"state_dict does not fit {what}: a layer of {out} outputs feeds one of {inp} inputs")
    widths = [layers[0][0]] + [lay[1] for lay in layers]
    if "width" in constructor and [_width(e)[0] for e in constructor["width"]] != widths:
        raise Refused(f"state_dict does not fit {what}: width={constructor['width']} but the tensors say {widths}")
    for key, idx in (("grid", 2), ("k", 3)):
        want = constructor.get(key)
        if want is not None:
            want = [int(v) for v in want] if isinstance(want, (list, tuple)) else [int(want)] * depth
            if want != [lay[idx] for lay in layers]:
                raise Refused(f"state_dict does not fit {what}: {key}={constructor[key]} but the tensors say "
                              f"{[lay[idx] for lay in layers]}")
    r.done()
    lo, hi = (float(v) for v in constructor.get("grid_range", [-1, 1]))
    kwargs = [{"grid": g, "order": k, "lo": lo, "hi": hi, "extrapolate": True, "knots": "per_input"}
              for _, _, g, k, *_ in layers]
    model = build(lambda: KAN(widths, "bspline", kwargs))
    for layer, (_, _, _, _, knots, edges, bias) in zip(model.layers, layers):
        copy_into(layer.basis, "knots", knots)
        set_edges(layer, edges, bias)
    return model


CLASSES = {"KAN": import_kan, "MultKAN": import_kan}


def describe_live(module) -> dict:
    input_id = getattr(module, "input_id", None)
    if input_id is not None and not torch.equal(input_id.long().cpu(), torch.arange(len(input_id))):
        raise Refused("pykan KAN: its inputs were selected (input_id after prune_input); that has no exact mapping")
    return {"width": [list(w) for w in module.width], "grid": module.grid, "k": module.k,
            "base_fun": module.base_fun_name}


def read_saveckpt(prefix: str | Path) -> tuple[dict, dict]:
    """``(state_dict, constructor)`` from the files ``model.saveckpt(prefix)`` writes
    (``PREFIX_config.yml`` and ``PREFIX_state``)."""
    prefix = str(prefix)
    config, state = Path(prefix + "_config.yml"), Path(prefix + "_state")
    if not config.is_file() or not state.is_file():
        raise Refused(f"pykan checkpoint {prefix!r}: expected {config.name} and {state.name} beside it "
                      "(the files model.saveckpt(path) writes)")
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml comes with the interop extra
        raise Refused("reading pykan's saveckpt files needs pyyaml (pip install -e '.[interop]')") from None
    cfg = yaml.safe_load(config.read_text())
    funs = [v for k, v in cfg.items() if k.startswith("symbolic.funs_name.")]
    used = sorted({f for layer in funs for row in layer for f in row if f != "0"})
    if used:
        raise Refused(f"pykan checkpoint {prefix!r} uses symbolic functions {used[:3]}; only the spline branch has an "
                      "exact mapping")
    constructor = {k: cfg[k] for k in ("width", "grid", "k", "grid_range") if k in cfg}
    constructor["base_fun"] = cfg.get("base_fun_name", "silu")
    return torch.load(state, map_location="cpu", weights_only=True), constructor
