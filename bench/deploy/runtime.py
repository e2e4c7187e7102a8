"""Compressed models that run compressed, in PyTorch.

:func:`compact` turns a model (a loaded ``.kanb``, or any model with compressed sources) into its
deployed run-time form: a codebook layer keeps its centroids and a narrow index (``uint8`` for up to 256
centroids); a scalar-quantised layer keeps its integer codes (``int8`` up to 8 bits) and dequantizes on
every forward instead of holding a float copy. Everything else is as loaded. A codebook layer's
inference of up to ``native.MAX_ROWS`` (16) samples runs in one native call (:mod:`bench.deploy.native`:
the basis, the K centroid functions per input and the index gather-sum fused; it never builds the
``[out, in, n+1]`` float tensor). A larger batch, where one dense product costs less than the gathers,
gathers the float edge vectors from the centroids for that forward only, at most ``BLOCK_BYTES`` (4 MiB)
per layer at a time, and drops them after the product (:meth:`CodebookSource.contract_blocked`).
:func:`held_bytes` is what a model holds at run time: every parameter, buffer and cached decompressed
tensor (each storage once), not the transient tensors of a forward.

``bench perf`` reports, per compressed form against its dense model, the batch-1 latency, the
batch-256 time and the bytes held against the counted bytes (``compressed_runtime`` rows).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bench.compression.quant import QuantSource
from bench.model.kan import KANLayer, kan_layers
from bench.model.sources import CodebookSource

from .native import NativeCodebookLayer


def _narrow(t: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``t`` in the narrowest integer dtype holding ``[low, high]``."""
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return t.to(dtype)
    return t.long()


def compact(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The deployed run-time form of ``model`` (a copy unless ``inplace``); see the module docstring."""
    model = model if inplace else copy.deepcopy(model)
    for _, layer in kan_layers(model):
        src = layer.source
        if isinstance(src, CodebookSource) and not hasattr(src, "flat_index"):  # not a pruned codebook
            src.index = _narrow(src.index, 0, src.k - 1)
            src.runtime_compact = True
            if type(layer) is KANLayer:  # the same module, whose inference may take the native kernel
                layer.__class__ = NativeCodebookLayer
        elif isinstance(src, QuantSource):
            low, high = int(src.q.min()), int(src.q.max())
            src.q = _narrow(src.q, min(low, 0), max(high, 0))
            if src.zero is not None:
                src.zero = _narrow(src.zero, 0, int(src.zero.max()))
            src.runtime_compact = True
        src._cache = None
    return model.eval()


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds at run time: parameters, buffers and each source's cached
    decompressed edge tensor, each storage counted once."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for _, layer in kan_layers(model):
        cache = getattr(layer.source, "_cache", None)
        if cache is not None:
            tensors.append(cache[1])
        if isinstance(layer, NativeCodebookLayer):
            tensors += layer.held()
    for t in tensors:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
