#!/usr/bin/env python
"""Dense features of the CPU runs on a dense task built from real images: Fashion-MNIST mosaics (2-4 items on a
56-px canvas, per-pixel class masks; distill/data/mosaics.py).

For each feature source (the DINO demo run's teacher, the DINOv2 CPU run's, the same network at random
initialisation, and raw pixel patches):
  - a linear segmentation probe on frozen last-block patch tokens: mIoU and pixel accuracy on held-out mosaics
    (11 classes: background and the 10 garments);
  - PCA foreground: IoU of the thresholded first component with the true item masks (trained vs random);
  - correspondence on known warps: each mosaic against a randomly warped, re-lit copy of itself; keypoints on the
    items move with the warp, PCK@0.1 of the image side for the nearest-descriptor transfer; also DINO fused with
    DINOv2 (SD-DINO's fusion, alpha 0.5).
Writes runs/dense_study/results.json, and the pictures the README shows (docs/dense/), made by `distill pca`,
`distill correspond` and `distill eval segment` on the mosaics written as PNG files.

    .venv/bin/python tools/dense_study.py [--dino runs/dino_fashion_mnist/checkpoint.pth]
        [--dinov2 runs/dinov2_fashion_mnist/checkpoint.pth] [--train 1500] [--val 300]
"""

import argparse
import json
from pathlib import Path

import torch

from distill.data.mosaics import make_mosaics, warp_points, warped_pair
from distill.dense import extract
from distill.dense.correspondence import fuse
from distill.dense.keypoints import grid_transfer_errors, pck
from distill.dense.pca import mask_iou, pca_picture, upsample_mask
from distill.dense.segmentation import evaluate_segmentation, pixel_patches, train_head
from distill.eval.loading import load_backbone
from distill.models import create_backbone
from distill.models.checkpoint import TrainingCheckpoint, read_checkpoint


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N, S, S] -> [N, 1, S, S] normalised as the run's views are."""
    return (images.float()[:, None] / 255.0 - mean[0]) / std[0]


def random_twin(checkpoint: str):
    """The run's network at random initialisation (seed 0)."""
    run = TrainingCheckpoint(read_checkpoint(checkpoint), checkpoint)
    torch.manual_seed(0)
    return create_backbone(run.backbone, **run.backbone_overrides).eval()


def segmentation(name, train_features, val_features, train_masks, val_masks, classes, epochs, results):
    head = train_head(train_features.patches, train_masks, len(classes), epochs=epochs, desc=f"{name} head")
    metrics = evaluate_segmentation(head, val_features.patches, val_masks, classes)
    results[name] = {"miou": round(metrics["miou"], 2), "pixel_accuracy": round(metrics["pixel_accuracy"], 2)}
    print(f"  segmentation probe, {name}: mIoU {metrics['miou']:.2f}, pixel accuracy {metrics['pixel_accuracy']:.2f}")
    return head


