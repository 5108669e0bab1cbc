"""Balanced hierarchical sampling (Vo et al. 2024): top-down, the target is split evenly among the clusters of
the coarsest level, each share evenly among its children, and so on; a cluster smaller than its share gives
the rest back to its siblings. Inside the finest clusters: random, or closest to the centroid first."""

from typing import Dict, List, Optional

import numpy as np

from distill.errors import InputError


def split_evenly(target: int, capacities: List[int]) -> List[int]:
    """Shares of `target` over children with these capacities: as even as possible, none above its capacity."""
    shares = [0] * len(capacities)
    remaining, open_ = target, [i for i, c in enumerate(capacities) if c > 0]
    while remaining > 0 and open_:
        each, extra = divmod(remaining, len(open_))
        still = []
        for rank, i in enumerate(open_):
            want = each + (1 if rank < extra else 0)
            give = min(want, capacities[i] - shares[i])
            shares[i] += give
            remaining -= give
            if shares[i] < capacities[i]:
                still.append(i)
        if len(still) == len(open_) and each == 0 and extra == 0:
            break
        open_ = still
    return shares


def balanced_sample(paths: List[np.ndarray], target: int, seed: int = 0, mode: str = "random",
                    distances: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of `target` points. paths[i][p] is point p's cluster at level i (finest first, as
    hierarchical_kmeans returns them); mode "closest" needs distances[p] to the point's finest centroid."""
    if mode not in ("random", "closest"):
        raise InputError(f"sampling mode {mode!r}: choose random or closest")
    if mode == "closest" and distances is None:
        raise InputError("closest-to-centroid sampling needs the distances of the points to their centroids")
    n = len(paths[0])
    if not 0 < target <= n:
        raise InputError(f"target size {target} must lie between 1 and the {n} points")
    rng = np.random.default_rng(seed)
    keys = np.stack(paths[::-1], axis=1)  # coarse -> fine, one row per point

    def pick(members: np.ndarray, depth: int, share: int) -> List[np.ndarray]:
        if share <= 0:
            return []
        if depth == keys.shape[1]:
            order = rng.permutation(members) if mode == "random" else members[np.argsort(distances[members], kind="stable")]
            return [order[:share]]
        children: Dict[int, np.ndarray] = {}
        values = keys[members, depth]
        for child in np.unique(values):
            children[int(child)] = members[values == child]
        groups = list(children.values())
        rng.shuffle(groups)
        shares = split_evenly(share, [len(g) for g in groups])
        out: List[np.ndarray] = []
        for group, s in zip(groups, shares):
            out.extend(pick(group, depth + 1, s))
        return out

    chosen = pick(np.arange(n), 0, target)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
