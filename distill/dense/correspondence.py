"""Correspondences between two images from their dense descriptors: mutual nearest neighbours ("best buddies"),
reduced to a few well spread salient pairs, a dense nearest-neighbour flow, the fusion of two descriptor sources,
and the picture and point file that show the result.

Follows Amir et al. 2021, "Deep ViT Features as Dense Visual Descriptors" (github.com/ShirAmir/dino-vit-features,
correspondences.py): best buddies under cosine similarity, pairs whose ends are both salient (the class-token
attention of the last block, mean over heads, scaled to [0, 1] per image, above 0.05), k-means on the pairs'
concatenated descriptors and the most salient pair of each cluster. Fusion follows Zhang et al. 2023, "A Tale of
Two Features: Stable Diffusion Complements DINO for Zero-Shot Semantic Correspondence" (github.com/Junyi42/sd-dino):
each source L2-normalised per location, brought to one grid, weighted and concatenated.
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.dense.kinds import SELECTIONS
from distill.errors import InputError
from distill.files import atomic_write, atomic_write_text


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def nearest(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row of a [Na, C] the most cosine-similar row of b [Nb, C]: (indices [Na], similarities [Na]).
    Computed `chunk` rows at a time, so memory stays O(chunk * Nb) for large grids (SD's are 120 x 120)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"descriptors must be [N, C] with the same C, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not len(a) or not len(b):
        raise InputError("descriptor sets must not be empty")
    a, b = _unit(a), _unit(b)
    indices, similarities = [], []
    for start in range(0, len(a), chunk):
        values, where = (a[start:start + chunk] @ b.t()).max(dim=1)
        indices.append(where)
        similarities.append(values)
    return torch.cat(indices), torch.cat(similarities)


def best_buddies(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mutual nearest neighbours (cosine) of descriptor sets a [Na, C] and b [Nb, C]: index pairs [P, 2] (row of
    a, row of b), ordered by the row of a. A pair is kept only when each is the other's nearest neighbour."""
    a_to_b, _ = nearest(a, b)
    b_to_a, _ = nearest(b, a)
    rows = torch.arange(len(a))
    mutual = b_to_a[a_to_b] == rows
    return torch.stack([rows[mutual], a_to_b[mutual]], dim=1)


