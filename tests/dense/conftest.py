import pytest
import torch

from distill.models import create_backbone

# The command-line options that rebuild the tiny ViT of `tiny_weights`.
TINY_VIT = ["--backbone", "vit_tiny", "--set", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=7",
            "img_size=28", "in_chans=1"]


@pytest.fixture
def tiny_weights(tmp_path):
    """A 2-block, 32-wide ViT of 7-px patches for grey images (random weights, seed 0), saved as a bare state dict."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("vit_tiny", depth=2, embed_dim=32, num_heads=2, patch_size=7, img_size=28,
                               in_chans=1).state_dict(), path)
    return path
