"""Images -> L2-normalised float16 embedding shards, resumable: shards already on disk are not recomputed.

A store records what made it (the model file's sha256 or the random weights' seed, the backbone, the data and
its image count, the view and precision; for --npy the file's sha256); a resume with other settings is refused,
and --overwrite starts the store again."""

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from data_curation.embeddings import (UNREADABLE, EmbeddingStore, file_digest, from_npy, read_listing,
                                      record_difference)
from distill.data.configs import DatasetConfig
from distill.data.datasets import ArrayImages, build_image_source, slice_source
from distill.data.filelists import read_paths, readable_name, write_file_list
from distill.data.configs import default_normalisation
from distill.data.eval_views import EvalView
from distill.data.fashion_mnist import fashion_mnist_path, parse_fashion_mnist_path
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)
RANDOM_WEIGHTS_SEED = 0  # --backbone without a checkpoint: the same random network on every run (and resume)


def _source(data: str, split: Optional[str], limit: int):
    if data == "fashion_mnist":
        config = DatasetConfig(kind="fashion_mnist", split=split or "train", limit=limit)
    else:
        config = DatasetConfig(kind="auto", path=data, split=split or "train", limit=limit)
    config.validate()
    return build_image_source(config)


def _absolute(path: str, folder: Optional[str] = None) -> str:
    """A path as the store keeps it: absolute (relative ones taken from `folder`, else the working folder), so that
    a selection written anywhere names the same file; not normalised (`..` after a link means what the system
    says). Fashion-MNIST names stay as they are."""
    if os.path.isabs(path) or parse_fashion_mnist_path(path):
        return path
    return os.path.join(os.path.abspath(folder) if folder is not None else os.getcwd(), path)


def _data_id(data: Optional[str]) -> Optional[str]:
    """The data a store was made of, in its record: the file or folder itself (`imgs/`, `./imgs` and a link to it
    are the same data)."""
    return data if data in (None, "", "fashion_mnist") else os.path.realpath(os.path.expanduser(data))


def _names(source, data: str, split: Optional[str]) -> List[str]:
    """The path each image goes by in the store (and in every selection written from it)."""
    if not isinstance(source, ArrayImages):
        return [_absolute(p) for p in source.paths]
    if data == "fashion_mnist":
        return [fashion_mnist_path(split or "train", i) for i in range(len(source.images))]
    return read_paths(data)[: len(source.images)]


def _list_names(listing: str) -> List[str]:
    """The names of a file list's entries, relative ones taken from the list's folder (as the trainer reads it)."""
    folder = os.path.dirname(os.path.expanduser(listing)) or "."
    return [_absolute(name, folder) for name in read_paths(os.path.expanduser(listing))]


def _embed_shard(model, source, view, batch_size: int, device: str, flip_average: bool, precision: str = "auto",
                 workers: int = 0):
    """(L2-normalised features [n, D], positions of images that could not be read: their rows are zero)."""
    from distill.eval.features import extract_source_features

    normalize = torch.nn.functional.normalize

    def encode(images: torch.Tensor) -> torch.Tensor:
        out = normalize(model(images).float(), dim=1)
        if flip_average:  # invariant to mirroring: copies are often flipped
            out = normalize(out + normalize(model(images.flip(-1)).float(), dim=1), dim=1)
        return out

    try:
        features, _, used = extract_source_features(encode, source, view, batch_size, precision, device, workers,
                                                    desc="shard", with_indices=True)
    except InputError:  # not one readable image in the shard
        return np.zeros((len(source), model.embed_dim), np.float32), list(range(len(source)))
    rows = np.zeros((len(source), features.shape[1]), np.float32)
    rows[used.numpy()] = features.numpy()
    unreadable = sorted(set(range(len(source))) - set(used.tolist()))
    return rows, unreadable


def _check_siblings(root: Path, record: Dict[str, Any], part: int) -> None:
    """The other parts of a job array already written into `root` must have been made the same way."""
    if (root / "manifest.json").is_file():
        raise InputError(f"{readable_name(str(root))} holds a store of its own: write the parts of a job array to "
                         "another folder, or pass --overwrite to start it again")
    for sibling in EmbeddingStore(root).parts():
        if sibling.folder.name == f"part_{part:04d}":
            continue
        difference = record_difference(sibling.source, record, ignore=("part",))
        if difference:
            raise InputError(f"{readable_name(str(sibling.folder))} of the same job array was made with {difference}: "
                             "run every part with the same settings, or pass --overwrite (to every part) to start "
                             "them again")


def _part_bounds(total: int, part: int, parts: int):
    return part * total // parts, (part + 1) * total // parts


def _begin(store: EmbeddingStore, record: Dict[str, Any], names: Sequence[str], overwrite: bool, part: int,
           parts: int, extend: Sequence[str] = ()) -> int:
    if parts > 1 and not overwrite:
        _check_siblings(store.folder.parent, record, part)
    return store.begin(record, overwrite=overwrite, extend=extend, names=names)


