"""Coefficient sources: where a KAN layer gets its edge tensor from.

Every KAN layer owns a *source*, a small module with

- ``edge_tensor() -> [out, in, n_basis + 1]``: the canonical edge tensor (basis coefficients,
  then the base-branch weight last);
- ``storage() -> list[StorageItem]``: every tensor a deployed model must keep for this layer's
  edges, at the width it is stored at (this is what storage accounting counts and what
  :func:`bench.compression.storage.export_model` writes);
- ``contract(features[B, in, n+1]) -> [B, out]``: the layer's matrix product. The default
  builds the edge tensor and does one matmul; a source may override it with a cheaper path
  (a codebook can skip rebuilding the full tensor).

A compression method swaps ``layer.source`` for another source; the layer's forward and the
basis code never change. To make a new source loadable from an exported file, register it
with :func:`register_source` and implement ``export_config`` / ``from_export``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.registry import Registry

from .bases import basis_major

SOURCES = Registry("source", "a source defined in a plugin registers when its file is loaded "
                              "(pass the file with --plugin)")


def register_source(cls: type) -> type:
    """Make a source loadable from exported files, under its class name."""
    return SOURCES.register(set_name=False)(cls)


@dataclass
class StorageItem:
    """One stored tensor: ``count`` values of ``bits_per_value`` bits each.

    ``encoding`` tells export how to write it: ``float32``, ``float16``, ``bfloat16``,
    ``uint<b>`` (unsigned ints bit-packed at b bits) or ``int<b>`` (two's complement, b bits).
    ``tensor`` is the data itself (kept out of repr).
    """

    name: str
    count: int
    bits_per_value: int
    encoding: str = "float32"
    tensor: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def bits(self) -> int:
        return int(self.count) * int(self.bits_per_value)


def float_item(name: str, t: torch.Tensor) -> StorageItem:
    """A tensor stored at its own floating dtype."""
    enc = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(t.dtype)
    if enc is None:
        raise TypeError(f"float_item needs a float tensor, got {t.dtype}")
    return StorageItem(name, t.numel(), t.element_size() * 8, enc, t.detach())


def flat_features(features: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``features [B, in, n+1]`` as the ``[B, K]`` left factor of a layer's product (a view of what layers
    produce), and whether ``K`` runs basis-major (``(n+1, in)``: compiled features,
    :func:`bench.model.bases.basis_major`) or input-major (``(in, n+1)``)."""
    major = basis_major(features)
    return (features.transpose(1, 2) if major else features).reshape(features.shape[0], -1), major


class EdgeSource(nn.Module):
    """Base class. Subclasses set ``out_features``, ``in_features``, ``edge_dim`` (= n_basis + 1)."""

    out_features: int
    in_features: int
    edge_dim: int

    def edge_tensor(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def storage(self) -> list[StorageItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        """``features[B, in, n+1] -> [B, out]``: one matmul ``[B, K] @ [K, out]`` over the flattened edge
        tensor. Compiled features are basis-major underneath (:func:`bench.model.bases.basis_major`): they
        are read as ``[B, (n+1) * in]`` against the edge tensor laid out to match, and never copied."""
        f, major = flat_features(features)
        return f @ self.product_matrix(major)

    # Outputs from which the product matrix is row-major [K, out]; narrower layers take it column-major
    # (the transpose of a row-major [out, K]). Measured on CPU (MKL, 2 threads, batch 256), F @ M and the
    # weight gradient: at out = 64, K = 7,056 row-major 1.71 / 1.80 ms against 1.78 / 2.65 ms; at out = 10
    # (a classifier head) the other way round, 2.10 / 2.53 against 1.09 / 0.67 ms (K = 7,056) and 0.18 /
    # 0.20 against 0.09 / 0.05 ms (K = 576); they meet between out = 12 and 16.
    WIDE_OUT = 16

    @property
    def wide(self) -> bool:
        """Whether this layer's product matrix is row-major ``[K, out]`` (else column-major): :attr:`WIDE_OUT`."""
        return self.out_features >= self.WIDE_OUT

    def product_matrix(self, basis_major: bool = False) -> torch.Tensor:
        """``edge_tensor()`` as the ``[K, out]`` right factor of :meth:`contract` (``K`` runs over ``(in,
        n+1)``, or ``(n+1, in)`` when ``basis_major``), kept at inference (:meth:`kept_at_inference`:
        decompressed once, as a deployed model would at load time). Its memory layout is the one the CPU's
        matmul and its weight gradient are fastest with (:attr:`WIDE_OUT`): row-major for layers of at least
        that many outputs, column-major for narrower ones. Under autograd it is rebuilt every step: a copy
        for most sources, a view of the parameter for a dense one (:class:`DenseSource`)."""
        def build() -> torch.Tensor:
            w = self.edge_tensor()  # [out, in, n+1]
            m = w.transpose(1, 2) if basis_major else w  # [out, n+1, in] or [out, in, n+1]
            if self.wide:
                return m.permute(1, 2, 0).reshape(-1, w.shape[0])
            return m.reshape(w.shape[0], -1).t()

        return self.kept_at_inference(("matrix", basis_major), build)

    def kept_at_inference(self, tag, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, rebuilt on every call under autograd (training) or for a deployed source that keeps
        only its compact form (``runtime_compact``, :mod:`bench.deploy.runtime`); otherwise built once and kept
        (one tensor per source, named by ``tag``) until one of the source's parameters or buffers changes."""
        if torch.is_grad_enabled() or getattr(self, "runtime_compact", False):
            self._cache = None
            return build()
        key = (tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers())), tag)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, build().detach())
            self._cache = cache
        return cache[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.out_features, self.in_features, self.edge_dim)

    # export / load ------------------------------------------------------------------------
    def export_config(self) -> dict:
        """JSON-able constructor arguments; together with ``storage()`` tensors they rebuild it."""
        return {"shape": list(self.shape)}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> EdgeSource:  # pragma: no cover
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from an exported file")


@register_source
class DenseSource(EdgeSource):
    """The uncompressed edge tensor: one float32 parameter ``[out, in, n+1]``.

    Its memory is laid out as the product matrix of :meth:`EdgeSource.product_matrix` for compiled
    (basis-major) features, so a training step multiplies by the parameter itself and gets its gradient in
    place, with no copy: ``[n+1, in, out]`` underneath (row-major ``[(n+1) * in, out]``) for a layer of at
    least ``WIDE_OUT`` outputs, ``[out, n+1, in]`` for a narrower one. The shape, the values, ``state_dict``,
    exports and every method see the canonical ``[out, in, n+1]``; only the strides differ. Measured with
    ``python -m bench perf`` (``kan [784, 64, 10]``, batch 256, train step / same-parameter MLP): see
    docs/performance.md."""

    def __init__(self, out_features: int, in_features: int, edge_dim: int, init: Callable | None = None):
        super().__init__()
        self.out_features, self.in_features, self.edge_dim = out_features, in_features, edge_dim
        w = torch.empty(out_features, in_features, edge_dim)
        if init is not None:  # on a contiguous tensor: the same random draws as any layout before
            with torch.no_grad():
                init(w)
        if self.wide:
            memory = torch.empty(edge_dim, in_features, out_features).permute(2, 1, 0)
        else:
            memory = torch.empty(out_features, edge_dim, in_features).transpose(1, 2)
        self.weight = nn.Parameter(memory.copy_(w))

    def edge_tensor(self) -> torch.Tensor:
        return self.weight

    def storage(self) -> list[StorageItem]:
        return [float_item("weight", self.weight)]

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> DenseSource:
        src = cls(*config["shape"])
        with torch.no_grad():
            src.weight.copy_(tensors["weight"].reshape(src.weight.shape))
        return src


class _RowGather(torch.autograd.Function):
    """``table[index]`` (``table [K, d]``, ``index`` 1-D) whose backward sums the gradient rows of each table row with
    one sparse ``[K, N] @ [N, d]`` product. Autograd's own backward of an indexing gather
    (``index_put_`` with accumulation) serialises on the few rows of a codebook: 50,176 edges into
    K = 4 / 16 / 256 centroids took 10.1 / 5.4 / 2.1 ms a step on 2 CPU cores, the sparse product
    0.08 / 0.07 / 0.05 ms (measured), which made a codebook's fine-tune step ~4x a dense one."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        ctx.members = members
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.members @ grad.contiguous(), None, None


_MEMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gather_rows(table: torch.Tensor, index: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """``table[index.reshape(-1)]`` for a ``[K, d]`` table (``[N, d]`` out); under autograd the backward is
    :class:`_RowGather`'s, with the ``[K, N]`` membership matrix built once per index (kept for ``owner``,
    outside the module so copies and pickles never carry it, until the index tensor or its contents, or
    the table's size, dtype or device change). Half-precision tables (no sparse product on
    CPU) keep autograd's own backward."""
    flat = index.reshape(-1).long()
    if not (torch.is_grad_enabled() and table.requires_grad) or table.dtype not in (torch.float32, torch.float64):
        return table[flat]
    key = (index._version, table.shape[0], table.dtype, table.device)  # with the index tensor itself, below
    cached = _MEMBERS.get(owner)
    if cached is None or cached[0] is not index or cached[1] != key:
        k, n = table.shape[0], flat.numel()
        crow = torch.zeros(k + 1, dtype=torch.long, device=flat.device)
        crow[1:] = torch.bincount(flat, minlength=k).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            members = torch.sparse_csr_tensor(crow, torch.argsort(flat, stable=True),  # row c: c's edges
                                              torch.ones(n, dtype=table.dtype, device=table.device), (k, n),
                                              check_invariants=False)
        cached = (index, key, members)  # the index itself, so a new tensor at a reused address is not mistaken
        _MEMBERS[owner] = cached
    return _RowGather.apply(table, flat, cached[2])


