#!/usr/bin/env python
"""Embedding throughput of `distill-curate embed` against timm's forward of the same architecture and precision.

Both sides embed the same folder of JPEG photos (scikit-image's sample images, 224-500 px) with ViT-S/16 at
224 px and the same weights: ours is the embed step itself (decode, resize and centre crop, forward, L2 norm,
float16 shards on disk); timm's is its own evaluation transform in a DataLoader with the same workers, then
forward_features' class token under inference_mode. A second figure times the forward alone on one batch.

    .venv/bin/python tools/bench_embed.py [--rounds 5] [--precision auto]
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

import bench_common
from bench_backbone import images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=400, help="photos (the folder tools/bench_data.py uses)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has it) | fp32 | bf16")
    args = parser.parse_args()

    import timm
    from timm.data import create_transform, resolve_data_config

    from data_curation.embed import embed_images
    from distill.models import create_backbone, load_pretrained
    from distill.precision import autocast, resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    folder = bench_common.photo_folder(Path(tempfile.gettempdir()) / "distill_bench_photos", args.images)
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    ours = create_backbone("vit_small").eval()
    load_pretrained(ours, reference.state_dict())
    weights = work / "vit_small.pth"
    torch.save(ours.state_dict(), weights)

    def ours_round() -> int:
        out = work / "embeddings"
        shutil.rmtree(out, ignore_errors=True)
        return embed_images(str(folder), str(out), checkpoint=str(weights), backbone="vit_small",
                            batch_size=args.batch_size, precision=args.precision, workers=args.workers)

    config = resolve_data_config({}, model=reference)
    transform = create_transform(**config)
    paths = sorted(str(p) for p in folder.glob("*.jpg"))

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            from PIL import Image

            with open(paths[index], "rb") as handle:
                return transform(Image.open(handle).convert("RGB"))

    def timm_round() -> int:
        loader = torch.utils.data.DataLoader(Files(), batch_size=args.batch_size, num_workers=args.workers)
        rows = []
        with torch.inference_mode(), autocast(precision, torch.device("cpu")):
            for images in loader:
                rows.append(torch.nn.functional.normalize(reference.forward_features(images)[:, 0].float(), dim=1))
        return len(torch.cat(rows))

    ours_round(), timm_round()  # warm-up
    results = bench_common.alternate({"ours": lambda: bench_common.rate(ours_round),
                                      "timm": lambda: bench_common.rate(timm_round)}, args.rounds)
    figures = [bench_common.figure(
        f"embedding {args.images} JPEG photos with ViT-S/16 at 224 px, {precision}, {args.workers} workers: "
        "distill-curate embed vs timm's transform + forward", results["ours"], results["timm"], "images/s", 1.0,
        id="embed")]

    x = torch.randn(args.batch_size, 3, 224, 224)

    def forward(model):
        return lambda: images_per_second(model, x, 1, precision)

    forward(ours)(), forward(reference)()
    results = bench_common.alternate({"ours": forward(ours), "timm": forward(reference)}, args.rounds)
    figures.append(bench_common.figure(f"ViT-S/16 forward alone, batch {args.batch_size}, {precision}",
                                       results["ours"], results["timm"], "images/s", id="forward"))
    bench_common.write("embed", figures)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
