"""The dense commands of `distill`: features and pca here; correspond and eval keypoints (cli/correspond.py) and eval
segment (cli/segment.py) registered with them. Each loads a backbone from any checkpoint and images whole at one
size, and writes what it computed beside a short summary."""

import argparse
import json
from pathlib import Path
from typing import List, Tuple

from distill.cli.arguments import add_backbone_choice, number
from distill.errors import InputError


def add_backbone_arguments(sub: argparse.ArgumentParser, size_help: str = "image side in pixels") -> None:
    add_backbone_choice(sub)
    sub.add_argument("--size", type=int, default=0, help=f"{size_help} (default: the run's, or the model's)")
    sub.add_argument("--mean", type=float, nargs="+")
    sub.add_argument("--std", type=float, nargs="+")
    sub.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    sub.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def add_grid_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--layer", type=int, nargs="+", default=[-1], help="block(s), negative from the end")
    sub.add_argument("--facet", default="token", choices=("token", "key", "query", "value"))
    sub.add_argument("--stride", type=int, help="pixels between patches, a divisor of the patch size")
    sub.add_argument("--log-bins", type=int, default=0, help="log-binned descriptors of this hierarchy (0: off)")


def load_backbone_for(args: argparse.Namespace):
    """(model on its device, size, mean, std) from --checkpoint and friends; the size fitted to the grid."""
    import torch

    from distill.cli.arguments import parse_sets
    from distill.data.augment import match_channels
    from distill.dense.images import fitting_size
    from distill.eval.loading import load_backbone

    model, setup = load_backbone(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key)
    model = model.to(torch.device(args.device))
    size = args.size or setup.image_size
    patch = getattr(model, "patch_size", 32)
    fitted = fitting_size(size, patch, getattr(args, "stride", None))
    if fitted != size:
        print(f"image side {size} px -> {fitted} px, to fit patches of {patch} at stride "
              f"{getattr(args, 'stride', None) or patch}")
    channels = model.config["in_chans"] if hasattr(model, "config") else 3
    mean, std = match_channels(args.mean or setup.mean, args.std or setup.std, channels)  # as the images will be
    print(f"backbone from {setup.source}; images resized whole to {fitted} px, mean {mean}, std {std}")
    return model, fitted, mean, std


def check_request(model, size: int, args: argparse.Namespace) -> None:
    """Layer, facet and stride checked on one blank image, before anything is read or written."""
    import torch

    from distill.dense import extract

    channels = model.config["in_chans"] if hasattr(model, "config") else 3
    extract(model, torch.zeros(1, channels, size, size), args.layer, args.facet, args.stride)


def resolve_images(inputs: List[str]) -> List[str]:
    """Image files from files, folders (searched recursively, links followed once) and file lists (.txt)."""
    from distill.data.configs import DatasetConfig
    from distill.data.datasets import build_image_source
    from distill.data.filelists import read_paths

    paths: List[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += build_image_source(DatasetConfig(kind="folder", path=str(path), verify="no")).paths
        elif path.is_file() and path.suffix.lower() == ".txt":
            paths += [name if Path(name).is_absolute() else str(path.parent / name) for name in read_paths(path)]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise InputError(f"{item} does not exist: give image files, folders of images or file lists (.txt)")
    if not paths:
        raise InputError(f"no images found in {', '.join(inputs)}")
    return paths


def _features_in_chunks(args, model, size, mean, std, paths, write) -> Tuple[int, List[str], List[str]]:
    """extract() over the images, `args.batch_size` files at a time; write(start, dense images, features).
    Returns the images done, and the unreadable ones (as "path (why)", and as paths)."""
    from distill.dense import extract
    from distill.dense.images import load_dense_images
    from distill.progress import progress

    channels = model.config["in_chans"] if hasattr(model, "config") else 3
    done, skipped, skipped_paths = 0, [], []
    with progress(total=len(paths), desc="features", unit="img") as bar:
        for start in range(0, len(paths), args.batch_size):
            part = paths[start:start + args.batch_size]
            loaded = load_dense_images(part, size, mean, std, channels, allow_none=True)
            skipped += loaded.skipped
            skipped_paths += loaded.skipped_paths
            if not loaded.paths:  # not one readable image in this chunk
                bar.update(len(part))
                continue
            features = extract(model, loaded.images, args.layer, args.facet, args.stride, log_bins=args.log_bins,
                               precision=args.precision)
            write(done, loaded, features)
            done += len(loaded.paths)
            bar.update(len(part))
    return done, skipped, skipped_paths


def _absolute(paths: List[str]) -> List[str]:
    """Paths as file lists keep them: a list's relative entries are read from its own folder, so entries
    relative to the working folder become absolute (joined, not normalised: links keep their meaning)."""
    import os

    return [path if os.path.isabs(path) else os.path.join(os.getcwd(), path) for path in paths]


def _earlier_features(out: Path, force: bool) -> set:
    """The files an earlier `distill features` wrote into `out` (to replace with --force), checked before anything
    is loaded: a file, or a folder holding anything else, is refused."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file: give a folder for the features")
    if not out.is_dir() or not any(out.iterdir()):
        return set()
    if not (out / "index.json").is_file():
        raise InputError(f"--output {out} holds other files: give a new or empty folder")
    if not force:
        raise InputError(f"--output {out} holds features written before: pass --force to replace them, or give "
                         "another folder")
    try:
        return _files_of(json.loads((out / "index.json").read_text())["files"], unreadable=True)
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{out / 'index.json'} is not an index of features: give a new or empty folder") from None


def _files_of(entries, unreadable: bool) -> set:
    """The files a features folder holds for its index.json's "files" entries (a name per image, or {"file",
    "rows"} per shard): each, a shard's paths list, index.json, and unreadable.txt when images were left out.
    Only plain names count: an entry naming a path elsewhere is never taken as the folder's own."""
    files = {entry if isinstance(entry, str) else entry["file"] for entry in entries}
    files = {name for name in files if name == Path(name).name and name not in ("", ".", "..")}
    return (files | {f"{Path(name).stem}.paths.txt" for name in files} | {"index.json"}
            | ({"unreadable.txt"} if unreadable else set()))


