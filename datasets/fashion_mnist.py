"""Fashion-MNIST (Xiao et al. 2017), read by ``torchvision.datasets.FashionMNIST``.

Files: ``<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``. If they are
missing, the gzipped copies of Debian's ``dataset-fashion-mnist`` package are unpacked there
first (searched in option ``debian_dir``, else ``$BENCH_FASHION_MNIST_DIR``, else
``/usr/share/datasets/fashion-mnist``); only then does torchvision download (``download=True``).
Validation = a seeded ``val_fraction`` of the 60k training images; test = the official 10k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import register_dataset
from bench.data.images import IdxImageDataset, ImageConfig

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "BENCH_FASHION_MNIST_DIR"


@register_dataset("fashion_mnist")
class FashionMNIST(IdxImageDataset):
    tv_class_name = "FashionMNIST"
    description = "Fashion-MNIST clothing images, 28x28 grayscale, 10 classes (60k train / 10k test)"

    @dataclass
    class Config(ImageConfig):
        debian_dir: str | None = field(default=None, metadata={
            "help": f"folder with the *-ubyte.gz files of Debian's dataset-fashion-mnist "
                    f"(None = ${ENV_VAR}, else {DEBIAN_DIR})"})

    def debian_folder(self) -> Path:
        return Path(self.config.debian_dir or os.environ.get(ENV_VAR) or DEBIAN_DIR)

    @property
    def install_hint(self) -> str:
        return f" or install Debian package dataset-fashion-mnist (looked in {self.debian_folder()})"

    def local_sources(self) -> dict[str, Path] | None:
        folder = self.debian_folder()
        found = {}
        for name in self.raw_files():
            candidates = [folder / f"{name}.gz", folder / name]
            found[name] = next((p for p in candidates if p.is_file()), candidates[0])
        return found
