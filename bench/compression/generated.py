"""Meta-learned edge vectors (MetaKAN, and stage 1 of MetaCluster): the generated source.

Meta-learned edge vectors (MetaKAN) and edge-vector codebooks (MetaCluster, ``kmeans``).

Instead of storing every edge vector, each edge ``(o, i)`` of a KAN layer
keeps a small learnable embedding ``z[o, i] in R^d`` and a *meta-learner*

    w[o, i, :] = W2 . relu(W1 . z[o, i] + b1) + b2          (Linear(d, h) -> ReLU -> Linear(h, n+1))

generates its edge vector (the ``n`` basis coefficients, then the base-branch weight), as in
MetaKAN (Zhao et al., ICML 2025). Embeddings are Xavier-normal over the ``[edges, d]`` matrix,
the meta-learner's weights Xavier-normal with zero biases (as the MetaKAN reference code does).
One meta-learner per layer by default; with ``shared=True`` one learner serves every layer.

Storage (what a deployed generated model keeps, all float32): every embedding, plus each
meta-learner's two weight matrices and biases **once**. A shared learner is one module object
registered under every layer's source (so PyTorch trains it once); its tensors are counted and
exported by the *owner*, the first layer's source, only. Non-owner sources export a token
naming the learner; on reload the owner (loaded first: layers load in forward order) publishes
its learner under that token and the other layers pick it up.

:func:`generate_model` swaps the sources in, :func:`param_groups` gives the two AdamW groups
(embeddings, meta-learners), :func:`stage_key` the cache key of a generator-trained model (MetaKAN
and MetaCluster train the very same generator, so with equal settings they share it), and
:class:`GeneratorOptions` the hyperparameter block both methods compose into their ``Config``.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from bench.config import positive
from bench.errors import UserError
from bench.model.bases import run_compiled
from bench.model.kan import kan_layers
from bench.model.kinds import kind_of
from bench.model.sources import EdgeSource, StorageItem, float_item, register_source

# Learners shared across layers, published by their owner while a file loads.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def paper_hidden(model: nn.Module) -> int:
    """The meta-learner width the MetaKAN paper uses: 32 for fully connected KANs, 64 for ConvKANs."""
    return 64 if kind_of(model).convolutional else 32


class MetaLearner(nn.Module):
    """``Linear(d, h) -> ReLU -> Linear(h, out_dim)``: embedding -> edge vector."""

    def __init__(self, d: int, h: int, out_dim: int):
        super().__init__()
        self.d, self.h, self.out_dim = int(d), int(h), int(out_dim)
        self.fc1, self.fc2 = nn.Linear(self.d, self.h), nn.Linear(self.h, self.out_dim)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z)))

    def columns(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` transposed, ``[out_dim, N]`` row-major: the second product as ``[out_dim, h] @
        [h, N]``, the orientation the CPU's GEMM is fast with for a few outputs and many rows (measured,
        N = 50,176, h = 32, 9 outputs, 2 threads: 0.42 ms against 1.76 ms for ``[N, h] @ [h, out_dim]``).
        At ``d = 1`` on a CPU, for at least :data:`PIECES_MIN_WORK` hidden values (edges x ``h``), through
        :func:`piecewise_columns` instead (the same function, without the hidden layer; measured on CPUs only:
        on a GPU its extra small launches, atomic and so run-to-run varying per-piece sums and autocast are
        untried, so the hidden layer runs there)."""
        if self.d == 1 and z.device.type == "cpu" and z.shape[0] * self.h >= PIECES_MIN_WORK:
            return piecewise_columns(self, z.reshape(-1))
        return torch.addmm(self.fc2.bias.unsqueeze(1), self.fc2.weight, F.relu(self.fc1(z)).t())

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- d = 1: the learner as a table of linear pieces -------------------------------------------------------
# With one input, relu(w1_j z + b1_j) bends at one point, t_j = -b1_j / w1_j, so the learner is linear between
# its h sorted kinks: on the k-th of the h + 1 pieces, w(z) = S_k z + C_k with S_k = W2 (a_k * w1) and
# C_k = W2 (a_k * b1) + b2 (a_k: which hidden units are on there). Every edge then reads two columns of an
# [out_dim, h + 1] table instead of passing through the [N, h] hidden layer, whose passes are what a MetaKAN
# step spent its time on (memory-bound at N = 50,176 edges). Gradients reach the embeddings through the
# piece's slope and W1, b1, W2, b2 through the tables, as they do through the hidden layer (which units
# are on is piecewise constant, as relu's derivative is). Measured, kan [784, 64, 10] bspline, d = 1,
# h = 32, batch 128, 2 threads, one process: a training step 7.1 -> 4.7-5.6 ms (dense 2.9-3.1 ms), the 640-edge
# head keeping its hidden layer (PIECES_MIN_WORK, below). At d >= 2 the pieces are regions of the embedding
# space, no longer a sorted list: there the hidden layer runs (~3x dense).

