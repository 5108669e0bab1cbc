"""Image descriptors for copy detection, as in DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers", the copy-detection experiment): the class token concatenated with a generalized-mean (GeM)
pooling of the last block's normalised patch tokens, optionally at several scales, then PCA-whitened and
L2-normalised.

The facts follow the official evaluation (facebookresearch/dino, eval_copy_detection.py): GeM with exponent 4 over
patch tokens clamped at 1e-6, [class token, GeM] of the last block after the final norm, and a whitening learned on
20k YFCC100M images with eigenvalues raised to -1/2 and floored at 1e-5 of the largest. Here the whitening is learned
on the L2-normalised descriptors (the rows of a store made without whitening) and the covariance is centred.
"""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import InputError

EIGENVALUE_FLOOR = 1e-5  # eigenvalues below this fraction of the largest are raised to it (as the official code)


def gem(tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalized mean over the token axis: [B, N, D] -> [B, D], (mean_n clamp(x, eps)^p)^(1/p), in float32.
    p = 1 is the mean of the clamped tokens; a large p tends to their maximum."""
    if tokens.ndim != 3 or tokens.shape[1] == 0:
        raise InputError(f"GeM pools tokens [batch, tokens, dim] with at least one token, got {tuple(tokens.shape)}")
    if not p > 0:
        raise InputError(f"the GeM exponent must be positive, got {p}")
    x = tokens.float().clamp(min=eps)
    # x / max before the power keeps large exponents finite; the max comes back out after the root
    top = x.amax(dim=1, keepdim=True)
    return (x / top).pow(p).mean(dim=1).pow(1.0 / p) * top.squeeze(1)


def check_scales(scales: Sequence[float]) -> tuple:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (0 < s <= 4) for s in scales):
        raise InputError(f"--scales are image size factors in (0, 4], e.g. 1 0.707, got {list(scales)}")
    return scales


def _resized(images: torch.Tensor, scale: float, patch: int) -> torch.Tensor:
    if scale == 1.0:
        return images
    height, width = (max(patch, round(side * scale / patch) * patch) for side in images.shape[-2:])
    if (height, width) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=scale < 1).to(images.dtype)


def check_patch_tokens(model: torch.nn.Module) -> None:
    """copy_descriptor's network must give patch tokens (a ViT or an XCiT, not a ResNet)."""
    if not hasattr(model, "forward_features") or not hasattr(model, "patch_size"):
        name = getattr(model, "registry_name", None) or type(model).__name__
        raise InputError(f"--descriptor copy pools patch tokens: {name} has none; embed with a ViT "
                         "or XCiT backbone, or use --descriptor cls")


def copy_descriptor(model: torch.nn.Module, images: torch.Tensor, p: float = 4.0,
                    scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """[class token, GeM of the patch tokens] of the last block (after the final norm) of images [B, C, H, W]:
    [B, 2 D], L2-normalised; with several scales (image size factors, sides rounded to the patch size) the
    L2-normalised descriptor of each scale, averaged, normalised again."""
    check_patch_tokens(model)
    total = None
    for scale in scales:
        tokens = model.forward_features(_resized(images, scale, model.patch_size))
        described = torch.cat([tokens["x_norm_clstoken"].float(), gem(tokens["x_norm_patchtokens"], p)], dim=1)
        described = F.normalize(described, dim=1)
        total = described if total is None else total + described
    return F.normalize(total, dim=1)


@dataclass
class Whitening:
    """x -> (x - mean) @ projection: projection [D, k] holds the k leading eigenvectors of the learning set's
    covariance, each divided by the square root of its eigenvalue (eigenvalues [k], largest first)."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    rows: int
    record: Dict[str, Any] = field(default_factory=dict)  # what it was learned on (written beside the arrays)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def digest(self) -> str:
        """sha256 of the arrays: two whitenings with the same digest map descriptors the same way."""
        digest = hashlib.sha256()
        for array in (self.mean, self.projection):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return digest.hexdigest()


def _batches(rows: Union[np.ndarray, Iterable[np.ndarray]]) -> Iterable[np.ndarray]:
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise InputError(f"whitening is learned on rows [n, dim], got shape {rows.shape}")
        return (rows[start : start + 65_536] for start in range(0, len(rows), 65_536))
    return rows


def learn_whitening(rows: Union[np.ndarray, Iterable[np.ndarray]], dim: Optional[int] = None) -> Whitening:
    """PCA whitening of rows [n, D] (an array, or batches of rows read one at a time: memory is D x D): the mean,
    and the `dim` leading eigenvectors of the centred covariance scaled by eigenvalue^(-1/2), so that the learning
    set comes out with identity covariance. dim defaults to min(D, n - 1), the directions the rows span; each
    eigenvector's largest entry is made positive, so the same rows give the same whitening."""
    count, total, outer = 0, None, None
    for batch in _batches(rows):
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 2:
            raise InputError(f"whitening is learned on rows [n, dim], got a batch of shape {batch.shape}")
        if total is None:
            total, outer = np.zeros(batch.shape[1]), np.zeros((batch.shape[1], batch.shape[1]))
        count += len(batch)
        total += batch.sum(axis=0)
        outer += batch.T @ batch
    if total is None or count < 2:
        raise InputError(f"whitening needs at least 2 rows to learn from, got {count}: give a larger learning set")
    width = len(total)
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)
    eigenvalues, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    keep = min(width, count - 1) if dim is None else int(dim)
    if not 1 <= keep <= width:
        raise InputError(f"--whiten-dim {dim} is not between 1 and the descriptor's dimension {width}")
    eigenvalues = np.maximum(eigenvalues[:keep], max(eigenvalues[0], 0.0) * EIGENVALUE_FLOOR)
    if not eigenvalues[0] > 0:
        raise InputError(f"the {count} rows of the whitening set are all the same vector: give a varied learning set")
    vectors = vectors[:, :keep]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(keep)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    return Whitening(mean=mean, projection=vectors / np.sqrt(eigenvalues), eigenvalues=eigenvalues, rows=count)


def apply_whitening(rows: np.ndarray, whitening: Whitening) -> np.ndarray:
    """(rows - mean) @ projection, float32 [n, k] (not normalised)."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(whitening.mean):
        raise InputError(f"rows of shape {rows.shape} do not fit a whitening of {len(whitening.mean)}-dimensional "
                         "descriptors: learn it on descriptors made the same way")
    return ((rows - whitening.mean) @ whitening.projection).astype(np.float32)


def save_whitening(destination, whitening: Whitening) -> None:
    """The arrays and the record, into one .npz (`handle`: an open binary file or a path)."""
    np.savez(destination, mean=whitening.mean, projection=whitening.projection, eigenvalues=whitening.eigenvalues,
             rows=np.int64(whitening.rows), record=np.array(json.dumps(whitening.record)))


def load_whitening(path) -> Whitening:
    fix = "give the whitening.npz of a store embedded with --whiten-on, or a store of unwhitened descriptors"
    try:
        with np.load(path, allow_pickle=False) as archive:
            mean, projection = archive["mean"], archive["projection"]
            eigenvalues, rows, record = archive["eigenvalues"], int(archive["rows"]), json.loads(str(archive["record"]))
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path} is not a whitening distill-curate wrote ({error}): {fix}") from None
    if mean.ndim != 1 or projection.shape[:1] != mean.shape or projection.ndim != 2 or \
            eigenvalues.shape != projection.shape[1:]:
        raise InputError(f"{path} holds arrays of shapes {mean.shape}, {projection.shape}, {eigenvalues.shape}, not "
                         f"a mean [D], a projection [D, k] and eigenvalues [k]: {fix}")
    return Whitening(mean=mean, projection=projection, eigenvalues=eigenvalues, rows=rows, record=record)
