"""Swin (shifted-)window attention: a Triton kernel and its pure-PyTorch reference.

What the kernel fuses. The reference (``window_attention_ref``, equal to
``maskformer.swin.SwinLayer.window_attention`` without the output projection) does
pad -> roll -> partition -> q/k/v Linear -> gather (N, N, heads) bias -> build (nW, N, N) mask ->
scores -> softmax -> @ v -> reverse -> roll back -> crop: a copy of the feature map at every arrow
before and after the attention, and the (B*nW, heads, N, N) scores materialised (twice, with the
bias/mask adds). ``window_attention`` keeps one torch GEMM for the fused q/k/v
projection, x (B, H, W, C) @ W_qkv^T + b -> (B, H, W, 3C), and does everything else in one kernel
launch that
- reads q/k/v straight from that (B, H, W, 3C) tensor: the cyclic shift is an add-and-wrap on the
  row/column index, the zero padding is a masked load (a padded token is Linear(0) = the q/k/v
  *bias*: its q is selected in registers, its keys' scores become q . bk and its value rows add
  p_pad * bv to the accumulator, so K and V tiles go from global to shared memory untouched);
- reads the relative position bias from a (heads, N, N) table in the bias table's dtype
  (``dense_relative_position_bias``, cached per Swin layer), contiguous along keys; computes the
  shift mask (-100 across regions) from token coordinates, only in the last row and column of
  windows, the only ones where regions differ: no (nW, N, N) mask in memory;
- keeps scores, softmax (online, over key tiles) and the accumulator in fp32;
- writes (B, H, W, C) directly; padded positions are never written.

Limits: inference only (no autograd formula: backward through it raises); CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (tests);
fp32/fp16/bf16 with every tensor but the bias table in x's dtype; head_dim <= 256 (any value,
non-powers of two are padded to the next power of two >= 16 in registers only);
0 <= shift_size < window_size; one image of the (B, H, W, 3C) q/k/v tensor must have < 2**31
elements (int32 offsets inside an image).

Tiling. One program = one (batch, window, group of heads, tile of BLOCK_M query tokens); it loops
over its heads and, for each, over the window's N = w*w keys in tiles of BLOCK_N with an online
softmax. Triton blocks are powers of two, so N is never padded to one: N = 144 (window 12) runs as
9 key tiles of 16 with no padded key and 3 query tiles of 64 (192 x 144 scores computed per window
and head; 256 x 256 tiles would compute 3.2x the 144 x 144 needed); N = 49 (window 7) needs 64 rows
whatever the tiling, so there the program takes up to 4 heads (fp16/bf16) and shares the window's
coordinates, masks and addresses among them. The defaults (``default_blocks``) are *untuned* (no
GPU was available when this was written); ``benchmarks/bench_window_attention.py --sweep`` times
alternatives.

Compiled figures, before (2815de5) and after the rework: the kernel compiled for sm_80 and sm_90
without a GPU through ``launch`` (triton 3.9, bundled ptxas 12.9 for sm_80 and 13.4 for sm_90;
``python scripts/window_attention_figures.py`` prints this table). Instructions per window and
head are estimated from the SASS: each loop's own instructions x its trip count x warps x query
tiles / heads per program, for an interior window (the blocks a branch skips, skipped: no padded
token, no shift mask) and, in brackets, a border window (all of them). Bias bytes: what the bias
loads of one window and head touch (before: one 32-byte sector per gathered element at a stride of
``heads`` elements; after: contiguous rows). Swin-T stage 1 = 128x171 map, 96 channels, 3 heads,
shift 3; Swin-L stage 1 = 160x160, 192 channels, 6 heads, shift 6; both at batch 1.

| case | dtype | arch | version | tiles MxN, warps, heads/program | registers | spill B | occupancy | warp instructions / window-head | global load instr. | bias bytes |
|---|---|---|---|---|---|---|---|---|---|---|
| Swin-T s1 w7 | bf16 | sm_80 | before | 64x64, 4, 1 | 79 | 0/0 | 37.5% | 6480 (6480) | 136 | 26214 |
| Swin-T s1 w7 | bf16 | sm_80 | now | 64x64, 4, 3 | 168 | 0/0 | 18.8% | 3787 (6615) | 167 | 8192 |
| Swin-T s1 w7 | bf16 | sm_90 | before | 64x64, 4, 1 | 103 | 0/0 | 25.0% | 6632 (6632) | 136 | 26214 |
| Swin-T s1 w7 | bf16 | sm_90 | now | 64x64, 4, 3 | 189 | 0/0 | 12.5% | 3827 (6579) | 167 | 8192 |
| Swin-T s1 w7 | fp32 | sm_80 | before | 64x64, 4, 1 | 255 | 136/136 | 12.5% | 16828 (16828) | 160 | 65536 |
| Swin-T s1 w7 | fp32 | sm_80 | now | 64x16, 4, 1 | 141 | 0/0 | 18.8% | 16840 (19504) | 268 | 16384 |
| Swin-T s1 w7 | fp32 | sm_90 | before | 64x64, 4, 1 | 248 | 0/0 | 12.5% | 15824 (15824) | 160 | 65536 |
| Swin-T s1 w7 | fp32 | sm_90 | now | 64x16, 4, 1 | 149 | 0/0 | 18.8% | 16900 (19908) | 268 | 16384 |
| Swin-T s1 w7 | fp32 TF32 | sm_80 | before | 64x64, 4, 1 | 255 | 136/136 | 12.5% | 16828 (16828) | 160 | 65536 |
| Swin-T s1 w7 | fp32 TF32 | sm_80 | now | 64x64, 4, 1 | 128 | 0/0 | 25.0% | 5044 (9068) | 172 | 16384 |
| Swin-T s1 w7 | fp32 TF32 | sm_90 | before | 64x64, 4, 1 | 248 | 0/0 | 12.5% | 15824 (15824) | 160 | 65536 |
| Swin-T s1 w7 | fp32 TF32 | sm_90 | now | 64x64, 4, 1 | 128 | 0/0 | 25.0% | 4952 (9160) | 172 | 16384 |
| Swin-L s1 w12 | bf16 | sm_80 | before | 64x16, 4, 1 | 122 | 0/0 | 25.0% | 42780 (42780) | 1188 | 442368 |
| Swin-L s1 w12 | bf16 | sm_80 | now | 64x16, 4, 1 | 96 | 0/0 | 31.2% | 38172 (51096) | 468 | 55296 |
| Swin-L s1 w12 | bf16 | sm_90 | before | 64x16, 4, 1 | 94 | 0/0 | 31.2% | 44940 (44940) | 1188 | 442368 |
| Swin-L s1 w12 | bf16 | sm_90 | now | 64x16, 4, 1 | 80 | 0/0 | 37.5% | 37896 (51528) | 492 | 55296 |
| Swin-L s1 w12 | fp32 | sm_80 | before | 64x16, 4, 1 | 250 | 0/0 | 12.5% | 106824 (106824) | 1404 | 884736 |
| Swin-L s1 w12 | fp32 | sm_80 | now | 64x16, 8, 1 | 122 | 0/0 | 25.0% | 116352 (138720) | 912 | 110592 |
| Swin-L s1 w12 | fp32 | sm_90 | before | 64x16, 4, 1 | 250 | 0/0 | 12.5% | 108300 (108300) | 1404 | 884736 |
| Swin-L s1 w12 | fp32 | sm_90 | now | 64x16, 8, 1 | 100 | 0/0 | 25.0% | 118656 (144072) | 912 | 110592 |
| Swin-L s1 w12 | fp32 TF32 | sm_80 | before | 64x16, 4, 1 | 250 | 0/0 | 12.5% | 106824 (106824) | 1404 | 884736 |
| Swin-L s1 w12 | fp32 TF32 | sm_80 | now | 64x16, 4, 1 | 128 | 0/0 | 25.0% | 41388 (54312) | 624 | 110592 |
| Swin-L s1 w12 | fp32 TF32 | sm_90 | before | 64x16, 4, 1 | 250 | 0/0 | 12.5% | 108300 (108300) | 1404 | 884736 |
| Swin-L s1 w12 | fp32 TF32 | sm_90 | now | 64x16, 4, 1 | 137 | 0/0 | 18.8% | 44340 (57660) | 1044 | 110592 |

What the figures say, and what they cannot: fp16/bf16 window 7 runs ~42% fewer instructions per
window and head in interior windows (3 heads per program; border windows about as many as
before), but uses 168-189 registers instead of 79-103, so 12.5-19% occupancy instead of 25-37.5%
(the pipelined head loop keeps the next head's tiles in flight: its overlap is what has to make
up for that; ``heads_per_program=1`` is the alternative to time on a GPU). Window 12 runs 11-16%
fewer instructions in interior windows (+15-20% in border windows: the last one or two rows and
columns of windows, which hold the padded tokens or the shift mask), with fewer registers. Global
load instructions fall 2.3-2.5x at window 12: K, V and the bias go by cp.async (LDGSTS) instead of
register loads; the bias bytes touched fall 3.2x at window 7 and 8x at window 12 (bf16: 26 -> 8 KB
and 442 -> 55 KB per window and head). fp32 no longer spills (255 registers and 136 B of spills at
window 7 on sm_80; 4 B at window 12, shift 0, with 4 warps): exact fp32 takes 16-key tiles at
window 7 (as many instructions as before) and 8 warps at window 12 (9-10% more instructions than
before, spread over twice the warps, at 25% occupancy instead of 12.5%); TF32, when torch allows
it, runs on the tensor cores with 2.4-3.4x fewer instructions. None of this has been timed: there
was no GPU.
"""
import contextlib
import functools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# One place for "is triton importable" and "is the interpreter on": maskformer._ext.
from maskformer import _devices, _ext
from maskformer._ext import triton_interpret_mode as _interpret_mode
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, IMAGES, AOTLaunch, Impl, Op, triton_reasons
from maskformer.windows import relative_position_index, shift_attention_mask, window_partition, window_reverse

