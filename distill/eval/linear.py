"""Linear probe on frozen features: class tokens of the last n blocks (optionally with average-pooled patch
tokens, as DINO does for ViT-B), a multinomial logistic regression trained on precomputed features, its
learning rate chosen on a held-out tenth of the training set. The trained classifier is returned on the raw
features (the standardisation folded into it), so that it can be saved and applied later (eval/heads.py)."""

import logging
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def linear_features(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 4, avgpool: bool = False):
    """[B, n * D (+ D)] for a ViT; the pooled embedding for other backbones."""
    if not hasattr(backbone, "get_intermediate_layers"):
        return backbone(images)
    outputs = backbone.get_intermediate_layers(images, n_last_blocks, return_class_token=True)
    features = [cls for _, cls in outputs]
    if avgpool:
        features.append(outputs[-1][0].mean(dim=1))
    return torch.cat(features, dim=-1)


def _fit(features, labels, num_classes, lr, weight_decay, epochs, batch_size, seed) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(features) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return classifier


@torch.no_grad()
def _accuracy(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    top = classifier(features).topk(min(5, classifier.out_features), dim=1).indices
    hits = top == labels[:, None]
    # counts, not float32 means: the same numbers as evaluate_classifier gives for the same predictions
    seen = len(labels)
    return {"top1": 100.0 * int(hits[:, 0].sum()) / seen, "top5": 100.0 * int(hits.any(dim=1).sum()) / seen}


def fold_standardisation(classifier: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The same classifier on raw features: W (x - mean) / std + b = (W / std) x + (b - (W / std) mean).
    weight [C, F], mean and std [F]."""
    weight = classifier.weight.detach() / std[None, :]
    folded = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(classifier.bias.detach() - weight @ mean)
    return folded


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    weight_decay: float = 1e-4,
    epochs: int = 30,
    batch_size: int = 1024,
    seed: int = 0,
) -> Tuple[Dict[str, float], nn.Linear]:
    """Top-1 / top-5 (%) on the validation features [M, F], with the learning rate picked on held-out training data,
    and the classifier [F -> C] that scored them, taking raw features (its accuracy is measured as it is returned)."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    train_x = (train_features - mean) / std
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    held_out, kept = order[: len(order) // 10], order[len(order) // 10 :]
    scores = {}
    for lr in lrs:
        classifier = _fit(train_x[kept], train_labels[kept], num_classes, lr, weight_decay, epochs, batch_size, seed)
        scores[lr] = _accuracy(classifier, train_x[held_out], train_labels[held_out])["top1"]
        logger.info("linear probe lr %.0e: held-out top-1 %.2f", lr, scores[lr])
    best = max(scores, key=scores.get)
    classifier = _fit(train_x, train_labels, num_classes, best, weight_decay, epochs, batch_size, seed)
    folded = fold_standardisation(classifier, mean, std)
    result = {**_accuracy(folded, val_features, val_labels), "lr": best, "feature_dim": train_features.shape[1]}
    return result, folded


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, **options: Any) -> Dict[str, float]:
    """fit_linear_probe's scores alone (same options), for callers that do not keep the classifier."""
    return fit_linear_probe(train_features, train_labels, val_features, val_labels, **options)[0]
