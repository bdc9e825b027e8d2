"""Multi-scale deformable attention (Deformable DETR; Mask2Former's pixel decoder).

Each query samples ``P`` points on each of ``L`` feature levels per head, bilinearly, and sums the
samples weighted by its (already softmaxed) attention weights::

    out[b, q, h, :] = sum_{l, p} w[b, q, h, l, p] * bilinear(value_l[b, :, :, h, :], loc[b, q, h, l, p])

``ms_deform_attn_ref`` is the pure-PyTorch reference: one ``grid_sample`` per level, as the paper's
and transformers' PyTorch fallbacks do (bilinear, zero padding, ``align_corners=False``: a location
``(x, y)`` in [0, 1] is the pixel ``(x * W - 0.5, y * H - 0.5)``; samples outside the map read 0).
It materialises a (B*H, D, Q, L*P) tensor of samples: ~80 MB per pixel-decoder layer at 512x683
(Q = S = 6,800 tokens, 8 heads x 32 dims, 12 samples), which is what the fused kernel avoids.

``ms_deform_attn`` (Triton, ``torch.ops.maskformer.ms_deform_attn``) fuses the whole op: one
program per (block of BLOCK_Q queries, head, image) loops over the levels (unrolled) and points,
turns each location into a pixel coordinate in fp32 (``x * w - 0.5``), gathers the 4 bilinear
neighbours' D-vectors straight from ``value`` (a corner outside the map is a masked load that
reads 0: grid_sample's zero padding, decided per corner), weights them by the bilinear weight
times the attention weight and accumulates in a (BLOCK_Q, D) fp32 accumulator; the output is
written once, in value's dtype. No per-level copy of ``value``, no (B*H, D, Q, L*P) samples.
Level shapes are scalar arguments (no tensor built per call, so CUDA-graph capture is safe, and
no recompile per image size); L and P are compile-time constants. Like grid_sample it gives NaN
for a NaN or infinite location and 0 for a finite one far outside the map.

``ms_deform_attn_cpp`` (C++, ``csrc/ms_deform_attn.cpp``, ``torch.ops.maskformer.ms_deform_attn_cpu``
and ``..._cpu_out``; in the optional extension ``maskformer._C``) is the same fusion on CPU: tasks
of (image, head, 64 queries), head-major so the threads share one head's slice of ``value`` in
cache, handed out one at a time (``bilinear.h: parallel_tasks``); per (query, head) a D-vector
accumulator in registers (8-wide, avx2+fma clone; D = 8/16/24/32/64, any other D a plain loop),
4 corner rows of D floats read per sample, the output row written once. Same semantics as the
Triton kernel (fp32 arithmetic, grid_sample's zero padding decided per corner, NaN for a NaN or
infinite location, 0 far outside); fp16/bf16 inputs are converted to fp32 copies first (each value
row is read ~48 times), the output rounded once to value's dtype. Limits: forward only, CPU,
fp32/fp16/bf16 (one dtype for all three), level sides < 2**24 (exact pixel coordinates in fp32).
Measured (``python -m benchmarks.bench_ms_deform_attn``, interleaved reference / C++, 9 rounds;
``benchmarks/results/ms_deform_attn-cpu-2t.md``): one pixel-decoder layer of Swin-T ADE20K at
512x683 (levels 16x22 + 32x43 + 64x86 = 7,232 tokens = queries, 8 heads x 32, 4 points, fp32) on
a 2-core AMD EPYC (avx2, fma, f16c; no AVX-512), 2 torch threads, shared with other jobs (load
average 6.5 at start, 6.3 at end): reference 373 ms median (354-380), C++ 22.8 ms (21.3-27.9),
paired ratio 16.6x median (12.7x-17.3x). One thread (7 rounds, load ~5.5): 299 ms vs 23.2 ms,
12.6x; under that load the second core was busy with another process, so two threads did not
beat one (user CPU time per call equalled wall time). ``bench_ops.py`` at 512x512 (5,376 tokens):
C++ 15.9 ms median vs reference 326 ms and transformers' function 284 ms. The six calls of a
512x683 forward thus drop from ~2.2 s to ~0.14 s on this machine under this load.

Limits of the Triton kernel: forward only (inference; inputs that require grad under grad mode
are refused); CUDA, or CPU tensors under TRITON_INTERPRET=1 (tests); value, sampling_locations and attention_weights of
one dtype, fp32/fp16/bf16 (fp32 arithmetic and accumulation for all); head_dim 1..256 (any value:
padded to a power of two in registers only); 1..4 levels; 1..16 points per level; one image's
value, locations and output each < 2**31 elements (int32 offsets inside an image). Not bit-equal
to the reference (its grid coordinate goes through ``2x - 1`` and back, and it sums in value's
dtype): tests/kernels/test_ms_deform_attn.py bounds the difference by the reference's own error.

Compiled figures (``python -m benchmarks.aot``, CI set: triton 3.9, bundled ptxas 12.9 for sm_80
and 13.4 for sm_90; Swin-T ADE20K at 512x512: levels 16x16, 32x32, 64x64 = 5376 tokens, Q = S,
B=1, H=8, D=32, P=4; BLOCK_Q=64, 4 warps): registers / spill bytes (stores/loads) / occupancy.

| version | sm_80 fp32 | sm_80 fp16 | sm_80 bf16 | sm_90 fp32 | sm_90 fp16 | sm_90 bf16 |
|---|---|---|---|---|---|---|
| points unrolled too (``static_range``) | 108 / 0 / 25% | 63 / 0 / 50% | 62 / 0 / 50% | 255 / 160+168 / 12.5% | 180 / 0 / 12.5% | 188 / 0 / 12.5% |
| kept: levels unrolled, points a loop | 80 / 0 / 38% | 66 / 0 / 44% | 72 / 0 / 44% | 94 / 0 / 31% | 72 / 0 / 44% | 72 / 0 / 44% |

Unrolling the 48 (level, point) gathers let sm_90's ptxas hoist them all: fp32 spilled. Other
head dims (same levels, fp32 / bf16, sm_80 and sm_90): D=24 (padded to 32) 86-96 / 68-72
registers, D=64 80-89 / 72, D=128 (BLOCK_Q 16) 80 / 66-71, D=256 (BLOCK_Q 16, 8 warps) 80-114 /
64-72, no spills except 4 bytes (stores and loads) for bf16 at D=24 on sm_90 and D=256 on sm_80;
4 levels or 16 points: 80-94 registers, no spills. Static SASS instructions of the kept version
(fp32 / fp16 / bf16): 1381 / 1057 / 1149 on sm_80, 1370 / 1086 / 1177 on sm_90
(``benchmarks/results/aot-ci.md``). Not timed: there was no GPU.
"""
import contextlib
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from maskformer import _devices, _ext
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, IMAGES, AOTLaunch, Impl, Op, triton_reasons

