"""Parameter groups (weight decay, layer-wise decay), learning-rate and weight-decay setting, and LARS against
their definitions."""

import torch
from torch import nn

from distill.engine.optim import LARS, build_optimizer, kernels_kept, set_lr_and_wd
from distill.engine.param_groups import names_without_decay, param_groups
from distill.models import create_backbone
from distill.models.heads import DINOHead


def test_no_weight_decay_for_biases_and_one_dimensional_parameters():
    model = create_backbone("vit_tiny", depth=1, layerscale_init=1e-5)
    head = DINOHead(192, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    net = nn.ModuleDict({"backbone": model, "head": head})
    groups = param_groups(net)
    spared = set(names_without_decay(net, groups))
    for name, param in net.named_parameters():
        if not param.requires_grad:
            assert name not in spared and all(param is not p for g in groups for p in g["params"])
        elif name.endswith(".bias") or param.ndim == 1:
            assert name in spared, name
        else:
            assert name not in spared, name
    assert "backbone.blocks.0.ls1.gamma" in spared and "backbone.pos_embed" not in spared  # DINO decays tokens
    timm_style = set(names_without_decay(net, param_groups(net, exclude_tokens=True)))
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.mask_token"} <= timm_style


def test_set_lr_and_wd_applies_decay_only_where_allowed():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(param_groups(model))
    set_lr_and_wd(optimizer, 0.1, 0.05)
    by_decay = {g["apply_wd"]: g for g in optimizer.param_groups}
    assert by_decay[True]["weight_decay"] == 0.05 and by_decay[False]["weight_decay"] == 0.0
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)


def test_lars_step_is_the_definition():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    optimizer = LARS([weight, bias], lr=0.1, weight_decay=0.1, momentum=0.9, eta=0.001)
    optimizer.step()
    update = torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # grad + wd * w
    trust = 0.001 * 5.0 / update.norm()
    assert torch.allclose(weight.data, torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    assert torch.allclose(bias.data, torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: no decay, no adaptation


def test_adamw_fused_on_cpu_steps_like_the_per_parameter_loop():
    """The fused AdamW chosen for plain CPU tensors gives PyTorch's per-parameter result, decoupled weight decay on
    the decayed group only, over several steps with changing rates."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    fused = build_optimizer("adamw", param_groups(nets[0]), betas=(0.9, 0.95))
    loop = torch.optim.AdamW(param_groups(nets[1]), lr=0.0, weight_decay=0.0, betas=(0.9, 0.95), foreach=False)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    for step in range(5):
        x = torch.randn(8, 6)
        for net, optimizer in zip(nets, (fused, loop)):
            set_lr_and_wd(optimizer, 1e-2 * (step + 1), 0.1)
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(nets[0].parameters(), start))  # the steps moved them
    assert build_optimizer("adamw", [{"params": [nn.Parameter(torch.zeros(2, dtype=torch.int32), requires_grad=False)]}]
                           ).param_groups[0]["fused"] is False


def test_loading_a_state_keeps_this_runs_kernel_choice():
    """A checkpoint's groups carry the kernel choice of the run that wrote it; loading keeps this run's, and the
    loaded moments and step count are used."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    writer = torch.optim.AdamW(param_groups(net), lr=1e-2, foreach=False)  # as written by a GPU or sharded run
    net(torch.randn(5, 4)).sum().backward()
    writer.step()
    reader = build_optimizer("adamw", param_groups(net))
    with kernels_kept(reader):
        reader.load_state_dict(writer.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in reader.param_groups)
    assert all(int(reader.state[p]["step"]) == 1 and torch.equal(reader.state[p]["exp_avg"], writer.state[p]["exp_avg"])
               for p in net.parameters())
    reader.param_groups[0]["lr"] = 1e-2
    reader.step()  # the fused kernel runs on the loaded state
    assert all(int(reader.state[p]["step"]) == 2 for p in reader.param_groups[0]["params"])
