"""Scalar quantisation of KAN edge tensors: integer codes plus counted scales.

An edge tensor ``w [out, in, n+1]`` is split into groups that share one scale:

- ``layer``: one scale for the whole layer (group shape ``[1, 1, 1]``);
- ``node``: one scale per output node (``[out, 1, 1]``, the default);
- ``edge``: one scale per edge vector (``[out, in, 1]``).

Symmetric: ``w ~ s * q`` with ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` stored as ``int<b>``.
Asymmetric: ``w ~ s * (q - z)`` with ``q, z`` in ``[0, 2^b - 1]``, both stored as ``uint<b>``
(the zero points are counted). Scales are stored as float32 or float16 and the codes are
computed against the scale *as stored*, so the deployed model is exactly what was evaluated.

Storage per layer (``N = out * in * (n + 1)`` values, ``G`` groups, scale width ``S``):
``N * b + G * S + 4`` bits, plus ``G * b`` for zero points when asymmetric; the ``4`` is the
layer's width itself (a ``uint4``), which a deployed decoder needs and mixed precision varies. A per-edge float32
scale is 32 bits for every ``n + 1 = 9`` values, i.e. about 3.6 extra bits per value: 4-bit
codes with per-edge float32 scales cost about as much as 8-bit codes with per-node scales.

:class:`QuantSource` is the deployed form (integers + scales; loads from an exported file).
:class:`FakeQuantSource` is the training form for STE QAT: a float weight whose forward is the
quantise-dequantise of itself with a straight-through estimator (gradient 1); ``freeze()``
gives the :class:`QuantSource` with exactly the same forward. :class:`LSQSource` is the training
form for LSQ (Esser et al., ICLR 2020): the step sizes are parameters too, trained with LSQ's
gradient scale ``1 / sqrt(values per group * qmax)``.

Branch-aware quantisation (QuantKAN, arXiv 2511.18689): :class:`BranchSource` holds the basis
coefficients ``[out, in, n]`` and the base-branch weight ``[out, in, 1]`` in two sources, each
with its own scales and width. :class:`LayerGrid` is the integer grid of one layer (a format and
calibrated scales per branch); post-training algorithms (round to nearest here, GPTQ and
AdaRound in :mod:`bench.compression.ptq`) choose the codes on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.model.sources import SOURCES, EdgeSource, StorageItem, float_item, register_source

GRANULARITIES = ("layer", "node", "edge")
WIDTH_BITS = 4  # each quantised branch stores its width (2..8) as a uint4
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_FP16_MIN_SCALE = 2.0 ** -14  # smallest normal float16: scales below it would lose precision or flush to 0


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]``, asymmetric ``[0, 2^b - 1]``."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _reduce_dims(granularity: str) -> tuple[int, ...]:
    return {"layer": (0, 1, 2), "node": (1, 2), "edge": (2,)}[granularity]


def group_count(shape, granularity: str) -> int:
    out, inp, _ = shape
    return {"layer": 1, "node": out, "edge": out * inp}[granularity]


def _as_clip(clip, w: torch.Tensor) -> torch.Tensor:
    """A clip factor (float, or per-output-node ``[out]``) broadcastable to ``[out, 1, 1]``."""
    c = torch.as_tensor(clip, dtype=w.dtype, device=w.device)
    return c.reshape(-1, 1, 1) if c.dim() == 1 else c


def compute_qparams(w: torch.Tensor, bits: int, granularity: str, symmetric: bool, scale_dtype: str,
                    clip=1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (in ``scale_dtype``, group shape) and zero points (int64, or None if symmetric).

    ``clip`` (<= 1) shrinks the range before the scale is taken (values beyond it saturate);
    it is a float or a per-output-node tensor ``[out]``.
    """
    dims = _reduce_dims(granularity)
    c = _as_clip(clip, w)
    qmin, qmax = qrange(bits, symmetric)
    w = w.detach()
    if symmetric:
        amax = w.abs().amax(dim=dims, keepdim=True) * c
        s = amax / qmax
    else:
        lo = w.amin(dim=dims, keepdim=True).clamp(max=0) * c
        hi = w.amax(dim=dims, keepdim=True).clamp(min=0) * c
        s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale reproduces it
    if scale_dtype == "float16":
        s = s.clamp(min=_FP16_MIN_SCALE, max=65504.0)
    s = s.to(SCALE_DTYPES[scale_dtype])
    if symmetric:
        return s, None
    z = torch.round(-lo / s.float()).clamp(qmin, qmax).to(torch.int64)
    return s, z


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             symmetric: bool) -> torch.Tensor:
    """Round to nearest and saturate: the int64 codes of ``w``."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(w.detach() / scale.float())
    if zero is not None:
        q = q + zero
    return q.clamp(qmin, qmax).to(torch.int64)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    qf = q.float() if zero is None else (q - zero).float()
    return qf * scale.float()


def fake_quantize(w: torch.Tensor, bits: int, granularity: str, symmetric: bool, scale_dtype: str,
                  clip=1.0) -> torch.Tensor:
    """Quantise-dequantise ``w`` (no gradient)."""
    s, z = compute_qparams(w, bits, granularity, symmetric, scale_dtype, clip)
    return dequantize(quantize(w, s, z, bits, symmetric), s, z)


@register_source
class QuantSource(EdgeSource):
    """Deployed scalar-quantised edges: ``q [out, in, n+1]`` at ``bits`` bits, ``scale`` per group
    (float32 or float16) and, when asymmetric, a ``uint<b>`` zero point per group."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 granularity: str, symmetric: bool):
        super().__init__()
        self.out_features, self.in_features, self.edge_dim = q.shape
        self.bits, self.granularity, self.symmetric = int(bits), granularity, bool(symmetric)
        qmin, qmax = qrange(self.bits, self.symmetric)
        if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
            raise ValueError(f"codes outside [{qmin}, {qmax}] for {bits}-bit {'' if symmetric else 'a'}symmetric")
        codes = torch.int16 if self.bits < 16 else torch.int32  # unsigned 16-bit codes do not fit int16
        self.register_buffer("q", q.detach().to(codes).clone())
        self.register_buffer("scale", scale.detach().clone())
        if zero is None:
            self.zero = None
        else:
            self.register_buffer("zero", zero.detach().to(codes).clone())

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, granularity: str = "node", symmetric: bool = True,
                   scale_dtype: str = "float32", clip=1.0) -> QuantSource:
        s, z = compute_qparams(w, bits, granularity, symmetric, scale_dtype, clip)
        return cls(quantize(w, s, z, bits, symmetric), s, z, bits, granularity, symmetric)

    @property
    def scale_dtype(self) -> str:
        return "float16" if self.scale.dtype == torch.float16 else "float32"

    def edge_tensor(self) -> torch.Tensor:
        zero = None if self.zero is None else self.zero.long()
        return dequantize(self.q.long(), self.scale, zero)

    def storage(self) -> list[StorageItem]:
        enc = f"int{self.bits}" if self.symmetric else f"uint{self.bits}"
        items = [StorageItem("q", self.q.numel(), self.bits, enc, self.q),
                 float_item("scale", self.scale),
                 StorageItem("bits", 1, WIDTH_BITS, f"uint{WIDTH_BITS}", torch.tensor([self.bits]))]
        if self.zero is not None:
            items.append(StorageItem("zero", self.zero.numel(), self.bits, f"uint{self.bits}", self.zero))
        return items

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "granularity": self.granularity, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype}  # the width is a counted tensor, not header metadata

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> QuantSource:
        shape, bits = config["shape"], int(tensors["bits"].reshape(-1)[0])
        gshape = {"layer": [1, 1, 1], "node": [shape[0], 1, 1], "edge": [shape[0], shape[1], 1]}[config["granularity"]]
        scale = tensors["scale"].to(SCALE_DTYPES[config["scale_dtype"]]).reshape(gshape)
        zero = None if config["symmetric"] else tensors["zero"].reshape(gshape)
        return cls(tensors["q"].reshape(shape), scale, zero, bits, config["granularity"], config["symmetric"])


