"""Shared loading for torchvision image datasets (MNIST, Fashion-MNIST, CIFAR-10/100).

A plugin subclasses :class:`TorchvisionImageDataset` (or :class:`IdxImageDataset` for the
MNIST family), names the torchvision class and says where torchvision keeps its raw files.
This module does the rest, the same way for every image dataset:

1. **Getting the files.** If torchvision's raw files are there, use them. Otherwise copy them
   from a local source the plugin names (e.g. a Debian data package), else download through
   torchvision if ``download=True``. Anything that fails becomes one :class:`UserError` line
   naming the folder and the files to place there. Downloads run under a socket timeout so an
   offline machine fails quickly instead of hanging.
2. **Reading.** torchvision's own class reads the files (its format checks and, for CIFAR, its
   md5 checks stay in force); the images become ``uint8 [N, C, H, W]``.
3. **Splitting.** A seeded ``val_fraction`` of the official training set is the validation
   split (:func:`bench.data.split_indices`); the official test set is the test split. The
   optional ``n_train`` / ``n_val`` / ``n_test`` caps take seeded random subsets for fast runs.
4. **Normalising.** ``(x / 255 - mean) / std`` per channel, with mean and std measured on the
   train split only (after capping); they are kept in ``dataset.norm_stats`` after ``load``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from bench.data import Dataset, Splits, split_indices
from bench.errors import UserError

DOWNLOAD_TIMEOUT_S = 30.0


@dataclass
class ImageConfig:
    download: bool = field(default=True, metadata={"help": "download through torchvision if the files are missing"})
    val_fraction: float = field(default=0.1, metadata={"min": 0.001, "max": 0.9,
                                                        "help": "seeded share of the official train set used "
                                                                "for validation"})
    n_train: int | None = field(default=None, metadata={"min": 1, "help": "cap on train samples (None = all)"})
    n_val: int | None = field(default=None, metadata={"min": 1, "help": "cap on validation samples (None = all)"})
    n_test: int | None = field(default=None, metadata={"min": 1, "help": "cap on test samples (None = all)"})


def one_line(text: object, limit: int = 160) -> str:
    """``text`` with all whitespace runs collapsed to one space, cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


