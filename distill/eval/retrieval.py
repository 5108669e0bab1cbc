"""Retrieval and copy-detection metrics: mAP and recall@k over queries, and the micro-average precision (µAP) of
copy detection, from scored predictions and a ground truth of (query, gallery item) pairs.

Ties are one threshold: an item is placed at the end of the run of items with its score (the precision and the
rank it is counted at are those after the whole run), so the metrics do not depend on how a sort orders equal
scores, and a tie never counts in a method's favour.

- AP of one query: (1 / R) * sum over its relevant retrieved items of the precision at that item's rank, with R the
  number of relevant gallery items (those not retrieved add nothing); mAP: the mean over the queries that have at
  least one relevant item (the others are skipped and counted).
- recall@k: the fraction of those queries with a relevant item at rank k or better (within a tie, the irrelevant
  items first).
- µAP (DISC21, Douze et al. 2021; Copydays-style): every (query, reference, score) prediction pooled, sorted by
  score, and the area under the precision-recall curve of that one list, recall over the number of ground-truth
  pairs: the sum over correct predictions of the precision at their rank, divided by that number.
"""

import os
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from distill.errors import InputError

RECALL_AT = (1, 5, 10)


def _tie_ranks(sorted_scores: np.ndarray) -> np.ndarray:
    """For scores sorted descending: the 1-based rank of the last item of each item's run of equal scores."""
    return np.searchsorted(-sorted_scores, -sorted_scores, side="right")


def _first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> float:
    """The rank of the first relevant item when ties are broken against the method: the items scored above it, and
    the irrelevant ones tied with it, come first (inf when nothing relevant was retrieved)."""
    if not relevant.any():
        return float("inf")
    wrong = scores[~relevant]
    return float(min((scores > s).sum() + (wrong == s).sum() + 1 for s in scores[relevant]))


def average_precision(scores: np.ndarray, relevant: np.ndarray, total_relevant: Optional[int] = None) -> float:
    """AP of one ranked list: scores [n] of the retrieved items (any order), relevant [n] bools, and the number of
    relevant items there are (default: those retrieved). Also µAP when the list pools every query's predictions
    and total_relevant is the number of ground-truth pairs."""
    scores, relevant = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(relevant, dtype=bool).ravel()
    if scores.shape != relevant.shape:
        raise InputError(f"{len(scores)} scores but {len(relevant)} relevance flags")
    total = int(relevant.sum()) if total_relevant is None else int(total_relevant)
    if total < relevant.sum():
        raise InputError(f"{int(relevant.sum())} relevant items retrieved but only {total} relevant in all")
    if total == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, relevant = scores[order], relevant[order]
    ranks = _tie_ranks(scores)
    hits_through = np.cumsum(relevant)[ranks - 1]  # relevant items up to the end of each item's run
    return float((hits_through[relevant] / ranks[relevant]).sum() / total)


def micro_average_precision(scores: np.ndarray, correct: np.ndarray, truth_pairs: int) -> float:
    """µAP: the pooled predictions' scores, whether each names a ground-truth pair (each pair at most once), and
    the number of ground-truth pairs."""
    if truth_pairs < 1:
        raise InputError("µAP needs at least one ground-truth pair")
    return average_precision(scores, correct, truth_pairs)


def retrieval_metrics(scores: np.ndarray, ids: np.ndarray, truth: Sequence[Set[int]],
                      recall_at: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """Metrics of a search: scores and ids [queries, k] (each query's retrieved gallery items, any order; an id
    below 0 is no item), truth[q] the gallery items relevant to query q. Returns mAP, recall@k, µAP over every
    retrieved (query, item) pair, and the counts they rest on."""
    scores, ids = np.asarray(scores, dtype=np.float64), np.asarray(ids)
    if scores.shape != ids.shape or scores.ndim != 2 or len(truth) != len(scores):
        raise InputError(f"scores {scores.shape}, ids {ids.shape} and truth for {len(truth)} queries do not match")
    aps: List[float] = []
    found = {k: 0 for k in recall_at}
    correct = np.zeros(ids.shape, dtype=bool)
    for q, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        valid = row_ids >= 0
        correct[q, valid] = [int(i) in truth[q] for i in row_ids[valid]]
        if not truth[q]:
            continue
        aps.append(average_precision(row_scores[valid], correct[q, valid], len(truth[q])))
        first = _first_relevant_rank(row_scores[valid], correct[q, valid])
        for k in recall_at:
            found[k] += first <= k
    evaluated = len(aps)
    pairs = sum(len(t) for t in truth)
    valid = ids >= 0
    out: Dict[str, float] = {
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        **{f"recall@{k}": found[k] / evaluated if evaluated else float("nan") for k in recall_at},
        "microAP": micro_average_precision(scores[valid], correct[valid], pairs) if pairs else float("nan"),
        "queries": len(truth), "queries_evaluated": evaluated, "queries_without_truth": len(truth) - evaluated,
        "truth_pairs": pairs, "predictions": int(valid.sum()),
    }
    return out


def format_metrics(results: Dict[str, float], title: str) -> str:
    """The metrics as one readable block."""
    lines = [title, f"  mAP        {results['mAP']:.4f}   ({results['queries_evaluated']} queries with a relevant "
                    f"item; {results['queries_without_truth']} without, skipped)"]
    lines += [f"  {key:<10} {results[key]:.4f}" for key in results if key.startswith("recall@")]
    lines.append(f"  µAP        {results['microAP']:.4f}   ({results['predictions']} predictions pooled, "
                 f"{results['truth_pairs']} ground-truth pairs)")
    return "\n".join(lines)


def read_truth(path) -> List[Tuple[str, str]]:
    """The pairs of a ground-truth file: one `query<TAB>gallery` per line (a comma where no tab), each side a path
    or a row number; blank lines and lines starting with # are skipped."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise InputError(f"--truth {name} does not exist: give a file of query<TAB>gallery lines")
    pairs = []
    with open(name, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.split(",")
            if len(fields) != 2 or not all(f.strip() for f in fields):
                raise InputError(f"--truth {name} line {number} is {line!r}, not two fields `query<TAB>gallery`: "
                                 "write one pair a line, the two paths (or row numbers) separated by a tab")
            pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise InputError(f"--truth {name} holds no pairs: write one `query<TAB>gallery` line per ground-truth pair")
    return pairs


def truth_sets(queries: int, pairs: Sequence[Tuple[int, int]]) -> List[Set[int]]:
    """The relevant gallery rows of each of `queries` query rows, from (query row, gallery row) pairs."""
    truth: List[Set[int]] = [set() for _ in range(queries)]
    for query, item in pairs:
        truth[query].add(item)
    return truth


def write_metrics(path, results: Dict[str, object]) -> None:
    """Metrics as JSON, written whole; a metric without a value (NaN: nothing to measure it on) as null."""
    import json

    from distill.files import atomic_write_text

    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in results.items()}
    atomic_write_text(path, json.dumps(clean, indent=1, ensure_ascii=False) + "\n")
