"""``dense_ft``: the control every method is compared with.

The cached dense base model, fine-tuned with exactly the budget every compression method gets
(``finetune_epochs`` at the shared fine-tune rate ``finetune_lr_scale * lr``, same schedule and
patience, best epoch on validation). Without it, a compressed model's extra epochs would count as
the method's merit: one extra epoch at a low rate adds up to a few tenths of a point to the
dense model alone. Every results row carries this control's test and validation metrics
(``control_metric``, ``control_val_metric``) and ``metric_delta`` against it; the plain
``dense`` row stays as the un-fine-tuned reference (``dense_delta``).

The runner fine-tunes the control once per base model and caches it, so the ``dense_ft`` row
and the ``control_*`` columns of every other row come from the very same model.
"""

from dataclasses import dataclass

from bench.compression.methods import Method, control_finetune, register_method


@register_method("dense_ft")
class DenseFineTuned(Method):
    """Control: the dense KAN fine-tuned with the shared fine-tune budget (nothing compressed)."""

    is_control = True

    @dataclass
    class Config:
        pass

    def finetune_epochs(self, budget: int) -> int:
        return 0  # the row is the cached control, fine-tuned once with its base (bench.run.plan)

    def compress(self, model, ctx):
        control_finetune(model, ctx)
