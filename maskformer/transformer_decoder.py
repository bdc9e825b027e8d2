"""DETR transformer decoder, as transformers' ``MaskFormerTransformerModule``.

Post-norm layers: self-attention over the queries (learned query embeddings added to q and k),
cross-attention to the flattened image features (sine position embedding added to the keys,
query embeddings to the queries), then an MLP; a final LayerNorm. The decoder input is zeros:
the queries carry their identity only through the position embeddings, as in DETR.

Attention is written out (q @ k^T * scale, softmax, @ v), as transformers' eager path, so the
weights can be returned; the image features are the keys for every query, with no padding
mask (transformers passes none: ``pixel_mask`` does not reach the decoder).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .config import MaskFormerDecoderConfig
from .layers import cached_per_shape, get_activation


def sine_position_embedding(batch: int, height: int, width: int, num_features: int, device, dtype,
                            temperature: float = 10000.0, scale: float = 2 * math.pi) -> torch.Tensor:
    """(B, 2 * num_features, H, W) normalised sine embedding (DETR's, with no padding mask).

    Computed in ``dtype``, as transformers does: in bf16 the positions themselves round, and
    matching that is part of matching its outputs.
    """
    y = torch.arange(1, height + 1, dtype=dtype, device=device)[None, :, None].expand(batch, height, width)
    x = torch.arange(1, width + 1, dtype=dtype, device=device)[None, None, :].expand(batch, height, width)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_features, dtype=torch.int64, device=device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class DetrAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections named as in the checkpoints."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, query_input, key_input, value_input,
                need_weights: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """query_input (B, Q, D), key_input/value_input (B, S, D) -> output (B, Q, D), weights
        (B, heads, Q, S), or None when not ``need_weights`` and the fused path ran.

        On the Triton path (``maskformer.dispatch.candidate`` is "triton": CUDA under ``auto``), in
        inference and without ``need_weights``, the attention is one
        ``F.scaled_dot_product_attention`` (flash / memory-efficient kernel) instead of five
        written-out ops and their copies: 60 of the decoder's launches become 12 (six layers,
        self and cross; ``benchmarks/gpu_model.py``). Elsewhere the written-out ops, as
        transformers' eager path."""
        b, q_len, d = query_input.shape
        s_len = key_input.shape[1]
        q = self.q_proj(query_input).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key_input).view(b, s_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value_input).view(b, s_len, self.num_heads, self.head_dim).transpose(1, 2)
        if not need_weights and not self.training:
            # dispatch loads every op module when imported: on first use, not by `import maskformer`
            from . import dispatch

            if dispatch.candidate(q.device) == "triton":
                out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
                return self.out_proj(out.transpose(1, 2).reshape(b, q_len, d)), None
        weights = F.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, dim=-1)
        out = torch.matmul(F.dropout(weights, p=self.dropout, training=self.training), v)
        out = out.transpose(1, 2).reshape(b, q_len, d)
        return self.out_proj(out), weights


