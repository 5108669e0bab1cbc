"""The `distill` command: `distill models`, `distill baseline`, ...

Errors meant for the user (DistillError) print as one line and exit with status 2; anything else is a bug
and keeps its traceback.
"""

import argparse
import sys
from typing import List, Optional

from distill.cli.arguments import add_backbone_choice, add_compute_arguments, number, parse_sets
from distill.data.filelists import describe_os_error
from distill.errors import DistillError
from distill.logs import configure_logging


def _cmd_models(args: argparse.Namespace) -> None:
    import torch

    from distill.eval.flops import backbone_flops, count_parameters
    from distill.models import create_backbone, get_spec, list_backbones

    names = list_backbones(args.filter)
    if not names:
        raise DistillError(f"no backbone matches {args.filter!r}; `distill models` lists them all")
    print(f"{'name':<34} {'family':<7} {'params (M)':>10} {'resolution':>10} {'GFLOPs':>9}")
    for name in names:
        spec = get_spec(name)
        with torch.device("meta"):  # shapes only: counting ViT-g's parameters allocates nothing
            params = count_parameters(create_backbone(name))
        gflops = "-" if args.no_flops else f"{backbone_flops(name) / 1e9:9.2f}"
        print(f"{name:<34} {spec.family:<7} {params / 1e6:10.2f} {spec.img_size:>10} {gflops:>9}")


def _cmd_baseline(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.eval.baseline import BaselineConfig, main

    main(load_config(BaselineConfig, args.config, args.overrides))


def _knn_line(name: str, result, k: int) -> str:
    entry = result.get(k) or result.get(str(k))
    return f"  {name:<34} {entry['top1']:6.2f}" if entry else ""


def print_training_summary(results, ks) -> None:
    k = 20 if 20 in ks else ks[0]
    done = "done" if results.get("status") == "finished" else f"stopped ({results.get('stop_reason')})"
    print(f"{done}: {results.get('steps')} of {results.get('total_steps')} steps ({results.get('epochs')} epochs) in "
          f"{results.get('train_minutes')} min of training, {results.get('images_per_second', 0)} images/s")
    rows = [("raw pixels", results.get("knn_raw_pixels")), ("backbone at start", results.get("knn_start")),
            ("trained backbone", results.get("knn_end"))]
    lines = [_knn_line(name, result, k) for name, result in rows if result]
    if lines:
        print(f"weighted kNN top-1 (%), k={k}:")
        print("\n".join(line for line in lines if line))


DEFAULTS = "DINO, ViT-S/16 at 224 px, 100 epochs"


def _check_recipe_given(args: argparse.Namespace) -> None:
    """A bare `distill train` would start the built-in defaults, days of CPU time: a recipe or an override is asked
    for; overrides alone run the defaults with them (which _cmd_train says once they are checked)."""
    if args.config or args.overrides:
        return
    raise DistillError(f"give a recipe, e.g. configs/demo/dino_fashion_mnist.yaml (the demo; configs/ holds one "
                       f"per paper setting), and key=value overrides; key=value overrides alone run the built-in "
                       f"defaults ({DEFAULTS})")


def _cmd_train(args: argparse.Namespace) -> int:
    """Exit status 0 when the run ended as planned (or at train.max_steps); 128 + the signal's number when a
    signal stopped it (checkpoint written: the same command resumes), as a shell reports a signalled process."""
    from distill.engine.train_config import check_data_paths, load_train_config

    _check_recipe_given(args)
    config = load_train_config(args.config, args.overrides)  # a wrong key, value or path stops here, in a second
    check_data_paths(config)
    if not args.config:
        print(f"no recipe: the built-in defaults ({DEFAULTS}) with the overrides given")
    from distill import distributed
    from distill.engine.trainer import run_training

    trainer = run_training(config)
    if distributed.rank_from_env() == 0:
        print_training_summary(trainer.results, trainer.config.eval.knn_k)
        print(f"run folder: {trainer.config.train.output_dir}/")
    if trainer.stop_signal is not None:
        print(f"stopped early by {trainer.stop_reason} at step {trainer.step} of {trainer.total_steps}: checkpoint "
              "written; run the same command to resume", file=sys.stderr)
        return 128 + int(trainer.stop_signal)
    return 0


def _cmd_submit(args) -> None:
    from distill.launch.slurm import Resources
    from distill.launch.submit import submit

    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                          cpus_per_task=args.cpus_per_task, timeout_min=args.timeout, partition=args.partition,
                          account=args.account, qos=args.qos, constraint=args.constraint, comment=args.comment,
                          exclusive=args.exclusive, mem_gb=args.mem_gb, signal_delay_s=args.signal_delay)
    _check_recipe_given(args)
    job = submit(args.config, args.overrides, resources, args.folder, args.local, args.name,
                 check_data=not args.no_data_check)
    where = "local processes" if args.local else "SLURM"
    print(f"submitted job {job.job_id} ({where}, {args.nodes} node(s) x {resources.tasks} task(s))")
    print(f"job folder: {job.paths.folder}")
    print(f"logs: {job.paths.stdout} and {job.paths.stderr}")
    if args.wait:
        results = job.results()[0]
        print_training_summary(results, [20])


