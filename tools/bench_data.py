#!/usr/bin/env python
"""Multi-crop data pipeline throughput: ours against a per-image torchvision/PIL pipeline of the DINO reference.

The reference is DINO's DataAugmentationDINO (main_dino.py): per image, PIL RandomResizedCrop (bicubic), flip,
colour jitter, greyscale, PIL Gaussian blur and solarization, ToTensor and Normalize, for 2 global + 8 local
crops, in a DataLoader with the default collate. Ours is the trainer's loader: geometry per image on uint8,
photometric augmentation batched (views.color=fused, and =exact for one more figure). Both use the same workers
and batch; views/s counts every crop.

  Fashion-MNIST (in memory, 28 / 14 px crops, the demo's settings) and a folder of JPEG photos (scikit-image's
  sample images resized to 224-500 px, or --photo-scale times that; 224 / 96 px crops, DINO's settings). Ours
  decodes the photos at the size their crops need (data.dataset.decode_at_crop_size, the default), which DINO's
  crops allow only on photos well above 500 px; one more figure sets it against full decoding.

    .venv/bin/python tools/bench_data.py [--rounds 5] [--workers 2] [--only photos] [--photo-scale 3]
    .venv/bin/python tools/bench_data.py --profile      # each stage of both photo pipelines, ms per image, and
                                                        # how far fused colour lands from the exact operations
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

import bench_common


class _Blur:
    def __init__(self, p: float, low: float = 0.1, high: float = 2.0) -> None:
        self.p, self.low, self.high = p, low, high

    def __call__(self, image):
        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))


class _Solarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image):
        return ImageOps.solarize(image) if random.random() < self.p else image


class ReferenceDINO:
    """DataAugmentationDINO of the DINO reference (crop sizes and scales as arguments)."""

    def __init__(self, global_size, local_size, global_scale, local_scale, local_number, mean, std) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global1 = transforms.Compose([transforms.RandomResizedCrop(global_size, global_scale, interpolation=bicubic),
                                           flip_and_color_jitter, _Blur(1.0), normalize])
        self.global2 = transforms.Compose([transforms.RandomResizedCrop(global_size, global_scale, interpolation=bicubic),
                                           flip_and_color_jitter, _Blur(0.1), _Solarize(0.2), normalize])
        self.local = transforms.Compose([transforms.RandomResizedCrop(local_size, local_scale, interpolation=bicubic),
                                         flip_and_color_jitter, _Blur(0.5), normalize])
        self.local_number = local_number

    def __call__(self, image):
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.local_number)]


class Batches:
    """views/s of `count` batches of a DataLoader, from a fresh iterator that is closed after the round: no worker
    of one side keeps preparing batches while the other side is timed."""

    def __init__(self, loader, views_per_image: int, batch_size: int, start=None) -> None:
        self.loader, self.views, self.batch_size, self.start = loader, views_per_image, batch_size, start

    def rate(self, count: int) -> float:
        def work():
            if self.start:
                self.start()
            data = iter(self.loader)
            for _ in range(count):
                next(data)
            del data  # stops the workers
            return count * self.batch_size * self.views
        return bench_common.rate(work)


def pipelines(kind: str, batch: int, workers: int, photos: Path, color: str = "fused", decode_at_crop_size=True):
    from distill.data.configs import DatasetConfig
    from distill.data.datasets import build_image_source
    from distill.data.loader import build_loader
    from distill.data.configs import MultiCropConfig
    from distill.data.views import MultiCrop

    if kind == "fashion_mnist":
        config = MultiCropConfig(global_crops_size=28, local_crops_size=14, local_crops_scale=[0.1, 0.4],
                                 blur_sigma=[0.1, 1.0], mean=[0.286], std=[0.353])
        source = build_image_source(DatasetConfig(kind="fashion_mnist"))
        channels = 1
        reference_set = bench_common.PILImages(source.images[:, 0].numpy())
    else:
        config = MultiCropConfig(color=color)
        source = build_image_source(DatasetConfig(kind="folder", path=str(photos),
                                                  decode_at_crop_size=decode_at_crop_size))
        channels = 3
        reference_set = bench_common.PILImages(source.paths)
    views = MultiCrop(config, channels)
    loader, sampler = build_loader(source, views, batch, seed=0, num_workers=workers)
    epoch = iter(range(10 ** 6))
    ours = Batches(loader, len(views.specs), batch, start=lambda: sampler.set_epoch(next(epoch)))
    reference_set.transform = ReferenceDINO(config.global_crops_size, config.local_crops_size,
                                            config.global_crops_scale, config.local_crops_scale,
                                            config.local_crops_number, config.mean, config.std)
    reference = Batches(torch.utils.data.DataLoader(reference_set, batch_size=batch, shuffle=True, drop_last=True,
                                                    num_workers=workers),
                        len(views.specs), batch)
    return ours, reference


def profile(folder: Path, images: int = 64) -> None:
    """Milliseconds per image of each stage, one thread, both sides: where the time goes."""
    import time

    torch.set_num_threads(1)
    ours, reference = pipelines("photos", 32, 0, folder)
    dataset, views = ours.loader.dataset, ours.loader.dataset.views
    from distill.seeds import Stream, derived_generator

    def geometry(most: float):
        """decode and crop times of ours, each JPEG reduced at most `most` times (1: decode_at_crop_size off)."""
        times, samples, reduced = {"decode": 0.0, "crop and resize": 0.0}, [], 0
        for index in range(images):
            drawn = []

            def reduction(width: int, height: int) -> float:  # the loader's order: boxes first, then the decode
                drawn.append(views.draw(height, width, derived_generator(0, 0, index, Stream.IMAGE_VIEWS)))
                return min(most, views.reduction(drawn[-1]))

            start = time.perf_counter()
            image, frame = dataset.source.load_at_crop_size(index, "RGB", views.min_image_size, reduction)
            middle = time.perf_counter()
            samples.append(views.file_sample(image, frame, drawn[-1]))
            times["decode"] += middle - start
            times["crop and resize"] += time.perf_counter() - middle
            reduced += frame.reduced
        return times, samples, reduced

    full, _, _ = geometry(1.0)
    stages, samples, reduced = geometry(float("inf"))
    stages["batched photometric + normalise"] = 0.0
    for first in range(0, images, 32):
        start = time.perf_counter()
        views.collate(samples[first : first + 32])
        stages["batched photometric + normalise"] += time.perf_counter() - start
    print("ours, ms per image: " + ", ".join(f"{k} {v / images * 1000:.2f}" for k, v in stages.items())
          + f" ({reduced} of {images} decoded at a reduced size; with data.dataset.decode_at_crop_size=false: "
          + ", ".join(f"{k} {v / images * 1000:.2f}" for k, v in full.items()) + ")")

    ref = reference.loader.dataset.transform
    timed = {}

    def tick(name, function, *inputs):
        start = time.perf_counter()
        out = function(*inputs)
        timed[name] = timed.get(name, 0.0) + time.perf_counter() - start
        return out

    for path in reference.loader.dataset.items[:images]:
        image = tick("decode", lambda: Image.open(path).convert("RGB"))
        for crop_index, pipeline in enumerate([ref.global1, ref.global2] + [ref.local] * ref.local_number):
            out = image
            for step in pipeline.transforms:
                name = type(step).__name__.lstrip("_")
                if isinstance(step, transforms.Compose):  # flip, jitter, greyscale
                    for inner in step.transforms:
                        out = tick(type(inner).__name__, inner, out)
                else:
                    out = tick(name, step, out)
    print("reference, ms per image: " + ", ".join(f"{k} {v / images * 1000:.2f}" for k, v in timed.items()))


def fidelity(folder: Path, images: int = 200) -> None:
    """How far the fused colour path lands from the operation-by-operation one on real photos, next to how far
    the jitter moves pixels at all (DINO's jitter, greyscale and probabilities; mean absolute difference)."""
    import numpy as np

    from distill.data import augment
    from distill.seeds import derived_generator

    paths = sorted(folder.glob("*.jpg"))[:images]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((64, 64)))).permute(2, 0, 1)
                          for p in paths]).float() / 255
    params = augment.sample_color_params(len(paths), 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.0, (0.1, 2.0), 0.0,
                                         derived_generator(7))
    exact = augment.photometric(pixels, params)
    fused = augment.photometric_fused(pixels, params, [0.0] * 3, [1.0] * 3, 3)
    print(f"{len(paths)} photos, colour jitter + greyscale: fused vs exact {(fused - exact).abs().mean():.4f} per "
          f"pixel on average; exact vs unaugmented {(exact - pixels).abs().mean():.4f}")


