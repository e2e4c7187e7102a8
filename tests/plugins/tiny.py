"""Test-only plugins: a tiny image dataset, a tiny regression task, and methods that fail or wait on purpose."""

from dataclasses import dataclass, field

import torch

from bench.compression.methods import Method, register_method
from bench.data import Dataset, Splits, register_dataset, split_indices


def _blobs(n: int, seed: int, shape, classes: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(1234))
    x = centers[y] + 0.5 * torch.randn(n, *shape, generator=g)
    return x, y


@register_dataset("tiny_images")
class TinyImages(Dataset):
    """200 noisy class prototypes of shape 1x8x8 (4 classes)."""

    task = "classification"
    input_shape = (1, 8, 8)
    n_outputs = 4
    default_hidden = [6]
    description = "synthetic 1x8x8 blobs (tests)"

    @dataclass
    class Config:
        n: int = field(default=200, metadata={"min": 20})

    def load(self, data_dir, seed):
        x, y = _blobs(self.config.n, 7, self.input_shape, self.n_outputs)
        tr, va, te = split_indices(len(x), (0.6, 0.2), seed)
        return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te])


@register_dataset("tiny_regression")
class TinyRegression(Dataset):
    """y = x1 * x2 on 300 points."""

    task = "regression"
    input_shape = (2,)
    n_outputs = 1
    default_hidden = [3]
    description = "x1*x2 (tests)"

    def load(self, data_dir, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(300, 2, generator=g) * 2 - 1
        y = (x[:, :1] * x[:, 1:2])
        tr, va, te = split_indices(300, (0.6, 0.2), seed)
        return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te])


class _TinyVectors(Dataset):
    """A smooth random map of ``input_shape`` inputs to ``n_outputs`` targets on 240 points (the sizes of
    the interop fixtures, so an imported model is a sweep's base)."""

    task = "regression"
    default_hidden = [4]

    def load(self, data_dir, seed):
        g = torch.Generator().manual_seed(seed)
        d, k = self.input_shape[0], self.n_outputs
        x = torch.randn(240, d, generator=g)
        w = torch.randn(d, k, generator=torch.Generator().manual_seed(99))
        y = torch.sin(x @ w / d ** 0.5) + 0.1 * x[:, :k] ** 2
        tr, va, te = split_indices(240, (0.6, 0.2), seed)
        return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te])


@register_dataset("tiny_vec6")
class TinyVec6(_TinyVectors):
    """6 inputs -> 3 targets (the efficient-kan, FastKAN and ChebyKAN fixtures' sizes)."""

    input_shape = (6,)
    n_outputs = 3
    description = "6 -> 3 smooth map (tests)"


@register_dataset("tiny_vec4")
class TinyVec4(_TinyVectors):
    """4 inputs -> 2 targets (the pykan fixture's sizes)."""

    input_shape = (4,)
    n_outputs = 2
    description = "4 -> 2 smooth map (tests)"


@register_method("explode")
class Explode(Method):
    """Raises during compress (failed-run isolation)."""

    test_only = True

    @dataclass
    class Config:
        pass

    def compress(self, model, ctx):
        raise RuntimeError("boom on purpose")


@register_method("nan_out")
class NanOut(Method):
    """Writes NaN into the edge tensor (diverged-run detection)."""

    test_only = True

    @dataclass
    class Config:
        pass

    def compress(self, model, ctx):
        from bench.model.kan import kan_layers

        with torch.no_grad():
            for _, layer in kan_layers(model):
                layer.source.weight.fill_(float("nan"))


@register_method("impossible")
class Impossible(Method):
    """Asks for something the model cannot meet (infeasible-run recording)."""

    test_only = True

    @dataclass
    class Config:
        pass

    def compress(self, model, ctx):
        from bench.errors import Infeasible

        raise Infeasible("impossible on purpose: asks for more than the model has")


@register_method("wait_for")
class WaitFor(Method):
    """Acts as dense, but its compress waits until the file ``marker`` exists (at most 60 s): a run that
    stays in flight while a test does something else (a second writer on the same folder)."""

    test_only = True

    @dataclass
    class Config:
        marker: str = ""  # empty: no wait

    def compress(self, model, ctx):
        import time
        from pathlib import Path

        deadline = time.monotonic() + 60
        while self.config.marker and not Path(self.config.marker).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
