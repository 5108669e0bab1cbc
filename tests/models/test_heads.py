import torch

from distill.models.heads import DINOHead


def test_dino_head_layout_and_shapes():
    head = DINOHead(48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    names = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= names
    assert head(torch.randn(5, 48)).shape == (5, 100)
    assert DINOHead(48, out_dim=10, nlayers=1, bottleneck_dim=8)(torch.randn(2, 48)).shape == (2, 10)


def test_last_layer_is_normalised_and_its_norm_frozen():
    head = DINOHead(8, out_dim=20, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    rows = head.last_layer.weight().norm(dim=1)
    assert torch.allclose(rows, torch.ones(20), atol=1e-6)
    # outputs are cosines between the L2-normalised bottleneck and the prototypes
    assert head(torch.randn(6, 8)).abs().max() <= 1 + 1e-5
    assert DINOHead(8, out_dim=20, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_prototype_scores_stay_float32_under_bf16_autocast():
    head = DINOHead(8, out_dim=20, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
