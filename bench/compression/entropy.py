"""Entropy coding of a model's integer streams: codebook indices, quantised values, pruning masks and
position lists, each stored as an ANS stream (constriction, a kept entropy-coding library) under its
own symbol histogram instead of at a fixed width.

**What is stored for a coded stream** (and counted, and written by :func:`bench.compression.storage.export_model`):
``<name>.counts`` (one count per value from the smallest its plain encoding allows, 0 for ``uint<b>``
and ``-2^(b-1)`` for ``int<b>``, up to the largest present, each at ``ceil(log2(n + 1))`` bits: the
code table both coder and decoder build the same probabilities from) and ``<name>.words`` (the ANS
stream's 32-bit words). A stream is coded
only where that is fewer bits than the plain fixed-width item (a short or flat stream stays plain).
Next to each coded size the empirical entropy ``n * H(counts / n)`` is recorded: no code that codes
the values one at a time under one distribution can go below it.

**How.** :class:`EntropyCodedSource` wraps any edge source: the forward, the edge tensor and the
inner source's attributes are the inner source's; only ``storage()`` differs, the integer items it
chose at wrapping time replaced by their streams (re-coded from the inner source's current values,
so the count is always that of the model as it computes). Export writes the streams; loading decodes
them and hands the inner source's ``from_export`` the integers it stored plainly before, so a reload
computes exactly the same. :func:`entropy_code_model` wraps every KAN layer of a model (the
``entropy_code`` method and the ``entropy_coding`` option of ``kmeans`` / ``metacluster`` call it).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.model.kan import kan_layers
from bench.model.sources import SOURCES, EdgeSource, StorageItem, register_source

WORD_BITS = 32


def ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ANS-code ``symbols`` (ints in ``0..len(counts)-1``) under the categorical distribution
    ``counts / sum`` (constriction's leaky quantisation: every symbol keeps a nonzero probability);
    returns the stream's 32-bit words."""
    import constriction

    model = constriction.stream.model.Categorical(np.asarray(counts, np.float64) / np.sum(counts), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)
    return coder.get_compressed()


