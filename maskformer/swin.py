"""Swin Transformer backbone, as transformers' ``MaskFormerSwinBackbone``.

Numerics that matter for parity with transformers (and that differ from timm's Swin):
- the feature map is zero-padded to a multiple of the window *after* ``layernorm_before``, and
  the padded tokens take part, unmasked, in the attention of non-shifted windows;
- the shift mask is built on the padded map (3 regions a side, -100 between regions);
- the window size is never clamped to a small feature map: a 2x2 map is padded to one 7x7 window;
- scores are ``(q @ k^T) / sqrt(head_dim)``, scaled after the product;
- ``embeddings.norm``, the patch-merging norm and the per-stage output norms use LayerNorm's
  default eps (1e-5) whatever ``layer_norm_eps`` says; the blocks' norms use ``layer_norm_eps``.

Module and parameter names follow the hub checkpoints (``attention.self.query``, ...), so a
state dict saved by transformers loads strictly.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .config import MaskFormerSwinConfig, _as_pair
from .layers import DropPath, cached_per_shape, fused_linear, get_activation, onednn_epilogue, tensor_version
from .precision import use_fast_cpu_bf16
from .windows import (  # noqa: F401  (importable from here as before)
    _contiguous_copy,
    relative_position_index,
    shift_attention_mask,
    shift_region_ids,
    window_partition,
    window_reverse,
    window_token_indices,
)

# (window, head) rows of attention per chunk on the bf16 CPU fast path: 192 rows hold 1.8 MB of fp32
# scores, where the whole map's (stage 1 at 512x683) hold 13.7 MB. The arithmetic is the same
# (benchmarks/results/bf16-cpu-swin-tiny.md, ablation in processes that keep freed memory: 1.01x);
# what chunks save is memory and page faults: glibc hands whole-map temporaries back to the system
# and the next forward faults them in again (1 thread, one process alternating: 15.0 against 25.2
# thousand faults per forward, 444 against 469 ms of CPU; stage-1 attention alone 7.2 against 19 ms).
_FAST_ATTENTION_ROWS = 192


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, config: MaskFormerSwinConfig):
        super().__init__()
        self.patch_size = _as_pair(config.patch_size, "patch_size")
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, h*w, C) and (h, w); H, W are zero-padded up to the patch size."""
        _, _, height, width = pixel_values.shape
        ph, pw = self.patch_size
        # Padded sizes written as (multiples) * patch, with no branch on the size: a traced graph
        # (torch.export, ONNX, torch.compile with dynamic shapes) then holds for every size, and
        # the symbolic shapes simplify (padded // patch == the multiple). Zero padding, as
        # transformers; a zero pad is a no-op on the values.
        pad_w = (width + pw - 1) // pw * pw - width
        pad_h = (height + ph - 1) // ph * ph - height
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        x = self.projection(pixel_values)
        dims = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), dims


class SwinEmbeddings(nn.Module):
    def __init__(self, config: MaskFormerSwinConfig):
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim)  # default eps, as transformers
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values):
        x, dims = self.patch_embeddings(pixel_values)
        return self.dropout(self.norm(x)), dims


