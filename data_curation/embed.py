"""Images -> L2-normalised float16 embedding shards, resumable: shards already on disk are not recomputed."""

import copy
import logging
from typing import Optional

import numpy as np
import torch

from data_curation.embeddings import EmbeddingStore, from_npy
from distill.data.datasets import ArrayImages, DatasetConfig, build_image_source
from distill.data.eval_views import EvalView
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


def _paths(source, start: int, end: int, data: str, split: Optional[str]):
    if isinstance(source, ArrayImages):
        return [f"{data}/{split or 'train'}/{i}" for i in range(start, end)]
    return list(source.paths[start:end])


def embed_images(data: str, output: str, checkpoint: Optional[str] = None, backbone: Optional[str] = None,
                 split: Optional[str] = None, shard_size: int = 50_000, batch_size: int = 256, device: str = "cpu",
                 npy: Optional[str] = None, limit: int = 0) -> int:
    """Write the embeddings of every readable image of `data` to `output`; returns the number of rows there."""
    store = EmbeddingStore(output)
    if npy:
        vectors, paths = from_npy(npy, None if data in (None, "", "fashion_mnist") else
                                  [line.split()[0] for line in open(data).read().splitlines() if line.strip()])
        done = len(store)
        for start in range(done, len(vectors), shard_size):
            chunk = vectors[start : start + shard_size].astype(np.float32)
            store.append(chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12),
                         paths[start : start + shard_size])
        store.finish()
        return len(store)
    if shard_size < 1:
        raise InputError("--shard-size must be positive")
    from distill.eval.features import extract_source_features
    from distill.eval.loading import load_backbone
    from distill.models import create_backbone

    source = _source(data, split, limit)
    if source.unreadable:
        logger.warning("left out %d unreadable images (e.g. %s)", len(source.unreadable), source.unreadable[0])
    fashion = data == "fashion_mnist"
    if checkpoint:
        model, setup = load_backbone(checkpoint, backbone, fashion_mnist=fashion)
        view = EvalView(setup.image_size, setup.mean, setup.std, model.config["in_chans"])
    elif backbone:
        model = create_backbone(backbone, in_chans=1 if fashion else 3, img_size=28 if fashion else 224).eval()
        view = EvalView(model.config["img_size"][0], [0.286] if fashion else [0.485, 0.456, 0.406],
                        [0.353] if fashion else [0.229, 0.224, 0.225], model.config["in_chans"])
    else:
        raise InputError("give --checkpoint (any file distill loads) or --backbone (random weights, for tests)")
    model = model.to(device)
    done = len(store)
    if done % shard_size and done != len(source):
        raise InputError(f"{output} holds {done} rows, not a whole number of {shard_size}-image shards: embed with "
                         "the --shard-size it was started with, or into a new folder")
    if done:
        logger.info("resuming: %d of %d images already embedded in %s", done, len(source), output)
    with progress(total=len(source), initial=done, desc="embed", unit="img") as bar:
        for start in range(done, len(source), shard_size):
            end = min(start + shard_size, len(source))
            features, _ = extract_source_features(model, _subset(source, start, end), view, batch_size, "auto",
                                                  device, 0, desc="shard")
            features = torch.nn.functional.normalize(features.float(), dim=1).numpy()
            store.append(features, _paths(source, start, end, data, split))
            bar.update(end - start)
    store.finish()
    return len(store)
