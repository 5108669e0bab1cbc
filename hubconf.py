"""torch.hub entry points: every official backbone by its official name, built by `distill.models.create_backbone`.

    torch.hub.load("path/to/distill", "dinov2_vits14_reg", source="local")                   # the official weights
    torch.hub.load("path/to/distill", "dino_vits16", source="local", pretrained="teacher.pth")  # any file
    torch.hub.load("path/to/distill", "deit_small_patch16_224", source="local", pretrained=False)  # random

pretrained: True (the default, as in the official hubconf files) downloads the release below once into torch.hub's
cache (`torch.hub.get_dir()/checkpoints`); False builds random weights; a path (or an already loaded checkpoint
dict) loads that file, in any layout create_backbone reads (a released file, a DINO/DeiT/DINOv2 training checkpoint,
a `distill train` run). Files are read with weights_only and loaded strictly. Other keyword arguments go to
create_backbone: backbone overrides (img_size=..., depth=...) and checkpoint_key.

The official addresses (facebookresearch/dino hubconf.py; facebookresearch/deit models.py and README.md;
facebookresearch/dinov2 dinov2/hub/backbones.py):

| name | official weights |
|---|---|
| dino_vits16 | https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth |
| dino_vits8 | https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth |
| dino_vitb16 | https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth |
| dino_vitb8 | https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth |
| dino_xcit_small_12_p16 | https://dl.fbaipublicfiles.com/dino/dino_xcit_small_12_p16_pretrain/dino_xcit_small_12_p16_pretrain.pth |
| dino_xcit_small_12_p8 | https://dl.fbaipublicfiles.com/dino/dino_xcit_small_12_p8_pretrain/dino_xcit_small_12_p8_pretrain.pth |
| dino_xcit_medium_24_p16 | https://dl.fbaipublicfiles.com/dino/dino_xcit_medium_24_p16_pretrain/dino_xcit_medium_24_p16_pretrain.pth |
| dino_xcit_medium_24_p8 | https://dl.fbaipublicfiles.com/dino/dino_xcit_medium_24_p8_pretrain/dino_xcit_medium_24_p8_pretrain.pth |
| dino_resnet50 | https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth |
| deit_tiny_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth |
| deit_small_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth |
| deit_base_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth |
| deit_base_patch16_384 | https://dl.fbaipublicfiles.com/deit/deit_base_patch16_384-8de9b5d1.pth |
| deit_tiny_distilled_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth |
| deit_small_distilled_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth |
| deit_base_distilled_patch16_224 | https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth |
| deit_base_distilled_patch16_384 | https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth |
| dinov2_vits14 | https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth |
| dinov2_vitb14 | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth |
| dinov2_vitl14 | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth |
| dinov2_vitg14 | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth |
| dinov2_vits14_reg | https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth |
| dinov2_vitb14_reg | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth |
| dinov2_vitl14_reg | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth |
| dinov2_vitg14_reg | https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth |

The DeiT files' names end in the first digits of their SHA-256, checked after the download (as DeiT's
check_hash=True does).
"""

# Everything but the entry points starts with "_": torch.hub.list() lists every public callable of this file.

dependencies = ["torch", "torchvision", "timm", "numpy"]

_DINO = "https://dl.fbaipublicfiles.com/dino"
_DEIT = "https://dl.fbaipublicfiles.com/deit"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"

_WEIGHTS = {
    **{f"dino_{name}": f"{_DINO}/dino_{file}_pretrain/dino_{file}_pretrain.pth" for name, file in (
        ("vits16", "deitsmall16"), ("vits8", "deitsmall8"), ("vitb16", "vitbase16"), ("vitb8", "vitbase8"),
        ("xcit_small_12_p16", "xcit_small_12_p16"), ("xcit_small_12_p8", "xcit_small_12_p8"),
        ("xcit_medium_24_p16", "xcit_medium_24_p16"), ("xcit_medium_24_p8", "xcit_medium_24_p8"),
        ("resnet50", "resnet50"),
    )},
    **{name: f"{_DEIT}/{name}-{digest}.pth" for name, digest in (
        ("deit_tiny_patch16_224", "a1311bcf"), ("deit_small_patch16_224", "cd65a155"),
        ("deit_base_patch16_224", "b5f2ef4d"), ("deit_base_patch16_384", "8de9b5d1"),
        ("deit_tiny_distilled_patch16_224", "b40b3cf7"), ("deit_small_distilled_patch16_224", "649709d9"),
        ("deit_base_distilled_patch16_224", "df68dfff"), ("deit_base_distilled_patch16_384", "d0272ac0"),
    )},
    **{f"dinov2_vit{size}14{suffix}": f"{_DINOV2}/dinov2_vit{size}14/dinov2_vit{size}14{file}_pretrain.pth"
       for suffix, file in (("", ""), ("_reg", "_reg4")) for size in "sblg"},
}


def _download(url: str) -> str:
    """The local path of the file at `url` in torch.hub's cache, downloaded on first use (its SHA-256 prefix
    checked when the name carries one, as torch.hub.load_state_dict_from_url does with check_hash=True)."""
    import os
    from urllib.parse import urlparse

    import torch

    from distill.errors import CheckpointError

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urlparse(url).path))
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(os.path.basename(path))
        try:  # written to a temporary file first: an interrupted download leaves no file behind at `path`
            torch.hub.download_url_to_file(url, path, hash_prefix=digest.group(1) if digest else None)
        except (OSError, RuntimeError) as error:  # RuntimeError: a hash that does not match
            raise CheckpointError(f"cannot download {url} ({error}): check the connection, or download the file "
                                  "yourself and pass pretrained=PATH") from None
    return path


def _entry_point(name: str, url: str):
    """The hub function of one official name: create_backbone(name) with the weights `pretrained` asks for."""

    def entry(pretrained=True, **kwargs):
        import os

        from distill.models import create_backbone

        if pretrained is True:
            source = _download(url)
        elif pretrained is False or pretrained is None:
            source = None
        else:
            source = os.fspath(pretrained) if isinstance(pretrained, os.PathLike) else pretrained
        return create_backbone(name, pretrained=source, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"The {name} backbone. pretrained=True: the official weights ({url}); False: random "
                     "weights; a path or a checkpoint dict: those weights. Other keyword arguments go to "
                     f"distill.models.create_backbone('{name}', ...).")
    return entry


for _name, _url in _WEIGHTS.items():
    globals()[_name] = _entry_point(_name, _url)
del _name, _url
