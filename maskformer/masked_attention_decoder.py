"""Mask2Former's transformer decoder: masked attention, round-robin over scales, as transformers'
``Mask2FormerTransformerModule``.

``num_queries`` learned query features (and learned query position embeddings) go through
``decoder_layers - 1`` layers. Layer ``i`` attends to the pixel decoder's map ``i % 3`` (strides
32, 16, 8 in turn) with *masked* cross-attention: each query sees only the pixels where the
previous prediction of its mask is at least 0.5 (``sigmoid(logit) >= 0.5``, at that map's size; a
query whose mask is empty everywhere sees every pixel), then self-attention among the queries,
then a ReLU MLP (post-norm by default, pre-norm with ``pre_norm``). Before the first layer and after
each one, a shared LayerNorm and the mask head predict every query's mask logits
(``einsum(MLP(query), mask_features)`` at stride 4), which are both an output and the next
layer's attention mask. Sequence-first (Q, B, C) internally and in the hidden-state outputs, as
transformers. Module and parameter names follow the checkpoints.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .config import Mask2FormerConfig
from .layers import MaskFormerMLPPredictionHead, get_activation
from .transformer_decoder import sine_position_embedding

NUM_LEVELS = 3


class QueryAttention(nn.Module):
    """Self-attention among the queries: position embeddings added to q and k (not v); q scaled
    before the product, as transformers' ``Mask2FormerAttention``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden: torch.Tensor, position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden, position (Q, B, C) -> (output (Q, B, C), weights (B, heads, Q, Q))."""
        q_len, b, c = hidden.shape
        h, d = self.num_heads, self.head_dim
        with_pos = hidden + position

        # The projections run on the (Q, B, C) rows as they lie (contiguous): a linear on a permuted
        # view asks whether the batch is 1, and torch.export then cannot keep the batch dynamic.
        def heads(x):  # (Q, B, C) -> (B*H, Q, D), a view
            return x.view(q_len, b, h, d).permute(1, 2, 0, 3).reshape(b * h, q_len, d)

        q = heads(self.q_proj(with_pos) * self.scaling)
        k = heads(self.k_proj(with_pos))
        v = heads(self.v_proj(hidden))
        # The (B, heads, Q, Q) view is returned *and* feeds the product, so the returned weights lie on
        # the loss path: outputs.attentions[i].retain_grad() then backward() gives them a .grad.
        weights = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1).view(b, h, q_len, q_len)
        out = torch.bmm(F.dropout(weights.view(b * h, q_len, q_len), self.dropout, self.training), v)
        out = out.view(b, h, q_len, d).permute(2, 0, 1, 3).reshape(q_len, b, c)
        return self.out_proj(out), weights


