"""Tucker-form edge tensors: ``A = G x1 U_out x2 U_in x3 U_basis``.

A KAN layer's edge tensor ``A [out, in, n+1]`` is kept as a core ``G [r1, r2, r3]`` and three
factors ``U_out [out, r1]``, ``U_in [in, r2]``, ``U_basis [n+1, r3]`` (all float32, all
trainable): ``A[o, i, k] = sum_abc G[a, b, c] U_out[o, a] U_in[i, b] U_basis[k, c]``.
This is the parameterisation of LoTRA / Slim KANs (Gao, Ng, Tan, arXiv 2502.06153).

Storage is exactly those four tensors: ``r1*r2*r3 + out*r1 + in*r2 + (n+1)*r3`` float32 values
per layer.

:meth:`TuckerSource.contract` never builds ``[B, out, in]`` and, unless it is the cheapest
way, not the full edge tensor either. It estimates the multiply-accumulates of four orders
for the batch at hand and runs the cheapest:

- ``basis_first``: ``features . U_basis`` -> ``[B, in, r3]``, then ``U_in`` -> ``[B, r2, r3]``,
  then the core -> ``[B, r1]``, then ``U_out``;
- ``in_first``: ``U_in`` first (``[B, r2, n+1]``), then ``U_basis``, the core, ``U_out``;
- ``merged``: fold ``U_in`` and ``U_basis`` into the core once per call (``[r1, in, n+1]``,
  independent of the batch), one matmul with the flattened features, then ``U_out``;
- ``full``: rebuild ``[out, in, n+1]`` and do the dense matmul.

All four are the same linear map (tested against the rebuilt tensor, values and gradients).

:func:`resolve_ranks` turns ranks given as absolute ints or fractions of each mode into ints,
a fraction rounded up but never below 2 (or the whole mode when it is smaller than 2): a rank-1
mode would turn every edge of a small layer into one shared function. A malformed rank is a
:class:`~bench.errors.UserError`; an absolute rank above its mode's size on this model is
:class:`~bench.errors.Infeasible` (naming the mode, its size and the tensor shape).
:meth:`TuckerSource.from_tensor` decomposes a trained edge tensor with tensorly's ``tucker``
(HOOI, SVD initialisation) on the PyTorch backend, restoring tensorly's backend afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.errors import Infeasible, UserError
from bench.model.kan import kan_layers
from bench.model.sources import EdgeSource, StorageItem, flat_features, float_item, register_source

MODES = ("out", "in", "basis")
MIN_FRACTION_RANK = 2  # a fractional rank keeps at least this many (or the whole mode if smaller)
ORDERS = ("basis_first", "in_first", "merged", "full")


def resolve_ranks(shape, ranks) -> tuple[int, int, int]:
    """Ranks for an ``[out, in, n+1]`` tensor from three numbers: an ``int`` is an absolute rank,
    a ``float`` in ``(0, 1]`` a fraction of that mode's size, rounded up and at least
    ``min(2, size)`` (:data:`MIN_FRACTION_RANK`).

    Raises UserError for the wrong count, a rank ``<= 0`` or a fraction above 1, and
    :class:`~bench.errors.Infeasible` for an absolute rank larger than its mode's size (naming
    the mode, its size and the tensor shape). A rank above the product of the other two is then
    lowered to that product (it could not be used).
    """
    ranks = list(ranks)
    check_rank_spec(ranks)
    out = []
    for mode, size, r in zip(MODES, shape, ranks):
        if isinstance(r, float):
            out.append(max(min(MIN_FRACTION_RANK, size), math.ceil(r * size - 1e-9)))
        else:
            if r > size:
                raise Infeasible(f"Tucker rank {r} for mode {mode!r} exceeds that mode's size {size} in tensor "
                                 f"shape {list(shape)}; largest feasible rank {size}")
            out.append(int(r))
    # A mode's unfolding has rank <= the product of the other two ranks, so a larger rank adds
    # storage but no expressiveness: reduce it (the requested ratio keeps the rank as asked).
    r1, r2, r3 = out
    return min(r1, r2 * r3), min(r2, r1 * r3), min(r3, r1 * r2)


def check_rank_spec(ranks) -> None:
    """The checks that need no tensor shape (a method's Config.validate, the transfer CLI, and
    :func:`resolve_ranks` first): 3 numbers, each an int or a finite float, > 0, fractions at
    most 1. Raises a one-line :class:`~bench.errors.UserError`."""
    if len(ranks) != 3:
        raise UserError(f"Tucker ranks need 3 numbers (out, in, basis), got {list(ranks)!r}")
    for mode, r in zip(MODES, ranks):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise UserError(f"Tucker rank for mode {mode!r} must be an int or a fraction, got {r!r}")
        if not math.isfinite(r):
            raise UserError(f"Tucker rank for mode {mode!r} must be finite, got {r!r}")
        if r <= 0:
            raise UserError(f"Tucker rank for mode {mode!r} must be > 0, got {r!r}")
        if isinstance(r, float) and r > 1:
            raise UserError(f"fractional Tucker rank for mode {mode!r} must be in (0, 1], got {r!r}; "
                            f"give an int for an absolute rank")


def check_ranks_fit(shapes, ranks) -> None:
    """:func:`check_rank_spec`, then: an absolute rank larger than its mode's size in *every* one of
    the tensor ``shapes`` can never be used (a rank that fits some tensors is capped in the others,
    as :meth:`LoTRASource.zero_update` does): a one-line UserError naming the mode."""
    check_rank_spec(ranks)
    shapes = [tuple(s) for s in shapes]
    for i, (mode, r) in enumerate(zip(MODES, ranks)):
        largest = max(s[i] for s in shapes)
        if isinstance(r, int) and r > largest:
            raise UserError(f"Tucker rank {r} for mode {mode!r} exceeds that mode's size in every layer "
                            f"(largest {largest}; layer shapes {[list(s) for s in shapes]})")


def nominal_ranks(shape, ranks) -> tuple[float, float, float]:
    """The ranks as asked, before rounding up: a fraction times the mode size, but at least the
    ``min(2, size)`` every fraction resolves to (:func:`resolve_ranks`); ints as they are."""
    return tuple(max(float(min(MIN_FRACTION_RANK, s)), float(r) * s) if isinstance(r, float) else float(r)
                 for r, s in zip(ranks, shape))


def tucker_count(shape, ranks) -> float:
    """Values a Tucker form stores: ``r1*r2*r3 + out*r1 + in*r2 + (n+1)*r3``."""
    return math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks))


SMALL_LAYER_SHARE = 0.05  # a layer holding less of the model's edge values than this stays dense under ``ratio``


def mode_tails(t: torch.Tensor) -> list[torch.Tensor]:
    """Per mode, ``tail[r]``: the squared singular values of that mode's unfolding beyond the first
    ``r`` (``tail[0]`` is the whole energy). Their sum over the modes at ranks ``(r1, r2, r3)`` bounds the
    squared error of the truncated HOSVD (De Lathauwer et al. 2000), which HOOI then lowers."""
    t = t.detach().to("cpu", torch.float64)
    tails = []
    for m in range(3):
        sv2 = torch.linalg.svdvals(t.movedim(m, 0).reshape(t.shape[m], -1)) ** 2
        sv2 = torch.cat([sv2, sv2.new_zeros(t.shape[m] - sv2.numel())])
        tails.append(torch.cat([sv2.flip(0).cumsum(0).flip(0), sv2.new_zeros(1)]))
    return tails


def best_ranks(t: torch.Tensor, budget: float) -> tuple[int, int, int] | None:
    """The ranks of ``t [out, in, n+1]`` whose Tucker form stores at most ``budget`` values with the smallest
    truncation bound (:func:`mode_tails`): every ``(r1, r3)``, with the largest ``r2`` the budget leaves;
    None when not even ranks (1, 1, 1) fit."""
    (o, i, e), tails = t.shape, mode_tails(t)
    best, best_key = None, None
    for r1 in range(1, o + 1):
        for r3 in range(1, e + 1):
            r2 = min(i, math.floor((budget - o * r1 - e * r3) / (r1 * r3 + i)))
            if r2 < 1:
                continue
            r = (min(r1, r2 * r3), min(r2, r1 * r3), min(r3, r1 * r2))  # a redundant rank stores, adds nothing
            key = (round(float(sum(tail[k] for tail, k in zip(tails, r))), 9), tucker_count(t.shape, r))
            if best_key is None or key < best_key:  # the smallest bound, then the fewest values
                best, best_key = r, key
    return best


def allocate_ranks(tensors: list[torch.Tensor], ratio: float) -> list[tuple[int, int, int] | None]:
    """Per-layer ranks storing the edge tensors ``ratio`` times smaller than dense, the whole model
    together: a layer holding less than :data:`SMALL_LAYER_SHARE` of the edge values stays dense (None:
    truncating a 10-class output layer costs more accuracy than its few values save), the others
    share the rest of the budget in proportion to their size, and each takes the ranks with the
    smallest truncation bound within its share (:func:`best_ranks`). Raises
    :class:`~bench.errors.Infeasible` when a layer cannot be stored that small."""
    sizes = [t.numel() for t in tensors]
    total, budget = sum(sizes), sum(sizes) / ratio
    small = [n < SMALL_LAYER_SHARE * total for n in sizes]
    if all(small) or sum(n for n, s in zip(sizes, small) if s) > budget / 2:
        small = [False] * len(sizes)  # the small layers would take most of the budget: decompose all
    left = budget - sum(n for n, s in zip(sizes, small) if s)
    big = sum(n for n, s in zip(sizes, small) if not s)
    out = []
    for t, n, s in zip(tensors, sizes, small):
        if s:
            out.append(None)
            continue
        r = best_ranks(t, left * n / big)
        if r is None:
            raise Infeasible(f"a Tucker form of {list(t.shape)} cannot be {ratio}x smaller than dense (ranks "
                             f"(1, 1, 1) store {tucker_count(t.shape, (1, 1, 1))} of its {n} values)")
        out.append(r)
    return out


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``[rows, cols]`` matrix with orthonormal columns (``cols <= rows``)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@register_source
class TuckerSource(EdgeSource):
    """Edge tensor in Tucker form: core ``[r1, r2, r3]``, ``U_out [out, r1]``, ``U_in [in, r2]``,
    ``U_basis [n+1, r3]``, all float32 parameters."""

    def __init__(self, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, u_basis: torch.Tensor):
        super().__init__()
        r = tuple(core.shape)
        if len(r) != 3 or u_out.shape[1] != r[0] or u_in.shape[1] != r[1] or u_basis.shape[1] != r[2]:
            raise ValueError(f"Tucker shapes disagree: core {r}, U_out {tuple(u_out.shape)}, "
                             f"U_in {tuple(u_in.shape)}, U_basis {tuple(u_basis.shape)}")
        self.out_features, self.in_features, self.edge_dim = u_out.shape[0], u_in.shape[0], u_basis.shape[0]
        self.core = nn.Parameter(core.detach().clone().float())
        self.u_out = nn.Parameter(u_out.detach().clone().float())
        self.u_in = nn.Parameter(u_in.detach().clone().float())
        self.u_basis = nn.Parameter(u_basis.detach().clone().float())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tensor(cls, edge_tensor: torch.Tensor, ranks, n_iter_max: int = 100, tol: float = 1e-8) -> TuckerSource:
        """Tucker-decompose ``edge_tensor [out, in, n+1]`` (tensorly ``tucker``: HOOI from an SVD
        initialisation, PyTorch backend, in float64) at ``ranks`` (ints or fractions, see
        :func:`resolve_ranks`)."""
        import tensorly as tl
        from tensorly.decomposition import tucker

        shape = tuple(edge_tensor.shape)
        r = resolve_ranks(shape, ranks)
        t = edge_tensor.detach().to("cpu", torch.float64)
        with torch.no_grad(), tl.backend_context("pytorch"):
            core, factors = tucker(t, rank=list(r), init="svd", n_iter_max=n_iter_max, tol=tol)
        src = cls(core, *factors)
        return src.to(edge_tensor.device)

    @classmethod
    def random(cls, shape, ranks, rms: float, generator: torch.Generator | None = None) -> TuckerSource:
        """A random Tucker tensor for training from scratch: orthonormal factors and a Gaussian
        core scaled so the rebuilt tensor's entries have root-mean-square ``rms`` (orthonormal
        factors preserve the Frobenius norm, so ``||A|| = ||G||``)."""
        r = resolve_ranks(shape, ranks)
        factors = [orthonormal(s, k, generator) for s, k in zip(shape, r)]
        std = rms * math.sqrt(math.prod(shape) / math.prod(r))
        core = torch.randn(*r, generator=generator) * std
        return cls(core, *factors)

    # ------------------------------------------------------------------ the tensor
    @property
    def ranks(self) -> tuple[int, int, int]:
        return tuple(self.core.shape)

    def factors(self) -> dict[str, torch.Tensor]:
        """Each component by name (core and the three factors)."""
        return {"core": self.core, "u_out": self.u_out, "u_in": self.u_in, "u_basis": self.u_basis}

    def _merged(self, basis_major: bool = False) -> torch.Tensor:
        """``G x2 U_in x3 U_basis`` as ``[r1, in * (n+1)]``, or ``[r1, (n+1) * in]`` when ``basis_major`` (the
        order compiled features flatten to, :func:`bench.model.sources.flat_features`)."""
        r1 = self.ranks[0]
        w = self.core @ self.u_basis.t()                    # [r1, r2, n+1]
        w = w.transpose(1, 2) @ self.u_in.t()               # [r1, n+1, in]
        return (w if basis_major else w.transpose(1, 2)).reshape(r1, -1)

    def edge_tensor(self) -> torch.Tensor:
        return (self.u_out @ self._merged()).reshape(self.shape)

    def storage(self) -> list[StorageItem]:
        return [float_item(n, t) for n, t in self.factors().items()]

    # ------------------------------------------------------------------ fast path
    def contraction_costs(self, batch: int) -> dict[str, int]:
        """Multiply-accumulates of each contraction order for ``batch`` samples (the weight-side
        work of ``merged`` / ``full`` is counted once per call)."""
        o, i, n = self.shape
        r1, r2, r3 = self.ranks
        tail = batch * (r1 * r2 * r3 + r1 * o)               # core, then U_out
        merge = r1 * r2 * r3 * n + r1 * r2 * i * n           # [r1, in, n+1]
        return {"basis_first": batch * (i * n * r3 + i * r2 * r3) + tail,
                "in_first": batch * (i * n * r2 + r2 * n * r3) + tail,
                "merged": merge + batch * (i * n * r1 + r1 * o),
                "full": merge + o * r1 * i * n + batch * o * i * n}

    def choose_order(self, batch: int) -> str:
        costs = self.contraction_costs(batch)
        return min(ORDERS, key=lambda k: costs[k])  # ties go to the earlier (factored) order

    def contract(self, features: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """``features [B, in, n+1] -> [B, out]`` through the factors, by the cheapest order
        (or the one named)."""
        b = features.shape[0]
        order = order or self.choose_order(b)
        r1, r2, r3 = self.ranks
        if order == "basis_first":
            t = features @ self.u_basis                                   # [B, in, r3]
            t = t.transpose(1, 2) @ self.u_in                             # [B, r3, r2]
            g = self.core.permute(0, 2, 1).reshape(r1, r3 * r2)           # [r1, r3*r2]
            t = t.reshape(b, r3 * r2) @ g.t()                             # [B, r1]
        elif order == "in_first":
            t = features.transpose(1, 2) @ self.u_in                      # [B, n+1, r2]
            t = t.transpose(1, 2) @ self.u_basis                          # [B, r2, r3]
            t = t.reshape(b, r2 * r3) @ self.core.reshape(r1, r2 * r3).t()
        elif order == "merged":  # compiled features are read as they lie, [B, (n+1) * in], never copied (a
            # Slim-KAN training step, kan [784, 64, 10] bspline, batch 128, 2 threads: 4.9 -> 4.0 ms; dense 3.3)
            f, major = flat_features(features)
            t = f @ self._merged(major).t()
        elif order == "full":
            return super().contract(features)
        else:
            raise ValueError(f"unknown contraction order {order!r}; valid: {', '.join(ORDERS)}")
        return t @ self.u_out.t()

    def theoretical_speedup(self, batch: int = 1) -> float:
        """Dense MACs over the chosen order's MACs for ``batch`` samples."""
        o, i, n = self.shape
        return batch * o * i * n / self.contraction_costs(batch)[self.choose_order(batch)]

    # ------------------------------------------------------------------ export
    def export_config(self) -> dict:
        return {"shape": list(self.shape), "ranks": list(self.ranks)}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> TuckerSource:
        o, i, n = config["shape"]
        r1, r2, r3 = config["ranks"]
        return cls(tensors["core"].reshape(r1, r2, r3), tensors["u_out"].reshape(o, r1),
                   tensors["u_in"].reshape(i, r2), tensors["u_basis"].reshape(n, r3))