# Below this many hidden values (edges x h) the hidden layer is cheaper than the table's fixed ~0.5 ms (sorting
# the kinks, building the tables, two compiled calls). Measured forward + backward, 2 threads, 9 outputs, table /
# hidden layer in ms: h = 32, 8,192 edges 0.67 / 0.54, 16,384 edges 1.14 / 2.16, 50,176 edges 1.84 / 5.27;
# h = 64, 4,608 edges 0.65 / 0.58, 8,192 edges 0.74 / 0.94 (a ConvKAN [8, 16, 32]'s largest layer has 4,608).
PIECES_MIN_WORK = 1 << 19


def piece_tables(learner: MetaLearner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kinks, slopes, intercepts)`` of a ``d = 1`` learner: its kinks sorted and padded with ``+inf`` to
    a power of two (``[P]``, ``P > h``; a unit with ``w1 = 0`` never bends: its kink is ``+inf`` and it is on
    where ``b1 > 0``), and each piece's slope and intercept, ``[out_dim, h + 1]``, piece ``k`` holding the
    inputs with exactly ``k`` kinks at or below them. Differentiable in the learner's parameters."""
    w1, b1 = learner.fc1.weight[:, 0], learner.fc1.bias
    h = w1.shape[0]
    with torch.no_grad():
        t = torch.where(w1 != 0, -b1 / w1, torch.full_like(b1, float("inf")))
        sorted_t, order = torch.sort(t)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(h, device=order.device)
        k = torch.arange(h + 1, device=order.device).unsqueeze(1)  # piece k: the k lowest kinks passed
        on = ((w1 > 0) & (rank < k)) | ((w1 < 0) & (rank >= k)) | ((w1 == 0) & (b1 > 0))  # [h + 1, h]
        on = on.to(w1.dtype)
        kinks = torch.full((1 << h.bit_length(),), float("inf"), dtype=w1.dtype, device=w1.device)
        kinks[:h] = sorted_t
    slopes = learner.fc2.weight @ (on * w1).t()
    intercepts = torch.addmm(learner.fc2.bias.unsqueeze(1), learner.fc2.weight, (on * b1).t())
    return kinks, slopes, intercepts


def _pieces(z: torch.Tensor, kinks: torch.Tensor, slopes: torch.Tensor, intercepts: torch.Tensor):
    """Each input's piece (how many kinks lie at or below it: a branchless binary search over the padded
    kinks) and the columns ``slopes[:, piece] * z + intercepts[:, piece]``; compiled, one loop each."""
    piece = torch.zeros_like(z, dtype=torch.long)
    step = kinks.shape[0] // 2
    while step:
        piece = piece + step * (z >= kinks[piece + step - 1]).long()
        step //= 2
    piece = piece.clamp(max=slopes.shape[1] - 1)  # z = +inf passes the padding too
    return slopes[:, piece] * z + intercepts[:, piece], piece


