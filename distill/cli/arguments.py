"""What several commands parse alike."""

import argparse

from distill.config import number, parse_sets  # noqa: F401  (parse_sets: the commands import it from here)


def add_backbone_choice(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --backbone, --set and --checkpoint-key: which network to load, from any file."""
    parser.add_argument("--checkpoint", required=True, help="any checkpoint `create_backbone` loads, or a run's")
    parser.add_argument("--backbone", help="registry name (default: the run's, or recognised from the weights)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="backbone overrides, e.g. depth=4")
    parser.add_argument("--checkpoint-key", help="network in a training checkpoint: teacher (default), student")


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """How an evaluation command runs and where its results go: the same flags for every such command."""
    parser.add_argument("--batch-size", type=number(at_least=1), default=256)
    parser.add_argument("--num-workers", type=number(at_least=0), default=2)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--output", help="also write the results as JSON to this file")


def check_image_files(paths, hint: str = "") -> None:
    """Image-file arguments, checked before anything is loaded: a folder or a missing file is refused by name
    (`hint` says what to do instead of a folder)."""
    from pathlib import Path

    from distill.data.filelists import readable_name
    from distill.errors import InputError

    folders = [str(p) for p in paths if Path(p).is_dir()]
    if folders:
        raise InputError(f"{readable_name(folders[0])} is a folder, not an image file{hint}")
    missing = [readable_name(str(p)) for p in paths if not Path(p).is_file()]
    if missing:
        raise InputError(f"image file(s) not found: {', '.join(missing)}")
