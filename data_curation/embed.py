"""Images -> L2-normalised float16 embedding shards, resumable: shards already on disk are not recomputed.

A store records what made it (the model file's sha256 or the random weights' seed, the backbone, the data and
its image count, the view and precision; for --npy the file's sha256; the descriptor); a resume with other settings
is refused, and --overwrite starts the store again.

--descriptor copy stores DINO's copy-detection descriptor (distill.eval.descriptors) instead of the class token:
[class token, GeM of the patch tokens], averaged over --scales, and with --whiten-on PCA-whitened (the whitening,
learned on a store of unwhitened copy descriptors, on the store itself, or taken from a whitening.npz, is written
beside the shards as whitening.npz and named in the record by what it was learned on)."""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from data_curation.embeddings import (UNREADABLE, WHITENING, EmbeddingStore, file_digest, from_npy, normalize,
                                      read_listing, record_difference, same_space, valid_mask)
from distill.data.configs import DatasetConfig
from distill.data.datasets import ArrayImages, build_image_source, slice_source
from distill.data.filelists import read_paths, readable_name, write_file_list
from distill.data.configs import default_normalisation
from distill.data.eval_views import EvalView
from distill.data.fashion_mnist import fashion_mnist_path, parse_fashion_mnist_path
from distill.errors import InputError, NoReadableImage
from distill.progress import progress

logger = logging.getLogger(__name__)
RANDOM_WEIGHTS_SEED = 0  # --backbone without a checkpoint: the same random network on every run (and resume)
DESCRIPTORS = ("cls", "copy")
UNWHITENED = "unwhitened"  # --whiten-on self: the store of unwhitened descriptors the whitening is learned on


def _source(data: str, split: Optional[str], limit: int):
    if data == "fashion_mnist":
        config = DatasetConfig(kind="fashion_mnist", split=split or "train", limit=limit)
    else:
        if data.lower().endswith((".npy", ".npz")):
            raise InputError(f"--data {readable_name(data)} holds arrays: precomputed embeddings go with --npy (--data "
                             "is then the file list naming their rows, or empty)")
        config = DatasetConfig(kind="auto", path=data, split=split or "train", limit=limit)
    config.validate()
    return build_image_source(config, option="--data")


def _absolute(path: str, folder: Optional[str] = None) -> str:
    """A path as the store keeps it: absolute (relative ones taken from `folder`, else the working folder), so that
    a selection written anywhere names the same file; not normalised (`..` after a link means what the system
    says). Fashion-MNIST names stay as they are."""
    if os.path.isabs(path) or parse_fashion_mnist_path(path):
        return path
    return os.path.join(os.path.abspath(folder) if folder is not None else os.getcwd(), path)


def _data_id(data: Optional[str]) -> Optional[str]:
    """The data a store was made of, in its record: the file or folder itself (`imgs/`, `./imgs` and a link to it
    are the same data)."""
    return data if data in (None, "", "fashion_mnist") else os.path.realpath(os.path.expanduser(data))


def _names(source, data: str, split: Optional[str]) -> List[str]:
    """The path each image goes by in the store (and in every selection written from it)."""
    if not isinstance(source, ArrayImages):
        return [_absolute(p) for p in source.paths]
    if data == "fashion_mnist":
        return [fashion_mnist_path(split or "train", i) for i in range(len(source.images))]
    return read_paths(data)[: len(source.images)]


def _list_names(listing: str) -> List[str]:
    """The names of a file list's entries, relative ones taken from the list's folder (as the trainer reads it)."""
    folder = os.path.dirname(os.path.expanduser(listing)) or "."
    return [_absolute(name, folder) for name in read_paths(os.path.expanduser(listing))]


