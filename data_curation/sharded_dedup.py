"""`distill-curate dedup --submit slurm|local --parts N`: the kNN graph of `dedup` searched by the N tasks of a job
array, then merged into the kept list and groups of one process.

The submitting process builds the one index of the pool (dedup.build_index: trained once on a sample, filled with
every row) and writes it to OUT/index/pool.faiss. Task i reads that index and the rows of part i (a contiguous
range of the usable rows), searches them with the k and threshold of one process (dedup.search_pairs) and writes
its edges to OUT/parts/edges_XXXX.npy and their similarities to scores_XXXX.npy, each file whole, then
done_XXXX: a rerun submits only the parts without one. Every task searching the same saved index is what makes
the union of the parts' edges the graph of one process; the merge (dedup.merge_pairs, then union-find) runs in
the submitting process once the tasks are done (--wait, or the same command run again).
"""

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from data_curation.distributed_kmeans import _attempt, manifest_digest
from data_curation.embeddings import ArrayRows, EmbeddingStore, Rows, contiguous_runs, select
from distill.data.filelists import readable_name
from distill.errors import InputError
from distill.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

INDEX, PARTS = "index", "parts"
# for the tests: the task of part N (0-based) ends, as a killed task would, before writing its edges
EXIT_PART = "DISTILL_CURATE_DEDUP_EXIT_PART"


@dataclass
class DedupSettings:
    """What a sharded `dedup` was asked for (picklable, for the job)."""

    embeddings: str
    output: str
    threshold: float
    k: int
    exact_below: int
    memory_gb: float
    parts: int
    nprobe: int

    def identity(self, digest: str) -> Dict[str, Any]:
        """What decides the index and the parts' edges: a folder of another run's parts is started afresh."""
        out = {key: value for key, value in asdict(self).items() if key != "output"}
        out["embeddings"], out["manifest"] = os.path.abspath(self.embeddings), digest
        return out


def check_parts(parts: int, rows: int) -> None:
    if parts < 1:
        raise InputError(f"--parts {parts}: give at least 1")
    if parts > rows:
        raise InputError(f"--parts {parts} but the store has {rows} usable embedding{'s' if rows != 1 else ''}: "
                         f"use at most {rows} parts")


def part_rows(rows: Rows, first: int, stop: int) -> Rows:
    """Rows first .. stop with the values the whole pool's batches give them (not normalised again)."""
    if isinstance(rows, ArrayRows):
        return rows.slice(first, stop)
    return rows.subset(np.arange(first, stop))


def _edges(folder: Path, part: int) -> Tuple[Path, Path, Path]:
    return folder / f"edges_{part:04d}.npy", folder / f"scores_{part:04d}.npy", folder / f"done_{part:04d}"


def _check_store(settings: DedupSettings, digest: str, when: str) -> None:
    if manifest_digest(EmbeddingStore(settings.embeddings)) != digest:
        raise InputError(f"{readable_name(settings.embeddings)} changed {when} (its manifest is not the one read at "
                         "the start): nothing was written; run dedup again once the store is no longer being written")


def prepare(settings: DedupSettings, digest: str, rows: Rows) -> List[int]:
    """OUT/index (built unless this run's is there) and OUT/parts (emptied when it holds another run's edges).
    Returns the parts still to search."""
    import faiss

    from data_curation.dedup import build_index

    out = Path(settings.output)
    record = out / PARTS / "run.json"
    identity = settings.identity(digest)
    try:
        same = json.loads(record.read_text()) == identity
    except (OSError, ValueError):
        same = False
    index_file = out / INDEX / "pool.faiss"
    if not same or not index_file.is_file():
        if (out / PARTS).exists():
            logger.info("%s holds the parts of another dedup (other settings or another state of the store): "
                        "starting afresh", readable_name(str(out / PARTS)))
        shutil.rmtree(out / PARTS, ignore_errors=True)
        shutil.rmtree(out / INDEX, ignore_errors=True)
        index = build_index(rows, settings.exact_below, nprobe=settings.nprobe)
        (out / INDEX).mkdir(parents=True, exist_ok=True)
        staged = out / INDEX / f".pool.faiss.{os.getpid()}.tmp"
        faiss.write_index(index, str(staged))
        os.replace(staged, index_file)
        atomic_write_text(out / INDEX / "nprobe.json", json.dumps({  # what a saved index does not keep
            "nprobe": getattr(index, "nprobe", None), "rescore_margin": getattr(index, "rescore_margin", None)}))
        _check_store(settings, digest, "while its index was built")
        atomic_write_text(record, json.dumps(identity, indent=1))  # last: it vouches for the index
    return [p for p in range(settings.parts) if not _edges(out / PARTS, p)[2].is_file()]


