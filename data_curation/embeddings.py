"""Embeddings on disk: float16 shards (`shard_00000.npy`, ...), the image path of every row, and a manifest.

A folder of embeddings holds `manifest.json`, the shards, and beside each shard the paths of its rows
(`shard_00000.paths.txt`, a file list of `distill.data.filelists`). The manifest is the commit point: it names
{"dim", "shards": [{"file", "rows", "paths"}], "complete", "source"}, and a shard and its paths count only once
the manifest names them, so a crash anywhere leaves the rows and their names as they were after the last whole
shard. `source` records what made the embeddings (model file, backbone, data, view settings); a resume that
differs is refused. Stores written before the paths files existed keep one `paths.txt` of raw lines for all
rows; they are read as before. Every shard is checked against the manifest where it is opened. Readers stream
shard by shard; invalid rows (NaN, inf or zero vectors) are reported and left out by `valid_mask`.
"""

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from distill.data.filelists import HEADER, ENCODING, read_paths, readable_name, write_file_list
from distill.errors import InputError
from distill.files import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = 2  # 1 (no "format" key): one paths.txt of raw lines; 2: one paths file per shard
LEGACY_PATHS = "paths.txt"
UNREADABLE = "unreadable.txt"
# the files a store writes, and so the only ones --overwrite removes (temporary ones included)
_OWN_FILE = re.compile(r"^\.?(manifest\.json(\.tmp)?|paths\.txt|unreadable\.txt|shard_\d{5,}\.(npy|paths\.txt)"
                       r"|shard_\d{5,}\.npy\.tmp\.npy|whitening\.npz)(\.\d+\.tmp)?$")
WHITENING = "whitening.npz"  # the whitening of a store embedded with --descriptor copy --whiten-on
logger = logging.getLogger(__name__)


def read_listing(path) -> List[str]:
    """The paths of a list distill-curate wrote: with the file-list header, read as a file list; without it (written
    before lists had one), one raw path per line, spaces and commas included."""
    path = Path(path)
    with open(path, **ENCODING) as handle:
        lines = handle.read().split("\n")
    if lines and lines[0].rstrip("\r") == HEADER:
        return read_paths(path)
    return [line for line in lines if line]


