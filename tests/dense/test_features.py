"""Dense descriptors against hand computations: facets against forward hooks on the same weights, the normal
forward at stride = patch size, and the overlapping-patch trick written here from its definition."""

import pytest
import torch
import torch.nn.functional as F

from distill.dense import extract, log_binned
from distill.errors import InputError
from distill.models import create_backbone
from distill.models.layers import resize_pos_embed


def _vit(**extra):
    torch.manual_seed(0)
    return create_backbone("vit_tiny", depth=3, embed_dim=48, num_heads=3, patch_size=8, img_size=32, **extra).eval()


def test_facets_equal_what_forward_hooks_see(tmp_path):
    model = _vit(num_register_tokens=2, distilled=True)
    images = torch.randn(2, 3, 40, 48)
    seen = {}
    hooks = [model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("token", o)),
             model.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))]
    with torch.no_grad():
        model.forward_features(images)
    for hook in hooks:
        hook.remove()
    prefix = 1 + 1 + 2  # class, distillation, registers: never in the grid
    q, k, v = seen["qkv"].chunk(3, dim=-1)
    expected = {"token": seen["token"], "query": q, "key": k, "value": v}
    for facet, tensor in expected.items():
        dense = extract(model, images, layers=[1], facet=facet, norm=False)
        assert dense.grid == (5, 6) and dense.patches.shape == (2, 5, 6, 48)
        assert torch.allclose(dense.patches, tensor[:, prefix:].reshape(2, 5, 6, 48), atol=1e-5), facet
        assert torch.allclose(dense.cls, tensor[:, 0], atol=1e-5), facet
    normed = extract(model, images, layers=[1], facet="token")
    assert torch.allclose(normed.patches, model.norm(seen["token"])[:, prefix:].reshape(2, 5, 6, 48), atol=1e-5)


def test_stride_equal_to_the_patch_gives_the_normal_forward():
    model = _vit()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)["x_norm_patchtokens"]
    for stride in (None, 8):
        dense = extract(model, images, stride=stride)
        assert dense.stride == 8 and torch.allclose(dense.patches, tokens.reshape(3, 4, 4, 48), atol=1e-5)


def _overlapping_reference(model, images, stride):
    """The trick from its definition: every p x p window at the stride embedded by the patch filter, the position
    embedding resized to that grid, then the transformer as usual."""
    p = model.patch_size
    h, w = (images.shape[-2] - p) // stride + 1, (images.shape[-1] - p) // stride + 1
    windows = F.unfold(images, kernel_size=p, stride=stride)  # [B, C*p*p, h*w]
    weight = model.patch_embed.proj.weight.reshape(model.embed_dim, -1)
    tokens = windows.transpose(1, 2) @ weight.t() + model.patch_embed.proj.bias
    position = resize_pos_embed(model.pos_embed[:, 1:], model.pos_grid, (h, w), model.interpolate_offset,
                                model.interpolate_antialias)
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(images), -1, -1)
    tokens = torch.cat([cls, tokens + position], dim=1)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 1:].reshape(len(images), h, w, -1)


@pytest.mark.parametrize("stride", [4, 2])
def test_overlapping_patches_follow_the_definition(stride):
    model = _vit()
    images = torch.randn(2, 3, 32, 40)
    dense = extract(model, images, stride=stride)
    assert dense.grid == ((32 - 8) // stride + 1, (40 - 8) // stride + 1)
    with torch.no_grad():
        assert torch.allclose(dense.patches, _overlapping_reference(model, images, stride), atol=1e-5)
    centers = dense.centers()
    assert centers[0, 0].tolist() == [3.5, 3.5] and centers[0, 1].tolist() == [3.5 + stride, 3.5]


def test_layers_concatenate_in_the_order_asked_and_chunks_change_nothing():
    model = _vit()
    images = torch.randn(5, 3, 32, 32)
    both = extract(model, images, layers=[-1, 0], chunk=2)
    last, first = extract(model, images, layers=[2]), extract(model, images, layers=[0], chunk=5)
    assert torch.allclose(both.patches, torch.cat([last.patches, first.patches], dim=-1), atol=1e-6)
    assert torch.allclose(both.cls, torch.cat([last.cls, first.cls], dim=-1), atol=1e-6)


def test_resnet_stages_as_the_token_facet():
    model = create_backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    dense = extract(model, images, layers=[3, 4])
    assert dense.patches.shape == (2, 4, 4, 256 + 512) and dense.cls is None and dense.stride == 16
    with pytest.raises(InputError, match="a ResNet has only 'token'"):
        extract(model, images, facet="key")


def test_log_binned_descriptors_take_the_mean_of_each_bin():
    torch.manual_seed(0)
    patches = torch.randn(1, 9, 9, 2)
    binned = log_binned(patches, hierarchy=2)
    assert binned.shape == (1, 9, 9, 2 * 17)
    y, x = 4, 4
    cells = binned[0, y, x].reshape(17, 2)
    assert torch.allclose(cells[0], patches[0, y - 1, x - 1])  # k = 0: the 3 x 3 cells around, row by row
    assert torch.allclose(cells[4], patches[0, y, x])
    assert torch.allclose(cells[9], patches[0, y - 4:y - 1, x - 4:x - 1].mean(dim=(0, 1)), atol=1e-6)  # k = 1
    corner = log_binned(patches, 2)[0, 0, 0].reshape(17, 2)
    assert torch.allclose(corner[0], patches[0, 0, 0])  # beyond the border the nearest bin repeats


@pytest.mark.parametrize("kwargs, message", [
    (dict(facet="keys"), "facet 'keys' unknown"),
    (dict(layers=[3]), r"layer \[3\] out of range: the model has 3"),
    (dict(stride=3), "stride 3 must divide the patch size 8"),
    (dict(stride=16), "stride 16 must divide the patch size 8"),
])
def test_bad_requests_are_one_clear_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        extract(_vit(), torch.randn(1, 3, 32, 32), **kwargs)
    with pytest.raises(InputError, match="must be 8 \\+ a multiple of 4"):
        extract(_vit(), torch.randn(1, 3, 30, 32), stride=4)
