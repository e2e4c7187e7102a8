"""``tucker``: post-training Tucker decomposition of every edge tensor, then a short fine-tune.

Recipe (Gao, Ng, Tan, "Low Tensor-Rank Adaptation of KANs", arXiv 2502.06153):

1. each trained layer's edge tensor ``A [out, in, n+1]`` is decomposed with tensorly's
   ``tucker`` (HOOI from an SVD initialisation, PyTorch backend) into a core ``[r1, r2, r3]``
   and factors ``U_out [out, r1]``, ``U_in [in, r2]``, ``U_basis [n+1, r3]``;
2. the layer's source is swapped for a :class:`bench.compression.tucker_factors.TuckerSource` (the four tensors
   in float32; the forward contracts through the factors, never rebuilding the full tensor
   unless that is the cheapest order);
3. core and factors are fine-tuned with the shared budget (the shared fine-tune rate, split
   per component by ``lr_rule``), one optimiser group per component,
   the best epoch chosen on validation (epoch 0, the plain decomposition, is a candidate).

``ratio`` (default 4.8, the old default ranks' ratio on ``kan [784, 64, 10]``): the edge tensors are
stored that many times smaller than dense, and the ranks are chosen per layer from the trained tensor
(:func:`bench.compression.tucker_factors.allocate_ranks`): a layer with under 5 % of the model's edge
values stays dense, the others share the budget by size, each with the ranks whose truncated-HOSVD
error bound is smallest. Measured on Fashion-MNIST ``kan [784, 64, 10]`` (seed 0, before fine-tuning,
validation): the old rule, the same fractions ``(0.5, 0.125, 0.5)`` in every layer, left 36.1 % (rbf) and
52.9 % (bspline) of the dense 89.6 / 89.5 % at 4.79x, because it cut the 10-class output layer to
ranks (5, 8, 5) (that layer alone: 38.3 / 54.6 %) and the first layer's basis mode to 5 of 9; the
allocation gives 88.6 / 89.1 % at 4.73x. ``ratio = 0`` keeps the old rule:

``ranks``: three numbers (out, in, basis); an int is an absolute rank (a rank above its mode's
size in some layer is :class:`~bench.errors.Infeasible`), a float in (0, 1] a fraction of that
mode's size, rounded up and at least 2 (the whole mode when it is smaller), so one grid fits
every layer and a small layer (an equation task's ``[8, 2, 9]``) never drops to rank 1.
Learning rates: ``lr_rule = "balanced"`` (default) gives each component the same relative step
under Adam, i.e. a rate proportional to its entries' RMS (orthonormal factors: 1/sqrt(mode size)); see
:func:`bench.compression.tucker_factors.component_lrs`. ``"shared"`` uses one rate for all (the paper's ablation).
``lr_core`` / ``lr_out`` / ``lr_in`` / ``lr_basis`` multiply the result.

``requested_ratio``: the edge-tensor compression ratio the ranks ask for before rounding
fractions up to whole ranks (with the floor of 2 applied); the achieved one is the stored tensors'
``coef_compression_ratio``.
"""

from dataclasses import dataclass, field

from torch import nn

from bench.compression.methods import Method, register_method
from bench.compression.tucker_factors import (
    TuckerOptions,
    TuckerSource,
    allocate_ranks,
    finetune_factors,
)
from bench.errors import UserError
from bench.model.kan import kan_layers

# the sweep grid: stored edge tensors 2x to 16x smaller than dense (ranks chosen per layer)
RATIO_GRID = [2.0, 4.0, 8.0, 16.0]


@register_method("tucker")
class Tucker(Method):
    """Post-training Tucker decomposition of each edge tensor (tensorly HOOI), factors fine-tuned."""

    @dataclass
    class Config(TuckerOptions):
        """:class:`bench.compression.tucker_factors.TuckerOptions` (``ranks``, ``lr_rule``, ``lr_core``, ``lr_out``,
        ``lr_in``, ``lr_basis``, as ``slimkan``) and the decomposition's ``hooi_iters``."""

        hooi_iters: int = field(default=100, metadata={"min": 1, "help": "max HOOI iterations"})
        ratio: float = field(default=4.8, metadata={
            "min": 0.0, "help": "store the edge tensors this many times smaller than dense, ranks chosen per layer "
                                "from the trained tensor (allocate_ranks; ranks is then unused); 0: ranks as given, "
                                "the same fractions in every layer"})

        def validate(self):
            super().validate()
            if 0 < self.ratio < 1:
                raise UserError(f"tucker ratio must be 0 (use ranks) or >= 1, got {self.ratio}")

    grid = {"ratio": RATIO_GRID}
    test_config = {"ratio": 2.0}

    # no prepare: decomposes the cached dense base model, then fine-tunes the factors
    def compress(self, model: nn.Module, ctx) -> None:
        errors = {}
        layers = kan_layers(model)
        if not self.config.ratio:
            ranks = [self.config.ranks] * len(layers)
        else:
            ranks = allocate_ranks([layer.edge_tensor().detach() for _, layer in layers], self.config.ratio)
        for (name, layer), r in zip(layers, ranks):
            if r is None:  # a small layer left dense (allocate_ranks); fine-tuned with the factors
                continue
            a = layer.edge_tensor().detach()
            src = TuckerSource.from_tensor(a, list(r), n_iter_max=self.config.hooi_iters)
            errors[name] = float((src.edge_tensor().detach() - a).norm() / a.norm().clamp_min(1e-30))
            layer.set_source(src)
        ctx.result.details["decomposition_rel_error"] = errors
        finetune_factors(model, ctx, self.config, desc="tucker finetune")