__all__ = ["OP", "ms_deform_attn", "ms_deform_attn_cpp", "ms_deform_attn_ref", "check_args", "check_ms_deform_attn_args",
           "not_supported_reasons", "cpp_not_supported_reasons", "launch", "default_blocks", "levels_for_input",
           "aot_launches"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # see the header: the compiled figures behind it
_MAX_LEVELS = 4  # Mask2Former uses 3, Deformable DETR 4
_MAX_POINTS = 16  # the point loop is unrolled: 4 corner gathers per point and level


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


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def _shape_reasons(value, spatial_shapes, sampling_locations, attention_weights) -> List[str]:
    """The reference's own argument checks, as reasons (what makes the call meaningless anywhere)."""
    try:
        check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)
    except (ValueError, TypeError) as exc:
        return [str(exc).removeprefix("ms_deform_attn: ")]
    return []


def _common_reasons(value, spatial_shapes, sampling_locations, attention_weights) -> List[str]:
    """What both kernels (Triton and C++) require: well-formed shapes, one device, one dtype
    among fp32/fp16/bf16."""
    reasons = _shape_reasons(value, spatial_shapes, sampling_locations, attention_weights)
    tensors = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        reasons.append(f"tensors are on different devices: {devices}")
    if value.dtype not in _KERNEL_DTYPES:
        reasons.append(f"value dtype {value.dtype} is not supported (fp32, fp16, bf16)")
    for name in ("sampling_locations", "attention_weights"):
        if tensors[name].dtype != value.dtype:
            # the reference's grid_sample refuses a grid of another dtype than its input; one dtype
            # for all three keeps "what the kernel accepts" inside "what the reference computes"
            reasons.append(f"{name} is {tensors[name].dtype} but value is {value.dtype}: one dtype for all three")
    return reasons