class QATSource(EdgeSource):
    """A quantisation-aware training form (STE, LSQ): trained in float, stored, counted and exported
    as the :class:`QuantSource` its ``freeze()`` gives (a reloaded file is that frozen source)."""

    def freeze(self) -> QuantSource:  # pragma: no cover - abstract
        raise NotImplementedError

    def storage(self) -> list[StorageItem]:
        return self.freeze().storage()

    def export_config(self) -> dict:
        return self.freeze().export_config()

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> QuantSource:
        return QuantSource.from_export(config, tensors)


@register_source
class FakeQuantSource(QATSource):
    """QAT form: a float32 weight trained through quantise-dequantise with a straight-through
    estimator. Scales follow the weight (recomputed each forward from its current range times
    the fixed ``clip``), so ``freeze()`` reproduces the forward exactly. Its storage and export
    are those of the frozen :class:`QuantSource` (what a deployed model keeps)."""

    def __init__(self, weight: torch.Tensor, bits: int, granularity: str = "node", symmetric: bool = True,
                 scale_dtype: str = "float32", clip=1.0):
        super().__init__()
        self.out_features, self.in_features, self.edge_dim = weight.shape
        self.bits, self.granularity, self.symmetric, self.scale_dtype = int(bits), granularity, symmetric, scale_dtype
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.register_buffer("clip", torch.as_tensor(clip, dtype=torch.float32).clone())

    def edge_tensor(self) -> torch.Tensor:
        w = self.weight
        wq = fake_quantize(w, self.bits, self.granularity, self.symmetric, self.scale_dtype, self.clip)
        return w + (wq - w).detach()  # straight-through: forward = quantised, gradient = identity

    def freeze(self) -> QuantSource:
        return QuantSource.from_float(self.weight.detach(), self.bits, self.granularity, self.symmetric,
                                      self.scale_dtype, self.clip)


