"""`distill eval retrieval`: how well a backbone's descriptors find, for each query image, the gallery images a
ground truth pairs it with: mAP, recall@1/5/10 and copy detection's micro-average precision (distill.eval.retrieval).

The queries and the gallery are images (a folder or a file list each, or fashion_mnist's splits); the descriptor
is the class token (as DINO's retrieval evaluation) or DINO's copy-detection descriptor (class token with GeM of
the patch tokens). For embedding stores already written by `distill-curate embed`, `distill-curate
evaluate-retrieval` computes the same figures."""

import argparse
import os
from typing import List

from distill.cli.arguments import add_backbone_choice, add_compute_arguments, parse_sets
from distill.errors import InputError


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `distill eval retrieval`."""
    add_backbone_choice(parser)
    parser.add_argument("--queries", required=True, help="query images: a folder, a file list, or fashion_mnist:SPLIT")
    parser.add_argument("--gallery", required=True, help="gallery images: a folder, a file list, or fashion_mnist:SPLIT")
    parser.add_argument("--truth", required=True,
                        help="pairs `query<TAB>gallery`, each a path (relative: from the truth file's folder or the "
                             "image set's) or a row number of its set")
    parser.add_argument("--k", type=int, default=100, help="gallery images ranked for each query")
    parser.add_argument("--descriptor", choices=("cls", "copy"), default="cls",
                        help="cls: the class token; copy: class token + GeM of the patch tokens (DINO)")
    parser.add_argument("--gem-p", type=float, default=4.0)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="with --descriptor copy")
    parser.add_argument("--image-size", type=int, default=0, help="default: the run's global crop size")
    parser.add_argument("--mean", type=float, nargs="+")
    parser.add_argument("--std", type=float, nargs="+")
    add_compute_arguments(parser)
    parser.set_defaults(run=cmd_eval_retrieval)


def _images(spec: str, what: str):
    from distill.data.configs import DatasetConfig
    from distill.data.datasets import build_image_source

    if spec.startswith("fashion_mnist"):
        split = spec.partition(":")[2] or "test"
        return build_image_source(DatasetConfig(kind="fashion_mnist"), split)
    if not os.path.exists(spec):
        raise InputError(f"--{what} {spec} does not exist: give a folder of images, a file list, or "
                         "fashion_mnist:train|test")
    kind = "filelist" if os.path.isfile(spec) else "folder"  # every image under the folder, sub-folders included
    return build_image_source(DatasetConfig(kind=kind, path=spec), None)


def _image_numbers(names: List[str], source, spec: str, flag: str, truth: str) -> List[int]:
    """The images of a set the truth file's names stand for: a path (as written, from the truth file's folder, from
    the image set's folder) or an image number of the set; found before any image is encoded."""
    paths = getattr(source, "paths", None) or []
    where = {os.path.abspath(p): i for i, p in enumerate(paths)}
    truth_folder = os.path.dirname(os.path.abspath(truth))
    set_folder = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    out = []
    for name in names:
        image = next((where[os.path.abspath(form)] for form in
                      (name, os.path.join(truth_folder, name), os.path.join(set_folder, name))
                      if os.path.abspath(form) in where), None)
        if image is None and name.isdigit() and int(name) < len(source):
            image = int(name)
        if image is None:
            raise InputError(f"--truth {truth} names {name!r}, which is not one of the images of --{flag} "
                             f"({source.name}): write paths as the set lists them or image numbers, one "
                             "`query<TAB>gallery` pair a line")
        out.append(image)
    return out


def _rows(images: List[int], encoded, names: List[str], flag: str, truth: str) -> List[int]:
    """The descriptor rows of those images (encoded: the image number of each row)."""
    row_of = {int(i): r for r, i in enumerate(encoded)}
    missing = next((name for name, image in zip(names, images) if image not in row_of), None)
    if missing is not None:
        raise InputError(f"--truth {truth} names {missing!r} of --{flag}, which could not be read: replace the "
                         "file or leave its pairs out")
    return [row_of[image] for image in images]


def _descriptors(args, model, view, source, desc: str):
    """(L2-normalised descriptors [N, D], the image number of each row)."""
    import torch.nn.functional as F

    from distill.eval.descriptors import check_scales, copy_descriptor
    from distill.eval.features import extract_source_features

    if args.descriptor == "copy":
        scales = check_scales(args.scales)

        def encode(images):
            return copy_descriptor(model, images, args.gem_p, scales)
    else:
        encode = model
    features, _, indices = extract_source_features(encode, source, view, args.batch_size, args.precision,
                                                   args.device, args.num_workers, desc, with_indices=True)
    return F.normalize(features.float(), dim=1), indices


def nearest(queries, gallery, k: int, chunk: int = 4096):
    """Exact cosine search of normalised rows (torch tensors): (scores, ids) [len(queries), k], best first."""
    import torch

    scores, ids = [], []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ gallery.T
        top = similarity.topk(k, dim=1)
        scores.append(top.values)
        ids.append(top.indices)
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from distill.data.eval_views import EvalView
    from distill.eval.loading import load_backbone
    from distill.eval.retrieval import format_metrics, read_truth, retrieval_metrics, truth_sets, write_metrics

    if args.k < 1:
        raise InputError(f"--k is the number of gallery images ranked for each query, at least 1, got {args.k}")
    pairs = read_truth(args.truth)  # a bad truth file stops before any image is read
    queries_source, gallery_source = _images(args.queries, "queries"), _images(args.gallery, "gallery")
    query_names, gallery_names = [a for a, _ in pairs], [b for _, b in pairs]
    query_images = _image_numbers(query_names, queries_source, args.queries, "queries", args.truth)
    gallery_images = _image_numbers(gallery_names, gallery_source, args.gallery, "gallery", args.truth)
    fashion = args.queries.startswith("fashion_mnist") or args.gallery.startswith("fashion_mnist")
    model, setup = load_backbone(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key, fashion)
    view = EvalView(args.image_size or setup.image_size, args.mean or setup.mean, args.std or setup.std,
                    model.config["in_chans"])
    print(f"backbone from {setup.source}; {args.descriptor} descriptors of {view.size} px views")
    queries, query_encoded = _descriptors(args, model, view, queries_source, "queries")
    gallery, gallery_encoded = _descriptors(args, model, view, gallery_source, "gallery")
    query_rows = _rows(query_images, query_encoded, query_names, "queries", args.truth)
    gallery_rows = _rows(gallery_images, gallery_encoded, gallery_names, "gallery", args.truth)
    truth = truth_sets(len(queries), zip(query_rows, gallery_rows))
    k = min(args.k, len(gallery))
    scores, ids = nearest(queries, gallery, k)
    results = retrieval_metrics(scores, ids, truth)
    print(format_metrics(results, f"{len(queries)} queries of {queries_source.name} against {len(gallery)} images "
                                  f"of {gallery_source.name}, top {k}:"))
    if args.output:
        write_metrics(args.output, {**results, "k": k, "descriptor": args.descriptor, "checkpoint": args.checkpoint,
                                    "queries_images": args.queries, "gallery_images": args.gallery, "truth": args.truth})
        print(f"written to {args.output}")

