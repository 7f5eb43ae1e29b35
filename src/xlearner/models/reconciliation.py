"""Reconciliation layers: how one task backbone reads another's features.

R_{t<-u} = 1x1 conv (no bias) + BatchNorm2d with gamma = 0 (and beta = 0). At
initialisation R outputs exactly zero, so f_t + R(f_u) == f_t: the expansion stage
starts from independent task backbones and learns how much to borrow.
"""
from __future__ import annotations

from torch import Tensor, nn


class Reconciliation(nn.Module):
    """R_{t<-u}: projects branch u's stage feature into branch t's feature space."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn.weight)  # zero gamma: the branch is unchanged at init
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))
