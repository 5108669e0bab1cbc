"""`distill eval segment`: a linear segmentation probe on a backbone's frozen patch features
(distill/dense/segmentation.py), its arguments, and the checks that stop bad input before anything is written."""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from distill.cli.arguments import add_backbone_choice, parse_sets
from distill.data.filelists import read_paths, readable_name
from distill.data.images import IMAGE_EXTENSIONS
from distill.dense.kinds import IGNORE_INDEX, LAYER_SETS
from distill.errors import InputError
from distill.files import atomic_write_text

# PyTorch and the dense modules are imported in the command itself: building the parser stays light.

HEAD_FILE = "segmentation_head.pth"
RESULTS_FILE = "segmentation.json"
PICTURE_FILE = "segmentation.png"
CLASSES_FILE = "classes.txt"
PICTURE_ROWS = 4


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `distill eval segment`, declared on a parser the caller made."""
    add_backbone_choice(parser)
    parser.add_argument("--train", nargs=2, required=True, metavar=("IMAGES", "MASKS"),
                        help="training images and their masks: two folders (matched by name: a.jpg <-> a.png) or "
                             "two file lists (matched in order); masks are PNGs of class indices, 255 = ignore")
    parser.add_argument("--val", nargs=2, required=True, metavar=("IMAGES", "MASKS"), help="as --train, to evaluate")
    parser.add_argument("--classes", help="class names, one a line, index 0 first (default: classes.txt beside the "
                                          "training masks, or indices 0 to the largest in them)")
    parser.add_argument("--layers", default="last", choices=tuple(LAYER_SETS),
                        help="patch tokens of the last block, or of the last four concatenated")
    parser.add_argument("--size", type=int, default=0,
                        help="image side fed to the backbone (default: its own), rounded to fit its patches")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step of the head's training")
    parser.add_argument("--pixel-baseline", action="store_true",
                        help="also probe the raw pixels of each patch, for comparison")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--output", help=f"folder for {RESULTS_FILE}, {HEAD_FILE} and {PICTURE_FILE}")


def _listing(argument: str, role: str) -> Tuple[List[Path], bool]:
    """(files, whether they came from a folder) of a folder (its image files, not recursive) or a file list
    (relative paths relative to the list's folder)."""
    path = Path(argument)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise InputError(f"no {role} ({', '.join(IMAGE_EXTENSIONS)}) in the folder {readable_name(argument)}")
        return files, True
    if path.is_file():
        files = [p if p.is_absolute() else path.parent / p for p in map(Path, read_paths(path))]
        if not files:
            raise InputError(f"the file list {readable_name(argument)} names no {role}")
        return files, False
    raise InputError(f"{role} {readable_name(argument)} not found: give a folder or a file list")


def pair_files(images_argument: str, masks_argument: str) -> Tuple[List[str], List[str]]:
    """(image files, their mask files): matched by name stem when either side is a folder (masks without an image
    are left alone), in order when both are file lists; a missing file or mask is an InputError naming it."""
    images, images_folder = _listing(images_argument, "images")
    masks, masks_folder = _listing(masks_argument, "masks")
    if images_folder or masks_folder:
        by_stem: Dict[str, Path] = {}
        for mask in masks:
            if mask.stem in by_stem:
                raise InputError(f"two masks named {mask.stem!r} in {readable_name(masks_argument)} "
                                 f"({by_stem[mask.stem].name}, {mask.name}): keep one per image")
            by_stem[mask.stem] = mask
        missing = [image for image in images if image.stem not in by_stem]
        if missing:
            raise InputError(f"no mask for {readable_name(str(missing[0]))} in {readable_name(masks_argument)} "
                             f"({len(missing)} image(s) without one): a mask has its image's name, e.g. a.jpg -> "
                             "a.png")
        masks = [by_stem[image.stem] for image in images]
    elif len(images) != len(masks):
        raise InputError(f"{len(images)} images in {readable_name(images_argument)} but {len(masks)} masks in "
                         f"{readable_name(masks_argument)}: two file lists are matched line by line")
    for role, files in (("image", images), ("mask", masks)):
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise InputError(f"{role} {readable_name(str(absent[0]))} not found ({len(absent)} missing): fix the "
                             "list or the folder")
    return [str(p) for p in images], [str(p) for p in masks]


def _class_names(argument: Optional[str], masks_argument: str) -> Optional[List[str]]:
    """Names from --classes, else from classes.txt in the masks' folder or the folder above (where
    tools/fashion_mnist_mosaics.py writes it); None when there is none."""
    if argument:
        path = Path(argument)
        if not path.is_file():
            raise InputError(f"--classes {readable_name(argument)} not found: give a text file, one name a line")
    else:
        base = Path(masks_argument)
        base = base if base.is_dir() else base.parent
        found = [folder / CLASSES_FILE for folder in (base, base.parent) if (folder / CLASSES_FILE).is_file()]
        if not found:
            return None
        path = found[0]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InputError(f"{readable_name(str(path))} names no class: one name a line, index 0 first")
    if len(names) > IGNORE_INDEX:
        raise InputError(f"{readable_name(str(path))} names {len(names)} classes; masks hold at most {IGNORE_INDEX} "
                         f"(0-{IGNORE_INDEX - 1}, {IGNORE_INDEX} = ignore)")
    return names


def _load_split(image_files: List[str], mask_files: List[str], size: int, setup, channels: int):
    """(DenseImages, masks int64 [H_i, W_i] unchecked): every image must be readable."""
    from distill.dense.images import load_dense_images
    from distill.dense.segmentation import read_mask

    images = load_dense_images(image_files, size, setup.mean, setup.std, channels)
    if images.skipped:
        raise InputError(f"cannot read {len(images.skipped)} image(s): {'; '.join(images.skipped[:3])}; fix or "
                         "remove them (and their masks)")
    return images, [read_mask(path) for path in mask_files]


def _checked(masks: List, classes: int, mask_files: List[str], images) -> List:
    """The masks [H_i, W_i], each checked against its image's size and the number of classes."""
    from distill.dense.segmentation import check_mask

    return [check_mask(mask, classes, path, size, image)
            for mask, path, size, image in zip(masks, mask_files, images.original_sizes, images.paths)]


def _report(title: str, metrics: Dict[str, object]) -> None:
    print(f"{title}: mIoU {metrics['miou']:.2f}  pixel accuracy {metrics['pixel_accuracy']:.2f}")
    for name, iou in metrics["per_class_iou"].items():
        print(f"  {name:<24} {'-' if iou is None else f'{iou:6.2f}'}")


def cmd_eval_segment(args: argparse.Namespace) -> Dict[str, object]:
    """`distill eval segment`: a linear head on frozen patch features of --train, scored on --val; prints mIoU,
    pixel accuracy and per-class IoU, and with --output writes the results, the head and a picture, all at the
    end (a failure leaves nothing half-written). Returns the results."""
    import torch

    from distill.dense.images import fitting_size
    from distill.dense.segmentation import (evaluate_segmentation, pixel_patches, predict, save_head,
                                            save_segmentation_picture, segmentation_features, train_head)
    from distill.eval.loading import load_backbone

    if args.epochs < 1 or args.batch_size < 1:
        raise InputError(f"--epochs and --batch-size must be positive, got {args.epochs} and {args.batch_size}")
    overrides = parse_sets(args.set)
    train_files = pair_files(*args.train)  # a missing file fails here, before the backbone is loaded
    val_files = pair_files(*args.val)
    names = _class_names(args.classes, args.train[1])
    model, setup = load_backbone(args.checkpoint, args.backbone, overrides, args.checkpoint_key)
    blocks, needed = len(getattr(model, "blocks", ())), len(LAYER_SETS[args.layers])
    if 0 < blocks < needed:
        raise InputError(f"--layers {args.layers} takes the last {needed} blocks but the model has {blocks}: use "
                         "--layers last")
    device = torch.device(args.device)
    model.to(device)
    patch = getattr(model, "patch_size", None)
    size = fitting_size(args.size or setup.image_size, patch) if patch else (args.size or setup.image_size)
    channels = getattr(model, "config", {}).get("in_chans", 3)
    train_images, train_masks = _load_split(*train_files, size, setup, channels)
    val_images, val_masks = _load_split(*val_files, size, setup, channels)
    if names is None:  # indices 0 to the largest the training masks hold
        largest = max(int(m[m != IGNORE_INDEX].max()) if bool((m != IGNORE_INDEX).any()) else 0 for m in train_masks)
        names = [str(k) for k in range(largest + 1)]
    train_masks = _checked(train_masks, len(names), train_files[1], train_images)
    val_masks = _checked(val_masks, len(names), val_files[1], val_images)
    print(f"backbone from {setup.source}; {size} px images, layers {args.layers}, {len(names)} classes, "
          f"{len(train_masks)} training and {len(val_masks)} validation images")

    def probe(train_features, val_features, desc):
        head = train_head(train_features, train_masks, len(names), epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, device=device, desc=desc)
        return head, evaluate_segmentation(head, val_features, val_masks, names)

    features = [segmentation_features(model, part.images, args.layers, precision=args.precision)
                for part in (train_images, val_images)]
    head, metrics = probe(features[0].patches, features[1].patches, "segmentation head")
    _report(f"linear probe ({args.layers}, {features[0].patches.shape[-1]}-d) on {len(val_masks)} images", metrics)
    results: Dict[str, object] = {
        "probe": metrics, "layers": args.layers, "feature_dim": features[0].patches.shape[-1], "image_size": size,
        "classes": names, "train_images": len(train_masks), "val_images": len(val_masks), "epochs": args.epochs,
        "lr": args.lr, "checkpoint": str(args.checkpoint), "backbone_source": setup.source,
    }
    if args.pixel_baseline:
        pixels = [pixel_patches(part.images, features[0].patch_size, features[0].stride)
                  for part in (train_images, val_images)]
        _, baseline = probe(pixels[0].patches, pixels[1].patches, "pixel baseline head")
        _report(f"raw-pixel baseline ({pixels[0].patches.shape[-1]}-d patches)", baseline)
        results["pixel_baseline"] = baseline
    if args.output:
        shown = min(PICTURE_ROWS, len(val_masks))
        predictions = predict(head, features[1].patches[:shown], [m.shape for m in val_masks[:shown]])
        output = Path(args.output)
        save_head(output / HEAD_FILE, head, names, args.layers)
        save_segmentation_picture(output / PICTURE_FILE, val_images.images[:shown], val_masks[:shown], predictions,
                                  setup.mean, setup.std, names, [Path(p).name for p in val_images.paths[:shown]])
        atomic_write_text(output / RESULTS_FILE, json.dumps(results, indent=2) + "\n")  # last: the run finished
        print(f"written to {output}: {RESULTS_FILE}, {HEAD_FILE}, {PICTURE_FILE}")
    return results


__all__ = ["add_segment_arguments", "cmd_eval_segment", "pair_files"]
