"""torch-conv-kan (IvanDrokin/torch-conv-kan) KAGN models: ``KAGNConv2DLayer``, the fully connected
``KAGN`` (a stack of ``GRAMLayer``) and the baseline ``SimpleConvKAGN``.

KAGN's basis is ``silu(P_d(tanh x))`` with learned recurrence coefficients (the project's ``kagn``
basis); every layer ends in a norm and SiLU.

- ``KAGNConv2DLayer``: ``silu(norm(conv2d(F, poly_weights[0], padding) + base_conv(silu(x))))`` where
  ``F`` stacks the basis degree-major (channel ``d C + c``) and is zero-padded *as features*.
  Mapping: ``W[o, c K^2 + r K + s, d] = poly_weights[0, o, d C + c, r, s]``, ``W[o, (c, r, s), D + 1] =
  base_conv.0.weight[o, c, r, s]``, no bias; a ``convkan`` with ``pad="features"``, ``act="silu"``,
  the norm (``InstanceNorm2d`` without affine: ``instance_noaffine``; ``BatchNorm2d``: ``batch``) and
  ``head=False``.
- ``GRAMLayer`` (in ``KAGN``): ``silu(LN(sum_{i,d} gw[i, o, d] silu(P_d(tanh x_i)) + base_weights x))``.
  Mapping: ``W[o, i, :D+1] = grams_basis_weights[i, o]``, ``W[o, i, D+1] = base_weights[o, i]``, no
  bias, ``norms="layer"``, ``acts="silu"`` on every layer (the last one included, as the library does).
- ``SimpleConvKAGN``: four KAGN convolutions (kernel 3, padding 1, strides 1, 2, 2, 1, BatchNorm2d),
  global average pooling, a ``KAGN`` head of degree ``degree_out``: a ``convkan`` with those options
  and the head as a ``GRAMLayer``.

Refused: ``groups > 1``, ``dilation != 1``, a non-square kernel, norms other than those two (or with
non-default options), ``degree_out < 2`` (an ``nn.Linear`` head), ``l1``/dropout only matter in training
and are ignored.
"""

from __future__ import annotations

from bench.model.kan import KAN, ConvKAN

from .common import Refused, StateReader, build, copy_into, option, set_edges, silu_only

LIBRARY = "torch-conv-kan"
MAIN_CLASS = "SimpleConvKAGN"
MODULE_PREFIX = ("kan_convs", "kans", "models")

_NORMS = {"InstanceNorm2d": "instance_noaffine", "BatchNorm2d": "batch"}


def _norm_kind(constructor: dict, what: str, default: str) -> str:
    name = str(constructor.get("norm_layer", default)).rsplit(".", 1)[-1]
    affine = constructor.get("affine")
    if name not in _NORMS:
        raise Refused(f"{what}: norm_layer={name!r} has no exact mapping (supported: InstanceNorm2d, BatchNorm2d)")
    extra = sorted(set(constructor) & {"eps", "momentum", "track_running_stats"})
    if extra:
        raise Refused(f"{what}: norm options {extra} have no exact mapping (defaults only)")
    kind = _NORMS[name]
    if kind == "instance_noaffine" and affine:
        kind = "instance"
    if kind == "batch" and affine is False:
        raise Refused(f"{what}: BatchNorm2d(affine=False) has no exact mapping")
    return kind


def _conv(r: StateReader, prefix: str, what: str):
    """(in, out, kernel, degree, edges, beta) of one KAGN convolution."""
    poly = r.get(prefix + "poly_weights")
    if poly.dim() != 5:
        raise Refused(f"{what}: {prefix}poly_weights is {list(poly.shape)}; only 2-D convolutions import")
    groups, out, cd, k, k2 = poly.shape
    if groups != 1:
        raise Refused(f"{what}: groups={groups} has no exact mapping (groups=1 only)")
    if k != k2:
        raise Refused(f"{what}: a {k}x{k2} kernel has no exact mapping (square kernels only)")
    base = r.get(prefix + "base_conv.0.weight")
    c = base.shape[1]
    if cd % c or base.shape != (out, c, k, k):
        raise Refused(f"state_dict does not fit {what}: {prefix}poly_weights {list(poly.shape)} and base_conv "
                      f"{list(base.shape)}")
    d1 = cd // c  # degree + 1
    beta = r.get(prefix + "beta_weights", (d1,))
    p = poly[0].reshape(out, d1, c, k, k)  # channel d C + c
    edges = poly.new_zeros(out, c, k, k, d1 + 1)
    edges[..., :d1] = p.permute(0, 2, 3, 4, 1)
    edges[..., d1] = base
    return c, out, k, d1 - 1, edges.reshape(out, c * k * k, d1 + 1), beta


