"""``entropy_code``: every integer stream of the compressed model stored ANS-coded, a pipeline's last step.

Recipe (mechanism in :mod:`bench.compression.entropy`): after the earlier stages, every integer item a layer
stores (codebook indices, quantised values and zero points, pruning masks or position lists) is
coded with ANS (constriction) under its own histogram, wherever the stream plus its code table is
smaller than the plain fixed-width item. The model computes exactly the same (nothing is
re-trained, no budget is used); only its storage shrinks, and the exported file holds the streams
(a reload decodes them and computes the same outputs). Each coded stream's plain bits, coded bits,
table bits and empirical entropy are recorded in the row's ``info``.

It needs a stage before it that leaves integers (``prune>entropy_code``,
``quantize>entropy_code``, ``kmeans>entropy_code``): alone or first in a chain it is a one-line error
before any training; after a method that stores only floats (``tucker``, ``dense_ft``) there is nothing
to code and the run is recorded as infeasible (the chain cannot be checked before training: which
items a method stores is known only once it has compressed). A sorted list of pruned positions is
never smaller coded (every position appears once), so in practice a pruning pattern is coded only as
a mask. Nothing may train after it; ``small_dtype``
may follow (both are last steps). It is Deep Compression's third step (Han et al., ICLR 2016),
with ANS in place of Huffman codes.
"""

from dataclasses import dataclass

from bench.compression.entropy import entropy_code_model, is_integer_item
from bench.compression.methods import Method, register_method
from bench.errors import Infeasible
from bench.model.kan import kan_layers


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
        if not any(is_integer_item(it) and it.count > 1 for _, layer in kan_layers(model)
                   for it in layer.source.storage()):
            raise Infeasible("entropy_code: the model stores no integer stream to code (the stage before it keeps "
                             "only floats); put it after prune, quantize, kmeans or metacluster")
        ctx.result.details.update(entropy_code_model(model))
