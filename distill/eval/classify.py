"""Top-1 / top-5 accuracy of a classifier on a labelled image source (DeiT's validation)."""

import logging
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError, NoReadableImage
from distill.precision import autocast, resolve_precision

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, source, view, batch_size: int = 256, precision: str = "fp32",
                        device: str = "cpu", num_workers: int = 0, desc: str = "validation") -> Dict[str, float]:
    """{"top1", "top5", "loss"} in percent (loss: mean cross-entropy) over every image of `source`."""
    from distill.eval.features import evaluation_batches

    if source.labels is None:
        raise InputError(f"accuracy needs labels, but {source.name} has none")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    start = time.perf_counter()
    try:
        for batch in evaluation_batches(source, view, batch_size, device, num_workers, desc):
            labels = batch["labels"].to(device)
            with autocast(precision, device):
                logits = model(batch["images"])
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            seen += len(labels)
    finally:
        model.train(was_training)
    if not seen:
        raise NoReadableImage(f"no image of {source.name} could be read: nothing to classify")
    result = {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "loss": loss_sum / seen}
    logger.info("%s on %s (%d images, %.0fs): top-1 %.2f, top-5 %.2f", desc, source.name, seen,
                time.perf_counter() - start, result["top1"], result["top5"])
    return result