def _norm_state(r: StateReader, prefix: str, kind: str, channels: int) -> dict:
    if kind == "instance_noaffine":
        return {}
    names = ("weight", "bias") + (("running_mean", "running_var") if kind == "batch" else ())
    state = {n: r.get(f"{prefix}layer_norm.0.{n}", (channels,)) for n in names}
    r.ignore(f"{prefix}layer_norm.0.num_batches_tracked")
    return state


def _check_conv_options(constructor: dict, what: str) -> None:
    if int(constructor.get("groups", 1)) != 1:
        raise Refused(f"{what}: groups={constructor['groups']} has no exact mapping (groups=1 only)")
    if int(constructor.get("dilation", 1)) != 1:
        raise Refused(f"{what}: dilation={constructor['dilation']} has no exact mapping (dilation=1 only)")


def import_conv_layer(state, constructor, input_shape=None):
    what = f"torch-conv-kan KAGNConv2DLayer({', '.join(f'{k}={v}' for k, v in (constructor or {}).items())})"
    _check_conv_options(constructor, what)
    kind = _norm_kind(constructor, what, "InstanceNorm2d")
    r = StateReader(state, what)
    c, out, k, degree, edges, beta = _conv(r, "", what)
    for key, want in (("input_dim", c), ("output_dim", out), ("kernel_size", k), ("degree", degree)):
        if key in constructor and int(constructor[key]) != want:
            raise Refused(f"state_dict does not fit {what}: {key}={constructor[key]} but the tensors say {want}")
    norm = _norm_state(r, "", kind, out)
    r.done()
    shape = tuple(input_shape) if input_shape else (c, 32, 32)
    model = build(lambda: ConvKAN(shape, out, [out], kernel=k, pool_every=0, basis="kagn",
                                  basis_kwargs={"degree": degree}, strides=[int(constructor.get("stride", 1))],
                                  norm=kind, act="silu", pad="features", bias=False, head=False,
                                  padding=int(constructor.get("padding", 0))))
    conv = model.features[0]
    set_edges(conv.kan, edges)
    copy_into(conv.kan.basis, "beta", beta)
    for n, v in norm.items():
        copy_into(model.features[1], n, v)
    return model


def _gram(r: StateReader, prefix: str, what: str):
    gw = r.get(prefix + "grams_basis_weights")
    inp, out, d1 = gw.shape
    edges = gw.new_zeros(out, inp, d1 + 1)
    edges[..., :d1] = gw.permute(1, 0, 2)
    edges[..., d1] = r.get(prefix + "base_weights", (out, inp))
    norm = (r.get(prefix + "norm.weight", (out,)), r.get(prefix + "norm.bias", (out,)))
    return inp, out, d1 - 1, edges, r.get(prefix + "beta_weights", (d1,)), norm


def _gram_prefixes(r: StateReader, root: str) -> list[str]:
    ids = sorted({int(k[len(root):].split(".")[0]) for k in r.keys_under(root) if k.endswith("grams_basis_weights")})
    prefixes = []
    for i in ids:  # a GRAMLayer may sit inside utils.L1 (``.module.``)
        wrapped = f"{root}{i}.module."
        prefixes.append(wrapped if r.has(wrapped + "grams_basis_weights") else f"{root}{i}.")
    return prefixes


def _fill_gram(layer, beta, edges, norm) -> None:
    set_edges(layer, edges)
    copy_into(layer.basis, "beta", beta)
    copy_into(layer.norm, "weight", norm[0])
    copy_into(layer.norm, "bias", norm[1])


