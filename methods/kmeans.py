"""``kmeans``: ablation of MetaCluster without the meta-learner ("naive weight sharing").

The cached dense base KAN is compressed exactly as MetaCluster compresses its generated model
(:mod:`bench.compression.codebook`): scikit-learn K-means (k-means++, ``n_init`` restarts, ``random_state`` = the
run's derived compress seed) on the trained edge vectors, per layer or one global codebook;
every layer's source becomes a codebook (centroids ``[K, n+1]`` float32 + indices at
``ceil(log2 K)`` bits); then the centroids are fine-tuned with the indices frozen
(``finetune_epochs``, None = the sweep's budget, at ``finetune_lr``, None = the shared fine-tune
rule ``finetune_lr_scale x lr``; ``tune_rest`` also tunes
biases and norms), selecting on validation. ``K=None`` means 16 for ``kan`` and 256 for
``convkan``, as for MetaCluster. Side by side with ``metacluster`` this shows what the
meta-learner's pre-shaping of the edge vectors buys.
"""

from dataclasses import dataclass

from bench.compression import codebook
from bench.compression.methods import Method, register_method


@register_method("kmeans")
class KMeansSharing(Method):
    """K-means codebook of the dense KAN's edge vectors + centroid fine-tune (MetaCluster ablation)."""

    @dataclass
    class Config(codebook.ClusterOptions):
        """:class:`bench.compression.codebook.ClusterOptions`: ``K`` (None: 16 for KANs, 256 for ConvKANs),
        ``scope`` (``layer`` | ``global``), ``n_init`` (K-means restarts), ``finetune_epochs`` and
        ``finetune_lr`` (None: the shared budget and rule), ``tune_rest`` (also biases and norms),
        ``centroid_bits`` (32 | 16 float16 | 8 … 2 integers with ``centroid_scale`` per centroid or per
        codebook, fine-tuned straight-through), ``entropy_coding`` (store the indices ANS-coded)."""

    grid = {"K": [4, 8, 16, 32, 64]}
    test_config = {"K": 4}

    # no prepare: compresses the cached dense base model
    def compress(self, model, ctx):
        ctx.result.details["val_dense"] = ctx.trainer.evaluate(model, "val")
        ctx.result.details.update(codebook.cluster_and_finetune(model, ctx, self.config, "kmeans centroids"))