def _embed_shard(model, source, view, batch_size: int, device: str, flip_average: bool, precision: str = "auto",
                 workers: int = 0, describe=None, width: Optional[int] = None):
    """(L2-normalised features [n, D], positions of images that could not be read: their rows are zero).
    describe(images) gives the features (default: the model's output, the class token) of `width` dimensions."""
    from distill.eval.features import extract_source_features

    normalize = torch.nn.functional.normalize
    describe = model if describe is None else describe

    def encode(images: torch.Tensor) -> torch.Tensor:
        out = normalize(describe(images).float(), dim=1)
        if flip_average:  # invariant to mirroring: copies are often flipped
            out = normalize(out + normalize(describe(images.flip(-1)).float(), dim=1), dim=1)
        return out

    try:
        features, _, used = extract_source_features(encode, source, view, batch_size, precision, device, workers,
                                                    desc="shard", with_indices=True)
    except NoReadableImage:  # not one readable image in the shard: every row stays zero
        return np.zeros((len(source), width or model.embed_dim), np.float32), list(range(len(source)))
    rows = np.zeros((len(source), features.shape[1]), np.float32)
    rows[used.numpy()] = features.numpy()
    unreadable = sorted(set(range(len(source))) - set(used.tolist()))
    return rows, unreadable


def _check_siblings(root: Path, record: Dict[str, Any], part: int) -> None:
    """The other parts of a job array already written into `root` must have been made the same way."""
    if (root / "manifest.json").is_file():
        raise InputError(f"{readable_name(str(root))} holds a store of its own: write the parts of a job array to "
                         "another folder, or pass --overwrite to start it again")
    for sibling in EmbeddingStore(root).parts():
        if sibling.folder.name == f"part_{part:04d}":
            continue
        difference = record_difference(sibling.source, record, ignore=("part",))
        if difference:
            raise InputError(f"{readable_name(str(sibling.folder))} of the same job array was made with {difference}: "
                             "run every part with the same settings, or pass --overwrite (to every part) to start "
                             "them again")


def _part_bounds(total: int, part: int, parts: int):
    return part * total // parts, (part + 1) * total // parts


def _begin(store: EmbeddingStore, record: Dict[str, Any], names: Sequence[str], overwrite: bool, part: int,
           parts: int, extend: Sequence[str] = ()) -> int:
    if parts > 1 and not overwrite:
        _check_siblings(store.folder.parent, record, part)
    return store.begin(record, overwrite=overwrite, extend=extend, names=names)


def _descriptor_record(descriptor: str, gem_p: Optional[float], scales: Optional[Sequence[float]],
                       whiten_on: Optional[str], whiten_dim: Optional[int], npy: Optional[str],
                       parts: int) -> Optional[Dict[str, Any]]:
    """The descriptor entry of a store's record, without the whitening; None for the class token (whose stores,
    as before descriptors existed, carry no entry)."""
    if descriptor not in DESCRIPTORS:
        raise InputError(f"--descriptor {descriptor!r} is not one of {', '.join(DESCRIPTORS)}")
    if descriptor == "cls":
        given = [flag for flag, value in (("--gem-p", gem_p), ("--scales", scales), ("--whiten-on", whiten_on),
                                          ("--whiten-dim", whiten_dim)) if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} go with --descriptor copy: add it, or leave them out")
        return None
    from distill.eval.descriptors import check_scales

    if npy:
        raise InputError("--descriptor copy computes descriptors from images: give --data and a model, not --npy")
    if whiten_dim is not None and not whiten_on:
        raise InputError("--whiten-dim goes with --whiten-on: name the set to learn the whitening on")
    if whiten_on == "self" and parts > 1:
        raise InputError("--whiten-on self would learn a different whitening in each part: embed a sample of the "
                         "pool (say 20,000 images) with --descriptor copy into another folder, and give that folder "
                         "to --whiten-on")
    p = 4.0 if gem_p is None else float(gem_p)
    if not p > 0:
        raise InputError(f"--gem-p is the exponent of the generalized mean, a positive number (4 in DINO), got {p}")
    return {"kind": "copy", "gem_p": p, "scales": list(check_scales((1.0,) if scales is None else scales))}


