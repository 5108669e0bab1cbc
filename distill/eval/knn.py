"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's evaluation protocol).

Each test feature votes with its k most similar training features (cosine similarity s), each vote weighted
exp(s / T), T = 0.07. Memory stays bounded: queries and the memory bank are both processed in chunks, keeping
only a running top-k.
"""

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from distill.errors import InputError


def _check(train_features, train_labels, test_features, test_labels, ks) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise InputError(
            f"features must be [N, D] with the same D, got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if len(train_labels) != len(train_features) or (test_labels is not None and len(test_labels) != len(test_features)):
        raise InputError("each feature needs exactly one label")
    if min(ks) < 1 or max(ks) > len(train_features):
        raise InputError(f"k must be between 1 and the {len(train_features)} training samples, got {sorted(ks)}")
    for name, tensor in (("train", train_features), ("test", test_features)):
        if not torch.isfinite(tensor).all():
            raise InputError(f"the {name} features contain NaN or inf: the backbone produced invalid outputs")


@torch.no_grad()
def nearest_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, bank_chunk: int = 65536
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarities and indices [Q, k] of the k largest dot products of each query with the bank, sorted."""
    best_sim = best_idx = None
    for start in range(0, len(bank), bank_chunk):
        sim = queries @ bank[start : start + bank_chunk].T
        sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        idx = idx + start
        if best_sim is not None:
            sim, order = torch.cat([best_sim, sim], dim=1).topk(k, dim=1)
            idx = torch.cat([best_idx, idx], dim=1).gather(1, order)
        best_sim, best_idx = sim, idx
    return best_sim, best_idx


@torch.no_grad()
def knn_scores(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores [Q, C]: the sum of exp(sim / T) over the neighbours of each class."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Iterable[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    normalize: bool = True,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> Dict[int, Dict[str, float]]:
    """Top-1 and top-5 accuracy (%) of weighted kNN for several k at once: {k: {"top1": .., "top5": ..}}."""
    ks = sorted(set(int(k) for k in ks))
    _check(train_features, train_labels, test_features, test_labels, ks)
    train_features, test_features = train_features.float(), test_features.float()
    if normalize:
        train_features = F.normalize(train_features, dim=1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, len(test_features), query_chunk):
        queries = test_features[start : start + query_chunk]
        if normalize:
            queries = F.normalize(queries, dim=1)
        targets = test_labels[start : start + query_chunk, None]
        sims, idx = nearest_neighbours(train_features, queries, ks[-1], bank_chunk)
        labels = train_labels[idx]
        for k in ks:
            scores = knn_scores(sims[:, :k], labels[:, :k], num_classes, temperature)
            top_scores, top = scores.topk(min(5, k, num_classes), dim=1)
            # A class no neighbour voted for is not a prediction, whatever order ties of zeros come in.
            hits = (top == targets) & (top_scores > 0)
            correct[k][0] += hits[:, 0].sum()
            correct[k][1] += hits.any(dim=1).sum()
    total = len(test_features)
    return {k: {"top1": 100.0 * c[0].item() / total, "top5": 100.0 * c[1].item() / total} for k, c in correct.items()}