__all__ = ["OP", "window_attention", "window_attention_ref", "window_attention_eager", "window_attention_impl",
           "check_args", "not_supported_reasons", "check_devices", "launch", "default_blocks", "dot_precision",
           "aot_launches", "dense_relative_position_bias", "stage_shapes", "SWIN"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# q, the fp32 accumulator (both BLOCK_M x head_dim) and the K/V tiles live in registers. Compiled
# for sm_80/sm_90 with the default tiles (benchmarks/aot.py's driver): head_dim 32 and 64 take
# 80-221 registers and never spill (Swin's head_dim is 32); 128 spills 32-68 B in fp32; 256 spills
# 4-948 B; beyond 256, refuse.
_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def window_attention_eager(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
    use_sdpa: bool = False,
) -> torch.Tensor:
    """Transformers-style window attention computed in x's dtype (no upcast).

    The same steps and order as ``SwinLayer.window_attention``: zero-pad after the layernorm, roll
    by -shift, partition, project, ``(q @ k^T) / sqrt(d) + bias + mask``, softmax, ``@ v``, reverse,
    roll back, crop. ``use_sdpa`` replaces the score/softmax/@v steps by
    ``F.scaled_dot_product_attention`` with the bias and mask materialised as ``attn_mask``
    (the benchmark's SDPA baseline). Shapes as ``window_attention_ref``.
    """
    b, height, width, c = x.shape
    w = window_size
    n = w * w
    head_dim = c // num_heads
    pad_r = (w - width % w) % w
    pad_b = (w - height % w) % w
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = height + pad_b, width + pad_r
    if shift_size:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    windows = window_partition(x, w).reshape(-1, n, c)  # (B*nW, N, C)
    bw = windows.shape[0]
    qkv = F.linear(windows, qkv_weight, qkv_bias).view(bw, n, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, D)
    bias = _dense_bias(bias_table, w).to(x.dtype)  # (heads, N, N)
    mask = shift_attention_mask(hp, wp, w, shift_size, x.device, x.dtype) if shift_size else None  # (nW, N, N)
    if use_sdpa:
        attn_mask = bias.unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            attn_mask = (attn_mask + mask.unsqueeze(1)).repeat(b, 1, 1, 1)  # (B*nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            scores = scores.view(bw // nw, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(bw, num_heads, n, n)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
    out = out.transpose(1, 2).reshape(-1, w, w, c)
    out = window_reverse(out, w, hp, wp)
    if shift_size:
        out = torch.roll(out, shifts=(shift_size, shift_size), dims=(1, 2))
    return out[:, :height, :width, :]


def check_devices(x, qkv_weight, qkv_bias, bias_table) -> None:
    """ValueError naming each tensor's device when they are not all on one device (every entry and
    the fake kernel check this: a meta tensor mixed with CPU ones would reach the fake kernel)."""
    _devices.check_same_device("window_attention", x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
                               bias_table=bias_table)


def check_args(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads) -> None:
    """The op's argument check, run before any backend is chosen (``window_attention_ref``'s
    arguments): the tensors on one device (``check_devices``). The shapes are each backend's
    concern: the model's reference code needs no fused weight, so a CPU call may pass None for
    ``qkv_weight``."""
    check_devices(x, qkv_weight, qkv_bias, bias_table)


def window_attention_ref(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> torch.Tensor:
    """Reference (shifted-)window attention of one Swin block, before the output projection.

    Args:
        x: (B, H, W, C) float, the block's layernormed hidden states, NOT padded (any H, W).
        qkv_weight: (3C, C), ``cat([query.weight, key.weight, value.weight])``.
        qkv_bias: (3C,) or None, ``cat([query.bias, key.bias, value.bias])``.
        bias_table: ((2 * window_size - 1) ** 2, num_heads), ``relative_position_bias_table``, or
            its dense (num_heads, N, N) form ``dense_relative_position_bias(table, window_size)``
            (N = window_size ** 2; the same values, gathered once: what a Swin layer caches).
        window_size: w; the map is zero-padded to multiples of w and split into w x w windows.
        shift_size: cyclic shift (0 for the non-shifted blocks, w // 2 for the shifted ones).
        num_heads: heads; C must be a multiple of it.

    Returns:
        (B, H, W, C) in x's dtype: the attention output to which the caller applies
        ``attention.output.dense``. fp16/bf16 inputs are computed in fp32 and the result is
        rounded once to x's dtype (the op's accuracy target, not a model of bf16 eager numerics);
        fp32 and fp64 are computed in their own dtype. Equal to
        ``SwinLayer.window_attention`` minus the output projection, itself equal to transformers'
        MaskFormerSwin: padded tokens take part unmasked in non-shifted windows, the shift mask
        (-100 across regions) is built on the padded map. ValueError for tensors on different
        devices.
    """
    check_devices(x, qkv_weight, qkv_bias, bias_table)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = window_attention_eager(
        x.to(compute),
        qkv_weight.to(compute),
        None if qkv_bias is None else qkv_bias.to(compute),
        bias_table.to(compute),
        window_size,
        shift_size,
        num_heads,
    )
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def _shape_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads) -> List[str]:
    """Shape/argument problems that make the call meaningless for the reference too."""
    reasons = []
    if x.dim() != 4:
        return [f"x must be (B, H, W, C), got shape {tuple(x.shape)}"]
    c = x.shape[-1]
    if num_heads < 1 or c % num_heads:
        reasons.append(f"num_heads={num_heads} must be >= 1 and divide C={c}")
    if window_size < 1:
        reasons.append(f"window_size={window_size} must be >= 1")
    elif not 0 <= shift_size < window_size:
        reasons.append(f"shift_size={shift_size} must be in [0, window_size={window_size})")
    if tuple(qkv_weight.shape) != (3 * c, c):
        reasons.append(f"qkv_weight must be (3C, C) = {(3 * c, c)}, got {tuple(qkv_weight.shape)}")
    if qkv_bias is not None and tuple(qkv_bias.shape) != (3 * c,):
        reasons.append(f"qkv_bias must be (3C,) = {(3 * c,)} or None, got {tuple(qkv_bias.shape)}")
    n = window_size * window_size
    if window_size >= 1 and tuple(bias_table.shape) not in (((2 * window_size - 1) ** 2, num_heads), (num_heads, n, n)):
        reasons.append(
            f"bias_table must be ((2w-1)^2, heads) = {((2 * window_size - 1) ** 2, num_heads)} or its dense "
            f"(heads, N, N) = {(num_heads, n, n)} form, got {tuple(bias_table.shape)}"
        )
    return reasons


def _kernel_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads) -> List[str]:
    """Everything but autograd: what the op's implementation itself checks before launching."""
    reasons = _shape_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)
    tensors = {"x": x, "qkv_weight": qkv_weight, "bias_table": bias_table}
    if qkv_bias is not None:
        tensors["qkv_bias"] = qkv_bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        reasons.append(f"tensors are on different devices: {devices}")
    reasons += triton_reasons(x, "x is")
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported (fp32, fp16, bf16)")
    for name in ("qkv_weight", "qkv_bias"):
        t = tensors.get(name)
        if t is not None and t.dtype != x.dtype:
            reasons.append(f"{name} is {t.dtype} but x is {x.dtype}: the q/k/v GEMM needs one dtype")
    if bias_table.dtype not in _KERNEL_DTYPES:
        reasons.append(f"bias_table dtype {bias_table.dtype} is not supported (fp32, fp16, bf16)")
    if x.dim() == 4 and num_heads >= 1 and x.shape[-1] % num_heads == 0:
        head_dim = x.shape[-1] // num_heads
        if head_dim > _MAX_HEAD_DIM:
            reasons.append(
                f"head_dim={head_dim} > {_MAX_HEAD_DIM}: the kernel keeps a (BLOCK_M, head_dim) fp32 "
                "accumulator in registers, which would spill"
            )
        per_image = x.shape[1] * x.shape[2] * 3 * x.shape[3]
        if per_image >= 2**31:
            reasons.append(f"one image's q/k/v has {per_image} >= 2**31 elements: offsets are int32 within an image")
    return reasons