def _store_identity(store: EmbeddingStore) -> str:
    """What a whitening was learned on, in a record: the sha256 of the learning store's manifest (its shards, rows
    and record), so that a whitening learned again on the same store is the same entry."""
    manifest = json.dumps(store.manifest(), sort_keys=True).encode("utf-8", errors="surrogateescape")
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def _learn_on_store(store: EmbeddingStore, dim: Optional[int], reuse: Optional[Path]):
    """The whitening of a store's usable rows (read one shard at a time); a saved one learned on the same store
    with the same --whiten-dim (`reuse`: a resume) is taken as it is."""
    from distill.eval.descriptors import learn_whitening, load_whitening

    identity = _store_identity(store)
    if reuse is not None and reuse.is_file():
        saved = load_whitening(reuse)
        if saved.record.get("learned_on") == identity and saved.record.get("dim") == dim:
            return saved
    whitening = learn_whitening((rows[valid_mask(rows)] for _, rows in store.shards()), dim)
    if whitening.rows <= len(whitening.mean):
        logger.warning("whitening learned on %d descriptors of dimension %d: only %d directions are known; embed a "
                       "larger learning set (DINO learns on 20,000 images) or give --whiten-dim", whitening.rows,
                       len(whitening.mean), whitening.rows - 1)
    whitening.record = {"learned_on": identity, "dim": dim, "from": _absolute(str(store.folder)),
                        "source": store.source}
    logger.info("whitening learned on %d descriptors of %s: %d dimensions kept", whitening.rows,
                readable_name(str(store.folder)), whitening.dim)
    return whitening


def _check_learning_set(learned: Optional[Dict[str, Any]], record: Dict[str, Any], name: str) -> None:
    """The descriptors a whitening is learned on were made as this run's are: the same model and view, the same
    descriptor settings (unwhitened), the same --flip-average."""
    descriptor = (learned or {}).get("descriptor")
    if not learned or learned.get("kind") != "images" or not isinstance(descriptor, dict) or \
            descriptor.get("whitening"):
        raise InputError(f"--whiten-on {name} does not hold unwhitened copy descriptors of images: embed a learning "
                         "set with --descriptor copy and no --whiten-on, and give its folder (or `self`)")
    same_space({k: v for k, v in learned.items() if k != "descriptor"},
               {k: v for k, v in record.items() if k != "descriptor"}, name, "this run")  # the model and view
    if descriptor != record.get("descriptor") or learned.get("flip_average") != record["flip_average"]:
        raise InputError(f"--whiten-on {name} holds descriptors made with descriptor {json.dumps(descriptor)} and "
                         f"--flip-average {learned.get('flip_average')}, this run makes "
                         f"{json.dumps(record.get('descriptor'))} with --flip-average {record['flip_average']}: "
                         "learn the whitening on descriptors made with the same --gem-p, --scales and --flip-average")


def _whitening(whiten_on: str, record: Dict[str, Any], dim: Optional[int], width: int, reuse: Optional[Path]):
    """The whitening --whiten-on names: learned on a store of unwhitened copy descriptors, or the whitening.npz of
    a whitened store (or the file itself), checked against this run's descriptors."""
    from distill.eval.descriptors import load_whitening

    path = Path(os.path.expanduser(whiten_on))
    name = readable_name(whiten_on)
    if path.is_dir():
        store = EmbeddingStore(path)
        if store.manifest()["dim"] is None:
            raise InputError(f"--whiten-on {name} holds no embeddings: give a store embedded with --descriptor copy "
                             "(and no --whiten-on), the whitening.npz of a whitened store, or `self`")
        descriptor = (store.source or {}).get("descriptor")
        if not (isinstance(descriptor, dict) and descriptor.get("whitening")):
            _check_learning_set(store.source, record, name)
            if store.dim != width:
                raise InputError(f"--whiten-on {name} holds descriptors of dimension {store.dim}, this run makes "
                                 f"{width}: learn the whitening on descriptors of the same model")
            return _learn_on_store(store, dim, reuse)
        found = [p / WHITENING for p in [path] + [part.folder for part in store.parts()] if (p / WHITENING).is_file()]
        if not found:
            raise InputError(f"--whiten-on {name} is a whitened store without its {WHITENING}: give the store it "
                             "was learned on, or embed that store again")
        path = found[0]
    elif not path.is_file():
        raise InputError(f"--whiten-on {name} is neither a store, a {WHITENING} nor `self`: give a store of copy "
                         f"descriptors to learn on, the {WHITENING} of a whitened store, or `self`")
    whitening = load_whitening(path)
    _check_learning_set(whitening.record.get("source"), record, readable_name(str(path)))
    if len(whitening.mean) != width:
        raise InputError(f"{readable_name(str(path))} whitens descriptors of dimension {len(whitening.mean)}, this "
                         f"run makes {width}: use a whitening learned with the same model")
    if dim is not None and dim != whitening.dim:
        raise InputError(f"{readable_name(str(path))} keeps {whitening.dim} dimensions, not --whiten-dim {dim}: "
                         "leave --whiten-dim out, or learn a whitening on a store of unwhitened descriptors")
    return whitening


