"""The CIFAR-10 networks of He et al. 2015, section 4.2.

A 3x3 convolution with 16 filters, then three stages of ``n`` blocks of two
3x3 convolutions each (16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps),
global average pooling and a 10-way linear layer: ``6n + 2`` weighted layers.
Every convolution is followed by batch normalisation. A *plain* net and a
*residual* net have the same layers; the residual net adds a shortcut around
every pair of convolutions.

Shortcut options (the paper's names):
    A  identity; where the shape changes, subsample by 2 and pad the new
       channels with zeros, so no parameters are added (the paper's default
       on CIFAR-10, which keeps plain and residual parameter counts equal).
    B  identity, and a 1x1 projection (+ BN) only where the shape changes.
    C  a 1x1 projection (+ BN) on every shortcut.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UsageError

ARCHS = ("plain", "resnet")
SHORTCUTS = ("A", "B", "C")
STAGE_WIDTHS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    """``n`` for a ``6n + 2``-layer net; a clear error for any other depth."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise UsageError(f"depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {depth}")
    return (depth - 2) // 6


class ZeroPadShortcut(nn.Module):
    """Option A where the shape changes: take every other pixel, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension: F.pad takes (W, W, H, H, C, C) from the last dim backwards.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class Projection(nn.Sequential):
    """Options B and C: a strided 1x1 convolution followed by BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )


def make_shortcut(option: str | None, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut of one block, or None for a plain block."""
    if option is None:
        return None
    if option not in SHORTCUTS:
        raise UsageError(f"model.shortcut must be one of {', '.join(SHORTCUTS)}; got {option!r}")
    shape_changes = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and shape_changes):
        return Projection(in_channels, out_channels, stride)
    if shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut if there is one, then ReLU.

    With ``shortcut=None`` this is two layers of the plain net.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str | None = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarNet(nn.Module):
    """A ``6n+2``-layer CIFAR net; ``shortcut=None`` gives the plain net."""

    def __init__(self, depth: int, shortcut: str | None = "A", num_classes: int = 10):
        super().__init__()
        n = blocks_per_stage(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for index in range(n):
                # The first block of stages 2 and 3 halves the map with a stride-2 conv.
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions, BN as identity: the paper's [13]."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def plain_net(depth: int, num_classes: int = 10) -> CifarNet:
    return CifarNet(depth, shortcut=None, num_classes=num_classes)


def resnet(depth: int, shortcut: str = "A", num_classes: int = 10) -> CifarNet:
    return CifarNet(depth, shortcut=shortcut, num_classes=num_classes)


def build_model(arch: str, depth: int, shortcut: str = "A", num_classes: int = 10) -> CifarNet:
    """The network a config asks for: ``arch`` is ``plain`` or ``resnet``."""
    if arch == "plain":
        return plain_net(depth, num_classes)
    if arch == "resnet":
        return resnet(depth, shortcut, num_classes)
    raise UsageError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
