"""Keypoint transfer scored by PCK: each source keypoint goes to its grid cell, the cell's nearest cell of the target
(cosine over descriptors) is found, and its centre, mapped back to the target's original pixels, is the prediction.
A prediction is correct at alpha when it lies within alpha * max(bbox height, bbox width) of the true point
(SPair-71k's convention; Min et al. 2019), or alpha * max(image height, image width) when the pair has no target
box; PCK@{0.05, 0.1, 0.15} is the share of correct points, pooled over all pairs (and per category when they have
one). As in SD-DINO's evaluation (Zhang et al. 2023, github.com/Junyi42/sd-dino, pck_spair_pascal.py), without
any refinement of the nearest cell.

Pair lists come in two forms:

1. A JSON file holding a list of pairs::

       [{"source": "a.jpg", "target": "b.jpg",
         "source_points": [[x, y], ...], "target_points": [[x, y], ...],
         "target_bbox": [x1, y1, x2, y2],          # optional
         "category": "cat"}, ...]                   # optional

   Points are (x, y) pixels of the original images, in the same order in both lists. Relative image paths are
   taken from the folder given as the images root, else from the list's own folder.

2. SPair-71k's per-pair annotation files (PairAnnotation/<split>/*.json, each with src_imname, trg_imname,
   src_kps, trg_kps, trg_bndbox and category): a folder of them, or one of them. The images are
   <root>/JPEGImages/<category>/<name>, the root given, or else found above the folder (the SPair-71k folder
   that holds both PairAnnotation/ and JPEGImages/).

A source point outside its image has no cell: it is skipped and counted, and so is a pair whose image cannot be
decoded.
"""

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from distill.data.images import describe_error, load_image
from distill.dense.correspondence import nearest
from distill.dense.kinds import ALPHAS
from distill.dense.sources import FeatureSource, SourceFeatures
from distill.errors import InputError
from distill.progress import progress

SPAIR_KEYS = ("src_imname", "trg_imname", "src_kps", "trg_kps", "category")
LIST_KEYS = ("source", "target", "source_points", "target_points")


@dataclass
class KeypointPair:
    """Two images and corresponding keypoints (x, y) in their original pixels: source_points and target_points
    [N, 2], row i of one matching row i of the other."""

    source: str
    target: str
    source_points: torch.Tensor
    target_points: torch.Tensor
    target_bbox: Optional[Tuple[float, float, float, float]] = None  # x1, y1, x2, y2
    category: Optional[str] = None


def _points(value, what: str) -> torch.Tensor:
    """[[x, y], ...] -> [N, 2] float; anything else is one clear error."""
    try:
        points = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of [x, y] pairs of numbers") from None
    if points.numel() == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise InputError(f"{what} must be a list of [x, y] pairs, got shape {tuple(points.shape)}")
    return points


def _bbox(value, what: str) -> Optional[Tuple[float, float, float, float]]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, (int, float)) for v in value):
        raise InputError(f"{what} must be [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in value)
    if max(x2 - x1, y2 - y1) <= 0:  # PCK's threshold is a share of its larger side: every point would miss
        raise InputError(f"{what} {list(value)} has no extent: give [x1, y1, x2, y2] with x2 > x1 or y2 > y1, or "
                         "leave it out (the target image's size is used)")
    return x1, y1, x2, y2


def _pair(source, target, source_points, target_points, bbox, category, where: str) -> KeypointPair:
    source_points = _points(source_points, f"{where}: the source points")
    target_points = _points(target_points, f"{where}: the target points")
    if len(source_points) != len(target_points):
        raise InputError(f"{where}: {len(source_points)} source points but {len(target_points)} target points; "
                         "they must correspond one to one")
    return KeypointPair(str(source), str(target), source_points, target_points, _bbox(bbox, f"{where}: the box"),
                        None if category is None else str(category))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path} as JSON: {error}") from None


def _is_spair(entry) -> bool:
    return isinstance(entry, dict) and all(key in entry for key in SPAIR_KEYS)


def _spair_root(start: Path, images: Optional[Union[str, Path]]) -> Path:
    """The SPair-71k folder holding JPEGImages/: the one given, else the first above `start` that has it."""
    if images is not None:
        return Path(images)
    for folder in [start, *start.parents][:4]:
        if (folder / "JPEGImages").is_dir():
            return folder
    raise InputError(f"cannot find SPair-71k's JPEGImages/ above {start}: pass --images ROOT (the folder that "
                     "holds JPEGImages/)")