def dense_flow(a_grid: torch.Tensor, b_grid: torch.Tensor) -> torch.Tensor:
    """For every cell of A [h, w, C] the nearest cell of B [h2, w2, C] (cosine): [h, w, 2] long, the target
    cell's (x, y) = (column, row) in B's grid."""
    if a_grid.ndim != 3 or b_grid.ndim != 3:
        raise InputError(f"grids must be [h, w, C], got {tuple(a_grid.shape)} and {tuple(b_grid.shape)}")
    h, w, _ = a_grid.shape
    width_b = b_grid.shape[1]
    index, _ = nearest(a_grid.reshape(h * w, -1), b_grid.reshape(-1, b_grid.shape[-1]))
    return torch.stack([index % width_b, index // width_b], dim=-1).reshape(h, w, 2)


def fuse(sources: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """SD-DINO's fusion of descriptor grids, each [h_i, w_i, C_i] (or all [B, h_i, w_i, C_i]): every source
    L2-normalised per location, the grids other than the finest (most cells; the first of equals) resized to it
    (bilinear, align_corners=False: each grid spans the whole image), each multiplied by its weight, concatenated
    along C in the order given -> [h, w, sum C_i] (or [B, h, w, sum C_i]).

    For two sources SD-DINO weighs them (1 - alpha, alpha); equal weights (alpha = 0.5) give each the same
    share of the cosine similarity whatever its width."""
    if not sources:
        raise InputError("fuse needs at least one descriptor grid")
    if len(weights) != len(sources):
        raise InputError(f"fuse got {len(sources)} sources but {len(weights)} weights: give one weight per source")
    ndims = {t.ndim for t in sources}
    if ndims not in ({3}, {4}):
        raise InputError(f"fuse takes grids [h, w, C] or [B, h, w, C], all alike; got shapes "
                         f"{[tuple(t.shape) for t in sources]}")
    batched = [t if t.ndim == 4 else t[None] for t in sources]
    if len({t.shape[0] for t in batched}) > 1:
        raise InputError(f"fuse: the sources hold different numbers of images: {[t.shape[0] for t in batched]}")
    finest = max(batched, key=lambda t: t.shape[1] * t.shape[2]).shape[1:3]
    parts = []
    for grid, weight in zip(batched, weights):
        grid = _unit(grid)
        if grid.shape[1:3] != finest:
            grid = F.interpolate(grid.permute(0, 3, 1, 2), size=tuple(finest), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        parts.append(grid * float(weight))
    fused = torch.cat(parts, dim=-1)
    return fused if ndims == {4} else fused[0]


@torch.inference_mode()
def class_token_saliency(model: nn.Module, images: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
    """Saliency of each patch as Amir et al. weigh pairs: the class token's attention to it in the last block,
    mean over heads, scaled to [0, 1] per image (min to max). Images [B, C, H, W] -> [B, h, w] on the grid of
    `stride` (overlapping patches when below the patch size; default the patch size)."""
    if not hasattr(model, "get_last_self_attention"):
        raise InputError(f"saliency needs a ViT's attention; {type(model).__name__} has none")
    device = next(model.parameters()).device
    images = images.to(device)
    grid = model.patch_embed.grid(images.shape[-2], images.shape[-1], stride)
    if stride is None or stride == model.patch_size:
        probs = model.get_last_self_attention(images)
    else:  # the same attention on the denser grid of overlapping patches
        tokens, _ = model.prepare_tokens(images, stride=stride)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        last = model.blocks[-1]
        probs = last.attn.attention_probs(last.norm1(tokens))
    attention = probs[:, :, 0, model.num_prefix_tokens:].float().mean(dim=1)  # [B, h * w]
    low = attention.min(dim=1, keepdim=True).values
    high = attention.max(dim=1, keepdim=True).values
    scaled = (attention - low) / (high - low).clamp_min(1e-12)
    return scaled.reshape(len(images), *grid).cpu()


@dataclass
class Matches:
    """Best buddies of two grids and the pairs kept of them, as flat (row-major) cell indices (A, B)."""

    buddies: torch.Tensor  # [P, 2] every mutual nearest neighbour pair
    kept: torch.Tensor  # [K, 2] the pairs kept, best ranked first
    similarity: torch.Tensor  # [K] cosine similarity of each kept pair
    rank: torch.Tensor  # [K] what ranked them: the pair's mean saliency, or its similarity without saliency


def _kmeans_plus_plus(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), as scikit-learn's KMeans that Amir et al. use starts:
    each next centre drawn with probability proportional to the squared distance to the nearest one so far."""
    centres = [points[rng.integers(len(points))]]
    distances = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, clusters):
        total = distances.sum()
        index = rng.choice(len(points), p=distances / total) if total > 0 else rng.integers(len(points))
        centres.append(points[index])
        distances = np.minimum(distances, ((points - points[index]) ** 2).sum(axis=1))
    return np.stack(centres).astype(np.float32)


def _kmeans_labels(points: np.ndarray, clusters: int, seed: int, restarts: int = 5) -> np.ndarray:
    """Cluster of each row of points [N, D] (float32) by k-means (faiss, 20 iterations from k-means++ seeds), the
    best of `restarts` runs by their objective."""
    import faiss

    rng = np.random.default_rng(seed)
    best, labels = None, None
    for _ in range(restarts):
        kmeans = faiss.Kmeans(points.shape[1], clusters, niter=20, seed=int(rng.integers(2**31)), verbose=False,
                              min_points_per_centroid=1)  # few pairs per cluster is the normal case here
        kmeans.train(points, init_centroids=_kmeans_plus_plus(points, clusters, rng))
        distances, assigned = kmeans.index.search(points, 1)
        objective = float(distances.sum())
        if best is None or objective < best:
            best, labels = objective, assigned[:, 0]
    return labels


def select_pairs(pairs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int,
                 saliency_a: Optional[torch.Tensor] = None, saliency_b: Optional[torch.Tensor] = None,
                 method: str = "kmeans", threshold: float = 0.05, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduce best buddies pairs [P, 2] (rows of a [Na, C], b [Nb, C]) to at most k: (pairs [K, 2], rank [K]),
    best ranked first. k = 0 keeps them all (ranked).

    With saliency ([Na], [Nb] in [0, 1]) a pair's rank is the mean saliency of its ends, and pairs with an end
    at or below `threshold` are dropped (Amir et al.'s foreground mask); without it the rank is the pair's cosine
    similarity. method "saliency": the k best ranked. method "kmeans" (Amir et al.): k-means into k clusters
    of the pairs' concatenated descriptors (each pair's concatenation L2-normalised), the best ranked pair of each
    cluster; an empty cluster gives none, so fewer than k may come back."""
    if method not in SELECTIONS:
        raise InputError(f"pair selection {method!r} unknown: choose one of {', '.join(SELECTIONS)}")
    if k < 0:
        raise InputError(f"the number of pairs to keep must be 0 (all) or more, got {k}")
    if (saliency_a is None) != (saliency_b is None):
        raise InputError("give the saliency of both images or of neither")
    desc_a, desc_b = _unit(a)[pairs[:, 0]], _unit(b)[pairs[:, 1]]
    if saliency_a is not None:
        ends_a, ends_b = saliency_a.reshape(-1)[pairs[:, 0]], saliency_b.reshape(-1)[pairs[:, 1]]
        salient = (ends_a > threshold) & (ends_b > threshold)
        pairs, desc_a, desc_b = pairs[salient], desc_a[salient], desc_b[salient]
        rank = ((ends_a + ends_b) / 2)[salient]
    else:
        rank = (desc_a * desc_b).sum(dim=1)
    order = torch.argsort(rank, descending=True, stable=True)
    if k == 0 or len(pairs) <= k:
        return pairs[order], rank[order]
    if method == "saliency":
        return pairs[order[:k]], rank[order[:k]]
    together = _unit(torch.cat([desc_a, desc_b], dim=1)).numpy().astype(np.float32)
    labels = torch.from_numpy(_kmeans_labels(np.ascontiguousarray(together), k, seed).astype(np.int64))
    chosen = []
    for cluster in labels.unique():
        members = torch.nonzero(labels == cluster)[:, 0]
        chosen.append(members[rank[members].argmax()])
    chosen = torch.stack(chosen)
    chosen = chosen[torch.argsort(rank[chosen], descending=True, stable=True)]
    return pairs[chosen], rank[chosen]


def correspond(a_grid: torch.Tensor, b_grid: torch.Tensor, pairs: int = 10,
               saliency_a: Optional[torch.Tensor] = None, saliency_b: Optional[torch.Tensor] = None,
               method: str = "kmeans", threshold: float = 0.05, seed: int = 0) -> Matches:
    """Best buddies of grids a [h, w, C] and b [h2, w2, C], reduced by `select_pairs` to at most `pairs`
    (0: all); saliency [h, w] and [h2, w2] or None."""
    a, b = a_grid.reshape(-1, a_grid.shape[-1]), b_grid.reshape(-1, b_grid.shape[-1])
    buddies = best_buddies(a, b)
    kept, rank = select_pairs(buddies, a, b, pairs, saliency_a, saliency_b, method, threshold, seed)
    similarity = (_unit(a)[kept[:, 0]] * _unit(b)[kept[:, 1]]).sum(dim=1)
    return Matches(buddies, kept, similarity, rank)


def render_matches(image_a: np.ndarray, image_b: np.ndarray, points_a: torch.Tensor, points_b: torch.Tensor,
                   title: Optional[str] = None) -> bytes:
    """PNG bytes: images [H, W, 3] (floats in [0, 1] or uint8) side by side, each pair of points (x, y) [K, 2]
    in those images' pixels joined by a line of its own colour, circles at both ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import ConnectionPatch

    height = max(image_a.shape[0], image_b.shape[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.4 * height / max(image_a.shape[1], image_b.shape[1], 1)
                                                       + 0.6), squeeze=True)
    for ax, image in ((left, image_a), (right, image_b)):
        ax.imshow(image)
        ax.set_axis_off()
    colours = matplotlib.colormaps["hsv"](np.linspace(0, 1, max(len(points_a), 1), endpoint=False))
    for (xa, ya), (xb, yb), colour in zip(points_a.tolist(), points_b.tolist(), colours):
        line = ConnectionPatch(xyA=(xa, ya), coordsA=left.transData, xyB=(xb, yb), coordsB=right.transData,
                               color=colour, linewidth=1.2, alpha=0.9)
        fig.add_artist(line)
        for ax, (x, y) in ((left, (xa, ya)), (right, (xb, yb))):
            ax.scatter([x], [y], s=36, facecolors="none", edgecolors=[colour], linewidths=1.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def pairs_text(points_a: torch.Tensor, points_b: torch.Tensor, kind: str = "json",
               info: Optional[Dict[str, object]] = None, scores: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Point pairs (x, y) [K, 2] as text: JSON ({**info, "pairs": [{"a": [x, y], "b": [x, y], score: v}]}) or CSV
    (header x_a,y_a,x_b,y_b then the score names). Coordinates rounded to 0.01 pixel."""
    scores = scores or {}
    rows = [[round(v, 2) for v in pa + pb] for pa, pb in zip(points_a.tolist(), points_b.tolist())]
    columns = {name: values.tolist() for name, values in scores.items()}
    if kind == "csv":
        lines = [",".join(["x_a", "y_a", "x_b", "y_b", *columns])]
        for index, row in enumerate(rows):
            lines.append(",".join(str(v) for v in row + [round(columns[n][index], 6) for n in columns]))
        return "\n".join(lines) + "\n"
    if kind != "json":
        raise InputError(f"point file kind {kind!r} unknown: json or csv")
    pairs: List[Dict[str, object]] = []
    for index, row in enumerate(rows):
        entry: Dict[str, object] = {"a": row[:2], "b": row[2:]}
        entry.update({name: round(columns[name][index], 6) for name in columns})
        pairs.append(entry)
    return json.dumps({**(info or {}), "pairs": pairs}, indent=2) + "\n"


def write_matches(picture: Union[str, Path], png: bytes, points_path: Union[str, Path], text: str) -> None:
    """Both files, each written whole or not at all (the points first, so a picture never lacks its file)."""
    atomic_write_text(points_path, text)
    atomic_write(picture, lambda handle: handle.write(png))