def cmd_features(args: argparse.Namespace) -> None:
    """Descriptors per image as float16 [h, w, C] .npy files (or shards [n, h, w, C] for many images), with an
    index.json saying which file is which image and how they were made."""
    import numpy as np

    from distill.data.filelists import write_file_list
    from distill.files import atomic_write, atomic_write_text

    out = Path(args.output)
    earlier = _earlier_features(out, args.force)
    paths = resolve_images(args.images)
    model, size, mean, std = load_backbone_for(args)
    check_request(model, size, args)  # a layer, facet or stride that does not exist stops before any file
    out.mkdir(parents=True, exist_ok=True)
    shards = args.shards or len(paths) > args.per_image_limit
    index = {"images": [], "files": [], "size": size, "layers": args.layer, "facet": args.facet,
             "stride": args.stride, "log_bins": args.log_bins, "checkpoint": args.checkpoint, "grid": None,
             "dtype": "float16", "layout": "shards [n, h, w, C]" if shards else "one [h, w, C] per image"}

    def write(start: int, loaded, features) -> None:
        arrays = features.patches.numpy().astype(np.float16)
        index["grid"] = list(features.grid)
        if shards:
            name = f"features_{len(index['files']):05d}.npy"
            atomic_write(out / name, lambda handle: np.save(handle, arrays))
            write_file_list(out / f"{name[:-4]}.paths.txt", _absolute(loaded.paths))
            index["files"].append({"file": name, "rows": len(arrays)})
        else:
            for offset, (path, array) in enumerate(zip(loaded.paths, arrays)):
                name = f"{start + offset:06d}_{Path(path).stem}.npy"
                atomic_write(out / name, lambda handle, array=array: np.save(handle, array))
                index["files"].append(name)
        index["images"] += loaded.paths

    done, skipped, skipped_paths = _features_in_chunks(args, model, size, mean, std, paths, write)
    if not done:
        if not any(out.iterdir()):
            out.rmdir()
        raise InputError(f"none of the {len(paths)} image(s) could be read ({'; '.join(skipped[:3])}): nothing "
                         "written")
    if skipped:
        write_file_list(out / "unreadable.txt", _absolute(skipped_paths))
        print(f"left out {len(skipped)} unreadable image(s): {'; '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""))
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    # what the run before wrote and this one did not: replaced, gone
    for stale in sorted(earlier - _files_of(index["files"], unreadable=bool(skipped))):
        (out / stale).unlink(missing_ok=True)
    grid = "x".join(map(str, index["grid"]))
    print(f"{done} image(s): {grid} grid of {args.facet} descriptors (layer {args.layer}) -> {out}/")


def cmd_pca(args: argparse.Namespace) -> None:
    """DINOv2's PCA picture of a set of images; --masks writes each image's foreground as a PNG."""
    import numpy as np
    from PIL import Image

    from dataclasses import replace

    import torch

    from distill.dense import extract
    from distill.dense.images import display, load_dense_images
    from distill.dense.pca import pca_picture, save_pca_figure, upsample_mask
    from distill.files import atomic_write_text
    from distill.progress import progress

    if Path(args.output).suffix.lower() != ".png":
        raise InputError(f"--output {args.output} must be a .png file (the picture)")
    if args.masks and Path(args.masks).exists() and not Path(args.masks).is_dir():
        raise InputError(f"--masks {args.masks} is a file: give a folder for the masks")
    paths = resolve_images(args.images)
    model, size, mean, std = load_backbone_for(args)
    check_request(model, size, args)
    channels = model.config["in_chans"] if hasattr(model, "config") else 3
    loaded = load_dense_images(paths, size, mean, std, channels)
    if loaded.skipped:
        print(f"left out {len(loaded.skipped)} unreadable image(s): {'; '.join(loaded.skipped)}")
    parts = []
    with progress(total=len(loaded.paths), desc="features", unit="img") as bar:
        for start in range(0, len(loaded.paths), args.batch_size):
            part = loaded.images[start:start + args.batch_size]
            parts.append(extract(model, part, args.layer, args.facet, args.stride, precision=args.precision))
            bar.update(len(part))
    features = replace(parts[0], patches=torch.cat([f.patches for f in parts]),
                       cls=None if parts[0].cls is None else torch.cat([f.cls for f in parts]))
    picture = pca_picture(features, args.threshold)  # one PCA over every image: colours mean the same in each
    count = min(args.show, len(loaded.paths))
    shown = [display(image, mean, std) for image in loaded.images[:count]]
    path = save_pca_figure(shown, picture, Path(args.output), [Path(p).name for p in loaded.paths[:count]])
    if args.masks:
        folder = Path(args.masks)
        folder.mkdir(parents=True, exist_ok=True)
        names = mask_names(loaded.paths)
        for number, (name, original) in enumerate(zip(names, loaded.original_sizes)):
            mask = upsample_mask(picture.foreground[number], original)
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / name)
        atomic_write_text(folder / "masks.txt", "".join(f"{name}\t{p}\n" for name, p in zip(names, loaded.paths)))
        print(f"foreground masks of {len(names)} image(s) -> {folder}/ (masks.txt says which image each is)")
    share = float(picture.foreground.float().mean()) * 100
    what = f"the first {count} of them shown" if count < len(loaded.paths) else "all shown"
    print(f"PCA of {len(loaded.paths)} image(s) ({what}), {features.grid[0]}x{features.grid[1]} patches each, "
          f"{share:.0f}% foreground: {path}")


