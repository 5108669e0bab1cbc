"""`distill export CHECKPOINT --to onnx|safetensors|timm|hf --output PATH`: a network of any checkpoint `distill`
loads (runs of this project, their exported backbones, the official DINO / DeiT / DINOv2 files, Transformers
folders) written for other tools. A checkpoint whose weights hold a classifier head (DeiT's files and runs)
exports the classifier, any other the backbone; --no-head exports the backbone of a classifier."""

import argparse
import sys
from typing import List, Optional, Tuple

from distill.cli.arguments import parse_sets
from distill.errors import InputError

TARGETS = ("onnx", "safetensors", "timm", "hf")

EPILOG = """outputs:
  onnx         the graph with dynamic batch and image size, checked against PyTorch (needs onnx, onnxruntime:
               pip install 'distill[export]')
  safetensors  the bare state dict in the official layout; its header names the architecture, mean, std and
               image size, so `distill` (load_backbone, --checkpoint) rebuilds the network from the file alone
  timm         the state dict in timm's layout, and OUTPUT.json with the timm model name, keyword arguments and
               pretrained config for timm.create_model(name, pretrained=True, pretrained_cfg_overlay=...);
               for DINO's ViTs, DeiT and DINOv2
  hf           a folder (config.json, model.safetensors, preprocessor_config.json) that transformers'
               AutoModel.from_pretrained loads: Dinov2Model, Dinov2WithRegistersModel, ViTModel,
               ViTForImageClassification, DeiTModel or DeiTForImageClassificationWithTeacher. Without
               transformers installed config.json is written by hand in the same schema; loading the folder
               needs it (pip install 'distill[hf]')

An existing OUTPUT is refused unless --force. Every output is written beside its target and renamed over it:
an export that fails leaves nothing, and with --force the old output stays intact until the new one is whole."""


def add_export_parser(commands) -> argparse.ArgumentParser:
    """Add `distill export` to the subcommands of `distill` (the object add_subparsers returned)."""
    export = commands.add_parser(
        "export", help="write a network for other tools: ONNX, safetensors, timm, Hugging Face Transformers",
        description="Write the network of any checkpoint distill loads (a run, an exported backbone, an official "
                    "DINO / DeiT / DINOv2 file, a Transformers folder) for other tools. Weights that hold a "
                    "classifier head (DeiT's files and runs) export the classifier, any other the backbone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a run's checkpoint, an exported or official weight file, or a Transformers folder")
    export.add_argument("--to", required=True, choices=TARGETS, help="output format (see below)")
    export.add_argument("--output", required=True, metavar="PATH", help="file to write (a folder for --to hf)")
    export.add_argument("--backbone", help="registry name (default: the run's, the file's, or recognised from the "
                                           "weights)")
    export.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="backbone overrides, e.g. depth=4 (for files of non-default sizes)")
    export.add_argument("--checkpoint-key", help="network in a training checkpoint: teacher (default), student")
    export.add_argument("--no-head", action="store_true", help="export the backbone of a classifier, without heads")
    export.add_argument("--fp16", action="store_true", help="float16 weights (ONNX: a float16 graph)")
    export.add_argument("--image-size", "--size", type=int, nargs="+", metavar="N",
                        help="N or H W: build the network for this input size (its position embedding resized "
                             "once, at export); ONNX traces and checks at it. Default: the run's or model's size")
    export.add_argument("--force", action="store_true", help="replace an existing output")
    export.set_defaults(run=cmd_export)

    def one_line_error(message: str) -> None:  # a wrong argument: one line, not the whole usage
        sys.stderr.write(f"{export.prog}: error: {message} (see `distill export --help`)\n")
        sys.exit(2)

    export.error = one_line_error
    return export


def _image_size(values: Optional[List[int]]) -> Optional[Tuple[int, int]]:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise InputError(f"--image-size takes N or H W (positive pixels), got {' '.join(map(str, values))}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _export_onnx(item, output: str, fp16: bool, force: bool) -> str:
    """The ONNX graph of the network (distill/export/onnx.py), written beside OUTPUT first; returns the summary."""
    from distill.export.onnx import export_onnx
    from distill.export.weights import write_staged

    report = write_staged(output, lambda target: export_onnx(item.model, str(target), image_size=item.image_size,
                                                             in_chans=item.in_chans, fp16=fp16, check=True), force)
    outputs = ", ".join(report.outputs)
    sizes = ", ".join(f"{h}x{w}" for h, w in report.checked_sizes)
    return f"outputs {outputs}; max deviation from PyTorch {report.max_deviation:.2e} at {sizes}"


def cmd_export(args: argparse.Namespace) -> None:
    from distill.export.weights import check_output, load_exportable, write_hf, write_safetensors, write_timm

    size = _image_size(args.image_size)
    check_output(args.output, args.force, folder=args.to == "hf")  # before loading: refusals come at once
    if args.to == "timm":
        check_output(f"{args.output}.json", args.force)
    item = load_exportable(args.checkpoint, args.backbone, parse_sets(args.set), args.checkpoint_key, size,
                           heads=not args.no_head)
    what = f"{item.architecture} {item.kind}"
    if item.overrides:
        what += f" ({', '.join(f'{k}={v}' for k, v in sorted(item.overrides.items()))})"
    precision = "float16" if args.fp16 else "float32"
    if args.to == "safetensors":
        path = write_safetensors(item, args.output, args.fp16, args.force)
        print(f"{path}: safetensors ({precision}), {what}")
    elif args.to == "timm":
        timm = write_timm(item, args.output, args.fp16, args.force)
        print(f"{timm.weights}: timm {timm.model_name} ({precision}), {what}")
        print(f"{timm.sidecar}: timm pretrained config; load with {timm.usage()}")
    elif args.to == "hf":
        hf = write_hf(item, args.output, args.fp16, args.force)
        print(f"{hf.folder}: Transformers {hf.hf_class} ({precision}), {what}")
    else:
        summary = _export_onnx(item, args.output, args.fp16, args.force)
        print(f"{args.output}: onnx ({precision}), {what}; {summary}")
