"""Sinkhorn-Knopp teacher targets (SwAV, DINOv2): soft assignments of the global batch to the prototypes with
equal mass per prototype, instead of centering."""

import torch

from distill import distributed


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """teacher_output [B, K] -> targets [B, K], each row a distribution.

    Q = exp(t / tau)^T normalised to total 1, then `iterations` times: rows (prototypes) to 1/K, columns
    (samples) to 1/B, where B is the batch over all ranks; finally times B so that columns sum to 1.
    The largest logit over all ranks is subtracted before exp (the normalisation to total 1 cancels it), so
    large logits or a small tau give the same targets instead of inf / NaN.
    """
    logits = teacher_output.float() / teacher_temp
    top = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    top = distributed.all_reduce_max(top.detach().clone())
    q = torch.exp(logits - top).t()
    num_prototypes = q.shape[0]
    batch = torch.tensor(float(q.shape[1]), device=q.device)
    batch = distributed.all_reduce_sum(batch)
    q /= distributed.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= distributed.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()
