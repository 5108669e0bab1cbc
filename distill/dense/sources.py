"""Where dense descriptors come from: one interface, `FeatureSource.describe(paths)`, that reads image files at the
source's own size and normalisation and gives descriptors [B, h, w, C] on the source's own grid, with the geometry
that maps each cell back to the original image's pixels.

Sources: a backbone of this package (a registry name or any checkpoint, at a layer, facet and stride); the decoder
of Stable Diffusion's UNet (the optional extra "sd": `pip install 'distill[sd]'`), as SD-DINO uses it (Zhang et al.
2023, "A Tale of Two Features", github.com/Junyi42/sd-dino, after ODISE and DIFT): the image encoded by the VAE, the
latent noised to timestep t (100 of 1000), one UNet pass with an empty prompt, the outputs of chosen decoder
up-blocks taken by forward hooks; and the fusion of two sources (SD-DINO's concatenation).

The prompt: with a tokenizer and text encoder in the weights folder (`transformers` installed) the empty prompt's
embedding, as SD-DINO uses; without them zeros of the UNet's cross-attention width (77 tokens), which is what a
folder holding only `unet/` and `vae/` allows.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.dense.correspondence import class_token_saliency, fuse
from distill.dense.features import DenseFeatures, extract
from distill.dense.images import DenseImages, fitting_size, load_dense_images
from distill.errors import InputError

SD_INSTALL = "pip install 'distill[sd]'"
# Stable Diffusion 1.x / 2.x training noise schedule, used when the weights come without a scheduler config.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class SourceFeatures:
    """Descriptors of a few images from one source: features.patches [B, h, w, C] (float32, CPU) with the cell
    geometry in the resized images, the images as the source saw them (to map to the originals), and optionally
    each cell's saliency [B, h, w] in [0, 1]."""

    features: DenseFeatures
    images: DenseImages
    saliency: Optional[torch.Tensor] = None

    @property
    def grid(self) -> Tuple[int, int]:
        return self.features.grid

    def centers_original(self, index: int) -> torch.Tensor:
        """[h, w, 2] (x, y) of each cell's centre in image `index`'s original pixels."""
        h, w = self.grid
        return self.images.to_original(index, self.features.centers().reshape(-1, 2)).reshape(h, w, 2)

    def cells_of(self, index: int, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cell holding each point (x, y) [N, 2] of image `index`'s original pixels: (cells [N, 2] long (x, y)
        in the grid, inside [N] bool). A point outside the image has no cell (inside False; its cell is clamped
        to the grid but means nothing). The cell is the one whose patch centre is nearest, which for
        non-overlapping patches is the patch the point falls in."""
        height, width = self.images.original_sizes[index]
        points = points.float()
        inside = (points[:, 0] >= 0) & (points[:, 0] <= width) & (points[:, 1] >= 0) & (points[:, 1] <= height)
        resized = self.images.to_resized(index, points)
        offset = (self.features.patch_size - 1) / 2
        cells = torch.floor((resized - offset) / self.features.stride + 0.5).long()
        h, w = self.grid
        cells[:, 0].clamp_(0, w - 1)
        cells[:, 1].clamp_(0, h - 1)
        return cells, inside


class FeatureSource(ABC):
    """Dense descriptors for image files, at the source's own size, normalisation and grid."""

    label: str = "features"

    @abstractmethod
    def describe(self, paths: Sequence[str], saliency: bool = False) -> SourceFeatures:
        """Descriptors of the readable files among `paths` (the unreadable in .images.skipped); saliency=True
        also gives each cell's saliency where the source has one (else None)."""


class BackboneSource(FeatureSource):
    """A backbone of this package (ViT or ResNet) at a layer, facet and stride (see `distill.dense.extract`).
    The images are resized whole to `size`, adjusted to the nearest side the patch grid covers exactly."""

    def __init__(self, model: nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
                 layers: Sequence[int] = (-1,), facet: str = "token", stride: Optional[int] = None,
                 log_bins: int = 0, precision: str = "fp32", label: str = "backbone") -> None:
        self.model = model.eval()
        self.mean, self.std = list(mean), list(std)
        self.layers, self.facet, self.stride, self.log_bins = list(layers), facet, stride, log_bins
        self.precision, self.label = precision, label
        patch = getattr(model, "patch_size", None)
        self.size = fitting_size(size, patch, stride) if patch else size
        self.channels = int(model.config["in_chans"]) if hasattr(model, "config") else 3

    def describe(self, paths: Sequence[str], saliency: bool = False) -> SourceFeatures:
        images = load_dense_images(paths, self.size, self.mean, self.std, self.channels)
        features = extract(self.model, images.images, self.layers, self.facet, self.stride, log_bins=self.log_bins,
                           precision=self.precision)
        salient = None
        if saliency and hasattr(self.model, "get_last_self_attention"):
            salient = class_token_saliency(self.model, images.images, self.stride)
        return SourceFeatures(features, images, salient)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise InputError(f"Stable Diffusion features need the diffusers package: {SD_INSTALL}") from None
    return diffusers


