"""``slimkan``: a KAN trained from scratch with every edge tensor in Tucker form (Slim KAN).

Recipe (Gao, Ng, Tan, arXiv 2502.06153, "Slim KANs"): before training, ``prepare`` replaces
each layer's dense source with a random :class:`bench.tucker.TuckerSource` at the given ranks
(orthonormal random factors; a Gaussian core scaled so the rebuilt tensor has the dense
initialisation's scale, RMS ``0.5 / sqrt(in)``). The model is then trained end to end in that
form; nothing happens after training (the stored model is the four tensors per layer).

``ranks``: three numbers (out, in, basis), ints absolute, floats in (0, 1] fractions of each
mode. Learning rates: one optimiser group per component; ``lr_rule = "balanced"`` (default)
sets each component's rate proportional to its entries' RMS so that all four take the same
relative step under Adam (see :func:`bench.tucker.component_lrs`); ``"shared"`` uses the
sweep's ``train.lr`` for every component (the paper's ablation). Rates are multiples of the
sweep's ``train.lr`` (``lr_scale`` groups), so every method trains at the same base rate.
"""

import math
from dataclasses import dataclass, field

from torch import nn

from bench.kan import kan_layers
from bench.methods import Method, register_method
from bench.tucker import TuckerSource, check_rank_spec, model_speedup, requested_coef_ratio, tucker_param_groups

RANKS_HELP = "Tucker ranks (out, in, basis): ints are absolute, floats in (0, 1] fractions of the mode"


@register_method("slimkan")
class SlimKAN(Method):
    """Slim KAN: every edge tensor in Tucker form (core + 3 factors), trained from scratch."""

    @dataclass
    class Config:
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

    # Same points as `tucker` ([784, 64, 10]: 2.3x to 28.5x on the edge tensors).
    grid = {"ranks": [[0.5, 0.25, 0.67], [0.5, 0.125, 0.5], [0.25, 0.0625, 0.34], [0.25, 0.03, 0.34],
                      [0.125, 0.024, 0.23]]}
    test_config = {"ranks": [0.5, 0.5, 0.5]}
    stage_fields = ("ranks", "lr_rule", "lr_core", "lr_out", "lr_in", "lr_basis")

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
        mult = {"core": c.lr_core, "u_out": c.lr_out, "u_in": c.lr_in, "u_basis": c.lr_basis}
        groups = tucker_param_groups(model, 1.0, c.lr_rule, mult)  # rates relative to the sweep's train.lr
        return [{"params": g["params"], "lr_scale": g["lr"]} for g in groups]

    def compress(self, model: nn.Module, ctx) -> None:
        ctx.info["tucker_ranks"] = {n: list(layer.source.ranks) for n, layer in kan_layers(model)}
        ctx.info["theoretical_speedup"] = model_speedup(model, ctx.trainer.batch_size)
