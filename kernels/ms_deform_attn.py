"""Multi-scale deformable attention (Deformable DETR; Mask2Former's pixel decoder).

Each query samples ``P`` points on each of ``L`` feature levels per head, bilinearly, and sums the
samples weighted by its (already softmaxed) attention weights::

    out[b, q, h, :] = sum_{l, p} w[b, q, h, l, p] * bilinear(value_l[b, :, :, h, :], loc[b, q, h, l, p])

``ms_deform_attn_ref`` is the pure-PyTorch reference: one ``grid_sample`` per level, as the paper's
and transformers' PyTorch fallbacks do (bilinear, zero padding, ``align_corners=False``: a location
``(x, y)`` in [0, 1] is the pixel ``(x * W - 0.5, y * H - 0.5)``; samples outside the map read 0).
It materialises a (B*H, D, Q, L*P) tensor of samples: ~80 MB per pixel-decoder layer at 512x683
(Q = S = 6,800 tokens, 8 heads x 32 dims, 12 samples), which is what the fused kernel avoids.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_ref", "check_ms_deform_attn_args"]


def check_ms_deform_attn_args(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> List[Tuple[int, int]]:
    """Validate shapes; return ``spatial_shapes`` as a list of (int, int). Raises ValueError."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (batch, tokens, heads, head_dim), got shape {tuple(value.shape)}")
    b, s, nh, _ = value.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} tokens but value has {s}")
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: every level needs height and width >= 1, got {shapes}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (batch, queries, heads, levels, points, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    sb, q, sh, sl, p, _ = sampling_locations.shape
    if (sb, sh, sl) != (b, nh, len(shapes)):
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} and {len(shapes)} levels (batch, heads and levels must agree)")
    if tuple(attention_weights.shape) != (b, q, nh, len(shapes), p):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {(b, q, nh, len(shapes), p)}, got {tuple(attention_weights.shape)}")
    return shapes


def ms_deform_attn_ref(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention, pure PyTorch.

    Args:
        value: (B, S, H, D), the L levels' maps flattened row-major and concatenated, S = sum(h*w).
        spatial_shapes: L pairs (h, w) of Python ints, in the order the levels sit in ``value``.
        sampling_locations: (B, Q, H, L, P, 2), (x, y) normalised to [0, 1] per level
            (``align_corners=False``); points outside read zeros.
        attention_weights: (B, Q, H, L, P), the weight of each sample (softmaxed over L*P by the caller).

    Returns:
        (B, Q, H*D) in ``value``'s dtype (computed in it, as the model's PyTorch path is).
    """
    shapes = check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)
    b, _, nh, d = value.shape
    _, q, _, nl, p, _ = sampling_locations.shape
    grids = sampling_locations * 2 - 1  # grid_sample's [-1, 1] coordinates
    per_level = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, H, D) -> (B*H, D, h, w)
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * nh, d, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * nh, q, p, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*H, D, Q, L*P) times weights (B*H, 1, Q, L*P), summed over the samples
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * nh, 1, q, nl * p)
    out = (stacked * weights).sum(-1)  # (B*H, D, Q)
    return out.view(b, nh * d, q).transpose(1, 2).contiguous()