@register_source
class LoTRASource(EdgeSource):
    """``A0 + Tucker update``: a frozen pre-trained edge tensor (buffer) plus a trainable
    :class:`TuckerSource`. ``update_storage()`` is what a task adds; ``storage()`` also holds the
    shared ``A0`` so an exported file rebuilds the adapted model on its own."""

    def __init__(self, base: torch.Tensor, update: TuckerSource):
        super().__init__()
        if tuple(update.shape) != tuple(base.shape):
            raise ValueError(f"update shape {tuple(update.shape)} != base shape {tuple(base.shape)}")
        self.out_features, self.in_features, self.edge_dim = base.shape
        self.register_buffer("base", base.detach().clone().float())
        self.update = update

    @classmethod
    def zero_update(cls, base: torch.Tensor, ranks, generator: torch.Generator | None = None) -> LoTRASource:
        """A zero update at ``ranks``; an absolute rank above a mode's size is capped at that size
        (one rank list then fits a network whose output layer has a single output)."""
        shape = tuple(base.shape)
        ranks = [min(r, s) if isinstance(r, int) and not isinstance(r, bool) else r for r, s in zip(ranks, shape)]
        r = resolve_ranks(shape, ranks)
        factors = [orthonormal(s, k, generator) for s, k in zip(base.shape, r)]
        return cls(base, TuckerSource(torch.zeros(*r), *factors))

    def edge_tensor(self) -> torch.Tensor:
        return self.base + self.update.edge_tensor()

    def contract(self, features: torch.Tensor) -> torch.Tensor:
        f, major = flat_features(features)
        base = self.base.transpose(1, 2) if major else self.base
        return f @ base.reshape(self.out_features, -1).t() + self.update.contract(features)

    def update_storage(self) -> list[StorageItem]:
        return self.update.storage()

    def storage(self) -> list[StorageItem]:
        return [float_item("base", self.base)] + [
            StorageItem(f"update_{it.name}", it.count, it.bits_per_value, it.encoding, it.tensor)
            for it in self.update.storage()]

    def export_config(self) -> dict:
        return {"shape": list(self.shape), "ranks": list(self.update.ranks)}

    @classmethod
    def from_export(cls, config: dict, tensors: dict[str, torch.Tensor]) -> LoTRASource:
        upd = TuckerSource.from_export(config, {k[len("update_"):]: v for k, v in tensors.items()
                                                if k.startswith("update_")})
        return cls(tensors["base"].reshape(config["shape"]), upd)


