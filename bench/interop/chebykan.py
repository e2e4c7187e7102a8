"""ChebyKAN (SynodicMonth/ChebyKAN): a ``ChebyKANLayer``, or an ``nn.Sequential`` of them with optional
``nn.LayerNorm`` between (the README's MNIST pattern).

``ChebyKANLayer``: ``y_o = sum_{i,d} cheby_coeffs[i, o, d] cos(d acos(tanh x_i))``: no base branch, no
bias. Mapping: ``W[o, i, :D+1] = cheby_coeffs[i, o]``, base weight 0, no bias; basis
``chebyshev(degree=D, margin=0)`` (the default margin of 1e-4 would move the output by about
``d^2 1e-4`` where ``|x| > 5``). A ``LayerNorm`` after a layer is that layer's ``norms="layer"``: it
normalises the whole input of the next layer, exactly as in the ``Sequential``.

``constructor`` is ``{"sequential": [{"class": "ChebyKANLayer", "input_dim": ..., "output_dim": ...,
"degree": ...}, {"class": "torch.nn.LayerNorm", "normalized_shape": ...}, ...]}`` (the modules in
order) for a ``Sequential``, or the layer's own arguments for ``ChebyKANLayer``.

Refused: a ``LayerNorm`` first or two in a row, a ``LayerNorm`` with non-default ``eps`` or without
affine, any other module.
"""

from __future__ import annotations

from bench.model.kan import KAN

from .common import Refused, StateReader, build, copy_into, set_edges

LIBRARY = "ChebyKAN"
MAIN_CLASS = "Sequential"
MODULE_PREFIX = "ChebyKANLayer"


def _layer(r: StateReader, prefix: str):
    coef = r.get(prefix + "cheby_coeffs")
    inp, out, d1 = coef.shape
    r.ignore(prefix + "arange")
    edges = coef.new_zeros(out, inp, d1 + 1)
    edges[..., :d1] = coef.permute(1, 0, 2)
    return inp, out, d1 - 1, edges


def _model(r: StateReader, entries: list[tuple[str, str, dict]], what: str):
    """``entries``: (kind, state prefix, arguments) in order, kind ``cheby`` or ``norm``."""
    layers, norms = [], []
    for kind, prefix, args in entries:
        if kind == "cheby":
            layers.append(_layer(r, prefix))
            norms.append(None)
            for key, idx in (("input_dim", 0), ("output_dim", 1), ("degree", 2)):
                if key in args and int(args[key]) != layers[-1][idx]:
                    raise Refused(f"state_dict does not fit {what}: {prefix or 'layer'} {key}={args[key]} but the "
                                  f"tensors say {layers[-1][idx]}")
            continue
        if not layers or norms[-1] is not None:
            raise Refused(f"{what}: a LayerNorm {'first' if not layers else 'after another'} has no exact mapping "
                          "(a LayerNorm imports as the norm after a ChebyKANLayer)")
        if float(args.get("eps", 1e-5)) != 1e-5 or not args.get("elementwise_affine", True) \
                or args.get("bias", True) is False:
            raise Refused(f"{what}: LayerNorm options {args} have no exact mapping (defaults only)")
        n = layers[-1][1]
        norms[-1] = (r.get(prefix + "weight", (n,)), r.get(prefix + "bias", (n,)))
    for (_, out, *_), (inp, *_) in zip(layers[:-1], layers[1:]):
        if out != inp:
            raise Refused(f"state_dict does not fit {what}: a layer of {out} outputs feeds one of {inp} inputs")
    r.done()
    widths = [layers[0][0]] + [lay[1] for lay in layers]
    kwargs = [{"degree": d, "margin": 0.0} for _, _, d, _ in layers]
    model = build(lambda: KAN(widths, "chebyshev", kwargs, bias=False,
                              norms=["none" if nm is None else "layer" for nm in norms]))
    for layer, (_, _, _, edges), nm in zip(model.layers, layers, norms):
        set_edges(layer, edges)
        if nm is not None:
            copy_into(layer.norm, "weight", nm[0])
            copy_into(layer.norm, "bias", nm[1])
    return model


def import_sequential(state, constructor):
    modules = constructor.get("sequential")
    if not isinstance(modules, list) or not modules:
        raise Refused("ChebyKAN Sequential: constructor needs 'sequential', the list of modules in order "
                      '(e.g. [{"class": "ChebyKANLayer", "input_dim": 6, "output_dim": 5, "degree": 4}, ...])')
    what = "ChebyKAN Sequential(" + ", ".join(str(m.get("class", "?")).rsplit(".", 1)[-1] for m in modules) + ")"
    entries = []
    for i, m in enumerate(modules):
        cls = str(m.get("class", "")).rsplit(".", 1)[-1]
        args = {k: v for k, v in m.items() if k != "class"}
        if cls == "ChebyKANLayer":
            entries.append(("cheby", f"{i}.", args))
        elif cls == "LayerNorm":
            entries.append(("norm", f"{i}.", args))
        else:
            raise Refused(f"{what}: module {i} ({cls or '?'}) has no exact mapping (ChebyKANLayer and LayerNorm "
                          "import)")
    return _model(StateReader(state, what), entries, what)


def import_layer(state, constructor):
    what = f"ChebyKAN ChebyKANLayer({constructor or ''})"
    return _model(StateReader(state, what), [("cheby", "", dict(constructor or {}))], what)


CLASSES = {"Sequential": import_sequential, "ChebyKANLayer": import_layer}


def describe_live(module) -> dict:
    if type(module).__name__ == "ChebyKANLayer":
        return {"input_dim": module.inputdim, "output_dim": module.outdim, "degree": module.degree}
    seq = []
    for m in module:
        name = type(m).__name__
        if name == "ChebyKANLayer":
            seq.append({"class": name, "input_dim": m.inputdim, "output_dim": m.outdim, "degree": m.degree})
        elif name == "LayerNorm":
            seq.append({"class": "torch.nn.LayerNorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps,
                        "elementwise_affine": m.elementwise_affine})
        else:
            seq.append({"class": f"{type(m).__module__}.{name}"})
    return {"sequential": seq}
