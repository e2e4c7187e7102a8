"""Dataset plugins, loaded through their real code from small fixture files in the real formats.

Nothing here touches the network, ``/usr/share`` or ``~``: every data folder is under
``tmp_path`` and ``BENCH_FASHION_MNIST_DIR`` points at an empty temp folder unless a test
sets it. IDX fixtures carry the real magic numbers; CIFAR fixtures are pickled dicts with the
keys torchvision reads. torchvision checks CIFAR files against the md5 sums of the official
archives, which no fixture can match, so the CIFAR loading tests monkeypatch
``torchvision.datasets.cifar.check_integrity`` to an existence check (in this test only), and
one test shows that without the patch the md5 check is in force and fails with a one-line error.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch

from bench.data import get_dataset
from bench.errors import UserError
from bench.registry import load_plugins

load_plugins()

IDX_NAMES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
             ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(tmp_path, monkeypatch):
    empty = tmp_path / "no-debian-files"
    empty.mkdir()
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(empty))


# ---------------------------------------------------------------------------------------- fixtures
def write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    """An IDX file: magic 0x0000080N (unsigned byte, N dims), big-endian dims, then the bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    blob = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(blob)


def idx_arrays(n_train=60, n_test=20, seed=0):
    """Dark train images (0..127), bright test images (128..255), labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    return {("train", "images"): rng.integers(0, 128, (n_train, 28, 28), dtype=np.uint8),
            ("train", "labels"): (np.arange(n_train) % 10).astype(np.uint8),
            ("test", "images"): rng.integers(128, 256, (n_test, 28, 28), dtype=np.uint8),
            ("test", "labels"): (np.arange(n_test) % 10).astype(np.uint8)}


def write_idx_set(folder, arrays, gz=False):
    for key, arr in arrays.items():
        write_idx(folder / (IDX_NAMES[key] + (".gz" if gz else "")), arr, gz=gz)


def write_cifar(root, hundred: bool, per_batch=12, n_test=15, seed=0):
    """Official layout: ``data`` uint8 [n, 3072] (R, G, B planes), ``labels`` / ``fine_labels`` lists."""
    rng = np.random.default_rng(seed)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n, lo, hi):
        d = {"data": rng.integers(lo, hi, (n, 3072), dtype=np.uint8), label_key: [int(v) for v in
                                                                                  rng.integers(0, classes, n)]}
        if hundred:
            d["coarse_labels"] = [v // 5 for v in d[label_key]]
        return d

    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    train = [batch(per_batch * (5 if hundred else 1), 0, 200) for _ in names]
    test = batch(n_test, 50, 256)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]} \
        if hundred else {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    for name, d in [*zip(names, train), ("test" if hundred else "test_batch", test),
                    ("meta" if hundred else "batches.meta", meta)]:
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return np.concatenate([b["data"] for b in train]), test["data"]


@pytest.fixture
def cifar_no_md5(monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


# ---------------------------------------------------------------------------------------- helpers
def raw_uint8(x: torch.Tensor, ds) -> np.ndarray:
    """Undo ``(x/255 - mean) / std`` with the dataset's recorded train statistics."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in ds.norm_stats)
    return ((x.double() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def row_index(images: np.ndarray) -> dict[bytes, int]:
    idx = {img.tobytes(): i for i, img in enumerate(images)}
    assert len(idx) == len(images), "fixture images must be distinct"
    return idx


def indices_of(x, ds, lookup, shape) -> list[int]:
    return [lookup[r.reshape(shape).tobytes()] for r in raw_uint8(x, ds)]


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def assert_splits_equal(a, b):
    for name in ("train", "val", "test"):
        for u, v in zip(a.split(name), b.split(name)):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------ digits
def test_digits_splits_normalisation_and_determinism():
    from sklearn.datasets import load_digits

    ds = get_dataset("digits")
    assert (ds.task, ds.input_shape, ds.n_outputs, ds.default_hidden) == ("classification", (1, 8, 8), 10, [64])
    s = ds.load(None, seed=3)
    sizes = [len(s.y_train), len(s.y_val), len(s.y_test)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 360
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train.shape[1:] == (1, 8, 8)
    assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std()) - 1) < 1e-5
    assert abs(float(s.x_test.mean())) > 1e-4  # test is scaled with train stats, not its own
    # the three splits together are exactly the 1797 images (as a multiset: digits has duplicates)
    mean, std = ds.norm_stats[0][0], ds.norm_stats[1][0]
    rows = torch.cat([s.x_train, s.x_val, s.x_test]).view(-1, 64).double() * std + mean
    got = sorted(map(tuple, rows.round().long().tolist()))
    assert got == sorted(map(tuple, load_digits().data.astype(int).tolist()))
    # stratified: every class present in every split in about the same share
    for y in (s.y_val, s.y_test):
        assert y.bincount(minlength=10).min() >= 30
    assert_splits_equal(s, get_dataset("digits").load(None, seed=3))
    assert not torch.equal(s.x_train, get_dataset("digits").load(None, seed=4).x_train)


# ------------------------------------------------------------------------------ MNIST / Fashion-MNIST
def test_idx_fixture_has_real_magic_numbers(tmp_path):
    write_idx(tmp_path / "i", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "l.gz", np.zeros(2, np.uint8), gz=True)
    assert (tmp_path / "i").read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    assert gzip.decompress((tmp_path / "l.gz").read_bytes())[:8] == bytes.fromhex("00000801 00000002")


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_dataset_from_torchvision_raw_dir(tmp_path, name, folder):
    arrays = idx_arrays()
    write_idx_set(tmp_path / "data" / folder / "raw", arrays)
    ds = get_dataset(name, download=False, val_fraction=0.2)
    ds.check_available(tmp_path / "data")
    s = ds.load(tmp_path / "data", seed=7)

    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (48, 12, 20)
    for x, y in (s.split("train"), s.split("val"), s.split("test")):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(x),)

    # train and val are disjoint and together the whole official train set, labels kept
    lookup = row_index(arrays["train", "images"])
    tr = indices_of(s.x_train, ds, lookup, (28, 28))
    va = indices_of(s.x_val, ds, lookup, (28, 28))
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(60))
    assert s.y_train.tolist() == [i % 10 for i in tr]

    # normalisation: statistics of the train split only, applied to every split
    train_px = arrays["train", "images"][tr].astype(np.float64) / 255
    assert ds.norm_stats[0][0] == pytest.approx(train_px.mean(), rel=1e-6)
    assert ds.norm_stats[1][0] == pytest.approx(train_px.std(ddof=1), rel=1e-6)
    expect_test = (arrays["test", "images"].astype(np.float64) / 255 - train_px.mean()) / train_px.std(ddof=1)
    got_test = s.x_test[:, 0].double().numpy()
    order = indices_of(s.x_test, ds, row_index(arrays["test", "images"]), (28, 28))
    assert np.allclose(got_test, expect_test[order], atol=1e-5)
    assert float(s.x_test.mean()) > 1.0  # the bright test set is not re-centred on itself

    assert_splits_equal(s, get_dataset(name, download=False, val_fraction=0.2).load(tmp_path / "data", seed=7))
    other = get_dataset(name, download=False, val_fraction=0.2).load(tmp_path / "data", seed=8)
    assert not torch.equal(s.x_train, other.x_train)


