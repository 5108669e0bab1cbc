"""The command-line side of correspondence: `distill correspond` (matched points between two images, as a picture
and a point file) and `distill eval keypoints` (PCK of keypoint transfer), their arguments, and the checks that
turn bad input into one line before anything is computed or written.

The descriptors come from --checkpoint (a layer, facet and stride of it), optionally fused with a second source
(--with: a registry name, a checkpoint file, or sd:<folder or hub id> for Stable Diffusion; SD-DINO's fusion with
weights 1 - alpha for the checkpoint and alpha for the second source).
"""

import argparse
import json
from pathlib import Path
from typing import List

from distill.cli.arguments import add_backbone_choice, check_image_files, parse_sets
from distill.dense.kinds import ALPHAS, FACETS, SELECTIONS
from distill.errors import InputError, UnknownArchitecture
from distill.files import atomic_write_text

# PyTorch and the dense modules are imported in the commands themselves: building the parser stays light.

# the options that shape the --with source (SD-DINO's values), and so mean nothing without one
FUSION_DEFAULTS = {"alpha": 0.5, "sd_size": 960, "sd_timestep": 100, "sd_blocks": [0, 1, 2]}


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The descriptor source: a checkpoint at a layer / facet / stride, optionally fused with a second source."""
    add_backbone_choice(parser)
    parser.add_argument("--layer", type=int, nargs="+", default=[-1],
                        help="block(s) whose descriptors to use, negative from the end (several: concatenated)")
    parser.add_argument("--facet", default="token", help=f"one of {', '.join(FACETS)} (Amir et al. use key)")
    parser.add_argument("--stride", type=int, help="pixels between patches, a divisor of the patch size "
                                                   "(default: the patch size; smaller: a denser grid)")
    parser.add_argument("--size", type=int, default=0, help="image side for the backbone (default: the checkpoint's)")
    parser.add_argument("--with", dest="with_source", metavar="SOURCE",
                        help="fuse with a second source: a registry name, a checkpoint file, or sd:<folder or hub "
                             "id> (Stable Diffusion; pip install 'distill[sd]')")
    parser.add_argument("--alpha", type=float, default=FUSION_DEFAULTS["alpha"],
                        help="weight of the --with source in the fusion; the checkpoint's is 1 - alpha")
    parser.add_argument("--sd-size", type=int, default=FUSION_DEFAULTS["sd_size"],
                        help="image side for Stable Diffusion (SD-DINO: 960)")
    parser.add_argument("--sd-timestep", type=int, default=FUSION_DEFAULTS["sd_timestep"],
                        help="noise timestep of 1000 (SD-DINO: 100)")
    parser.add_argument("--sd-blocks", type=int, nargs="+", default=FUSION_DEFAULTS["sd_blocks"],
                        help="UNet decoder up-blocks whose outputs to use (SD-DINO: 0 1 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def add_correspond_arguments(parser: argparse.ArgumentParser) -> None:
    """`distill correspond IMAGE_A IMAGE_B --checkpoint F ... --output matches.png`."""
    parser.add_argument("image_a", help="first image file")
    parser.add_argument("image_b", help="second image file")
    _add_source_arguments(parser)
    parser.add_argument("--pairs", type=int, default=10, help="pairs to keep of the best buddies (0: all)")
    parser.add_argument("--select", default="kmeans",
                        help="how to keep them: kmeans (the most salient pair of each of k clusters, Amir et al.) "
                             "or saliency (the k most salient)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="pairs with an end whose saliency (0-1) is at most this are dropped")
    parser.add_argument("--output", default="matches.png",
                        help="the picture (.png); the point pairs go beside it as .json")


def add_keypoints_arguments(parser: argparse.ArgumentParser) -> None:
    """`distill eval keypoints PAIRS --checkpoint F ... [--output results.json]`."""
    parser.add_argument("pairs", metavar="PAIRS",
                        help="a JSON pair list, or a folder of SPair-71k pair annotations (PairAnnotation/<split>)")
    parser.add_argument("--images", help="root of relative image paths (SPair-71k: the folder holding JPEGImages/)")
    _add_source_arguments(parser)
    parser.add_argument("--output", help="also write the results as JSON to this file")


def _check_source_arguments(args: argparse.Namespace) -> None:
    """What can be checked before anything is loaded."""
    if not Path(args.checkpoint).is_file():
        raise InputError(f"checkpoint {args.checkpoint} not found")
    if args.facet not in FACETS:
        raise InputError(f"facet {args.facet!r} unknown: choose one of {', '.join(FACETS)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError(f"--alpha {args.alpha} must lie in [0, 1] (the --with source's share of the fusion)")
    if args.size < 0:
        raise InputError(f"--size must be positive, got {args.size}")
    if not args.with_source:
        unused = ["--" + key.replace("_", "-") for key, default in FUSION_DEFAULTS.items()
                  if getattr(args, key) != default]
        if unused:
            raise InputError(f"{', '.join(unused)} only apply to a second source: give it with --with SOURCE, or "
                             "leave them out")


def _check_layers(model, layers: List[int]) -> None:
    """A layer the model does not have, said before anything heavier (a second source) is loaded."""
    if hasattr(model, "blocks"):
        depth = len(model.blocks)
        bad = [layer for layer in layers if not -depth <= layer < depth]
        if bad:
            raise InputError(f"--layer {bad} out of range: the model has {depth} blocks ({-depth} to {depth - 1})")


def _build_source(args: argparse.Namespace):
    """The FeatureSource of --checkpoint at its layer / facet / stride, fused with --with when given."""
    from distill.dense.sources import BackboneSource, FusedSource, parse_source
    from distill.eval.loading import load_backbone

    _check_source_arguments(args)
    model, setup = load_backbone(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key)
    _check_layers(model, args.layer)
    backbone = BackboneSource(model.to(args.device), args.size or setup.image_size, setup.mean, setup.std,
                              args.layer, args.facet, args.stride, label=Path(args.checkpoint).name)
    if not args.with_source:
        return backbone
    try:
        other = parse_source(args.with_source, args.size or None, args.device, args.sd_size, args.sd_timestep,
                             args.sd_blocks)
    except UnknownArchitecture:
        raise InputError(f"--with {args.with_source}: its architecture cannot be told from its weights, and --backbone "
                         "and --set describe --checkpoint: write it with its architecture first (distill export "
                         f"{args.with_source} --to safetensors --backbone NAME --set ...), then give that file to "
                         "--with") from None
    if other.label.endswith("(random weights)"):
        print(f"--with {args.with_source}: a registered backbone with random weights (a baseline, not trained "
              "features)")
    return FusedSource([backbone, other], [1.0 - args.alpha, args.alpha])


def _original_image(path: str):
    import numpy as np

    from distill.data.images import load_image

    return np.asarray(load_image(path, "RGB"))


def cmd_correspond(args: argparse.Namespace) -> None:
    """Best buddies between two images, reduced to --pairs, drawn into --output and listed beside it (.json,
    (x, y) pixels of the original images)."""
    from distill.dense.correspondence import correspond, pairs_text, render_matches, write_matches

    check_image_files([args.image_a, args.image_b], hint=": correspond matches two images; for many pairs, give "
                                                         "a pair list to distill eval keypoints")
    picture = Path(args.output)
    if picture.suffix.lower() != ".png":
        raise InputError(f"--output {args.output} must be a .png file (the point pairs go beside it as .json)")
    if args.pairs < 0:
        raise InputError(f"--pairs must be 0 (all) or more, got {args.pairs}")
    if not 0 <= args.threshold < 1:
        raise InputError(f"--threshold {args.threshold} must lie in [0, 1): saliency runs from 0 to 1, and pairs at "
                         "or below it are dropped")
    if args.select not in SELECTIONS:
        raise InputError(f"--select {args.select!r} unknown: choose one of {', '.join(SELECTIONS)}")
    source = _build_source(args)
    described = source.describe([args.image_a, args.image_b], saliency=True)
    if described.images.skipped:
        raise InputError(f"cannot read {'; '.join(described.images.skipped)}")
    patches, saliency = described.features.patches, described.saliency
    matches = correspond(patches[0], patches[1], args.pairs, None if saliency is None else saliency[0],
                         None if saliency is None else saliency[1], args.select, args.threshold)
    centres = [described.centers_original(i).reshape(-1, 2) for i in (0, 1)]
    points_a, points_b = centres[0][matches.kept[:, 0]], centres[1][matches.kept[:, 1]]
    ranked_by = "saliency" if saliency is not None else "similarity"
    summary = f"{len(matches.buddies)} best buddies, {len(matches.kept)} kept"
    info = {"image_a": args.image_a, "image_b": args.image_b, "source": source.label,
            "grid": list(described.grid), "buddies": len(matches.buddies), "kept": len(matches.kept),
            "selection": args.select if args.pairs else "all", "ranked_by": ranked_by,
            "coordinates": "(x, y) pixels of the original images"}
    scores = {"similarity": matches.similarity, ranked_by: matches.rank} if ranked_by == "saliency" else \
        {"similarity": matches.similarity}
    text = pairs_text(points_a, points_b, "json", info, scores)
    png = render_matches(_original_image(args.image_a), _original_image(args.image_b), points_a, points_b,
                         f"{summary} ({source.label})")
    points_path = picture.with_suffix(".json")
    write_matches(picture, png, points_path, text)
    print(summary)
    print(f"picture: {picture}; point pairs: {points_path}")


def cmd_eval_keypoints(args: argparse.Namespace) -> None:
    """PCK@0.05/0.1/0.15 of keypoint transfer over a pair list or SPair-71k annotations."""
    from distill.dense.keypoints import evaluate_keypoints, read_pairs

    pairs = read_pairs(args.pairs, args.images)
    if not any(len(pair.source_points) for pair in pairs):
        raise InputError(f"{args.pairs}: none of its {len(pairs)} pair(s) has a point: give each pair its [x, y] in "
                         "source_points and target_points")
    source = _build_source(args)
    result = evaluate_keypoints(pairs, source, ALPHAS, show_progress=True)
    if result.skipped_pairs:
        print(f"left out {len(result.skipped_pairs)} pair(s) with an unreadable image: "
              f"{'; '.join(result.skipped_pairs[:3])}{' ...' if len(result.skipped_pairs) > 3 else ''}")
    if not result.points:
        raise InputError(f"no keypoint could be scored: {result.skipped_points} source point(s) outside their "
                         f"image, {len(result.skipped_pairs)} pair(s) unreadable")
    print(f"keypoint transfer with {source.label}: {result.points} points of {result.pairs} pairs "
          f"({result.skipped_points} source point(s) outside their image skipped)")
    for alpha, value in result.pck.items():
        print(f"  PCK@{alpha:<5} {value:6.2f}")
    if result.category_mean and len(result.per_category) > 1:
        print("  mean over categories: " + "  ".join(f"@{a} {v:.2f}" for a, v in result.category_mean.items()))
    if args.output:
        payload = {"keypoints": result.to_dict(), "pairs_file": str(args.pairs), "source": source.label,
                   "layer": args.layer, "facet": args.facet, "stride": args.stride, "alpha": args.alpha,
                   "with": args.with_source}
        atomic_write_text(args.output, json.dumps(payload, indent=2) + "\n")
        print(f"written to {args.output}")