def _spair_pair(entry: dict, root: Path, where: str) -> KeypointPair:
    folder = root / "JPEGImages" / str(entry["category"])
    return _pair(folder / entry["src_imname"], folder / entry["trg_imname"], entry["src_kps"], entry["trg_kps"],
                 entry.get("trg_bndbox"), entry["category"], where)


def read_pairs(path: Union[str, Path], images: Optional[Union[str, Path]] = None) -> List[KeypointPair]:
    """The pairs of a pair list (a JSON file holding a list) or of SPair-71k annotations (a folder of per-pair JSON
    files, or one), in either form of the module docstring; images: the root relative paths hang from. Every
    image file must exist."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise InputError(f"{path} holds no .json files: give a JSON pair list or a folder of SPair-71k pair "
                             "annotations (PairAnnotation/<split>)")
        root = _spair_root(path, images)
        pairs = []
        for file in files:
            entry = _read_json(file)
            if not _is_spair(entry):
                raise InputError(f"{file} is not an SPair-71k pair annotation: it needs {', '.join(SPAIR_KEYS)}")
            pairs.append(_spair_pair(entry, root, file.name))
    elif path.is_file():
        content = _read_json(path)
        if _is_spair(content):
            pairs = [_spair_pair(content, _spair_root(path.parent, images), path.name)]
        elif isinstance(content, list) and content and all(isinstance(e, dict) for e in content):
            base = Path(images) if images is not None else path.parent
            pairs = []
            for index, entry in enumerate(content):
                missing = [key for key in LIST_KEYS if key not in entry]
                if missing:
                    raise InputError(f"{path}: pair {index} lacks {', '.join(missing)} (each pair needs "
                                     f"{', '.join(LIST_KEYS)}, optionally target_bbox and category)")
                pairs.append(_pair(base / entry["source"], base / entry["target"], entry["source_points"],
                                   entry["target_points"], entry.get("target_bbox"), entry.get("category"),
                                   f"{path.name} pair {index}"))
        else:
            raise InputError(f"{path} is neither a pair list (a JSON list of {{{', '.join(LIST_KEYS)}}}) nor an "
                             "SPair-71k pair annotation (src_imname, trg_imname, src_kps, trg_kps, category)")
    else:
        raise InputError(f"pair list {path} not found")
    missing = sorted({p for pair in pairs for p in (pair.source, pair.target) if not Path(p).is_file()})
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"image file(s) not found: {', '.join(missing[:3])}{more} (relative paths hang from "
                         "--images, or from the pair list's folder)")
    return pairs


def transfer_cells(source_grid: torch.Tensor, target_grid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """For cells (x, y) [N, 2] of the source grid [h, w, C]: the most cosine-similar cell of the target grid
    [h2, w2, C], as (x, y) [N, 2] long."""
    if not len(cells):
        return cells.reshape(0, 2).long()
    w = source_grid.shape[1]
    queries = source_grid.reshape(-1, source_grid.shape[-1])[cells[:, 1] * w + cells[:, 0]]
    index, _ = nearest(queries, target_grid.reshape(-1, target_grid.shape[-1]))
    width = target_grid.shape[1]
    return torch.stack([index % width, index // width], dim=1)


def transfer_points(source: SourceFeatures, target: SourceFeatures, points: torch.Tensor,
                    source_index: int = 0, target_index: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source keypoints (x, y) [N, 2] in original pixels -> (predicted target points [N, 2] in the target's
    original pixels, inside [N]: whether the source point had a cell; the others' predictions mean nothing)."""
    cells, inside = source.cells_of(source_index, points)
    found = transfer_cells(source.features.patches[source_index], target.features.patches[target_index], cells)
    centres = target.centers_original(target_index)
    return centres[found[:, 1], found[:, 0]], inside


def pck(errors: torch.Tensor, references: torch.Tensor, alphas: Sequence[float] = ALPHAS) -> Dict[str, float]:
    """Percent of points whose error [N] is at most alpha * reference [N], for each alpha (keys "0.05", ...)."""
    if not len(errors):
        return {f"{alpha:g}": float("nan") for alpha in alphas}
    return {f"{alpha:g}": 100.0 * float((errors <= alpha * references).float().mean()) for alpha in alphas}


