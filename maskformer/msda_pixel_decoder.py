"""Mask2Former's pixel decoder: a deformable-attention encoder over the three coarsest Swin maps,
then an FPN step up to stride 4, as transformers' ``Mask2FormerPixelDecoder``.

1. Each of the 3 coarsest maps (strides 32, 16, 8; coarse first) is projected to ``feature_size``
   channels (1x1 conv + GroupNorm(32)), flattened and concatenated: S = sum(h_l * w_l) tokens.
   Each token's position embedding is the normalised sine embedding of its map plus a learned
   per-level embedding.
2. ``encoder_layers`` post-norm layers of multi-scale deformable attention (8 heads x 3 levels x
   4 points, around each token's own centre) and a ReLU MLP. The sampling itself is
   ``maskformer.dispatch.ms_deform_attn`` (``maskformer.kernels.ms_deform_attn``: a fused Triton
   kernel on CUDA, a C++ one on CPU when the extension is built, the PyTorch reference otherwise).
3. The tokens are split back into the 3 maps; the stride-4 Swin map gets a lateral 1x1 conv +
   GroupNorm, the bilinearly upsampled stride-8 map added, and a 3x3 conv + GroupNorm + ReLU.
   ``mask_projection`` (1x1) of that map is the per-pixel embedding the mask logits contract with.

transformers builds an all-valid padding mask (``pixel_mask`` never reaches the decoder), so the
valid ratios are all 1 and the reference points are the token centres ((j + 0.5) / w, (i + 0.5) / h);
no padding mask is carried here. Module and parameter names follow the checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .config import Mask2FormerConfig
from .transformer_decoder import sine_position_embedding

NUM_LEVELS = 3  # the deformable encoder's levels: the 3 coarsest backbone maps
NUM_POINTS = 4  # sampling points per level, head and query


class MultiscaleDeformableAttention(nn.Module):
    """Deformable self-attention over the concatenated levels (names as ``self_attn.*`` in the checkpoints)."""

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int = NUM_LEVELS, n_points: int = NUM_POINTS):
        super().__init__()
        self.d_model, self.n_heads, self.n_levels, self.n_points = embed_dim, num_heads, n_levels, n_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden: torch.Tensor, position: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[Tuple[int, int]], offset_normalizer: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden, position (B, S, C); reference_points (B, S, L, 2) as (x, y) in [0, 1];
        offset_normalizer (L, 2) = each level's (w, h). -> (output (B, S, C), attention weights (B, S, H, L, P))."""
        # dispatch loads every op module when imported: on first use, not by `import maskformer`
        from . import dispatch

        b, s, _ = hidden.shape
        h, nl, p = self.n_heads, self.n_levels, self.n_points
        query = hidden + position
        value = self.value_proj(hidden).view(b, s, h, self.d_model // h)
        offsets = self.sampling_offsets(query).view(b, s, h, nl, p, 2)
        weights = F.softmax(self.attention_weights(query).view(b, s, h, nl * p), -1).view(b, s, h, nl, p)
        locations = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer[None, None, None, :, None, :]
        if torch.compiler.is_exporting() and _engine_op_in_export:
            # one graph node, the engine's own operator (module docstring of engine_op_export)
            out = torch.ops.maskformer.ms_deform_attn_engine(value, offset_normalizer, locations, weights)
        elif torch.compiler.is_exporting():
            out = ms_deform_attn_for_engines(value, spatial_shapes, locations, weights)
        else:
            out = dispatch.ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out), weights


# Set by engine_op_export() while an engine that has our deformable-attention operator is exported.
_engine_op_in_export = False


@contextlib.contextmanager
def engine_op_export():
    """Export the deformable sampling as one node, ``maskformer::ms_deform_attn_engine(value (B, S, H,
    D), spatial_wh (L, 2) float (each level's (w, h): the offset normaliser the graph already holds),
    sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P)) -> (B, Q, H*D)``,
    instead of the portable grid_sample formulation (``ms_deform_attn_for_engines``).

    For an engine that runs our C++ kernel as its own operator (the OpenVINO extension,
    csrc/openvino/msda_extension.cpp); the ONNX export writes the node as
    ``com.maskformer::MultiScaleDeformableAttention`` (``maskformer.engines.export``). The torch
    operator is defined on first use here, not at import (``import maskformer`` stays lean); its
    eager body is the reference, so a program that keeps the node still computes the right thing."""
    global _engine_op_in_export
    _define_engine_op()
    previous, _engine_op_in_export = _engine_op_in_export, True
    try:
        yield
    finally:
        _engine_op_in_export = previous


def _define_engine_op() -> None:
    if hasattr(torch.ops.maskformer, "ms_deform_attn_engine"):
        return

    @torch.library.custom_op("maskformer::ms_deform_attn_engine", mutates_args=())
    def ms_deform_attn_engine(value: torch.Tensor, spatial_wh: torch.Tensor, sampling_locations: torch.Tensor,
                              attention_weights: torch.Tensor) -> torch.Tensor:
        shapes = [(int(h), int(w)) for w, h in spatial_wh.tolist()]
        return ms_deform_attn_for_engines(value, shapes, sampling_locations, attention_weights)

    @ms_deform_attn_engine.register_fake
    def _(value, spatial_wh, sampling_locations, attention_weights):
        b, _, h, d = value.shape
        return value.new_empty(b, sampling_locations.shape[1], h * d)