def component_lrs(source: TuckerSource, base_lr: float, rule: str = "balanced",
                  multipliers: dict[str, float] | None = None,
                  reference: torch.Tensor | None = None) -> dict[str, float]:
    """Learning rate of each Tucker component.

    ``shared``: every component at ``base_lr`` (the paper's ablation baseline).

    ``balanced`` (default): Adam moves every entry by about ``lr`` per step whatever the
    gradient, so a component's *relative* change per step is ``lr / rms(component)``. The
    components differ in scale by large factors (an orthonormal ``U_in`` of a 784-wide layer
    has entries ~0.036, ``U_basis`` of 9 rows ~0.33, the core carries the tensor's whole norm),
    so one shared rate over-drives the small-entry factors and under-drives the others: the
    imbalance LoTRA's learning-rate analysis warns about. We set
    ``lr_X = base_lr * rms(X) / (4 * rms(A))`` so that each of the four components gets the
    same relative step, and their sum matches the relative step that dense training at
    ``base_lr`` takes on ``A`` itself. For orthonormal factors ``rms(U) = 1/sqrt(mode size)``,
    i.e. a factor's rate falls as the square root of its mode size.

    ``multipliers`` (keys ``core``, ``u_out``, ``u_in``, ``u_basis``) scale the result.

    ``reference`` (LoTRA: the frozen pre-trained ``A0``, since the update starts at zero) replaces
    ``A`` as the scale, and the core's ``rms`` is the one it has when the tensor is as large as
    the reference: ``rms(A0) sqrt(out in (n+1) / (r1 r2 r3))`` (orthonormal factors keep the norm).
    """
    mult = {k: 1.0 for k in ("core", "u_out", "u_in", "u_basis")}
    mult.update(multipliers or {})
    comps = source.factors()
    if rule == "shared":
        return {k: base_lr * mult[k] for k in comps}
    if rule != "balanced":
        raise UserError(f"unknown learning-rate rule {rule!r}; valid: balanced, shared")
    with torch.no_grad():
        scale = source.edge_tensor() if reference is None else reference
        rms_a = float(scale.pow(2).mean().sqrt())
        out = {}
        for k, t in comps.items():
            rms = float(t.pow(2).mean().sqrt())
            if reference is not None and k == "core":
                rms = rms_a * math.sqrt(math.prod(source.shape) / math.prod(source.ranks))
            ratio = rms / (len(comps) * rms_a) if rms_a > 0 and rms > 0 else 1.0
            out[k] = base_lr * ratio * mult[k]
    return out