def _input_grad(grad: torch.Tensor, piece: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    return (grad * slopes[:, piece]).sum(0)


class _Pieces(torch.autograd.Function):
    """``[N] -> [out_dim, N]``: :func:`_pieces` (compiled where a compiler works,
    :func:`bench.model.bases.run_compiled`; eagerly, ``searchsorted`` and two column gathers are faster than
    its binary search), its backward by hand: the input's gradient is the slope's product with the output's,
    the tables' the sums of the output's gradient (times the input, for the slopes) over each piece."""

    @staticmethod
    def forward(ctx, z, kinks, slopes, intercepts):
        out = run_compiled(_pieces, z, kinks, slopes, intercepts, dynamic=((z, (0,)),))
        if out is None:
            piece = torch.searchsorted(kinks, z, right=True).clamp_(max=slopes.shape[1] - 1)
            out = (torch.addcmul(intercepts.index_select(1, piece), slopes.index_select(1, piece), z), piece)
        ctx.save_for_backward(z, out[1], slopes)
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, piece, slopes = ctx.saved_tensors
        grad = grad.contiguous()
        dz = d_slope = d_intercept = None
        if ctx.needs_input_grad[0]:
            dz = run_compiled(_input_grad, grad, piece, slopes, dynamic=((grad, (1,)), (piece, (0,))))
            if dz is None:
                dz = _input_grad(grad, piece, slopes)
        if ctx.needs_input_grad[2]:
            d_slope = grad.new_zeros(slopes.shape).index_add_(1, piece, grad * z)
        if ctx.needs_input_grad[3]:
            d_intercept = grad.new_zeros(slopes.shape).index_add_(1, piece, grad)
        return dz, None, d_slope, d_intercept


def piecewise_columns(learner: MetaLearner, z: torch.Tensor) -> torch.Tensor:
    """``learner(z[:, None]).t()`` for a ``d = 1`` learner and ``z [N]``, as ``[out_dim, N]``, through the
    table of its linear pieces (:func:`piece_tables`): equal up to float rounding, values and gradients."""
    kinks, slopes, intercepts = piece_tables(learner)
    return _Pieces.apply(z.contiguous(), kinks, slopes, intercepts)


@register_source
class GeneratedSource(EdgeSource):
    """Edge vectors generated by a meta-learner from per-edge embeddings ``[out*in, d]``."""

    def __init__(self, out_features: int, in_features: int, edge_dim: int, learner: MetaLearner,
                 owns_learner: bool = True, share_token: str | None = None):
        super().__init__()
        if learner.out_dim != edge_dim:
            raise ValueError(f"meta-learner generates {learner.out_dim} values, the layer needs {edge_dim}")
        if not owns_learner and share_token is None:
            raise ValueError("a source that does not own its meta-learner needs the share token")
        self.out_features, self.in_features, self.edge_dim = out_features, in_features, edge_dim
        self.embedding = nn.Parameter(torch.empty(out_features * in_features, learner.d))
        nn.init.xavier_normal_(self.embedding)
        self.learner = learner
        self.owns_learner, self.share_token = bool(owns_learner), share_token

    def edge_tensor(self) -> torch.Tensor:
        """The canonical ``[out, in, n+1]`` edge tensor, generated with its memory laid out as a wide layer's
        product matrix (``[n+1, in, out]``, :meth:`EdgeSource.product_matrix`), as a dense layer keeps its
        parameter (:class:`bench.model.sources.DenseSource`): the embeddings are put in (input, output) order
        first (a copy ``d`` values wide) and the learner writes ``[n+1, in * out]`` directly
        (:meth:`MetaLearner.columns`; a layer narrower than ``WIDE_OUT`` keeps the (output, input) order). A
        training step then reads a wide layer's product matrix as a view instead of
        copying the ``n+1`` times larger output each way; measured on a Fashion-MNIST ``kan [784, 64, 10]``
        MetaKAN step (d = 1 through the hidden layer, before :func:`piecewise_columns`; h = 32, batch 128, 2
        threads, alternated): 9.2 -> 8.3 ms and 13.6 -> 11.6 ms."""
        o, i = self.out_features, self.in_features
        if not self.wide:  # a narrow layer reads its product matrix column-major: a small copy either way
            return self.learner.columns(self.embedding).view(self.edge_dim, o, i).permute(1, 2, 0)
        z = self.embedding.view(o, i, -1).transpose(0, 1).reshape(o * i, -1)  # rows in (input, output) order
        return self.learner.columns(z).view(self.edge_dim, i, o).permute(2, 1, 0)

    def storage(self) -> list[StorageItem]:
        items = [float_item("embedding", self.embedding)]
        if self.owns_learner:  # a shared learner is stored once, by its owner
            items += [float_item(f"learner.{n}", p) for n, p in self.learner.named_parameters()]
        return items

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "d": self.learner.d, "h": self.learner.h,
                "owns_learner": self.owns_learner, "share_token": self.share_token}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> GeneratedSource:
        out_f, in_f, edge_dim = config["shape"]
        token = config.get("share_token")
        if config["owns_learner"]:
            learner = MetaLearner(config["d"], config["h"], edge_dim)
            with torch.no_grad():
                for n, p in learner.named_parameters():
                    p.copy_(tensors[f"learner.{n}"].reshape(p.shape))
            if token is not None:
                _SHARED[token] = learner
        else:
            learner = _SHARED.get(token)
            if learner is None:
                raise ValueError(f"shared meta-learner {token!r} was not loaded before the layers that use it")
        src = cls(out_f, in_f, edge_dim, learner, owns_learner=config["owns_learner"], share_token=token)
        with torch.no_grad():
            src.embedding.copy_(tensors["embedding"].reshape(src.embedding.shape))
        return src