@dataclass
class KeypointResult:
    pck: Dict[str, float]  # alpha -> percent, over every point scored
    points: int  # points scored
    skipped_points: int  # source points outside their image
    pairs: int  # pairs scored
    skipped_pairs: List[str] = field(default_factory=list)  # pairs with an unreadable image, and why
    per_category: Dict[str, Dict[str, float]] = field(default_factory=dict)  # category -> alpha -> percent
    category_mean: Dict[str, float] = field(default_factory=dict)  # alpha -> mean over categories

    def to_dict(self) -> dict:
        return {"pck": self.pck, "points": self.points, "skipped_points": self.skipped_points, "pairs": self.pairs,
                "skipped_pairs": self.skipped_pairs, "per_category": self.per_category,
                "category_mean": self.category_mean}


class _Cache:
    """The descriptors of the last `size` images (SPair pairs reuse images; sorted pairs reuse them in a row)."""

    def __init__(self, source: FeatureSource, size: int = 32) -> None:
        self.source, self.size, self.items = source, size, OrderedDict()

    def get(self, path: str) -> Tuple[Optional[SourceFeatures], str]:
        if path not in self.items:
            try:  # decoded here first, so that a source's own errors (a bad layer, ...) are not taken for it
                load_image(path, "RGB")
            except Exception as error:
                self.items[path] = (None, describe_error(error))
            else:
                self.items[path] = (self.source.describe([path]), "")
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(path)
        return self.items[path]


def evaluate_keypoints(pairs: Sequence[KeypointPair], source: FeatureSource, alphas: Sequence[float] = ALPHAS,
                       show_progress: bool = False) -> KeypointResult:
    """PCK of keypoint transfer over `pairs` with the descriptors of `source` (see the module docstring)."""
    cache = _Cache(source)
    errors, references, categories = [], [], []
    skipped_points, scored_pairs, skipped_pairs = 0, 0, []
    bar = progress(total=len(pairs), desc="keypoint pairs", leave=False, disable=not show_progress)
    for pair in pairs:
        (src, why_src), (trg, why_trg) = cache.get(pair.source), cache.get(pair.target)
        bar.update(1)
        if src is None or trg is None:
            skipped_pairs.append(f"{Path(pair.source).name} -> {Path(pair.target).name}: {why_src or why_trg}")
            continue
        predicted, inside = transfer_points(src, trg, pair.source_points)
        skipped_points += int((~inside).sum())
        if pair.target_bbox is not None:
            x1, y1, x2, y2 = pair.target_bbox
            reference = max(y2 - y1, x2 - x1)
        else:
            reference = float(max(trg.images.original_sizes[0]))
        error = (predicted - pair.target_points).norm(dim=1)[inside]
        errors.append(error)
        references.append(torch.full_like(error, reference))
        categories += [pair.category] * len(error)
        scored_pairs += 1
    bar.close()
    errors = torch.cat(errors) if errors else torch.zeros(0)
    references = torch.cat(references) if references else torch.zeros(0)
    per_category = {}
    for name in sorted({c for c in categories if c is not None}):
        chosen = torch.tensor([c == name for c in categories])
        per_category[name] = pck(errors[chosen], references[chosen], alphas)
    category_mean = {}
    if per_category:
        category_mean = {key: sum(v[key] for v in per_category.values()) / len(per_category)
                         for key in next(iter(per_category.values()))}
    return KeypointResult(pck(errors, references, alphas), len(errors), skipped_points, scored_pairs, skipped_pairs,
                          per_category, category_mean)


def grid_transfer_errors(source_grid: torch.Tensor, target_grid: torch.Tensor, source_centres: torch.Tensor,
                         target_centres: torch.Tensor, points: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Keypoint transfer on grids of one image size (no rescaling): each point (x, y) [N, 2] takes the cell whose
    centre (centres [h, w, 2]) is nearest, the most similar target cell's centre is its prediction; returns the
    pixel errors [N] against the true target points [N, 2] (e.g. points moved by a known warp)."""
    if not len(points):
        return torch.zeros(0)
    flat = source_centres.reshape(-1, 2)
    cells = torch.cdist(points.float(), flat).argmin(dim=1)
    width = source_grid.shape[1]
    found = transfer_cells(source_grid, target_grid, torch.stack([cells % width, cells // width], dim=1))
    predicted = target_centres[found[:, 1], found[:, 0]]
    return (predicted - truth.float()).norm(dim=1)
