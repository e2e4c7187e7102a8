"""Edge-vector codebooks (MetaCluster, the ``kmeans`` ablation).

:func:`cluster_model` runs scikit-learn ``KMeans`` (k-means++, ``n_init``
restarts, fixed ``random_state``) on a model's edge vectors and swaps every layer's source for
a :class:`bench.model.sources.CodebookSource` (centroids float32 + ``ceil(log2 K)``-bit indices).
Scope ``layer`` (default) clusters each layer's edges separately; ``global`` clusters all
layers' edges together into one codebook shared by every layer (:class:`SharedCodebookSource`,
its centroids counted once, by the first layer). **K rule:** ``K`` larger than the number of
edges in a scope (a layer, or all layers for ``global``) is :class:`~bench.errors.Infeasible`:
such a codebook could never be filled. With enough edges but no more *distinct* edge vectors than
``K`` (repeated vectors), the codebook size used is that number of distinct vectors: every
distinct vector becomes its own centroid (exact, inertia 0) and no empty or duplicate centroid
is stored (``k_used`` records it). :func:`codebook_param_groups` gives the centroid
fine-tune groups (indices are buffers, so they stay frozen).

:func:`cluster_and_finetune` is the whole compress step both methods share: cluster, then
fine-tune the centroids with the shared budget; :class:`ClusterOptions` is the hyperparameter
block both compose into their ``Config``.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bench.config import positive
from bench.errors import Infeasible, UserError
from bench.model.kan import kan_layers
from bench.model.kinds import kind_of
from bench.model.sources import CodebookSource, EdgeSource, StorageItem, gather_rows, index_bits, register_source

from .entropy import empirical_entropy_bits, entropy_code_model
from .pruning import MaskedSource, SparsePattern

# Codebooks shared across layers, published by their owner while a file loads.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def paper_k(model: nn.Module) -> int:
    """The MetaCluster paper's codebook size: 16 for fully connected KANs, 256 for ConvKANs."""
    return 256 if kind_of(model).convolutional else 16


@register_source
class SharedCodebookSource(CodebookSource):
    """A :class:`CodebookSource` whose centroids are one parameter shared by several layers
    (scope ``global``); the owner (first layer) stores the centroids, the others only their
    indices (at ``ceil(log2 K)`` bits)."""

    def __init__(self, centroids: torch.Tensor | nn.Parameter, index: torch.Tensor, owns_centroids: bool,
                 share_token: str):
        super().__init__(centroids.detach(), index)
        if isinstance(centroids, nn.Parameter):
            self.centroids = centroids  # the very same parameter in every sharing layer
        self.owns_centroids, self.share_token = bool(owns_centroids), share_token

    def storage(self) -> list[StorageItem]:
        b = index_bits(self.k)
        items = [StorageItem("index", self.index.numel(), b, f"uint{b}", self.index)]
        return (self.centroid_items() if self.owns_centroids else []) + items

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "k": self.k, "owns_centroids": self.owns_centroids,
                "share_token": self.share_token, **self.centroid_config()}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> SharedCodebookSource:
        token = config["share_token"]
        index = tensors["index"].reshape(config["shape"][:2])
        if config["owns_centroids"]:
            values, fmt = cls.centroids_from_export(config, tensors)
            cent = nn.Parameter(values.clone())
            _SHARED[token] = cent
        else:
            cent = _SHARED.get(token)
            if cent is None:
                raise ValueError(f"shared codebook {token!r} was not loaded before the layers that use it")
            fmt = {"bits": int(config.get("centroid_bits", 32))}  # 32 or 16 (no scale): global needs >= 16
        src = cls(cent, index, config["owns_centroids"], token)
        src.set_centroid_format(**fmt)
        return src