def import_kagn(state, constructor, input_shape=None):
    what = f"torch-conv-kan KAGN({', '.join(f'{k}={v}' for k, v in (constructor or {}).items())})"
    silu_only(constructor, "base_activation", what)
    r = StateReader(state, what)
    layers = [_gram(r, p, what) for p in _gram_prefixes(r, "layers.")]
    if not layers:
        raise Refused(f"state_dict does not fit {what}: no layers.N.grams_basis_weights")
    widths = [layers[0][0]] + [lay[1] for lay in layers]
    if "layers_hidden" in constructor and [int(w) for w in constructor["layers_hidden"]] != widths:
        raise Refused(f"state_dict does not fit {what}: layers_hidden={constructor['layers_hidden']} but the "
                      f"tensors say {widths}")
    r.done()
    kwargs = [{"degree": d} for _, _, d, *_ in layers]
    model = build(lambda: KAN(widths, "kagn", kwargs, bias=False, norms="layer", acts="silu"))
    for layer, (_, _, _, edges, beta, norm) in zip(model.layers, layers):
        _fill_gram(layer, beta, edges, norm)
    return model


def import_simple_conv_kagn(state, constructor, input_shape=None):
    what = f"torch-conv-kan SimpleConvKAGN({', '.join(f'{k}={v}' for k, v in (constructor or {}).items())})"
    if int(constructor.get("groups", 1)) != 1:
        raise Refused(f"{what}: groups={constructor['groups']} has no exact mapping (groups=1 only)")
    if int(option(constructor, "degree_out", 3, what)) < 2:
        raise Refused(f"{what}: degree_out < 2 (an nn.Linear head) has no exact mapping")
    kind = _norm_kind(constructor, what, "BatchNorm2d")
    r = StateReader(state, what)
    convs, norms = [], []
    for i in range(4):
        prefix = f"layers.{i}." if i == 0 else f"layers.{i}.module."
        if i and not r.has(prefix + "poly_weights"):
            prefix = f"layers.{i}."
        convs.append(_conv(r, prefix, what))
        norms.append(_norm_state(r, prefix, kind, convs[-1][1]))
    heads = _gram_prefixes(r, "output.layers.")
    if len(heads) != 1:
        raise Refused(f"state_dict does not fit {what}: expected one KAGN head layer under output.layers.")
    head = _gram(r, heads[0], what)
    r.done()
    channels = [c[1] for c in convs]
    degrees = {c[3] for c in convs}
    if len(degrees) != 1:
        raise Refused(f"state_dict does not fit {what}: the convolutions have degrees {sorted(degrees)}")
    shape = tuple(input_shape) if input_shape else (convs[0][0], 32, 32)
    model = build(lambda: ConvKAN(shape, head[1], channels, kernel=3, pool_every=0, basis="kagn",
                                  basis_kwargs={"degree": degrees.pop()}, strides=[1, 2, 2, 1], norm=kind, act="silu",
                                  pad="features", bias=False, padding=1, head_basis_kwargs={"degree": head[2]},
                                  head_bias=False,
                                  head_norm="layer", head_act="silu"))
    blocks = [m for m in model.features]
    per_conv = len(blocks) // 4
    for j, ((_, _, _, _, edges, beta), norm) in enumerate(zip(convs, norms)):
        conv, nm = blocks[j * per_conv], blocks[j * per_conv + 1]
        set_edges(conv.kan, edges)
        copy_into(conv.kan.basis, "beta", beta)
        for n, v in norm.items():
            copy_into(nm, n, v)
    _, _, _, edges, beta, norm = head
    _fill_gram(model.head, beta, edges, norm)
    return model


CLASSES = {"SimpleConvKAGN": import_simple_conv_kagn, "KAGNConv2DLayer": import_conv_layer, "KAGN": import_kagn}
TAKES_INPUT_SHAPE = {"SimpleConvKAGN", "KAGNConv2DLayer"}


def describe_live(module) -> dict:
    name = type(module).__name__
    if name == "KAGNConv2DLayer":
        norm = module.layer_norm[0]
        cfg = {"input_dim": module.inputdim, "output_dim": module.outdim, "kernel_size": module.kernel_size,
               "degree": module.degree, "groups": module.groups, "padding": module.padding, "stride": module.stride,
               "dilation": module.dilation, "norm_layer": type(norm).__name__}
        if getattr(norm, "affine", False):
            cfg["affine"] = True
        return cfg
    if name == "SimpleConvKAGN":
        first = module.layers[0]
        norm = first.layer_norm[0]
        return {"norm_layer": type(norm).__name__, "affine": bool(getattr(norm, "affine", False)),
                "groups": max(getattr(getattr(m, "module", m), "groups", 1) for m in list(module.layers)[:4])}
    return {}