class StableDiffusionSource(FeatureSource):
    """Stable Diffusion UNet decoder features (SD-DINO): the image in [-1, 1] at `size` (rounded to a multiple
    of the total downsampling), its VAE latent (the posterior mean, times the VAE's scaling factor) noised to
    `timestep` with noise drawn from `seed` (the same for every image: a given image always gives the same
    descriptors), one UNet pass with `text` as the prompt embedding, the outputs of `up_blocks` (indices into
    unet.up_blocks; SD-DINO: 0, 1, 2) resized (bilinear) to the finest of them and concatenated along C."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler=None, text: Optional[torch.Tensor] = None,
                 size: int = 960, timestep: int = 100, up_blocks: Sequence[int] = (0, 1, 2), seed: int = 0,
                 device: str = "cpu", chunk: int = 4, label: str = "stable diffusion") -> None:
        diffusers = _require_diffusers()
        count = len(unet.up_blocks)
        bad = [b for b in up_blocks if not -count <= b < count]
        if not up_blocks or bad:
            raise InputError(f"up-block(s) {bad or '(none)'} out of range: the UNet has {count} decoder up-blocks "
                             f"(0 to {count - 1})")
        self.up_blocks = [b % count for b in up_blocks]
        steps = scheduler.config.num_train_timesteps if scheduler is not None else SD_SCHEDULE["num_train_timesteps"]
        if not 0 <= timestep < steps:
            raise InputError(f"timestep {timestep} out of range: 0 to {steps - 1} (SD-DINO uses 100)")
        self.device = torch.device(device)
        self.unet, self.vae = unet.eval().to(self.device), vae.eval().to(self.device)
        self.scheduler = scheduler or diffusers.DDPMScheduler(**SD_SCHEDULE)
        width = unet.config.cross_attention_dim
        self.text = text if text is not None else torch.zeros(1, 77, width)  # see the module docstring
        self.timestep, self.seed, self.chunk, self.label = timestep, seed, chunk, label
        # VAE: 2 per encoder block after the first; UNet: 2 per down block after the first.
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)
        self.size = max(self.factor, round(size / self.factor) * self.factor)

    @classmethod
    def from_pretrained(cls, where: str, **kwargs) -> "StableDiffusionSource":
        """UNet, VAE, noise schedule and (when there) the empty prompt's embedding from a diffusers folder (with
        unet/ and vae/ in it) or a hub id (where the hub can be reached)."""
        diffusers = _require_diffusers()
        folder = Path(where).expanduser()
        if folder.exists() and not ((folder / "unet").is_dir() and (folder / "vae").is_dir()):
            raise InputError(f"{where} is not a diffusers Stable Diffusion folder: it needs unet/ and vae/ in it "
                             "(as `save_pretrained` writes them)")
        if not folder.exists() and (where.startswith((".", "/", "~")) or where.count("/") != 1):
            raise InputError(f"Stable Diffusion weights {where!r} not found: give a folder with unet/ and vae/, or "
                             "a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 where there is internet")
        try:
            unet = diffusers.UNet2DConditionModel.from_pretrained(where, subfolder="unet")
            vae = diffusers.AutoencoderKL.from_pretrained(where, subfolder="vae")
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"cannot load Stable Diffusion weights from {where}: {first}") from None
        scheduler = None
        if not folder.exists() or (folder / "scheduler").is_dir():
            try:
                scheduler = diffusers.DDPMScheduler.from_pretrained(where, subfolder="scheduler")
            except (OSError, ValueError):
                scheduler = None  # SD's own schedule then
        text = _empty_prompt(where, folder)
        return cls(unet, vae, scheduler, text, **kwargs)

    @torch.inference_mode()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> descriptors [B, h, w, C] (float32, CPU)."""
        dtype = next(self.unet.parameters()).dtype
        images = images.to(self.device, next(self.vae.parameters()).dtype)
        latents = self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(latents.shape[1:], generator=generator).to(latents)  # one draw, the same per image
        timestep = torch.full((len(images),), self.timestep, dtype=torch.long, device=self.device)
        noisy = self.scheduler.add_noise(latents, noise.expand_as(latents), timestep)
        seen = {}
        hooks = [self.unet.up_blocks[index].register_forward_hook(
            lambda module, inputs, output, index=index: seen.__setitem__(index, output)) for index in self.up_blocks]
        try:
            text = self.text.to(self.device, dtype).expand(len(images), -1, -1)
            self.unet(noisy.to(dtype), timestep, encoder_hidden_states=text)
        finally:
            for hook in hooks:
                hook.remove()
        maps = [seen[index].float() for index in self.up_blocks]
        finest = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == finest else F.interpolate(m, size=tuple(finest), mode="bilinear",
                                                                align_corners=False) for m in maps]
        return torch.cat(maps, dim=1).permute(0, 2, 3, 1).cpu()

    def describe(self, paths: Sequence[str], saliency: bool = False) -> SourceFeatures:
        images = load_dense_images(paths, self.size, [0.5] * 3, [0.5] * 3, 3)  # [0, 1] -> [-1, 1], as SD takes
        patches = torch.cat([self._features(images.images[start:start + self.chunk])
                             for start in range(0, len(images.images), self.chunk)])
        cell = self.size // patches.shape[1]
        features = DenseFeatures(patches, None, cell, cell, (self.size, self.size))
        return SourceFeatures(features, images, None)