class DetrDecoderLayer(nn.Module):
    def __init__(self, config: MaskFormerDecoderConfig):
        super().__init__()
        d = config.d_model
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.self_attn = DetrAttention(d, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = DetrAttention(d, config.decoder_attention_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.activation_fn = get_activation(config.activation_function)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, hidden, image_features, image_keys, query_pos, need_weights: bool = True):
        """hidden (B, Q, D), image_features (B, S, D), image_keys = image_features + position embedding
        (B, S, D), query_pos (B, Q, D) -> (B, Q, D), self-attn weights (None when not
        ``need_weights`` and the fused attention ran)."""
        qk = hidden + query_pos
        attn, self_weights = self.self_attn(qk, qk, hidden, need_weights=need_weights)
        hidden = self.self_attn_layer_norm(hidden + F.dropout(attn, p=self.dropout, training=self.training))
        attn, _ = self.encoder_attn(hidden + query_pos, image_keys, image_features, need_weights=False)
        hidden = self.encoder_attn_layer_norm(hidden + F.dropout(attn, p=self.dropout, training=self.training))
        mlp = F.dropout(self.activation_fn(self.fc1(hidden)), p=self.activation_dropout, training=self.training)
        mlp = F.dropout(self.fc2(mlp), p=self.dropout, training=self.training)
        return self.final_layer_norm(hidden + mlp), self_weights


class DetrDecoder(nn.Module):
    def __init__(self, config: MaskFormerDecoderConfig):
        super().__init__()
        self.auxiliary_loss = bool(config.auxiliary_loss)
        self.layers = nn.ModuleList([DetrDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm = nn.LayerNorm(config.d_model)


class TransformerModule(nn.Module):
    """forward: image features (B, C, h, w) -> dict with last_hidden_state (B, Q, D), hidden_states, attentions."""

    def __init__(self, in_channels: int, config: MaskFormerDecoderConfig):
        super().__init__()
        d = config.d_model
        self.hidden_size = d
        # nn.Embedding's own init draws N(0, 1); drawn here the same way, but not on the meta device
        # (from_pretrained builds there), where torch's first normal_ imports torch._dynamo: 1.8 s,
        # half of `maskformer segment`'s start-up.
        weight = torch.empty(config.num_queries, d)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.queries_embedder = nn.Embedding(config.num_queries, d, _weight=weight)
        self.input_projection = nn.Conv2d(in_channels, d, kernel_size=1) if in_channels != d else None
        self.decoder = DetrDecoder(config)
        # (h, w, channels, device, dtype) -> (1, h*w, channels) sine embedding: it depends on the
        # shape only, so it is built once per shape on the model's device (no host work per forward).
        self._pos_cache: Dict[tuple, torch.Tensor] = {}
        self.gradient_checkpointing = None  # see SwinBackbone.gradient_checkpointing

    def image_position_embedding(self, height: int, width: int, channels: int, device, dtype) -> torch.Tensor:
        """(1, height*width, channels) sine embedding of the flattened feature map, cached per shape."""
        def build():
            pos = sine_position_embedding(1, height, width, channels // 2, device, dtype)
            return pos.view(1, channels, height * width).transpose(1, 2)

        return cached_per_shape(self._pos_cache, (height, width, channels, device, dtype), build)

    def forward(self, image_features: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> Dict[str, object]:
        if self.input_projection is not None:
            image_features = self.input_projection(image_features)
        b, d, h, w = image_features.shape
        query_pos = self.queries_embedder.weight.unsqueeze(0).expand(b, -1, -1)
        # In training the zero input is a leaf that requires grad, as transformers makes it, so
        # outputs.transformer_decoder_hidden_states[0].retain_grad() works and receives a gradient.
        hidden = torch.zeros_like(query_pos, requires_grad=self.training)
        image_pos = self.image_position_embedding(h, w, d, image_features.device, image_features.dtype).expand(b, -1, -1)
        image_features = image_features.view(b, d, h * w).transpose(1, 2)
        # The cross-attention keys are features + position for every layer: one add, not one per layer.
        image_keys = image_features + image_pos

        decoder = self.decoder
        hidden_states: List[torch.Tensor] = [hidden]
        attentions: List[torch.Tensor] = []
        checkpoint = self.gradient_checkpointing if self.training and torch.is_grad_enabled() else None
        for layer in decoder.layers:
            args = (hidden, image_features, image_keys, query_pos, output_attentions)
            hidden, weights = layer(*args) if checkpoint is None else checkpoint(layer, *args)
            hidden_states.append(hidden)
            attentions.append(weights)
            if decoder.auxiliary_loss:
                # transformers normalises the running state itself when auxiliary_loss is set,
                # so the next layer sees the normalised output (and the last is normalised twice).
                hidden = decoder.layernorm(hidden)
        last = decoder.layernorm(hidden)
        # As transformers: hidden_states = (decoder input, layer outputs...), the last one
        # replaced by the final normalised state.
        hidden_states[-1] = last
        return {
            "last_hidden_state": last,
            "hidden_states": tuple(hidden_states) if output_hidden_states else None,
            "attentions": tuple(attentions) if output_attentions else None,
        }
