"""The registry: official names, published parameter counts and FLOPs, overrides."""

import pytest
import torch

from distill.errors import InputError
from distill.eval.flops import backbone_flops, count_flops, count_parameters
from distill.models import create_backbone, get_spec, list_backbones

OFFICIAL = (
    ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"]
    + [f"deit_{s}_{d}patch16_224" for s in ("tiny", "small", "base") for d in ("", "distilled_")]
    + ["deit_base_patch16_384", "deit_base_distilled_patch16_384"]
    + [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")]
)
GENERIC = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"]


def test_every_official_and_generic_name_is_registered():
    assert set(OFFICIAL + GENERIC) <= set(list_backbones())
    assert list_backbones("dinov2_*_reg") == [f"dinov2_vit{s}14_reg" for s in "bgls"]


def _params(name, **overrides):
    with torch.device("meta"):
        return count_parameters(create_backbone(name, **overrides))


@pytest.mark.parametrize("name,expected", [
    ("dino_vits16", 21_665_664),        # ViT-S/16 ~21.7M without head
    ("dino_vitb16", 85_798_656),        # ViT-B/16 ~85.8M
    ("dinov2_vitl14", 304_368_640),     # ViT-L/14 ~304M (DINOv2 release)
    ("dinov2_vitg14", 1_136_480_768),   # ViT-g/14 ~1.1B, SwiGLU
])
def test_parameter_counts_equal_published(name, expected):
    assert _params(name) == expected


def test_deit_counts_include_heads_and_distillation_token():
    # DeiT-S 22.05M, DeiT-S distilled 22.44M (timm's published sizes)
    assert round(_params("deit_small_patch16_224") / 1e6, 2) == 22.05
    assert round(_params("deit_small_distilled_patch16_224") / 1e6, 2) == 22.44


def test_vit_small_16_at_224_counts_about_4_6_gflops():
    flops = backbone_flops("vit_small")
    assert 4.55e9 < flops < 4.65e9
    full = create_backbone("vit_small").eval()
    with torch.no_grad():
        assert count_flops(full, (torch.zeros(1, 3, 224, 224),)) == flops  # one-block extrapolation is exact


def test_deit_base_gflops_match_the_paper():
    assert round(backbone_flops("deit_base_patch16_224") / 1e9, 1) == 17.6   # DeiT paper: 17.6
    assert round(backbone_flops("deit_base_patch16_384") / 1e9, 1) == 55.5   # DeiT paper: 55.5


def test_generic_names_at_any_patch_size():
    assert create_backbone("vit_small_patch8", depth=1).patch_size == 8
    assert create_backbone("vit_small", patch_size=14, depth=1).patch_size == 14
    assert get_spec("vit_large_patch14").kwargs["embed_dim"] == 1024


def test_overrides_change_defaults():
    model = create_backbone("dinov2_vits14_reg", img_size=224, depth=3, num_register_tokens=2, drop_path_rate=0.2)
    assert len(model.blocks) == 3 and model.register_tokens.shape == (1, 2, 384)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # linear decay starts at 0


def test_unknown_name_and_unknown_override_are_clear_errors():
    with pytest.raises(InputError, match="unknown backbone 'dinov2_vits16'.*did you mean.*dinov2_vits14"):
        create_backbone("dinov2_vits16")
    with pytest.raises(InputError, match=r"unknown backbone option\(s\) num_registers for vit_small; allowed: .*num_register_tokens"):
        create_backbone("vit_small", num_registers=4)