def _grad_reasons(value, sampling_locations, attention_weights) -> List[str]:
    """Both kernels are forward-only: inputs that require grad under grad mode are refused."""
    if not torch.is_grad_enabled():
        return []
    needing = [name for name, t in (("value", value), ("sampling_locations", sampling_locations),
                                    ("attention_weights", attention_weights)) if t.requires_grad]
    return [f"{', '.join(needing)} require grad: the kernel is forward-only (no backward)"] if needing else []


def _kernel_reasons(value, spatial_shapes, sampling_locations, attention_weights) -> List[str]:
    """Everything but autograd: what the Triton op's implementation checks before launching."""
    reasons = _common_reasons(value, spatial_shapes, sampling_locations, attention_weights)
    reasons += triton_reasons(value, "value is")
    if reasons:
        return reasons
    b, s, nh, d = value.shape
    _, q, _, nl, p, _ = sampling_locations.shape
    if not 1 <= d <= _MAX_HEAD_DIM:
        reasons.append(f"head_dim={d} is outside [1, {_MAX_HEAD_DIM}]: the (BLOCK_Q, head_dim) fp32 accumulator "
                       "and four gathered corners live in registers")
    if nl > _MAX_LEVELS:
        reasons.append(f"{nl} levels > {_MAX_LEVELS}: the level shapes are {_MAX_LEVELS} pairs of scalar arguments")
    if p > _MAX_POINTS:
        reasons.append(f"{p} points per level > {_MAX_POINTS}: the point loop is unrolled")
    for what, n in (("value", s * nh * d), ("sampling_locations", q * nh * nl * p * 2), ("output", q * nh * d)):
        if n >= 2**31:
            reasons.append(f"one image's {what} has {n} >= 2**31 elements: offsets are int32 within an image")
    return reasons


