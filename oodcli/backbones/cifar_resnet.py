"""CIFAR-style ResNet-18/34 (3x3 stem, no max-pool) for 32x32 benchmarks.

Module names follow OpenOOD's ResNet18_32x32 (conv1, bn1, layer1..4, fc, blocks with
``shortcut``), so its published checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodcli.backbones.modules import Backbone, StagedClassifier, load_state_dict_into, read_state_dict
from oodcli.backbones.registry import CIFAR  # noqa: F401  (the specs are declared there)

DEPTHS = {"cifar_resnet18": (2, 2, 2, 2), "cifar_resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depths=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _rename(key: str) -> str:
    """Map the other common CIFAR ResNet spellings (torchvision-style, kuangliu's) to ours."""
    key = key.replace(".downsample.", ".shortcut.")
    return "fc." + key[len("linear."):] if key.startswith("linear.") else key


def wrap(net: CifarResNet) -> StagedClassifier:
    early = nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.layer1)
    mid = nn.Sequential(net.layer2, net.layer3, net.layer4, net.avgpool, nn.Flatten(1))
    return StagedClassifier(early, mid, net.fc, pool_at=3, input_size=CIFAR.crop)


def build(arch: str, weights: str | None) -> Backbone:
    if weights in (None, "random"):
        torch.manual_seed(0)
        return wrap(CifarResNet(DEPTHS[arch]))
    state = {_rename(k): v for k, v in read_state_dict(weights).items()}
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 10
    net = CifarResNet(DEPTHS[arch], num_classes)
    load_state_dict_into(net, state, weights)
    return wrap(net)
