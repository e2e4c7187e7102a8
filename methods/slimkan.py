"""``slimkan``: a KAN trained from scratch with every edge tensor in Tucker form (Slim KAN).

Recipe (Gao, Ng, Tan, arXiv 2502.06153, "Slim KANs"): before training, ``prepare`` replaces
each layer's dense source with a random :class:`bench.compression.tucker_factors.TuckerSource` at the given ranks
(orthonormal random factors; a Gaussian core scaled so the rebuilt tensor has the dense
initialisation's scale, RMS ``0.5 / sqrt(in)``). The model is then trained end to end in that
form, then fine-tuned with the shared fine-tune budget (``finetune_epochs``, every component's
rate scaled by ``finetune_lr_scale``), so it trains for as long as the ``dense_ft`` control. The
stored model is the four tensors per layer.

``ranks``: three numbers (out, in, basis), ints absolute (above a mode's size:
:class:`~bench.errors.Infeasible`), floats in (0, 1] fractions of each mode, rounded up and at
least 2 (the whole mode when it is smaller; see :func:`bench.compression.tucker_factors.resolve_ranks`).
Learning rates: one optimiser group per component; ``lr_rule = "balanced"`` (default)
sets each component's rate proportional to its entries' RMS so that all four take the same
relative step under Adam (see :func:`bench.compression.tucker_factors.component_lrs`); ``"shared"`` uses the
sweep's ``train.lr`` for every component (the paper's ablation). Rates are multiples of the
sweep's ``train.lr`` (``lr_scale`` groups), so every method trains at the same base rate.
"""

import math
from dataclasses import dataclass

from torch import nn

from bench.compression.methods import Method, register_method
from bench.compression.tucker_factors import (
    RANK_GRID,
    TuckerOptions,
    TuckerSource,
    finetune_factors,
    tucker_param_groups,
)
from bench.model.kan import kan_layers


@register_method("slimkan")
class SlimKAN(Method):
    """Slim KAN: every edge tensor in Tucker form (core + 3 factors), trained from scratch."""

    @dataclass
    class Config(TuckerOptions):
        """:class:`bench.compression.tucker_factors.TuckerOptions`: ``ranks`` (per mode ``[out, in, basis]``, whole or
        fractions), ``lr_rule`` (``balanced`` | ``shared``), and the per-component multipliers
        ``lr_core``, ``lr_out``, ``lr_in``, ``lr_basis``."""

    grid = {"ranks": RANK_GRID}  # the same points as `tucker`
    test_config = {"ranks": [0.5, 0.5, 0.5]}
    stage_fields = ("ranks", "lr_rule", "lr_core", "lr_out", "lr_in", "lr_basis")  # all shape the trained model

    # -- before training: every edge tensor a random Tucker factorisation --------------------
    def prepare(self, model: nn.Module) -> None:
        for _, layer in kan_layers(model):
            layer.set_source(TuckerSource.random(layer.source.shape, self.config.ranks,
                                                 rms=0.5 / math.sqrt(layer.in_features)))

    # -- training: one group per component, rates relative to the sweep's lr ------------------
    def param_groups(self, model: nn.Module) -> list[dict] | None:
        c = self.config
        groups = tucker_param_groups(model, 1.0, c.lr_rule, c.multipliers())
        return [{"params": g["params"], "lr_scale": g["lr"]} for g in groups]

    # -- after training: the shared fine-tune of the factors ---------------------------------
    def compress(self, model: nn.Module, ctx) -> None:
        finetune_factors(model, ctx, self.config, desc="slimkan finetune")