def embed_images(data: str, output: str, checkpoint: Optional[str] = None, backbone: Optional[str] = None,
                 split: Optional[str] = None, shard_size: int = 50_000, batch_size: int = 256, device: str = "cpu",
                 npy: Optional[str] = None, limit: int = 0, flip_average: bool = False, part: int = 0,
                 parts: int = 1, precision: str = "auto", workers: int = 0, overwrite: bool = False) -> int:
    """Write the embeddings of every readable image of `data` to `output`; returns the number of rows there.

    With parts > 1, only the part-th of `parts` contiguous slices of the images, into output/part_NNNN (one
    task of a job array); the steps after read the folder of parts as one store. A store started with other
    settings is refused; overwrite removes it (its own files only) and starts again."""
    if shard_size < 1:
        raise InputError("--shard-size must be positive")
    if parts > 1:
        if not 0 <= part < parts:
            raise InputError(f"--part {part} is not one of the {parts} parts (0 to {parts - 1})")
        output = str(Path(output) / f"part_{part:04d}")
    store = EmbeddingStore(output)
    if npy:
        names = None if data in (None, "", "fashion_mnist") else _list_names(data)
        vectors, paths = from_npy(npy, names)
        if len(vectors) == 0:
            raise InputError(f"{readable_name(npy)} holds no embeddings (shape {vectors.shape})")
        if not overwrite and len(store) and store.dim != vectors.shape[1]:
            raise InputError(f"{readable_name(npy)} has dimension {vectors.shape[1]} but {readable_name(output)} holds "
                             f"embeddings of dimension {store.dim}: write them to another folder")
        record = {"kind": "npy", "npy": file_digest(npy), "npy_path": _absolute(npy), "rows": int(len(vectors)),
                  "data": _data_id(data), "parts": parts, "part": part}
        first, last = _part_bounds(len(vectors), part, parts)
        vectors, paths = vectors[first:last], paths[first:last]
        done = _begin(store, record, paths, overwrite, part, parts)
        if done % shard_size and done != len(vectors):
            raise InputError(f"{readable_name(output)} holds {done} rows, not a whole number of {shard_size}-row "
                             "shards: embed with the --shard-size it was started with, or into a new folder")
        for start in range(done, len(vectors), shard_size):
            chunk = np.asarray(vectors[start : start + shard_size], dtype=np.float32)
            store.append(chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12),
                         paths[start : start + shard_size])
        store.finish()
        return len(store)
    from distill.eval.loading import load_backbone
    from distill.models import create_backbone
    from distill.precision import resolve_precision

    if not checkpoint and not backbone:
        raise InputError("give --checkpoint (any file distill loads) or --backbone (random weights, for tests)")
    resolved = resolve_precision(precision, torch.device(device))
    source = _source(data, split, limit)
    if source.unreadable:
        logger.warning("left out %d unreadable images (e.g. %s)", len(source.unreadable),
                       readable_name(source.unreadable[0]))
    fashion = data == "fashion_mnist" or isinstance(source, ArrayImages)  # also a selection of it
    if checkpoint:
        model, setup = load_backbone(checkpoint, backbone, fashion_mnist=fashion)
        view = EvalView(setup.image_size, setup.mean, setup.std, model.config["in_chans"])
        weights = {"checkpoint": _absolute(checkpoint), "sha256": file_digest(checkpoint),
                   "size": os.path.getsize(checkpoint)}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = create_backbone(backbone, in_chans=1 if fashion else 3, img_size=28 if fashion else 224).eval()
        mean, std = default_normalisation(fashion)
        view = EvalView(model.config["img_size"][0], mean, std, model.config["in_chans"])
        weights = {"weights": "random", "seed": RANDOM_WEIGHTS_SEED}
    model = model.to(device)
    names = _names(source, data, split)
    record = {"kind": "images", "data": _data_id(data), "split": split or "train", "images": len(source),
              "limit": limit, "parts": parts, "part": part, "model": weights,
              "backbone": getattr(model, "registry_name", backbone), "view": {**view.describe(),
                                                                             "channels": view.channels},
              "flip_average": bool(flip_average), "precision": resolved}
    unreadable_names = [_absolute(p) for p in source.unreadable]
    if parts > 1:
        first, last = _part_bounds(len(source), part, parts)
        source, names = slice_source(source, first, last), names[first:last]
        if part:
            unreadable_names = []  # listed once, by the first part
    previous = None if overwrite else store.manifest().get("source")
    # a larger (or no) --limit continues the same images: the count may grow, the names already there must stay
    extend = ("limit", "images") if parts == 1 and previous and previous.get("limit") != limit else ()
    done = _begin(store, record, names, overwrite, part, parts, extend)
    if done % shard_size and done != len(source):
        raise InputError(f"{readable_name(output)} holds {done} rows, not a whole number of {shard_size}-image shards: "
                         "embed with the --shard-size it was started with, or into a new folder")
    if done:
        logger.info("resuming: %d of %d images already embedded in %s", done, len(source), readable_name(output))
    unreadable = list(unreadable_names)
    with progress(total=len(source), initial=done, desc="embed", unit="img") as bar:
        for start in range(done, len(source), shard_size):
            end = min(start + shard_size, len(source))
            features, bad = _embed_shard(model, slice_source(source, start, end), view, batch_size, device, flip_average,
                                         resolved, workers)
            store.append(features, names[start:end])
            unreadable += [names[start + i] for i in bad]
            bar.update(end - start)
    if unreadable:
        listing = store.folder / UNREADABLE
        before = read_listing(listing) if listing.is_file() else []
        write_file_list(listing, list(dict.fromkeys(before + unreadable)))
        logger.warning("%d images could not be read (listed in %s; their rows, if any, are zero and left out by "
                       "the next steps)", len(unreadable), readable_name(str(listing)))
    store.finish()
    return len(store)