def load_array(path, what: str, fix: str, mmap: bool = False) -> np.ndarray:
    """A numeric array from a .npy file the package did not just make: anything else (a damaged or truncated file,
    pickled objects, an .npz archive, strings) is an InputError naming the file, the cause and `fix`."""
    name = readable_name(str(path))
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} {name} does not exist: {fix}") from None
    except (ValueError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{what} {name} is not a readable .npy array ({reason}): {fix}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputError(f"{what} {name} is an .npz archive, not one .npy array: {fix}")
    if array.dtype.kind not in "fiu":
        raise InputError(f"{what} {name} holds {array.dtype} values, not numbers: {fix}")
    return array


def file_digest(path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (the identity of a model or an .npy file in a store's record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync(path: Path) -> None:
    """Flush a file to the disk before the manifest names it (its rename survives a crash of the machine too)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# what each entry of a store's record is called in a message, in the order differences are reported
_RECORD_NAMES = {
    "kind": "input", "data": "--data", "split": "--split", "npy": "--npy file", "rows": "rows of --npy",
    "images": "images in --data", "limit": "--limit", "parts": "--parts", "model": "model",
    "backbone": "backbone", "network": "network (--set, --checkpoint-key)", "view": "view (image size, mean, std)", "flip_average": "--flip-average",
    "precision": "precision", "descriptor": "descriptor (--descriptor, --gem-p, --scales, --whiten-on, --whiten-dim)",
}
_IDENTITY_ONLY = {"checkpoint", "npy_path"}  # where the file was: told in messages, not compared


def _shown(record: Dict[str, Any], key: str) -> str:
    value = record.get(key)
    if key == "model" and isinstance(value, dict):
        if value.get("sha256"):
            return f"{readable_name(value.get('checkpoint', '?'))} (sha256 {value['sha256'][:12]})"
        return f"random weights (seed {value.get('seed')})"
    if key == "npy":
        return f"{readable_name(record.get('npy_path', '?'))} (sha256 {str(value)[:12]})"
    if key == "descriptor" and value is None:
        return "cls (the class token)"
    if isinstance(value, str):
        return readable_name(value)
    return json.dumps(value)


LEGACY_RECORD = "an earlier distill-curate, which did not record the model and data it embedded"


def differing_setting(old: Dict[str, Any], new: Dict[str, Any], ignore: Sequence[str] = ()) -> Optional[str]:
    """The first entry in which two records of what made a store differ; None when they agree."""
    keys = [k for k in _RECORD_NAMES if k in old or k in new] + sorted((set(old) | set(new)) - set(_RECORD_NAMES))
    for key in keys:
        if key in ignore or key in _IDENTITY_ONLY:
            continue
        if key == "model" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            if {k: v for k, v in old[key].items() if k not in _IDENTITY_ONLY} != \
                    {k: v for k, v in new[key].items() if k not in _IDENTITY_ONLY}:
                return key
        elif old.get(key) != new.get(key):
            return key
    return None


def record_difference(old: Optional[Dict[str, Any]], new: Dict[str, Any],
                      ignore: Sequence[str] = ()) -> Optional[str]:
    """How a store was made where it differs from `new`, as words to follow "made with"; None when they agree."""
    if old is None:
        return LEGACY_RECORD
    key = differing_setting(old, new, ignore)
    if key is None:
        return None
    return f"{_RECORD_NAMES.get(key, key)} {_shown(old, key)}, not {_shown(new, key)}"


def same_space(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], a_name: str, b_name: str) -> None:
    """Refuse to compare embeddings of two stores made by different models (their similarities mean nothing);
    stores that do not record a model (precomputed --npy, earlier versions) are not checked."""
    if not (a and b and a.get("kind") == b.get("kind") == "images"):
        return
    identity = ("model", "backbone", "network", "view")
    key = differing_setting({k: a.get(k) for k in identity}, {k: b.get(k) for k in identity})
    if not key and a.get("descriptor") != b.get("descriptor"):  # the class token, or copy descriptors (embed.py)
        raise InputError(f"{readable_name(a_name)} and {readable_name(b_name)} hold different descriptors "
                         f"({_shown(a, 'descriptor')} and {_shown(b, 'descriptor')}): embed both with the same "
                         "--descriptor, --gem-p and --scales, and whiten both with the same whitening (--whiten-on "
                         "the other store's whitening.npz)")
    if key:
        raise InputError(f"{readable_name(a_name)} and {readable_name(b_name)} hold embeddings of different models "
                         f"({_RECORD_NAMES[key]} {_shown(a, key)} and {_shown(b, key)}): embed both with the same "
                         "checkpoint and view")


class EmbeddingStore:
    def __init__(self, folder) -> None:
        self.folder = Path(folder)

    # ------------------------------------------------------------------ the manifest

    def manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():
            parts = self.parts()
            if parts:  # the parts of a job array, read as one store
                return self._combined(parts)
            return {"dim": None, "shards": [], "complete": False}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise InputError(f"{readable_name(str(path))} is not a manifest distill-curate wrote ({error}): embed into "
                             "a new folder, or rerun `distill-curate embed` with --overwrite") from None
        _check_manifest(manifest, path)
        return manifest

    @property
    def source(self) -> Optional[Dict[str, Any]]:
        """What made the embeddings (see embed.py), or None for a store that does not say."""
        return self.manifest().get("source")

    def parts(self) -> List["EmbeddingStore"]:
        """The stores a job array wrote into part_NNNN sub-folders, in order."""
        if not self.folder.is_dir():
            return []
        return [EmbeddingStore(p) for p in sorted(self.folder.glob("part_*")) if (p / MANIFEST).is_file()]

    def _combined(self, parts: List["EmbeddingStore"]) -> dict:
        manifests = [p.manifest() for p in parts]
        dims = {m["dim"] for m in manifests if m["dim"] is not None}
        if len(dims) > 1:
            raise InputError(f"the parts in {readable_name(str(self.folder))} hold embeddings of different "
                             f"dimensions {sorted(dims)}")
        sources = [m.get("source") for m in manifests]
        complete = all(m["complete"] for m in manifests)
        if any(s is not None for s in sources):
            for part, source in zip(parts, sources):
                if source is None:
                    raise InputError(f"{readable_name(str(part.folder))} was embedded by {LEGACY_RECORD}, the other "
                                     "parts by this one: embed that part again (with --overwrite)")
            first = sources[0]
            for part, source in zip(parts[1:], sources[1:]):
                difference = record_difference(first, source, ignore=("part",))
                if difference:
                    raise InputError(f"{readable_name(str(part.folder))} was embedded with other settings than "
                                     f"{parts[0].folder.name} ({difference}): embed that part again with the "
                                     "settings of the others (with --overwrite)")
            count = first.get("parts")
            numbers = [s.get("part") for s in sources]
            for part, number in zip(parts, numbers):
                if count and (not isinstance(number, int) or not 0 <= number < count
                              or part.folder.name != f"part_{number:04d}"):
                    raise InputError(f"{readable_name(str(part.folder))} is not one of the {count} parts of the job "
                                     f"array of its siblings (it records part {number}): remove it, or embed it "
                                     "again with --overwrite")
            if count and len(set(numbers)) < count:
                missing = sorted(set(range(count)) - set(numbers))
                logger.warning("%s: parts %s of %d are missing", readable_name(str(self.folder)),
                               ", ".join(f"part_{n:04d}" for n in missing), count)
                complete = False
        shards = [{**s, "file": f"{p.folder.name}/{s['file']}",
                   **({"paths": f"{p.folder.name}/{s['paths']}"} if "paths" in s else {})}
                  for p, m in zip(parts, manifests) for s in m["shards"]]
        return {"dim": dims.pop() if dims else None, "shards": shards, "complete": complete,
                "source": sources[0] if sources else None}

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))

    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.manifest()["shards"])

    # ------------------------------------------------------------------ writing

    def _refuse_parts(self) -> None:
        if not (self.folder / MANIFEST).is_file() and self.parts():
            raise InputError(f"{readable_name(str(self.folder))} holds the parts of a job array (part_*): write to "
                             "another folder, or rerun with --overwrite to start it again")

    def begin(self, source: Dict[str, Any], overwrite: bool = False, extend: Sequence[str] = (),
              names: Optional[Sequence[str]] = None) -> int:
        """Start writing embeddings made as `source` says, or resume: returns the rows already there. A store
        made otherwise is refused (naming the difference), unless `overwrite` (the store's files are removed
        first). Entries in `extend` may differ (e.g. --limit: a larger one continues the same images). With
        `names`, the rows already there must carry the first of them (else the data changed)."""
        if overwrite:
            self.clear()
        self._refuse_parts()
        manifest = self.manifest()
        done = sum(s["rows"] for s in manifest["shards"])
        where = readable_name(str(self.folder))
        again = "embed into another folder, or pass --overwrite to start it again"
        if done:  # a store without rows mixes nothing: it takes the new record
            difference = record_difference(manifest.get("source"), json.loads(json.dumps(source)), ignore=extend)
            if difference:
                advice = "its settings cannot be checked" if manifest.get("source") is None else \
                    "resume with the same settings"
                raise InputError(f"{where} holds {done} embeddings made with {difference}: {advice}, {again}")
        for shard in manifest["shards"]:  # a resume builds on them: a damaged one is named now, not a step later
            self.open_shard(shard, manifest["dim"])
        if names is not None and done:
            if done > len(names):
                raise InputError(f"{where} holds {done} embeddings but this run has only {len(names)} images: resume "
                                 f"with the settings it was started with, {again}")
            for row, (was, now) in enumerate(zip(self.paths(), names[:done])):
                if was != now:
                    raise InputError(f"{where} row {row} is {readable_name(was)}, but this run's image {row} is "
                                     f"{readable_name(now)}: the data changed since the store was started; {again}")
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest["source"] = source
        manifest["complete"] = False  # until this run finishes
        manifest.setdefault("format", FORMAT)
        self._write_manifest(manifest)
        return done

    def clear(self) -> None:
        """Remove the store: its own files only (manifest first, so that a crash half-way leaves no store), and
        the part_NNNN stores of a job array with theirs; any other file stays. A paths.txt is the store's own only
        in the first format; beside a later store it is someone else's (a file list, a `cluster` output's)."""
        if not self.folder.is_dir():
            return
        try:
            legacy = "format" not in json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            legacy = False
        for part in self.parts():
            part.clear()
            try:
                part.folder.rmdir()
            except OSError:  # something else is in there: it stays
                pass
        for name in [MANIFEST] + sorted(os.listdir(self.folder)):
            path = self.folder / name
            if name == LEGACY_PATHS and not legacy:
                continue
            if _OWN_FILE.match(name) and (path.is_file() or path.is_symlink()):
                path.unlink()

    def append(self, vectors: np.ndarray, paths: Sequence[str]) -> None:
        """Write one shard and the paths of its rows, then commit both in the manifest (an atomic rename):
        before that rename neither counts, so a resume starts from exactly what the manifest holds."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise InputError(f"embeddings are a 2-D array [images, dim], got shape {vectors.shape}")
        if len(vectors) != len(paths):
            raise InputError(f"{len(vectors)} vectors but {len(paths)} paths")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._refuse_parts()
        manifest = self.manifest()
        dim = int(vectors.shape[1])
        if manifest["dim"] is not None and manifest["dim"] != dim:
            raise InputError(f"embeddings of dimension {dim} do not match the store's {manifest['dim']} in "
                             f"{readable_name(str(self.folder))}: write them to another folder")
        stem = f"shard_{len(manifest['shards']):05d}"
        tmp = self.folder / f"{stem}.npy.tmp.npy"
        np.save(tmp, np.asarray(vectors, dtype=np.float16))
        _sync(tmp)
        tmp.replace(self.folder / f"{stem}.npy")
        listing = write_file_list(self.folder / f"{stem}.paths.txt", [os.fspath(p) for p in paths])
        _sync(listing)
        manifest["dim"] = dim
        manifest.setdefault("format", FORMAT)
        manifest["shards"].append({"file": f"{stem}.npy", "rows": int(len(vectors)), "paths": listing.name})
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
            why = f"its {MANIFEST} lists no shard yet: the embedding stopped before its first" if \
                (self.folder / MANIFEST).is_file() else f"no {MANIFEST}"
            raise InputError(f"no embeddings in {readable_name(str(self.folder))} ({why}): run "
                             "`distill-curate embed` first")
        return dim

    def __len__(self) -> int:
        return self.rows_written()

    def paths(self) -> List[str]:
        """The path of every row, in order: each shard's paths file, checked against the rows the manifest gives
        it (a store of the first format: the first rows of its paths.txt, one raw path a line)."""
        if not (self.folder / MANIFEST).is_file() and self.parts():
            return [p for part in self.parts() for p in part.paths()]
        names: List[str] = []
        legacy: Optional[List[str]] = None
        for shard in self.manifest()["shards"]:
            if "paths" in shard:
                listing = self.folder / shard["paths"]
                if not listing.is_file():
                    raise InputError(f"{readable_name(str(listing))} is missing, but {MANIFEST} names it for "
                                     f"{shard['file']}: embed into a new folder, or rerun with --overwrite")
                found = read_paths(listing)
                if len(found) != shard["rows"]:
                    raise InputError(f"{readable_name(str(listing))} lists {len(found)} paths for the {shard['rows']} "
                                     f"rows of {shard['file']}: the store is damaged; embed into a new folder, or "
                                     "rerun with --overwrite")
                names += found
            else:
                if legacy is None:
                    listing = self.folder / LEGACY_PATHS
                    legacy = read_listing(listing) if listing.is_file() else []
                taken = legacy[: shard["rows"]]
                legacy = legacy[shard["rows"]:]
                names += taken
        return names

    def open_shard(self, shard: dict, dim: Optional[int] = None) -> np.ndarray:
        """The float16 array of one shard (memory-mapped), checked against the manifest: shape, dtype and rows."""
        dim = self.dim if dim is None else dim
        path = self.folder / shard["file"]
        fix = "the store is damaged or its manifest was edited; embed into a new folder, or rerun with --overwrite"
        array = load_array(path, "embedding shard", fix, mmap=True)
        if array.shape != (shard["rows"], dim) or array.dtype != np.float16:
            shape = ", ".join(map(str, array.shape))
            raise InputError(f"embedding shard {readable_name(str(path))} holds {array.dtype} [{shape}] where "
                             f"{MANIFEST} says float16 [{shard['rows']}, {dim}]: {fix}")
        return array

    def shards(self) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 array) per shard, one shard in memory at a time."""
        manifest = self.manifest()
        start = 0
        for shard in manifest["shards"]:
            yield start, np.asarray(self.open_shard(shard, manifest["dim"]), dtype=np.float32)
            start += shard["rows"]

    def load(self, max_bytes: Optional[int] = None) -> np.ndarray:
        """All rows as float32 [N, D]; refuses when they would exceed max_bytes (stream with shards() then)."""
        need = len(self) * self.dim * 4
        if max_bytes is not None and need > max_bytes:
            raise InputError(f"{len(self)} x {self.dim} embeddings need {need / 2**30:.1f} GiB in float32, over the "
                             f"memory budget of {max_bytes / 2**30:.1f} GiB: raise --memory-gb or use a streaming step")
        out = np.empty((len(self), self.dim), dtype=np.float32)  # filled shard by shard: one copy in memory
        for start, array in self.shards():
            out[start : start + len(array)] = array
        return out


def _check_manifest(manifest, path: Path) -> None:
    """A manifest has the fields and types the store relies on, and names only files inside its folder."""
    def bad(why: str) -> InputError:
        return InputError(f"{readable_name(str(path))}: {why}: the manifest was edited or damaged; embed into a new "
                          "folder, or rerun `distill-curate embed` with --overwrite")

    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise bad("no list of shards")
    dim = manifest.get("dim")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise bad(f"dimension {dim!r} is not a positive whole number")
    if manifest["shards"] and dim is None:
        raise bad("shards but no dimension")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
            raise bad(f"shard entry {shard!r} names no file")
        rows = shard.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise bad(f"{shard['file']} has {rows!r} rows")
        for key in ("file", "paths"):
            name = shard.get(key)
            if key in shard and (not isinstance(name, str) or not name or "/" in name or "\\" in name
                                 or name.startswith(".")):
                raise bad(f"{name!r} is not a file of the store's folder")
    manifest.setdefault("complete", False)


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
        self.vectors = np.empty(vectors.shape, dtype=np.float32)
        for start in range(0, len(vectors), batch):  # a batch at a time: no temporary of the whole array
            part = vectors[start : start + batch]
            if not valid_mask(part).all():
                raise InputError("embeddings hold NaN, inf or zero vectors: leave them out first (valid_mask)")
            self.vectors[start : start + batch] = normalize(part)
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

    def slice(self, start: int, stop: int) -> "ArrayRows":
        """Rows start .. stop as they are (a view, not normalised again)."""
        part = ArrayRows.__new__(ArrayRows)
        part.vectors, part.dim, part.batch, part.in_memory = self.vectors[start:stop], self.dim, self.batch, True
        return part


class StoreRows(Rows):
    """Chosen rows of a store, read one shard at a time (memory: one shard, whatever the pool)."""

    def __init__(self, store: EmbeddingStore, rows: np.ndarray, budget_bytes: Optional[float] = None) -> None:
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)
        self.budget_bytes = budget_bytes  # what the steps may hold besides a shard: samples, index codes
        self.dim, self.in_memory = store.dim, False
        self.shard_entries = store.manifest()["shards"]
        self.bounds = np.cumsum([0] + [s["rows"] for s in self.shard_entries])

    def __len__(self) -> int:
        return len(self.rows)

    def _shard_rows(self):
        """(shard number, positions of chosen rows in it, their row numbers inside the shard)."""
        cut = np.searchsorted(self.rows, self.bounds)
        for number in range(len(self.shard_entries)):
            lo, hi = cut[number], cut[number + 1]
            if hi > lo:
                yield number, np.arange(lo, hi), self.rows[lo:hi] - self.bounds[number]

    def batches(self) -> Iterator[Tuple[int, np.ndarray]]:
        for number, positions, inside in self._shard_rows():
            shard = self.store.open_shard(self.shard_entries[number], self.dim)
            yield int(positions[0]), normalize(np.asarray(shard[inside], dtype=np.float32))

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        rows = self.rows[positions]
        shard_of = np.searchsorted(self.bounds, rows, side="right") - 1
        for number in np.unique(shard_of):
            where = np.flatnonzero(shard_of == number)
            shard = self.store.open_shard(self.shard_entries[number], self.dim)
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
    name = readable_name(str(folder))
    if len(paths) != len(store):
        raise InputError(f"{name}: paths.txt lists {len(paths)} paths for {len(store)} embeddings; re-run "
                         "`distill-curate embed` into a new folder")
    if not store.manifest()["complete"]:
        logger.warning("%s is not complete (%d embeddings so far): rerun `distill-curate embed` to finish it; "
                       "using what is there", name, len(store))
    budget = memory_gb * 2**30
    # a store that fits is read once; a larger one is scanned here and streamed by the steps
    loaded = store.load() if len(paths) * dim * 4 <= budget else None
    valid = valid_mask(loaded) if loaded is not None else np.concatenate([valid_mask(a) for _, a in store.shards()])
    rows = usable_rows(paths, valid, keep, name)
    chosen = [paths[i] for i in rows]
    return rows_in_memory_or_streamed(store, rows, memory_gb, loaded), chosen


def usable_rows(paths: Sequence[str], valid: np.ndarray, keep: Optional[Sequence[str]], name: str) -> np.ndarray:
    """The rows `select` uses, given which hold valid vectors: NaN / inf / zero rows and repeated paths are
    reported and left out, and with `keep` only those paths stay."""
    valid = valid.copy()
    if not valid.all():
        bad = [readable_name(paths[i]) for i in np.flatnonzero(~valid)[:5]]
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
    usable = int(valid.sum())
    if keep is not None:
        wanted = set(keep)
        valid &= np.fromiter((p in wanted for p in paths), dtype=bool, count=len(paths))
    rows = np.flatnonzero(valid)
    if len(rows) == 0 and keep is not None and not wanted:
        raise InputError(f"the --keep list is empty: nothing of {name} is selected")
    if len(rows) == 0 and keep is not None and usable:
        raise InputError(f"none of the {len(wanted)} paths of --keep is among the {usable} usable embeddings of "
                         f"{name}: give the kept.txt that `distill-curate dedup` wrote from this store")
    if len(rows) == 0:
        raise InputError(f"no usable embeddings in {name}")
    return rows


def rows_in_memory_or_streamed(store: EmbeddingStore, rows: np.ndarray, memory_gb: float,
                               loaded: Optional[np.ndarray] = None, first_row: int = 0,
                               total: Optional[int] = None) -> Rows:
    """Chosen rows of a store (row numbers, sorted) as `select` holds them: taken from `loaded` (the float32 rows
    first_row .. of the store, read whole because the store fits in memory_gb), read into memory when the chosen
    rows of the whole selection (`total` of them; default: these) fit, streamed shard by shard otherwise."""
    total = len(rows) if total is None else total
    budget = memory_gb * 2**30
    need = total * store.dim * 4
    if loaded is not None:
        return ArrayRows(loaded if len(rows) == len(loaded) else loaded[rows - first_row])
    if need <= budget:
        return ArrayRows(StoreRows(store, rows).take(np.arange(len(rows))))
    logger.info("%d x %d embeddings need %.1f GiB in float32, over --memory-gb %.1f: streaming them shard by shard",
                total, store.dim, need / 2**30, memory_gb)
    return StoreRows(store, rows, budget)


def keep_forms(listing) -> List[List[str]]:
    """The names of a --keep list, each with the forms it may have in a store: as written, and a relative one
    also taken from the list's folder (as the trainer reads it)."""
    folder = os.path.dirname(os.path.abspath(listing))
    forms = []
    for name in read_paths(listing):
        forms.append([name] if os.path.isabs(name) or name.startswith("fashion_mnist/") else
                     [name, os.path.join(folder, name)])
    return forms


def report_missing_kept(forms: List[List[str]], paths: Sequence[str], listing, folder) -> None:
    """Warn about names of a --keep list that are not among the usable rows (paths) of a store."""
    found = set(paths)
    missing = sum(1 for names in forms if not any(name in found for name in names))
    if missing:
        logger.warning("%d of the %d paths of --keep %s are not among the usable embeddings of %s", missing,
                       len(forms), readable_name(str(listing)), readable_name(str(folder)))


def contiguous_runs(count: int, parts: int) -> List[Tuple[int, int]]:
    """(first, stop) of each of `parts` contiguous runs of range(count), as even in length as they can be."""
    return [((count * p) // parts, (count * (p + 1)) // parts) for p in range(parts)]


def sample_cap(rows: Rows, wanted: int, share: float = 0.5) -> int:
    """How many float32 rows a step may gather at once: `wanted`, or fewer when that exceeds `share` of the
    memory budget of streamed rows."""
    budget = getattr(rows, "budget_bytes", None)
    return wanted if budget is None else max(1, min(wanted, int(budget * share // (rows.dim * 4))))


def as_rows(data) -> Rows:
    return data if isinstance(data, Rows) else ArrayRows(data)


def valid_mask(vectors: np.ndarray, batch: int = 65_536) -> np.ndarray:
    """True for rows that are finite and not all zero (a batch of rows at a time)."""
    out = np.empty(len(vectors), dtype=bool)
    for start in range(0, len(vectors), batch):
        part = vectors[start : start + batch]
        finite = np.isfinite(part)
        out[start : start + batch] = finite.all(axis=1) & (np.abs(np.where(finite, part, 0)).sum(axis=1) > 0)
    return out


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def from_npy(path, paths: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """Precomputed embeddings [N, D] from a .npy file (memory-mapped), checked: numbers, two dimensions, and
    usable rows (all NaN / inf / zero is refused, some are reported); paths default to row numbers."""
    name = readable_name(str(path))
    array = load_array(path, "--npy", "give a .npy file of one numeric array [images, dim]", mmap=True)
    if array.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array [images, dim], got shape {array.shape}")
    if array.shape[1] == 0:
        raise InputError(f"{name}: embeddings of dimension 0 (shape {array.shape}): give vectors [images, dim]")
    names = list(paths) if paths is not None else [str(i) for i in range(len(array))]
    if len(names) != len(array):
        raise InputError(f"{name} has {len(array)} rows but {len(names)} paths were given")
    if len(array) and array.shape[1]:
        usable = sum(int(valid_mask(np.asarray(array[start : start + 65_536], dtype=np.float32)).sum())
                     for start in range(0, len(array), 65_536))
        if usable == 0:
            raise InputError(f"{name}: none of its {len(array)} rows is a usable embedding (every one holds NaN or "
                             "inf, or is all zero): compute the embeddings again")
        if usable < len(array):
            logger.warning("%s: %d of %d rows hold NaN or inf or are all zero; they are stored and left out by the "
                           "next steps", name, len(array) - usable, len(array))
    return array, names