def scaled_photos(folder: Path, scale: float) -> Path:
    """The photos of `folder` resized `scale` times (bicubic, JPEG quality 90), in a folder beside it."""
    if scale == 1:
        return folder
    photos = sorted(folder.glob("*.jpg"))
    target = folder.with_name(f"{folder.name}_x{scale:g}")
    if target.is_dir() and len(list(target.glob("*.jpg"))) == len(photos):
        return target
    target.mkdir(exist_ok=True)
    for path in photos:
        with Image.open(path) as image:
            size = (round(image.width * scale), round(image.height * scale))
            image.resize(size, Image.Resampling.BICUBIC).save(target / path.name, quality=90)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photos", type=int, default=400, help="photos in the folder")
    parser.add_argument("--fashion-batches", type=int, default=40, help="batches of 64 per timed round")
    parser.add_argument("--photo-batches", type=int, default=10, help="batches of 32 per timed round")
    parser.add_argument("--profile", action="store_true", help="only time each stage of both photo pipelines")
    parser.add_argument("--only", choices=("fashion_mnist", "photos"), help="measure this data set alone")
    parser.add_argument("--photo-scale", type=float, default=1.0,
                        help="photos this many times larger (e.g. 3: 672-1500 px, where decoding at crop size pays)")
    args = parser.parse_args()

    folder = bench_common.photo_folder(Path(tempfile.gettempdir()) / "distill_bench_photos", args.photos)
    folder = scaled_photos(folder, args.photo_scale)
    if args.profile:
        fidelity(folder)
        return profile(folder)
    figures = []
    for kind, batch, count in (("fashion_mnist", 64, args.fashion_batches), ("photos", 32, args.photo_batches)):
        if args.only and kind != args.only:
            continue
        ours, reference = pipelines(kind, batch, args.workers, folder)
        sides = {"ours": ours, "reference": reference}
        if kind == "photos":  # the operation-by-operation colour path, and full decoding, for what each is worth
            sides["exact"] = pipelines(kind, batch, args.workers, folder, color="exact")[0]
            sides["full_decode"] = pipelines(kind, batch, args.workers, folder, decode_at_crop_size=False)[0]
        for side in sides.values():  # warm-up: start the workers, fill their queues once
            side.rate(2)
        results = bench_common.alternate({name: (lambda side=side: side.rate(count)) for name, side in sides.items()},
                                         args.rounds)
        label = "Fashion-MNIST, 2 x 28 + 8 x 14 px" if kind == "fashion_mnist" else \
            f"{args.photos} JPEG photos ({224 * args.photo_scale:g}-{500 * args.photo_scale:g} px), 2 x 224 + 8 x 96 px"
        figures.append(bench_common.figure(f"multi-crop views/s, {label}, {args.workers} workers, ours vs DINO "
                                           "reference per-image pipeline", results["ours"], results["reference"],
                                           "views/s", 2.0 if kind == "fashion_mnist" else 3.0, id=f"data_{kind}"))
        if "exact" in results:
            figures.append(bench_common.figure(f"multi-crop views/s, {label}, {args.workers} workers, ours with "
                                               "views.color=fused (default) vs views.color=exact", results["ours"],
                                               results["exact"], "views/s", id=f"data_{kind}_fused_vs_exact"))
        if "full_decode" in results:
            figures.append(bench_common.figure(f"multi-crop views/s, {label}, {args.workers} workers, ours with "
                                               "data.dataset.decode_at_crop_size=true (default) vs false",
                                               results["ours"], results["full_decode"], "views/s",
                                               id=f"data_{kind}_decode_at_crop_size"))
    name = "data" if not args.only else f"data_{args.only}"
    name += f"_x{args.photo_scale:g}" if args.photo_scale != 1 else ""
    bench_common.write(name, figures)  # data.json (what the report reads) only for the whole default run


if __name__ == "__main__":
    main()
