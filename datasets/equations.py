"""Symbolic regression tasks: KAN-paper toy functions and Feynman equations, generated from a seed.

Each physical variable is drawn uniformly from its own range (AI Feynman ranges for the
Feynman equations, ``[-1, 1]`` for the KAN-paper functions); the model sees every variable
mapped linearly onto ``[-1, 1]`` (``x = 2 (v - lo) / (hi - lo) - 1``, the identity for the KAN
tasks), so a spline grid on ``[-1, 1]`` covers every input. Targets are the formula's value in
its own units, float32 ``[N, 1]``, never standardised, so RMSE is in the target's units.

``noise`` adds Gaussian noise of ``noise * std(clean train targets)`` to the train and
validation targets; the test targets stay exact, so test RMSE measures the recovered function.
Each split comes from its own seeded stream, so e.g. the test set does not change with
``n_train``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bench.data import Dataset, Splits, register_dataset


class EquationDataset(Dataset):
    task = "regression"
    n_outputs = 1
    variables: ClassVar[list[str]] = []
    ranges: ClassVar[list[tuple[float, float]]] = []
    formula: ClassVar[Callable[[np.ndarray], np.ndarray]]  # [N, d] physical variables -> [N]

    @dataclass
    class Config:
        n_train: int = field(default=1000, metadata={"min": 1})
        n_val: int = field(default=1000, metadata={"min": 1})
        n_test: int = field(default=1000, metadata={"min": 1})
        noise: float = field(default=0.0, metadata={"min": 0.0, "help": "train/val target noise, in units of "
                                                                          "the clean train targets' std"})

    def split_sizes(self) -> tuple[int, int, int]:
        return self.config.n_train, self.config.n_val, self.config.n_test

    def to_physical(self, x: np.ndarray) -> np.ndarray:
        """Model inputs in ``[-1, 1]`` -> physical variables in their ranges."""
        lo, hi = np.array(self.ranges, dtype=np.float64).T
        return lo + (np.asarray(x, dtype=np.float64) + 1) * (hi - lo) / 2

    def _draw(self, n: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed % 2**64, stream])
        x = rng.uniform(-1.0, 1.0, size=(n, len(self.ranges)))
        x = x.astype(np.float32).astype(np.float64)  # the targets belong to the inputs the model sees
        return x, type(self).formula(self.to_physical(x))

    def load(self, data_dir: Path, seed: int) -> Splits:
        cfg = self.config
        parts = [self._draw(n, seed, k) for k, n in enumerate((cfg.n_train, cfg.n_val, cfg.n_test))]
        if cfg.noise > 0:
            sigma = cfg.noise * float(np.std(parts[0][1]))
            rng = np.random.default_rng([seed % 2**64, 3])
            parts[:2] = [(x, y + rng.normal(0.0, sigma, size=y.shape)) for x, y in parts[:2]]
        out = []
        for x, y in parts:
            out += [torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32).view(-1, 1)]
        return Splits(*out)


def _kan(names):
    return [(-1.0, 1.0)] * len(names)


# name, formula text, variables, ranges, formula on [N, d] physical variables, default hidden widths
EQUATIONS = [
    ("eq_exp_sin", "f = exp(sin(pi x1) + x2^2)  [KAN paper]", ["x1", "x2"], _kan("12"),
     lambda v: np.exp(np.sin(np.pi * v[:, 0]) + v[:, 1] ** 2), [8]),
    ("eq_product", "f = x1 x2  [KAN paper]", ["x1", "x2"], _kan("12"),
     lambda v: v[:, 0] * v[:, 1], [8]),
    ("eq_exp100", "f = exp(mean_i sin^2(pi x_i / 2)), i = 1..100  [KAN paper]",
     [f"x{i}" for i in range(1, 101)], _kan(range(100)),
     lambda v: np.exp(np.mean(np.sin(np.pi * v / 2) ** 2, axis=1)), [16]),
    ("feynman_I_6_2", "f = exp(-(theta/sigma)^2 / 2) / sqrt(2 pi sigma^2)  [Feynman I.6.2; sigma, theta in [1,3]]",
     ["sigma", "theta"], [(1.0, 3.0), (1.0, 3.0)],
     lambda v: np.exp(-((v[:, 1] / v[:, 0]) ** 2) / 2) / np.sqrt(2 * np.pi * v[:, 0] ** 2), [8]),
    ("feynman_I_12_11", "F = q (Ef + B v sin(theta))  [Feynman I.12.11; all in [1,5]]",
     ["q", "Ef", "B", "v", "theta"], [(1.0, 5.0)] * 5,
     lambda v: v[:, 0] * (v[:, 1] + v[:, 2] * v[:, 3] * np.sin(v[:, 4])), [16]),
    ("feynman_II_6_15a", "Ef = p_d / (4 pi epsilon) * 3 z / r^5 * sqrt(x^2 + y^2)  [Feynman II.6.15a; all in [1,3]]",
     ["epsilon", "p_d", "r", "x", "y", "z"], [(1.0, 3.0)] * 6,
     lambda v: v[:, 1] / (4 * np.pi * v[:, 0]) * 3 * v[:, 5] / v[:, 2] ** 5 * np.sqrt(v[:, 3] ** 2 + v[:, 4] ** 2),
     [16]),
]

for _name, _text, _vars, _ranges, _fn, _hidden in EQUATIONS:
    register_dataset(_name)(type(_name, (EquationDataset,), {
        "__module__": __name__, "__doc__": _text, "description": _text, "variables": _vars,
        "ranges": _ranges, "formula": staticmethod(_fn), "input_shape": (len(_vars),),
        "default_hidden": _hidden}))
