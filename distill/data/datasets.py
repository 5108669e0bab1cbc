"""Where images come from: an ImageFolder tree, a flat folder, a text file of paths, or Fashion-MNIST.

Two kinds of source, one interface: `FileImages` (decoded on demand, in loader workers) and `ArrayImages`
(already in memory as uint8, augmented a whole batch at a time). Unreadable files are found up front (or on
first use for very large pools), skipped, counted and named; a source without one readable image is an error
before training starts.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from distill.data.configs import DatasetConfig
from distill.data.fashion_mnist import (FASHION_MNIST_CLASSES, PATH_PREFIX, fashion_mnist_selection,
                                        load_fashion_mnist)
from distill.data.filelists import read_file_list, read_paths, readable_name
from distill.data.images import (IMAGE_EXTENSIONS, describe_error, load_image, load_image_at_crop_size,
                                  set_max_image_pixels)
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)

VERIFY_AUTO_LIMIT = 50_000  # verify every file up front below this many; above, skip bad files when met


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
    """Image files with optional labels; `load` decodes one into a PIL image. decode_at_crop_size: training
    views that draw their boxes before decoding (multi-crop) may have JPEG files decoded at the size the boxes
    need (`load_at_crop_size`)."""

    def __init__(self, paths: List[str], labels: Optional[List[int]], classes: Sequence[str], name: str,
                 decode_at_crop_size: bool = True):
        self.paths = paths
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        self.name = name
        self.unreadable: List[str] = []
        self.decode_at_crop_size = decode_at_crop_size

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, mode: str = "RGB", min_size: int = 0):
        return load_image(self.paths[index], mode=mode, min_size=min_size)

    def load_at_crop_size(self, index: int, mode: str, min_size: int, reduction):
        """(image, images.Frame): see images.load_image_at_crop_size."""
        return load_image_at_crop_size(self.paths[index], mode, min_size, reduction)

    def keep(self, indices: Sequence[int]) -> None:
        self.paths = [self.paths[i] for i in indices]
        if self.labels is not None:
            self.labels = self.labels[torch.as_tensor(list(indices), dtype=torch.long)]


def slice_source(source, start: int, end: int):
    """Images start..end-1 of a source, as a source of the same kind (sharing the arrays)."""
    import copy

    part = copy.copy(source)
    if isinstance(source, ArrayImages):
        part.images = source.images[start:end]
    else:
        part.paths = source.paths[start:end]
    part.labels = None if source.labels is None else source.labels[start:end]
    part.unreadable = []
    return part


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(folder: Path) -> List[Path]:
    """Image files under `folder`, recursively, in sorted order (a folder's files before its sub-folders'), hidden
    ones left out. Links are followed, but a folder is entered once however many links lead to it (so a link loop
    ends), and where links were met a file reached by several paths is listed once, at its first path."""
    found: List[Path] = []
    dangling: List[str] = []
    entered: set = set()
    linked = False
    stack = [Path(folder)]
    while stack:
        directory = stack.pop()
        try:
            status = os.stat(directory)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            logger.warning("cannot list %s (%s): left out", readable_name(str(directory)), error.strerror or error)
            continue
        if (status.st_dev, status.st_ino) in entered:
            continue
        entered.add((status.st_dev, status.st_ino))
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    subfolders.append(Path(entry.path))
                    linked |= entry.is_symlink()
                elif entry.is_file() and _is_image(Path(entry.name)):
                    found.append(Path(entry.path))
                    linked |= entry.is_symlink()
                elif entry.is_symlink() and _is_image(Path(entry.name)) and not os.path.exists(entry.path):
                    dangling.append(entry.path)
            except OSError:  # an unreadable link
                dangling.append(entry.path)
        stack.extend(reversed(subfolders))
    if dangling:
        logger.warning("%d link(s) under %s lead nowhere and were left out (first: %s): fix or remove them",
                       len(dangling), readable_name(str(folder)), readable_name(dangling[0]))
    return _first_of_each_file(found) if linked else found


def _first_of_each_file(paths: List[Path]) -> List[Path]:
    kept, seen = [], set()
    for path in paths:
        status = os.stat(path)
        key = (status.st_dev, status.st_ino)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if len(kept) < len(paths):
        logger.info("%d files reached through more than one path (links) are listed once", len(paths) - len(kept))
    return kept


def _scan_imagefolder(folder: Path) -> Tuple[List[str], List[int], List[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in _walk_images(folder / name):
            paths.append(str(path))
            labels.append(label)
    return paths, labels, classes


def _read_filelist(listing: Path) -> Tuple[List[str], Optional[List[int]], List[str]]:
    paths, raw_labels = [], []
    for name, label in read_file_list(listing):
        path = Path(name) if Path(name).is_absolute() else listing.parent / name
        paths.append(str(path))
        raw_labels.append(label)
    labelled = [label is not None for label in raw_labels]
    if any(labelled) and not all(labelled):
        raise InputError(f"{listing}: some lines have a label and some do not; label every line or none (a path "
                         "with spaces or commas in a list written by hand: separate its label with a tab)")
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
    """Decode every file once (in threads, with a progress bar) and drop the unreadable ones, naming them and why."""
    if verify == "no" or (verify == "auto" and len(source) > VERIFY_AUTO_LIMIT):
        return

    def problem(index: int) -> Optional[str]:
        try:
            source.load(index)
            return None
        except Exception as error:
            return describe_error(error)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        problems = list(progress(iterable=pool.map(problem, range(len(source))), total=len(source),
                                 desc=f"checking {source.name}", unit="img", leave=False))
    bad = [i for i, reason in enumerate(problems) if reason is not None]
    if bad:
        source.unreadable = [source.paths[i] for i in bad]
        shown = "; ".join(f"{readable_name(source.paths[i])} ({problems[i]})" for i in bad[:10])
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        logger.warning("skipping %d unreadable image(s) of %d in %s: %s%s", len(bad), len(source), source.name, shown,
                       more)
        source.keep([i for i, reason in enumerate(problems) if reason is None])


def build_image_source(config: DatasetConfig, split: Optional[str] = None, key: str = "data.dataset",
                       option: Optional[str] = None):
    """The ArrayImages or FileImages described by `config` (split overrides config.split); key names the config
    section in messages, option the path (default: {key}.path)."""
    split = split or config.split
    set_max_image_pixels(config.max_image_pixels)
    if config.kind == "fashion_mnist":
        images, labels = load_fashion_mnist("test" if split == "val" else split)  # it has no validation split
        source = ArrayImages(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST {split}")
        if config.limit:
            source.images, source.labels = source.images[: config.limit], source.labels[: config.limit]
        return source

    path = config.check_path(key, option)
    kind = config.kind
    if path.is_file() and kind in ("auto", "filelist"):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in (".npy", ".npz", ".pt", ".pth"):
            what = "one image" if suffix in IMAGE_EXTENSIONS else "a file of arrays"
            raise InputError(f"{option or key + '.path'} {path} is {what}, not a list of images: give a folder of "
                             "images, or a text file naming one image a line")
    if kind == "auto":
        if path.is_file():
            kind = "filelist"
        else:
            folder = _resolve_folder(path, split)
            has_subfolders = any(d.is_dir() and not d.name.startswith(".") for d in folder.iterdir())
            top_images = any(_is_image(p) for p in folder.iterdir() if p.is_file())
            kind = "imagefolder" if has_subfolders and not top_images else "folder"
    if kind == "filelist":
        names = read_paths(path)
        if names and names[0].startswith(PATH_PREFIX):  # a selection of Fashion-MNIST images (distill-curate)
            images, labels = fashion_mnist_selection(names[: config.limit or None])
            return ArrayImages(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST selection {path.name}")
        paths, labels, classes = _read_filelist(path)
    else:
        folder = _resolve_folder(path, split)
        if kind == "imagefolder":
            paths, labels, classes = _scan_imagefolder(folder)
            if not classes:
                raise InputError(f"{folder} has no class sub-folders, but {key}.kind is imagefolder (root/class/"
                                 f"image.jpg, labelled by folder): set {key}.kind=folder for unlabelled images, or auto")
        else:
            paths, labels, classes = [str(p) for p in _walk_images(folder)], None, []
    if config.limit:
        paths, labels = paths[: config.limit], (labels[: config.limit] if labels is not None else None)
    source = FileImages(paths, labels, classes, str(path), config.decode_at_crop_size)
    if not paths:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
    _check_readable(source, config.verify)
    if not len(source):
        raise InputError(f"none of the {len(source.unreadable)} image files in {path} could be read")
    return source
