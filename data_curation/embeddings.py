"""Embeddings on disk: float16 shards (`shard_00000.npy`, ...) with the matching image paths, and a manifest.

A folder of embeddings holds `manifest.json` ({"dim", "shards": [{"file", "rows"}], "complete"}), the shards,
and `paths.txt` (one path per row, in shard order). Readers stream shard by shard; invalid rows (NaN, inf or
zero vectors) are reported and left out by `valid_mask`.
"""

import json
from pathlib import Path
import logging
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from distill.errors import InputError

MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


class EmbeddingStore:
    def __init__(self, folder) -> None:
        self.folder = Path(folder)

    # ------------------------------------------------------------------ writing

    def manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():
            parts = self.parts()
            if parts:  # the parts of a job array, read as one store
                return self._combined(parts)
            return {"dim": None, "shards": [], "complete": False}
        return json.loads(path.read_text())

    def parts(self) -> List["EmbeddingStore"]:
        """The stores a job array wrote into part_NNNN sub-folders, in order."""
        if not self.folder.is_dir():
            return []
        return [EmbeddingStore(p) for p in sorted(self.folder.glob("part_*")) if (p / MANIFEST).is_file()]

    def _combined(self, parts: List["EmbeddingStore"]) -> dict:
        manifests = [p.manifest() for p in parts]
        dims = {m["dim"] for m in manifests if m["dim"] is not None}
        if len(dims) > 1:
            raise InputError(f"the parts in {self.folder} hold embeddings of different dimensions {sorted(dims)}")
        shards = [{"file": f"{p.folder.name}/{s['file']}", "rows": s["rows"]} for p, m in zip(parts, manifests)
                  for s in m["shards"]]
        return {"dim": dims.pop() if dims else None, "shards": shards,
                "complete": all(m["complete"] for m in manifests)}

    def _write_manifest(self, manifest: dict) -> None:
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.folder / MANIFEST)

    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.manifest()["shards"])

    def append(self, vectors: np.ndarray, paths: Sequence[str]) -> None:
        """Write one shard (atomically: the manifest names it only once it is complete on disk)."""
        if len(vectors) != len(paths):
            raise InputError(f"{len(vectors)} vectors but {len(paths)} paths")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / MANIFEST).is_file() and self.parts():
            raise InputError(f"{self.folder} holds the parts of a job array (part_*): write to another folder")
        manifest = self.manifest()
        dim = int(vectors.shape[1])
        if manifest["dim"] is not None and manifest["dim"] != dim:
            raise InputError(f"embeddings of dimension {dim} do not match the store's {manifest['dim']} in "
                             f"{self.folder}: write them to another folder")
        name = f"shard_{len(manifest['shards']):05d}.npy"
        tmp = self.folder / (name + ".tmp.npy")
        np.save(tmp, np.asarray(vectors, dtype=np.float16))
        tmp.replace(self.folder / name)
        with open(self.folder / "paths.txt", "a") as handle:
            handle.writelines(f"{p}\n" for p in paths)
        manifest["dim"] = dim
        manifest["shards"].append({"file": name, "rows": int(len(vectors))})
        self._write_manifest(manifest)

    def finish(self) -> None:
        manifest = self.manifest()
        manifest["complete"] = True
        self._write_manifest(manifest)

    # ------------------------------------------------------------------ reading

    @property
    def dim(self) -> int:
        dim = self.manifest()["dim"]
        if dim is None:
            raise InputError(f"no embeddings in {self.folder} (no {MANIFEST}): run `distill-curate embed` first")
        return dim

    def __len__(self) -> int:
        return self.rows_written()

    def paths(self) -> List[str]:
        if not (self.folder / MANIFEST).is_file() and self.parts():
            return [p for part in self.parts() for p in part.paths()]
        path = self.folder / "paths.txt"
        lines = path.read_text().splitlines() if path.is_file() else []
        return lines[: len(self)]

    def shards(self) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 array) per shard, one shard in memory at a time."""
        start = 0
        for shard in self.manifest()["shards"]:
            array = np.load(self.folder / shard["file"], mmap_mode="r")
            yield start, np.asarray(array, dtype=np.float32)
            start += shard["rows"]

    def load(self, max_bytes: Optional[int] = None) -> np.ndarray:
        """All rows as float32 [N, D]; refuses when they would exceed max_bytes (stream with shards() then)."""
        need = len(self) * self.dim * 4
        if max_bytes is not None and need > max_bytes:
            raise InputError(f"{len(self)} x {self.dim} embeddings need {need / 2**30:.1f} GiB in float32, over the "
                             f"memory budget of {max_bytes / 2**30:.1f} GiB: raise --memory-gb or use a streaming step")
        return np.concatenate([array for _, array in self.shards()]) if len(self) else np.zeros((0, self.dim), np.float32)


class Rows:
    """Rows of embeddings, float32 and L2-normalised, read in batches: every algorithm of the package takes these,
    so one code path serves a pool held in memory and one streamed from disk shard by shard."""

    dim: int
    in_memory: bool

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self) -> Iterator[Tuple[int, np.ndarray]]:
        """(position of the first row, rows) in order."""
        raise NotImplementedError

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at these positions (any order), as one array."""
        raise NotImplementedError

    def subset(self, positions: np.ndarray) -> "Rows":
        """The rows at these positions, as Rows of the same kind."""
        raise NotImplementedError