@register_source
class MaskedCodebookSource(SparsePattern, CodebookSource):
    """A codebook over the surviving edges of a pruned layer (``prune>kmeans``): ``centroids [K, n+1]``
    (float32, trainable), one ``ceil(log2 K)``-bit index per *surviving* edge, and the sparsity
    pattern at whichever is cheaper, exactly as :class:`bench.compression.pruning.MaskedSource` stores it (a
    1-bit mask over ``out * in`` edges, or the sorted flat positions at ``ceil(log2(out * in))``
    bits each). Pruned edges are exactly zero and stay zero (no centroid reaches them)."""

    def __init__(self, out_features: int, in_features: int, centroids: torch.Tensor, index: torch.Tensor,
                 flat_index: torch.Tensor):
        EdgeSource.__init__(self)
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.edge_dim = centroids.shape[1]
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("index", index.detach().reshape(-1).clone().long())
        self.register_buffer("flat_index", flat_index.detach().reshape(-1).clone().long())
        if self.index.numel() != self.flat_index.numel():
            raise ValueError("one index per surviving edge")

    positions_name = "positions"  # "index" is the codebook index

    def edge_tensor(self) -> torch.Tensor:
        w = self.centroids.new_zeros(self.out_features * self.in_features, self.edge_dim)
        w = w.index_copy(0, self.flat_index, gather_rows(self.codebook(), self.index, self))
        return w.reshape(self.out_features, self.in_features, self.edge_dim)

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        return EdgeSource.contract(self, features)  # one matmul over the decompressed tensor

    def storage(self) -> list[StorageItem]:
        b = index_bits(self.k)
        return [*self.centroid_items(), StorageItem("index", self.kept, b, f"uint{b}", self.index),
                self.pattern_item()]

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "k": self.k, "kept": self.kept, "pattern": self.pattern,
                **self.centroid_config()}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> MaskedCodebookSource:
        out, inp, _ = config["shape"]
        flat = cls.positions_from_export(config, tensors)
        cent, fmt = cls.centroids_from_export(config, tensors)
        src = cls(out, inp, cent, tensors["index"].reshape(-1), flat)
        src.set_centroid_format(**fmt)
        return src


def _layer_vectors(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edge vectors to cluster: a pruned layer's survivors only (with their flat positions),
    otherwise every edge vector (positions None)."""
    src = layer.source
    with torch.no_grad():
        if isinstance(src, (MaskedSource, MaskedCodebookSource)):
            w = src.edge_tensor().detach().float().cpu().reshape(-1, layer.edge_dim)
            flat = src.flat_index.detach().cpu()
            return w[flat], flat
        return layer.edge_tensor().detach().float().cpu().reshape(-1, layer.edge_dim), None


def kmeans_vectors(vectors: np.ndarray, k: int, n_init: int, seed: int):
    """K-means of the rows of ``vectors [N, D]`` (scikit-learn, k-means++ init).

    Returns ``(centroids [K_used, D] float32, labels [N] int64, inertia, K_used)`` with
    ``K_used = min(k, distinct rows)``. With no more distinct rows than ``k``, each distinct
    row is its own centroid (exact). The caller checks ``k <= N`` (:func:`cluster_model` raises
    :class:`~bench.errors.Infeasible` otherwise); this function itself accepts any ``k``.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, D] matrix of edge vectors, got shape {x.shape}")
    uniq, inverse = np.unique(x, axis=0, return_inverse=True)
    if uniq.shape[0] <= k:
        return uniq.astype(np.float32), inverse.reshape(-1).astype(np.int64), 0.0, int(uniq.shape[0])
    km = KMeans(n_clusters=int(k), init="k-means++", n_init=int(n_init), random_state=int(seed) % (2**31))
    labels = km.fit_predict(x)
    return km.cluster_centers_.astype(np.float32), labels.astype(np.int64), float(km.inertia_), int(k)


