#!/usr/bin/env python
"""Deduplication quality on Fashion-MNIST: the 10,000 test images plus 1,000 injected near-copies (crop,
resize, flip, JPEG), embedded by a backbone trained by this project; precision and recall of the copy pairs
found by `distill-curate dedup`'s graph at several thresholds, next to raw pixels.

    .venv/bin/python tools/curation_dedup_study.py --checkpoint runs/dinov2_fashion_mnist/checkpoint.pth

A predicted pair is two images in one connected component; recall counts the (original, copy) pairs so
found, precision the share of predicted pairs that are such pairs (natural near-twins of the dataset count
against it).
"""

import argparse
import io
from itertools import combinations

import numpy as np
import torch
from PIL import Image

from data_curation.dedup import connected_components, similar_pairs
from distill.data.fashion_mnist import load_fashion_mnist


def near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pil = Image.fromarray(image)
    size = image.shape[0]
    scale = rng.uniform(0.8, 1.0)
    side = int(round(size * np.sqrt(scale)))
    top, left = rng.integers(0, size - side + 1, size=2)
    pil = pil.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:  # down and up again
        small = int(size * rng.uniform(0.6, 0.9))
        pil = pil.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(rng.integers(50, 91)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def scores(vectors: np.ndarray, truth: set, threshold: float):
    pairs = similar_pairs(vectors, threshold, k=16)
    components = connected_components(len(vectors), pairs)
    groups = {}
    for i, c in enumerate(components):
        groups.setdefault(int(c), []).append(i)
    predicted = {pair for g in groups.values() if len(g) > 1 for pair in combinations(sorted(g), 2)}
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    return precision, hits / len(truth), len(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/dinov2_fashion_mnist/checkpoint.pth")
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99])
    args = parser.parse_args()
    images, _ = load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    sources = rng.choice(len(images), size=args.copies, replace=False)
    copies = np.stack([near_copy(images[i], rng) for i in sources])
    pool = np.concatenate([images, copies])
    truth = {(int(s), len(images) + j) for j, s in enumerate(sources)}

    from distill.data.eval_views import EvalView
    from distill.eval.features import extract_features
    from distill.eval.loading import load_backbone

    model, setup = load_backbone(args.checkpoint, fashion_mnist=True)
    view = EvalView(setup.image_size, setup.mean, setup.std, 1)
    features = extract_features(model, pool[:, None], lambda b: view.array_batch(b)[0], desc="embed").numpy()
    pixels = pool.reshape(len(pool), -1).astype(np.float32) / 255.0
    pixels = pixels - pixels.mean(axis=0)
    print(f"{len(images)} test images + {args.copies} near-copies; features of {args.checkpoint}")
    print("threshold | backbone: precision  recall  pairs | raw pixels (centred): precision  recall  pairs")
    for t in args.thresholds:
        p, r, n = scores(features, truth, t)
        pp, pr, pn = scores(pixels, truth, t)
        print(f"{t:9.2f} | {p:19.3f} {r:7.3f} {n:6d} | {pp:31.3f} {pr:7.3f} {pn:6d}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