def not_supported_reasons(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> List[str]:
    """Why ``window_attention`` cannot serve these arguments; [] when it can.

    Same arguments as ``window_attention_ref``. Reasons are human-readable: triton missing, device
    (CUDA, or CPU only under TRITON_INTERPRET=1), dtypes, head_dim, shapes, and autograd (the
    kernel has no backward, so inputs that require grad under grad mode are refused). Importing
    triton happens here, not at module import.
    """
    reasons = _kernel_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)
    if torch.is_grad_enabled():
        needing = [
            name
            for name, t in (("x", x), ("qkv_weight", qkv_weight), ("qkv_bias", qkv_bias), ("bias_table", bias_table))
            if t is not None and t.requires_grad
        ]
        if needing:
            reasons.append(f"{', '.join(needing)} require grad: the kernel is forward-only (no backward)")
    return reasons


# ---------------------------------------------------------------------------------------------
# Kernel (built on first use so that importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """(kernel, interpreted): the @triton.jit kernel, built on first use, once per process.

    triton.jit decides at decoration time whether it makes an interpreted function, so the kernel
    follows the TRITON_INTERPRET of its first use; ``launch`` refuses to run it if the setting
    changed since (the helpers below are module globals, so two variants cannot coexist).
    """
    # Triton resolves the names a kernel uses (tl, helper @jit functions) in the kernel function's
    # module globals, not in closures: bind them as module globals here, on first use.
    global triton, tl, _token_coords, _token_region, _dot, _window_attention_fwd_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _token_coords(t, win_y, win_x, height, width, padded_height, padded_width,
                      WINDOW: tl.constexpr, SHIFT: tl.constexpr):
        """Window token t -> its (y, x) in the unpadded image and whether (y, x) is a real pixel."""
        # Position on the padded map after torch.roll(-SHIFT): rolled[p] = padded[(p + SHIFT) % Hp].
        y = win_y * WINDOW + t // WINDOW + SHIFT
        x = win_x * WINDOW + t % WINDOW + SHIFT
        y = tl.where(y >= padded_height, y - padded_height, y)
        x = tl.where(x >= padded_width, x - padded_width, x)
        return y, x, (y < height) & (x < width)

    @triton.jit
    def _token_region(t, win_y, win_x, padded_height, padded_width, WINDOW: tl.constexpr, SHIFT: tl.constexpr):
        """Window token t -> its shift region (0..8): ``shift_region_ids`` on the padded, rolled
        map, per axis [0, n-w), [n-w, n-s), [n-s, n)."""
        ry = win_y * WINDOW + t // WINDOW
        rx = win_x * WINDOW + t % WINDOW
        region_y = (ry >= padded_height - WINDOW).to(tl.int32) + (ry >= padded_height - SHIFT).to(tl.int32)
        region_x = (rx >= padded_width - WINDOW).to(tl.int32) + (rx >= padded_width - SHIFT).to(tl.int32)
        return region_y * 3 + region_x

    @triton.jit
    def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        if UPCAST_DOT:
            # Interpreter only: it multiplies bf16 bit patterns as integers
            # (triton-lang/triton#11584). bf16 x bf16 products are exact in fp32, so an fp32 "ieee"
            # dot of the upcast operands is what the tensor cores compute, up to summation order.
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _window_attention_fwd_kernel(
        qkv_ptr, qkv_bias_ptr, bias_ptr, out_ptr,
        height, width, padded_height, padded_width,
        windows_per_row, windows_per_image, num_head_groups, num_m_tiles, channels,
        stride_qkv_b, stride_qkv_h, stride_qkv_w,
        stride_out_b, stride_out_h, stride_out_w,
        qk_scale,
        WINDOW: tl.constexpr, SHIFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ALL: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
        HAS_QKV_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        N: tl.constexpr = WINDOW * WINDOW
        LOG2E: tl.constexpr = 1.4426950408889634
        # The -100 of the reference's shift mask, in the log2 domain the softmax runs in.
        MASK_LOG2: tl.constexpr = -100.0 * 1.4426950408889634

        # Query tiles fastest, then head groups, then windows: the programs that re-read one
        # window's K/V rows (all query tiles, all heads share the tokens' 3C rows) run back to back.
        pid = tl.program_id(0)
        m_tile = pid % num_m_tiles
        rest = pid // num_m_tiles
        group = rest % num_head_groups
        rest = rest // num_head_groups
        batch = rest // windows_per_image
        win = rest % windows_per_image
        win_y = win // windows_per_row
        win_x = win % windows_per_row
        # The shift mask is all zeros except in the last row and column of windows (regions differ
        # only there): 27 of 196 windows at 160x160, window 12. Elsewhere no mask work at all.
        masked_window = (win_y == padded_height // WINDOW - 1) | (win_x == windows_per_row - 1)

        qkv_base = qkv_ptr + batch.to(tl.int64) * stride_qkv_b
        out_base = out_ptr + batch.to(tl.int64) * stride_out_b
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM

        tq = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tq_ok = tq < N
        yq, xq, inside_q = _token_coords(tq, win_y, win_x, height, width, padded_height, padded_width, WINDOW, SHIFT)
        q_rows = yq * stride_qkv_h + xq * stride_qkv_w
        out_rows = yq * stride_out_h + xq * stride_out_w
        q_ok = inside_q & tq_ok
        if HAS_QKV_BIAS:
            # Does the window hold a padded token (one past the image's last row or column, rolled
            # with the shift)? Only such windows (the last one or two rows/columns of windows)
            # pay for the padded keys' fix-up below; the others run without it.
            t_all = tl.arange(0, BLOCK_ALL)
            _, _, inside_all = _token_coords(
                t_all, win_y, win_x, height, width, padded_height, padded_width, WINDOW, SHIFT)
            padded_window = tl.max(((~inside_all) & (t_all < N)).to(tl.int32), 0) > 0

        # Several heads per program (window 7, 16-bit operands): the window's coordinates, masks
        # and row addresses are computed once, the heads' channel slices of one token row are
        # adjacent (2 heads of bf16 at head_dim 32 = one 128-byte line), and the head loop gives the
        # pipeliner a loop to overlap the next head's loads with this head's MMAs and softmax even
        # when N fits one key tile.
        for hh in range(HEADS_PER_PROGRAM):
            head = group * HEADS_PER_PROGRAM + hh
            q_col = head * HEAD_DIM + d
            k_col = channels + q_col
            v_col = 2 * channels + q_col
            q = tl.load(qkv_base + q_rows[:, None] + q_col[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_QKV_BIAS:
                # A padded token is Linear(0) = bias (x is zero-padded after the layernorm).
                bq = tl.load(qkv_bias_ptr + q_col, mask=d_ok, other=0.0).to(q.dtype)
                q = tl.where(inside_q[:, None], q, bq[None, :])
                # K and V are loaded with zeros for padded tokens and go to shared memory untouched;
                # a padded key's score is q . bk and its value row bv, added to S and to the
                # accumulator below (padded windows only).
                q_dot_bk = tl.zeros([BLOCK_M], tl.float32)
                bv = tl.zeros([BLOCK_D], tl.float32)
                if padded_window:
                    bk = tl.load(qkv_bias_ptr + k_col, mask=d_ok, other=0.0).to(tl.float32)
                    bv = tl.load(qkv_bias_ptr + v_col, mask=d_ok, other=0.0).to(tl.float32)
                    q_dot_bk = tl.sum(q.to(tl.float32) * bk[None, :], 1)
            bias_rows = bias_ptr + head * N * N + tq * N

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                tk = start_n + tl.arange(0, BLOCK_N)
                tk_ok = tk < N
                yk, xk, inside_k = _token_coords(
                    tk, win_y, win_x, height, width, padded_height, padded_width, WINDOW, SHIFT)
                k_rows = yk * stride_qkv_h + xk * stride_qkv_w
                kv_ok = inside_k & tk_ok
                # K^T tile (BLOCK_D, BLOCK_N), V tile (BLOCK_N, BLOCK_D), read in place from
                # (B, H, W, 3C), zeros for padded tokens and keys past N.
                kt = tl.load(qkv_base + k_rows[None, :] + k_col[:, None], mask=kv_ok[None, :] & d_ok[:, None],
                             other=0.0)
                v = tl.load(qkv_base + k_rows[:, None] + v_col[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                            other=0.0)
                qk = _dot(q, kt, DOT_PRECISION, UPCAST_DOT)
                if HAS_QKV_BIAS:
                    if padded_window:
                        qk = tl.where(inside_k[None, :], qk, q_dot_bk[:, None])
                # The (heads, N, N) bias, contiguous along keys: vector loads, coalesced.
                bias = tl.load(bias_rows[:, None] + tk[None, :], mask=tq_ok[:, None] & tk_ok[None, :],
                               other=0.0).to(tl.float32)
                s = (qk * qk_scale + bias) * LOG2E
                if SHIFT > 0:
                    if masked_window:
                        region_q = _token_region(tq, win_y, win_x, padded_height, padded_width, WINDOW, SHIFT)
                        region_k = _token_region(tk, win_y, win_x, padded_height, padded_width, WINDOW, SHIFT)
                        s = tl.where(region_q[:, None] == region_k[None, :], s, s + MASK_LOG2)
                if N % BLOCK_N != 0:
                    s = tl.where(tk_ok[None, :], s, float("-inf"))  # keys past N in the last tile

                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
                if HAS_QKV_BIAS:
                    if padded_window:
                        # The padded keys' value rows are bv: their probabilities' sum times bv.
                        p_pad = tl.sum(tl.where(inside_k[None, :], 0.0, p), 1)
                        acc += p_pad[:, None] * bv[None, :]
                m_i = m_new

            out = acc / l_i[:, None]
            tl.store(out_base + out_rows[:, None] + q_col[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=q_ok[:, None] & d_ok[None, :])

    return _window_attention_fwd_kernel, bool(triton.knobs.runtime.interpret)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp16/bf16 operands always run on the tensor cores ("tf32" is
    ignored for them); fp32 follows torch's fp32 matmul policy (``maskformer._ext.tf32_matmul_allowed``):
    "tf32" tensor cores when allowed, exact "ieee" FFMA otherwise (torch's default)."""
    return "tf32" if dtype != torch.float32 or _ext.tf32_matmul_allowed() else "ieee"