def not_supported_reasons(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> List[str]:
    """Why the Triton ``ms_deform_attn`` cannot serve these arguments; [] when it can.

    Same arguments as ``ms_deform_attn_ref``. Human-readable reasons: shapes, triton missing,
    device (CUDA, or CPU only under TRITON_INTERPRET=1), dtypes (fp32/fp16/bf16, one for all three
    tensors), head_dim, levels, points, int32 offsets, and autograd (forward only: inputs that
    require grad under grad mode are refused).
    """
    return (_kernel_reasons(value, spatial_shapes, sampling_locations, attention_weights)
            + _grad_reasons(value, sampling_locations, attention_weights))


def _cpp_kernel_reasons(value, spatial_shapes, sampling_locations, attention_weights) -> List[str]:
    """Everything but autograd: what ``ms_deform_attn_cpp`` checks before calling the C++ op."""
    reasons = _common_reasons(value, spatial_shapes, sampling_locations, attention_weights)
    if not reasons:  # well-formed shapes
        big = [(int(h), int(w)) for h, w in spatial_shapes if max(int(h), int(w)) >= 2**24]
        if big:
            reasons.append(f"level sides must be < 2**24 (pixel coordinates exact in fp32), got {big}")
    reasons += _ext.cpp_missing_ops("ms_deform_attn_cpu")
    if value.device.type != "cpu":
        reasons.append(f"value is on {value.device}: the C++ kernel is CPU-only")
    return reasons


def cpp_not_supported_reasons(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> List[str]:
    """Why the C++ ``ms_deform_attn_cpp`` cannot serve these arguments; [] when it can.

    Same arguments as ``ms_deform_attn_ref``. Reasons: shapes, the extension not built (and why its
    import failed) or built without the op, device (CPU only), dtypes (fp32/fp16/bf16, one for all
    three tensors), level sides >= 2**24, and autograd (forward only).
    """
    return (_cpp_kernel_reasons(value, spatial_shapes, sampling_locations, attention_weights)
            + _grad_reasons(value, sampling_locations, attention_weights))


# ---------------------------------------------------------------------------------------------
# Triton kernel (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """(kernel, interpreted): the @triton.jit kernel, built once per process on first use.
    triton.jit decides at decoration time whether it is interpreted, so TRITON_INTERPRET must be
    set before the first call. Triton resolves names (tl, helpers) in the kernel's module globals,
    hence the ``global``."""
    global triton, tl, _level_shape, _gather_corner, _ms_deform_attn_fwd_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _level_shape(level: tl.constexpr, h0, w0, h1, w1, h2, w2, h3, w3):
        """(height, width) of a level: the level is a compile-time constant, so this is a choice
        among scalar arguments, not a load."""
        if level == 0:
            return h0, w0
        elif level == 1:
            return h1, w1
        elif level == 2:
            return h2, w2
        else:
            return h3, w3

    @triton.jit
    def _gather_corner(value_bh, level_start, xc, yc, width, height, weight, offs_d, d_ok,
                       ROW_STRIDE: tl.constexpr):
        """weight[:, None] * value[level_start + yc * width + xc, :] for one bilinear corner of
        BLOCK_Q sample points, 0 where the corner is outside the map (grid_sample's zero padding).
        xc, yc: fp32 integral corner coordinates (floor of the pixel coordinate, or that + 1)."""
        inside = (xc >= 0) & (xc < width) & (yc >= 0) & (yc < height)  # false for NaN too
        # Outside corners index token 0 (any float -> int cast of a far point would be undefined);
        # their load is masked off and reads 0, their weight still multiplies it (a NaN weight
        # gives NaN, as grid_sample does for NaN or infinite locations).
        token = level_start + tl.where(inside, yc * width + xc, 0.0).to(tl.int32)
        v = tl.load(value_bh + token[:, None] * ROW_STRIDE + offs_d[None, :], mask=inside[:, None] & d_ok[None, :],
                    other=0.0)
        return weight[:, None] * v.to(tl.float32)

    @triton.jit
    def _ms_deform_attn_fwd_kernel(
        value_ptr, loc_ptr, weight_ptr, out_ptr,
        num_tokens, num_queries,
        h0, w0, h1, w1, h2, w2, h3, w3,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        """out[b, q, h*D:(h+1)*D] = sum_{l,p} w[b,q,h,l,p] * bilinear(value level l, head h; loc[b,q,h,l,p]);
        grid (cdiv(Q, BLOCK_Q), H, B); value (B, S, H, D), loc (B, Q, H, L, P, 2), w (B, Q, H, L, P),
        out (B, Q, H*D), all contiguous. Offsets inside an image are int32, the image's base int64."""
        pid_q = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        LP: tl.constexpr = NUM_LEVELS * NUM_POINTS
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q_ok = offs_q < num_queries
        d_ok = offs_d < HEAD_DIM
        value_bh = value_ptr + batch * num_tokens * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
        weight_rows = weight_ptr + batch * num_queries * (NUM_HEADS * LP) + offs_q * (NUM_HEADS * LP) + head * LP
        loc_rows = loc_ptr + batch * num_queries * (NUM_HEADS * LP * 2) + offs_q * (NUM_HEADS * LP * 2) + head * LP * 2
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        level_start = 0
        for level in tl.static_range(NUM_LEVELS):
            height, width = _level_shape(level, h0, w0, h1, w1, h2, w2, h3, w3)
            width_f = width.to(tl.float32)
            height_f = height.to(tl.float32)
            for point in range(NUM_POINTS):
                k = level * NUM_POINTS + point
                x = tl.load(loc_rows + 2 * k, mask=q_ok, other=0.0).to(tl.float32)
                y = tl.load(loc_rows + 2 * k + 1, mask=q_ok, other=0.0).to(tl.float32)
                a = tl.load(weight_rows + k, mask=q_ok, other=0.0).to(tl.float32)
                # align_corners=False: location 0 is the left edge of pixel 0, i.e. pixel -0.5
                px = x * width_f - 0.5
                py = y * height_f - 0.5
                x0 = tl.floor(px)
                y0 = tl.floor(py)
                fx = px - x0
                fy = py - y0
                # grid_sample's weights: nw = (1-fx)(1-fy), ne = fx(1-fy), sw = (1-fx)fy, se = fx fy
                wy0 = a * (1.0 - fy)
                wy1 = a * fy
                acc += _gather_corner(value_bh, level_start, x0, y0, width_f, height_f, wy0 * (1.0 - fx),
                                      offs_d, d_ok, NUM_HEADS * HEAD_DIM)
                acc += _gather_corner(value_bh, level_start, x0 + 1.0, y0, width_f, height_f, wy0 * fx,
                                      offs_d, d_ok, NUM_HEADS * HEAD_DIM)
                acc += _gather_corner(value_bh, level_start, x0, y0 + 1.0, width_f, height_f, wy1 * (1.0 - fx),
                                      offs_d, d_ok, NUM_HEADS * HEAD_DIM)
                acc += _gather_corner(value_bh, level_start, x0 + 1.0, y0 + 1.0, width_f, height_f, wy1 * fx,
                                      offs_d, d_ok, NUM_HEADS * HEAD_DIM)
            level_start += height * width
        out_rows = out_ptr + batch * num_queries * (NUM_HEADS * HEAD_DIM) + offs_q * (NUM_HEADS * HEAD_DIM)
        tl.store(out_rows[:, None] + head * HEAD_DIM + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & d_ok[None, :])

    return _ms_deform_attn_fwd_kernel, bool(triton.knobs.runtime.interpret)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_blocks(head_dim: int) -> Tuple[int, int]:
    """(BLOCK_Q, num_warps): a (BLOCK_Q, BLOCK_D) fp32 accumulator of at most 2048 elements
    (16 per thread over 4 warps) plus a gathered corner of the same size in registers; see the
    module docstring for the compiled figures. Untuned (no GPU when written)."""
    block_d = _pow2_at_least(head_dim)
    return max(16, min(64, 2048 // block_d)), 4 if block_d <= 128 else 8


def launch(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor, out: torch.Tensor, compile_only: bool = False,
            blocks: Optional[Tuple[int, int]] = None):
    """Run the kernel: value (B, S, H, D), L (h, w) pairs, sampling_locations (B, Q, H, L, P, 2),
    attention_weights (B, Q, H, L, P) -> out (B, Q, H*D) contiguous in value's dtype, written and
    returned. ``blocks`` (BLOCK_Q, num_warps) overrides ``default_blocks`` (tests, sweeps).
    ``compile_only``: compile for the active triton target and return the ``CompiledKernel``
    without launching (``benchmarks/aot.py``, with meta tensors)."""
    b, s, nh, d = value.shape
    _, q, _, nl, p, _ = sampling_locations.shape
    if tuple(out.shape) != (b, q, nh * d) or not out.is_contiguous():
        raise ValueError(f"ms_deform_attn: out must be contiguous {(b, q, nh * d)}, got {tuple(out.shape)}")
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    kernel, built_interpreted = _build_kernel()
    interpret = _ext.triton_interpret_mode()
    if interpret != built_interpreted:
        raise RuntimeError(
            f"ms_deform_attn: the kernel was built with TRITON_INTERPRET={int(built_interpreted)} and it is now "
            f"{int(interpret)}; triton fixes this when it decorates the kernel, so set it once per process")
    # Level shapes as scalar arguments, not a tensor: no host-to-device copy per call (which
    # CUDA-graph capture would refuse) and no recompile per image size (triton specialises an
    # integer only on == 1 and divisibility by 16).
    flat = [v for hw in spatial_shapes for v in (int(hw[0]), int(hw[1]))]
    flat += [1] * (2 * _MAX_LEVELS - len(flat))
    block_q, num_warps = blocks or default_blocks(d)
    grid = (triton.cdiv(q, block_q), nh, b)
    args = (value, sampling_locations, attention_weights, out, s, q, *flat)
    # enable_fp_fusion explicit (triton 3.10 turns the default off): the corner weights and the
    # accumulation may fuse into FMAs; the parity bar allows either rounding.
    meta = dict(NUM_HEADS=nh, HEAD_DIM=d, BLOCK_D=_pow2_at_least(d), NUM_LEVELS=nl, NUM_POINTS=p, BLOCK_Q=block_q,
                num_warps=num_warps, enable_fp_fusion=True)
    if compile_only:
        return kernel.warmup(*args, grid=grid, **meta)
    if not out.numel():
        return out
    if interpret and out.dtype == torch.bfloat16:
        # Interpreter only: its fp32 -> bf16 cast truncates (triton 3.9's _convert_float rounds to
        # nearest only when asked, and .to() does not ask) where the GPU's cvt rounds to nearest
        # even; torch does that rounding here so the tests see the compiled kernel's numbers.
        staged = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        kernel[grid](*args[:3], staged, *args[4:], **meta)
        return out.copy_(staged)
    on_device = torch.cuda.device(value.device) if value.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        kernel[grid](*args, **meta)
    return out


def _pairs(flat_shapes: Sequence[int]) -> List[Tuple[int, int]]:
    if len(flat_shapes) % 2:
        raise ValueError(f"ms_deform_attn: flattened spatial_shapes need an even length, got {list(flat_shapes)}")
    return [(int(flat_shapes[i]), int(flat_shapes[i + 1])) for i in range(0, len(flat_shapes), 2)]


# custom_op rather than triton_op: ``triton_op`` imports triton when it decorates, which importing
# this module must not do (see kernels/window_attention.py). spatial_shapes travel flattened
# (h0, w0, h1, w1, ...): a schema has int[], not a list of pairs.
@torch.library.custom_op("maskformer::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: torch.Tensor, spatial_shapes: List[int], sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor) -> torch.Tensor:
    shapes = _pairs(spatial_shapes)
    reasons = _kernel_reasons(value, shapes, sampling_locations, attention_weights)
    if reasons:
        raise ValueError("maskformer::ms_deform_attn (Triton) cannot run: " + "; ".join(reasons))
    b, _, nh, d = value.shape
    out = value.new_empty((b, sampling_locations.shape[1], nh * d))
    return launch(value, shapes, sampling_locations, attention_weights, out)


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, sampling_locations, attention_weights):
    _check_devices(value, sampling_locations, attention_weights)
    check_ms_deform_attn_args(value, _pairs(spatial_shapes), sampling_locations, attention_weights)
    b, _, nh, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], nh * d))


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Fused multi-scale deformable attention (Triton), ``torch.ops.maskformer.ms_deform_attn``.

    Args and result as ``ms_deform_attn_ref``: value (B, S, H, D), L (h, w) pairs of ints,
    sampling_locations (B, Q, H, L, P, 2) (x, y) in [0, 1], attention_weights (B, Q, H, L, P), one
    dtype (fp32/fp16/bf16) -> (B, Q, H*D) in that dtype; fp32 arithmetic and accumulation whatever
    the dtype. Forward only. Raises ValueError with ``not_supported_reasons`` when it cannot run
    (and for malformed shapes or tensors on different devices). Tensors all on the meta device give
    a meta result (the fake kernel: shape propagation).
    """
    _check_devices(value, sampling_locations, attention_weights)
    shapes = check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)
    flat = [v for hw in shapes for v in hw]
    return torch.ops.maskformer.ms_deform_attn(value, flat, sampling_locations, attention_weights)


def _check_devices(value, sampling_locations, attention_weights) -> None:
    _devices.check_same_device("ms_deform_attn", value=value, sampling_locations=sampling_locations,
                               attention_weights=attention_weights)


def check_args(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: torch.Tensor,
               attention_weights: torch.Tensor) -> None:
    """The op's argument check: the three tensors on one device, then the shapes
    (``check_ms_deform_attn_args``); ValueError naming the problem."""
    _check_devices(value, sampling_locations, attention_weights)
    check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)


# ---------------------------------------------------------------------------------------------
# C++ kernel (csrc/ms_deform_attn.cpp, the optional extension maskformer._C)
# ---------------------------------------------------------------------------------------------


def ms_deform_attn_cpp(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused multi-scale deformable attention on CPU (C++), ``torch.ops.maskformer.ms_deform_attn_cpu``.

    Args and result as ``ms_deform_attn_ref``: value (B, S, H, D), L (h, w) pairs of ints,
    sampling_locations (B, Q, H, L, P, 2) (x, y) in [0, 1], attention_weights (B, Q, H, L, P), one
    dtype (fp32/fp16/bf16), CPU tensors -> (B, Q, H*D) in that dtype; fp32 arithmetic and
    accumulation whatever the dtype (fp16/bf16 inputs are converted to fp32 copies first).
    Forward only. ``out``: a contiguous (B, Q, H*D) CPU tensor of value's dtype to write into and
    return (the op ``ms_deform_attn_cpu_out``). Raises ValueError with ``cpp_not_supported_reasons``
    when it cannot run.
    """
    _check_devices(value, sampling_locations, attention_weights)
    shapes = check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)
    reasons = cpp_not_supported_reasons(value, shapes, sampling_locations, attention_weights)
    if reasons:
        raise ValueError("maskformer::ms_deform_attn_cpu (C++) cannot run: " + "; ".join(reasons))
    flat = [v for hw in shapes for v in hw]
    if out is None:
        return torch.ops.maskformer.ms_deform_attn_cpu(value, flat, sampling_locations, attention_weights)
    _devices.check_same_device("ms_deform_attn_cpp", value=value, out=out)
    return torch.ops.maskformer.ms_deform_attn_cpu_out(value, flat, sampling_locations, attention_weights, out)


# ---------------------------------------------------------------------------------------------
# Fakes of the C++ ops, ahead-of-time launches, the op's declaration
# ---------------------------------------------------------------------------------------------


def _ms_deform_attn_cpu_fake(value, spatial_shapes, sampling_locations, attention_weights):
    """Fake (and Meta) kernel of the C++ ``maskformer::ms_deform_attn_cpu``."""
    _devices.check_same_device("maskformer::ms_deform_attn_cpu", value=value, sampling_locations=sampling_locations,
                               attention_weights=attention_weights)
    b, _, nh, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], nh * d))