# ----------------------------------------------------------------------------- branches and grids
@dataclass(frozen=True)
class QFormat:
    """How one branch of an edge tensor is stored: width, scale sharing, code range, scale dtype."""

    bits: int
    granularity: str = "node"
    symmetric: bool = True
    scale_dtype: str = "float32"

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def branch_slices(edge_dim: int, branch_aware: bool) -> list[tuple[str, slice]]:
    """The branches an edge vector is quantised in: the whole vector (``all``), or the basis
    coefficients (``coef``, entries ``0..n-1``) and the base-branch weight (``base``, entry ``n``)."""
    if not branch_aware:
        return [("all", slice(0, edge_dim))]
    return [("coef", slice(0, edge_dim - 1)), ("base", slice(edge_dim - 1, edge_dim))]


@register_source
class BranchSource(EdgeSource):
    """Branch-aware edges: the basis coefficients ``[out, in, n]`` and the base-branch weights
    ``[out, in, 1]`` come from two sources (each with its own scales and width); the edge tensor
    is their concatenation. Storage and export are the two sources' own, prefixed ``coef.`` and
    ``base.``."""

    def __init__(self, coef: EdgeSource, base: EdgeSource):
        super().__init__()
        if coef.shape[:2] != base.shape[:2] or base.edge_dim != 1:
            raise ValueError(f"branch shapes {coef.shape} and {base.shape} do not form one edge tensor")
        self.coef, self.base = coef, base
        self.out_features, self.in_features = coef.out_features, coef.in_features
        self.edge_dim = coef.edge_dim + 1

    def parts(self) -> list[tuple[str, EdgeSource]]:
        return [("coef", self.coef), ("base", self.base)]

    def edge_tensor(self) -> torch.Tensor:
        return torch.cat([self.coef.edge_tensor(), self.base.edge_tensor()], dim=-1)

    def storage(self) -> list[StorageItem]:
        return [dataclasses.replace(it, name=f"{name}.{it.name}") for name, src in self.parts() for it in src.storage()]

    def freeze(self) -> BranchSource:
        return BranchSource(*(src.freeze() if hasattr(src, "freeze") else src for _, src in self.parts()))

    def export_config(self) -> dict:
        return {"shape": list(self.shape),
                **{name: {"type": type(src).__name__, "config": src.export_config()} for name, src in self.parts()}}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> BranchSource:
        parts = []
        for name in ("coef", "base"):
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            parts.append(SOURCES[config[name]["type"]].from_export(config[name]["config"], own))
        return cls(*parts)