def default_blocks(n: int, head_dim: int, num_heads: int = 1, precision: str = "tf32",
                    element_size: int = 2) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, heads_per_program) for a window of N = w*w tokens. Untuned
    (no GPU when written): ``benchmarks/bench_window_attention.py --sweep`` measures the
    alternatives; the compiled figures behind them are in the module docstring.

    Keys: tiles of 16 when N > 64, so N = 144 is 9 tiles with no padded key (the softmax's exp
    work scales with the keys); N <= 64 in one power-of-two tile (49 -> 64: every tiling pads 49
    to 64). Queries: 64-row tiles (4 warps, one m16 MMA row block each) for N > 32. For N = 144
    that pads 144 rows to 192 (1.33x the exp work) but re-reads each window's K/V 3 times instead
    of 9: at Swin-L stage 1 (640x640, 196 windows x 6 heads, head_dim 32, bf16) ~63 MB of L2
    traffic instead of ~190 MB, against ~43 MB of q/k/v/out HBM traffic. Heads: up to 4 per
    program when N <= 64, head_dim <= 64 and the operands are fp16/bf16 (the largest divisor of
    num_heads <= 4), one otherwise: with fp32 operands the pipelined head loop's buffers took
    90-107 KB of shared memory and up to 255 registers (TF32, window 7), for ~6% fewer
    instructions (exact fp32); at head_dim 256 they exceed the shared memory of a block.
    Exact fp32 ("ieee", FFMA dots): a thread holds its score rows' whole q and its columns' whole
    K^T, so 64 x 64 tiles (window 7) took 255 registers and spilled on sm_80: 16-key tiles there,
    and 8 warps at window 12.
    """
    pow2 = _pow2_at_least(n)
    block_m = min(64, pow2)
    block_n = 16 if n > 64 else pow2
    num_warps = max(1, block_m // 16)
    if precision == "ieee":
        block_n = min(block_n, 16)
        if n > 64:
            num_warps = 8  # 4 warps: 128 registers and 4 B of spills on sm_80 (window 12, shift 0)
    heads_per_program = 1
    if n <= 64 and element_size == 2 and head_dim <= 64:
        heads_per_program = max(h for h in (1, 2, 3, 4) if num_heads % h == 0)
    return block_m, block_n, num_warps, heads_per_program


def dense_relative_position_bias(bias_table: torch.Tensor, window_size: int) -> torch.Tensor:
    """((2w-1)^2, heads) relative position bias table -> (heads, N, N) contiguous bias in the
    table's dtype (a gather: values unchanged), N = w*w: what the kernel reads. A Swin layer keeps
    it (``SwinSelfAttention.dense_relative_position_bias``); ``window_attention`` takes either form."""
    n = window_size * window_size
    index = relative_position_index(window_size).to(bias_table.device)
    return bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def _dense_bias(bias_table: torch.Tensor, window_size: int) -> torch.Tensor:
    return bias_table.contiguous() if bias_table.dim() == 3 else dense_relative_position_bias(bias_table, window_size)


def launch(
    qkv: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    out: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    heads_per_program: Optional[int] = None,
    compile_only: bool = False,
):
    """Run the attention kernel: qkv (B, H, W, 3C) projected q/k/v (bias included for real pixels),
    qkv_bias (3C,) or None (used for padded tokens), bias_table ((2w-1)^2, heads) or its dense
    (heads, N, N) form -> out (B, H, W, C), written in place (any strides with a unit last stride)
    and returned. The block/warp/stage/heads arguments override ``default_blocks`` (tests,
    ``--sweep``; heads_per_program must divide num_heads); None = default. ``compile_only``:
    compile for the active triton target and return the ``CompiledKernel`` without launching
    (``benchmarks/aot.py`` calls this with meta tensors: the binary it checks is the one a real
    call of the same shapes launches)."""
    b, height, width, c3 = qkv.shape
    c = c3 // 3
    head_dim = c // num_heads
    if qkv.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("window_attention: qkv and out need a contiguous last (channel) dimension")
    if tuple(out.shape) != (b, height, width, c):
        raise ValueError(f"window_attention: out is {tuple(out.shape)}, expected {(b, height, width, c)}")
    if out.numel() == 0 and not compile_only:
        return out
    w = window_size
    hp = -(-height // w) * w
    wp = -(-width // w) * w
    windows_per_row = wp // w
    windows_per_image = (hp // w) * windows_per_row
    n = w * w
    precision = dot_precision(qkv.dtype)
    d_block = _pow2_at_least(head_dim)
    m_default, n_default, warps_default, heads_default = default_blocks(n, head_dim, num_heads, precision,
                                                                         qkv.element_size())
    block_m = block_m or m_default
    block_n = block_n or n_default
    num_warps = num_warps or warps_default
    heads_per_program = heads_per_program or heads_default
    if num_heads % heads_per_program:
        raise ValueError(f"window_attention: heads_per_program={heads_per_program} must divide num_heads={num_heads}")
    num_m_tiles = -(-n // block_m)
    num_head_groups = num_heads // heads_per_program
    grid = (b * windows_per_image * num_head_groups * num_m_tiles,)
    interpret = _interpret_mode()
    kernel, built_interpreted = _build_kernel()
    if interpret != built_interpreted:
        raise RuntimeError(
            f"window_attention: the kernel was built with TRITON_INTERPRET={int(built_interpreted)} and it is now "
            f"{int(interpret)}; triton fixes this when it decorates the kernel, so set it once per process"
        )
    dense = _dense_bias(bias_table, w)
    bias = qkv_bias.contiguous() if qkv_bias is not None else qkv  # dummy pointer when HAS_QKV_BIAS=False
    # triton launches on the current CUDA device: make it the tensors' one (no-op for cuda:0 / CPU).
    on_device = torch.cuda.device(qkv.device) if qkv.device.type == "cuda" else contextlib.nullcontext()
    launch = kernel.warmup if compile_only else kernel[grid]
    with on_device:
        compiled = launch(
            qkv, bias, dense, out,
            height, width, hp, wp,
            windows_per_row, windows_per_image, num_head_groups, num_m_tiles, c,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            1.0 / math.sqrt(head_dim),
            WINDOW=w, SHIFT=shift_size, HEAD_DIM=head_dim, BLOCK_D=d_block,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_ALL=_pow2_at_least(n), HEADS_PER_PROGRAM=heads_per_program, HAS_QKV_BIAS=qkv_bias is not None,
            DOT_PRECISION=precision,
            UPCAST_DOT=interpret and qkv.dtype == torch.bfloat16,
            num_warps=num_warps,
            # Explicit (triton 3.10 turns the default off): a * b + c becomes one FMA (the score
            # scaling, the online-softmax rescale); no result here depends on a rounding order.
            enable_fp_fusion=True,
            **({} if num_stages is None else {"num_stages": num_stages}),
            **({"grid": grid} if compile_only else {}),
        )
    return compiled if compile_only else out


def window_attention_impl(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
    out: Optional[torch.Tensor] = None,
    **blocks,
) -> torch.Tensor:
    """The op's body: check, one q/k/v GEMM, one kernel launch. ``out`` lets tests pass a
    sentinel-filled (or strided) buffer; ``blocks`` (block_m, block_n, num_warps, num_stages)
    override the tiles."""
    reasons = _kernel_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)
    if reasons:
        raise ValueError("maskformer::window_attention (Triton) cannot run: " + "; ".join(reasons))
    # One GEMM for q, k and v: (B, H, W, C) @ (C, 3C) + bias -> (B, H, W, 3C), contiguous.
    qkv = F.linear(x, qkv_weight, qkv_bias)
    if out is None:
        out = x.new_empty(x.shape)
    return launch(qkv, qkv_bias, bias_table, out, window_size, shift_size, num_heads, **blocks)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
# custom_op rather than triton_op: in torch 2.13 ``triton_op`` imports triton when it decorates
# (``get_inner_triton_kernels``), which would make ``import maskformer.kernels.window_attention``
# import triton, against this package's lean-import rule, and the kernel must be decorated after
# TRITON_INTERPRET is set. A custom_op is opaque to torch.compile but still traced without a graph
# break, and the fake kernel below gives compile/export the output's shape.


@torch.library.custom_op("maskformer::window_attention", mutates_args=())
def _window_attention_op(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> torch.Tensor:
    return window_attention_impl(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)


@_window_attention_op.register_fake
def _window_attention_fake(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads):
    check_devices(x, qkv_weight, qkv_bias, bias_table)
    reasons = _shape_reasons(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)
    if reasons:
        raise ValueError("maskformer::window_attention: " + "; ".join(reasons))
    return x.new_empty(x.shape)


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> torch.Tensor:
    """Fused (shifted-)window attention, ``torch.ops.maskformer.window_attention``.

    Same arguments, shapes and result as ``window_attention_ref``: x (B, H, W, C) layernormed and
    unpadded, qkv_weight (3C, C), qkv_bias (3C,) or None, bias_table ((2w-1)^2, heads) or its
    dense (heads, N, N) form (``dense_relative_position_bias``; the raw table is expanded at every
    call) -> (B, H, W, C) in x's dtype, before the output projection. Scores, softmax and
    accumulation are fp32 whatever the dtype; for fp16/bf16 the q/k/v projection and the
    probabilities fed to the P @ V product are in x's dtype (as flash attention); fp32 products are
    exact, or TF32 when torch's fp32 matmuls may use it (``torch.backends.cuda.matmul``). Forward only. Raises ValueError with
    ``not_supported_reasons`` when it cannot run (check those first to fall back to the reference),
    and for tensors on different devices. Tensors all on the meta device give a meta result (the
    op's fake kernel: shape propagation, as torch.compile tracing uses it).
    """
    check_devices(x, qkv_weight, qkv_bias, bias_table)
    return torch.ops.maskformer.window_attention(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time launches (benchmarks/aot.py) and the op's declaration
# ---------------------------------------------------------------------------------------------
# Swin backbones as MaskFormer's checkpoints use them: (embed_dim, heads per stage, window).
# Swin-S has Swin-T's widths and window (only depths differ): the same launches.
SWIN = {
    "swin-tiny": (96, (3, 6, 12, 24), 7),
    "swin-base": (128, (4, 8, 16, 32), 12),
    "swin-large": (192, (6, 12, 24, 48), 12),
    "default-model": (32, (1, 2, 4, 8), 7),
}


def stage_shapes(height: int, width: int):
    """(H, W) of the four Swin stages for an input: patch embedding pads to a multiple of 4,
    each patch merging pads to even sizes (transformers' MaskFormerSwin)."""
    h, w = -(-height // 4), -(-width // 4)
    for _ in range(4):
        yield h, w
        h, w = -(-h // 2), -(-w // 2)


def _aot_launch(batch, h, w, c, heads, window, shift, dtype, table_dtype, tf32) -> AOTLaunch:
    dt, tdt = getattr(torch, dtype), getattr(torch, table_dtype)

    def compile_():
        # window_attention_impl's tensors: x (B, H, W, C) contiguous, its q/k/v Linear, a new out.
        x = torch.empty(batch, h, w, c, device="meta", dtype=dt)
        weight = torch.empty(3 * c, c, device="meta", dtype=dt)
        bias = torch.empty(3 * c, device="meta", dtype=dt)
        table = torch.empty((2 * window - 1) ** 2, heads, device="meta", dtype=tdt)
        qkv = F.linear(x, weight, bias)
        with _ext.tf32_matmul(bool(tf32)):
            return launch(qkv, bias, table, x.new_empty(x.shape), window, shift, heads, compile_only=True)

    config = dict(x=f"{batch}x{h}x{w}x{c}", heads=heads, window=window, shift=shift, dtype=DTYPE_LABELS[dtype],
                  table=DTYPE_LABELS[table_dtype])
    if dtype == "float32":
        config["tf32"] = bool(tf32)
    return AOTLaunch("window_attention", config, compile_, tensor_cores=dtype != "float32" or bool(tf32))


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles. Full: Swin-T (window 7), Swin-B and Swin-L
    (window 12) and the shipped default model (window 7) at each input size (``IMAGES``), every
    stage, both shifts, batch 1 and 8, fp32 (both TF32 settings), fp16, bf16, the bias table in the
    input's dtype and in fp32 (autocast). CI: one launch per distinct (constexprs, dtypes, shift,
    table dtype, TF32 setting), with both divisibility cases of the image-dependent sizes: stage 1
    of Swin-T at 512x683 (window 7, 128x171) and of Swin-L at 640x640 (window 12, 160x160), plus
    bf16 with the fp32 table (autocast)."""
    out: List[AOTLaunch] = []
    if full:
        for embed, heads_per_stage, window in SWIN.values():
            for image in IMAGES:
                for stage, (h, w) in enumerate(stage_shapes(*image)):
                    c, heads = embed * 2**stage, heads_per_stage[stage]
                    for batch in (1, 8):
                        for shift in (0, window // 2):
                            for dtype in AOT_DTYPES:
                                for table in sorted({dtype, "float32"}):
                                    for tf32 in ((False, True) if dtype == "float32" else (None,)):
                                        out.append(_aot_launch(batch, h, w, c, heads, window, shift, dtype, table,
                                                               tf32))
        return out
    for model, image in (("swin-tiny", (512, 683)), ("swin-large", (640, 640))):
        embed, heads_per_stage, window = SWIN[model]
        h, w = next(stage_shapes(*image))
        for shift in (0, window // 2):
            for dtype in AOT_DTYPES:
                for tf32 in ((False, True) if dtype == "float32" else (None,)):
                    out.append(_aot_launch(1, h, w, embed, heads_per_stage[0], window, shift, dtype, dtype, tf32))
        # autocast: half x with the fp32 parameter table
        out.append(_aot_launch(1, h, w, embed, heads_per_stage[0], window, window // 2, "bfloat16", "float32", None))
    return out


OP = Op(
    name="window_attention",
    reference=window_attention_ref,
    check=check_args,
    description="Swin (shifted-)window attention of one block before the output projection, one kernel launch "
                "after the q/k/v GEMM: (B, H, W, C) -> (B, H, W, C); the model runs its own reference code",
    role="network",
    tasks=("semantic", "instance", "panoptic"),
    impls=(Impl("triton", window_attention, devices=("cuda",), dtypes=_KERNEL_DTYPES, reasons=not_supported_reasons),),
    missing={"cpp": "the reference PyTorch code is the CPU path"},
    aot_launches=aot_launches,
)
