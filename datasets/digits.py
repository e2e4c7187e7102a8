"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); no download.

Split train / validation / test by a seeded (optionally stratified) shuffle; pixels (0..16)
are standardised with one mean and std measured on the train split only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from bench.data import Dataset, Splits, register_dataset


@register_dataset("digits")
class Digits(Dataset):
    task = "classification"
    input_shape = (1, 8, 8)
    n_outputs = 10
    default_hidden: ClassVar[list[int]] = [64]
    description = "scikit-learn load_digits: 8x8 grayscale handwritten digits, 10 classes, 1797 images"

    @dataclass
    class Config:
        val_fraction: float = field(default=0.2, metadata={"min": 0.05, "max": 0.45})
        test_fraction: float = field(default=0.2, metadata={"min": 0.05, "max": 0.45})  # train keeps >= 10%
        stratify: bool = field(default=True, metadata={"help": "keep class proportions equal across splits"})

    def split_sizes(self) -> tuple[int, int, int]:
        """As ``train_test_split`` makes them (a fractional test size rounds up)."""
        import math

        n, cfg = 1797, self.config
        n_test = math.ceil(cfg.test_fraction * n)
        n_val = math.ceil(cfg.val_fraction / (1 - cfg.test_fraction) * (n - n_test))
        return n - n_test - n_val, n_val, n_test

    def load(self, data_dir: Path, seed: int) -> Splits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.float32).view(-1, *self.input_shape)
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
        cfg, idx = self.config, torch.arange(len(y))
        rest, test = train_test_split(idx.numpy(), test_size=cfg.test_fraction, random_state=seed % 2**32,
                                      stratify=y.numpy() if cfg.stratify else None)
        train, val = train_test_split(rest, test_size=cfg.val_fraction / (1 - cfg.test_fraction),
                                      random_state=(seed + 1) % 2**32,
                                      stratify=y.numpy()[rest] if cfg.stratify else None)
        train, val, test = (torch.as_tensor(i) for i in (train, val, test))
        mean, std = x[train].mean(), x[train].std()
        self.norm_stats = ([float(mean)], [float(std)])
        return Splits(*(t for i in (train, val, test) for t in ((x[i] - mean) / std, y[i])))
