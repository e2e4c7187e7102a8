"""``entropy_code``: every integer stream of the compressed model stored ANS-coded, a pipeline's last step.

Recipe (mechanism in :mod:`bench.entropy`): after the earlier stages, every integer item a layer
stores (codebook indices, quantised values and zero points, pruning masks or position lists) is
coded with ANS (constriction) under its own histogram, wherever the stream plus its code table is
smaller than the plain fixed-width item. The model computes exactly the same (nothing is
re-trained, no budget is used); only its storage shrinks, and the exported file holds the streams
(a reload decodes them and computes the same outputs). Each coded stream's plain bits, coded bits,
table bits and empirical entropy are recorded in the row's ``info``.

It needs a stage before it that leaves integers (``prune>entropy_code``,
``quantize>entropy_code``, ``kmeans>entropy_code``); alone, or after a method that stores only
floats, it is a one-line error before any training. Nothing may train after it; ``small_dtype``
may follow (both are last steps). It is Deep Compression's third step (Han et al., ICLR 2016),
with ANS in place of Huffman codes.
"""

from dataclasses import dataclass

from bench.entropy import entropy_code_model
from bench.methods import Method, register_method


@register_method("entropy_code")
class EntropyCode(Method):
    """The integer streams (indices, quantised values, masks) stored ANS-coded; a pipeline's last step."""

    @dataclass
    class Config:
        pass

    uses_finetune = False
    last_stage_only = True
    needs_previous_stage = True
    in_all = False
    test_previous_stage = "quantize"  # the generated tests run quantize>entropy_code

    def compress(self, model, ctx):
        ctx.result.details.update(entropy_code_model(model))
