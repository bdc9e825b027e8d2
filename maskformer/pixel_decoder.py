"""FPN pixel decoder, as transformers' ``MaskFormerPixelDecoder``.

Top-down FPN over the backbone's feature maps: a 3x3 conv-GN-ReLU stem on the coarsest map,
then, for each finer map, a 1x1 conv-GN lateral projection added to the nearest-upsampled
coarser output and a 3x3 conv-GN-ReLU; a final 3x3 conv (with bias) gives the per-pixel
mask embeddings at 1/4 of the input resolution.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F


class ConvNormReLU(nn.Sequential):
    """Conv(3x3, no bias) -> GroupNorm(32) -> ReLU; children named 0, 1, 2 as in the checkpoints."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(32, out_channels),
            nn.ReLU(inplace=True),
        )


class FPNLayer(nn.Module):
    def __init__(self, feature_size: int, lateral_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(lateral_channels, feature_size, kernel_size=1, bias=False),
            nn.GroupNorm(32, feature_size),
        )
        self.block = ConvNormReLU(feature_size, feature_size)

    def forward(self, down: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """down (B, F, h, w) coarser, left (B, C_l, H, W) finer -> (B, F, H, W)."""
        left = self.proj(left)
        down = F.interpolate(down, size=left.shape[-2:], mode="nearest")
        return self.block(down + left)


class FPN(nn.Module):
    def __init__(self, in_channels: int, lateral_channels: List[int], feature_size: int):
        super().__init__()
        self.stem = ConvNormReLU(in_channels, feature_size)
        self.layers = nn.Sequential(*[FPNLayer(feature_size, c) for c in lateral_channels[::-1]])

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """features fine-to-coarse -> FPN outputs coarse-to-fine (one per lateral map)."""
        out = self.stem(features[-1])
        outputs = []
        for layer, left in zip(self.layers, features[:-1][::-1]):
            out = layer(out, left)
            outputs.append(out)
        return outputs


class PixelDecoder(nn.Module):
    """forward: list of (B, C_i, H_i, W_i) fine-to-coarse -> (mask features (B, M, H_0, W_0), FPN outputs)."""

    def __init__(self, in_channels: int, lateral_channels: List[int], feature_size: int, mask_feature_size: int):
        super().__init__()
        self.fpn = FPN(in_channels, lateral_channels, feature_size)
        self.mask_projection = nn.Conv2d(feature_size, mask_feature_size, kernel_size=3, padding=1)

    def forward(self, features: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        fpn_outputs = self.fpn(features)
        return self.mask_projection(fpn_outputs[-1]), fpn_outputs