def ms_deform_attn_for_engines(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]],
                               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """``ms_deform_attn_ref`` (``maskformer.kernels.ms_deform_attn``) as the ONNX export writes it:
    the same grid_sample per level, but each level's samples weighted and summed over its points
    at once and the levels added, instead of stacking all levels' samples into one (B*H, D, Q, L*P)
    tensor first. Same shapes as the reference: value (B, S, H, D), sampling_locations
    (B, Q, H, L, P, 2) in [0, 1], attention_weights (B, Q, H, L, P) -> (B, Q, H*D), value's dtype.

    Why: OpenVINO runs the stacking as a reference-implementation Concat plus a large ReduceSum.
    One layer at Swin-T 512x683 (Q = S = 7232, 8 heads x 32, 4 points), 7 interleaved rounds, 2
    threads, AMD EPYC Zen 4 at load 6.0: OpenVINO 187 ms against 228 ms stacked, ONNX Runtime 211
    against 204 ms (noise), both 4.3e-6 from float64 (benchmarks/results/mask2former-msda-formulations-cpu.json).
    Only the summation order differs from the eager reference, which stays transformers' (the
    parity tests compare it bit for bit)."""
    b, _, nh, d = value.shape
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    grids = sampling_locations * 2 - 1  # grid_sample's [-1, 1] coordinates
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * nh, d, h, w)  # (B*H, D, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * nh, q, p, 2)  # (B*H, Q, P, 2)
        samples = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*H, D, Q, P)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(b * nh, 1, q, p)
        part = (samples * weights).sum(-1)  # (B*H, D, Q)
        out = part if out is None else out + part
    return out.view(b, nh * d, q).transpose(1, 2).contiguous()


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention + residual + LayerNorm, ReLU MLP + residual + LayerNorm."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        d = config.feature_size
        self.self_attn = MultiscaleDeformableAttention(d, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_feedforward_dim)
        self.fc2 = nn.Linear(config.encoder_feedforward_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = config.dropout

    def forward(self, hidden, position, reference_points, spatial_shapes, offset_normalizer):
        attended, weights = self.self_attn(hidden, position, reference_points, spatial_shapes, offset_normalizer)
        hidden = self.self_attn_layer_norm(hidden + F.dropout(attended, self.dropout, self.training))
        mlp = self.fc2(F.dropout(F.relu(self.fc1(hidden)), self.dropout, self.training))
        hidden = self.final_layer_norm(hidden + F.dropout(mlp, self.dropout, self.training))
        if self.training and not torch.isfinite(hidden).all():
            # transformers clamps non-finite activations in training (fp16 overflow) rather than raising
            limit = torch.finfo(hidden.dtype).max - 1000
            hidden = hidden.clamp(-limit, limit)
        return hidden, weights


class DeformableEncoder(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(config) for _ in range(config.encoder_layers)])


def token_centres(spatial_shapes: Sequence[Tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
    """(B, S, L, 2): every token's centre (x, y) in [0, 1] on its own map, the same for every level
    (valid ratios are 1: there is no padding mask)."""
    centres = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        centres.append(torch.stack((x[None, :].expand(h, w), y[:, None].expand(h, w)), -1).reshape(h * w, 2))
    points = torch.cat(centres, 0)
    return points[None, :, None, :].expand(batch, -1, len(spatial_shapes), 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """forward(features: one (B, C_i, H_i, W_i) map per Swin stage, fine to coarse) ->
    (mask_features (B, mask_feature_size, H_0, W_0), multi_scale_features: 3 maps (B, feature_size, h, w),
    coarse to fine, encoder attention weights per layer (B, S, heads, 3, 4))."""

    def __init__(self, config: Mask2FormerConfig, feature_channels: List[int]):
        super().__init__()
        d = config.feature_size
        self.num_feature_levels = NUM_LEVELS
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, d))
        self.input_projections = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in feature_channels[-NUM_LEVELS:][::-1]]
        )
        self.encoder = DeformableEncoder(config)
        self.mask_projection = nn.Conv2d(d, config.mask_feature_size, kernel_size=1)
        self.num_fpn_levels = config.num_fpn_levels
        for i, c in enumerate(feature_channels[: self.num_fpn_levels]):
            self.add_module(f"adapter_{i + 1}", nn.Sequential(nn.Conv2d(c, d, kernel_size=1, bias=False), nn.GroupNorm(32, d)))
            self.add_module(f"layer_{i + 1}", nn.Sequential(
                nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False), nn.GroupNorm(32, d), nn.ReLU()))

    def forward(self, features: List[torch.Tensor], output_attentions: bool = False):
        coarse = features[::-1][: self.num_feature_levels]
        projected = [proj(x) for proj, x in zip(self.input_projections, coarse)]
        shapes = [(int(x.shape[2]), int(x.shape[3])) for x in projected]
        b, d = projected[0].shape[:2]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in projected], 1)
        position = torch.cat([
            sine_position_embedding(b, h, w, d // 2, x.device, x.dtype).flatten(2).transpose(1, 2)
            + self.level_embed[i].view(1, 1, -1)
            for i, ((h, w), x) in enumerate(zip(shapes, coarse))
        ], 1)
        reference_points = token_centres(shapes, b, tokens.device, tokens.dtype)
        # (L, 2) = (w, h) per level, int64 as transformers (the division promotes to the float dtype)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.long, device=tokens.device)
        attentions = []
        for layer in self.encoder.layers:
            tokens, weights = layer(tokens, position, reference_points, shapes, normalizer)
            if output_attentions:
                attentions.append(weights)
        maps = [t.transpose(1, 2).reshape(b, d, h, w)
                for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], 1), shapes)]
        # FPN levels, from stride 8 down to the common stride (one, stride 4, for the checkpoints)
        for i, feature in enumerate(features[: self.num_fpn_levels][::-1]):
            level = self.num_fpn_levels - i
            lateral = getattr(self, f"adapter_{level}")(feature)
            up = F.interpolate(maps[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(getattr(self, f"layer_{level}")(lateral + up))
        return self.mask_projection(maps[-1]), tuple(maps[: self.num_feature_levels]), tuple(attentions)
