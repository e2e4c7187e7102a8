"""``slimkan``: a KAN trained from scratch with every edge tensor in Tucker form (Slim KAN).

Recipe (Gao, Ng, Tan, arXiv 2502.06153, "Slim KANs"): before training, ``prepare`` replaces
each layer's dense source with a random :class:`bench.tucker.TuckerSource` at the given ranks
(orthonormal random factors; a Gaussian core scaled so the rebuilt tensor has the dense
initialisation's scale, RMS ``0.5 / sqrt(in)``). The model is then trained end to end in that
form, then fine-tuned with the shared fine-tune budget (``finetune_epochs``, every component's
rate scaled by ``finetune_lr_scale``), so it trains for as long as the ``dense_ft`` control. The
stored model is the four tensors per layer.

``ranks``: three numbers (out, in, basis), ints absolute (above a mode's size:
:class:`~bench.errors.Infeasible`), floats in (0, 1] fractions of each mode, rounded up and at
least 2 (the whole mode when it is smaller; see :func:`bench.tucker.resolve_ranks`).
Learning rates: one optimiser group per component; ``lr_rule = "balanced"`` (default)
sets each component's rate proportional to its entries' RMS so that all four take the same
relative step under Adam (see :func:`bench.tucker.component_lrs`); ``"shared"`` uses the
sweep's ``train.lr`` for every component (the paper's ablation). Rates are multiples of the
sweep's ``train.lr`` (``lr_scale`` groups), so every method trains at the same base rate.
"""

import dataclasses
import math

from torch import nn

from bench.kan import kan_layers
from bench.methods import Method, register_method
from bench.tucker import (
    RANK_GRID,
    TuckerOptions,
    TuckerSource,
    model_speedup,
    requested_coef_ratio,
    tucker_param_groups,
)


@register_method("slimkan")
class SlimKAN(Method):
    """Slim KAN: every edge tensor in Tucker form (core + 3 factors), trained from scratch."""

    Config = TuckerOptions
    grid = {"ranks": RANK_GRID}  # the same points as `tucker`
    test_config = {"ranks": [0.5, 0.5, 0.5]}
    stage_fields = tuple(f.name for f in dataclasses.fields(TuckerOptions))  # all of them shape the trained model

    def __init__(self, **hyperparameters):
        super().__init__(**hyperparameters)
        self._shapes: list[tuple[int, int, int]] = []

    def requested_ratio(self) -> float | None:
        return requested_coef_ratio(self._shapes, self.config.ranks)

    def prepare(self, model: nn.Module) -> None:
        self._shapes = []
        for _, layer in kan_layers(model):
            shape = layer.source.shape
            src = TuckerSource.random(shape, self.config.ranks, rms=0.5 / math.sqrt(layer.in_features))
            layer.set_source(src)
            self._shapes.append(tuple(shape))

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        c = self.config
        groups = tucker_param_groups(model, 1.0, c.lr_rule, c.multipliers())  # rates relative to the sweep's train.lr
        return [{"params": g["params"], "lr_scale": g["lr"]} for g in groups]

    def compress(self, model: nn.Module, ctx) -> None:
        c = self.config
        groups = tucker_param_groups(model, ctx.finetune_lr, c.lr_rule, c.multipliers())
        ctx.finetune(model, param_groups=[{k: v for k, v in g.items() if k != "name"} for g in groups],
                     desc="slimkan finetune")
        ctx.result.details["tucker_ranks"] = {n: list(layer.source.ranks) for n, layer in kan_layers(model)}
        ctx.result.theoretical_speedup = model_speedup(model, ctx.trainer.batch_size)
