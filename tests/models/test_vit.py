"""The ViT's behaviour against the official models (facebookresearch/dino vision_transformer.py,
facebookresearch/dinov2 dinov2/models/vision_transformer.py, timm's deit.py): token layout, both position-embedding
conventions, masks, multi-crop lists, intermediate layers, heads, and clear errors on bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import InputError
from distill.models import create_backbone


def _eval(model):
    return model.eval()


def test_offset_convention_equals_the_dino_definition():
    """DINO / DINOv2 without registers: bicubic, scale factor (grid + 0.1) / trained grid, no antialias."""
    model = _eval(create_backbone("dinov2_vits14", depth=1))
    for height, width in [(224, 224), (168, 252), (896, 700)]:
        h0, w0 = height // 14, width // 14
        patch = model.pos_embed[:, 1:]
        side = int(math.sqrt(patch.shape[1]))
        expected = F.interpolate(
            patch.reshape(1, side, side, -1).permute(0, 3, 1, 2),
            scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic",
        ).permute(0, 2, 3, 1).reshape(1, -1, patch.shape[-1])
        got = model.interpolate_pos_encoding((h0, w0))
        assert torch.equal(got[:, :1], model.pos_embed[:, :1])
        assert torch.allclose(got[:, 1:], expected, atol=1e-6)
        # and it is really different from the exact-size convention
        exact = F.interpolate(patch.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(h0, w0), mode="bicubic",
                              antialias=True).permute(0, 2, 3, 1).reshape(1, -1, patch.shape[-1])
        assert not torch.allclose(got[:, 1:], exact, atol=1e-4)


def test_exact_convention_equals_the_registers_definition():
    """DINOv2 with registers: bicubic to the exact grid, antialiased; registers get no position embedding."""
    model = _eval(create_backbone("dinov2_vits14_reg", depth=1))
    patch = model.pos_embed[:, 1:]
    expected = F.interpolate(patch.reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(12, 18), mode="bicubic",
                             antialias=True).permute(0, 2, 3, 1).reshape(1, -1, 384)
    assert torch.allclose(model.interpolate_pos_encoding((12, 18))[:, 1:], expected, atol=1e-6)
    tokens, _ = model.prepare_tokens(torch.randn(2, 3, 168, 252))
    assert tokens.shape == (2, 1 + 4 + 12 * 18, 384)
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))       # no position embedding
    assert torch.allclose(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))


def test_distillation_token_is_second_and_has_a_position_embedding():
    model = create_backbone("deit_tiny_distilled_patch16_224", depth=1)
    tokens, _ = model.prepare_tokens(torch.randn(1, 3, 224, 224))
    assert torch.allclose(tokens[0, 1], model.dist_token[0, 0] + model.pos_embed[0, 1])


def test_forward_features_dict_and_multicrop_list():
    model = _eval(create_backbone("dinov2_vits14_reg", depth=2))
    crops = [torch.randn(2, 3, 98, 98), torch.randn(3, 3, 42, 56)]
    with torch.no_grad():
        outputs = model.forward_features(crops)
        single = model.forward_features(crops[1])
    assert isinstance(outputs, list) and len(outputs) == 2
    assert set(outputs[0]) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert outputs[0]["x_norm_patchtokens"].shape == (2, 49, 384)
    assert outputs[1]["x_norm_regtokens"].shape == (3, 4, 384)
    assert outputs[1]["x_prenorm"].shape == (3, 1 + 4 + 12, 384)
    assert torch.equal(outputs[1]["x_norm_clstoken"], single["x_norm_clstoken"])


def test_forward_is_the_normalised_class_token_with_and_without_autograd():
    model = _eval(create_backbone("vit_small", depth=2))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        reference = model.forward_features(x)["x_norm_clstoken"]
        fast = model(x)  # in-place activation path
    with_grad = model(x)  # autograd path (on a CPU, patches of small images embedded as one matrix product)
    assert torch.allclose(fast, reference, atol=1e-6) and torch.allclose(with_grad, reference, atol=1e-5)
    with_grad.sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad is not None


def test_masked_patches_are_replaced_by_the_mask_token():
    model = _eval(create_backbone("vit_small", depth=2, img_size=64))
    torch.nn.init.normal_(model.mask_token)
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :4] = True  # the top row of 16x16 patches
    changed_masked = x.clone()
    changed_masked[:, :, :16] = torch.randn(2, 3, 16, 64)  # only pixels of masked patches
    changed_visible = x.clone()
    changed_visible[:, :, 32:] += 1.0
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
        same = model.forward_features(changed_masked, masks=masks)
        other = model.forward_features(changed_visible, masks=masks)
        unmasked = model.forward_features(x)
    assert torch.equal(out["masks"], masks)
    assert torch.allclose(out["x_norm_clstoken"], same["x_norm_clstoken"], atol=1e-6)
    assert not torch.allclose(out["x_norm_clstoken"], other["x_norm_clstoken"], atol=1e-3)
    assert not torch.allclose(out["x_norm_clstoken"], unmasked["x_norm_clstoken"], atol=1e-3)
    tokens, _ = model.prepare_tokens(x, masks)
    assert torch.allclose(tokens[0, 1], model.mask_token[0] + model.pos_embed[0, 1])
    with torch.no_grad():
        grid_masks = model.forward_features(x, masks=masks.reshape(2, 4, 4))
    assert torch.equal(grid_masks["x_norm_clstoken"], out["x_norm_clstoken"])


def test_get_intermediate_layers():
    model = _eval(create_backbone("dinov2_vits14_reg", depth=4))
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        last = model.forward_features(x)
        layers = model.get_intermediate_layers(x, n=2)
        pairs = model.get_intermediate_layers(x, n=[0, 3], reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(x, n=1, norm=False)
    assert len(layers) == 2 and layers[-1].shape == (2, 24, 384)
    assert torch.allclose(layers[-1], last["x_norm_patchtokens"], atol=1e-6)
    assert pairs[1][0].shape == (2, 384, 4, 6)
    assert torch.allclose(pairs[1][1], last["x_norm_clstoken"], atol=1e-6)
    assert torch.allclose(raw[0], last["x_prenorm"][:, 5:], atol=1e-6)
    with pytest.raises(InputError, match="out of range"):
        model.get_intermediate_layers(x, n=[4])


def test_deit_distilled_train_returns_both_heads_eval_their_mean():
    model = create_backbone("deit_tiny_distilled_patch16_224", depth=2, num_classes=7)
    x = torch.randn(3, 3, 224, 224)
    model.train()
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (3, 7)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_plain_deit_returns_class_logits_in_both_modes():
    model = create_backbone("deit_tiny_patch16_224", depth=1, num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    assert model.train()(x).shape == (2, 5)
    assert model.eval()(x).shape == (2, 5)


def test_no_weight_decay_names_the_tokens():
    assert create_backbone("dinov2_vits14_reg", depth=1).no_weight_decay() == {
        "pos_embed", "cls_token", "register_tokens", "mask_token"}
    assert create_backbone("deit_tiny_distilled_patch16_224", depth=1).no_weight_decay() == {
        "pos_embed", "cls_token", "dist_token"}


def test_last_self_attention_is_a_distribution_consistent_with_the_block():
    model = _eval(create_backbone("vit_tiny", depth=2, img_size=32, patch_size=8, num_register_tokens=2))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        probs = model.get_last_self_attention(x)
        tokens, _ = model.prepare_tokens(x)
        tokens = model.blocks[0](tokens)
        block = model.blocks[1]
        normed = block.norm1(tokens)
        v = block.attn.qkv(normed).reshape(2, 19, 3, 3, 64)[:, :, 2].transpose(1, 2)
        manual = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 19, 192))
        fused = block.attn(normed)
    assert probs.shape == (2, 3, 19, 19)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 19), atol=1e-5)
    assert torch.allclose(manual, fused, atol=1e-5)


def test_drop_path_is_stochastic_in_training_only():
    model = create_backbone("vit_tiny", depth=4, drop_path_rate=0.5, img_size=32)
    x = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------- bad input


def test_wrong_channel_count():
    model = create_backbone("vit_tiny", depth=1)
    with pytest.raises(InputError, match=r"3-channel images but got 1 channels: .*in_chans=1"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(InputError, match="in_chans=4"):
        model(torch.randn(1, 4, 224, 224))


def test_size_not_a_multiple_of_the_patch_size():
    model = create_backbone("dinov2_vits14", depth=1)
    with pytest.raises(InputError, match=r"image size 230x230 is not a multiple of the patch size 14.*e.g. 224x224"):
        model(torch.randn(1, 3, 230, 230))
    with pytest.raises(InputError, match="not a multiple"):
        model.forward_features([torch.randn(1, 3, 98, 98), torch.randn(1, 3, 100, 98)])
    with pytest.raises(InputError, match="img_size 225x225 is not a multiple of patch_size 16"):
        create_backbone("vit_tiny", img_size=225)


def test_wrong_rank_and_bad_masks():
    model = create_backbone("vit_tiny", depth=1, img_size=32)
    with pytest.raises(InputError, match=r"\[batch, channels, height, width\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(InputError, match="masks must be a boolean tensor"):
        model.forward_features(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 4))
    with pytest.raises(InputError, match="no mask token"):
        create_backbone("dino_vits16", depth=1).forward_features(
            torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_crops_equal_separate_calls(precision):
    torch.manual_seed(0)
    model = create_backbone("vit_small", depth=2, img_size=32, patch_size=8, num_register_tokens=2).eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 16, 16), torch.randn(3, 3, 24, 40)]
    masks = [torch.rand(3, 16) < 0.4, None, None, None, None]
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        separate = [model.forward_features(x, masks=m) for x, m in zip(crops, masks)]
        packed = model.forward_features_packed(crops, masks)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for a, b in zip(separate, packed):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert a[key].shape == b[key].shape
            assert torch.allclose(a[key].float(), b[key].float(), atol=tolerance), key
    with pytest.raises(InputError, match="same size"):
        model.forward_features_packed([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])


def test_subset_stochastic_depth_computes_only_the_kept_samples():
    from distill.models.layers.block import residual_on_subset

    x = torch.randn(10, 4, 8)
    seen = []

    def branch(t):
        seen.append(t.shape[0])
        return torch.ones_like(t)

    torch.manual_seed(0)
    out = residual_on_subset(x, branch, drop_prob=0.3)
    assert seen == [7]  # int(10 * 0.7) samples through the branch
    changed = (out != x).flatten(1).any(dim=1)
    assert int(changed.sum()) == 7
    assert torch.allclose(out[changed] - x[changed], torch.full((7, 4, 8), 10 / 7))  # rescaled by B / kept
    model = create_backbone("vit_tiny", depth=2, img_size=16, patch_size=8, drop_path_rate=0.5,
                            drop_path_mode="subset", drop_path_uniform=True).train()
    images = torch.randn(6, 3, 16, 16)
    model(images).sum().backward()  # trains
    model.eval()
    with torch.no_grad():
        plain = create_backbone("vit_tiny", depth=2, img_size=16, patch_size=8).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(model(images), plain(images))  # no effect at evaluation