def test_fashion_mnist_from_debian_files_via_env_var(tmp_path, monkeypatch):
    arrays = idx_arrays()
    write_idx_set(tmp_path / "deb", arrays, gz=True)
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(tmp_path / "deb"))
    ds = get_dataset("fashion_mnist", download=False)
    ds.check_available(tmp_path / "data")  # Debian files count as available, nothing is written yet
    assert not (tmp_path / "data" / "FashionMNIST").exists()
    s = ds.load(tmp_path / "data", seed=1)

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    for key, arr in arrays.items():  # unpacked where torchvision looks, byte for byte
        blob = (raw / IDX_NAMES[key]).read_bytes()
        assert blob[16 if arr.ndim == 3 else 8:] == arr.tobytes()
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (54, 6, 20)  # default val_fraction 0.1

    # same splits as when the files had been in torchvision's raw folder from the start
    write_idx_set(tmp_path / "direct" / "FashionMNIST" / "raw", arrays)
    assert_splits_equal(s, get_dataset("fashion_mnist", download=False).load(tmp_path / "direct", seed=1))


def test_fashion_mnist_debian_dir_option(tmp_path):
    write_idx_set(tmp_path / "deb", idx_arrays(), gz=True)
    s = get_dataset("fashion_mnist", download=False, debian_dir=str(tmp_path / "deb")).load(tmp_path / "d", seed=0)
    assert s.x_train.shape == (54, 1, 28, 28)