def join_branches(parts: list[EdgeSource]) -> EdgeSource:
    """One source for a layer from its branch sources (one: itself; two: a :class:`BranchSource`)."""
    return parts[0] if len(parts) == 1 else BranchSource(*parts)


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3)


@torch.no_grad()
def search_clip(w: torch.Tensor, feats: torch.Tensor, cut: slice, fmt: QFormat) -> torch.Tensor:
    """The clip factor from :data:`CLIP_GRID` minimising the layer's output MSE on ``feats``
    (``[B, in, n+1]``) when only branch ``cut`` of ``w [out, in, n+1]`` is quantised: a scalar for
    layer scales, else one per output node ``[out]``."""
    part, f = w[:, :, cut], feats[:, :, cut].reshape(feats.shape[0], -1)
    errs = []
    for c in CLIP_GRID:
        delta = fake_quantize(part, clip=c, **fmt.kwargs()) - part
        errs.append(((f @ delta.reshape(w.shape[0], -1).t()) ** 2).mean(0))  # [out]
    errs = torch.stack(errs)  # [n_clips, out]
    grid = torch.tensor(CLIP_GRID, device=w.device)
    return grid[errs.sum(1).argmin()] if fmt.granularity == "layer" else grid[errs.argmin(0)]


class LayerGrid:
    """The integer grid of one layer: per branch a :class:`QFormat` and its scales and zero points
    (from the float weights, shrunk by a calibrated clip). :meth:`expand` gives them per value for
    algorithms that choose codes (RTN, GPTQ, AdaRound); :meth:`source` stores chosen codes."""

    def __init__(self, w: torch.Tensor, branches: list[tuple[str, slice, QFormat]], clips: list | None = None):
        self.shape = tuple(w.shape)
        self.branches = branches
        self.clips = [torch.tensor(1.0) for _ in branches] if clips is None else list(clips)
        self.qparams = [compute_qparams(w[:, :, cut], clip=clip, **fmt.kwargs())
                        for (_, cut, fmt), clip in zip(branches, self.clips)]

    @classmethod
    def calibrated(cls, w: torch.Tensor, branches: list[tuple[str, slice, QFormat]],
                   feats: torch.Tensor | None) -> LayerGrid:
        """Clips searched per branch on ``feats`` (None: no clipping)."""
        clips = None if feats is None else [search_clip(w, feats, cut, fmt) for _, cut, fmt in branches]
        return cls(w, branches, clips)

    def expand(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``scale, zero, qmin, qmax`` as float tensors of the edge tensor's shape."""
        out = [torch.empty(self.shape) for _ in range(4)]
        for (_, cut, fmt), (s, z) in zip(self.branches, self.qparams):
            n = cut.stop - cut.start
            part_shape = (self.shape[0], self.shape[1], n)
            qmin, qmax = qrange(fmt.bits, fmt.symmetric)
            out[0][:, :, cut] = s.float().cpu().expand(part_shape)
            out[1][:, :, cut] = 0.0 if z is None else z.float().cpu().expand(part_shape)
            out[2][:, :, cut], out[3][:, :, cut] = float(qmin), float(qmax)
        device = self.qparams[0][0].device
        return tuple(t.to(device) for t in out)

    def round_to_nearest(self, w: torch.Tensor) -> torch.Tensor:
        """The int64 codes of ``w`` by round to nearest (saturating)."""
        s, z, lo, hi = self.expand()
        return (torch.round(w.detach() / s) + z).clamp(lo, hi).to(torch.int64)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        s, z, _, _ = self.expand()
        return (q.float() - z) * s

    def source(self, q: torch.Tensor) -> EdgeSource:
        """The deployed source storing codes ``q`` (``[out, in, n+1]``) on this grid."""
        return join_branches([QuantSource(q[:, :, cut], s, z, fmt.bits, fmt.granularity, fmt.symmetric)
                              for (_, cut, fmt), (s, z) in zip(self.branches, self.qparams)])

    def fake_quant_source(self, w: torch.Tensor) -> EdgeSource:
        """The STE training form (scales follow the weight's range times the calibrated clip)."""
        return join_branches([FakeQuantSource(w[:, :, cut], clip=clip, **fmt.kwargs()).to(w.device)
                              for (_, cut, fmt), clip in zip(self.branches, self.clips)])

    def lsq_source(self, w: torch.Tensor) -> EdgeSource:
        """The LSQ training form, its step sizes starting from this grid's calibrated scales."""
        return join_branches([LSQSource(w[:, :, cut], s, z, fmt).to(w.device)
                              for (_, cut, fmt), (s, z) in zip(self.branches, self.qparams)])


# ----------------------------------------------------------------------------- LSQ
def _scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward ``x``, gradient times ``g`` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


class _LSQQuantize(torch.autograd.Function):
    """``(clamp(round(w / s) + z, qmin, qmax) - z) * s`` with LSQ's gradients in one pass:
    ``dw = g`` where the code is not saturated (else 0), ``ds = sum g * ((q - z) - w / s)`` over
    each group where not saturated (``g * (q - z)`` where saturated)."""

    @staticmethod
    def forward(ctx, w, s, z, qmin: int, qmax: int):
        v = w / s
        r = torch.round(v) + z
        inside = (r >= qmin) & (r <= qmax)
        q = r.clamp(qmin, qmax) - z
        ctx.save_for_backward(inside, torch.where(inside, q - v, q))
        ctx.s_shape = s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad):
        inside, ds_term = ctx.saved_tensors
        gs = grad * ds_term
        dims = tuple(d for d, n in enumerate(ctx.s_shape) if n == 1 and gs.shape[d] != 1)
        return grad * inside, gs.sum(dim=dims, keepdim=True) if dims else gs, None, None, None