class SwinSelfAttention(nn.Module):
    """Multi-head attention inside (shifted) windows with a learned relative position bias."""

    generic_order = False  # True in Mask2Former's backbone: see _generic_order_forward

    def __init__(self, config: MaskFormerSwinConfig, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = int(config.window_size)
        w = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        # Persistent, as in the hub files; derivable, so a checkpoint may omit it (see loading.py).
        self.register_buffer("relative_position_index", relative_position_index(w), persistent=True)
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def fused_qkv(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(3C, C) weight and (3C,) bias of q, k and v stacked, for the one-GEMM fast path.

        ``dtype``: cast to it (autocast's half type for fp32 weights); default the weights' own.
        Cached while the three parameters are unchanged (same storage, same in-place version)
        and the dtype is the same, so inference pays the concatenation (and cast) once; training
        or loading new weights rebuilds it. One entry: a second dtype replaces the first.
        """
        params = [self.query.weight, self.key.weight, self.value.weight]
        biases = [self.query.bias, self.key.bias, self.value.bias]
        dtype = dtype or params[0].dtype
        key = (dtype,) + tuple(
            (t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in params + [b for b in biases if b is not None]
        )
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key:
            weight = torch.cat([p.detach() for p in params]).to(dtype)
            bias = torch.cat([b.detach() for b in biases]).to(dtype) if biases[0] is not None else None
            cached = (key, weight, bias)
            self._qkv_cache = cached
        return cached[1], cached[2]

    def dense_relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) contiguous bias in the table's dtype, for the Triton kernel (which reads it
        coalesced instead of gathering from the table per score). Cached while the table is
        unchanged (same storage, same in-place version), like ``fused_qkv``."""
        table = self.relative_position_bias_table
        key = (table.data_ptr(), tensor_version(table), table.dtype, table.device)
        cached = getattr(self, "_dense_bias_cache", None)
        if cached is None or cached[0] != key:
            # op modules load on first use, as dispatch does: `import maskformer` loads no op
            from .kernels.window_attention import dense_relative_position_bias

            cached = (key, dense_relative_position_bias(table.detach(), self.window_size))
            self._dense_bias_cache = cached
        return cached[1]

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """windows (B*nW, N, C), mask (nW, N, N) additive or None -> (B*nW, N, C) before the output projection."""
        bw, n, c = windows.shape
        shape = (bw, n, self.num_heads, self.head_dim)
        q = self.query(windows).view(shape).transpose(1, 2)
        k = self.key(windows).view(shape).transpose(1, 2)
        v = self.value(windows).view(shape).transpose(1, 2)
        if self.generic_order:
            return self._generic_order_forward(q, k, v, mask)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            scores = scores.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(bw, self.num_heads, n, n)
        probs = self.dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(probs, v)
        return out.transpose(1, 2).reshape(bw, n, c)

    def _generic_order_forward(self, q, k, v, mask):
        """transformers' generic Swin (Mask2Former's backbone) orders the same arithmetic differently:
        q.k^T times head_dim**-0.5, plus (bias + shift mask) summed first, softmax in fp32. Matching
        the order keeps the deformable pixel decoder, which amplifies backbone differences ~3x per
        layer on perturbed weights, within the parity bar."""
        bw, heads, n, d = q.shape
        bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        if mask is None:
            scores = scores + bias
        else:
            # (bias + mask) per window, broadcast over the images by a view of the scores: the same
            # sums as transformers' per-image copy of the mask, without reshaping an expanded tensor
            # (which asks whether the batch is 1, so torch.export could not keep it dynamic).
            nw = mask.shape[0]
            scores = (scores.view(bw // nw, nw, heads, n, n) + (bias + mask.unsqueeze(1)).unsqueeze(0)).view(bw, heads, n, n)
        probs = self.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        out = torch.matmul(probs, v)
        return out.transpose(1, 2).reshape(bw, n, heads * d)


class SwinSelfOutput(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x):
        return self.dropout(self.dense(x))


class SwinAttention(nn.Module):
    def __init__(self, config, dim, num_heads):
        super().__init__()
        self.self = SwinSelfAttention(config, dim, num_heads)
        self.output = SwinSelfOutput(config, dim)


class SwinIntermediate(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class SwinOutput(nn.Module):
    def __init__(self, config, dim):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        return self.dropout(self.dense(x))


class SwinLayer(nn.Module):
    """One Swin block: windowed attention (shifted when ``shift_size > 0``) then an MLP, both pre-norm."""

    def __init__(self, config: MaskFormerSwinConfig, dim: int, num_heads: int, drop_path: float, shift_size: int):
        super().__init__()
        self.window_size = int(config.window_size)
        self.shift_size = shift_size
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SwinAttention(config, dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = SwinIntermediate(config, dim)
        self.output = SwinOutput(config, dim)
        # (padded H, padded W, device, dtype) -> (nW, N, N) shift mask, and the fast path's window
        # tables (_fast_window_tables); built once per shape.
        self._mask_cache: Dict[tuple, torch.Tensor] = {}

    def shift_mask(self, height: int, width: int, device, dtype) -> Optional[torch.Tensor]:
        if self.shift_size == 0:
            return None
        return cached_per_shape(self._mask_cache, (height, width, device, dtype), lambda: shift_attention_mask(
            height, width, self.window_size, self.shift_size, device, dtype))

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention. x (B, H, W, C) normalised -> (B, H, W, C) after the output projection.

        The backend (``maskformer.dispatch``) picks the fused Triton kernel
        (``maskformer.kernels.window_attention``: shift, padding, bias and mask folded into its
        addressing, no partition copies) or this module's reference code below. The kernel has
        no backward, so ``auto`` uses the reference whenever gradients are needed.
        """
        out = self._window_attention_kernel(x)
        return self.window_attention_reference(x) if out is None else self.attention.output(out)

    def _window_attention_kernel(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The fused kernel's (B, H, W, C) output before the output projection, or None where the
        reference code is to run (``window_attention``)."""
        # dispatch loads every op module when imported: on first use, not by `import maskformer`
        from . import dispatch

        fast = dispatch.candidate(x.device)
        if fast is None or self._needs_grad(x):
            return None
        attn = self.attention.self
        # Autocast does not reach inside a custom op, and on CUDA it hands us x in fp32 (layer_norm
        # runs in fp32 under autocast): cast x and the q/k/v weights to autocast's half type here,
        # as autocast would for the Linear, so the kernel runs in half precision (its scores,
        # softmax and accumulator stay fp32 inside). The output projection below is an ordinary
        # Linear, which autocast handles.
        if fast == "triton" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # Only the Triton kernel reads the fused (3C, C) weight: building (and caching) it for a
        # CPU call would hold a second copy of every q/k/v weight for nothing. There is no C++
        # window attention, so `select` refuses "cpp" (auto) or raises (forced) without the weights.
        weight, bias = attn.fused_qkv(x.dtype) if fast == "triton" else (None, None)
        table = attn.dense_relative_position_bias() if fast == "triton" else attn.relative_position_bias_table
        args = (x, weight, bias, table, self.window_size, self.shift_size, attn.num_heads)
        if dispatch.select("window_attention", x.device, *args) == "reference":
            return None
        # op modules load on first use, as dispatch does: `import maskformer` loads no op
        from .kernels.window_attention import window_attention

        return window_attention(*args)

    def _fused_tail(self, attn: torch.Tensor, shortcut: torch.Tensor) -> Optional[torch.Tensor]:
        """The block after the window attention kernel, on the Triton path: attn (B, H*W, C) before
        the output projection, shortcut (B, H*W, C) -> the block's output, or None where the
        modules are to run it. Three ``fused_linear`` launches instead of five kernels and a
        (B, H*W, 4C) round trip: ``shortcut + dense(attn)`` with the add in the GEMM's epilogue,
        ``gelu(fc1(layernorm_after(h)))`` with the GELU in it, ``h + fc2(...)`` likewise. Only in
        inference (no dropout, no drop path), for the exact GELU, and without autocast (the
        modules' weights would need casting; the kernel takes one dtype)."""
        # dispatch loads every op module when imported: on first use, not by `import maskformer`
        from . import dispatch

        act = self.intermediate.intermediate_act_fn
        dense, fc1, fc2 = self.attention.output.dense, self.intermediate.dense, self.output.dense
        if (self.training or not (type(act) is nn.GELU and act.approximate == "none")
                or torch.is_autocast_enabled(attn.device.type) or attn.dtype != dense.weight.dtype):
            return None
        if dispatch.select("fused_linear", attn.device, attn, dense.weight, dense.bias, "none", shortcut) != "triton":
            return None
        # op modules load on first use, as dispatch does: `import maskformer` loads no op
        from .kernels.fused_linear import fused_linear

        hidden = fused_linear(attn, dense.weight, dense.bias, "none", shortcut)
        mid = fused_linear(self.layernorm_after(hidden), fc1.weight, fc1.bias, "gelu")
        return fused_linear(mid, fc2.weight, fc2.bias, "none", hidden)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        # Checked before dispatch so that `auto` quietly uses the reference in training; a forced
        # triton backend still raises (the kernel's reasons include "requires grad").
        from . import dispatch

        return torch.is_grad_enabled() and dispatch.get_backend() == "auto" and (
            x.requires_grad or any(p.requires_grad for p in self.attention.self.parameters())
        )

    def window_attention_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Reference shifted-window attention, transformers' operations in transformers' order."""
        b, height, width, c = x.shape
        w = self.window_size
        # (windows per axis) * window: exact multiples for the symbolic shapes of a traced graph.
        hp, wp = (height + w - 1) // w * w, (width + w - 1) // w * w
        x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros after the layernorm, as transformers
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, w).reshape(-1, w * w, c)
        mask = self.shift_mask(hp, wp, x.device, x.dtype)
        out = self.attention.output(self.attention.self(windows, mask))
        out = window_reverse(out.view(-1, w, w, c), w, hp, wp)
        if self.shift_size:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        # A copy whether or not there was padding (reshape would copy only when there was): no
        # branch on the size for a traced graph; unpadded widths are the rare case (1 in 7 per
        # stage for window 7), so eager pays about nothing for it.
        return _contiguous_copy(out[:, :height, :width, :])

    def forward(self, hidden_states: torch.Tensor, dims: Tuple[int, int]) -> torch.Tensor:
        """hidden_states (B, H*W, C) -> (B, H*W, C)."""
        if use_fast_cpu_bf16(hidden_states, self):
            return self.forward_fast_cpu_bf16(hidden_states, dims)
        height, width = dims
        b, _, c = hidden_states.shape
        shortcut = hidden_states
        x = self.layernorm_before(hidden_states).view(b, height, width, c)
        attn = self._window_attention_kernel(x)  # None: the reference code runs the block
        if attn is not None:
            out = self._fused_tail(attn.reshape(b, height * width, c), shortcut)
            if out is not None:
                return out
            x = self.attention.output(attn)
        else:
            x = self.window_attention_reference(x)
        hidden_states = shortcut + self.drop_path(x.reshape(b, height * width, c))
        return hidden_states + self.drop_path(self.output(self.intermediate(self.layernorm_after(hidden_states))))

    def forward_fast_cpu_bf16(self, hidden_states: torch.Tensor, dims: Tuple[int, int]) -> torch.Tensor:
        """The block on the bf16 CPU fast path (``maskformer.precision``): hidden_states (B, H*W, C)
        bf16 -> (B, H*W, C) bf16, inference only.

        The same block as ``forward``, arranged for oneDNN on a CPU with native bf16 (the tests hold
        it to at least the reference bf16 path's accuracy against float64):
        - tokens go to their (padded, rolled) windows and back by one ``index_select`` each way
          (``window_token_indices``) instead of pad, roll, partition and reverse, roll, crop copies;
        - q, k and v come from one GEMM on the concatenated (3C, C) weight, and every GEMM runs
          through oneDNN's linear with the bias and the GELU in its epilogue (``layers.fused_linear``);
        - scores are ``baddbmm(bias + mask, q, k^T, alpha=head_dim**-0.5)``: the scaled product plus
          the relative position bias and the shift mask, accumulated in fp32 and rounded once; the
          softmax runs in fp32 (PyTorch's bf16 softmax over rows of 49 took 0.81 ms per 192-row
          chunk, the fp32 one with both casts 0.46 ms, 1 thread), in chunks of windows
          (``_FAST_ATTENTION_ROWS``);
        - the output projection runs on the un-windowed tokens (the padding already dropped).
        """
        height, width = dims
        b, length, c = hidden_states.shape
        attn = self.attention.self
        heads, head_dim = attn.num_heads, attn.head_dim
        n = self.window_size**2
        gather, padding, scatter, bias = self._fast_window_tables(height, width, hidden_states.device)
        windows = self.layernorm_before(hidden_states).index_select(1, gather)  # (B, nW*N, C)
        if padding is not None:
            windows.index_fill_(1, padding, 0.0)  # zeros after the layernorm, as the reference's F.pad
        weight, qkv_bias = attn.fused_qkv()
        qkv = fused_linear(windows, weight, qkv_bias).view(b, -1, n, 3, heads, head_dim)  # (B, nW, N, 3, heads, d)
        n_windows = qkv.shape[1]
        out = windows.new_empty(b, n_windows, n, heads, head_dim)  # window-major tokens
        step = max(1, _FAST_ATTENTION_ROWS // heads)  # windows per chunk
        for i in range(b):
            for start in range(0, n_windows, step):
                stop = min(start + step, n_windows)
                # (3, windows*heads, N, d): q, k and v of the chunk, one copy for the three
                q, k, v = qkv[i, start:stop].permute(2, 0, 3, 1, 4).reshape(3, -1, n, head_dim).unbind(0)
                scores = torch.baddbmm(bias[start * heads : stop * heads], q, k.transpose(1, 2), alpha=head_dim**-0.5)
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                out[i, start:stop] = torch.bmm(probs, v).view(-1, heads, n, head_dim).transpose(1, 2)
        out = out.view(b, -1, c).index_select(1, scatter)  # (B, H*W, C): rolled back, padding dropped
        dense = self.attention.output.dense
        hidden_states = fused_linear(out, dense.weight, dense.bias, residual=hidden_states)
        act = self.intermediate.intermediate_act_fn
        epilogue = onednn_epilogue(act)
        fc1, fc2 = self.intermediate.dense, self.output.dense
        mlp = fused_linear(self.layernorm_after(hidden_states), fc1.weight, fc1.bias, epilogue)
        if epilogue is None:
            mlp = act(mlp)
        return fused_linear(mlp, fc2.weight, fc2.bias, residual=hidden_states)

    def _fast_window_tables(self, height: int, width: int, device):
        """(gather, padding, scatter, bias) of the fast path for an (H, W) map, cached per shape: the
        window index maps (``window_token_indices``; padding positions gather token 0, ``padding``
        lists them, or None), and the (nW*heads, N, N) relative position bias plus shift mask in the
        table's dtype. Memory: at Swin-T 512x683 the 12 blocks' tables hold 35 MB in bf16 (and the
        fused q/k/v weights of ``fused_qkv`` 12 MB), kept like the shift masks."""
        table = self.attention.self.relative_position_bias_table
        key = ("fast", height, width, device, table.dtype, table.data_ptr(), tensor_version(table))

        def build():
            w, heads = self.window_size, self.attention.self.num_heads
            gather, scatter = window_token_indices(height, width, w, self.shift_size, device)
            is_padding = gather == height * width
            padding = is_padding.nonzero().flatten() if bool(is_padding.any()) else None
            gather = gather.masked_fill(is_padding, 0)
            bias = self.attention.self.relative_position_bias().detach().unsqueeze(0)  # (1, heads, N, N)
            hp, wp = (height + w - 1) // w * w, (width + w - 1) // w * w
            n_windows = (hp // w) * (wp // w)
            if self.shift_size:
                bias = bias + shift_attention_mask(hp, wp, w, self.shift_size, device, table.dtype).unsqueeze(1)
            bias = bias.expand(n_windows, -1, -1, -1).reshape(n_windows * heads, w * w, w * w)
            return gather, padding, scatter, bias

        return cached_per_shape(self._mask_cache, key, build)


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhood concat (zero-padded to even sizes), LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, dims: Tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""
        height, width = dims
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        # to even sizes, without a branch on the size (see SwinPatchEmbeddings.forward)
        x = F.pad(x, (0, 0, 0, (width + 1) // 2 * 2 - width, 0, (height + 1) // 2 * 2 - height))
        # order (row, col) = (0,0), (1,0), (0,1), (1,1), as the checkpoints were trained
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, config: MaskFormerSwinConfig, dim: int, depth: int, num_heads: int, drop_path: List[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                SwinLayer(config, dim, num_heads, drop_path[i], shift_size=0 if i % 2 == 0 else int(config.window_size) // 2)
                for i in range(depth)
            ]
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None


class SwinEncoder(nn.Module):
    def __init__(self, config: MaskFormerSwinConfig):
        super().__init__()
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        stages, start = [], 0
        for i, depth in enumerate(config.depths):
            stages.append(
                SwinStage(
                    config,
                    dim=int(config.embed_dim * 2**i),
                    depth=depth,
                    num_heads=config.num_heads[i],
                    drop_path=rates[start : start + depth],
                    downsample=i < len(config.depths) - 1,
                )
            )
            start += depth
        self.layers = nn.ModuleList(stages)


class SwinModel(nn.Module):
    """Holds the parameters under the checkpoint's ``encoder.model.*`` names."""

    def __init__(self, config: MaskFormerSwinConfig):
        super().__init__()
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        # Final norm of the classification Swin: MaskFormer never uses it (the per-stage norms
        # below replace it) but the hub files carry it, so it is kept for strict loading.
        self.layernorm = nn.LayerNorm(config.stage_channels[-1], eps=config.layer_norm_eps)


class SwinBackbone(nn.Module):
    """Swin backbone returning one normalised feature map per stage.

    forward: pixel_values (B, C_in, H, W) float -> list of (B, C_i, ceil(H/4/2^i), ceil(W/4/2^i)),
    with C_i = embed_dim * 2^i (the spatial sizes round up at every patch merge).
    """

    def __init__(self, config: MaskFormerSwinConfig):
        super().__init__()
        self.config = config
        self.model = SwinModel(config)
        self.channels = config.stage_channels
        self.hidden_states_norms = nn.ModuleList([nn.LayerNorm(c) for c in self.channels])
        # model.gradient_checkpointing_enable() sets a torch.utils.checkpoint.checkpoint partial here:
        # in training each block's activations are then recomputed in the backward pass.
        self.gradient_checkpointing = None

    def parts(self):
        """(patch embeddings, the stages, one output norm per stage), wherever the layout keeps them."""
        return self.model.embeddings, self.model.encoder.layers, self.hidden_states_norms

    def forward(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values (B, 3, H, W) -> one (B, C_i, H_i, W_i) map per stage, fine to coarse.

        The reference returns them contiguous (NCHW), as transformers. A fast backend returns the
        same values as channels-last views of the tokens (B, H_i*W_i, C_i): no copy here, and the
        pixel decoder's convolutions, GroupNorms and upsamplings then all run channels-last, which
        oneDNN computes faster (2-core EPYC, the 256->256 3x3 conv at 128x171: 143 -> 119 ms fp32,
        65 -> 59 ms bf16) and cuDNN prefers for half precision.
        """
        # dispatch loads every op module when imported: on first use, not by `import maskformer`
        from . import dispatch

        channels_last = dispatch.candidate(pixel_values.device) is not None
        embeddings, stages, norms = self.parts()
        x, dims = embeddings(pixel_values)
        features = []
        for stage, norm in zip(stages, norms):
            checkpoint = self.gradient_checkpointing if self.training and torch.is_grad_enabled() else None
            for block in stage.blocks:
                x = block(x, dims) if checkpoint is None else checkpoint(block, x, dims)
            b, _, c = x.shape
            if channels_last:
                features.append(norm(x).view(b, dims[0], dims[1], c).permute(0, 3, 1, 2))
            else:
                features.append(norm(x).transpose(1, 2).reshape(b, c, dims[0], dims[1]).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return features


class _FinalNorm(nn.Module):
    """Holds the classification Swin's final ``layernorm`` (unused by the segmentation models)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.layernorm = nn.LayerNorm(channels, eps=eps)


class Mask2FormerSwinBackbone(SwinBackbone):
    """The same Swin, in the layout of transformers' generic ``SwinBackbone`` (what Mask2Former
    checkpoints hold): ``embeddings.*``, ``encoder.layers.*``, ``hidden_states_norms.stage1..4``
    and the unused final norm as ``swin.layernorm``. transformers' ``SwinBackbone`` runs with
    ``always_partition=True``: windows are never shrunk to a small map, exactly as
    ``MaskFormerSwin``, so the numerics (and ``forward``) are ``SwinBackbone``'s.
    """

    def __init__(self, config: MaskFormerSwinConfig):
        nn.Module.__init__(self)
        self.config = config
        self.channels = config.stage_channels
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        self.hidden_states_norms = nn.ModuleDict({f"stage{i + 1}": nn.LayerNorm(c) for i, c in enumerate(self.channels)})
        self.swin = _FinalNorm(config.stage_channels[-1], config.layer_norm_eps)
        self.gradient_checkpointing = None
        for module in self.modules():
            if isinstance(module, SwinSelfAttention):
                module.generic_order = True
                # Not saved, as transformers 5 (older Mask2Former files that hold it still load:
                # maskformer.checkpoint checks it against the window size and drops it).
                index = module.relative_position_index
                del module.relative_position_index
                module.register_buffer("relative_position_index", index, persistent=False)

    def parts(self):
        return self.embeddings, self.encoder.layers, list(self.hidden_states_norms.values())