def mask_names(paths: List[str]) -> List[str]:
    """<stem>_mask.png per image; images whose stems repeat (a/x.png, b/x.png) take <stem>_2_mask.png, ... in
    their order, so that no mask overwrites another."""
    seen: dict = {}
    names = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_mask.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}_mask.png")
    taken = set(names)
    if len(taken) < len(names):  # x_2.png beside two x.png: fall back to numbered names
        names = [f"{number:06d}_{Path(path).stem}_mask.png" for number, path in enumerate(paths)]
    return names


def add_dense_commands(commands, evaluate_kinds) -> None:
    """`distill features`, `distill pca`, `distill correspond`, `distill eval keypoints`, `distill eval segment`."""
    features = commands.add_parser("features", help="patch descriptors of images at any layer, facet and stride")
    features.add_argument("images", nargs="+", help="image files, folders or file lists")
    add_backbone_arguments(features)
    add_grid_arguments(features)
    features.add_argument("--batch-size", type=number(at_least=1), default=32)
    features.add_argument("--shards", action="store_true", help="shards [n, h, w, C] instead of one file per image")
    features.add_argument("--per-image-limit", type=int, default=2000, help="above this many images, shards")
    features.add_argument("--output", required=True, help="folder for the .npy files and index.json (new or empty)")
    features.add_argument("--force", action="store_true", help="replace the features an earlier run wrote there")
    features.set_defaults(run=cmd_features)

    pca = commands.add_parser("pca", help="DINOv2's PCA picture of patch features, and foreground masks")
    pca.add_argument("images", nargs="+", help="image files, folders or file lists")
    add_backbone_arguments(pca)
    add_grid_arguments(pca)
    pca.add_argument("--threshold", type=number(float, above=0, below=1), default=0.5,
                     help="of the first component, scaled to [0, 1]; in (0, 1)")
    pca.add_argument("--masks", help="folder for the foreground masks of every image (PNG, at each image's own "
                                     "size; masks.txt lists which image each is)")
    pca.add_argument("--batch-size", type=number(at_least=1), default=32, help="images per forward pass")
    pca.add_argument("--show", type=number(at_least=1), default=8,
                     help="images in the picture (the PCA is over all of them)")
    pca.add_argument("--output", default="pca.png", help="the picture (.png)")
    pca.set_defaults(run=cmd_pca)

    from distill.cli.correspond import add_correspond_arguments, add_keypoints_arguments, cmd_correspond, \
        cmd_eval_keypoints
    from distill.cli.segment import add_segment_arguments, cmd_eval_segment

    correspond = commands.add_parser("correspond", help="matched points between two images (best buddies), as "
                                                        "a picture and a point file; --with fuses a second source")
    add_correspond_arguments(correspond)
    correspond.set_defaults(run=cmd_correspond)
    keypoints = evaluate_kinds.add_parser("keypoints", help="PCK of keypoint transfer on SPair-71k-style pairs")
    add_keypoints_arguments(keypoints)
    keypoints.set_defaults(run=cmd_eval_keypoints)
    segment = evaluate_kinds.add_parser("segment", help="linear segmentation probe on frozen patch features")
    add_segment_arguments(segment)
    segment.set_defaults(run=cmd_eval_segment)