def cluster_model(model: nn.Module, k: int, scope: str = "layer", n_init: int = 4, seed: int = 0) -> dict:
    """Replace every KAN layer's edge vectors with a K-means codebook (see the module doc).

    Whatever the layer's current source (dense, generated, ...), the edge vectors it produces
    now are clustered; the old source (and a meta-learner with it) is dropped. Returns
    ``k_used`` and ``inertia`` per layer (scope ``global``: one each) and ``index_bits``.

    Raises :class:`~bench.errors.Infeasible` when ``k`` exceeds the edges of a layer (scope
    ``layer``) or of all layers together (``global``), before any layer is changed. Fewer
    *distinct* edge vectors than ``k`` is not an error: ``k_used`` is then that number (exact).
    """
    if scope not in ("layer", "global"):
        raise UserError(f"cluster scope must be 'layer' or 'global', got {scope!r}")
    if k < 2:
        raise UserError(f"codebook size K must be >= 2, got {k}")
    layers = kan_layers(model)
    picked = [_layer_vectors(layer) for _, layer in layers]
    vecs = [v for v, _ in picked]
    pruned = any(flat is not None for _, flat in picked)
    info = {"k_requested": int(k), "scope": scope}
    if scope == "layer":
        for (name, _), (v, flat) in zip(layers, picked):
            n = v.shape[0]
            if k > n:
                what = "surviving edges" if flat is not None else "edges"
                raise Infeasible(f"K={k} exceeds the {n} {what} of layer {name}; at most {n}")
        info["k_used"], info["inertia"], info["index_bits"] = {}, {}, {}
        for (name, layer), (v, flat) in zip(layers, picked):
            cent, labels, inertia, k_used = kmeans_vectors(v.numpy(), k, n_init, seed)
            if flat is None:
                src = CodebookSource(torch.from_numpy(cent),
                                     torch.from_numpy(labels).reshape(layer.out_features, layer.in_features))
            else:  # a pruned layer: a codebook of its survivors, the pattern kept
                src = MaskedCodebookSource(layer.out_features, layer.in_features, torch.from_numpy(cent),
                                           torch.from_numpy(labels), flat)
            layer.set_source(src)
            info["k_used"][name], info["inertia"][name], info["index_bits"][name] = k_used, inertia, index_bits(k_used)
        if pruned:
            info["kept_edges"] = {name: int(v.shape[0]) for (name, _), v in zip(layers, vecs)}
        return info
    if pruned:
        raise UserError("a global codebook on a pruned model is not supported; use scope = 'layer'")
    dims = {layer.edge_dim for _, layer in layers}
    if len(dims) > 1:
        raise UserError(f"a global codebook needs one edge size across layers, got {sorted(dims)}")
    n = sum(layer.out_features * layer.in_features for _, layer in layers)
    if k > n:
        raise Infeasible(f"K={k} exceeds the {n} edges of all layers (global codebook); at most {n}")
    allv = torch.cat([v.reshape(-1, layers[0][1].edge_dim) for v in vecs]).numpy()
    cent, labels, inertia, k_used = kmeans_vectors(allv, k, n_init, seed)
    shared = nn.Parameter(torch.from_numpy(cent))
    # the token names the shared codebook inside one file; derived from its values, so the same run
    # writes the same file
    token, start = hashlib.sha1(cent.tobytes()).hexdigest()[:32], 0
    for j, (_, layer) in enumerate(layers):
        n = layer.out_features * layer.in_features
        idx = torch.from_numpy(labels[start:start + n]).reshape(layer.out_features, layer.in_features)
        start += n
        src = SharedCodebookSource(shared, idx, owns_centroids=j == 0, share_token=token)
        layer.set_source(src)
        if j == 0:
            shared = src.centroids  # moved to the layer's device once; later layers reuse it
    info.update(k_used=k_used, inertia=inertia, index_bits=index_bits(k_used))
    return info


def codebook_param_groups(model: nn.Module, lr: float | None = None, tune_rest: bool = False) -> list[dict]:
    """Fine-tune groups after clustering: every codebook's centroids at ``lr`` (None: the
    fine-tune's rate, i.e. the shared rule) (indices are buffers and stay frozen); with
    ``tune_rest`` also the biases and norm parameters. Every parameter not in a group gets
    ``requires_grad=False``."""
    cent, seen = [], set()
    for _, layer in kan_layers(model):
        c = getattr(layer.source, "centroids", None)
        if c is None:
            raise ValueError(f"layer source {type(layer.source).__name__} has no codebook")
        if id(c) not in seen:
            seen.add(id(c))
            cent.append(c)
    rest = [p for p in model.parameters() if id(p) not in seen] if tune_rest else []
    tuned = seen | {id(p) for p in rest}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned)
    rate = {} if lr is None else {"lr": lr}
    return [{"params": cent, **rate}, {"params": rest, **rate}]


def codebook_bits(model: nn.Module) -> int:
    """Bits the model's edge sources store (codebooks + indices)."""
    return sum(it.bits for _, layer in kan_layers(model) for it in layer.source.storage())


# ----------------------------------------------------------------------------- entropy-coded indices
def entropy_code_indices(model: nn.Module) -> dict:
    """Store every codebook's indices ANS-coded under each layer's own index histogram
    (:func:`bench.compression.entropy.entropy_code_model` with only the ``index`` streams): the model computes
    the same; only its storage changes. Returns, per layer, the index bits at ``ceil(log2 K)`` each,
    the coded bits (stream + code table) and the empirical entropy."""
    for _, layer in kan_layers(model):
        src = getattr(layer.source, "inner", layer.source)  # (already coded: re-chosen)
        if not isinstance(src, CodebookSource):
            raise UserError(f"entropy_coding needs codebooks; layer source {type(src).__name__} has none")
    coded = entropy_code_model(model, only=("index",))["entropy_coded"]
    layers = dict(kan_layers(model))
    out = {"index_plain_bits": {}, "index_coded_bits": {}, "index_entropy_bits": {}}
    for name, streams in coded.items():
        r, src = streams.get("index"), layers[name].source
        plain = src.index.numel() * index_bits(src.k)
        out["index_plain_bits"][name] = plain
        out["index_coded_bits"][name] = r["coded_bits"] if r else plain
        out["index_entropy_bits"][name] = r["entropy_bits"] if r else round(empirical_entropy_bits(
            np.bincount(src.index.detach().cpu().reshape(-1).numpy())), 1)
    return out


