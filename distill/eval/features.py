"""Feature extraction over an image array, in batches, with a progress bar."""

from typing import Callable

import numpy as np
import torch

from distill.precision import autocast, resolve_precision
from distill.progress import progress


@torch.inference_mode()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    precision: str = "fp32",
    device: str = "cpu",
    desc: str = "features",
) -> torch.Tensor:
    """encode(preprocess(batch)) over uint8 images [N, ...]; returns float32 features [N, D] on the CPU.

    precision: "fp32", "bf16" (autocast), or "auto" (bf16 where the hardware runs it natively).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    outputs = []
    with progress(total=len(images), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            with autocast(precision, device):
                outputs.append(encode(preprocess(batch)).float().cpu())
            bar.update(len(batch))
    return torch.cat(outputs)


@torch.inference_mode()
def extract_source_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    source,
    view,
    batch_size: int = 256,
    precision: str = "fp32",
    device: str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
    with_indices: bool = False,
):
    """Features [N, D] and labels [N] of an image source (in-memory or files) through an evaluation view; with
    with_indices also the index of the image each row comes from (a file that cannot be decoded is replaced by
    the next readable one, so row i need not be image i)."""
    from distill.data.loader import build_loader

    device = torch.device(device)
    precision = resolve_precision(precision, device)
    loader, _ = build_loader(source, view, batch_size, seed=0, num_workers=num_workers, shuffle=False,
                             drop_last=False)
    features, labels, indices = [], [], []
    with progress(total=len(source), desc=desc, unit="img", leave=False) as bar:
        for batch in loader:
            images = batch["crops"][0].to(device, non_blocking=True)
            with torch.inference_mode(), autocast(precision, device):
                features.append(encode(images).float().cpu())
            if batch["labels"] is not None:
                labels.append(batch["labels"])
            indices.append(torch.as_tensor(batch["indices"]))
            bar.update(len(images))
    out = torch.cat(features), (torch.cat(labels) if labels else None)
    return (*out, torch.cat(indices)) if with_indices else out