def _whitening_entry(whitening) -> Dict[str, Any]:
    """The whitening in a store's record: what it was learned on and the dimensions asked for and kept."""
    return {"learned_on": whitening.record.get("learned_on"), "dim": whitening.record.get("dim"),
            "kept": whitening.dim}


def _save_whitening(folder: Path, whitening) -> None:
    from distill.eval.descriptors import save_whitening
    from distill.files import atomic_write

    atomic_write(folder / WHITENING, lambda handle: save_whitening(handle, whitening))


def _whitened(rows: np.ndarray, whitening) -> np.ndarray:
    """Rows whitened and L2-normalised; zero rows (images that could not be read) stay zero."""
    from distill.eval.descriptors import apply_whitening

    out = np.zeros((len(rows), whitening.dim), np.float32)
    good = valid_mask(rows)
    if good.any():
        out[good] = normalize(apply_whitening(rows[good], whitening))
    return out


def _embed_and_whiten_self(output: str, overwrite: bool, whiten_dim: Optional[int], **settings) -> int:
    """--whiten-on self: the unwhitened descriptors into output/unwhitened (resumable like any store), the
    whitening learned on them, then each of their shards whitened into the store."""
    raw_folder = Path(output) / UNWHITENED
    embed_images(output=str(raw_folder), overwrite=overwrite, **settings)
    raw, store = EmbeddingStore(raw_folder), EmbeddingStore(output)
    whitening = _learn_on_store(raw, whiten_dim, None if overwrite else store.folder / WHITENING)
    record = json.loads(json.dumps(raw.source))
    record["descriptor"]["whitening"] = _whitening_entry(whitening)
    names = raw.paths()
    done = store.begin(record, overwrite=overwrite, names=names)
    _save_whitening(store.folder, whitening)
    entries = raw.manifest()["shards"]
    starts = np.cumsum([0] + [entry["rows"] for entry in entries])
    if done not in starts:
        raise InputError(f"{readable_name(output)} holds {done} rows, not whole shards of "
                         f"{readable_name(str(raw_folder))}: rerun with --overwrite")
    for start, entry in zip(starts, entries):
        if start >= done:
            rows = np.asarray(raw.open_shard(entry), dtype=np.float32)
            store.append(_whitened(rows, whitening), names[start : start + len(rows)])
    if (raw_folder / UNREADABLE).is_file():
        write_file_list(store.folder / UNREADABLE, read_listing(raw_folder / UNREADABLE))
    store.finish()
    return len(store)