def index_bits(k: int) -> int:
    """Bits per index into a codebook of ``k`` entries: ``ceil(log2 k)`` (at least 1)."""
    return max(1, (int(k) - 1).bit_length())


@register_source
class CodebookSource(EdgeSource):
    """Shared edge vectors: ``centroids [K, n+1]`` (float32, trainable) and a frozen per-edge
    ``index [out, in]`` stored at ``ceil(log2 K)`` bits.

    ``contract`` picks the cheaper of two paths by a cost estimate: rebuild the edge tensor
    (``centroids[index]``) and do one matmul, or ``contract_gather`` (``P = features .
    centroids^T`` once, then a gather-sum by index); both give the same output (tested).
    """

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = index.shape
        self.edge_dim = centroids.shape[1]
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("index", index.detach().clone().long())

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    # -- quantised centroids (``centroid_bits``) ----------------------------------------------
    centroid_bits: int = 32  # 32: float32; 16: float16; below: symmetric b-bit integers x a float32 scale

    def set_centroid_format(self, bits: int, per: str = "centroid", scale: torch.Tensor | None = None) -> None:
        """Store the centroids at ``bits``: 16 is float16; below 16, symmetric integers in
        ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` times a float32 scale per centroid (``per="centroid"``) or one
        per codebook (``"codebook"``), fixed now from the centroids' largest magnitude (values beyond
        it clamp). The forward uses the quantised centroids; gradients pass straight through (STE)."""
        self.centroid_bits = int(bits)
        if self.centroid_bits < 16:
            if scale is None:
                c = self.centroids.detach()
                amax = c.abs().amax(dim=1) if per == "centroid" else c.abs().amax().reshape(1)
                scale = (amax / centroid_qmax(self.centroid_bits)).clamp_min(1e-12)
            self.register_buffer("centroid_scale", scale.detach().float().reshape(-1).clone())

    def centroid_codes(self) -> torch.Tensor:
        m = centroid_qmax(self.centroid_bits)
        return torch.clamp(torch.round(self.centroids / self.centroid_scale.reshape(-1, 1)), -m, m)

    def codebook(self) -> torch.Tensor:
        """The centroids the forward uses: at their stored precision, straight-through for gradients."""
        c = self.centroids
        if self.centroid_bits >= 32:
            return c
        if self.centroid_bits == 16:
            q = c.detach().half().float()
        else:
            q = self.centroid_codes().detach() * self.centroid_scale.reshape(-1, 1)
        return q + (c - c.detach())  # exactly q in value; the gradient of c

    def centroid_items(self) -> list[StorageItem]:
        b = self.centroid_bits
        if b >= 32:
            return [float_item("centroids", self.centroids)]
        if b == 16:
            return [float_item("centroids", self.centroids.detach().half())]
        return [StorageItem("centroids", self.centroids.numel(), b, f"int{b}", self.centroid_codes().detach().long()),
                float_item("centroid_scale", self.centroid_scale)]

    def centroid_config(self) -> dict:
        return {} if self.centroid_bits >= 32 else {"centroid_bits": self.centroid_bits}

    @staticmethod
    def centroids_from_export(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(float centroids ``[K, n+1]``, keyword arguments of :meth:`set_centroid_format`) from a file."""
        bits, k = int(config.get("centroid_bits", 32)), config["k"]
        c = tensors["centroids"].reshape(k, -1)
        if bits >= 16:
            return c.float(), {"bits": bits}
        scale = tensors["centroid_scale"].reshape(-1).float()
        return c.float() * scale.reshape(-1, 1), {"bits": bits, "scale": scale}

    def edge_tensor(self) -> torch.Tensor:
        # (a deployed source keeps a narrow index: bench.deploy.compact)
        return gather_rows(self.codebook(), self.index, self).reshape(self.shape)

    def storage(self) -> list[StorageItem]:
        b = index_bits(self.k)
        return [*self.centroid_items(), StorageItem("index", self.index.numel(), b, f"uint{b}", self.index)]

    # Below this many gathered values (batch x out x in) one indexing gather and a sum beat the
    # embedding-bag (whose per-lookup cost dominates at batch 1: measured with `python -m bench perf`)
    GATHER_DIRECT = 1 << 20

    # One gathered add costs about as much as this many BLAS multiply-adds on a CPU (measured
    # with `python -m bench perf`: the embedding-bag sum is memory-bound, the matmul is not).
    GATHER_COST = 32

    def use_fast_path(self) -> bool:
        """Cost per sample: dense ``out*in*(n+1)`` MACs (after an ``[out, in, n+1]`` gather of the
        centroids, negligible per sample) versus ``in*(n+1)*K`` MACs plus ``in*out`` gathered adds."""
        n1 = self.edge_dim
        gather_path = self.in_features * n1 * self.k + self.GATHER_COST * self.in_features * self.out_features
        return gather_path < self.out_features * self.in_features * n1

    # A deployed layer (runtime_compact) gathers its float edge tensor for one product only, whole up to
    # this many bytes, else this many bytes of outputs at a time (contract_blocked)
    BLOCK_BYTES = 4 << 20

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        if self.use_fast_path():
            return self.contract_gather(features)
        if getattr(self, "runtime_compact", False) and not torch.is_grad_enabled():
            return self.contract_blocked(features)
        return super().contract(features)

    def contract_blocked(self, features: torch.Tensor) -> torch.Tensor:
        """The dense product with a transient edge tensor: gathered from the centroids (whole when it is
        at most :attr:`BLOCK_BYTES`, else that many bytes of outputs at a time: narrower products are
        slower), multiplied and dropped. A deployed layer at a large batch thus runs at the dense layer's
        matmul speed plus one gather of its edge vectors and keeps holding only its centroids and index."""
        (f, major), b = flat_features(features), features.shape[0]
        cb = self.codebook()
        step = max(1, self.BLOCK_BYTES // (self.in_features * self.edge_dim * cb.element_size()))
        y = f.new_empty(b, self.out_features)
        for o in range(0, self.out_features, step):
            y[:, o:o + step] = f @ self._block(cb, self.index[o:o + step], major).t()
        return y

    @staticmethod
    def _block(cb: torch.Tensor, index: torch.Tensor, major: bool) -> torch.Tensor:
        """``[rows, in * E]`` (``[rows, E * in]`` if ``major``) of the edge tensor for ``index [rows, in]``
        (an embedding lookup: several times faster than indexing on CPU)."""
        w = F.embedding(index.long(), cb)  # [rows, in, E]
        return (w.transpose(1, 2) if major else w).reshape(index.shape[0], -1)

    def contract_gather(self, features: torch.Tensor) -> torch.Tensor:
        """``P = phi(x) . centroids^T`` once (``[B, in, K]``), then ``y[b, o] = sum_i P[b, i,
        index[o, i]]`` as an embedding-bag sum over the rows of ``P^T``: never builds
        ``[B, out, in]`` nor the full edge tensor."""
        b = features.shape[0]
        p = (features @ self.codebook().t()).reshape(b, -1)  # [B, in*K]
        offsets = self.index.long() + self.k * torch.arange(self.in_features, device=self.index.device)
        if b * offsets.numel() <= self.GATHER_DIRECT:  # a few rows: one gather, then a sum per output
            return p[:, offsets.reshape(-1)].reshape(b, self.out_features, self.in_features).sum(-1)
        return F.embedding_bag(offsets, p.t().contiguous(), mode="sum").t()

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "k": self.k, **self.centroid_config()}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> CodebookSource:
        cent, fmt = cls.centroids_from_export(config, tensors)
        src = cls(cent, tensors["index"].reshape(config["shape"][:2]))
        src.set_centroid_format(**fmt)
        return src


def centroid_qmax(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit integer centroid: ``2^(bits-1) - 1``."""
    return 2 ** (int(bits) - 1) - 1
