"""Images -> L2-normalised float16 embedding shards, resumable: shards already on disk are not recomputed."""

import copy
import logging
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from data_curation.embeddings import EmbeddingStore, from_npy
from distill.data.datasets import ArrayImages, DatasetConfig, build_image_source, filelist_entries
from distill.data.eval_views import EvalView, default_normalisation
from distill.data.fashion_mnist import fashion_mnist_path
from distill.errors import InputError
from distill.progress import progress

logger = logging.getLogger(__name__)


def _source(data: str, split: Optional[str], limit: int):
    if data == "fashion_mnist":
        config = DatasetConfig(kind="fashion_mnist", split=split or "train", limit=limit)
    else:
        config = DatasetConfig(kind="auto", path=data, split=split or "train", limit=limit)
    config.validate()
    return build_image_source(config)


def _subset(source, start: int, end: int):
    part = copy.copy(source)
    if isinstance(source, ArrayImages):
        part.images = source.images[start:end]
        part.labels = None if source.labels is None else source.labels[start:end]
    else:
        part.paths = source.paths[start:end]
        part.labels = None if source.labels is None else source.labels[start:end]
    return part


def _names(source, data: str, split: Optional[str]) -> List[str]:
    """The path each image goes by in the store (and in every selection written from it)."""
    if not isinstance(source, ArrayImages):
        return list(source.paths)
    if data == "fashion_mnist":
        return [fashion_mnist_path(split or "train", i) for i in range(len(source.images))]
    return [fields[0] for fields in filelist_entries(data)][: len(source.images)]


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

    features, _, used = extract_source_features(encode, source, view, batch_size, precision, device, workers,
                                                desc="shard", with_indices=True)
    unreadable = torch.arange(len(used))[used != torch.arange(len(used))]  # replaced by the loader
    features = features.numpy().copy()
    features[unreadable.numpy()] = 0
    return features, unreadable.tolist()


def embed_images(data: str, output: str, checkpoint: Optional[str] = None, backbone: Optional[str] = None,
                 split: Optional[str] = None, shard_size: int = 50_000, batch_size: int = 256, device: str = "cpu",
                 npy: Optional[str] = None, limit: int = 0, flip_average: bool = False, part: int = 0,
                 parts: int = 1, precision: str = "auto", workers: int = 0) -> int:
    """Write the embeddings of every readable image of `data` to `output`; returns the number of rows there.

    With parts > 1, only the part-th of `parts` contiguous slices of the images, into output/part_NNNN (one
    task of a job array); the steps after read the folder of parts as one store."""
    if parts > 1:
        if not 0 <= part < parts:
            raise InputError(f"--part {part} is not one of the {parts} parts (0 to {parts - 1})")
        output = str(Path(output) / f"part_{part:04d}")
    store = EmbeddingStore(output)
    if npy:
        vectors, paths = from_npy(npy, None if data in (None, "", "fashion_mnist") else
                                  [fields[0] for fields in filelist_entries(data)])
        if len(vectors) == 0:
            raise InputError(f"{npy} holds no embeddings (shape {vectors.shape})")
        if len(store) and store.dim != vectors.shape[1]:
            raise InputError(f"{npy} has dimension {vectors.shape[1]} but {output} holds embeddings of dimension "
                             f"{store.dim}: write them to another folder")
        done = len(store)
        for start in range(done, len(vectors), shard_size):
            chunk = vectors[start : start + shard_size].astype(np.float32)
            store.append(chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12),
                         paths[start : start + shard_size])
        store.finish()
        return len(store)
    if shard_size < 1:
        raise InputError("--shard-size must be positive")
    from distill.eval.loading import load_backbone
    from distill.models import create_backbone

    source = _source(data, split, limit)
    if source.unreadable:
        logger.warning("left out %d unreadable images (e.g. %s)", len(source.unreadable), source.unreadable[0])
    fashion = data == "fashion_mnist" or isinstance(source, ArrayImages)  # also a selection of it
    if checkpoint:
        model, setup = load_backbone(checkpoint, backbone, fashion_mnist=fashion)
        view = EvalView(setup.image_size, setup.mean, setup.std, model.config["in_chans"])
    elif backbone:
        model = create_backbone(backbone, in_chans=1 if fashion else 3, img_size=28 if fashion else 224).eval()
        mean, std = default_normalisation(fashion)
        view = EvalView(model.config["img_size"][0], mean, std, model.config["in_chans"])
    else:
        raise InputError("give --checkpoint (any file distill loads) or --backbone (random weights, for tests)")
    model = model.to(device)
    names = _names(source, data, split)
    if parts > 1:
        first, last = part * len(source) // parts, (part + 1) * len(source) // parts
        unreadable_all = source.unreadable
        source, names = _subset(source, first, last), names[first:last]
        source.unreadable = unreadable_all if part == 0 else []  # listed once, by the first part
    done = len(store)
    if done % shard_size and done != len(source):
        raise InputError(f"{output} holds {done} rows, not a whole number of {shard_size}-image shards: embed with "
                         "the --shard-size it was started with, or into a new folder")
    if done:
        logger.info("resuming: %d of %d images already embedded in %s", done, len(source), output)
    unreadable = list(source.unreadable)
    with progress(total=len(source), initial=done, desc="embed", unit="img") as bar:
        for start in range(done, len(source), shard_size):
            end = min(start + shard_size, len(source))
            features, bad = _embed_shard(model, _subset(source, start, end), view, batch_size, device, flip_average,
                                         precision, workers)
            store.append(features, names[start:end])
            unreadable += [names[start + i] for i in bad]
            bar.update(end - start)
    if unreadable:
        listing = store.folder / "unreadable.txt"
        before = listing.read_text().splitlines() if listing.is_file() else []
        listing.write_text("".join(f"{p}\n" for p in dict.fromkeys(before + unreadable)))
        logger.warning("%d images could not be read (listed in %s; their rows, if any, are zero and left out by "
                       "the next steps)", len(unreadable), store.folder / "unreadable.txt")
    store.finish()
    return len(store)
