"""Feature extraction over an image array, in batches, with a progress bar."""

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from distill.errors import InputError, NoReadableImage
from distill.precision import autocast, resolve_precision
from distill.progress import progress

logger = logging.getLogger(__name__)


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


def evaluation_batches(source, view, batch_size: int, device: torch.device, num_workers: int = 0,
                       desc: str = "features", skipped: Optional[List[int]] = None) -> Iterator[Dict[str, Any]]:
    """Every readable image of `source` once, in order, through an evaluation view, as batches {"images" on
    `device`, "labels" (or None), "indices"}, with a progress bar. An unreadable file gives no row (nothing takes
    its place): its index goes to `skipped`, and the files left out are named in the log at the end."""
    from distill.data.filelists import readable_name
    from distill.data.loader import build_eval_loader

    loader = build_eval_loader(source, view, batch_size, num_workers)
    left_out: List[int] = [] if skipped is None else skipped
    with progress(total=len(source), desc=desc, unit="img", leave=False) as bar:
        for batch in loader:
            left_out.extend(batch["unreadable"])
            bar.update(len(batch["indices"]) + len(batch["unreadable"]))
            if batch["crops"] is None:
                continue
            yield {"images": batch["crops"][0].to(device, non_blocking=True), "labels": batch["labels"],
                   "indices": batch["indices"]}
    if left_out:
        names = [readable_name(source.paths[i]) for i in left_out[:5]]
        logger.warning("%s: left out %d unreadable image(s) of %s (%s%s)", desc, len(left_out), source.name,
                       ", ".join(names), ", ..." if len(left_out) > 5 else "")


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
    """Features [N, D] and labels [N] of the readable images of a source (in-memory or files) through an evaluation
    view; with with_indices also the index of the image each row comes from (an unreadable file gives no row)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    features, labels, indices = [], [], []
    for batch in evaluation_batches(source, view, batch_size, device, num_workers, desc):
        with torch.inference_mode(), autocast(precision, device):
            features.append(encode(batch["images"]).float().cpu())
        if batch["labels"] is not None:
            labels.append(batch["labels"])
        indices.append(batch["indices"])
    if not features:
        raise NoReadableImage(f"no image of {source.name} could be read: nothing to compute features of")
    out = torch.cat(features), (torch.cat(labels) if labels else None)
    return (*out, torch.cat(indices)) if with_indices else out
