"""Multi-crop views: counts and sizes, torchvision's definitions, determinism, and the resumable loader."""

import ctypes.util
import resource
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from distill.data import augment
from distill.data.datasets import ArrayImages, FileImages
from distill.data.loader import build_loader
from distill.seeds import derived_generator
from distill.data.configs import MultiCropConfig
from distill.data.views import MultiCrop
from distill.errors import InputError


def _config(**kwargs):
    base = dict(global_crops_size=16, local_crops_size=8, local_crops_number=3, mean=[0.5], std=[0.25])
    return MultiCropConfig(**{**base, **kwargs})


def test_crop_counts_sizes_and_channels():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    crops = MultiCrop(_config(), channels=1).array_batch(images, derived_generator(0))
    assert [tuple(c.shape) for c in crops] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3
    rgb_model = MultiCrop(_config(), channels=3).array_batch(images, derived_generator(0))
    assert rgb_model[0].shape == (4, 3, 16, 16) and torch.equal(rgb_model[0][:, 0], rgb_model[0][:, 2])


def test_crop_boxes_follow_random_resized_crop():
    boxes = augment.sample_crop_boxes(20000, 50, 80, (0.2, 0.5), generator=derived_generator(1))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 50).all() and (left + width <= 80).all()
    area = (height * width).float() / (50 * 80)
    assert area.min() > 0.17 and area.max() < 0.53  # the scale range, up to rounding
    ratio = width.float() / height.float()
    assert ratio.min() > 0.7 and ratio.max() < 1.45
    impossible = augment.sample_crop_boxes(5, 10, 100, (0.9, 1.0), ratio=(1.0, 1.0))  # falls back to the centre
    assert impossible.tolist() == [[0, 45, 10, 10]] * 5


def test_resized_crop_of_the_whole_image_is_the_image_and_flips_mirror():
    images = torch.rand(2, 1, 8, 8)
    whole = torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]])
    same = augment.resized_crops(images, whole, torch.tensor([False, True]), 8)
    assert torch.allclose(same[0], images[0], atol=1e-6)
    assert torch.allclose(same[1], images[1].flip(-1), atol=1e-6)
    half = augment.resized_crops(images, torch.tensor([[0, 4, 8, 4]] * 2), torch.tensor([False, False]), 4)
    assert half.shape == (2, 1, 8 // 2, 4)[:2] + (4, 4)


def test_crop_grid_is_affine_grid_of_the_crop_map():
    """The sampling grid built row by column equals F.affine_grid of each crop's affine map (align_corners=False),
    on a non-square image, with mirrored and unmirrored crops of several sizes."""
    generator = torch.Generator().manual_seed(0)
    height, width = 30, 45
    boxes = augment.sample_crop_boxes(64, height, width, (0.05, 1.0), generator=generator)
    flips = torch.rand(64, generator=generator) < 0.5
    top, left, h, w = boxes.float().unbind(1)
    theta = torch.zeros(64, 2, 3)
    theta[:, 0, 0] = (1 - 2 * flips.float()) * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    for size in (7, 16):
        expected = F.affine_grid(theta, [64, 1, size, size], align_corners=False)
        assert torch.allclose(augment.crop_grid(boxes, flips, size, (height, width)), expected, atol=1e-6)


@pytest.mark.parametrize("op,name", [(0, "brightness"), (1, "contrast"), (2, "saturation"), (3, "hue")])
def test_colour_operations_equal_torchvision(op, name):
    images = torch.rand(5, 3, 6, 7)
    factors = torch.tensor([0.6, 1.4, 1.0, 0.9, 1.1]) if name != "hue" else torch.tensor([0.1, -0.1, 0, 0.05, -0.02])
    reference = getattr(TF, f"adjust_{name}")
    expected = torch.stack([reference(img, float(f)) for img, f in zip(images, factors)])
    assert torch.allclose(augment._jitter_op(images.clone(), op, {name: factors}), expected, atol=1e-5)


def test_grey_images_stay_grey_and_solarize_matches_pil():
    grey = torch.rand(3, 1, 5, 5)
    params = augment.sample_color_params(3, 1.0, 0.4, 0.4, 0.2, 0.1, 1.0, 0.0, (0.1, 1.0), 0.0, derived_generator(2))
    assert augment.photometric(grey, params).shape == (3, 1, 5, 5)
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    ours = augment.solarize(pixels.float() / 255, torch.tensor([True])) * 255
    pil = np.asarray(ImageOps.solarize(Image.fromarray(pixels[0, 0].numpy()), threshold=128))
    assert torch.allclose(ours[0, 0].round(), torch.from_numpy(pil.copy()).float())


def test_blur_kernels_are_normalised_and_tiny_sigma_is_identity():
    kernels = augment.gaussian_kernels(torch.tensor([0.5, 2.0]), 6)
    assert torch.allclose(kernels.sum(1), torch.ones(2))
    images = torch.rand(2, 1, 16, 16)
    assert torch.allclose(augment.gaussian_blur(images, torch.tensor([True, True]), torch.tensor([1e-3, 1e-3])), images)
    blurred = augment.gaussian_blur(images, torch.tensor([True, False]), torch.tensor([2.0, 2.0]))
    assert blurred[0].std() < images[0].std() and torch.equal(blurred[1], images[1])


def _mid_range(n, channels=3):
    """Images far enough from 0 and 1 that no colour operation below clamps."""
    return torch.rand(n, channels, 9, 10, generator=torch.Generator().manual_seed(n)) * 0.3 + 0.35


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_colour_equals_the_operations_one_by_one_where_nothing_clamps(channels):
    images = _mid_range(40, channels)
    # every sample its own order, brightness / contrast / saturation, greyscale, blur, solarize; no hue here
    params = augment.sample_color_params(40, 0.8, 0.2, 0.2, 0.2, 0.0, 0.3, 0.5, (0.1, 2.0), 0.3, derived_generator(9))
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if channels == 3 else ([0.3], [0.4])
    exact = augment.normalize(augment.photometric(images, params), mean, std, channels)
    fused = augment.photometric_fused(images, params, mean, std, channels)
    assert params["jitter"].sum() > 20 and params["grayscale"].any() and params["solarize"].any()
    assert torch.allclose(fused, exact, atol=1e-4)
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert torch.allclose(augment.photometric_fused(as_uint8, params, mean, std, channels),
                          augment.photometric_fused(as_uint8.float() / 255, params, mean, std, channels), atol=1e-4)


def test_fused_hue_is_a_rotation_about_the_grey_axis_in_hsvs_direction():
    shifts = torch.tensor([0.1, -0.07, 1 / 3, -1 / 3])
    rotations = augment.hue_rotations(shifts)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), eye.expand(4, 3, 3), atol=1e-12)
    assert torch.allclose(rotations @ torch.ones(3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64))
    # a third of a turn permutes the channels for every colour, in HSV and about the grey axis alike
    images = torch.rand(2, 3, 6, 7)
    params = augment.sample_color_params(2, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, (0.1, 1.0), 0.0)
    for turn in (1 / 3, -1 / 3):
        params["hue"] = torch.full((2,), turn)
        hsv = augment.photometric(images, params)
        fused = augment.photometric_fused(images, params, [0.0] * 3, [1.0] * 3, 3)
        assert torch.allclose(fused, hsv, atol=1e-5) and not torch.allclose(fused, images, atol=0.1)
    # small shifts move red towards yellow (green up, blue down), as HSV's hue
    red = torch.tensor([0.9, 0.2, 0.2], dtype=torch.float64)
    turned = rotations[0] @ red
    assert turned[1] > red[1] and turned[2] < red[2]