def _model_and_view(args: argparse.Namespace):
    """The backbone of --checkpoint and the evaluation view (size and normalisation) that goes with it."""
    from distill.data.eval_views import EvalView
    from distill.eval.loading import load_backbone

    fashion = args.data == "fashion_mnist" and not getattr(args, "images", None)  # its statistics for its images
    model, setup = load_backbone(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key, fashion)
    size = args.image_size or setup.image_size
    view = EvalView(size, args.mean or setup.mean, args.std or setup.std, model.config["in_chans"])
    print(f"backbone from {setup.source}; {size} px views, mean {view.mean}, std {view.std}")
    return model, view


def _source(args: argparse.Namespace, split: str, limit: int):
    """Fashion-MNIST, or the folder / file list of --data, at a split (a sub-folder when it exists)."""
    from distill.data.configs import DatasetConfig
    from distill.data.datasets import build_image_source

    if args.data == "fashion_mnist":
        return build_image_source(DatasetConfig(kind="fashion_mnist", limit=limit), split)
    return build_image_source(DatasetConfig(kind="auto", path=args.data, limit=limit), split, option="--data")


def _features(args, encode, view, source, desc):
    from distill.eval.features import extract_source_features

    return extract_source_features(encode, source, view, args.batch_size, args.precision, args.device,
                                   args.num_workers, desc)


def _write_json(path, payload) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"written to {path}")


def _cmd_eval_knn(args: argparse.Namespace) -> None:
    from distill.eval.knn import knn_classify

    model, view = _model_and_view(args)
    train, val = _source(args, args.train_split, args.train_limit), _source(args, args.val_split, args.val_limit)
    bank, bank_labels = _features(args, model, view, train, "kNN bank")
    queries, query_labels = _features(args, model, view, val, "kNN queries")
    if bank_labels is None or query_labels is None:
        raise DistillError("kNN evaluation needs labelled data: an ImageFolder tree or a file list with labels")
    results = knn_classify(bank, bank_labels, queries, query_labels, args.k, args.temperature)
    print(f"weighted kNN on {val.name} ({len(val)} queries, {len(train)} in the bank, T={args.temperature}):")
    for k, scores in results.items():
        print(f"  k={k:<4} top-1 {scores['top1']:6.2f}  top-5 {scores['top5']:6.2f}")
    _write_json(args.output, {"knn": results})


def _save_head(args: argparse.Namespace, classifier, view, train, val, result) -> None:
    """--save-head: the classifier with the recipe of its features, for `distill eval classify --head`."""
    from distill.eval.heads import HeadRecipe, save_linear_head

    outputs = classifier.out_features
    names = list(train.classes[:outputs]) if len(train.classes) >= outputs else None
    recipe = HeadRecipe(args.n_last_blocks, args.avgpool, view.size, list(view.mean), list(view.std),
                        view.resize_ratio, names)
    notes = {"top1": result["top1"], "top5": result["top5"], "lr": result["lr"], "checkpoint": str(args.checkpoint),
             "train_data": train.name, "val_data": val.name}
    save_linear_head(args.save_head, classifier, recipe, notes)
    print(f"linear head ({outputs} classes over {result['feature_dim']}-d features) written to {args.save_head}")