def commands_for_pictures(args, train, val, warped, pictures: Path, out: Path) -> None:
    """The README's pictures, made by the commands a user runs, on mosaics written as PNG files."""
    from PIL import Image

    from distill.cli import main as distill
    from fashion_mnist_mosaics import write_mosaics

    files = out / "files"
    write_mosaics(train, files / "train")
    write_mosaics(val, files / "val")
    Image.fromarray(warped[0].numpy()).save(files / "warped_00000.png")
    dino = ["--checkpoint", args.dino, "--size", "56"]
    shown = [str(files / "val" / "images" / f"{i:05d}.png") for i in range(6)]
    assert distill(["pca", *shown, *dino, "--output", str(pictures / "pca.png")]) == 0
    assert distill(["correspond", shown[0], str(files / "warped_00000.png"), *dino, "--pairs", "12",
                    "--select", "saliency", "--threshold", "0", "--output", str(pictures / "matches.png")]) == 0
    assert distill(["correspond", shown[0], str(files / "warped_00000.png"), *dino, "--with", args.dinov2,
                    "--pairs", "12", "--select", "saliency", "--threshold", "0",
                    "--output", str(pictures / "matches_fused.png")]) == 0
    assert distill(["eval", "segment", *dino, "--train", str(files / "train" / "images"),
                    str(files / "train" / "masks"), "--val", str(files / "val" / "images"),
                    str(files / "val" / "masks"), "--epochs", str(args.epochs), "--pixel-baseline",
                    "--output", str(out / "segment")]) == 0
    (pictures / "segmentation.png").write_bytes((out / "segment" / "segmentation.png").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino", default="runs/dino_fashion_mnist/checkpoint.pth")
    parser.add_argument("--dinov2", default="runs/dinov2_fashion_mnist/checkpoint.pth")
    parser.add_argument("--train", type=int, default=1500, help="training mosaics of the probe")
    parser.add_argument("--val", type=int, default=300, help="held-out mosaics (from the test split)")
    parser.add_argument("--pairs", type=int, default=300, help="warped pairs for the correspondence figure")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", default="runs/dense_study")
    parser.add_argument("--pictures", default="docs/dense")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out, pictures = Path(args.output), Path(args.pictures)
    out.mkdir(parents=True, exist_ok=True)
    pictures.mkdir(parents=True, exist_ok=True)

    train = make_mosaics(args.train, size=56, split="train", seed=0)
    val = make_mosaics(args.val, size=56, split="test", seed=1)
    classes = list(train.classes)
    train_masks = [m.long() for m in train.masks]
    val_masks = [m.long() for m in val.masks]
    dino, dino_setup = load_backbone(args.dino)
    dinov2, dinov2_setup = load_backbone(args.dinov2)
    sources = {"DINO demo run": (dino, dino_setup.mean, dino_setup.std),
               "DINOv2 CPU run": (dinov2, dinov2_setup.mean, dinov2_setup.std),
               "random initialisation": (random_twin(args.dino), dino_setup.mean, dino_setup.std)}
    features = {name: [extract(model, normalised(part.images, mean, std), layers=[-1]) for part in (train, val)]
                for name, (model, mean, std) in sources.items()}
    pixels = [pixel_patches(normalised(part.images, dino_setup.mean, dino_setup.std), dino.patch_size)
              for part in (train, val)]
    results = {"mosaics": {"train": args.train, "val": args.val, "size": 56, "classes": len(classes)},
               "segmentation": {}, "pca_foreground_iou": {}, "warp_pck@0.1": {}}

    print("linear segmentation probe (frozen last-block patch tokens, 8 x 8 grid, logits upsampled to 56 px):")
    for name, (train_features, val_features) in features.items():
        segmentation(name, train_features, val_features, train_masks, val_masks, classes, args.epochs,
                                   results["segmentation"])
    segmentation("raw pixel patches", pixels[0], pixels[1], train_masks, val_masks, classes, args.epochs,
                 results["segmentation"])
    for name in ("DINO demo run", "DINOv2 CPU run"):  # the multi-layer variant: the last 4 blocks concatenated
        model, mean, std = sources[name]
        four = [extract(model, normalised(part.images, mean, std), layers=[-4, -3, -2, -1]) for part in (train, val)]
        segmentation(f"{name}, last 4 blocks", four[0], four[1], train_masks, val_masks, classes, args.epochs,
                     results["segmentation"])

    print("PCA foreground (first component thresholded at 0.5, against the items' pixels):")
    for name in ("DINO demo run", "DINOv2 CPU run", "random initialisation"):
        picture = pca_picture(features[name][1])
        ious = [mask_iou(upsample_mask(picture.foreground[i], (56, 56)), val.masks[i] > 0) for i in range(args.val)]
        results["pca_foreground_iou"][name] = round(100 * sum(ious) / len(ious), 2)
        print(f"  {name}: mean IoU {results['pca_foreground_iou'][name]:.2f}")

    print("correspondence on known warps (PCK@0.1 of the 56-px side, keypoints on the items):")
    generator = torch.Generator().manual_seed(0)
    warped, truths, points = [], [], []
    for i in range(args.pairs):
        image, _, homography = warped_pair(val.images[i], val.masks[i], generator)
        ys, xs = torch.nonzero(val.masks[i] > 0, as_tuple=True)
        chosen = torch.randperm(len(xs), generator=generator)[:10]
        source_points = torch.stack([xs[chosen], ys[chosen]], dim=1).float()
        target_points = warp_points(homography, source_points)
        inside = ((target_points >= 0) & (target_points <= 55)).all(dim=1)
        warped.append(image)
        points.append(source_points[inside])
        truths.append(target_points[inside])
    warped = torch.stack(warped)

    def warp_pck(grids_a, grids_b, centres) -> float:
        errors = torch.cat([grid_transfer_errors(grids_a[i], grids_b[i], centres, centres, points[i], truths[i])
                            for i in range(args.pairs)])
        return pck(errors, torch.full_like(errors, 56.0), (0.1,))["0.1"]

    def ceiling(centres) -> float:
        """The best a grid can do: each true target point's own nearest cell centre."""
        flat = centres.reshape(-1, 2)
        errors = torch.cat([torch.cdist(truths[i], flat).min(dim=1).values for i in range(args.pairs)])
        return pck(errors, torch.full_like(errors, 56.0), (0.1,))["0.1"]

    for stride in (7, 1):  # the patch grid, and every pixel (overlapping patches: Amir et al.'s dense descriptors)
        grids = {}
        row = results["warp_pck@0.1"].setdefault(f"stride {stride}", {})
        for name, (model, mean, std) in sources.items():
            a = extract(model, normalised(val.images[:args.pairs], mean, std), stride=stride, chunk=8)
            b = extract(model, normalised(warped, mean, std), stride=stride, chunk=8)
            grids[name] = (a.patches, b.patches, a.centers())
            row[name] = round(warp_pck(*grids[name]), 2)
            print(f"  stride {stride}, {name}: {row[name]:.2f}")
        fused = [fuse([grids["DINO demo run"][k], grids["DINOv2 CPU run"][k]], [0.5, 0.5]) for k in (0, 1)]
        row["DINO + DINOv2 fused"] = round(warp_pck(fused[0], fused[1], grids["DINO demo run"][2]), 2)
        row["ceiling of the grid (true cell)"] = round(ceiling(grids["DINO demo run"][2]), 2)
        print(f"  stride {stride}, DINO + DINOv2 fused: {row['DINO + DINOv2 fused']:.2f}; ceiling of the grid "
              f"{row['ceiling of the grid (true cell)']:.2f}")

    (out / "results.json").write_text(json.dumps(results, indent=2))
    commands_for_pictures(args, train, val, warped, pictures, out)
    print(f"results: {out / 'results.json'}; pictures: {pictures}/")


if __name__ == "__main__":
    main()