def test_caps_take_seeded_subsets(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", idx_arrays())
    # caps pick from the uncapped split (compare raw pixels; the two normalise with different stats)
    ds_full = get_dataset("mnist", download=False)
    full = ds_full.load(tmp_path, seed=5)
    ds_cap = get_dataset("mnist", download=False, n_train=10, n_val=3, n_test=5)
    capped = ds_cap.load(tmp_path, seed=5)
    assert (len(capped.y_train), len(capped.y_val), len(capped.y_test)) == (10, 3, 5)
    for k in ("train", "val", "test"):
        pool = {r.tobytes() for r in raw_uint8(full.split(k)[0], ds_full)}
        assert all(r.tobytes() in pool for r in raw_uint8(capped.split(k)[0], ds_cap))
    assert abs(float(capped.x_train.mean())) < 1e-5  # stats of the capped train split


def test_corrupt_idx_file_is_one_line_error(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", idx_arrays())
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x07garbage")
    with pytest.raises(UserError) as err:
        get_dataset("mnist", download=False).load(tmp_path, seed=0)
    assert_one_line(err, "could not read", str(tmp_path / "MNIST" / "raw"))


def test_raw_files_parsed_once_per_process_until_they_change(tmp_path, monkeypatch):
    from bench.data import images

    write_idx_set(tmp_path / "MNIST" / "raw", idx_arrays())
    parsed = []
    parse = images.TorchvisionImageDataset._parse
    monkeypatch.setattr(images.TorchvisionImageDataset, "_parse",
                        lambda self, d, train: parsed.append(train) or parse(self, d, train))
    ds = get_dataset("mnist", download=False, val_fraction=0.2)
    first = ds.load(tmp_path, seed=0)
    assert_splits_equal(first, ds.load(tmp_path, seed=0))  # the cached raw arrays are never written to
    ds.load(tmp_path, seed=1)
    assert parsed == [True, False]
    write_idx_set(tmp_path / "MNIST" / "raw", idx_arrays(seed=1))  # new files: parsed again
    for f in (tmp_path / "MNIST" / "raw").iterdir():  # a distinct stamp even on a coarse-clock file system
        os.utime(f, ns=(1, 1))
    assert not torch.equal(ds.load(tmp_path, seed=0).x_train, first.x_train)
    assert parsed == [True, False, True, False]


# ------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("name,hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar_fixture(tmp_path, cifar_no_md5, name, hundred):
    train_raw, test_raw = write_cifar(tmp_path, hundred)
    ds = get_dataset(name, download=False, val_fraction=0.25)
    assert ds.input_shape == (3, 32, 32) and ds.n_outputs == (100 if hundred else 10)
    ds.check_available(tmp_path)
    s = ds.load(tmp_path, seed=2)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (45, 15, 15)
    assert s.x_train.dtype == torch.float32 and s.x_train.shape[1:] == (3, 32, 32)
    assert s.y_test.dtype == torch.int64

    # channel order survives torchvision's HWC round trip: rows are R, G, B planes of 1024
    lookup = row_index(train_raw)
    tr = indices_of(s.x_train, ds, lookup, (3072,))
    va = indices_of(s.x_val, ds, lookup, (3072,))
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(60))
    indices_of(s.x_test, ds, row_index(test_raw), (3072,))

    # per-channel train statistics
    px = train_raw[tr].reshape(-1, 3, 1024).astype(np.float64) / 255
    assert np.allclose(ds.norm_stats[0], px.mean(axis=(0, 2)), rtol=1e-6)
    assert np.allclose(ds.norm_stats[1], px.transpose(1, 0, 2).reshape(3, -1).std(axis=1, ddof=1), rtol=1e-6)
    assert np.allclose(s.x_train.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)


def test_cifar_md5_check_stays_in_force(tmp_path):
    write_cifar(tmp_path, hundred=False)
    ds = get_dataset("cifar10", download=False)
    ds.check_available(tmp_path)  # the files are there...
    with pytest.raises(UserError) as err:  # ...but are not the official ones
        ds.load(tmp_path, seed=0)
    assert_one_line(err, "could not read", str(tmp_path / "cifar-10-batches-py"))


# --------------------------------------------------------------------------- missing data, options
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                         ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_data_offline_is_one_line(tmp_path, name, folder):
    ds = get_dataset(name, download=False)
    with pytest.raises(UserError) as err:
        ds.check_available(tmp_path)
    assert_one_line(err, str(tmp_path / folder), "download=False")
    with pytest.raises(UserError) as err:
        ds.load(tmp_path, seed=0)
    msg = assert_one_line(err, str(tmp_path / folder))
    if name == "fashion_mnist":
        assert "dataset-fashion-mnist" in msg and "t10k-labels-idx1-ubyte" in msg


@pytest.mark.parametrize("name,tv_name", [("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")])
def test_failed_download_is_one_line(tmp_path, monkeypatch, name, tv_name):
    import torchvision.datasets

    calls = []

    def offline(self):
        calls.append(self)
        raise RuntimeError("Error downloading x.gz:\nTried http://a/, got:\n<urlopen error [Errno -2]>\n") \
            if name == "fashion_mnist" else URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(getattr(torchvision.datasets, tv_name), "download", offline)
    with pytest.raises(UserError) as err:
        get_dataset(name, download=True).load(tmp_path, seed=0)
    assert calls
    assert_one_line(err, "download failed", "offline?", str(tmp_path))


def test_bad_options_are_user_errors():
    for name, opts in [("fashion_mnist", {"bogus": 1}), ("digits", {"shuffle": True}),
                       ("mnist", {"val_fraction": 1.5}), ("cifar10", {"n_train": 0}),
                       ("eq_product", {"n_train": "many"}), ("feynman_I_6_2", {"noise": -1.0}),
                       ("digits", {"test_fraction": 0.5}),
                       ("fashion_mnist", {"download": "yes"})]:
        with pytest.raises(UserError) as err:
            get_dataset(name, **opts)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown dataset"):
        get_dataset("imagenet")


# --------------------------------------------------------------------------------------- equations
# Independent re-statement of every task: variable ranges and the formula on physical values.
EQUATIONS = {
    "eq_exp_sin": ([(-1, 1)] * 2, lambda v: np.exp(np.sin(np.pi * v[0]) + v[1] ** 2)),
    "eq_product": ([(-1, 1)] * 2, lambda v: v[0] * v[1]),
    "eq_exp100": ([(-1, 1)] * 100, lambda v: np.exp(sum(np.sin(np.pi * xi / 2) ** 2 for xi in v) / 100)),
    "feynman_I_6_2": ([(1, 3)] * 2,
                      lambda v: np.exp(-v[1] ** 2 / (2 * v[0] ** 2)) / np.sqrt(2 * np.pi * v[0] ** 2)),
    "feynman_I_12_11": ([(1, 5)] * 5, lambda v: v[0] * (v[1] + v[2] * v[3] * np.sin(v[4]))),
    "feynman_II_6_15a": ([(1, 3)] * 6, lambda v: 3 * v[1] * v[5] * np.hypot(v[3], v[4])
                         / (4 * np.pi * v[0] * v[2] ** 5)),
}


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_equation_targets_match_formula(name):
    ranges, f = EQUATIONS[name]
    ds = get_dataset(name, n_train=200, n_val=50, n_test=80)
    assert ds.task == "regression" and ds.n_outputs == 1 and ds.input_shape == (len(ranges),)
    assert ds.description and ds.metric_name == "rmse"
    s = ds.load(None, seed=11)
    assert [len(s.y_train), len(s.y_val), len(s.y_test)] == [200, 50, 80]
    for x, y in (s.split("train"), s.split("val"), s.split("test")):
        assert x.dtype == y.dtype == torch.float32 and y.shape == (len(x), 1)
        assert float(x.min()) >= -1 and float(x.max()) <= 1
        lo, hi = np.array(ranges, dtype=np.float64).T
        v = lo + (x.double().numpy() + 1) / 2 * (hi - lo)
        assert np.allclose(y[:, 0].double().numpy(), f(v.T), rtol=2e-6, atol=1e-7)
    assert float(s.x_train.std()) > 0.5  # inputs spread over [-1, 1]
    assert float(s.y_train.std()) > 0  # targets in their own units, not standardised to zero
    assert_splits_equal(s, get_dataset(name, n_train=200, n_val=50, n_test=80).load(None, seed=11))
    assert not torch.equal(s.x_train, ds.load(None, seed=12).x_train)


def test_equation_noise_and_independent_streams():
    exact = get_dataset("eq_exp_sin", n_train=300, n_val=100, n_test=100).load(None, seed=0)
    noisy = get_dataset("eq_exp_sin", n_train=300, n_val=100, n_test=100, noise=0.1).load(None, seed=0)
    bigger = get_dataset("eq_exp_sin", n_train=600, n_val=100, n_test=100).load(None, seed=0)
    assert torch.equal(exact.x_train, noisy.x_train) and torch.equal(exact.y_test, noisy.y_test)
    resid = (noisy.y_train - exact.y_train).std() / exact.y_train.std()
    assert 0.08 < float(resid) < 0.12
    assert not torch.equal(exact.y_val, noisy.y_val)
    assert torch.equal(exact.x_test, bigger.x_test) and torch.equal(exact.x_val, bigger.x_val)
    assert torch.equal(exact.x_train, bigger.x_train[:300])