def tucker_param_groups(model: nn.Module, base_lr: float, rule: str = "balanced",
                        multipliers: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: one per Tucker component of every layer at its own rate (see
    :func:`component_lrs`; a :class:`LoTRASource`'s update with its ``A0`` as the scale), plus
    every other trainable parameter at ``base_lr``."""
    groups, seen = [], set()
    for lname, layer in kan_layers(model):
        src, reference = layer.source, None
        if isinstance(src, LoTRASource):
            src, reference = src.update, src.base
        if not isinstance(src, TuckerSource):
            continue
        lrs = component_lrs(src, base_lr, rule, multipliers, reference)
        for k, p in src.factors().items():
            groups.append({"params": [p], "lr": lrs[k], "name": f"{lname}.{k}"})
            seen.add(id(p))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": base_lr, "name": "other"})
    return groups


def requested_coef_ratio(shapes, ranks) -> float | None:
    """Dense edge values over the Tucker values the ranks ask for (:func:`nominal_ranks`: fractions
    not rounded up but at least ``min(2, size)``, no redundant rank lowered), summed over the layers
    ``shapes``; None before any layer is seen."""
    if not shapes:
        return None
    dense = sum(math.prod(s) for s in shapes)
    return dense / sum(tucker_count(s, nominal_ranks(s, ranks)) for s in shapes)


def model_speedup(model: nn.Module, batch: int) -> float:
    """Dense multiply-accumulates over Tucker ones (each layer's cheapest order) for ``batch``
    rows per layer, over all KAN layers (a KAN convolution sees batch x positions rows; this
    counts ``batch``)."""
    dense = tucker = 0
    for _, layer in kan_layers(model):
        src = layer.source
        d = batch * math.prod(src.shape)
        dense += d
        tucker += src.contraction_costs(batch)[src.choose_order(batch)] if isinstance(src, TuckerSource) else d
    return dense / tucker


RANKS_HELP = ("Tucker ranks (out, in, basis): ints are absolute (at most the mode's size), floats in (0, 1] "
              "fractions of the mode (rounded up, at least 2 or the whole mode)")


@dataclass
class TuckerOptions:
    """Ranks and per-component learning rates of the Tucker methods (``tucker``, ``slimkan``)."""

    ranks: list[int | float] = field(default_factory=lambda: [0.5, 0.125, 0.5],
                                     metadata={"min": 0, "help": RANKS_HELP})
    lr_rule: str = field(default="balanced", metadata={"choices": ["balanced", "shared"],
                                                       "help": "per-component learning rates"})
    lr_core: float = field(default=1.0, metadata={"min": 0.0, "help": "lr multiplier for the core"})
    lr_out: float = field(default=1.0, metadata={"min": 0.0, "help": "lr multiplier for U_out"})
    lr_in: float = field(default=1.0, metadata={"min": 0.0, "help": "lr multiplier for U_in"})
    lr_basis: float = field(default=1.0, metadata={"min": 0.0, "help": "lr multiplier for U_basis"})

    def validate(self):
        check_rank_spec(self.ranks)

    def multipliers(self) -> dict[str, float]:
        return {"core": self.lr_core, "u_out": self.lr_out, "u_in": self.lr_in, "u_basis": self.lr_basis}


# The rank grid both methods sweep: on [784, 64, 10] with 9-value edges 2.3x, 4.8x, 10.6x, 21.1x and
# 28.5x on the edge tensors (no rank is redundant, so requested and achieved agree up to rounding).
RANK_GRID = [[0.5, 0.25, 0.67], [0.5, 0.125, 0.5], [0.25, 0.0625, 0.34], [0.25, 0.03, 0.34], [0.125, 0.024, 0.23]]


def finetune_factors(model: nn.Module, ctx, options: TuckerOptions, desc: str) -> None:
    """The last step of ``tucker`` and ``slimkan``: fine-tune every Tucker component with the shared
    budget, each at the shared rule's rate split by ``options.lr_rule`` (:func:`tucker_param_groups`),
    and report the ranks, the component rates, the requested ratio and the theoretical speed-up."""
    groups = tucker_param_groups(model, ctx.finetune_lr, options.lr_rule, options.multipliers())
    ctx.finetune(model, param_groups=[{k: v for k, v in g.items() if k != "name"} for g in groups], desc=desc)
    layers = kan_layers(model)
    ctx.result.details.update(tucker_ranks={n: list(layer.source.ranks) if hasattr(layer.source, "ranks") else "dense"
                                            for n, layer in layers},
                              component_lrs={g["name"]: g["lr"] for g in groups})
    ratio = getattr(options, "ratio", None)
    ctx.result.requested_ratio = ratio if ratio else requested_coef_ratio(
        [tuple(layer.source.shape) for _, layer in layers], options.ranks)
    ctx.result.theoretical_speedup = model_speedup(model, ctx.trainer.batch_size)
