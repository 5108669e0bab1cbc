"""The patch embedding's two paths, the convolution kernel and one matrix product over unfolded patches (which
training on a CPU takes for small images): same tokens, same gradients, and the rule that picks between them."""

import pytest
import torch
import torch.nn.functional as F

from distill.models.layers import patch_embed
from distill.models.layers.patch_embed import PatchEmbed


@pytest.mark.parametrize("channels,size,patch", [(1, 28, 7), (1, 14, 7), (3, 32, 4), (3, 24, 8)])
def test_unfolded_patches_give_the_convolutions_tokens_and_gradients(channels, size, patch):
    torch.manual_seed(size + channels)
    embed = PatchEmbed(patch, channels, 16)
    images = torch.randn(5, channels, size, size, requires_grad=True)
    grad = torch.randn(5, (size // patch) ** 2, 16)
    assert embed._unfold_pays(images)
    results = []
    for tokens in (embed(images), F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=patch).flatten(2).transpose(1, 2)):
        results.append((tokens, *torch.autograd.grad(tokens, (embed.proj.weight, embed.proj.bias, images), grad)))
    (ours, our_weight, our_bias, our_input), (kernel, kernel_weight, kernel_bias, kernel_input) = results
    assert ours.shape == kernel.shape == (5, (size // patch) ** 2, 16)
    torch.testing.assert_close(ours, kernel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_weight, kernel_weight, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(our_bias, kernel_bias, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(our_input, kernel_input, atol=1e-5, rtol=1e-5)  # saliency and attacks need it
    assert our_weight.abs().max() > 0.1


def test_only_training_on_small_images_takes_the_unfolded_path():
    embed = PatchEmbed(16, 3, 8)
    small = torch.zeros(1, 3, 64, 64)
    assert embed._unfold_pays(small)
    assert not embed._unfold_pays(torch.zeros(1, 3, 80, 80))  # above SMALL_IMAGE_PIXELS: the kernel
    assert 64 * 64 <= patch_embed.SMALL_IMAGE_PIXELS < 80 * 80
    with torch.no_grad():
        assert not embed._unfold_pays(small)  # inference and export keep the convolution
    embed.proj.requires_grad_(False)
    assert not embed._unfold_pays(small)  # a frozen embedding (an EMA teacher) too


def test_an_exported_embedding_keeps_every_image_size():
    """torch.export of a trainable embedding traced at a small size: the graph must not be bound to small images."""
    embed = PatchEmbed(7, 1, 8)
    size = torch.export.Dim("size", min=1, max=40)
    program = torch.export.export(embed, (torch.randn(2, 1, 28, 28),), dynamic_shapes={"x": {2: 7 * size, 3: 7 * size}})
    for pixels in (28, 224):
        images = torch.randn(2, 1, pixels, pixels)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), embed(images), atol=1e-5, rtol=1e-5)
