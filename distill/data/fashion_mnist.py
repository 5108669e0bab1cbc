"""Fashion-MNIST from the original idx files (Debian package `dataset-fashion-mnist`), read directly.

Searched in order: the `root` argument, $DISTILL_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist (where
the package installs as root) and .data/fashion-mnist in the project (where `make data` unpacks it without
root).
"""

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from distill.errors import InputError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Statistics of the training images in [0, 1], for normalisation.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
PROJECT_DIR = Path(__file__).resolve().parents[2] / ".data" / "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def find_fashion_mnist(root: Optional[Union[str, Path]] = None) -> Path:
    """The folder holding the four idx .gz files."""
    candidates = [Path(root)] if root else []
    if os.environ.get("DISTILL_FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["DISTILL_FASHION_MNIST_DIR"]))
    candidates += [SYSTEM_DIR, PROJECT_DIR, Path.cwd() / ".data" / "fashion-mnist"]
    for folder in candidates:
        if all((folder / name).is_file() for pair in FILES.values() for name in pair):
            return folder
    searched = ", ".join(str(c) for c in candidates)
    raise InputError(
        f"Fashion-MNIST not found (looked in {searched}): run `make data`, which installs the Debian package "
        "dataset-fashion-mnist, or set DISTILL_FASHION_MNIST_DIR to a folder with its four idx .gz files"
    )


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """An idx file (gzipped or not) as an array; a damaged file is a clear error, not a garbage array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise InputError(f"cannot read {path}: {error}; reinstall the data with `make data`") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an idx file (bad magic number); reinstall the data with `make data`")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise InputError(
            f"{path} is truncated or padded: {len(data)} bytes for shape {shape}, expected {expected}; "
            "reinstall the data with `make data`"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: Optional[Union[str, Path]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" (60,000) or "test" (10,000) split."""
    if split not in FILES:
        raise InputError(f"unknown Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    folder = find_fashion_mnist(root)
    images_file, labels_file = FILES[split]
    images = read_idx(folder / images_file)
    labels = read_idx(folder / labels_file).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


PATH_PREFIX = "fashion_mnist/"


def fashion_mnist_path(split: str, index: int) -> str:
    """The name one Fashion-MNIST image goes by in file lists: fashion_mnist/<split>/<index>."""
    return f"{PATH_PREFIX}{split}/{index}"


def parse_fashion_mnist_path(path: str) -> Optional[Tuple[str, int]]:
    """(split, index) of a fashion_mnist/<split>/<index> name; None for any other path."""
    parts = str(path).split("/")
    if len(parts) != 3 or parts[0] + "/" != PATH_PREFIX or parts[1] not in FILES or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def fashion_mnist_selection(names) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a list of fashion_mnist/<split>/<index> names, in order."""
    parsed = [parse_fashion_mnist_path(n) for n in names]
    bad = [n for n, p in zip(names, parsed) if p is None]
    if bad:
        raise InputError(f"{bad[0]!r} is not a Fashion-MNIST image name (fashion_mnist/train|test/<index>); a list "
                         "mixes them with files")
    images = []
    for split in sorted({p[0] for p in parsed}):
        data, targets = load_fashion_mnist(split)
        where = [i for i, p in enumerate(parsed) if p[0] == split]
        index = np.array([parsed[i][1] for i in where])
        if index.max() >= len(data):
            raise InputError(f"fashion_mnist/{split}/{index.max()} is out of range: the split has {len(data)} images")
        images.append((where, data[index], targets[index]))
    out_images = np.empty((len(names), 28, 28), dtype=np.uint8)
    out_labels = np.empty(len(names), dtype=np.int64)
    for where, data, targets in images:
        out_images[where], out_labels[where] = data, targets
    return out_images, out_labels