class MaskedAttentionDecoderLayer(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        d = config.hidden_dim
        self.pre_norm = config.pre_norm
        self.dropout = config.dropout
        self.self_attn = QueryAttention(d, config.num_attention_heads, config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, config.num_attention_heads, config.dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.dim_feedforward)
        self.fc2 = nn.Linear(config.dim_feedforward, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation_fn = get_activation(config.activation_function)

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training)

    def _cross(self, hidden, query_position, features, position, mask):
        return self._drop(masked_cross_attention(self.cross_attn, hidden + query_position, features + position, features,
                                                 mask, self.training))

    def _mlp(self, hidden):
        return self._drop(self.fc2(self._drop(self.activation_fn(self.fc1(hidden)))))

    def forward(self, hidden, query_position, features, position, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden, query_position (Q, B, C); features, position (B, h*w, C); mask (B, Q, h*w) bool,
        True = masked out -> (hidden (Q, B, C), self-attention weights (B, heads, Q, Q))."""
        if not self.pre_norm:
            hidden = self.cross_attn_layer_norm(hidden + self._cross(hidden, query_position, features, position, mask))
            attended, weights = self.self_attn(hidden, query_position)
            hidden = self.self_attn_layer_norm(hidden + self._drop(attended))
            return self.final_layer_norm(hidden + self._mlp(hidden)), weights
        hidden = hidden + self._cross(self.cross_attn_layer_norm(hidden), query_position, features, position, mask)
        attended, weights = self.self_attn(self.self_attn_layer_norm(hidden), query_position)
        hidden = hidden + self._drop(attended)
        return hidden + self._mlp(self.final_layer_norm(hidden)), weights


def masked_cross_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor, training: bool = False) -> torch.Tensor:
    """``attn(query, key, value, attn_mask=mask)[0]`` of an ``nn.MultiheadAttention`` (its weights,
    its arithmetic: q scaled by head_dim**-0.5, -inf where masked, softmax, dropout in training),
    written for the export.

    query (Q, B, C) sequence-first as the decoder's states; key, value (B, N, C) batch-first;
    mask (B, Q, N) bool, True = masked out, shared by the heads -> (Q, B, C) in query's dtype.

    Why not the module: ``F.multi_head_attention_forward`` reshapes the sequence-first key and a
    (B*heads, Q, N) mask in ways that ask whether the batch is 1, so ``torch.export`` cannot keep
    the batch dynamic, and the engines then ran a (B*heads, Q, N) float mask copied per head. Here
    the keys and values are projected batch-first (contiguous rows) and the (B, 1, Q, N) additive
    mask broadcasts over the heads. Same sums as the module (the parity tests compare with
    transformers, which calls it).
    """
    q_len, b, c = query.shape
    n = key.shape[1]
    h = attn.num_heads
    d = c // h
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q) * math.sqrt(1.0 / d)                   # (Q, B, C), scaled as the module
    k = F.linear(key, w_k, b_k)                                          # (B, N, C)
    v = F.linear(value, w_v, b_v)
    q = q.view(q_len, b, h, d).permute(1, 2, 0, 3)                       # (B, H, Q, D)
    k = k.view(b, n, h, d).transpose(1, 2)                               # (B, H, N, D)
    v = v.view(b, n, h, d).transpose(1, 2)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias[:, None]        # (B, H, Q, N)
    weights = F.dropout(F.softmax(scores, dim=-1), attn.dropout, training)
    out = torch.matmul(weights, v).permute(2, 0, 1, 3).reshape(q_len, b, c)  # (Q, B, C), contiguous
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class MaskPredictor(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, mask_feature_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.mask_embedder = MaskFormerMLPPredictionHead(hidden_dim, hidden_dim, mask_feature_size)

    def forward(self, normed: torch.Tensor, mask_features: torch.Tensor, size: Tuple[int, int]):
        """normed (Q, B, C), mask_features (B, M, H, W) -> (mask logits (B, Q, H, W),
        attention mask (B, Q, h*w) bool at ``size`` = (h, w), True where the mask is below 0.5)."""
        # The MLP on the (Q*B, C) rows as they lie and a bmm on the (B, Q, M) view: a linear on a 3-D
        # view, or einsum's reshapes, ask whether the batch is 1 (torch.export then cannot keep it
        # dynamic). The same sums as transformers' einsum("bqc, bchw -> bqhw").
        b, m, height, width = mask_features.shape
        embedded = self.mask_embedder(normed.flatten(0, 1)).view(normed.shape[0], b, m).transpose(0, 1)  # (B, Q, M)
        logits = torch.bmm(embedded, mask_features.flatten(2)).view(b, -1, height, width)
        small = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        masked = small.sigmoid().flatten(2) < 0.5  # (B, Q, h*w), shared by the heads
        return logits, masked.detach()


class MaskedAttentionDecoder(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.layers = nn.ModuleList([MaskedAttentionDecoderLayer(config) for _ in range(config.decoder_layers - 1)])
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = MaskPredictor(config.hidden_dim, config.num_attention_heads, config.mask_feature_size)


class MaskedAttentionTransformerModule(nn.Module):
    """forward(multi_scale_features: 3 maps (B, feature_size, h, w) coarse to fine, mask_features
    (B, M, H, W)) -> dict with ``last_hidden_state`` (B, Q, C), ``hidden_states`` (inputs of each layer
    and the last output, (Q, B, C) each; when asked), ``intermediate_hidden_states`` (the normalised
    states the heads read, (Q, B, C), ``decoder_layers`` of them), ``masks_queries_logits`` (one
    (B, Q, H, W) per intermediate state), ``attentions`` (self-attention weights per layer, when asked)."""

    def __init__(self, in_features: int, config: Mask2FormerConfig):
        super().__init__()
        d = config.hidden_dim
        self.hidden_dim = d
        self.queries_embedder = nn.Embedding(config.num_queries, d)
        self.queries_features = nn.Embedding(config.num_queries, d)
        self.input_projections = nn.ModuleList([
            nn.Conv2d(in_features, d, kernel_size=1) if in_features != d or config.enforce_input_projection
            else nn.Sequential()
            for _ in range(NUM_LEVELS)
        ])
        self.decoder = MaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)

    def forward(self, multi_scale_features: Sequence[torch.Tensor], mask_features: torch.Tensor,
                output_hidden_states: bool = False, output_attentions: bool = False) -> dict:
        features, positions, sizes = [], [], []
        for i, x in enumerate(multi_scale_features[:NUM_LEVELS]):
            b, _, h, w = x.shape
            sizes.append((int(h), int(w)))
            # batch-first (B, h*w, C): what masked_cross_attention projects row by row
            positions.append(sine_position_embedding(b, h, w, self.hidden_dim // 2, x.device, x.dtype)
                              .flatten(2).transpose(1, 2))
            features.append((self.input_projections[i](x).flatten(2) + self.level_embed.weight[i][None, :, None])
                            .transpose(1, 2))
        batch = features[0].shape[0]
        query_position = self.queries_embedder.weight.unsqueeze(1).repeat(1, batch, 1)
        hidden = self.queries_features.weight.unsqueeze(1).repeat(1, batch, 1)

        decoder = self.decoder
        normed = decoder.layernorm(hidden)
        logits, mask = decoder.mask_predictor(normed, mask_features, sizes[0])
        intermediate, masks_logits = [normed], [logits]
        all_hidden: Optional[List[torch.Tensor]] = [] if output_hidden_states else None
        attentions: Optional[List[torch.Tensor]] = [] if output_attentions else None
        for i, layer in enumerate(decoder.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            level = i % NUM_LEVELS
            # A query whose mask is empty at this scale would attend to nothing: let it see everything.
            mask = mask & ~mask.all(-1, keepdim=True)
            hidden, weights = layer(hidden, query_position, features[level], positions[level], mask)
            normed = decoder.layernorm(hidden)
            logits, mask = decoder.mask_predictor(normed, mask_features, sizes[(i + 1) % NUM_LEVELS])
            intermediate.append(normed)
            masks_logits.append(logits)
            if attentions is not None:
                attentions.append(weights)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return dict(
            last_hidden_state=hidden.transpose(0, 1),
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            intermediate_hidden_states=tuple(intermediate),
            masks_queries_logits=tuple(masks_logits),
            attentions=tuple(attentions) if attentions is not None else None,
        )
