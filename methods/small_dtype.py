"""``small_dtype``: the small tensors (biases, norm weights and statistics) stored at 16 bits.

Every floating tensor outside the edge sources (the layers' biases, an RBF basis's LayerNorm, a
ConvKAN's BatchNorm weights and running statistics) is rounded to ``dtype`` (``float16`` or
``bfloat16``) in place, counted at 16 bits and exported at that width
(:func:`bench.compression.storage.set_small_dtype`); the model is evaluated with the rounded values, so the
accuracy is honest. Edge tensors are untouched. Alone it is the dense base with 16-bit small
tensors; its use is as the last stage of a pipeline (``prune>kmeans>small_dtype``), where it takes
no share of the fine-tune budget (it never fine-tunes) and nothing may train after it.
"""

from dataclasses import dataclass, field

from bench.compression.methods import Method, register_method
from bench.compression.storage import set_small_dtype


@register_method("small_dtype")
class SmallDtype(Method):
    """Biases and norms (every tensor outside the edge sources) stored at float16 or bfloat16."""

    @dataclass
    class Config:
        dtype: str = field(default="float16", metadata={"choices": ["float16", "bfloat16"],
                                                        "help": "the width of biases, norms and statistics"})

    uses_finetune = False
    last_stage_only = True
    in_all = False  # a pipeline's last stage: methods = ["all"] leaves it out

    def compress(self, model, ctx):
        ctx.result.details.update(set_small_dtype(model, self.config.dtype))