@contextlib.contextmanager
def socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def copy_raw_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, gunzipping it if it ends in ``.gz``; atomic (temp file + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            opener = gzip.open if src.suffix == ".gz" else open
            with opener(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def images_and_labels(tv_dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[N, C, H, W]`` images and int64 ``[N]`` labels from a torchvision dataset object."""
    data = torch.as_tensor(tv_dataset.data)
    if data.ndim == 3:  # MNIST family: [N, H, W]
        data = data.unsqueeze(1)
    elif data.ndim == 4:  # CIFAR: [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    return data.contiguous(), torch.as_tensor(tv_dataset.targets, dtype=torch.int64)


RAW_CACHE_SIZE = 4  # a train and a test file set of two datasets (uint8: 55 MB for Fashion-MNIST, 184 MB CIFAR)
_RAW: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def seeded_subset(n: int, cap: int | None, seed: int) -> torch.Tensor:
    """All of ``range(n)``, or a seeded random ``cap`` of them."""
    if cap is None or cap >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:cap]


class TorchvisionImageDataset(Dataset):
    """Base for image datasets read by a ``torchvision.datasets`` class."""

    task = "classification"
    default_hidden: ClassVar[list[int]] = [64]
    tv_class_name: ClassVar[str] = ""  # attribute of torchvision.datasets
    install_hint: ClassVar[str] = ""  # appended to the "place files there" message

    Config = ImageConfig

    # ----------------------------------------------------------- plugin hooks
    def raw_folder(self, data_dir: Path) -> Path:
        """The folder where the torchvision class expects its files."""
        raise NotImplementedError

    def raw_files(self) -> list[str]:
        """File names the torchvision class needs in :meth:`raw_folder`."""
        raise NotImplementedError

    def local_sources(self) -> dict[str, Path] | None:
        """Local copies of the raw files (name -> path, ``.gz`` is gunzipped), or None."""
        return None

    official_sizes: ClassVar[tuple[int, int]] = (0, 0)  # (official train, official test) images

    def split_sizes(self) -> tuple[int, int, int] | None:
        """The split ``load`` makes, counted: ``round(val_fraction * train)`` validation images, the
        rest training, the official test set; each capped by n_train / n_val / n_test."""
        n_full, n_test = self.official_sizes
        if not n_full:
            return None
        cfg = self.config
        n_val = int(round(cfg.val_fraction * n_full))
        n_train = n_full - n_val

        def cap(n, c):
            return n if c is None else min(n, c)

        return cap(n_train, cfg.n_train), cap(n_val, cfg.n_val), cap(n_test, cfg.n_test)

    # ------------------------------------------------------------ availability
    def tv_class(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.tv_class_name)

    def _missing(self, data_dir: Path) -> list[str]:
        folder = self.raw_folder(data_dir)
        return [f for f in self.raw_files() if not (folder / f).is_file()]

    def _local_ready(self) -> dict[str, Path] | None:
        src = self.local_sources()
        if src and all(p.is_file() for p in src.values()):
            return src
        return None

    def _no_data(self, data_dir: Path, why: str) -> UserError:
        folder = self.raw_folder(data_dir)
        return UserError(f"{self.name}: no data in {folder} and {why}: place {', '.join(self.raw_files())} "
                         f"there{self.install_hint}")

    def _download(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                cls = self.tv_class()
                cls(str(data_dir), train=True, download=True)
                cls(str(data_dir), train=False, download=True)
        except Exception as exc:
            raise self._no_data(data_dir, f"download failed (offline? {type(exc).__name__}: {one_line(exc, 100)})"
                                ) from exc

    def available(self, data_dir: Path) -> bool:
        return not self._missing(Path(data_dir)) or self._local_ready() is not None

    def check_available(self, data_dir: Path) -> None:
        """OK if the raw files or their local copies are there; else download (if allowed) or raise."""
        data_dir = Path(data_dir)
        if not self._missing(data_dir) or self._local_ready():
            return
        if not self.config.download:
            raise self._no_data(data_dir, "download=False")
        self._download(data_dir)

    def _ensure_files(self, data_dir: Path) -> None:
        missing = self._missing(data_dir)
        if not missing:
            return
        src = self._local_ready()
        if src is not None:
            folder = self.raw_folder(data_dir)
            try:
                for name in missing:
                    copy_raw_file(src[name], folder / name)
            except OSError as exc:
                raise UserError(f"{self.name}: could not copy {src[name]} to {folder}: {one_line(exc)}") from exc
            return
        self.check_available(data_dir)

    # ------------------------------------------------------------------ loading
    def _read(self, data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw uint8 images and labels, parsed once per process while the files are unchanged
        (a sweep loads a split per seed; parsing the files took 2.5 of the 3.4 s of a Fashion-MNIST load).
        Shared by every load in the process: callers index into them (a copy) and must never write to
        them (:meth:`load` does not)."""
        folder = self.raw_folder(data_dir)
        stamp = tuple((f, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f in self.raw_files()
                      if (st := _stat(folder / f)) is not None)  # ctime: a copy that keeps the mtime is new
        key = (type(self).__name__, str(folder.resolve()), train, stamp)
        if key not in _RAW:
            while len(_RAW) >= RAW_CACHE_SIZE:
                _RAW.pop(next(iter(_RAW)))
            _RAW[key] = self._parse(data_dir, train)
        return _RAW[key]

    def _parse(self, data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            tv = self.tv_class()(str(data_dir), train=train, download=False)
        except Exception as exc:
            raise UserError(f"{self.name}: could not read the files in {self.raw_folder(data_dir)} "
                            f"({type(exc).__name__}: {one_line(exc, 100)}); delete them and place the official "
                            f"files there{self.install_hint}") from exc
        x, y = images_and_labels(tv)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise UserError(f"{self.name}: images in {self.raw_folder(data_dir)} have shape {tuple(x.shape[1:])}, "
                            f"expected {tuple(self.input_shape)}")
        if len(y) != len(x) or (len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_outputs)):
            raise UserError(f"{self.name}: labels in {self.raw_folder(data_dir)} do not match the images "
                            f"or lie outside 0..{self.n_outputs - 1}")
        return x, y

    def load(self, data_dir: Path, seed: int) -> Splits:
        data_dir = Path(data_dir)
        self._ensure_files(data_dir)
        cfg = self.config
        x_full, y_full = self._read(data_dir, train=True)
        x_test, y_test = self._read(data_dir, train=False)

        val_idx, train_idx = split_indices(len(x_full), (cfg.val_fraction,), seed)
        if cfg.n_train is not None:
            train_idx = train_idx[: cfg.n_train]
        if cfg.n_val is not None:
            val_idx = val_idx[: cfg.n_val]
        test_idx = seeded_subset(len(x_test), cfg.n_test, seed)
        if len(train_idx) == 0 or len(val_idx) == 0 or len(test_idx) == 0:
            raise UserError(f"{self.name}: val_fraction={cfg.val_fraction} leaves an empty split of "
                            f"{len(x_full)} training images")

        x_train = x_full[train_idx].float().div_(255)
        dims = [0, 2, 3]
        mean = x_train.mean(dim=dims, dtype=torch.float64)
        std = x_train.double().std(dim=dims).clamp_min(1e-8)
        self.norm_stats = (mean.tolist(), std.tolist())
        mean = mean.float().view(1, -1, 1, 1)
        std = std.float().view(1, -1, 1, 1)

        def norm(x: torch.Tensor) -> torch.Tensor:
            return x.float().div_(255).sub_(mean).div_(std)

        return Splits(x_train.sub_(mean).div_(std), y_full[train_idx],
                      norm(x_full[val_idx]), y_full[val_idx],
                      norm(x_test[test_idx]), y_test[test_idx])


IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class IdxImageDataset(TorchvisionImageDataset):
    """The MNIST family: torchvision reads ``<data_dir>/<ClassName>/raw/<IDX_FILES>``."""

    input_shape = (1, 28, 28)
    n_outputs = 10
    official_sizes = (60000, 10000)

    def raw_folder(self, data_dir: Path) -> Path:
        # torchvision.datasets.MNIST.raw_folder: os.path.join(root, self.__class__.__name__, "raw")
        return Path(data_dir) / self.tv_class_name / "raw"

    def raw_files(self) -> list[str]:
        return list(IDX_FILES)
