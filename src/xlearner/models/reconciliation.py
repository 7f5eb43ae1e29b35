"""Reconciliation layers: how one task backbone reads another's features.

R_{t<-u} = 1x1 conv (no bias) + BatchNorm2d with gamma = 0 (and beta = 0). At
initialisation R outputs exactly zero, so f_t + R(f_u) == f_t: the expansion stage
starts from independent task backbones and learns how much to borrow.
"""
from __future__ import annotations

import math

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


def _resample_path(in_channels: int, out_channels: int, ratio: float) -> nn.Sequential:
    """One path of gv-benchmark's ``Cross_Conv_HRNet_Layer``: a feature at stride ``s_in`` to stride
    ``s_out`` (``ratio = s_out / s_in``). Same or coarser source (ratio <= 1): 1x1 conv + BN, then
    nearest upsampling; finer source (ratio = 2^k): k stride-2 3x3 convs (BN + ReLU between)."""
    if ratio <= 1:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        if ratio < 1:
            layers.append(nn.Upsample(scale_factor=round(1 / ratio), mode="nearest"))
        return nn.Sequential(*layers)
    k = round(math.log2(ratio))
    if 2 ** k != ratio:
        raise ValueError(f"multi-stage reconciliation needs strides that differ by powers of two, got ratio {ratio}")
    layers = []
    for _ in range(k - 1):
        layers += [nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(in_channels), nn.ReLU(inplace=False)]
    layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers)


class MultiStageReconciliation(nn.Module):
    """R_{t<-u} at stage s reading stages 1..s of branch u (gv-benchmark's cross layer).

    ``sum_j path_j(f_u,j)``: each earlier (finer) stage goes down by stride-2 3x3 convs, the same
    stage by a 1x1 conv + BN. As in gv-benchmark, convs start from N(0, 1e-3) and the last BN of
    every path from gamma = beta = 0, so the layer outputs exactly zero and the branch is unchanged
    at initialisation. Unlike gv-benchmark, the BNs *inside* a path (before a ReLU) start at
    gamma = 1: with gamma = beta = 0 there, ReLU(0) = 0 passes no gradient and a path of two or more
    convs would never learn.
    """

    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int, out_stride: int):
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError("in_channels and in_strides must be non-empty and of the same length")
        self.paths = nn.ModuleList(_resample_path(c, out_channels, out_stride / s)
                                   for c, s in zip(in_channels, in_strides))
        for path in self.paths:
            for m in path.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, mean=0.0, std=1e-3)
            last_bn = [m for m in path.modules() if isinstance(m, nn.BatchNorm2d)][-1]
            nn.init.zeros_(last_bn.weight)
            nn.init.zeros_(last_bn.bias)

    def forward(self, feats: list[Tensor]) -> Tensor:
        if len(feats) != len(self.paths):
            raise ValueError(f"expected the features of {len(self.paths)} stages, got {len(feats)}")
        return sum(path(f) for path, f in zip(self.paths, feats))
