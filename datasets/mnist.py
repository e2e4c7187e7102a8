"""MNIST handwritten digits (LeCun et al.), read by ``torchvision.datasets.MNIST``.

Files: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (downloaded by
torchvision when ``download=True``). Validation = a seeded ``val_fraction`` of the 60k training
images; test = the official 10k test set. Loading, caps and normalisation: :mod:`bench.data.images`.
"""

from __future__ import annotations

from bench.data import register_dataset
from bench.data.images import IdxImageDataset


@register_dataset("mnist")
class MNIST(IdxImageDataset):
    tv_class_name = "MNIST"
    description = "MNIST handwritten digits, 28x28 grayscale, 10 classes (60k train / 10k test)"
