"""`distill eval classify`: top-1 / top-5 / loss of a classifier on labelled images. Without --head the checkpoint
is a classifier itself: a DeiT run of this project or an official DeiT file, evaluated as facebookresearch/deit
main.py --eval does (cross-entropy, top-1 / top-5; a distilled model averages its two heads). With --head, any
backbone gives the features the head's recipe names and the head classifies them (eval/heads.py: heads saved by
`distill eval linear --save-head`, DINO's and DINOv2's released linear heads)."""

import argparse
import json
from typing import Any, Dict, Optional, Tuple

from distill.cli.arguments import add_backbone_choice, add_compute_arguments, number, parse_sets
from distill.errors import InputError

DEFAULT_RESIZE_RATIO = 256 / 224  # DeiT's crop_pct 0.875, DINO's and DINOv2's 256 -> 224


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `distill eval classify`."""
    add_backbone_choice(parser)
    parser.add_argument("--head", metavar="PATH",
                        help="a linear head: from `distill eval linear --save-head`, DINO's dino_*_linearweights.pth "
                             "or DINOv2's dinov2_*_linear[4]_head.pth (default: the classifier in --checkpoint)")
    parser.add_argument("--data", required=True,
                        help="fashion_mnist, an ImageFolder tree (its --val-split sub-folder), or a labelled file list")
    parser.add_argument("--val-split", default="val", help="sub-folder of --data (Fashion-MNIST: test)")
    parser.add_argument("--val-limit", type=number(at_least=0), default=0, help="use only the first N images")
    parser.add_argument("--image-size", type=int, default=0, help="default: the head's, else the run's or model's")
    parser.add_argument("--mean", type=float, nargs="+", help="default: the head's, else the run's")
    parser.add_argument("--std", type=float, nargs="+")
    add_compute_arguments(parser)
    parser.set_defaults(run=cmd_eval_classify)


def _labelled_source(args: argparse.Namespace):
    from distill.data.configs import DatasetConfig
    from distill.data.datasets import build_image_source

    kind = "fashion_mnist" if args.data == "fashion_mnist" else "auto"
    path = None if kind == "fashion_mnist" else args.data
    source = build_image_source(DatasetConfig(kind=kind, path=path, limit=args.val_limit), args.val_split, option="--data")
    if source.labels is None:
        raise InputError(f"{source.name} has no labels: give an ImageFolder tree (one sub-folder per class) or a "
                         "file list with a label on each line")
    return source


def _with_head(args: argparse.Namespace, fashion: bool):
    """(backbone + head, view settings, description) for --head."""
    from distill.eval.heads import HeadClassifier, load_linear_head
    from distill.eval.loading import load_backbone

    backbone, setup = load_backbone(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key,
                                    fashion)
    head = load_linear_head(args.head, backbone)
    recipe = head.recipe
    view = {"size": recipe.image_size or setup.image_size, "mean": recipe.mean or setup.mean,
            "std": recipe.std or setup.std, "resize_ratio": recipe.resize_ratio or DEFAULT_RESIZE_RATIO}
    width, vit = backbone.embed_dim, hasattr(backbone, "get_intermediate_layers")
    what = (f"backbone from {setup.source} with the {head.layout} linear head {args.head} "
            f"({head.num_classes} classes over {recipe.describe(width, vit)})")
    return HeadClassifier(backbone, head), head, view, what


def _classifier_inside(args: argparse.Namespace, fashion: bool):
    """(classifier, view settings, description) for a checkpoint that is a classifier (DeiT's layout, or a run)."""
    from distill.eval.loading import classifier_overrides, load_backbone
    from distill.models import read_checkpoint
    from distill.models.checkpoint import TrainingCheckpoint, extract_state_dict, is_training_checkpoint

    obj = read_checkpoint(args.checkpoint)
    state, where = extract_state_dict(obj, args.checkpoint_key)
    found = classifier_overrides(state)
    if not found:
        raise InputError(f"{args.checkpoint} ({where}) holds no classifier (no head.weight): pass --head with a "
                         "linear head (`distill eval linear --save-head`, or DINO's / DINOv2's released ones)")
    overrides: Dict[str, Any] = {**found, **parse_sets(args.set)}
    model, setup = load_backbone(args.checkpoint, args.backbone, overrides, args.checkpoint_key, fashion)
    ratio = TrainingCheckpoint(obj).eval_view().get("resize_ratio") if is_training_checkpoint(obj) else None
    view = {"size": setup.image_size, "mean": setup.mean, "std": setup.std,
            "resize_ratio": ratio or DEFAULT_RESIZE_RATIO}
    kind = "distilled classifier (mean of its two heads)" if overrides.get("distilled") else "classifier"
    return model, None, view, f"{kind} from {setup.source} ({found['num_classes']} classes)"


def _checked_order(head, source, num_outputs: int) -> Optional[Tuple[int, ...]]:
    """The head's outputs in the data's class order (None: as they are); labels beyond the outputs are an error."""
    from distill.eval.heads import class_order

    order = class_order(head.recipe.class_names, source.classes, num_outputs) if head is not None else None
    top = int(source.labels.max()) + 1 if len(source.labels) else 0
    if top > num_outputs:
        raise InputError(f"{source.name} has labels up to {top - 1} but the classifier has {num_outputs} outputs: "
                         "evaluate it on data with its classes")
    return tuple(order) if order else None


def cmd_eval_classify(args: argparse.Namespace) -> None:
    import torch

    from distill.data.eval_views import EvalView
    from distill.eval.classify import evaluate_classifier
    from distill.eval.heads import HeadClassifier
    from distill.files import atomic_write_text

    source = _labelled_source(args)
    model, head, view, what = (_with_head if args.head else _classifier_inside)(args, args.data == "fashion_mnist")
    order = _checked_order(head, source, head.num_classes if head is not None else model.num_classes)
    if order is not None:
        model = HeadClassifier(model.backbone, head.reordered(order))
        print(f"head outputs reordered to the data's classes ({', '.join(source.classes[:5])}, ...)")
    backbone = model.backbone if head is not None else model
    size = args.image_size or view["size"]
    mean, std = args.mean or view["mean"], args.std or view["std"]
    print(f"{what}; {size} px views, mean {list(mean)}, std {list(std)}")
    eval_view = EvalView(size, mean, std, backbone.config["in_chans"], view["resize_ratio"])
    model = model.to(torch.device(args.device))
    result = evaluate_classifier(model, source, eval_view, args.batch_size, args.precision, args.device,
                                 args.num_workers, desc="classify")
    print(f"classification on {source.name} ({len(source)} images): top-1 {result['top1']:.2f}  "
          f"top-5 {result['top5']:.2f}  loss {result['loss']:.4f}")
    if args.output:
        payload = {"classify": {**result, "checkpoint": str(args.checkpoint), "head": args.head, "data": source.name}}
        atomic_write_text(args.output, json.dumps(payload, indent=2))
        print(f"written to {args.output}")
