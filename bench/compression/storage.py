"""Storage accounting and the exported model file.

Definitions (what every number in the results means):

- ``stored_bits``: every tensor a deployed model must keep, at its stored width. Each KAN
  layer's edges count as its source's ``storage()`` says (a codebook counts its float32
  centroids plus ``ceil(log2 K)`` bits per index; a quantised source counts its integers and
  scales). Every other parameter and persistent buffer (biases, LayerNorm weights, batch-norm
  statistics) counts at its own dtype. What a deployed model derives from its config (uniform
  B-spline knots, RBF centres: non-persistent buffers) is neither stored nor counted; the config
  is in the file's header.
- ``header_bytes``: the file's own overhead (magic, header length, compressed JSON header),
  reported beside the counted bits; ``file_bytes = header_bytes + sum(ceil(bits / 8))``.
- ``dense_bits``: the same architecture with every edge tensor and every other tensor at
  float32, i.e. the uncompressed KAN.
- ``compression_ratio = dense_bits / stored_bits`` (whole model);
  ``coef_compression_ratio`` is the same over the edge tensors only (what papers quote).

:func:`export_model` writes exactly those tensors (sub-byte integers bit-packed) plus a small
JSON header into one file; :func:`load_model` rebuilds a model with the same predictions. The
file's size is ``stored_bits / 8`` plus the header and at most one byte of padding per tensor.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.model.kan import kan_layers
from bench.model.kinds import from_config
from bench.model.sources import SOURCES, EdgeSource, StorageItem, float_item

from . import codebook, generated, pruning, quant, tucker_factors  # noqa: F401  the built-in sources register on import

MAGIC = b"KANBENCH1\n"


@dataclass
class StorageReport:
    stored_bits: int
    dense_bits: int
    coef_stored_bits: int
    coef_dense_bits: int
    items: list[tuple[str, StorageItem]]

    @property
    def compression_ratio(self) -> float:
        return self.dense_bits / self.stored_bits

    @property
    def coef_compression_ratio(self) -> float:
        return self.coef_dense_bits / self.coef_stored_bits if self.coef_stored_bits else float("nan")


def _source_prefixes(model: nn.Module) -> dict[str, EdgeSource]:
    return {name: m for name, m in model.named_modules() if isinstance(m, EdgeSource)}


def _outside(name: str, prefixes) -> bool:
    return not any(name == p or name.startswith(p + ".") for p in prefixes)


TRAINING_ONLY = ("num_batches_tracked",)  # BatchNorm's step counter: inference never reads it


def other_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers that do not belong to an edge source and that inference
    reads (BatchNorm's ``num_batches_tracked`` counter is neither stored nor counted)."""
    prefixes = _source_prefixes(model)
    state = model.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if _outside(k, prefixes) and k.rsplit(".", 1)[-1] not in TRAINING_ONLY}


SMALL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EXACT_FLOAT32 = ("knots",)  # data whose rounding moves the function itself (per-input B-spline knots)


