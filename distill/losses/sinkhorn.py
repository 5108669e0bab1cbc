"""Sinkhorn-Knopp teacher targets (SwAV, DINOv2): soft assignments of the global batch to the prototypes with
equal mass per prototype, instead of centering."""

import math

import torch

from distill import distributed


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """teacher_output [B, K] -> targets [B, K], each row a distribution.

    The definition (facebookresearch/dinov2 dinov2/loss/dino_clstoken_loss.py): Q = exp(t / tau)^T normalised to
    total 1, then `iterations` times: rows (prototypes) to 1/K, columns (samples) to 1/B, where B is the batch over
    all ranks; finally times B so that columns sum to 1.

    Computed on log Q, with each normalisation a log-sum-exp (a row's over all ranks), so that it stays finite for
    any finite input: with large logits or a small tau, exp underflows to 0 for whole prototypes, and the plain
    form then divides a row that sums to 0. The total normalisation is left out: the first row normalisation
    cancels it.
    """
    log_q = (teacher_output.float() / teacher_temp).t()  # [K, B_local]
    num_prototypes = log_q.shape[0]
    batch = distributed.all_reduce_sum(torch.tensor(float(log_q.shape[1]), device=log_q.device))
    log_k, log_b = math.log(num_prototypes), torch.log(batch)
    for _ in range(iterations):
        log_q -= _row_logsumexp(log_q) + log_k  # each prototype: mass 1/K over the global batch
        log_q -= torch.logsumexp(log_q, dim=0, keepdim=True) + log_b  # each sample: mass 1/B
    return torch.exp(log_q + log_b).t()


def _row_logsumexp(log_q: torch.Tensor) -> torch.Tensor:
    """log sum_b exp(log_q[k, b]) over the samples of every rank: [K, 1]. A rank with no samples adds nothing."""
    top = log_q.max(dim=1, keepdim=True).values if log_q.shape[1] else log_q.new_full((log_q.shape[0], 1), -math.inf)
    top = distributed.all_reduce_max(top)
    total = distributed.all_reduce_sum(torch.exp(log_q - top).sum(dim=1, keepdim=True))
    return top + torch.log(total)
