#!/usr/bin/env python
"""Balancing and retrieval on Fashion-MNIST with the embeddings of a backbone trained by this project, through
`distill-curate` itself.

Balancing: a long-tailed subset of the training set (class sizes falling geometrically, the largest 100x the
smallest), sampled to 20% by hierarchical k-means + balanced sampling and by a 20% random sample; the
class-count entropy (in bits; log2 10 = 3.32 is perfectly even) and the largest/smallest class ratio of each.
Retrieval: a seed set of 10 test images per class, its 4 nearest training images each; the share with the
seed's label (and the same with raw pixels, for scale).

    .venv/bin/python tools/curation_study.py --checkpoint runs/dinov2_fashion_mnist_rerun/checkpoint.pth
"""

import argparse
import logging
from pathlib import Path

import numpy as np

from data_curation.cli import main as curate
from data_curation.embeddings import EmbeddingStore
from distill.data.filelists import read_paths
from data_curation.retrieval import retrieve
from data_curation.sampling import balanced_sample
from distill.data.fashion_mnist import fashion_mnist_path, load_fashion_mnist


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def long_tail(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Rows of a subset whose class sizes fall geometrically from all of one class to 1/ratio of it."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(10)  # which class is the head changes with the seed
    largest = int(np.bincount(labels).min())
    rows = []
    for rank, c in enumerate(classes):
        size = int(round(largest * ratio ** (-rank / 9)))
        rows.append(rng.choice(np.flatnonzero(labels == c), size=size, replace=False))
    return np.sort(np.concatenate(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/dinov2_fashion_mnist_rerun/checkpoint.pth")
    parser.add_argument("--output", default="runs/curation_study")
    parser.add_argument("--levels", type=int, nargs="+", default=[50, 10])
    parser.add_argument("--resampling-steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--share", type=float, default=0.2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    out = Path(args.output)
    for split in ("train", "test"):
        if not EmbeddingStore(out / f"emb_{split}").manifest()["complete"]:
            assert curate(["embed", "--data", "fashion_mnist", "--split", split, "--checkpoint", args.checkpoint,
                           "--output", str(out / f"emb_{split}")]) == 0
    _, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    train_images, _ = load_fashion_mnist("train")

    print("\nBalancing: long-tailed Fashion-MNIST train subset (largest class 100x the smallest), 20% samples")
    print("(oracle: the same sampler with the true classes as its clusters, the most balance it can reach)")
    print(f"{'seed':>4} {'subset':>7} | {'entropy (bits)':>41} | {'largest/smallest class':>41}")
    head = f"{'subset':>9} {'random':>9} {'curated':>9} {'oracle':>9}"
    print(f"{'':>4} {'':>7} | {head} | {head}")
    rows_out = []
    for seed in args.seeds:
        subset = long_tail(train_labels, 100.0, seed)
        keep = out / f"longtail_{seed}.txt"
        keep.write_text("".join(f"{fashion_mnist_path('train', i)}\n" for i in subset))
        target = int(round(args.share * len(subset)))
        clusters = out / f"clusters_{seed}"
        assert curate(["cluster", "--embeddings", str(out / "emb_train"), "--keep", str(keep), "--levels",
                       *map(str, args.levels), "--resampling-steps", str(args.resampling_steps), "--seed", str(seed),
                       "--output", str(clusters)]) == 0
        curated_list = out / f"curated_{seed}.txt"
        assert curate(["sample", "--clusters", str(clusters), "--target", str(target), "--seed", str(seed),
                       "--output", str(curated_list)]) == 0
        curated = np.array([int(p.rsplit("/", 1)[1]) for p in read_paths(curated_list)])
        random = np.random.default_rng(seed).choice(subset, size=target, replace=False)
        oracle = subset[balanced_sample([train_labels[subset]], target, seed)]
        counts = [np.bincount(train_labels[r], minlength=10) for r in (subset, random, curated, oracle)]
        ratio = lambda c: c.max() / max(c.min(), 1)  # noqa: E731
        rows_out.append([entropy_bits(c) for c in counts] + [ratio(c) for c in counts])
        print(f"{seed:>4} {len(subset):>7} | " + " ".join(f"{v:9.3f}" for v in rows_out[-1][:4]) + " | "
              + " ".join(f"{v:9.1f}" for v in rows_out[-1][4:]) + f"   curated counts {counts[2].tolist()}")
    mean = np.mean(rows_out, axis=0)
    print(f"{'mean':>4} {'':>7} | " + " ".join(f"{v:9.3f}" for v in mean[:4]) + " | "
          + " ".join(f"{v:9.1f}" for v in mean[4:]))

    rng = np.random.default_rng(0)
    seeds = np.concatenate([rng.choice(np.flatnonzero(test_labels == c), 10, replace=False) for c in range(10)])
    test_store, train_store = EmbeddingStore(out / "emb_test"), EmbeddingStore(out / "emb_train")
    ids, _ = retrieve(test_store.load()[seeds], train_store.load(), 4)
    agreement = (train_labels[ids] == test_labels[seeds][:, None]).mean()
    pixels = lambda a: a.reshape(len(a), -1).astype(np.float32) - train_images.reshape(len(train_images), -1).mean(0)  # noqa: E731
    pixel_ids, _ = retrieve(pixels(test_images[seeds]), pixels(train_images), 4)
    pixel_agreement = (train_labels[pixel_ids] == test_labels[seeds][:, None]).mean()
    print("\nRetrieval: 100 seed test images (10 per class), 4 nearest of the 60,000 training images each")
    print(f"label agreement with the seed: backbone {agreement:.3f}, raw pixels {pixel_agreement:.3f}")
    per_class = (train_labels[ids] == test_labels[seeds][:, None]).reshape(10, 40).mean(1)
    print("per class (backbone): " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per_class)))


if __name__ == "__main__":
    main()
