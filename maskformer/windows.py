"""Swin window geometry: partition and reverse, the relative position index, shift masks.

Pure functions of shapes, shared by the Swin blocks (``maskformer.swin``) and the Triton window
attention (``maskformer.kernels.window_attention``), which import them from here so that neither
imports the other at module level.
"""
from __future__ import annotations

import torch


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window_size`` -> (B * nW, window_size, window_size, C).

    Windows are ordered batch-major, then row-major over the window grid.
    """
    b, h, w, c = x.shape
    nh, nw = h // window_size, w // window_size
    x = x.view(b, nh, window_size, nw, window_size, c).transpose(2, 3)
    return _contiguous_copy(x).view(b * nh * nw, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """(B * nW, window_size, window_size, C) -> (B, H, W, C); the inverse of ``window_partition``."""
    c = windows.shape[-1]
    nh, nw = height // window_size, width // window_size
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window_size, window_size, c).transpose(2, 3)
    return _contiguous_copy(x).view(b, height, width, c)


def _contiguous_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x``, always. ``reshape`` copies a transposed window grid too, except
    when the grid has a single row or column of windows, where it returns a view: that branch
    on a size would tie a traced graph (torch.export, ONNX) to the one size it was traced at.
    The values are the same either way."""
    return x.clone(memory_format=torch.contiguous_format)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) int64 index into the ((2w-1)^2, heads) bias table, N = window_size**2.

    Entry [i, j] encodes the offset of token i from token j: (dy + w - 1) * (2w - 1) + (dx + w - 1).
    """
    # On the CPU even while a model is built under `with torch.device("meta")`: the first op on meta
    # tensors imports torch._refs (1.25 s here, a third of the CLI's start-up), and the index is
    # derived from the config anyway (the loader compares a stored one with it).
    arange = torch.arange(window_size, device="cpu")
    coords = torch.stack(torch.meshgrid(arange, arange, indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (rel[..., 0] + window_size - 1) * (2 * window_size - 1) + (rel[..., 1] + window_size - 1)


def shift_region_ids(height: int, width: int, window_size: int, shift_size: int, device=None) -> torch.Tensor:
    """(H, W) int64 region id of each position of the padded, rolled map (0..8).

    Rolling by -shift puts the last ``shift`` rows/columns next to the first ones; tokens from
    different regions must not attend to each other. Regions per axis: [0, n - window),
    [n - window, n - shift), [n - shift, n).
    """
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    h_region = (h >= height - window_size).long() + (h >= height - shift_size).long()
    w_region = (w >= width - window_size).long() + (w >= width - shift_size).long()
    return h_region[:, None] * 3 + w_region[None, :]


def shift_attention_mask(height: int, width: int, window_size: int, shift_size: int, device=None, dtype=torch.float32):
    """(nW, N, N) additive mask for shifted windows: 0 within a region, -100 across regions."""
    ids = shift_region_ids(height, width, window_size, shift_size, device)
    ids = window_partition(ids[None, :, :, None], window_size).reshape(-1, window_size * window_size)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


def window_token_indices(height: int, width: int, window_size: int, shift_size: int, device=None):
    """Index maps between a (B, H*W, C) token map and its padded, rolled window partition, so that the
    bf16 CPU fast path moves each token once each way instead of pad + roll + partition (4 copies)
    and reverse + roll + crop (4 more).

    Returns (gather, scatter), int64:
    - gather (nW * N,): for each window token, in ``window_partition(roll(pad(x), -shift))`` order,
      the index of its source token in the flattened (H*W) map, or H*W for a padding position (the
      caller writes zeros there);
    - scatter (H*W,): for each token of the map, its position in that window order, which also
      undoes the roll (``roll(window_reverse(...), +shift)[:, :H, :W]``).
    """
    w = window_size
    hp, wp = (height + w - 1) // w * w, (width + w - 1) // w * w
    r = torch.arange(hp, device=device)
    s = torch.arange(wp, device=device)
    # rolled[r, s] = padded[(r + shift) % hp, (s + shift) % wp]
    src_r, src_s = (r + shift_size) % hp, (s + shift_size) % wp
    src = src_r[:, None] * width + src_s[None, :]
    src = src.masked_fill((src_r[:, None] >= height) | (src_s[None, :] >= width), height * width)
    gather = window_partition(src[None, :, :, None], w).reshape(-1)
    # token (i, j) sits at rolled (i - shift) % hp, (j - shift) % wp; its window-order position:
    i = (torch.arange(height, device=device) - shift_size) % hp
    j = (torch.arange(width, device=device) - shift_size) % wp
    window = (i // w)[:, None] * (wp // w) + (j // w)[None, :]
    scatter = window * (w * w) + (i % w)[:, None] * w + (j % w)[None, :]
    return gather, scatter.reshape(-1)
