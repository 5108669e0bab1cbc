"""Reading Fashion-MNIST's idx files: the real data that `make test` installs, and damaged copies."""

import gzip

import numpy as np
import pytest

from distill.data import find_fashion_mnist, load_fashion_mnist, read_idx
from distill.data.fashion_mnist import FILES
from distill.errors import InputError


def _write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes())


def test_reads_what_it_wrote(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "i.gz", ints, type_code=0x0C)
    assert read_idx(tmp_path / "i.gz").tolist() == [1, -2, 70000]


def test_damaged_files_are_clear_errors(tmp_path):
    _write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    data = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(data[:-10])
    with pytest.raises(InputError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "magic.gz", "wb") as handle:
        handle.write(b"\x12\x34" + data[2:])
    with pytest.raises(InputError, match="not an idx file"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "broken.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="cannot read"):
        read_idx(tmp_path / "broken.gz")


def test_found_through_the_environment(tmp_path, monkeypatch):
    for split, (images_name, labels_name) in FILES.items():
        _write_idx(tmp_path / images_name, np.zeros((3, 28, 28), np.uint8))
        _write_idx(tmp_path / labels_name, np.array([0, 1, 2], np.uint8))
    monkeypatch.setenv("DISTILL_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr("distill.data.fashion_mnist.SYSTEM_DIR", tmp_path / "absent")
    assert find_fashion_mnist() == tmp_path
    images, labels = load_fashion_mnist("test")
    assert images.shape == (3, 28, 28) and labels.dtype == np.int64


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr("distill.data.fashion_mnist.SYSTEM_DIR", tmp_path / "a")
    monkeypatch.setattr("distill.data.fashion_mnist.PROJECT_DIR", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="make data"):
        find_fashion_mnist()
    with pytest.raises(InputError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("validation")


def test_real_fashion_mnist():
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert 0.28 < train_images.mean() / 255 < 0.29
