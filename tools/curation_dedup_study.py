#!/usr/bin/env python
"""Deduplication quality on Fashion-MNIST: the 10,000 test images plus 1,000 injected near-copies (crop,
resize, flip, JPEG), embedded by a backbone trained by this project; precision and recall of the copy pairs
found by `distill-curate dedup`'s graph at several thresholds, next to raw pixels.

    .venv/bin/python tools/curation_dedup_study.py          # after `make demo`: its checkpoint

Two strengths of change: "strong" as first specified (a 60% resize of a 28-pixel image keeps 17 pixels a side,
JPEG down to quality 50) and "mild" (the same changes scaled to 28-pixel images). Features: the class token,
the class token averaged with the mirrored image's (`distill-curate embed --flip-average`), DINO's
copy-detection descriptor (`distill-curate embed --descriptor copy`: the class token with the GeM-pooled patch
tokens, PCA-whitened with a whitening learned on --whiten-images training images, never the test images), the
same flip-averaged, and raw pixels.

A predicted pair is two images in one connected component; recall counts the (original, copy) pairs so
found, precision the share of predicted pairs that are such pairs (natural near-twins of the dataset count
against it).
"""

import argparse
import io
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_curation.dedup import connected_components, similar_pairs
from data_curation.pictures import duplicate_grid
from distill.data.fashion_mnist import fashion_mnist_path, load_fashion_mnist


PRESETS = {
    # the injected copies of the study as first specified: at 28 px a 60% resize keeps 17 pixels a side
    "strong": dict(area=0.8, shrink=0.6, quality=50),
    # the same kinds of change, scaled to 28-pixel images
    "mild": dict(area=0.9, shrink=0.8, quality=75),
}