def _ms_deform_attn_cpu_out_fake(value, spatial_shapes, sampling_locations, attention_weights, out):
    """Fake (and Meta) kernel of the C++ ``maskformer::ms_deform_attn_cpu_out``: writes ``out``."""
    _devices.check_same_device("maskformer::ms_deform_attn_cpu_out", value=value, sampling_locations=sampling_locations,
                               attention_weights=attention_weights, out=out)
    return out


# Mask2Former's pixel decoder: the backbone's strides 8, 16 and 32 as three levels (every input is
# padded to a multiple of 32 by the processor), 8 heads of 32 dims (d_model 256), 4 points per level,
# every token a query (the encoder's self-attention: Q = S).
AOT_HEADS, AOT_HEAD_DIM, AOT_POINTS = 8, 32, 4


def levels_for_input(height: int, width: int) -> List[Tuple[int, int]]:
    """The pixel decoder's level shapes for an input: strides 32, 16, 8 ordered as transformers'
    Mask2FormerPixelDecoder feeds them (lowest resolution first)."""
    return [(-(-height // s), -(-width // s)) for s in (32, 16, 8)]


def _aot_launch(batch: int, levels: List[Tuple[int, int]], heads: int, head_dim: int, points: int,
                dtype: str) -> AOTLaunch:
    dt = getattr(torch, dtype)
    tokens = sum(h * w for h, w in levels)

    def compile_():
        value = torch.empty(batch, tokens, heads, head_dim, device="meta", dtype=dt)
        loc = torch.empty(batch, tokens, heads, len(levels), points, 2, device="meta", dtype=dt)
        weights = torch.empty(batch, tokens, heads, len(levels), points, device="meta", dtype=dt)
        out = torch.empty(batch, tokens, heads * head_dim, device="meta", dtype=dt)
        return launch(value, levels, loc, weights, out, compile_only=True)

    config = dict(B=batch, levels="+".join(f"{h}x{w}" for h, w in levels), heads=heads, D=head_dim, P=points,
                  dtype=DTYPE_LABELS[dtype])
    return AOTLaunch("ms_deform_attn", config, compile_, tensor_cores=False)


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles: Mask2Former's pixel decoder (``AOT_HEADS`` heads
    of ``AOT_HEAD_DIM``, 3 levels at strides 32/16/8, ``AOT_POINTS`` points, Q = S). Full: at each
    input size (``IMAGES``), batch 1 and 8, each dtype. CI: Swin-T ADE20K at 512x512 (levels 16x16,
    32x32, 64x64: 5376 tokens), batch 1, each dtype."""
    shapes = [(image, batch) for image in IMAGES for batch in (1, 8)] if full else [((512, 512), 1)]
    return [_aot_launch(batch, levels_for_input(*image), AOT_HEADS, AOT_HEAD_DIM, AOT_POINTS, dtype)
            for image, batch in shapes for dtype in AOT_DTYPES]


OP = Op(
    name="ms_deform_attn",
    reference=ms_deform_attn_ref,
    check=check_args,
    description="Mask2Former's multi-scale deformable attention (pixel decoder): (B, S, H, D) values sampled at "
                "(B, Q, H, L, P, 2) locations -> (B, Q, H*D), fused without the (B*H, D, Q, L*P) samples",
    role="network",
    tasks=("semantic", "instance", "panoptic"),
    models=("mask2former",),
    impls=(
        Impl("triton", ms_deform_attn, devices=("cuda",), dtypes=_KERNEL_DTYPES, reasons=not_supported_reasons),
        Impl("cpp", ms_deform_attn_cpp, devices=("cpu",), dtypes=_KERNEL_DTYPES, reasons=cpp_not_supported_reasons),
    ),
    fakes={"maskformer::ms_deform_attn_cpu": _ms_deform_attn_cpu_fake,
           "maskformer::ms_deform_attn_cpu_out": _ms_deform_attn_cpu_out_fake},
    aot_launches=aot_launches,
)