@register_source
class LSQSource(QATSource):
    """LSQ training form (Esser et al., "Learned Step Size Quantization", ICLR 2020): the float
    weights and the per-group step sizes are both parameters. Forward:
    ``w_q = (clamp(round_ste(w / s) + z, qmin, qmax) - z) * s`` with ``s``'s gradient scaled by
    ``1 / sqrt(values per group * qmax)``; ``s`` is used as stored (float16 scales are rounded
    in the forward, straight-through), and the zero points of an asymmetric grid stay fixed.
    ``freeze()`` gives the :class:`QuantSource` with exactly this forward."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat):
        super().__init__()
        self.out_features, self.in_features, self.edge_dim = weight.shape
        self.fmt = fmt
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.step = nn.Parameter(scale.detach().float().clone())
        self.register_buffer("zero", None if zero is None else zero.detach().clone().to(torch.int64))
        qmin, qmax = qrange(fmt.bits, fmt.symmetric)
        per_group = weight.numel() // group_count(weight.shape, fmt.granularity)
        self.grad_scale = 1.0 / math.sqrt(per_group * max(abs(qmin), qmax))

    def stored_scale(self) -> torch.Tensor:
        """The step size as the deployed model stores it (positive, in the scale dtype)."""
        s = _scale_grad(self.step, self.grad_scale).abs().clamp(min=1e-12)
        if self.fmt.scale_dtype == "float16":
            s = s.clamp(min=_FP16_MIN_SCALE, max=65504.0)
            s = s + (s.half().float() - s).detach()
        return s

    def edge_tensor(self) -> torch.Tensor:
        qmin, qmax = qrange(self.fmt.bits, self.fmt.symmetric)
        z = torch.zeros((), device=self.weight.device) if self.zero is None else self.zero.float()
        return _LSQQuantize.apply(self.weight, self.stored_scale(), z, qmin, qmax)

    def freeze(self) -> QuantSource:
        s = self.stored_scale().detach().to(SCALE_DTYPES[self.fmt.scale_dtype])
        q = quantize(self.weight, s, self.zero, self.fmt.bits, self.fmt.symmetric)
        return QuantSource(q, s, self.zero, self.fmt.bits, self.fmt.granularity, self.fmt.symmetric)
