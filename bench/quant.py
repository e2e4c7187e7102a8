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
``N * b + G * S`` bits, plus ``G * b`` for zero points when asymmetric. A per-edge float32
scale is 32 bits for every ``n + 1 = 9`` values, i.e. about 3.6 extra bits per value: 4-bit
codes with per-edge float32 scales cost about as much as 8-bit codes with per-node scales.

:class:`QuantSource` is the deployed form (integers + scales; loads from an exported file).
:class:`FakeQuantSource` is the training form for QAT: a float weight whose forward is the
quantise-dequantise of itself with a straight-through estimator (gradient 1); ``freeze()``
gives the :class:`QuantSource` with exactly the same forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .sources import EdgeSource, StorageItem, float_item, register_source

GRANULARITIES = ("layer", "node", "edge")
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
        self.register_buffer("q", q.detach().to(torch.int16).clone())
        self.register_buffer("scale", scale.detach().clone())
        if zero is None:
            self.zero = None
        else:
            self.register_buffer("zero", zero.detach().to(torch.int16).clone())

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
                 float_item("scale", self.scale)]
        if self.zero is not None:
            items.append(StorageItem("zero", self.zero.numel(), self.bits, f"uint{self.bits}", self.zero))
        return items

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "granularity": self.granularity,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> QuantSource:
        shape = config["shape"]
        gshape = {"layer": [1, 1, 1], "node": [shape[0], 1, 1], "edge": [shape[0], shape[1], 1]}[config["granularity"]]
        scale = tensors["scale"].to(SCALE_DTYPES[config["scale_dtype"]]).reshape(gshape)
        zero = None if config["symmetric"] else tensors["zero"].reshape(gshape)
        return cls(tensors["q"].reshape(shape), scale, zero, config["bits"], config["granularity"],
                   config["symmetric"])


@register_source
class FakeQuantSource(EdgeSource):
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

    def storage(self) -> list[StorageItem]:
        return self.freeze().storage()

    def export_config(self) -> dict:
        return self.freeze().export_config()

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> QuantSource:
        return QuantSource.from_export(config, tensors)