def _cmd_eval_linear(args: argparse.Namespace) -> None:
    from distill.eval.linear import fit_linear_probe, linear_features

    model, view = _model_and_view(args)
    train, val = _source(args, args.train_split, args.train_limit), _source(args, args.val_split, args.val_limit)
    encode = lambda x: linear_features(model, x, args.n_last_blocks, args.avgpool)  # noqa: E731
    train_features, train_labels = _features(args, encode, view, train, "train features")
    val_features, val_labels = _features(args, encode, view, val, "val features")
    if train_labels is None or val_labels is None:
        raise DistillError("a linear probe needs labelled data: an ImageFolder tree or a file list with labels")
    result, classifier = fit_linear_probe(train_features, train_labels, val_features, val_labels, epochs=args.epochs)
    print(f"linear probe on {val.name} ({result['feature_dim']}-d features, lr {result['lr']:g}): "
          f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")
    if args.save_head:
        _save_head(args, classifier, view, train, val, result)
    _write_json(args.output, {"linear": result})


def _cmd_attention(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from distill.cli.dense import resolve_images
    from distill.data.datasets import FileImages
    from distill.eval.attention import attention_figure

    if Path(args.output).suffix.lower() != ".png":
        raise DistillError(f"--output {args.output} must be a .png file (the picture of the maps)")
    paths = resolve_images(args.images) if args.images else None  # files, folders and lists, checked before loading
    model, view = _model_and_view(args)
    if paths is not None:
        source = FileImages(paths, None, [], "images")
        count = min(args.count or len(paths), len(paths))
        where = f"{count} of the {len(paths)} image(s) of --images" if count < len(paths) else "--images"
    else:
        count = args.count or 8
        source = _source(args, args.val_split, count)
        count = min(count, len(source))
        where = f"the first {count} image(s) of {'Fashion-MNIST test' if args.data == 'fashion_mnist' else args.data}"
    print(f"images: {where}")
    figure = attention_figure(model, source, view, count, Path(args.output), torch.device(args.device),
                              args.threshold)
    if figure.skipped:
        print(f"left out {len(figure.skipped)} unreadable image(s): {'; '.join(figure.skipped)}")
    print(f"attention maps of {figure.shown} image(s): {figure.path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Teach Vision Transformers: DINO, DeiT, DINOv2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the registered backbones with parameters and GFLOPs")
    models.add_argument("--filter", help="shell pattern on the name, e.g. 'dinov2_*'")
    models.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    models.set_defaults(run=_cmd_models)

    def add_checkpoint_arguments(sub: argparse.ArgumentParser, data_required: bool = True) -> None:
        add_backbone_choice(sub)
        sub.add_argument("--data", default="fashion_mnist" if not data_required else None, required=data_required,
                         help="fashion_mnist, an ImageFolder tree (with train/ and val/), or a labelled file list")
        sub.add_argument("--train-split", default="train")
        sub.add_argument("--val-split", default="val", help="sub-folder of --data (Fashion-MNIST: test)")
        sub.add_argument("--train-limit", type=number(at_least=0), default=0, help="use only the first N training images")
        sub.add_argument("--val-limit", type=number(at_least=0), default=0)
        sub.add_argument("--image-size", type=number(at_least=0), default=0, help="default: the run's global crop size")
        sub.add_argument("--mean", type=float, nargs="+")
        sub.add_argument("--std", type=float, nargs="+")
        add_compute_arguments(sub)

    evaluate = commands.add_parser("eval", help="evaluate: kNN, linear probe, classification, keypoints, segmentation")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    knn = kinds.add_parser("knn", help="weighted kNN (cosine, T=0.07) for several k at once")
    add_checkpoint_arguments(knn)
    knn.add_argument("--k", type=number(at_least=1), nargs="+", default=[10, 20, 100, 200])
    knn.add_argument("--temperature", type=number(float, above=0), default=0.07)
    knn.set_defaults(run=_cmd_eval_knn)
    linear = kinds.add_parser("linear", help="linear probe on frozen class tokens of the last blocks")
    add_checkpoint_arguments(linear)
    linear.add_argument("--n-last-blocks", type=number(at_least=1), default=4, help="concatenate the class tokens of these")
    linear.add_argument("--avgpool", action="store_true", help="also the average of the last block's patch tokens")
    linear.add_argument("--epochs", type=number(at_least=1), default=30)
    linear.add_argument("--save-head", metavar="PATH",
                        help="also write the classifier with the recipe of its features (for eval classify --head)")
    linear.set_defaults(run=_cmd_eval_linear)

    from distill.cli.classify import add_classify_arguments

    classify = kinds.add_parser("classify", help="top-1 / top-5 of a classifier (a DeiT) or of a backbone with a "
                                                 "linear head (--head), on labelled images")
    add_classify_arguments(classify)

    from distill.cli.retrieval import add_retrieval_arguments

    retrieval = kinds.add_parser("retrieval", help="mAP, recall@k and copy detection's µAP of queries against a "
                                                   "gallery, from a ground truth of pairs")
    add_retrieval_arguments(retrieval)

    attention = commands.add_parser("attention", help="class-token self-attention maps of the last block, as PNG")
    add_backbone_choice(attention)
    attention.add_argument("--images", nargs="+", help="image files, folders or file lists (.txt)")
    attention.add_argument("--data", default="fashion_mnist",
                           help="without --images: fashion_mnist (its test images), or a folder / file list")
    attention.add_argument("--val-split", default="val", help="sub-folder of --data taken when it exists")
    attention.add_argument("--count", type=number(at_least=1),
                           help="images shown (default: every image of --images, or the first 8 of --data)")
    attention.add_argument("--threshold", type=number(float, above=0, below=1), default=0.6,
                           help="attention mass kept by each head's mask, in (0, 1)")
    attention.add_argument("--image-size", "--size", type=number(at_least=0), default=0,
                           help="default: the run's global crop size, or the model's")
    attention.add_argument("--mean", type=float, nargs="+", help="default: the run's, or the model's")
    attention.add_argument("--std", type=float, nargs="+")
    attention.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    attention.add_argument("--output", default="attention.png", help="the picture (.png)")
    attention.set_defaults(run=_cmd_attention)

    from distill.cli.dense import add_dense_commands

    add_dense_commands(commands, kinds)
    from distill.cli.export import add_export_parser
    add_export_parser(commands)

    train = commands.add_parser("train", help="train with a YAML recipe and key=value overrides (resumes by itself)")
    train.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/demo/dino_fashion_mnist.yaml (without "
                                                 f"one, overrides apply to the built-in defaults: {DEFAULTS})")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=10 data.batch_size=128")
    train.set_defaults(run=_cmd_train)

    submit = commands.add_parser("submit", help="run a training recipe as a SLURM job (submitit), or --local")
    submit.add_argument("config", nargs="?", help="YAML recipe, as for `distill train`")
    submit.add_argument("overrides", nargs="*", help="key=value overrides, as for `distill train`")
    submit.add_argument("--nodes", type=number(at_least=1), default=1, help="machines of the job")
    submit.add_argument("--gpus-per-node", type=number(at_least=0), default=0, help="GPUs asked for on each node")
    submit.add_argument("--tasks-per-node", type=number(at_least=0), default=0, help="processes per node (default: one per GPU)")
    submit.add_argument("--cpus-per-task", type=number(at_least=1), default=8,
                        help="cores of each process (its loader workers and threads)")
    submit.add_argument("--partition", help="SLURM partition (sbatch --partition)")
    submit.add_argument("--timeout", type=number(at_least=1), default=60, help="minutes")
    submit.add_argument("--account", help="account charged (sbatch --account)")
    submit.add_argument("--qos", help="quality of service (sbatch --qos)")
    submit.add_argument("--constraint", help="node features required, e.g. volta32gb (sbatch --constraint)")
    submit.add_argument("--comment", help="text attached to the job (sbatch --comment)")
    submit.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    submit.add_argument("--mem-gb", type=number(at_least=1), help="memory per node in GB (default: the cluster's)")
    submit.add_argument("--signal-delay", type=number(at_least=0), default=120, help="seconds between the signal and the end")
    submit.add_argument("--folder", help="where job folders go (default: <train.output_dir>/jobs)")
    submit.add_argument("--name", help="job name")
    submit.add_argument("--local", action="store_true", help="the same job as processes on this machine, no SLURM")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its results")
    submit.add_argument("--no-data-check", action="store_true",
                        help="do not check here that the data paths exist (they exist only on the compute nodes)")
    submit.set_defaults(run=_cmd_submit)

    baseline = commands.add_parser("baseline", help="kNN baselines on Fashion-MNIST: raw pixels and a random ViT")
    baseline.add_argument("config", nargs="?", help="YAML recipe (e.g. configs/demo/baseline.yaml)")
    baseline.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1]")
    baseline.set_defaults(run=_cmd_baseline)
    return parser


def _python_stack_on_crash() -> None:
    """A crash below Python (a segmentation fault, an abort from a native library) prints the Python stack of every
    thread to stderr, so that a dead rank of a multi-process job says where it died."""
    import faulthandler

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, ValueError, OSError):  # stderr replaced by an object without a file descriptor
            pass


def _check_device(args: argparse.Namespace) -> None:
    """--device cuda where no GPU is visible: one line for every command that has the option."""
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DistillError("--device cuda, but no CUDA device is visible: use --device cpu")


def main(argv: Optional[List[str]] = None) -> int:
    _python_stack_on_crash()
    args = build_parser().parse_args(argv)
    if args.command in ("baseline", "train", "submit") and args.config and "=" in args.config:  # overrides, no recipe
        args.overrides, args.config = [args.config, *args.overrides], None
    configure_logging(args.verbose)
    try:
        _check_device(args)
        status = args.run(args)
    except DistillError as error:
        print(f"distill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the file system refused (a file where a folder should be, no permission, no space)
        if args.verbose:
            raise
        print(f"distill {args.command}: error: {describe_os_error(error)} (-v shows where)", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0