def _keeps_float32(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXACT_FLOAT32


def set_small_dtype(model: nn.Module, dtype: str) -> dict:
    """Store every floating tensor outside the edge sources (biases, norm weights and statistics) at
    ``dtype`` (float16 | bfloat16), except per-input knots (:data:`EXACT_FLOAT32`): the values are
    rounded to it now, in place, so the model is evaluated with exactly what the file keeps; they are
    counted at 16 bits and exported at that width. Returns the bits of those tensors before and after.
    Nothing may train the model after this (the ``small_dtype`` method is a pipeline's last stage)."""
    if dtype not in SMALL_DTYPES:
        raise ValueError(f"small dtype must be one of {sorted(SMALL_DTYPES)}, got {dtype!r}")
    before = after = 0
    with torch.no_grad():
        for name, t in other_tensors(model).items():
            if t.is_floating_point() and not _keeps_float32(name):
                before += t.numel() * t.element_size() * 8
                t.copy_(t.to(SMALL_DTYPES[dtype]).to(t.dtype))
                after += t.numel() * 16
    model.small_dtype = dtype
    return {"small_bits_before": before, "small_bits_after": after}


def _small_item(model: nn.Module, name: str, t: torch.Tensor) -> StorageItem:
    dtype = getattr(model, "small_dtype", None)
    if dtype is None or t.dtype != torch.float32 or _keeps_float32(name):
        return float_item(name, t)
    return StorageItem(name, t.numel(), 16, dtype, t.detach())


def storage_items(model: nn.Module) -> list[tuple[str, StorageItem]]:
    """``(qualified name, item)`` for everything the deployed model stores (with ``small_dtype`` set,
    :func:`set_small_dtype`, the float32 tensors outside the sources at 16 bits)."""
    items = []
    for lname, layer in kan_layers(model):
        for it in layer.source.storage():
            items.append((f"{lname}.source.{it.name}", it))
    for name, t in other_tensors(model).items():
        if t.is_floating_point():
            items.append((name, _small_item(model, name, t)))
        else:
            items.append((name, StorageItem(name, t.numel(), t.element_size() * 8, f"raw:{t.dtype}", t.detach())))
    return items


def storage_report(model: nn.Module) -> StorageReport:
    items = storage_items(model)
    coef_names = {f"{lname}.source." for lname, _ in kan_layers(model)}
    coef_stored = sum(it.bits for n, it in items if any(n.startswith(p) for p in coef_names))
    stored = sum(it.bits for _, it in items)
    coef_dense = sum(math.prod(layer.source.shape) * 32 for _, layer in kan_layers(model))
    other_dense = sum(t.numel() * 32 for t in other_tensors(model).values())
    return StorageReport(stored, coef_dense + other_dense, coef_stored, coef_dense, items)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts of the module as it is now."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ----------------------------------------------------------------------------- bit packing
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` into ``ceil(n * bits / 8)`` bytes (little-endian bits)."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    planes = planes.reshape(count, bits).astype(np.uint64)
    return (planes << np.arange(bits, dtype=np.uint64)).sum(axis=1)


_FLOAT = {"float32": (torch.float32, 4), "float16": (torch.float16, 2), "bfloat16": (torch.bfloat16, 2)}


def _encode(it: StorageItem) -> bytes:
    t = it.tensor.detach().cpu().contiguous()
    enc = it.encoding
    if enc in _FLOAT:
        dtype, _ = _FLOAT[enc]
        return t.to(dtype).view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else \
            t.to(dtype).numpy().tobytes()
    if enc.startswith("uint"):
        return pack_bits(t.to(torch.int64).numpy(), int(enc[4:]))
    if enc.startswith("int"):
        b = int(enc[3:])
        v = t.to(torch.int64).numpy()
        return pack_bits(np.where(v < 0, v + (1 << b), v), b)
    if enc.startswith("raw:"):
        return t.numpy().tobytes()
    raise ValueError(f"unknown encoding {enc!r}")


def _decode(data: bytes, enc: str, shape: list[int], count: int) -> torch.Tensor:
    if enc in _FLOAT:
        dtype, _ = _FLOAT[enc]
        if dtype == torch.bfloat16:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(torch.bfloat16).reshape(shape).float()
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32 if dtype == torch.float32 else np.float16)
                                .copy()).reshape(shape)
    if enc.startswith("uint"):
        return torch.from_numpy(unpack_bits(data, count, int(enc[4:])).astype(np.int64)).reshape(shape)
    if enc.startswith("int"):
        b = int(enc[3:])
        v = unpack_bits(data, count, b).astype(np.int64)
        return torch.from_numpy(np.where(v >= (1 << (b - 1)), v - (1 << b), v)).reshape(shape)
    if enc.startswith("raw:"):
        dtype = getattr(torch, enc[4:].replace("torch.", ""))
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()
    raise ValueError(f"unknown encoding {enc!r}")


# ----------------------------------------------------------------------------- export / load
def export_model(model: nn.Module, path: str | Path) -> int:
    """Write the deployed model to ``path``; returns the file size in bytes."""
    items = storage_items(model)
    blobs, entries = [], []
    for name, it in items:
        blob = _encode(it)
        if len(blob) != math.ceil(it.bits / 8):
            raise AssertionError(f"{name}: encoded {len(blob)} bytes for {it.bits} bits")
        entries.append({"name": name, "shape": list(it.tensor.shape), "encoding": it.encoding,
                        "count": it.count, "bytes": len(blob)})
        blobs.append(blob)
    sources = {lname: {"type": type(layer.source).__name__, "config": layer.source.export_config()}
               for lname, layer in kan_layers(model)}
    head = {"model": model.config(), "sources": sources, "tensors": entries}
    if getattr(model, "small_dtype", None) is not None:
        head["small_dtype"] = model.small_dtype
    if getattr(model, "imported_from", None):  # bench.interop: the library and class it came from
        head["imported_from"] = model.imported_from
    header = zlib.compress(json.dumps(head, separators=(",", ":")).encode(), 9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<I", len(header)))
        fh.write(header)
        for b in blobs:
            fh.write(b)
    return path.stat().st_size


ZSTD_LEVEL = 9  # a general-purpose compressor's typical setting (level 19 gains < 1 % more here, 20x slower)


def zstd_bytes(path: str | Path, level: int = ZSTD_LEVEL) -> int:
    """Size of the exported file after zstandard: the check that the format wastes no bits. A model
    file that a general-purpose compressor shrinks by more than a few percent stores redundancy a
    better code (entropy coding, a narrower dtype) would remove; the report shows it."""
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(Path(path).read_bytes()))


def _header_length(head: bytes, path) -> int:
    """The compressed header's length, from a file's first ``len(MAGIC) + 4`` bytes."""
    if not head.startswith(MAGIC):
        raise ValueError(f"{path} is not an exported KAN model file")
    return struct.unpack_from("<I", head, len(MAGIC))[0]


def header_bytes(path: str | Path) -> int:
    """Bytes of an exported file that are not counted tensors: the magic line, the header length
    and the compressed JSON header (architecture, source types and configs, tensor table)."""
    with open(path, "rb") as fh:
        return len(MAGIC) + 4 + _header_length(fh.read(len(MAGIC) + 4), path)


def read_header(path: str | Path) -> dict:
    """The JSON header of an exported model file (``model``: its config, ``sources``, ``tensors``,
    and ``imported_from`` for an imported model), without reading the tensors."""
    with open(path, "rb") as fh:
        hlen = _header_length(fh.read(len(MAGIC) + 4), path)
        return json.loads(zlib.decompress(fh.read(hlen)))


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the exported model (sources included) with the same predictions. Built-in sources
    are always known; a source defined in a plugin must be registered first (``--plugin``), else
    one :class:`~bench.errors.UserError` line names the unknown type."""
    raw = Path(path).read_bytes()
    hlen = _header_length(raw[:len(MAGIC) + 4], path)
    pos = len(MAGIC) + 4
    header = json.loads(zlib.decompress(raw[pos:pos + hlen]))
    pos += hlen
    tensors = {}
    for e in header["tensors"]:
        tensors[e["name"]] = _decode(raw[pos:pos + e["bytes"]], e["encoding"], e["shape"], e["count"])
        pos += e["bytes"]
    model = from_config(header["model"])
    if "small_dtype" in header:
        model.small_dtype = header["small_dtype"]
    if "imported_from" in header:
        model.imported_from = header["imported_from"]
    layers = dict(kan_layers(model))
    for lname, spec in header["sources"].items():
        prefix = f"{lname}.source."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layers[lname].set_source(SOURCES.lookup(spec["type"]).from_export(spec["config"], own))
    rest = {k: v for k, v in tensors.items() if k in other_tensors(model)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    others = other_tensors(model)
    left = [k for k in missing if k in others]
    if left:
        raise ValueError(f"exported file lacks tensors {left}")
    model.eval()
    return model
