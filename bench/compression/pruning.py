"""Edge pruning for KANs: scoring, budgeted selection, masked sources and structured node removal.

Scoring is kept apart from applying (as in Torch-Pruning):

- :func:`magnitude_scores`: the L2 norm of every edge vector;
- :func:`attribution_scores`: pykan-style attribution. On a calibration batch, each edge's
  activation scale is the standard deviation of ``phi_{o,i}(x_i)`` over the batch; node scores
  start at 1 on the outputs and flow back,
  ``edge[o, i] = act_std[o, i] * node[o] / (out_std[o] + 1e-4)``, ``node_in[i] = sum_o edge[o, i]``.

Applying: :class:`MaskedSource` keeps only the surviving edge vectors (float32) and the sparsity
pattern at whichever is cheaper, a 1-bit-per-edge mask (``uint1``, ``out * in`` bits) or a sorted
index list (``uint<ceil(log2(out * in))>`` per survivor). :func:`plan_selection` solves for the
number of kept edges from that exact bit formula, so a requested coefficient compression ratio is
met from below (usually within one edge's worth of bits: one more edge can connect a few others).
Every plan is *connected*: each kept edge lies on an input-to-output path, and the smallest plan is
the best-scoring single path (one edge per layer). A budget below that raises
:class:`~bench.errors.Infeasible`.

Structured result (fully connected ``KAN`` whose bases act on each input separately; not for the RBF
basis with LayerNorm, whose normalisation couples a layer's inputs, nor ConvKAN, where a constant
channel is no longer constant after zero padding): a hidden node with no incoming edges outputs its
bias, so its outgoing edges are folded into the next layer's bias; a hidden node with no outgoing
edges is never read, so its incoming edges are dropped. Repeated to a fixpoint
(:func:`clean_chain`), after which the dead nodes have no edges at all and :func:`remove_dead_nodes`
rebuilds the layers at the smaller widths with exactly the same outputs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from bench.errors import Infeasible
from bench.model.bases import basis_major
from bench.model.kan import KAN, KANLayer, kan_layers, layer_inputs
from bench.model.sources import EdgeSource, StorageItem, float_item, index_bits, register_source

FLOAT_BITS = 32


# ----------------------------------------------------------------------------- storage formula
def pattern_bits(out_features: int, in_features: int, kept: int) -> tuple[int, str]:
    """Bits of the cheaper sparsity pattern and its kind (``mask`` on a tie)."""
    mask = out_features * in_features
    index = kept * index_bits(out_features * in_features)
    return (mask, "mask") if mask <= index else (index, "index")


def masked_layer_bits(out_features: int, in_features: int, edge_dim: int, kept: int) -> int:
    """Stored bits of one masked layer: survivors at float32 plus the cheaper pattern."""
    return kept * edge_dim * FLOAT_BITS + pattern_bits(out_features, in_features, kept)[0]


class SparsePattern:
    """The sparsity pattern of a pruned edge source (``flat_index``: the surviving edges' sorted flat
    positions ``o * in + i``), stored as a 1-bit mask or as the positions at ``ceil(log2(out * in))``
    bits, whichever is smaller (:func:`pattern_bits`). Shared by :class:`MaskedSource` and the
    codebook over a pruned model (:class:`bench.compression.codebook.MaskedCodebookSource`)."""

    positions_name = "index"  # the stored tensor's name when the pattern is the position list

    @property
    def kept(self) -> int:
        return self.flat_index.numel()

    @property
    def pattern(self) -> str:
        return pattern_bits(self.out_features, self.in_features, self.kept)[1]

    def pattern_item(self) -> StorageItem:
        if self.pattern == "mask":
            m = torch.zeros(self.out_features * self.in_features, dtype=torch.uint8, device=self.flat_index.device)
            m[self.flat_index] = 1
            return StorageItem("mask", m.numel(), 1, "uint1", m)
        b = index_bits(self.out_features * self.in_features)
        return StorageItem(self.positions_name, self.kept, b, f"uint{b}", self.flat_index)

    @classmethod
    def positions_from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if config["pattern"] == "mask":
            return torch.nonzero(tensors["mask"].reshape(-1) != 0, as_tuple=False).reshape(-1)
        return tensors[cls.positions_name].reshape(-1).long()


@register_source
class MaskedSource(SparsePattern, EdgeSource):
    """Surviving edge vectors ``values [kept, n+1]`` (float32, trainable) at the sorted flat
    positions ``flat_index`` (``o * in + i``); pruned edges are zero and stay zero.

    ``contract`` skips the inputs that no surviving edge reads (one dense matmul over the active
    columns): on CPU a random-sparse kernel at 1/8 density is slower than dense BLAS, so the
    real saving comes from whole inputs and nodes that pruning removes.
    """

    def __init__(self, out_features: int, in_features: int, edge_dim: int, flat_index: torch.Tensor,
                 values: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features, self.edge_dim = int(out_features), int(in_features), int(edge_dim)
        idx = flat_index.detach().reshape(-1).long()
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("flat_index must be strictly increasing")
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= out_features * in_features):
            raise ValueError("flat_index out of range")
        self.register_buffer("flat_index", idx.clone())
        self.values = nn.Parameter(values.detach().reshape(idx.numel(), edge_dim).clone().float())

    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor) -> MaskedSource:
        out, inp, e = weight.shape
        idx = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
        return cls(out, inp, e, idx, weight.detach().reshape(out * inp, e)[idx])

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.flat_index.device)
        m[self.flat_index] = True
        return m.reshape(self.out_features, self.in_features)

    def edge_tensor(self) -> torch.Tensor:
        w = self.values.new_zeros(self.out_features * self.in_features, self.edge_dim)
        w = w.index_copy(0, self.flat_index, self.values)
        return w.reshape(self.out_features, self.in_features, self.edge_dim)

    def active_inputs(self) -> torch.Tensor:
        """Inputs that still have at least one edge (sorted; computed once per pattern)."""
        key = (self.flat_index.data_ptr(), self.flat_index._version, self.flat_index.device)
        cached = getattr(self, "_active", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.unique(self.flat_index % self.in_features))
            self._active = cached
        return cached[1]

    def use_fast_path(self) -> bool:
        """Skip the inputs no surviving edge reads when that drops at least a tenth of them."""
        return 10 * self.active_inputs().numel() <= 9 * self.in_features

    def active_tensor(self, basis_major: bool = False) -> torch.Tensor:
        """The edge tensor over the active inputs only, flattened to ``[out, n_active * (n+1)]`` (``[out, n+1,
        n_active]`` order when ``basis_major``). At inference it is built once and kept until the values or the
        pattern change, in place of the full decompressed tensor: the smaller shape a pruned layer runs at."""
        cols = self.active_inputs()

        def build() -> torch.Tensor:
            w = self.edge_tensor()[:, cols, :]
            return (w.transpose(1, 2) if basis_major else w).reshape(self.out_features, -1)

        return self.kept_at_inference(("active", basis_major), build)

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        if not self.use_fast_path():
            return super().contract(features)
        # One dense matmul over the active inputs only (random sparse kernels lose to dense
        # BLAS at these densities on CPU; measured by `python -m bench perf`).
        cols, b = self.active_inputs(), features.shape[0]
        if basis_major(features):  # read the compiled features in their own [B, n+1, in] order
            return features.transpose(1, 2)[:, :, cols].reshape(b, -1) @ self.active_tensor(True).t()
        return features[:, cols, :].reshape(b, -1) @ self.active_tensor().t()

    def storage(self) -> list[StorageItem]:
        return [float_item("values", self.values), self.pattern_item()]

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "kept": self.kept, "pattern": self.pattern}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> MaskedSource:
        out, inp, e = config["shape"]
        values = tensors["values"].reshape(config["kept"], e)
        return cls(out, inp, e, cls.positions_from_export(config, tensors), values)


# ----------------------------------------------------------------------------- scoring
def edge_masks(model: nn.Module) -> list[torch.Tensor]:
    """The current alive-edge mask of every KAN layer (all True for an unpruned layer)."""
    return [edge_masks_of(layer) for _, layer in kan_layers(model)]


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> list[torch.Tensor]:
    """``||w[o, i, :]||_2`` for every edge, one ``[out, in]`` tensor per KAN layer."""
    return [layer.edge_tensor().detach().norm(dim=-1) for _, layer in kan_layers(model)]


@torch.no_grad()
def _link_back(score_in: torch.Tensor, prev_out: int) -> torch.Tensor:
    """Map a layer's input-node scores to the previous layer's output nodes (identity for a KAN;
    a convolution's ``in_channels * k * k`` patch inputs sum back to their channel)."""
    if score_in.numel() == prev_out:
        return score_in
    if score_in.numel() % prev_out == 0:
        return score_in.reshape(prev_out, -1).sum(1)
    raise ValueError(f"cannot link {score_in.numel()} inputs back to {prev_out} outputs")


@torch.no_grad()
def attribution_scores(model: nn.Module, x: torch.Tensor, chunk: int = 8) -> list[torch.Tensor]:
    """pykan-style edge attribution on calibration batch ``x``; one ``[out, in]`` per layer."""
    layers = [layer for _, layer in kan_layers(model)]
    inputs = layer_inputs(model, x)
    act_std, out_std = [], []
    for layer, xin in zip(layers, inputs):
        feats = layer.features(xin)  # [N, in, E]
        w = layer.edge_tensor().detach()
        stds = []
        for o in range(0, layer.out_features, chunk):
            acts = torch.einsum("nie,oie->noi", feats, w[o:o + chunk])  # [N, chunk, in]
            stds.append(acts.std(dim=0, unbiased=False))
        act_std.append(torch.cat(stds, 0))
        out_std.append(layer.source.contract(feats).std(dim=0, unbiased=False))
    scores: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    node = torch.ones(layers[-1].out_features, device=x.device)
    for k in range(len(layers) - 1, -1, -1):
        edge = act_std[k] * (node / (out_std[k] + 1e-4)).unsqueeze(1)
        scores[k] = edge
        if k > 0:
            node = _link_back(edge.sum(0), layers[k - 1].out_features)
    return scores


# ----------------------------------------------------------------------------- structure
def chain_cleanable(model: nn.Module) -> bool:
    """True if dead hidden nodes can be removed exactly: a fully connected ``KAN`` whose bases act on
    every input separately (no parameters, no normalisation across inputs) and whose layers have biases."""
    if not isinstance(model, KAN):
        return False
    for layer in model.layers:
        basis = layer.basis
        if list(basis.parameters()) or any(isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
                                           for m in basis.modules()):
            return False
        if layer.bias is None or layer.norm_kind != "none" or layer.act_kind != "none":
            return False
    return True


def clean_chain(masks: list[torch.Tensor], fold=None) -> list[torch.Tensor]:
    """Fixpoint over the hidden nodes of a layer chain (``masks[l]`` is ``[out_l, in_l]``): out-edges
    of a node with no in-edges are folded (``fold(l + 1, nodes)`` is called first, then they are
    cleared); in-edges of a node with no out-edges are cleared. Returns new masks."""
    masks = [m.clone() for m in masks]
    changed = True
    while changed:
        changed = False
        for k in range(len(masks) - 1):
            has_in, has_out = masks[k].any(1), masks[k + 1].any(0)
            unread = has_in & ~has_out
            if unread.any():
                masks[k][unread] = False
                changed = True
            const = ~has_in & has_out
            if const.any():
                nodes = torch.nonzero(const).reshape(-1)
                if fold is not None:
                    fold(k + 1, nodes, masks[k + 1])
                masks[k + 1][:, const] = False
                changed = True
    return masks


def alive_nodes(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Indices of the hidden nodes that keep an edge after cleaning (at least one per layer)."""
    res = []
    for k in range(len(masks) - 1):
        alive = masks[k].any(1) | masks[k + 1].any(0)
        idx = torch.nonzero(alive).reshape(-1)
        res.append(idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=alive.device))
    return res


def structured_shapes(masks: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(out, in)`` of every layer after dead hidden nodes are removed."""
    alive = alive_nodes(masks)
    outs = [len(a) for a in alive] + [masks[-1].shape[0]]
    ins = [masks[0].shape[1]] + [len(a) for a in alive]
    return list(zip(outs, ins))


@torch.no_grad()
def fold_constant_nodes(model: KAN):
    """The ``fold`` callback of :func:`clean_chain` for a real model: node ``j`` of hidden layer
    ``l - 1`` outputs its bias; add ``sum_j phi_{o,j}(bias_j)`` over kept edges to layer ``l``'s bias."""
    layers = list(model.layers)

    def fold(k: int, nodes: torch.Tensor, mask: torch.Tensor) -> None:
        prev, nxt = layers[k - 1], layers[k]
        x = torch.zeros(1, nxt.in_features, device=prev.bias.device)
        x[0, nodes] = prev.bias.detach()[nodes]
        feats = nxt.features(x)[0, nodes]  # [k, E]: basis acts per input, other inputs do not matter
        w = nxt.edge_tensor().detach()[:, nodes, :] * mask[:, nodes].unsqueeze(-1)
        nxt.bias.add_(torch.einsum("oke,ke->o", w, feats))

    return fold


@torch.no_grad()
def apply_masks(model: nn.Module, masks: list[torch.Tensor], clean: bool = True) -> list[torch.Tensor]:
    """Swap every KAN layer's source for a :class:`MaskedSource` keeping ``masks`` (edges outside the
    current source's mask are not revived). With ``clean`` and a cleanable chain, dead-node edges
    are folded/cleared first (outputs unchanged). Returns the masks applied."""
    layers = kan_layers(model)
    masks = [m.to(cur.device, torch.bool) & cur for m, cur in zip(masks, edge_masks(model))]
    if clean and chain_cleanable(model):
        masks = clean_chain(masks, fold_constant_nodes(model))
    for (_, layer), m in zip(layers, masks):
        layer.set_source(MaskedSource.from_mask(layer.edge_tensor().detach(), m).to(_device(layer)))
    return masks


@torch.no_grad()
def remove_dead_nodes(model: KAN) -> list[int]:
    """Rebuild a cleaned, masked ``KAN`` without its dead hidden nodes (same outputs); returns the
    number of nodes removed per hidden layer."""
    if not chain_cleanable(model):
        raise ValueError("remove_dead_nodes needs a KAN with per-input bases and biases")
    masks = edge_masks(model)
    if any(not torch.equal(a, b) for a, b in zip(clean_chain(masks), masks)):
        raise ValueError("masks are not cleaned; call apply_masks(..., clean=True) first")
    alive = alive_nodes(masks)
    old = list(model.layers)
    device = old[0].bias.device
    keep_out = alive + [torch.arange(old[-1].out_features, device=device)]
    keep_in = [torch.arange(old[0].in_features, device=device)] + alive
    new_layers = []
    for layer, ko, ki in zip(old, keep_out, keep_in):
        ko, ki = ko.to(device), ki.to(device)
        nl = KANLayer(len(ki), len(ko), model.basis_name, layer.basis.config()).to(device)
        basis_state = layer.basis.state_dict()
        if "knots" in basis_state and basis_state["knots"].dim() == 2:  # per-input knots: the kept inputs' rows
            basis_state["knots"] = basis_state["knots"][ki]
        nl.basis.load_state_dict(basis_state)
        nl.bias.copy_(layer.bias[ko])
        w = layer.edge_tensor().detach()[ko][:, ki]
        m = edge_masks_of(layer)[ko][:, ki]
        nl.set_source(MaskedSource.from_mask(w, m).to(device))
        new_layers.append(nl)
    removed = [layer.out_features - len(a) for layer, a in zip(old[:-1], alive)]
    model.layers = nn.ModuleList(new_layers)
    model.widths = [new_layers[0].in_features] + [nl.out_features for nl in new_layers]
    return removed


def edge_masks_of(layer: KANLayer) -> torch.Tensor:
    """The alive-edge mask ``[out, in]`` of one layer (all True unless it is masked)."""
    src = layer.source
    if isinstance(src, MaskedSource):
        return src.mask()
    return torch.ones(layer.out_features, layer.in_features, dtype=torch.bool, device=_device(layer))


def _device(layer: KANLayer) -> torch.device:
    return layer.edge_tensor().device


# ----------------------------------------------------------------------------- budgeted selection
def coef_dense_bits(model: nn.Module) -> int:
    return sum(math.prod(layer.source.shape) * FLOAT_BITS for _, layer in kan_layers(model))


def _prefix_masks(orders, shapes, counts) -> list[torch.Tensor]:
    masks = []
    for order, (out, inp), k in zip(orders, shapes, counts):
        m = torch.zeros(out * inp, dtype=torch.bool)
        m[order[:k]] = True
        masks.append(m.reshape(out, inp))
    return masks


def chain_links(shapes) -> list[int] | None:
    """How the layers ``shapes = [(out_l, in_l), ...]`` connect: ``links[l]`` inputs of layer ``l``
    read each output node of layer ``l - 1`` (``in_l = out_{l-1} * links[l]``, input ``i`` reads
    node ``i // links[l]``): 1 for a KAN, ``kernel^2`` for a KAN convolution after a convolution
    (channel-major patches), 1 for the ConvKAN head. ``links[0] = 1`` (model inputs). None when the
    sizes do not chain (then no connectivity is assumed)."""
    links = [1]
    for (out_prev, _), (_, inp) in zip(shapes[:-1], shapes[1:]):
        if inp % out_prev:
            return None
        links.append(inp // out_prev)
    return links


def connected_masks(masks: list[torch.Tensor], links: list[int]) -> list[torch.Tensor]:
    """Only the kept edges that lie on an input-to-output path (:func:`chain_links` tells which node
    an input reads). For a KAN (all links 1) this is :func:`clean_chain` without folding."""
    reach = torch.ones(masks[0].shape[1], dtype=torch.bool)  # inputs of layer l reachable from the model inputs
    reach_in = []
    for m, g in zip(masks, links):
        if len(reach_in):
            reach = reach.repeat_interleave(g)
        reach_in.append(reach)
        reach = (m & reach.unsqueeze(0)).any(1)
    co = torch.ones(masks[-1].shape[0], dtype=torch.bool)  # outputs of layer l that reach the model outputs
    co_out = [co]
    for k in range(len(masks) - 1, 0, -1):
        read = (masks[k] & co.unsqueeze(1)).any(0)  # inputs of layer k read on a path to the outputs
        co = read.reshape(masks[k - 1].shape[0], links[k]).any(1)
        co_out.insert(0, co)
    return [m & r.unsqueeze(0) & c.unsqueeze(1) for m, r, c in zip(masks, reach_in, co_out)]


def best_path(scores: list[torch.Tensor], alive: list[torch.Tensor], links: list[int]) -> list[tuple[int, int]] | None:
    """The input-to-output path of alive edges, one per layer, with the largest sum of scores
    (dynamic programming over the nodes); ``[(o, i), ...]`` per layer, None if there is none."""
    best = torch.zeros(scores[0].shape[1], dtype=torch.float64)  # best score of a path ending at each input
    back = []
    for k, (s, a) in enumerate(zip(scores, alive)):
        if k:
            best = best.repeat_interleave(links[k])
        tot = torch.where(a, s.double(), torch.full_like(s, -math.inf, dtype=torch.float64)) + best.unsqueeze(0)
        best, arg = tot.max(1)
        back.append(arg)
    if not bool(torch.isfinite(best).any()):
        return None
    o = int(torch.argmax(torch.where(torch.isfinite(best), best, torch.full_like(best, -math.inf))))
    path = []
    for k in range(len(scores) - 1, -1, -1):
        i = int(back[k][o])
        path.append((o, i))
        o = i // links[k]
    return path[::-1]


def plan_bits(masks: list[torch.Tensor], edge_dims: list[int], structured: bool = False) -> int:
    """Stored coefficient bits of masked layers (``structured``: at the widths left after dead-node
    removal; the masks must be cleaned)."""
    shapes = structured_shapes(masks) if structured else [tuple(m.shape) for m in masks]
    return sum(masked_layer_bits(o, i, e, int(m.sum())) for (o, i), e, m in zip(shapes, edge_dims, masks))


def smallest_connected_bits(shapes, edge_dims: list[int], structured: bool = False) -> int:
    """Stored coefficient bits of the smallest connected model: one edge per layer on one
    input-to-output path (the same for every path)."""
    masks = []
    for out, inp in shapes:  # edge (0, 0) of every layer: input 0 reads node 0 whatever the links
        m = torch.zeros(out, inp, dtype=torch.bool)
        m[0, 0] = True
        masks.append(m)
    return plan_bits(masks, edge_dims, structured)


def plan_selection(scores: list[torch.Tensor], alive: list[torch.Tensor], edge_dims: list[int], budget_bits: int,
                   scope: str = "global", structured: bool = False) -> tuple[list[torch.Tensor], int]:
    """Connected keep-masks whose exact stored coefficient bits are the largest not above ``budget_bits``.

    Every plan is connected: each kept edge lies on a path from the inputs to the outputs (layers
    chained as :func:`chain_links` says). The smallest plan is the best-scoring single path of
    alive edges, one per layer (:func:`best_path`). Larger plans add the top-``t`` alive edges by
    score to it, ``global``: over all layers, ``layer``: ``round(t * n_l / N)`` of every layer
    (same kept fraction everywhere), then drop the edges not on a path (they are never counted;
    a later edge may connect them). ``structured`` counts the bits at the widths left after
    dead-node removal (what a cleaned model stores). The bits grow with ``t``: binary search.
    Returns (masks, bits). Layers that do not chain (:func:`chain_links` is None) get their best
    edge each as the minimum and no connectivity pruning.

    Raises :class:`~bench.errors.Infeasible` when even the smallest connected model is above the
    budget or the alive edges hold no path.
    """
    shapes = [tuple(s.shape) for s in scores]
    scores = [s.detach().float().cpu() for s in scores]
    alive = [a.detach().cpu().bool().reshape(s.shape) for a, s in zip(alive, scores)]
    links = chain_links(shapes)
    if structured and links != [1] * len(shapes):
        raise ValueError("a structured plan needs a fully connected KAN chain")
    if links is not None:
        alive = connected_masks(alive, links)
        path = best_path(scores, alive, links)
    else:
        path = None if min(int(a.sum()) for a in alive) < 1 else [
            divmod(int(torch.where(a, s, torch.full_like(s, -math.inf)).argmax()), s.shape[1])
            for s, a in zip(scores, alive)]
    if path is None:
        raise Infeasible("pruning needs an input-to-output path of surviving edges, but this model has none")
    base = []
    for (out, inp), (o, i) in zip(shapes, path):
        m = torch.zeros(out, inp, dtype=torch.bool)
        m[o, i] = True
        base.append(m)
    flat = [s.reshape(-1) for s in scores]
    n_alive = [int(a.sum()) for a in alive]
    orders = []
    for s, a in zip(flat, alive):
        s = torch.where(a.reshape(-1), s, torch.full_like(s, -math.inf))
        orders.append(torch.argsort(s, descending=True, stable=True)[: int(a.sum())])
    total = sum(n_alive)
    sizes = [s.numel() for s in flat]

    # global: the layer owning each edge, in descending score order over all layers
    owner = torch.cat([torch.full((na,), i) for i, na in enumerate(n_alive)])
    owner = owner[torch.argsort(torch.cat([s[o] for s, o in zip(flat, orders)]), descending=True, stable=True)]

    def counts_for(t: int) -> list[int]:
        if scope == "layer":
            return [min(na, round(t * n / sum(sizes))) for na, n in zip(n_alive, sizes)]
        return [int(c) for c in torch.bincount(owner[:t], minlength=len(sizes))]

    def plan(t: int) -> tuple[int, list[torch.Tensor]]:
        masks = [m | b for m, b in zip(_prefix_masks(orders, shapes, counts_for(t)), base)]
        if links is not None:
            masks = connected_masks(masks, links)
        return plan_bits(masks, edge_dims, structured), masks

    lo, hi = 0, total
    best_b, best_m = plan(0)
    if best_b > budget_bits:
        dense = sum(o * i * e * FLOAT_BITS for (o, i), e in zip(shapes, edge_dims))
        raise Infeasible(f"pruning budget of {budget_bits} coefficient bits is below the {best_b} bits of the "
                         f"smallest connected model (1 edge per layer); largest feasible coefficient ratio "
                         f"{floor_sig(dense / best_b)}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        b, m = plan(mid)
        if b <= budget_bits:
            lo, best_b, best_m = mid, b, m
        else:
            hi = mid - 1
    return best_m, best_b


def floor_sig(x: float, digits: int = 3) -> str:
    """``x`` rounded *down* to ``digits`` significant digits (so the printed ratio is still feasible)."""
    if not math.isfinite(x) or x <= 0:
        return f"{x:g}"
    decimals = digits - 1 - math.floor(math.log10(x))
    v = math.floor(Fraction(x) * Fraction(10) ** decimals) / Fraction(10) ** decimals
    return f"{float(v):.{max(decimals, 0)}f}"


# ----------------------------------------------------------------------------- cost
@torch.no_grad()
def layer_positions(model: nn.Module, x: torch.Tensor) -> list[int]:
    """How many rows each KAN layer evaluates per sample (1 for a KAN; output pixels for a conv)."""
    rows = layer_inputs(model, x[:1], max_rows=1 << 62)
    return [r.shape[0] for r in rows]


def edge_macs(model: nn.Module, positions: list[int]) -> int:
    """Edge multiply-accumulates per sample: ``positions * kept_edges * (n + 1)`` summed over layers."""
    total = 0
    for (_, layer), p in zip(kan_layers(model), positions):
        src = layer.source
        kept = src.kept if isinstance(src, MaskedSource) else layer.out_features * layer.in_features
        total += p * kept * layer.edge_dim
    return total