def cluster_and_finetune(model: nn.Module, ctx, options, desc: str) -> dict:
    """The compress step of ``kmeans`` and ``metacluster`` (``options``: a :class:`ClusterOptions`):
    K-means codebooks of the model's current edge vectors (``K=None``: :func:`paper_k`), then the
    centroids (and with ``tune_rest`` biases and norms) fine-tuned with the indices frozen, on the
    shared budget unless ``finetune_epochs`` / ``finetune_lr`` say otherwise. Returns the numbers
    the row's ``info`` keeps: K requested and used, inertia, index bits, validation after each step."""
    c = options
    details = cluster_model(model, c.K if c.K is not None else paper_k(model), c.scope, c.n_init, ctx.seed)
    details["val_clustered"] = ctx.trainer.evaluate(model, "val")
    if c.centroid_bits < 32:  # quantised centroids, fine-tuned through the straight-through estimator
        details.update(quantize_centroids(model, c.centroid_bits, c.centroid_scale))
        details["val_quantized"] = ctx.trainer.evaluate(model, "val")
    fit = ctx.finetune(model, codebook_param_groups(model, tune_rest=c.tune_rest), lr=c.finetune_lr,
                       epochs=c.finetune_epochs, desc=desc)
    details.update(val_finetuned=fit.best_val, finetune_best_epoch=fit.best_epoch)
    if c.entropy_coding:  # the indices are final: store them ANS-coded (the forward does not change)
        details.update(entropy_code_indices(model))
    return details


def quantize_centroids(model: nn.Module, bits: int, per: str = "centroid") -> dict:
    """Store every codebook's centroids at ``bits`` (16: float16; below: symmetric integers with a
    float32 scale per centroid or per codebook, :meth:`bench.model.sources.CodebookSource.set_centroid_format`);
    the forward then sees the quantised values and a fine-tune trains the float centroids through
    them (straight-through). Returns the bits of the centroids before and after."""
    before = after = 0
    for _, layer in kan_layers(model):
        src = layer.source
        if not isinstance(src, CodebookSource):
            raise ValueError(f"layer source {type(src).__name__} has no codebook")
        owner = getattr(src, "owns_centroids", True)
        if owner:
            before += sum(it.bits for it in src.centroid_items())
        src.set_centroid_format(bits, per)
        if owner:
            after += sum(it.bits for it in src.centroid_items())
    return {"centroid_bits_before": before, "centroid_bits_after": after}


@dataclass
class ClusterOptions:
    """K-means codebooks and the centroid fine-tune."""

    K: int | None = field(default=None, metadata={
        "min": 2, "max": 65536, "help": "codebook size; default (None) 16 for kan, 256 for convkan"})
    scope: str = field(default="layer", metadata={"choices": ["layer", "global"],
                                                   "help": "one codebook per layer or one for the model"})
    n_init: int = field(default=4, metadata={"min": 1, "max": 100, "help": "K-means restarts"})
    finetune_epochs: int | None = field(default=None, metadata={
        "min": 0, "help": "centroid fine-tune epochs; default (None) the sweep's finetune budget"})
    finetune_lr: float | None = field(default=None, metadata={
        "help": "peak lr of the centroid fine-tune; default (None) the shared rule, finetune_lr_scale x lr"})
    tune_rest: bool = field(default=False, metadata={"help": "also fine-tune biases and norms"})
    entropy_coding: bool = field(default=False, metadata={
        "help": "store the indices ANS-coded under each layer's index histogram"})
    centroid_bits: int = field(default=32, metadata={
        "choices": [32, 16, 8, 6, 5, 4, 3, 2],
        "help": "centroid precision: 32 float32, 16 float16, below b-bit integers x scales (STE fine-tune)"})
    centroid_scale: str = field(default="centroid", metadata={
        "choices": ["centroid", "codebook"], "help": "one float32 scale per centroid or per codebook (bits < 16)"})

    def validate(self):
        if self.finetune_lr is not None:
            positive("finetune_lr", self.finetune_lr)
        if self.centroid_bits < 16 and self.scope != "layer":
            raise UserError(f"centroid_bits={self.centroid_bits} (integer centroids) needs scope = 'layer'")