def search_part(settings: DedupSettings, digest: str, part: int) -> Dict[str, Any]:
    """Task `part`: its rows searched against the saved index, edges and scores written whole, then done_XXXX."""
    import faiss

    from data_curation.dedup import search_pairs

    _check_store(settings, digest, "since the job was submitted")
    rows, _ = select(settings.embeddings, settings.memory_gb)
    first, stop = contiguous_runs(len(rows), settings.parts)[part]
    out = Path(settings.output)
    index = faiss.read_index(str(out / INDEX / "pool.faiss"))
    saved = json.loads((out / INDEX / "nprobe.json").read_text())
    if saved["nprobe"] is not None:
        index.nprobe = saved["nprobe"]
    if saved.get("rescore_margin") is not None:
        index.__dict__["rescore_margin"] = saved["rescore_margin"]
    pairs, scores = search_pairs(index, part_rows(rows, first, stop), settings.threshold, settings.k, len(rows),
                                 first, pool=rows)
    if os.environ.get(EXIT_PART) == str(part):
        logger.warning("%s=%d: ending here, as a killed task would", EXIT_PART, part)
        os._exit(3)
    _check_store(settings, digest, "while its parts were searched")
    edges_file, scores_file, done = _edges(out / PARTS, part)
    atomic_write(edges_file, lambda handle: np.save(handle, pairs))
    atomic_write(scores_file, lambda handle: np.save(handle, scores))
    atomic_write_text(done, f"{first} {stop} {len(pairs)}\n")
    return {"part": part, "rows": stop - first, "edges": int(len(pairs))}


def merged_graph(settings: DedupSettings, digest: str, n: int):
    """(kept, groups, pairs, scores) of the finished parts, as dedup.deduplicate_graph gives them for one process."""
    from data_curation.dedup import kept_and_groups, merge_pairs

    _check_store(settings, digest, "while it was deduplicated")
    folder = Path(settings.output) / PARTS
    pairs, scores = [], []
    for part in range(settings.parts):
        edges_file, scores_file, done = _edges(folder, part)
        if not done.is_file():
            raise InputError(f"part {part} of {readable_name(str(folder))} is not finished: run the same command "
                             "again (finished parts are not searched again)")
        pairs.append(np.load(edges_file))
        scores.append(np.load(scores_file))
    pairs, scores = merge_pairs(np.concatenate(pairs).reshape(-1, 2), np.concatenate(scores))
    kept, groups = kept_and_groups(n, pairs)
    return kept, groups, pairs, scores


class DedupPart:
    """What each task of a `dedup --submit` job array runs (picklable, for submitit): part `part`'s edges; returns
    {"error": one line} on bad input."""

    def __init__(self, settings: DedupSettings, digest: str) -> None:
        self.settings, self.digest = settings, digest

    def __call__(self, part: int) -> Dict[str, Any]:
        from distill.logs import configure_logging

        configure_logging()
        logging.getLogger("faiss").setLevel(logging.WARNING)
        result, error = _attempt(lambda: search_part(self.settings, self.digest, part))
        return {"error": error} if error else result

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / time-out hook: run the part again (its edges are written whole, or not)."""
        import submitit

        return submitit.helpers.DelayedSubmission(DedupPart(self.settings, self.digest), *args, **kwargs)


def dedup_settings(args) -> DedupSettings:
    return DedupSettings(embeddings=args.embeddings, output=args.output, threshold=args.threshold, k=args.k,
                         exact_below=args.exact_below, memory_gb=args.memory_gb, parts=args.parts,
                         nprobe=args.nprobe)

