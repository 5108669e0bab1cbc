"""The `distill` command: `distill models`, `distill baseline`, ...

Errors meant for the user (DistillError) print as one line and exit with status 2; anything else is a bug
and keeps its traceback.
"""

import argparse
import logging
import sys
from typing import List, Optional

from distill.errors import DistillError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Teach Vision Transformers: DINO, DeiT, DINOv2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the registered backbones with parameters and GFLOPs")
    models.add_argument("--filter", help="shell pattern on the name, e.g. 'dinov2_*'")
    models.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    models.set_defaults(run=_cmd_models)

    baseline = commands.add_parser("baseline", help="kNN baselines on Fashion-MNIST: raw pixels and a random ViT")
    baseline.add_argument("config", nargs="?", help="YAML recipe (e.g. configs/demo/baseline.yaml)")
    baseline.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1]")
    baseline.set_defaults(run=_cmd_baseline)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "baseline" and args.config and "=" in args.config:  # overrides without a recipe
        args.overrides, args.config = [args.config, *args.overrides], None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.run(args)
    except DistillError as error:
        print(f"distill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
