"""``metakan``: MetaKAN (Zhao, Shu, Meng, Xu, ICML 2025), generation only.

Before training, every KAN layer's edge tensor is re-parameterised (:mod:`bench.meta`): each
edge keeps a learnable embedding ``z in R^d`` and a meta-learner ``Linear(d, h) -> ReLU ->
Linear(h, n_basis + 1)`` generates its edge vector (one learner per layer, or one shared by all
layers with ``shared=true``). The model trains from scratch end to end with two AdamW groups:
embeddings at ``emb_lr`` and meta-learners at ``meta_lr`` (biases and norms at the sweep's lr).

After stage 1 (the sweep's ``epochs``) the generated model is fine-tuned end to end with the
shared fine-tune budget (``finetune_epochs`` at ``finetune_lr_scale`` times each group's
training rate, best epoch on validation), so it trains for as long as the ``dense_ft`` control.

The deployed model stores the embeddings and the meta-learner(s), float32 (a shared learner
once). The results row's ``params_trainable`` / ``optimizer_state_bytes`` / ``peak_memory_bytes``
come from training this re-parameterised model, since fewer trainable parameters is MetaKAN's
claim. ``h`` defaults to the paper's 32 for ``kan`` and 64 for ``convkan``.

Learning rates: 10x the paper's by default; :class:`bench.meta.GeneratorOptions` says why.
"""

from bench import meta
from bench.kan import kan_layers
from bench.methods import Method, register_method


@register_method("metakan")
class MetaKAN(meta.GeneratorStage, Method):
    """MetaKAN: per-edge embeddings + a meta-learner generate every edge vector (trained from scratch)."""

    Config = meta.GeneratorOptions

    grid = {"d": [1, 2], "h": [16, 32, 64]}
    test_config = {"h": 8}
    # prepare / param_groups / stage_key / train_epochs: bench.meta.GeneratorStage (shared with metacluster)

    def compress(self, model, ctx):
        c = self.config
        ctx.finetune(model, meta.generator_param_groups(model, c.emb_lr * ctx.finetune_scale,
                                                        c.meta_lr * ctx.finetune_scale),
                     desc="metakan finetune")
        ctx.result.details.update(d=c.d, h=c.h if c.h is not None else meta.default_hidden(model), shared=c.shared,
                        meta_learner_params=meta.meta_learner_params(model),
                        embedding_params=sum(layer.source.embedding.numel() for _, layer in kan_layers(model)))
