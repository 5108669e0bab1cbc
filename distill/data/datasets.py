"""Where images come from: an ImageFolder tree, a flat folder, a text file of paths, or Fashion-MNIST.

Two kinds of source, one interface: `FileImages` (decoded on demand, in loader workers) and `ArrayImages`
(already in memory as uint8, augmented a whole batch at a time). Unreadable files are found up front (or on
first use for very large pools), skipped, counted and named; a source without one readable image is an error
before training starts.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from distill.data.fashion_mnist import (FASHION_MNIST_CLASSES, PATH_PREFIX, fashion_mnist_selection,
                                        load_fashion_mnist)
from distill.data.images import IMAGE_EXTENSIONS, load_image
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)

DATASET_KINDS = ("fashion_mnist", "auto", "imagefolder", "folder", "filelist")
VERIFY_AUTO_LIMIT = 50_000  # verify every file up front below this many; above, skip bad files when met


@dataclass
class DatasetConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | auto | imagefolder | folder (flat, unlabelled) | filelist
    path: Optional[str] = None  # folder, or text file with one path per line (optionally followed by a label)
    split: str = "train"  # Fashion-MNIST split, or the sub-folder of `path` to use when it exists (train/val)
    limit: int = 0  # use only the first N images (0: all)
    verify: str = "auto"  # auto | yes | no: decode every file once before training to find unreadable ones

    def validate(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise InputError(f"data kind {self.kind!r} unknown: choose one of {', '.join(DATASET_KINDS)}")
        if self.kind != "fashion_mnist" and not self.path:
            raise InputError(f"data kind {self.kind!r} needs data.path (a folder or a file list)")
        if self.verify not in ("auto", "yes", "no"):
            raise InputError(f"data verify {self.verify!r}: choose auto, yes or no")


class ArrayImages:
    """uint8 images [N, C, H, W] in memory, with optional labels."""

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], classes: Sequence[str], name: str):
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.name = name
        self.unreadable: List[str] = []

    def __len__(self) -> int:
        return len(self.images)


class FileImages:
    """Image files with optional labels; `load` decodes one into a PIL image."""

    def __init__(self, paths: List[str], labels: Optional[List[int]], classes: Sequence[str], name: str):
        self.paths = paths
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        self.name = name
        self.unreadable: List[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, mode: str = "RGB", min_size: int = 0):
        return load_image(self.paths[index], mode=mode, min_size=min_size)

    def keep(self, indices: Sequence[int]) -> None:
        self.paths = [self.paths[i] for i in indices]
        if self.labels is not None:
            self.labels = self.labels[torch.as_tensor(list(indices), dtype=torch.long)]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(folder: Path) -> List[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if _is_image(Path(f)))
    return found


def _scan_imagefolder(folder: Path) -> Tuple[List[str], List[int], List[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in _walk_images(folder / name):
            paths.append(str(path))
            labels.append(label)
    return paths, labels, classes


def filelist_entries(listing) -> List[List[str]]:
    """The fields of each line of a file list (`path [label]`, space or comma separated; blank lines and
    # comments skipped)."""
    lines = (line.strip() for line in Path(listing).read_text().splitlines())
    return [line.replace(",", " ").split() for line in lines if line and not line.startswith("#")]


def _read_filelist(listing: Path) -> Tuple[List[str], Optional[List[int]], List[str]]:
    paths, raw_labels = [], []
    for parts in filelist_entries(listing):
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else listing.parent / parts[0]
        paths.append(str(path))
        raw_labels.append(parts[1] if len(parts) > 1 else None)
    labelled = [label is not None for label in raw_labels]
    if any(labelled) and not all(labelled):
        raise InputError(f"{listing}: some lines have a label and some do not; label every line or none")
    duplicates = len(paths) - len(set(paths))
    if duplicates:
        logger.warning("%s lists %d paths more than once; they are sampled as often as listed", listing, duplicates)
    if not any(labelled):
        return paths, None, []
    if all(label.lstrip("-").isdigit() for label in raw_labels):
        labels = [int(label) for label in raw_labels]
        return paths, labels, [str(i) for i in range(max(labels) + 1)]
    classes = sorted(set(raw_labels))
    return paths, [classes.index(label) for label in raw_labels], classes


def _resolve_folder(path: Path, split: str) -> Path:
    return path / split if split and (path / split).is_dir() else path


def _check_readable(source: FileImages, verify: str) -> None:
    """Decode every file once (in threads, with a progress bar) and drop the unreadable ones, naming them."""
    if verify == "no" or (verify == "auto" and len(source) > VERIFY_AUTO_LIMIT):
        return

    def readable(index: int) -> bool:
        try:
            source.load(index)
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        ok = list(progress(iterable=pool.map(readable, range(len(source))), total=len(source),
                           desc=f"checking {source.name}", unit="img", leave=False))
    bad = [i for i, good in enumerate(ok) if not good]
    if bad:
        source.unreadable = [source.paths[i] for i in bad]
        shown = ", ".join(source.unreadable[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        logger.warning("skipping %d unreadable image(s) of %d in %s: %s", len(bad), len(source), source.name, shown)
        source.keep([i for i, good in enumerate(ok) if good])


def build_image_source(config: DatasetConfig, split: Optional[str] = None):
    """The ArrayImages or FileImages described by `config` (split overrides config.split)."""
    split = split or config.split
    if config.kind == "fashion_mnist":
        images, labels = load_fashion_mnist("test" if split == "val" else split)  # it has no validation split
        source = ArrayImages(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST {split}")
        if config.limit:
            source.images, source.labels = source.images[: config.limit], source.labels[: config.limit]
        return source

    path = Path(config.path).expanduser()
    if not path.exists():
        raise InputError(f"data.path {path} does not exist")
    kind = config.kind
    if kind == "auto":
        if path.is_file():
            kind = "filelist"
        else:
            folder = _resolve_folder(path, split)
            has_subfolders = any(d.is_dir() and not d.name.startswith(".") for d in folder.iterdir())
            top_images = any(_is_image(p) for p in folder.iterdir() if p.is_file())
            kind = "imagefolder" if has_subfolders and not top_images else "folder"
    if kind == "filelist":
        if not path.is_file():
            raise InputError(f"data.path {path} is a folder, but data.kind is filelist (a text file of paths)")
        names = [fields[0] for fields in filelist_entries(path)]
        if names and names[0].startswith(PATH_PREFIX):  # a selection of Fashion-MNIST images (distill-curate)
            images, labels = fashion_mnist_selection(names[: config.limit or None])
            return ArrayImages(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST selection {path.name}")
        paths, labels, classes = _read_filelist(path)
    else:
        if not path.is_dir():
            raise InputError(f"data.path {path} is a file, but data.kind is {kind} (a folder)")
        folder = _resolve_folder(path, split)
        if kind == "imagefolder":
            paths, labels, classes = _scan_imagefolder(folder)
        else:
            paths, labels, classes = [str(p) for p in _walk_images(folder)], None, []
    if config.limit:
        paths, labels = paths[: config.limit], (labels[: config.limit] if labels is not None else None)
    source = FileImages(paths, labels, classes, str(path))
    if not paths:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
    _check_readable(source, config.verify)
    if not len(source):
        raise InputError(f"none of the {len(source.unreadable)} image files in {path} could be read")
    return source