def ans_decode(words: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` symbols :func:`ans_encode` coded into ``words`` under the same ``counts``."""
    import constriction

    model = constriction.stream.model.Categorical(np.asarray(counts, np.float64) / np.sum(counts), perfect=False)
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    symbols = coder.decode(model, n)
    if not coder.is_empty():  # a stream coded under another table (or by another coder) does not end here
        raise ValueError("ANS stream does not decode to the stored length: the file or its code table is corrupt")
    return symbols


def empirical_entropy_bits(counts: np.ndarray) -> float:
    """``n * H(counts / n)``: the fewest bits any code of these symbols, one at a time, can reach."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(c[c > 0] * np.log2(p)).sum())


def is_integer_item(it: StorageItem) -> bool:
    return it.encoding.startswith(("uint", "int"))


def lowest(encoding: str) -> int:
    """The smallest value an integer encoding holds: 0 for ``uint<b>``, ``-2^(b-1)`` for ``int<b>``."""
    return 0 if encoding.startswith("uint") else -(1 << (int(encoding[3:]) - 1))


class CodedStream:
    """One integer item ANS-coded: the code table ``counts`` (values from ``low`` up) and the stream ``words``."""

    def __init__(self, values: np.ndarray, low: int):
        v = np.asarray(values, dtype=np.int64).reshape(-1)
        self.n, self.low = int(v.size), int(low)
        if self.n and int(v.min()) < self.low:
            raise ValueError(f"value {int(v.min())} below the encoding's lowest {self.low}")
        self.counts = np.bincount(v - self.low) if self.n else np.zeros(1, np.int64)
        # one value only (or none): the table says it all, the stream is empty
        single = np.count_nonzero(self.counts) <= 1
        self.words = np.zeros(0, np.uint32) if single else ans_encode(v - self.low, self.counts)

    @property
    def count_bits(self) -> int:
        return max(1, self.n.bit_length())

    @property
    def table_bits(self) -> int:
        return self.counts.size * self.count_bits

    @property
    def bits(self) -> int:
        return self.table_bits + self.words.size * WORD_BITS

    @property
    def entropy_bits(self) -> float:
        return empirical_entropy_bits(self.counts)

    def items(self, name: str) -> list[StorageItem]:
        b = self.count_bits
        return [StorageItem(f"{name}.counts", self.counts.size, b, f"uint{b}", torch.from_numpy(self.counts)),
                StorageItem(f"{name}.words", self.words.size, WORD_BITS, f"uint{WORD_BITS}",
                            torch.from_numpy(self.words.astype(np.int64)))]

    @staticmethod
    def decode(name: str, n: int, low: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        counts = tensors[f"{name}.counts"].reshape(-1).numpy()
        words = tensors[f"{name}.words"].reshape(-1).numpy()
        if np.count_nonzero(counts) <= 1:  # one value only (or none): no stream
            return torch.full((n,), low + int(np.argmax(counts)) if n else 0, dtype=torch.int64)
        return torch.from_numpy(ans_decode(words, counts, n).astype(np.int64) + low)


def stream_of(it: StorageItem) -> CodedStream:
    return CodedStream(it.tensor.detach().cpu().numpy(), lowest(it.encoding))


def smaller_coded(it: StorageItem) -> bool:
    """Whether the item's stream plus its code table is fewer bits than the item stored plainly."""
    return it.count > 1 and stream_of(it).bits < it.bits


@register_source
class EntropyCodedSource(EdgeSource):
    """Any edge source with some of its integer items stored as ANS streams (see the module doc).
    ``names``: the inner items to code (default: every integer item whose stream is smaller)."""

    def __init__(self, inner: EdgeSource, names: list[str] | None = None):
        super().__init__()
        if isinstance(inner, EntropyCodedSource):
            raise ValueError("the source is already entropy-coded")
        self.inner = inner
        self.out_features, self.in_features, self.edge_dim = inner.out_features, inner.in_features, inner.edge_dim
        if names is None:
            names = [it.name for it in inner.storage() if is_integer_item(it) and smaller_coded(it)]
        self.names = list(names)

    def __getattr__(self, name: str):  # the inner source's attributes (index, k, kept, centroids, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def edge_tensor(self) -> torch.Tensor:
        return self.inner.edge_tensor()

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.contract(features)

    def product_matrix(self, basis_major: bool = False) -> torch.Tensor:
        return self.inner.product_matrix(basis_major)

    def _stream(self, it: StorageItem) -> CodedStream:
        """The item's stream, coded once per content (storage, report and export all ask for it)."""
        values = it.tensor.detach().cpu().numpy()
        key = (it.encoding, values.shape, hash(values.tobytes()))
        cache = self.__dict__.setdefault("_streams", {})
        if cache.get(it.name, (None,))[0] != key:
            cache[it.name] = (key, CodedStream(values, lowest(it.encoding)))
        return cache[it.name][1]

    def streams(self) -> dict[str, tuple[StorageItem, CodedStream]]:
        """Each coded item (as the inner source stores it plainly) and its stream."""
        return {it.name: (it, self._stream(it)) for it in self.inner.storage() if it.name in self.names}

    def storage(self) -> list[StorageItem]:
        out = []
        for it in self.inner.storage():
            out.extend(self._stream(it).items(it.name) if it.name in self.names else [it])
        names = [it.name for it in out]
        if len(set(names)) != len(names):
            raise ValueError(f"stream item names collide with the inner source's items: {names}")
        return out

    def report(self) -> dict[str, dict]:
        """Per coded item: its plain bits, coded bits (table + stream), table bits and entropy."""
        return {name: {"values": it.count, "plain_bits": it.bits, "coded_bits": s.bits, "table_bits": s.table_bits,
                       "entropy_bits": round(s.entropy_bits, 1)} for name, (it, s) in self.streams().items()}

    def export_config(self) -> dict:
        coded = {name: {"count": it.count, "shape": list(it.tensor.shape), "encoding": it.encoding}
                 for name, (it, _) in self.streams().items()}
        return {"shape": list(self.shape), "inner": {"type": type(self.inner).__name__,
                                                     "config": self.inner.export_config()}, "coded": coded}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> EntropyCodedSource:
        stream_items = {f"{name}.{part}" for name in config["coded"] for part in ("counts", "words")}
        plain = {k: v for k, v in tensors.items() if k not in stream_items}
        for name, spec in config["coded"].items():
            values = CodedStream.decode(name, spec["count"], lowest(spec["encoding"]), tensors)
            plain[name] = values.reshape(spec["shape"])
        inner = SOURCES.lookup(config["inner"]["type"]).from_export(config["inner"]["config"], plain)
        return cls(inner, list(config["coded"]))


def entropy_code_model(model, only: tuple[str, ...] | None = None) -> dict:
    """Wrap every KAN layer's source in an :class:`EntropyCodedSource` (only the items named in
    ``only``, e.g. ``("index",)``, when given; each only where coding is smaller; a layer where no
    stream would shrink keeps its source, and an already coded layer is re-chosen). The model computes
    the same. Returns, per layer, :meth:`EntropyCodedSource.report` and the totals over the model."""
    layers, totals = {}, {"plain_bits": 0, "coded_bits": 0, "entropy_bits": 0.0}
    for name, layer in kan_layers(model):
        src = layer.source
        if isinstance(src, EntropyCodedSource):
            src = src.inner
            layer.set_source(src)
        chosen = [it.name for it in src.storage() if is_integer_item(it) and smaller_coded(it)
                  and (only is None or it.name.split(".")[-1] in only)]
        if not chosen:  # nothing would shrink: the layer stays as it is
            layers[name] = {}
            continue
        coded = EntropyCodedSource(src, chosen)
        layer.set_source(coded)
        layers[name] = coded.report()
        for r in layers[name].values():
            for k in totals:
                totals[k] += r[k]
    totals["entropy_bits"] = round(totals["entropy_bits"], 1)
    return {"entropy_coded": layers, **{f"coded_{k}": v for k, v in totals.items()}}

