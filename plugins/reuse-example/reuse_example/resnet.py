"""A small residual CNN that meets reuse-core's backbone contract."""
from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a skip connection (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return (self.body(x) + self.skip(x)).relu()


class TinyResNet(nn.Module):
    """stem -> three residual stages (width, 2*width, 4*width; the last two halve the size) ->
    global average pool -> fc. Any input of at least 1x1 pixels."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stage1 = ResidualBlock(width, width, 1)
        self.stage2 = ResidualBlock(width, 2 * width, 2)
        self.stage3 = ResidualBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        # The backbone contract: where the head is, and the feature blocks in forward order.
        self.head_name = "fc"
        self.block_names = ("stem", "stage1", "stage2", "stage3")

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))
