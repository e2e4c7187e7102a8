"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), read by torchvision's ``CIFAR10`` / ``CIFAR100``.

Files: the python pickle batches of the official archives, ``<data_dir>/cifar-10-batches-py/``
(``data_batch_1..5``, ``test_batch``, ``batches.meta``) and ``<data_dir>/cifar-100-python/``
(``train``, ``test``, ``meta``); torchvision checks their md5 sums on every load. Validation =
a seeded ``val_fraction`` of the 50k training images; test = the official 10k. Per-channel
normalisation with train-split statistics (:mod:`bench.data.images`).
"""

from __future__ import annotations

from pathlib import Path

from bench.data import register_dataset
from bench.data.images import TorchvisionImageDataset


class _Cifar(TorchvisionImageDataset):
    input_shape = (3, 32, 32)
    official_sizes = (50000, 10000)

    def raw_folder(self, data_dir: Path) -> Path:
        return Path(data_dir) / self.tv_class().base_folder

    def raw_files(self) -> list[str]:
        cls = self.tv_class()
        return [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]


@register_dataset("cifar10")
class CIFAR10(_Cifar):
    tv_class_name = "CIFAR10"
    n_outputs = 10
    description = "CIFAR-10 colour images, 3x32x32, 10 classes (50k train / 10k test)"


@register_dataset("cifar100")
class CIFAR100(_Cifar):
    tv_class_name = "CIFAR100"
    n_outputs = 100
    description = "CIFAR-100 colour images, 3x32x32, 100 fine classes (50k train / 10k test)"
