"""The dataset interface and its registry.

A dataset plugin (one file under ``datasets/``) subclasses :class:`Dataset`, declares its
options as a ``Config`` dataclass (see :mod:`bench.config`) and registers itself::

    @register_dataset("digits")
    class Digits(Dataset):
        task = "classification"
        input_shape = (1, 8, 8)
        n_outputs = 10
        default_hidden = [64]

        @dataclass
        class Config:
            val_fraction: float = 0.2

        def load(self, data_dir, seed) -> Splits: ...

``load`` returns all three splits as tensors (inputs float32 ``[N, *input_shape]``, targets
int64 class labels ``[N]`` or float32 ``[N, n_outputs]``). The split into train / validation /
test depends only on ``seed`` and the options, never on the method. Epoch selection uses the
validation split; the runner scores the test split once per run. ``check_available`` raises a
one-line :class:`UserError` saying what to place where when the data is missing offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from bench.config import build_config
from bench.metrics import metric_name
from bench.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def to(self, device) -> Splits:
        return Splits(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val,
                                                   self.x_test, self.y_test)))


class Dataset:
    name: ClassVar[str] = "?"
    task: ClassVar[str] = "classification"  # or "regression"
    input_shape: ClassVar[tuple[int, ...]] = ()
    n_outputs: ClassVar[int] = 1
    default_hidden: ClassVar[list[int]] = [64]
    description: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, **options):
        self.config = build_config(self.Config, options, f"dataset {self.name!r}")

    @property
    def metric_name(self) -> str:
        return metric_name(self.task)

    @property
    def in_features(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def available(self, data_dir: Path) -> bool:
        """Whether the data is here (or generated) without downloading anything."""
        return True

    def check_available(self, data_dir: Path) -> None:
        """Raise UserError (one line: what to place where) if the data cannot be had offline."""

    def split_sizes(self) -> tuple[int, int, int] | None:
        """(train, validation, test) sizes ``load`` returns, without reading data (None: unknown;
        the dry run's estimate then loads the data to count)."""
        return None

    def load(self, data_dir: Path, seed: int) -> Splits:  # pragma: no cover - abstract
        raise NotImplementedError


def get_dataset(name: str, **options) -> Dataset:
    return DATASETS.lookup(name)(**options)


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Random disjoint index sets of the given fractions of ``n`` (the rest goes last)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    out, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        out.append(perm[start:start + k])
        start += k
    out.append(perm[start:])
    return out
