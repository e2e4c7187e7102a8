"""``kmeans``: ablation of MetaCluster without the meta-learner ("naive weight sharing").

The cached dense base KAN is compressed exactly as MetaCluster compresses its generated model
(:mod:`bench.meta`): scikit-learn K-means (k-means++, ``n_init`` restarts, ``random_state`` = the
run's derived compress seed) on the trained edge vectors, per layer or one global codebook;
every layer's source becomes a codebook (centroids ``[K, n+1]`` float32 + indices at
``ceil(log2 K)`` bits); then the centroids are fine-tuned with the indices frozen
(``finetune_epochs``, None = the sweep's budget, at ``finetune_lr``, None = the shared fine-tune
rule ``finetune_lr_scale x lr``; ``tune_rest`` also tunes
biases and norms), selecting on validation. ``K=None`` means 16 for ``kan`` and 256 for
``convkan``, as for MetaCluster. Side by side with ``metacluster`` this shows what the
meta-learner's pre-shaping of the edge vectors buys.
"""

from bench import meta
from bench.methods import Method, register_method


@register_method("kmeans")
class KMeansSharing(Method):
    """K-means codebook of the dense KAN's edge vectors + centroid fine-tune (MetaCluster ablation)."""

    Config = meta.ClusterOptions

    grid = {"K": [4, 8, 16, 32, 64]}
    test_config = {"K": 4}

    def compress(self, model, ctx):
        c = self.config
        k = c.K if c.K is not None else meta.default_k(model)
        ctx.result.details["val_dense"] = ctx.trainer.evaluate(model, "val")
        ctx.result.details.update(meta.cluster_model(model, k, c.scope, c.n_init, ctx.seed))
        ctx.result.details["val_clustered"] = ctx.trainer.evaluate(model, "val")
        fit = ctx.finetune(model, meta.codebook_param_groups(model, tune_rest=c.tune_rest), lr=c.finetune_lr,
                           epochs=c.finetune_epochs, desc="kmeans centroids")
        ctx.result.details.update(val_finetuned=fit.best_val, finetune_best_epoch=fit.best_epoch)