def near_copy(image: np.ndarray, rng: np.random.Generator, area: float, shrink: float, quality: int) -> np.ndarray:
    """A crop keeping `area` or more of the image, resized back; a flip half the time; half the time a resize
    down to `shrink` or more and up again; JPEG at `quality` to 95."""
    pil = Image.fromarray(image)
    size = image.shape[0]
    side = int(round(size * np.sqrt(rng.uniform(area, 1.0))))
    top, left = rng.integers(0, size - side + 1, size=2)
    pil = pil.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:  # down and up again
        small = int(round(size * rng.uniform(shrink, 1.0)))
        pil = pil.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(rng.integers(quality, 96)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def groups_of(vectors: np.ndarray, threshold: float):
    components = connected_components(len(vectors), similar_pairs(vectors, threshold, k=16))
    groups = {}
    for i, c in enumerate(components):
        groups.setdefault(int(c), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def scores(vectors: np.ndarray, truth: set, threshold: float):
    predicted = {pair for g in groups_of(vectors, threshold) for pair in combinations(sorted(g), 2)}
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    return precision, hits / len(truth), len(predicted)


def nearest_is_original(vectors: np.ndarray, sources: np.ndarray) -> float:
    """Share of copies whose nearest other image is their original (what any threshold can hope to find)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    _, ids = index.search(np.ascontiguousarray(vectors[-len(sources):]), 2)
    return float((ids[:, 1] == sources).mean())


def micro_ap(vectors: np.ndarray, truth: set) -> float:
    """µAP of the (original, copy) pairs over the kNN graph's edges (16 neighbours, no threshold) ranked by
    similarity: a figure of the ranking that no threshold choice changes."""
    from distill.eval.retrieval import micro_average_precision

    pairs, similarity = similar_pairs(vectors, -1.0, k=16, with_scores=True)
    correct = np.fromiter(((int(a), int(b)) in truth for a, b in pairs), dtype=bool, count=len(pairs))
    return micro_average_precision(similarity, correct, len(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/dinov2_fashion_mnist/checkpoint.pth")
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99, 0.995])
    parser.add_argument("--copy-thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
                        help="thresholds for the whitened copy descriptors, whose similarities run lower")
    parser.add_argument("--gem-p", type=float, default=4.0, help="the copy descriptor's GeM exponent")
    parser.add_argument("--whiten-images", type=int, default=20_000,
                        help="training images the copy descriptor's whitening is learned on")
    parser.add_argument("--output", default="runs/dedup_study")
    args = parser.parse_args()
    images, _ = load_fashion_mnist("test")

    from distill.data.eval_views import EvalView
    from distill.eval.descriptors import apply_whitening, copy_descriptor, learn_whitening
    from distill.eval.features import extract_features
    from distill.eval.loading import load_backbone

    model, setup = load_backbone(args.checkpoint, fashion_mnist=True)
    view = EvalView(setup.image_size, setup.mean, setup.std, 1)
    normed = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    preprocess = lambda b: view.array_batch(b)[0]  # noqa: E731
    described = lambda a: extract_features(  # noqa: E731
        lambda x: copy_descriptor(model, x, args.gem_p), np.ascontiguousarray(a[:, None]), preprocess,
        desc="copy descriptor").numpy()
    train_images, _ = load_fashion_mnist("train")
    chosen = np.random.default_rng(1).choice(len(train_images), size=min(args.whiten_images, len(train_images)),
                                             replace=False)
    learning = train_images[np.sort(chosen)]
    # as `embed --descriptor copy [--flip-average] --whiten-on`: the whitening learned on descriptors made alike
    flip_described = lambda a: normed(described(a) + described(a[:, :, ::-1]))  # noqa: E731
    whitenings = {False: learn_whitening(described(learning)), True: learn_whitening(flip_described(learning))}
    print(f"copy descriptor: GeM p={args.gem_p}, whitening learned on {whitenings[False].rows} training images, "
          f"{whitenings[False].dim} dimensions")
    out = Path(args.output)
    for preset, strength in PRESETS.items():
        rng = np.random.default_rng(0)
        sources = rng.choice(len(images), size=args.copies, replace=False)
        copies = np.stack([near_copy(images[i], rng, **strength) for i in sources])
        pool = np.concatenate([images, copies])
        truth = {(int(s), len(images) + j) for j, s in enumerate(sources)}
        embed = lambda a: normed(extract_features(model, np.ascontiguousarray(a[:, None]),  # noqa: E731
                                                  preprocess, desc="embed").numpy())
        plain, mirrored = embed(pool), embed(pool[:, :, ::-1])
        copy = normed(apply_whitening(described(pool), whitenings[False]))
        copy_flip = normed(apply_whitening(flip_described(pool), whitenings[True]))
        pixels = pool.reshape(len(pool), -1).astype(np.float32) / 255.0
        features = {"class token": plain, "class token, flip-averaged": normed(plain + mirrored),
                    "copy descriptor": copy, "copy descriptor, flip-averaged": copy_flip,
                    "raw pixels (centred)": pixels - pixels.mean(axis=0)}
        print(f"\n{preset} copies {strength}: {len(images)} test images + {args.copies} near-copies; "
              f"backbone {args.checkpoint}")
        best = None
        for name, vectors in features.items():
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            unit = normed(vectors)
            print(f"  {name}: the nearest image of a copy is its original for "
                  f"{nearest_is_original(unit, sources):.3f} of the copies; "
                  f"µAP of the copy pairs over the graph {micro_ap(unit, truth):.3f}")
            print("    threshold  precision  recall  predicted pairs")
            for t in (args.copy_thresholds if name.startswith("copy") else args.thresholds):
                p, r, n = scores(vectors, truth, t)
                print(f"    {t:9.3f} {p:10.3f} {r:7.3f} {n:16d}")
                f1 = 2 * p * r / max(p + r, 1e-9)
                if name != "raw pixels (centred)" and (best is None or f1 > best[0]):
                    best = (f1, vectors, t, name)
        # the groups found by the best backbone setting, as a picture: originals by name, copies as files
        out.mkdir(parents=True, exist_ok=True)
        names = [fashion_mnist_path("test", i) for i in range(len(images))]
        for j, copy in enumerate(copies):
            Image.fromarray(copy).save(out / f"copy_{preset}_{j:04d}.png")
            names.append(str(out / f"copy_{preset}_{j:04d}.png"))
        groups = sorted(groups_of(best[1], best[2]), key=len)
        duplicate_grid(out / f"duplicate_groups_{preset}.png", [[names[i] for i in g] for g in groups[:12]])
        print(f"  {out}/duplicate_groups_{preset}.png: the 12 smallest groups of {best[3]} at {best[2]}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