def test_fused_colour_stays_in_the_normalised_range_of_zero_to_one():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    params = augment.sample_color_params(64, 1.0, 0.9, 0.9, 0.9, 0.5, 0.2, 0.5, (0.1, 2.0), 0.5, derived_generator(4))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    out = augment.photometric_fused(images, params, mean.tolist(), std.tolist(), 3)
    pixels = out * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1


def test_exact_colour_path_is_selectable():
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    fused = MultiCrop(_config(mean=[0.5] * 3, std=[0.25] * 3), 3).array_batch(images, derived_generator(3))
    exact = MultiCrop(_config(mean=[0.5] * 3, std=[0.25] * 3, color="exact"), 3).array_batch(images, derived_generator(3))
    assert [c.shape for c in fused] == [c.shape for c in exact]
    assert (fused[0] - exact[0]).abs().mean() < 0.2 and not torch.equal(fused[0], exact[0])


def test_collate_lays_out_each_crop_of_every_image_then_the_next():
    """Without photometric draws, a collated batch is each image's normalised uint8 crops, in array_batch's
    order: crop j of image i at row i of output j."""
    plain = dict(color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_probs=[0.0], local_blur_prob=0.0,
                 global_solarize_probs=[0.0], local_solarize_prob=0.0)
    views = MultiCrop(_config(**plain), channels=1)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    samples = [views.image_sample(image, derived_generator(5, 0, i)) for i, image in enumerate(images)]
    outputs = views.collate(samples)
    assert [o.shape for o in outputs] == [(3, 1, 16, 16)] * 2 + [(3, 1, 8, 8)] * 3
    for j, output in enumerate(outputs):
        for i, sample in enumerate(samples):
            torch.testing.assert_close(output[i], (sample["crops"][j].float() / 255 - 0.5) / 0.25)


