"""``metacluster``: MetaCluster (Raffel, Renjith, Chen, arXiv 2510.19105).

1. **Generate** (stage 1, before training): the MetaKAN re-parameterisation of :mod:`bench.meta`
   (per-edge embeddings ``z in R^d`` + meta-learner ``Linear(d, h) -> ReLU -> Linear(h, n+1)``)
   trained from scratch with the sweep's epochs; embeddings at ``emb_lr``, meta-learner(s) at
   ``meta_lr``. Stage 1 is cached by its generator settings only (the same key MetaKAN uses), so
   a sweep over ``K`` / scope / fine-tune knobs trains it once per generator config and seed.
2. **Cluster**: scikit-learn K-means (k-means++, ``n_init`` restarts, ``random_state`` = the
   run's derived compress seed) on the *generated* edge vectors, per layer (default) or one
   global codebook; every layer's source becomes a codebook (centroids ``[K, n+1]`` float32 +
   indices at ``ceil(log2 K)`` bits). The meta-learner and embeddings are dropped: the deployed
   model does not store them. ``K=None`` means the paper's default, 16 for ``kan`` and 256 for
   ``convkan`` (from the model's config). ``K`` above the number of edges in a scope is
   infeasible (recorded as such); a scope with at least ``K`` edges but fewer distinct vectors
   keeps each distinct vector as its own centroid (an exact codebook, ``k_used`` < K).
3. **Fine-tune** the centroids with the indices frozen, ``finetune_epochs`` (None: the sweep's
   shared fine-tune budget) at ``finetune_lr`` (None: the shared rule, ``finetune_lr_scale x
   lr``); ``tune_rest`` also tunes biases and norms. The best epoch is selected on validation
   (epoch 0, no fine-tuning, included).

``ctx.result.details`` records K requested/used, the K-means inertia, index bits, the meta-learner's
parameter count and the validation score after each step.

Learning rates: 10x the paper's by default; :class:`bench.meta.GeneratorOptions` says why.
"""

from dataclasses import dataclass

from bench import meta
from bench.methods import Method, register_method


@register_method("metacluster")
class MetaCluster(meta.GeneratorStage, Method):
    """MetaCluster: MetaKAN-generated edge vectors, K-means codebook per layer, centroid fine-tune."""

    @dataclass
    class Config(meta.ClusterOptions, meta.GeneratorOptions):
        """Generator (stage 1) options, then clustering and fine-tune options."""

        def validate(self):
            meta.GeneratorOptions.validate(self)
            meta.ClusterOptions.validate(self)

    grid = {"K": [4, 8, 16, 32, 64], "d": [1, 2]}
    test_config = {"h": 8, "K": 4}
    # stage 1 (prepare / param_groups / stage_key / train_epochs): bench.meta.GeneratorStage, as metakan

    def compress(self, model, ctx):
        c = self.config
        k = c.K if c.K is not None else meta.default_k(model)
        ctx.result.details.update(meta_learner_params=meta.meta_learner_params(model),
                        val_generated=ctx.trainer.evaluate(model, "val"))
        ctx.result.details.update(meta.cluster_model(model, k, c.scope, c.n_init, ctx.seed))  # drops the meta-learner
        ctx.result.details["val_clustered"] = ctx.trainer.evaluate(model, "val")
        fit = ctx.finetune(model, meta.codebook_param_groups(model, tune_rest=c.tune_rest), lr=c.finetune_lr,
                           epochs=c.finetune_epochs, desc="metacluster centroids")
        ctx.result.details.update(val_finetuned=fit.best_val, finetune_best_epoch=fit.best_epoch)
