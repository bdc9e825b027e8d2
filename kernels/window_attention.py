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
  row/column index, the zero padding is a masked load (a padded token reads the q/k/v *bias*,
  which is what Linear gives for the zero-padded layernormed input; zero when there is no bias);
- computes the relative position bias index (dy + w-1) * (2w-1) + (dx + w-1) and the shift region
  of every token from its coordinates, and gathers the bias from the ((2w-1)^2, heads) table: no
  (N, N, heads) bias and no (nW, N, N) mask in memory;
- keeps scores, softmax (online, over key tiles) and the accumulator in fp32;
- writes (B, H, W, C) directly; padded positions are never written.

Limits: inference only (no autograd formula: backward through it raises); CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (tests);
fp32/fp16/bf16 with every tensor but the bias table in x's dtype; head_dim <= 256 (any value,
non-powers of two are padded to the next power of two >= 16 in registers only);
0 <= shift_size < window_size; one image of the (B, H, W, 3C) q/k/v tensor must have < 2**31
elements (int32 offsets inside an image).

Tiling. One program = one (batch, window, head, tile of BLOCK_M query tokens); it loops over the
window's N = w*w keys in tiles of BLOCK_N with an online softmax. Triton blocks are powers of two,
so N is never padded to one: N = 144 (window 12) runs as 9 key tiles of 16 with no padded key
and 3 query tiles of 64 (192 x 144 scores computed per window and head; 256 x 256 tiles would
compute 3.2x the 144 x 144 needed); N = 49 (window 7) needs 64 rows whatever the tiling. The defaults
(``_default_blocks``) are *untuned* (no GPU was available when this was written);
``benchmarks/bench_window_attention.py --sweep`` times the alternatives.
"""
import contextlib
import functools
import math
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# One place for "is triton importable" and "is the interpreter on": maskformer._ext.
from maskformer import _devices
from maskformer._ext import triton_import_error as _triton_import_error
from maskformer._ext import triton_interpret_mode as _interpret_mode
from maskformer.windows import relative_position_index, shift_attention_mask, window_partition, window_reverse

__all__ = ["window_attention", "window_attention_ref", "not_supported_reasons", "check_devices"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# q, the fp32 accumulator (both BLOCK_M x head_dim) and the K/V tiles live in registers. Compiled
# for sm_90 with the default 64 x 16 tiles (bundled ptxas, --aot in the benchmark): head_dim 32 uses
# 147 registers/thread and no stack, 128 spills 16 B, 256 spills 640 B; beyond 256, refuse.
_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _window_attention_eager(
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
    index = relative_position_index(w).to(bias_table.device)
    bias = bias_table[index.view(-1)].view(n, n, num_heads).permute(2, 0, 1).to(x.dtype)  # (heads, N, N)
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
        bias_table: ((2 * window_size - 1) ** 2, num_heads), ``relative_position_bias_table``.
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
    out = _window_attention_eager(
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
    if window_size >= 1 and tuple(bias_table.shape) != ((2 * window_size - 1) ** 2, num_heads):
        reasons.append(
            f"bias_table must be ((2w-1)^2, heads) = {((2 * window_size - 1) ** 2, num_heads)}, "
            f"got {tuple(bias_table.shape)}"
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
    import_error = _triton_import_error()
    if import_error:
        reasons.append(import_error)
    elif not (x.device.type == "cuda" or (x.device.type == "cpu" and _interpret_mode())):
        reasons.append(
            f"x is on {x.device.type}: the Triton kernel runs on CUDA "
            "(or on CPU tensors under TRITON_INTERPRET=1, which is for tests only)"
        )
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
    follows the TRITON_INTERPRET of its first use; ``_launch`` refuses to run it if the setting
    changed since (the helpers below are module globals, so two variants cannot coexist).
    """
    # Triton resolves the names a kernel uses (tl, helper @jit functions) in the kernel function's
    # module globals, not in closures: bind them as module globals here, on first use.
    global triton, tl, _token_coords, _dot, _window_attention_fwd_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _token_coords(t, win_y, win_x, height, width, padded_height, padded_width,
                      WINDOW: tl.constexpr, SHIFT: tl.constexpr):
        """Window token t -> its (row * (2w-1) + col) inside the window (the relative position
        index of tokens i, j is pos_i - pos_j + (w-1) * 2w), (y, x) in the unpadded image, whether
        (y, x) is a real pixel, and its shift region (0..8)."""
        r = t // WINDOW
        c = t % WINDOW
        # Position on the padded map after torch.roll(-SHIFT): rolled[p] = padded[(p + SHIFT) % Hp].
        ry = win_y * WINDOW + r
        rx = win_x * WINDOW + c
        y = ry + SHIFT
        x = rx + SHIFT
        y = tl.where(y >= padded_height, y - padded_height, y)
        x = tl.where(x >= padded_width, x - padded_width, x)
        inside = (y < height) & (x < width)
        # shift_region_ids on the padded, rolled map: per axis [0, n-w), [n-w, n-s), [n-s, n).
        region_y = (ry >= padded_height - WINDOW).to(tl.int32) + (ry >= padded_height - SHIFT).to(tl.int32)
        region_x = (rx >= padded_width - WINDOW).to(tl.int32) + (rx >= padded_width - SHIFT).to(tl.int32)
        return r * (2 * WINDOW - 1) + c, y, x, inside, region_y * 3 + region_x

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
        qkv_ptr, qkv_bias_ptr, table_ptr, out_ptr,
        height, width, padded_height, padded_width,
        windows_per_row, windows_per_image, num_heads, num_m_tiles, channels,
        stride_qkv_b, stride_qkv_h, stride_qkv_w,
        stride_out_b, stride_out_h, stride_out_w,
        qk_scale,
        WINDOW: tl.constexpr, SHIFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        N: tl.constexpr = WINDOW * WINDOW
        LOG2E: tl.constexpr = 1.4426950408889634
        # The -100 of the reference's shift mask, in the log2 domain the softmax runs in.
        MASK_LOG2: tl.constexpr = -100.0 * 1.4426950408889634

        # Query tiles fastest, then heads, then windows: the programs that re-read one window's K/V
        # (all query tiles, all heads share the tokens' 3C rows) run back to back and hit in L2.
        pid = tl.program_id(0)
        m_tile = pid % num_m_tiles
        rest = pid // num_m_tiles
        head = rest % num_heads
        rest = rest // num_heads
        batch = rest // windows_per_image
        win = rest % windows_per_image
        win_y = win // windows_per_row
        win_x = win % windows_per_row

        qkv_base = qkv_ptr + batch.to(tl.int64) * stride_qkv_b
        out_base = out_ptr + batch.to(tl.int64) * stride_out_b
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_col = head * HEAD_DIM + d
        k_col = channels + q_col
        v_col = 2 * channels + q_col

        tq = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tq_ok = tq < N
        pos_q, yq, xq, inside_q, region_q = _token_coords(
            tq, win_y, win_x, height, width, padded_height, padded_width, WINDOW, SHIFT)
        q_rows = yq * stride_qkv_h + xq * stride_qkv_w
        q = tl.load(qkv_base + q_rows[:, None] + q_col[None, :],
                    mask=(inside_q & tq_ok)[:, None] & d_ok[None, :], other=0.0)
        if HAS_QKV_BIAS:
            # A padded token is Linear(0) = bias (x is zero-padded after the layernorm).
            bq = tl.load(qkv_bias_ptr + q_col, mask=d_ok, other=0.0).to(q.dtype)
            bk = tl.load(qkv_bias_ptr + k_col, mask=d_ok, other=0.0).to(q.dtype)
            bv = tl.load(qkv_bias_ptr + v_col, mask=d_ok, other=0.0).to(q.dtype)
            q = tl.where(inside_q[:, None], q, bq[None, :])

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            tk = start_n + tl.arange(0, BLOCK_N)
            tk_ok = tk < N
            pos_k, yk, xk, inside_k, region_k = _token_coords(
                tk, win_y, win_x, height, width, padded_height, padded_width, WINDOW, SHIFT)
            k_rows = yk * stride_qkv_h + xk * stride_qkv_w
            kv_ok = (inside_k & tk_ok)
            # K^T tile (BLOCK_D, BLOCK_N), V tile (BLOCK_N, BLOCK_D), read in place from (B, H, W, 3C).
            kt = tl.load(qkv_base + k_rows[None, :] + k_col[:, None],
                         mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(qkv_base + k_rows[:, None] + v_col[None, :],
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_QKV_BIAS:
                kt = tl.where(inside_k[None, :], kt, bk[:, None])
                v = tl.where(inside_k[:, None], v, bv[None, :])

            # Relative position bias gathered from the ((2w-1)^2, heads) table: 529 x heads entries
            # for w = 12 (6-100 KB at 6-48 heads), read by every program, so it stays in L2.
            # (dy + w-1) * (2w-1) + (dx + w-1) = pos_q - pos_k + (w-1) * 2w.
            rel = pos_q[:, None] - pos_k[None, :] + (WINDOW - 1) * 2 * WINDOW
            pair_ok = tq_ok[:, None] & tk_ok[None, :]
            bias = tl.load(table_ptr + rel * num_heads + head, mask=pair_ok, other=0.0).to(tl.float32)

            s = (_dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale + bias) * LOG2E
            if SHIFT > 0:
                s = tl.where(region_q[:, None] == region_k[None, :], s, s + MASK_LOG2)
            if N % BLOCK_N != 0:
                s = tl.where(tk_ok[None, :], s, float("-inf"))  # keys past N in the last tile

            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
            m_i = m_new

        out = acc / l_i[:, None]
        out_rows = yq * stride_out_h + xq * stride_out_w
        tl.store(out_base + out_rows[:, None] + q_col[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(inside_q & tq_ok)[:, None] & d_ok[None, :])

    return _window_attention_fwd_kernel, bool(triton.knobs.runtime.interpret)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _default_blocks(n: int, head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a window of N = w*w tokens. Untuned guesses (no GPU when
    written): ``benchmarks/bench_window_attention.py --sweep`` measures the alternatives.

    Keys: tiles of 16 when N > 64, so N = 144 is 9 tiles with no padded key (the softmax's exp
    work scales with the keys); N <= 64 in one power-of-two tile (49 -> 64: every tiling pads 49
    to 64). Queries: 64-row tiles (4 warps, one m16 MMA row block each) for N > 32. For N = 144
    that pads 144 rows to 192 (1.33x the exp work) but re-reads each window's K/V 3 times instead
    of 9: at Swin-L stage 1 (640x640, 196 windows x 6 heads, head_dim 32, bf16) ~63 MB of L2
    traffic instead of ~190 MB, against ~43 MB of q/k/v/out HBM traffic.
    """
    pow2 = _pow2_at_least(n)
    block_m = min(64, pow2)
    block_n = 16 if n > 64 else pow2
    return block_m, block_n, max(1, block_m // 16)


def _launch(
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
    compile_only: bool = False,
):
    """Run the attention kernel: qkv (B, H, W, 3C) projected q/k/v (bias included for real pixels),
    qkv_bias (3C,) or None (used for padded tokens), bias_table ((2w-1)^2, heads) -> out (B, H, W, C),
    written in place (any strides with a unit last stride) and returned. The block/warp/stage
    arguments override ``_default_blocks`` (tests, ``--sweep``); None = default.
    ``compile_only``: compile for the active triton target and return the ``CompiledKernel``
    without launching (``benchmarks/aot.py`` calls this with meta tensors: the binary it checks is
    the one a real call of the same shapes launches)."""
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
    d_block, (m_default, n_default, warps_default) = _pow2_at_least(head_dim), _default_blocks(n, head_dim)
    block_m = block_m or m_default
    block_n = block_n or n_default
    num_warps = num_warps or warps_default
    num_m_tiles = -(-n // block_m)
    grid = (b * windows_per_image * num_heads * num_m_tiles,)
    interpret = _interpret_mode()
    kernel, built_interpreted = _build_kernel()
    if interpret != built_interpreted:
        raise RuntimeError(
            f"window_attention: the kernel was built with TRITON_INTERPRET={int(built_interpreted)} and it is now "
            f"{int(interpret)}; triton fixes this when it decorates the kernel, so set it once per process"
        )
    table = bias_table.contiguous()
    bias = qkv_bias.contiguous() if qkv_bias is not None else qkv  # dummy pointer when HAS_QKV_BIAS=False
    # triton launches on the current CUDA device: make it the tensors' one (no-op for cuda:0 / CPU).
    on_device = torch.cuda.device(qkv.device) if qkv.device.type == "cuda" else contextlib.nullcontext()
    launch = kernel.warmup if compile_only else kernel[grid]
    with on_device:
        compiled = launch(
            qkv, bias, table, out,
            height, width, hp, wp,
            windows_per_row, windows_per_image, num_heads, num_m_tiles, c,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            1.0 / math.sqrt(head_dim),
            WINDOW=w, SHIFT=shift_size, HEAD_DIM=head_dim, BLOCK_D=d_block,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_QKV_BIAS=qkv_bias is not None,
            # fp32 inputs: exact fp32 products, not TF32 (10-bit mantissa, ~1e-3 relative error).
            DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
            UPCAST_DOT=interpret and qkv.dtype == torch.bfloat16,
            num_warps=num_warps,
            # Explicit (triton 3.10 turns the default off): a * b + c becomes one FMA (the score
            # scaling, the online-softmax rescale); no result here depends on a rounding order.
            enable_fp_fusion=True,
            **({} if num_stages is None else {"num_stages": num_stages}),
            **({"grid": grid} if compile_only else {}),
        )
    return compiled if compile_only else out


def _window_attention_impl(
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
    return _launch(qkv, qkv_bias, bias_table, out, window_size, shift_size, num_heads, **blocks)


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
    return _window_attention_impl(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)


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
    unpadded, qkv_weight (3C, C), qkv_bias (3C,) or None, bias_table ((2w-1)^2, heads) ->
    (B, H, W, C) in x's dtype, before the output projection. Scores, softmax and accumulation are
    fp32 whatever the dtype; for fp16/bf16 the q/k/v projection and the probabilities fed to the
    P @ V product are in x's dtype (as flash attention). Forward only. Raises ValueError with
    ``not_supported_reasons`` when it cannot run (check those first to fall back to the reference),
    and for tensors on different devices. Tensors all on the meta device give a meta result (the
    op's fake kernel: shape propagation, as torch.compile tracing uses it).
    """
    check_devices(x, qkv_weight, qkv_bias, bias_table)
    return torch.ops.maskformer.window_attention(x, qkv_weight, qkv_bias, bias_table, window_size, shift_size, num_heads)