class ArrayRows(Rows):
    budget_bytes = None

    def __init__(self, vectors: np.ndarray, batch: int = 65_536) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise InputError(f"embeddings are a 2-D array [images, dim], got shape {vectors.shape}")
        if not valid_mask(vectors).all():
            raise InputError("embeddings hold NaN, inf or zero vectors: leave them out first (valid_mask)")
        self.vectors = np.ascontiguousarray(normalize(vectors))
        self.dim, self.batch, self.in_memory = vectors.shape[1], batch, True

    def __len__(self) -> int:
        return len(self.vectors)

    def batches(self) -> Iterator[Tuple[int, np.ndarray]]:
        for start in range(0, len(self.vectors), self.batch):
            yield start, self.vectors[start : start + self.batch]

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(positions, dtype=np.int64)]

    def subset(self, positions: np.ndarray) -> Rows:
        return ArrayRows(self.take(positions), self.batch)


class StoreRows(Rows):
    """Chosen rows of a store, read one shard at a time (memory: one shard, whatever the pool)."""

    def __init__(self, store: EmbeddingStore, rows: np.ndarray, budget_bytes: Optional[float] = None) -> None:
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)
        self.budget_bytes = budget_bytes  # what the steps may hold besides a shard: samples, index codes
        self.dim, self.in_memory = store.dim, False
        shards = store.manifest()["shards"]
        self.files = [store.folder / s["file"] for s in shards]
        self.bounds = np.cumsum([0] + [s["rows"] for s in shards])

    def __len__(self) -> int:
        return len(self.rows)

    def _shard_rows(self):
        """(shard number, positions of chosen rows in it, their row numbers inside the shard)."""
        cut = np.searchsorted(self.rows, self.bounds)
        for number in range(len(self.files)):
            lo, hi = cut[number], cut[number + 1]
            if hi > lo:
                yield number, np.arange(lo, hi), self.rows[lo:hi] - self.bounds[number]

    def batches(self) -> Iterator[Tuple[int, np.ndarray]]:
        for number, positions, inside in self._shard_rows():
            shard = np.load(self.files[number], mmap_mode="r")
            yield int(positions[0]), normalize(np.asarray(shard[inside], dtype=np.float32))

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        rows = self.rows[positions]
        shard_of = np.searchsorted(self.bounds, rows, side="right") - 1
        for number in np.unique(shard_of):
            where = np.flatnonzero(shard_of == number)
            shard = np.load(self.files[number], mmap_mode="r")
            inside = rows[where] - self.bounds[number]
            order = np.argsort(inside)
            out[where[order]] = shard[inside[order]]
        return normalize(out)

    def subset(self, positions: np.ndarray) -> Rows:
        return StoreRows(self.store, self.rows[np.sort(np.asarray(positions, dtype=np.int64))], self.budget_bytes)


def select(folder, memory_gb: float, keep: Optional[Sequence[str]] = None) -> Tuple[Rows, List[str]]:
    """The usable rows of a store and their paths: NaN / inf / zero rows and repeated paths are reported and left
    out, and with `keep` only those paths stay. Held in memory when they fit in memory_gb as float32, streamed
    shard by shard otherwise."""
    store = EmbeddingStore(folder)
    dim, paths = store.dim, store.paths()
    if len(paths) != len(store):
        raise InputError(f"{folder}: paths.txt lists {len(paths)} paths for {len(store)} embeddings; re-run "
                         "`distill-curate embed` into a new folder")
    budget = memory_gb * 2**30
    # a store that fits is read once; a larger one is scanned here and streamed by the steps
    loaded = store.load() if len(paths) * dim * 4 <= budget else None
    valid = valid_mask(loaded) if loaded is not None else np.concatenate([valid_mask(a) for _, a in store.shards()])
    if not valid.all():
        bad = [paths[i] for i in np.flatnonzero(~valid)[:5]]
        logger.warning("left out %d NaN / inf / zero embeddings (unreadable images or broken vectors; e.g. %s)",
                       int((~valid).sum()), ", ".join(bad))
    seen: set = set()
    unique = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        unique[i] = p not in seen
        seen.add(p)
    if not unique.all():
        logger.warning("left out %d rows whose path appears twice (the first is kept)", int((~unique).sum()))
    valid &= unique
    if keep is not None:
        wanted = set(keep)
        valid &= np.fromiter((p in wanted for p in paths), dtype=bool, count=len(paths))
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        raise InputError(f"no usable embeddings in {folder}")
    chosen = [paths[i] for i in rows]
    need = len(rows) * dim * 4
    if loaded is not None:
        return ArrayRows(loaded if len(rows) == len(loaded) else loaded[rows]), chosen
    if need <= budget:
        return ArrayRows(StoreRows(store, rows).take(np.arange(len(rows)))), chosen
    logger.info("%d x %d embeddings need %.1f GiB in float32, over --memory-gb %.1f: streaming them shard by shard",
                len(rows), dim, need / 2**30, memory_gb)
    return StoreRows(store, rows, budget), chosen


def sample_cap(rows: Rows, wanted: int, share: float = 0.5) -> int:
    """How many float32 rows a step may gather at once: `wanted`, or fewer when that exceeds `share` of the
    memory budget of streamed rows."""
    budget = getattr(rows, "budget_bytes", None)
    return wanted if budget is None else max(1, min(wanted, int(budget * share // (rows.dim * 4))))


def as_rows(data) -> Rows:
    return data if isinstance(data, Rows) else ArrayRows(data)


def valid_mask(vectors: np.ndarray) -> np.ndarray:
    """True for rows that are finite and not all zero."""
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(np.where(np.isfinite(vectors), vectors, 0)).sum(axis=1) > 0
    return finite & nonzero


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def from_npy(path, paths: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """Precomputed embeddings [N, D] from a .npy file; paths default to row numbers."""
    array = np.load(path)
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2-D array [images, dim], got shape {array.shape}")
    names = list(paths) if paths is not None else [str(i) for i in range(len(array))]
    if len(names) != len(array):
        raise InputError(f"{path} has {len(array)} rows but {len(names)} paths were given")
    return array, names