def embed_images(data: str, output: str, checkpoint: Optional[str] = None, backbone: Optional[str] = None,
                 split: Optional[str] = None, shard_size: int = 50_000, batch_size: int = 256, device: str = "cpu",
                 npy: Optional[str] = None, limit: int = 0, flip_average: bool = False, part: int = 0,
                 parts: int = 1, precision: str = "auto", workers: int = 0, overwrite: bool = False,
                 descriptor: str = "cls", gem_p: Optional[float] = None, scales: Optional[Sequence[float]] = None,
                 whiten_on: Optional[str] = None, whiten_dim: Optional[int] = None,
                 overrides: Optional[Dict[str, Any]] = None, checkpoint_key: Optional[str] = None) -> int:
    """Write the embeddings of every readable image of `data` to `output`; returns the number of rows there.
    overrides (--set) and checkpoint_key choose the network as `distill`'s commands do.

    With parts > 1, only the part-th of `parts` contiguous slices of the images, into output/part_NNNN (one
    task of a job array); the steps after read the folder of parts as one store. A store started with other
    settings is refused; overwrite removes it (its own files only) and starts again.

    descriptor "copy": DINO's copy-detection descriptor (GeM exponent gem_p, default 4, averaged over `scales`),
    whitened when whiten_on names a store of unwhitened copy descriptors, a whitening.npz, or "self"."""
    if shard_size < 1:
        raise InputError("--shard-size must be positive")
    described = _descriptor_record(descriptor, gem_p, scales, whiten_on, whiten_dim, npy, parts)
    if described is not None and whiten_on == "self":
        return _embed_and_whiten_self(
            output, overwrite, whiten_dim, data=data, checkpoint=checkpoint, backbone=backbone, split=split,
            shard_size=shard_size, batch_size=batch_size, device=device, limit=limit, flip_average=flip_average,
            precision=precision, workers=workers, descriptor=descriptor, gem_p=gem_p, scales=scales,
            overrides=overrides, checkpoint_key=checkpoint_key)
    if parts > 1:
        if not 0 <= part < parts:
            raise InputError(f"--part {part} is not one of the {parts} parts (0 to {parts - 1})")
        output = str(Path(output) / f"part_{part:04d}")
    store = EmbeddingStore(output)
    if npy:
        if data not in (None, "", "fashion_mnist") and not os.path.isfile(os.path.expanduser(data)):
            raise InputError(f"with --npy, --data names the rows: a file list, one path a line in the order of the "
                             f"rows (or empty: rows named by number); {readable_name(data)} is not a file")
        names = None if data in (None, "", "fashion_mnist") else _list_names(data)
        vectors, paths = from_npy(npy, names)
        if len(vectors) == 0:
            raise InputError(f"{readable_name(npy)} holds no embeddings (shape {vectors.shape})")
        if not overwrite and len(store) and store.dim != vectors.shape[1]:
            raise InputError(f"{readable_name(npy)} has dimension {vectors.shape[1]} but {readable_name(output)} holds "
                             f"embeddings of dimension {store.dim}: write them to another folder")
        record = {"kind": "npy", "npy": file_digest(npy), "npy_path": _absolute(npy), "rows": int(len(vectors)),
                  "data": _data_id(data), "parts": parts, "part": part}
        first, last = _part_bounds(len(vectors), part, parts)
        vectors, paths = vectors[first:last], paths[first:last]
        done = _begin(store, record, paths, overwrite, part, parts)
        if done % shard_size and done != len(vectors):
            raise InputError(f"{readable_name(output)} holds {done} rows, not a whole number of {shard_size}-row "
                             "shards: embed with the --shard-size it was started with, or into a new folder")
        for start in range(done, len(vectors), shard_size):
            chunk = np.asarray(vectors[start : start + shard_size], dtype=np.float64)  # norms of 1e30 overflow float32
            chunk /= np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)
            store.append(chunk.astype(np.float32), paths[start : start + shard_size])
        store.finish()
        return len(store)
    from distill.eval.loading import load_backbone
    from distill.models import create_backbone
    from distill.precision import resolve_precision

    if not checkpoint and not backbone:
        raise InputError("give --checkpoint (any file distill loads) or --backbone (random weights, for tests)")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device: give cpu, cuda, or cuda:N for one GPU") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: PyTorch sees no CUDA GPU on this machine; embed with --device cpu")
    resolved = resolve_precision(precision, where)
    source = _source(data, split, limit)
    if source.unreadable:
        logger.warning("left out %d unreadable images (e.g. %s)", len(source.unreadable),
                       readable_name(source.unreadable[0]))
    fashion = data == "fashion_mnist" or isinstance(source, ArrayImages)  # also a selection of it
    if checkpoint:
        model, setup = load_backbone(checkpoint, backbone, overrides, checkpoint_key, fashion_mnist=fashion)
        view = EvalView(setup.image_size, setup.mean, setup.std, model.config["in_chans"])
        weights = {"checkpoint": _absolute(checkpoint), "sha256": file_digest(checkpoint),
                   "size": os.path.getsize(checkpoint)}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = create_backbone(backbone, **{"in_chans": 1 if fashion else 3, "img_size": 28 if fashion else 224,
                                                 **(overrides or {})}).eval()
        mean, std = default_normalisation(fashion)
        view = EvalView(model.config["img_size"][0], mean, std, model.config["in_chans"])
        weights = {"weights": "random", "seed": RANDOM_WEIGHTS_SEED}
        logger.warning("no --checkpoint: %s has random weights, so its embeddings carry no learned similarity "
                       "(pass --checkpoint FILE to embed with trained ones)", backbone)
    model = model.to(device)
    names = _names(source, data, split)
    record = {"kind": "images", "data": _data_id(data), "split": split or "train", "images": len(source),
              "limit": limit, "parts": parts, "part": part, "model": weights,
              "backbone": getattr(model, "registry_name", backbone), "view": {**view.describe(),
                                                                             "channels": view.channels},
              "flip_average": bool(flip_average), "precision": resolved}
    if overrides or checkpoint_key:  # recorded only where given: earlier stores' records stay equal
        record["network"] = {"overrides": dict(overrides or {}), "checkpoint_key": checkpoint_key}
    width, describe, whitening = model.embed_dim, None, None
    if described is not None:
        from distill.eval.descriptors import check_patch_tokens, copy_descriptor

        check_patch_tokens(model)  # before the store is begun
        record["descriptor"] = dict(described)
        width = 2 * model.embed_dim

        def describe_copy(images: torch.Tensor) -> torch.Tensor:
            return copy_descriptor(model, images, described["gem_p"], described["scales"])

        describe = describe_copy

        if whiten_on:
            whitening = _whitening(whiten_on, record, whiten_dim, width,
                                   None if overwrite else store.folder / WHITENING)
            record["descriptor"]["whitening"] = _whitening_entry(whitening)
    unreadable_names = [_absolute(p) for p in source.unreadable]
    if parts > 1:
        first, last = _part_bounds(len(source), part, parts)
        source, names = slice_source(source, first, last), names[first:last]
        if part:
            unreadable_names = []  # listed once, by the first part
    previous = None if overwrite else store.manifest().get("source")
    # a larger (or no) --limit continues the same images: the count may grow, the names already there must stay
    extend = ("limit", "images") if parts == 1 and previous and previous.get("limit") != limit else ()
    done = _begin(store, record, names, overwrite, part, parts, extend)
    if whitening is not None:
        _save_whitening(store.folder, whitening)
    if done % shard_size and done != len(source):
        raise InputError(f"{readable_name(output)} holds {done} rows, not a whole number of {shard_size}-image shards: "
                         "embed with the --shard-size it was started with, or into a new folder")
    if done:
        logger.info("resuming: %d of %d images already embedded in %s", done, len(source), readable_name(output))
    unreadable = list(unreadable_names)
    with progress(total=len(source), initial=done, desc="embed", unit="img") as bar:
        for start in range(done, len(source), shard_size):
            end = min(start + shard_size, len(source))
            features, bad = _embed_shard(model, slice_source(source, start, end), view, batch_size, device, flip_average,
                                         resolved, workers, describe=describe, width=width)
            store.append(features if whitening is None else _whitened(features, whitening), names[start:end])
            unreadable += [names[start + i] for i in bad]
            bar.update(end - start)
    if unreadable:
        listing = store.folder / UNREADABLE
        before = read_listing(listing) if listing.is_file() else []
        write_file_list(listing, list(dict.fromkeys(before + unreadable)))
        logger.warning("%d images could not be read (listed in %s; their rows, if any, are zero and left out by "
                       "the next steps)", len(unreadable), readable_name(str(listing)))
    store.finish()
    return len(store)
