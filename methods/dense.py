"""``dense``: the uncompressed KAN, the control every method is compared with.

Every edge keeps its float32 vector. ``prepare`` and ``compress`` are the no-op defaults, so
this row is the cached dense base model itself, scored once on the test split.
"""

from dataclasses import dataclass

from bench.compression.methods import Method, register_method


@register_method("dense")
class Dense(Method):
    """Uncompressed KAN (float32 edge tensors): the reference point."""

    @dataclass
    class Config:
        pass

    untouched = True  # the base as trained: no post-compression step (BatchNorm re-estimation) applies

    def finetune_epochs(self, budget: int) -> int:
        return 0  # scored as trained
