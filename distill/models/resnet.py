"""ResNet backbones (torchvision's, without the classifier) for DINO's ResNet-50 recipe.

State-dict keys are torchvision's minus `fc.*`: DINO's released `dino_resnet50_pretrain.pth` loads as is.
"""

from typing import List, Union

import torch
import torchvision
from torch import nn

from distill.errors import InputError

RESNET_DEPTHS = (18, 34, 50, 101, 152)


class ResNetBackbone(nn.Module):
    def __init__(self, depth: int = 50, in_chans: int = 3, zero_init_residual: bool = False, img_size: int = 224):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise InputError(f"ResNet depth {depth} unknown: choose one of {RESNET_DEPTHS}")
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, zero_init_residual=zero_init_residual)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.config = dict(depth=depth, in_chans=in_chans, zero_init_residual=zero_init_residual,
                           img_size=(img_size, img_size))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.embed_dim = self.num_features = net.fc.in_features
        self.num_classes = 0

    def no_weight_decay(self) -> set:
        return set()

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> the last stage's feature map [B, embed_dim, H/32, W/32] (rounded up), before
        pooling (what `forward` averages; the ONNX export gives both)."""
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise InputError(f"expected [batch, {self.conv1.in_channels}, height, width] images, got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Union[torch.Tensor, List[torch.Tensor]]):
        if isinstance(x, (list, tuple)):
            return [self.forward(xi) for xi in x]
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)