def _empty_prompt(where: str, folder: Path) -> Optional[torch.Tensor]:
    """The text encoder's embedding of "" [1, 77, D], or None when the weights have no tokenizer/text encoder."""
    if folder.exists() and not ((folder / "tokenizer").is_dir() and (folder / "text_encoder").is_dir()):
        return None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        if folder.exists():
            raise InputError(f"{where} has a text encoder, which needs the transformers package: "
                             f"{SD_INSTALL}") from None
        return None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder").eval()
    except (OSError, ValueError):
        return None
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.inference_mode():
        return encoder(tokens.input_ids)[0].float()


class FusedSource(FeatureSource):
    """Several sources fused per image by `fuse` (SD-DINO: weights 1 - alpha and alpha). The fused grid is the
    finest source's, with its geometry; saliency comes from the first source that has one, resized to it."""

    def __init__(self, sources: Sequence[FeatureSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights) or not sources:
            raise InputError(f"give one weight per source: {len(sources)} source(s), {len(weights)} weight(s)")
        self.sources, self.weights = list(sources), [float(w) for w in weights]
        self.label = " + ".join(f"{w:g} {s.label}" for s, w in zip(self.sources, self.weights))

    def describe(self, paths: Sequence[str], saliency: bool = False) -> SourceFeatures:
        return fuse_sources([source.describe(paths, saliency) for source in self.sources], self.weights)


def fuse_sources(parts: Sequence[SourceFeatures], weights: Sequence[float]) -> SourceFeatures:
    """Descriptors of the same images from several sources fused onto the finest grid (see `fuse`)."""
    if len({tuple(part.images.paths) for part in parts}) > 1:
        raise InputError("the sources read different images: " +
                         "; ".join(", ".join(part.images.skipped) or "all read" for part in parts))
    fused = fuse([part.features.patches for part in parts], weights)
    finest = max(parts, key=lambda part: part.grid[0] * part.grid[1])
    salient = next((part.saliency for part in parts if part.saliency is not None), None)
    if salient is not None and tuple(salient.shape[1:]) != finest.grid:
        salient = F.interpolate(salient[:, None], size=finest.grid, mode="bilinear", align_corners=False)[:, 0]
    geometry = finest.features
    features = DenseFeatures(fused, None, geometry.patch_size, geometry.stride, geometry.image_size)
    return SourceFeatures(features, finest.images, salient)


def parse_source(spec: str, size: Optional[int] = None, device: str = "cpu", sd_size: int = 960,
                 sd_timestep: int = 100, sd_blocks: Sequence[int] = (0, 1, 2)) -> FeatureSource:
    """A source named on the command line: "sd:<folder or hub id>" (Stable Diffusion), an existing checkpoint
    file (any that `load_backbone` reads; last layer's tokens), or a registry name (random weights: for tests and
    baselines). size: the backbone's image side (default: the checkpoint's)."""
    from distill.data.configs import default_normalisation
    from distill.eval.loading import load_backbone
    from distill.models import create_backbone, get_spec

    if spec.startswith("sd:"):
        where = spec[3:]
        if not where:
            raise InputError("sd: needs a folder or hub id after it, e.g. sd:./stable-diffusion-v1-5")
        _require_diffusers()
        return StableDiffusionSource.from_pretrained(where, size=sd_size, timestep=sd_timestep, up_blocks=sd_blocks,
                                                     device=device, label=f"SD {where}")
    if Path(spec).is_file():
        model, setup = load_backbone(spec)
        return BackboneSource(model.to(device), size or setup.image_size, setup.mean, setup.std, label=spec)
    if Path(spec).suffix or "/" in spec or "\\" in spec:
        raise InputError(f"source {spec!r} not found: give a checkpoint file, a registered backbone (`distill "
                         "models`), or sd:<folder or hub id>")
    try:
        get_spec(spec)
    except InputError as error:
        raise InputError(f"source {spec!r} is neither a checkpoint file, sd:<folder or hub id>, nor a registered "
                         f"backbone ({error})") from None
    model = create_backbone(spec)
    mean, std = default_normalisation()
    side = model.config["img_size"]
    return BackboneSource(model.to(device), size or (side[0] if isinstance(side, (tuple, list)) else side), mean, std,
                          label=f"{spec} (random weights)")