def test_views_are_a_function_of_the_seed():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    views = MultiCrop(_config(), channels=1)
    first = views.array_batch(images, derived_generator(7, 0, 3))
    again = views.array_batch(images, derived_generator(7, 0, 3))
    other = views.array_batch(images, derived_generator(7, 0, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_bad_view_config():
    with pytest.raises(InputError, match="global_crops_scale"):
        MultiCrop(_config(global_crops_scale=[0.5, 0.2]), 1)
    for key in ("global_crops_scale", "local_crops_scale", "ratio", "blur_sigma"):  # one number, not a pair
        with pytest.raises(InputError, match=rf"views.{key} is \[0.5\]: it must be \[low, high\]"):
            MultiCrop(_config(**{key: [0.5]}), 1)
    with pytest.raises(InputError, match="probabilities"):
        MultiCrop(_config(flip_prob=1.5), 1)
    with pytest.raises(InputError, match="views.color must be 'fused' or 'exact'"):
        MultiCrop(_config(color="fast"), 1)


def _array_source(n=40):
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return ArrayImages(images, np.arange(n) % 4, list("abcd"), "toy")


def _batches(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [b for b in loader]


def test_loader_resumes_mid_epoch_with_the_same_batches():
    source = _array_source()
    views = MultiCrop(_config(), channels=1)
    loader, sampler = build_loader(source, views, batch_size=8, seed=3)
    full = _batches(loader, sampler, epoch=2)
    tail = _batches(loader, sampler, epoch=2, start=3)
    assert len(full) == 5 and len(tail) == 2
    for a, b in zip(full[3:], tail):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["crops"][2], b["crops"][2])
    other_epoch = _batches(loader, sampler, epoch=3)
    assert not torch.equal(full[0]["indices"], other_epoch[0]["indices"])


def test_file_views_do_not_depend_on_the_number_of_workers(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    source = FileImages(paths, list(range(12)), [], "files")
    views = MultiCrop(_config(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), channels=3)
    inline, sampler0 = build_loader(source, views, batch_size=4, seed=1, num_workers=0)
    workers, sampler2 = build_loader(source, views, batch_size=4, seed=1, num_workers=2)
    a, b = _batches(inline, sampler0, 0), _batches(workers, sampler2, 0)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert torch.equal(x["labels"], y["labels"])
        assert all(torch.equal(c1, c2) for c1, c2 in zip(x["crops"], y["crops"]))
    assert a[0]["crops"][0].shape == (4, 3, 16, 16) and a[0]["crops"][-1].shape == (4, 3, 8, 8)


class _FaultProbe(torch.utils.data.Dataset):
    """Page faults of taking 64 MiB from C's malloc a second time, after the first 64 MiB was freed (malloc itself:
    tensors come from posix_memalign, whose aligned pieces make the count depend on what the heap held before)."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        faults = []
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(64 << 20)
            libc.memset(block, 1, 64 << 20)  # every page touched
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert faults[0] > 10000  # the first time the pages are new either way
        return faults[1]


@pytest.mark.skipif(sys.platform != "linux" or ctypes.util.find_library("c") != "libc.so.6",
                    reason="the allocator setting is glibc's")
def test_loader_workers_keep_the_memory_they_free():
    """A worker frees and takes back the same large buffers every batch: they come back from its heap without
    page faults, where a fresh worker left as it is faults every page in again (16,384 for 64 MiB)."""
    loader, _ = build_loader(_array_source(8), MultiCrop(_config(), channels=1), batch_size=4, seed=0, num_workers=1)
    fresh = dict(batch_size=None, num_workers=1, multiprocessing_context="spawn")  # nothing inherited from here
    assert next(iter(torch.utils.data.DataLoader(_FaultProbe(), **fresh))) > 10000
    assert next(iter(torch.utils.data.DataLoader(_FaultProbe(), worker_init_fn=loader.worker_init_fn, **fresh))) < 1000


def test_distributed_ranks_get_disjoint_shares():
    source = _array_source(48)
    views = MultiCrop(_config(), channels=1)
    seen = []
    for rank in range(2):
        loader, sampler = build_loader(source, views, batch_size=4, seed=0, rank=rank, world_size=2)
        seen.append(torch.cat([b["indices"] for b in _batches(loader, sampler, 0)]))
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0].tolist()) & set(seen[1].tolist())


def test_colour_jitter_applies_each_samples_own_order_like_torchvision():
    images = torch.rand(6, 3, 5, 5)
    params = augment.sample_color_params(6, 0.7, 0.4, 0.4, 0.3, 0.1, 0.0, 0.0, (0.1, 1.0), 0.0, derived_generator(5))
    expected = []
    names = ("brightness", "contrast", "saturation", "hue")
    for i, image in enumerate(images):
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                image = getattr(TF, f"adjust_{names[op]}")(image, float(params[names[op]][i]))
        expected.append(image)
    assert torch.allclose(augment.color_jitter(images, params), torch.stack(expected), atol=1e-5)
    assert params["jitter"].any() and not params["jitter"].all()
