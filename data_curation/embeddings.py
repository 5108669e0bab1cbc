"""Embeddings on disk: float16 shards (`shard_00000.npy`, ...) with the matching image paths, and a manifest.

A folder of embeddings holds `manifest.json` ({"dim", "shards": [{"file", "rows"}], "complete"}), the shards,
and `paths.txt` (one path per row, in shard order). Readers stream shard by shard; invalid rows (NaN, inf or
zero vectors) are reported and left out by `valid_mask`.
"""

import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from distill.errors import InputError

MANIFEST = "manifest.json"


class EmbeddingStore:
    def __init__(self, folder) -> None:
        self.folder = Path(folder)

    # ------------------------------------------------------------------ writing

    def manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():
            return {"dim": None, "shards": [], "complete": False}
        return json.loads(path.read_text())

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