def generate_model(model: nn.Module, d: int, h: int, shared: bool) -> dict:
    """Swap every KAN layer's source for a :class:`GeneratedSource` (fresh MetaKAN init).

    Returns counts: ``embedding_params``, ``learner_params`` (each distinct learner once).
    """
    layers = kan_layers(model)
    if not layers:
        raise UserError("the model has no KAN layers to re-parameterise")
    dims = {layer.edge_dim for _, layer in layers}
    if shared and len(dims) > 1:
        raise UserError(f"a shared meta-learner needs one edge size across layers, got {sorted(dims)}")
    shared_learner = MetaLearner(d, h, layers[0][1].edge_dim) if shared else None
    # the token names the shared learner inside one file; derived from its (seeded) initial weights,
    # so the same run writes the same file
    token = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in shared_learner.parameters())
                         ).hexdigest()[:32] if shared else None
    emb = 0
    for j, (_, layer) in enumerate(layers):
        learner = shared_learner if shared else MetaLearner(d, h, layer.edge_dim)
        src = GeneratedSource(layer.out_features, layer.in_features, layer.edge_dim, learner,
                              owns_learner=(not shared) or j == 0, share_token=token)
        layer.set_source(src)
        emb += src.embedding.numel()
    return {"embedding_params": emb, "learner_params": meta_learner_params(model)}


def meta_learners(model: nn.Module) -> list[MetaLearner]:
    """Every distinct meta-learner of the model (a shared one once)."""
    seen, out = set(), []
    for _, layer in kan_layers(model):
        lrn = getattr(layer.source, "learner", None)
        if isinstance(lrn, MetaLearner) and id(lrn) not in seen:
            seen.add(id(lrn))
            out.append(lrn)
    return out


def meta_learner_params(model: nn.Module) -> int:
    return sum(lrn.n_params() for lrn in meta_learners(model))


def param_groups(model: nn.Module, emb_lr: float, meta_lr: float) -> list[dict]:
    """AdamW groups: embeddings at ``emb_lr``, meta-learners at ``meta_lr``, every other
    trainable parameter (biases, norms) at the sweep's learning rate (no ``lr`` key)."""
    emb = [layer.source.embedding for _, layer in kan_layers(model) if isinstance(layer.source, GeneratedSource)]
    meta = [p for lrn in meta_learners(model) for p in lrn.parameters()]
    taken = {id(p) for p in emb + meta}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return [{"params": emb, "lr": emb_lr}, {"params": meta, "lr": meta_lr}, {"params": rest}]


STAGE_FIELDS = ("d", "h", "shared", "emb_lr", "meta_lr")  # the settings that change a generator-trained model


def stage_key(config: dict) -> dict:
    """The stage-1 cache key of a generator-trained model: the same for MetaKAN and MetaCluster
    with equal generator settings, so a sweep trains it once."""
    return {"method": "metakan", **{k: config[k] for k in STAGE_FIELDS}}


@dataclass
class GeneratorOptions:
    """The MetaKAN generator (stage 1).

    Learning rates: the paper uses 1e-3 (embeddings) and 1e-4 (meta-learner). At this harness's
    budgets they undertrain: on digits ``[64, 64, 10]`` (30 epochs, batch 64, seed 0) B-spline
    MetaCluster K=16 reached 95.8 % test against 97.2 % dense, and on the tiny test data the loss
    barely moves in 32 steps. The defaults are therefore both 10x the paper's (``emb_lr=1e-2``,
    ``meta_lr=1e-3``, keeping its 10:1 ratio); set them to the paper's values for a faithful
    replication.
    """

    d: int = field(default=1, metadata={"min": 1, "max": 64, "help": "embedding size per edge"})
    h: int | None = field(default=None, metadata={
        "min": 1, "help": "meta-learner hidden width; default (None) 32 for kan, 64 for convkan"})
    shared: bool = field(default=False, metadata={"help": "one meta-learner for all layers"})
    emb_lr: float = field(default=1e-2, metadata={"help": "stage-1 AdamW lr of the embeddings (paper: 1e-3)"})
    meta_lr: float = field(default=1e-3, metadata={"help": "stage-1 AdamW lr of the meta-learner(s) (paper: 1e-4)"})
    joint_epochs: int | None = field(default=None, metadata={
        "min": 1, "help": "stage-1 (generator) training epochs; default (None) the sweep's epochs"})

    def validate(self):
        positive("emb_lr", self.emb_lr)
        positive("meta_lr", self.meta_lr)
