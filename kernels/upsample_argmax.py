"""Bilinear upsampling fused with the argmax over classes: label maps without (K, H, W) scores.

transformers ends ``post_process_semantic_segmentation`` with, per image::

    resized = F.interpolate(scores[i][None], size=(H, W), mode="bilinear", align_corners=False)
    labels = resized[0].argmax(dim=0)          # (H, W) int64

``upsample_argmax_ref`` is exactly that: it materialises the (K, H, W) fp32 scores (327 MiB for
K=150 at 640x853). The kernels compute, for every output pixel and class, the interpolated value
from the 4 source taps and keep a running argmax, so only the (H, W) labels are ever written:

* ``upsample_argmax`` (Triton): one program per BLOCK output pixels, a loop over classes.
* ``upsample_argmax_cpp`` (``csrc/semantic.cpp``): the same values on CPU, plus candidate pruning
  (a class whose 4 taps are all below another class's 4 taps cannot win in that source cell).

Identical labels, not just close ones. At a region boundary two classes' upsampled scores cross
between output pixels, so an ulp of difference in the interpolated values flips pixels. The
kernels therefore reproduce PyTorch's arithmetic bit for bit (ATen/native/UpSample.h and
native/cpu/UpSampleKernel.cpp in torch 2.13):

* source index ``scale * (i + 0.5) - 0.5`` with ``scale = float(in) / float(out)``, clamped at 0;
  ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = clamp(src - i0, 0, 1)``,
  ``l0 = 1 - l1``; identity when ``in == out``;
* generic kernel: ``t_r = x[r][i0]*lw0 + x[r][i1]*lw1`` then ``t_h0*lh0 + t_h1*lh1``;
* channels-last kernel, which aten picks when ``H + W <= 128``, for a 1x1 mask with K > 3, and for
  K == 3 on one thread: ``w00 = lh0*lw0`` ... and a per-class summation order that depends on
  whether the class sits in a full SIMD vector (see ``csrc/semantic.cpp``);
* aten is compiled with FMA contraction on AVX2/AVX512 machines (``a*b + c*d`` becomes
  ``fma(a, b, c*d)``) and without it on the DEFAULT capability. ``torch_cpu_bilinear_rounding()``
  finds out which at runtime by comparing ``F.interpolate`` on probe inputs with an emulation of
  each variant. On CUDA the kernel uses the fma variant of the generic formula, which is what
  nvcc's default contraction makes of aten's CUDA kernel (not verified on a GPU: none was
  available when this was written).

fp16/bf16 scores are upcast to fp32, like the reference (which interpolates the fp32 upcast).
Labels are int64 by default; int32, int16 and uint8 on request when K fits. Ties: first index, NaN
wins (torch.argmax).
"""
import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from maskformer import _ext

__all__ = [
    "upsample_argmax",
    "upsample_argmax_ref",
    "upsample_argmax_cpp",
    "not_supported_reasons",
    "cpp_not_supported_reasons",
    "BilinearRounding",
    "torch_cpu_bilinear_rounding",
    "torch_cpu_uses_channels_last",
    "bilinear_resize_emulated",
    "OUT_DTYPES",
]

OUT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_MAX_LABEL = {torch.int64: 2**63 - 1, torch.int32: 2**31 - 1, torch.int16: 2**15 - 1, torch.uint8: 255}
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Size = Tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _images_and_sizes(scores: torch.Tensor, target_sizes) -> Tuple[List[torch.Tensor], List[Optional[Size]], bool]:
    """(per-image (K, h, w) views, per-image target size or None, batched?). Raises ValueError."""
    if scores.dim() == 3:
        images, batched = [scores], False
        sizes = [None if target_sizes is None else _as_size(target_sizes)]
    elif scores.dim() == 4:
        images, batched = list(scores.unbind(0)), True
        if target_sizes is None:
            sizes = [None] * len(images)
        else:
            sizes = [_as_size(s) for s in target_sizes]
            if len(sizes) != len(images):
                raise ValueError(f"{len(sizes)} target sizes for a batch of {len(images)} score maps")
    else:
        raise ValueError(f"scores must be (K, h, w) or (B, K, h, w), got {tuple(scores.shape)}")
    if scores.shape[-3] < 1 or scores.shape[-2] < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have K, h, w >= 1, got {tuple(scores.shape)}")
    return images, sizes, batched


def _as_size(size) -> Size:
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    try:
        hh, ww = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"a target size must be a (height, width) pair, got {size!r}") from None
    if hh < 1 or ww < 1:
        raise ValueError(f"target size must be positive, got {(hh, ww)}")
    return hh, ww


def _check_out_dtype(out_dtype: torch.dtype, num_classes: int) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    if num_classes - 1 > _MAX_LABEL[out_dtype]:
        raise ValueError(f"out_dtype {out_dtype} cannot hold class index {num_classes - 1}")


def _outputs(images, sizes, out_dtype, out, batched) -> List[torch.Tensor]:
    """Allocate (or check the caller's) label maps, one per image."""
    shapes = [tuple(s) if s is not None else tuple(img.shape[1:]) for img, s in zip(images, sizes)]
    if out is None:
        return [torch.empty(shape, dtype=out_dtype, device=img.device) for shape, img in zip(shapes, images)]
    outs = list(out) if batched else [out]
    if len(outs) != len(images):
        raise ValueError(f"out has {len(outs)} maps for {len(images)} images")
    for o, shape, img in zip(outs, shapes, images):
        if tuple(o.shape) != shape or o.dtype != out_dtype or not o.is_contiguous() or o.device != img.device:
            raise ValueError(
                f"out map must be a contiguous {shape} {out_dtype} tensor on {img.device}, "
                f"got {tuple(o.shape)} {o.dtype} on {o.device}"
            )
    return outs


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def upsample_argmax_ref(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Reference upsample + argmax: transformers' per-image ``F.interpolate`` then ``argmax``.

    Args:
        scores: (K, h, w) or (B, K, h, w) float class scores (fp16/bf16 are upcast to fp32).
        target_sizes: for (K, h, w) one (H, W) pair or None; for (B, K, h, w) B pairs or None.
            None: no resize, labels at (h, w) (transformers' ``target_sizes=None`` branch).
        out_dtype: int64 (default, as transformers), int32, int16 or uint8 (must hold K - 1).
        out: optional preallocated label map(s), contiguous, of the result's shape and dtype.

    Returns:
        (H, W) labels for (K, h, w) input, a list of B (H_b, W_b) maps for batched input. Ties go to
        the lowest class index, NaN wins (torch.argmax).
    """
    images, sizes, batched = _images_and_sizes(scores, target_sizes)
    _check_out_dtype(out_dtype, scores.shape[-3])
    outs = _outputs(images, sizes, out_dtype, out, batched)
    for img, size, o in zip(images, sizes, outs):
        img = img.float() if img.dtype in (torch.float16, torch.bfloat16) else img
        if size is None:
            labels = img.argmax(dim=0)
        else:
            labels = F.interpolate(img.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)
        o.copy_(labels)
    return outs if batched else outs[0]


# ---------------------------------------------------------------------------------------------
# PyTorch's rounding, emulated and calibrated
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BilinearRounding:
    """Which arithmetic PyTorch's bilinear kernel uses on this device.

    fma: products contracted into fma (aten CPU built for AVX2/AVX512, and CUDA).
    channels_last_vec: SIMD width (floats) of aten's channels-last CPU kernel; 0 on CUDA.
    verified: the emulation matched F.interpolate bit for bit on the probes.
    detail: how it was decided.
    """

    fma: bool
    channels_last_vec: int
    verified: bool
    detail: str


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma emulated in fp64: a*b is exact in fp64 (24+24 bits); the sum is rounded to fp64
    and then fp32, which can differ from one rounding in ~2^-29 of cases (calibration only)."""
    return (a.double() * b.double() + c.double()).float()


def _axis(n_in: int, n_out: int, fma: bool):
    """aten's (i0, i1, l0, l1) for one axis, exactly (scale * (i + 0.5) has <= 38 bits, so the
    fp64 fma below rounds once)."""
    if n_in == n_out:
        i = torch.arange(n_out)
        return i, i, torch.ones(n_out), torch.zeros(n_out)
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    di = torch.arange(n_out, dtype=torch.float32) + 0.5
    if fma:
        src = _fma32(scale.expand_as(di), di, torch.full_like(di, -0.5))
    else:
        src = scale * di - 0.5
    src = torch.where(src < 0, torch.zeros_like(src), src)
    i0 = torch.clamp(torch.floor(src).long(), max=n_in - 1)
    l1 = torch.clamp(src - i0.float(), 0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - l1, l1


def bilinear_resize_emulated(x: torch.Tensor, size: Size, fma: bool, channels_last_vec: int = 0) -> torch.Tensor:
    """aten's bilinear resize (align_corners=False) of (C, h, w) fp32 -> (C, H, W), emulated in
    PyTorch with an explicit operation order. ``channels_last_vec`` > 0 selects the channels-last
    kernel's order for that SIMD width. For calibration and tests; slow and memory-hungry."""
    x = x.float()
    c = x.shape[0]
    hh, ww = size
    a0, a1, h0, h1 = _axis(x.shape[1], hh, fma)
    b0, b1, w0, w1 = _axis(x.shape[2], ww, fma)
    r0, r1 = x[:, a0], x[:, a1]
    x00, x01, x10, x11 = r0[:, :, b0], r0[:, :, b1], r1[:, :, b0], r1[:, :, b1]
    if channels_last_vec:
        w00, w01 = (h0[:, None] * w0[None, :]).expand_as(x00), (h0[:, None] * w1[None, :]).expand_as(x00)
        w10, w11 = (h1[:, None] * w0[None, :]).expand_as(x00), (h1[:, None] * w1[None, :]).expand_as(x00)
        if fma:
            vec = _fma32(x00, w00, _fma32(x01, w01, _fma32(x11, w11, x10 * w10)))
            tail = _fma32(x11, w11, _fma32(x10, w10, _fma32(x00, w00, x01 * w01)))
        else:
            vec = x00 * w00 + (x01 * w01 + (x10 * w10 + x11 * w11))
            tail = ((x00 * w00 + x01 * w01) + x10 * w10) + x11 * w11
        full = c - c % channels_last_vec
        return torch.cat([vec[:full], tail[full:]])
    H0, H1 = h0[:, None].expand(hh, ww), h1[:, None].expand(hh, ww)
    W0, W1 = w0[None, :].expand(hh, ww), w1[None, :].expand(hh, ww)
    if fma:
        t0 = _fma32(x00, W0.expand_as(x00), x01 * W1)
        t1 = _fma32(x10, W0.expand_as(x10), x11 * W1)
        return _fma32(t0, H0.expand_as(t0), t1 * H1)
    return (x00 * W0 + x01 * W1) * H0 + (x10 * W0 + x11 * W1) * H1


def torch_cpu_uses_channels_last(num_classes: int, h: int, w: int, height: int, width: int) -> bool:
    """Whether aten's CPU upsample_bilinear2d takes its channels-last kernel for a contiguous
    (1, K, h, w) fp32 input and an (H, W) output (``_use_vectorized_kernel_cond_2d`` and the
    one-thread RGB rule in UpSampleKernel.cpp; checked against torch 2.13 by the tests)."""
    # A contiguous (1, K, h, w) tensor is also channels-last contiguous only when h * w == 1 (size-1
    # dims are ignored) or K == 1 (excluded by K > 3).
    return (
        (h * w == 1 and num_classes > 3)
        or height + width <= 128
        or (torch.get_num_threads() == 1 and num_classes == 3)
    )


@functools.lru_cache(maxsize=None)
def torch_cpu_bilinear_rounding() -> BilinearRounding:
    """Calibrate against ``F.interpolate`` on this machine: fma or not (generic kernel, probe with
    H + W > 128), then the channels-last kernel's SIMD width. Cached for the process (the CPU
    capability is fixed at startup; ATEN_CPU_CAPABILITY=default gives the non-fma build)."""
    gen = torch.Generator().manual_seed(1234)
    generic = torch.rand(2, 7, 9, generator=gen)
    generic_size = (101, 67)
    ref = F.interpolate(generic[None], size=generic_size, mode="bilinear", align_corners=False)[0]
    misses = {fma: int((bilinear_resize_emulated(generic, generic_size, fma) != ref).sum()) for fma in (True, False)}
    fma = misses[True] <= misses[False]
    detail = f"generic kernel: fma mismatches {misses[True]}, plain {misses[False]} of {ref.numel()}"
    verified = misses[fma] == 0
    # 28 channels: full SIMD vectors cover 16, 24 or 28 of them for widths 16, 8, 4, so the three
    # candidates round differently; H + W <= 128 makes aten take the channels-last kernel.
    cl = torch.rand(28, 5, 6, generator=gen)
    cl_size = (37, 41)
    ref = F.interpolate(cl[None], size=cl_size, mode="bilinear", align_corners=False)[0]
    cl_misses = {v: int((bilinear_resize_emulated(cl, cl_size, fma, v) != ref).sum()) for v in (8, 16, 4)}
    vec = min(cl_misses, key=lambda v: (cl_misses[v], v != 8))
    detail += f"; channels-last kernel: mismatches by SIMD width {cl_misses}"
    verified = verified and cl_misses[vec] == 0
    return BilinearRounding(fma=fma, channels_last_vec=vec, verified=verified, detail=detail)


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def _arg_reasons(scores, target_sizes, out_dtype) -> List[str]:
    try:
        _images_and_sizes(scores, target_sizes)
        _check_out_dtype(out_dtype, scores.shape[-3])
    except ValueError as exc:
        return [str(exc)]
    return []


def not_supported_reasons(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out=None,
) -> List[str]:
    """Why the Triton ``upsample_argmax`` cannot serve these arguments; [] when it can."""
    reasons = _arg_reasons(scores, target_sizes, out_dtype)
    err = _ext.triton_import_error()
    if err:
        reasons.append(err)
    elif scores.device.type != "cuda" and not _ext.triton_interpret_mode():
        reasons.append(
            f"scores are on {scores.device.type}: the Triton kernel runs on CUDA "
            "(or on CPU tensors under TRITON_INTERPRET=1, which is for tests only)"
        )
    if scores.dtype not in _SCORE_DTYPES:
        reasons.append(f"scores dtype {scores.dtype} is not supported (fp32, fp16, bf16)")
    if scores.dim() >= 3 and scores.shape[-3:].numel() >= 2**31:
        reasons.append("one image's scores have >= 2**31 elements: offsets are int32")
    try:
        _, sizes, _ = _images_and_sizes(scores, target_sizes)
        if any(s is not None and s[0] * s[1] >= 2**31 for s in sizes):
            reasons.append("a target has >= 2**31 pixels: offsets are int32")
    except ValueError:
        pass
    return reasons


def cpp_not_supported_reasons(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out=None,
) -> List[str]:
    """Why ``upsample_argmax_cpp`` cannot serve these arguments; [] when it can."""
    reasons = _arg_reasons(scores, target_sizes, out_dtype)
    reasons += _ext.cpp_missing_ops("upsample_argmax_out")
    if scores.device.type != "cpu":
        reasons.append(f"scores are on {scores.device}: the C++ kernel is CPU-only")
    if scores.dtype not in _SCORE_DTYPES:
        reasons.append(f"scores dtype {scores.dtype} is not supported (fp32, fp16, bf16)")
    if scores.dim() >= 3 and scores.shape[-3:].numel() >= 2**31:
        reasons.append("one image's scores have >= 2**31 elements: offsets are int32")
    return reasons


def rounding_for(scores: torch.Tensor, size: Optional[Size]) -> Tuple[bool, int]:
    """(use_fma, channels_last_vec) the kernels must use to match F.interpolate for this image
    (scores (K, h, w)) and target size on scores' device."""
    if scores.device.type == "cuda":
        return True, 0
    r = torch_cpu_bilinear_rounding()
    if size is None:
        return r.fma, 0
    k, h, w = scores.shape
    return r.fma, (r.channels_last_vec if torch_cpu_uses_channels_last(k, h, w, size[0], size[1]) else 0)


# ---------------------------------------------------------------------------------------------
# Triton kernel (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """The @triton.jit kernel (interpreted or compiled, fixed at its first build)."""
    global triton, tl, _axis_taps, _upsample_argmax_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _axis_taps(o, n_in, n_out, scale, FMA: tl.constexpr):
        """aten's (i0, i1, l0, l1) for output indices o along one axis (see module docstring)."""
        src = o.to(tl.float32) + 0.5
        if FMA:
            src = tl.fma(scale, src, -0.5)
        else:
            src = scale * src - 0.5
        src = tl.where(src < 0.0, 0.0, src)
        i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
        l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
        same = n_in == n_out  # aten: "scale_factor = 1, simply copy"
        i0 = tl.where(same, o, i0)
        i1 = tl.where(same, o, i1)
        l1 = tl.where(same, 0.0, l1)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _upsample_argmax_kernel(
        x_ptr, out_ptr, best_ptr,
        K, h, w, H, W, scale_h, scale_w,
        RESIZE: tl.constexpr, FMA: tl.constexpr, CL_VEC: tl.constexpr, STORE_BEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """labels[p] = argmax_k bilinear(x[k])(p) for BLOCK output pixels p of one image; x (K, h, w)
        contiguous, labels (H, W); best (H, W) fp32 gets the winning value when STORE_BEST (tests)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H * W
        oh = offs // W
        ow = offs % W
        if RESIZE:
            r0, r1, lh0, lh1 = _axis_taps(oh, h, H, scale_h, FMA)
            c0, c1, lw0, lw1 = _axis_taps(ow, w, W, scale_w, FMA)
        else:
            r0 = oh
            r1 = oh
            c0 = ow
            c1 = ow
            lh0 = tl.full((BLOCK,), 1.0, tl.float32)
            lh1 = tl.zeros((BLOCK,), tl.float32)
            lw0 = lh0
            lw1 = lh1
        p00 = r0 * w + c0
        p01 = r0 * w + c1
        p10 = r1 * w + c0
        p11 = r1 * w + c1
        if CL_VEC > 0:
            w00 = lh0 * lw0
            w01 = lh0 * lw1
            w10 = lh1 * lw0
            w11 = lh1 * lw1
            full = K - K % CL_VEC  # classes inside full SIMD vectors of aten's channels-last kernel
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        idx = tl.zeros((BLOCK,), tl.int32)
        for k in range(0, K):
            base = x_ptr + k * h * w
            a = tl.load(base + p00, mask=ok, other=0.0).to(tl.float32)
            if RESIZE:
                b = tl.load(base + p01, mask=ok, other=0.0).to(tl.float32)
                c = tl.load(base + p10, mask=ok, other=0.0).to(tl.float32)
                d = tl.load(base + p11, mask=ok, other=0.0).to(tl.float32)
                if CL_VEC > 0:
                    if FMA:
                        vec = tl.fma(a, w00, tl.fma(b, w01, tl.fma(d, w11, c * w10)))
                        tail = tl.fma(d, w11, tl.fma(c, w10, tl.fma(a, w00, b * w01)))
                    else:
                        vec = a * w00 + (b * w01 + (c * w10 + d * w11))
                        tail = ((a * w00 + b * w01) + c * w10) + d * w11
                    v = tl.where(k < full, vec, tail)
                else:
                    if FMA:
                        t0 = tl.fma(a, lw0, b * lw1)
                        t1 = tl.fma(c, lw0, d * lw1)
                        v = tl.fma(t0, lh0, t1 * lh1)
                    else:
                        t0 = a * lw0 + b * lw1
                        t1 = c * lw0 + d * lw1
                        v = t0 * lh0 + t1 * lh1
            else:
                v = a
            # torch.argmax: the first maximum wins, NaN is the maximum.
            take = (k == 0) | (v > best) | ((v != v) & (best == best))
            best = tl.where(take, v, best)
            idx = tl.where(take, k, idx)
        tl.store(out_ptr + offs, idx.to(out_ptr.dtype.element_ty), mask=ok)
        if STORE_BEST:
            tl.store(best_ptr + offs, best, mask=ok)

    return _upsample_argmax_kernel


def _launch_one(x: torch.Tensor, out: torch.Tensor, resize: bool, fma: bool, channels_last_vec: int,
                best: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One image: x (K, h, w) contiguous, out (H, W) contiguous int; best (H, W) fp32 or None."""
    kernel = _build_kernel()
    k, h, w = x.shape
    hh, ww = out.shape
    # float(in) / float(out) in fp32, as aten's area_pixel_compute_scale<float>; Triton passes
    # Python floats as fp32, and this value is exactly representable.
    scale_h = (torch.tensor(h, dtype=torch.float32) / torch.tensor(hh, dtype=torch.float32)).item()
    scale_w = (torch.tensor(w, dtype=torch.float32) / torch.tensor(ww, dtype=torch.float32)).item()
    # 1024 pixels per program: 4 gathers per class and pixel from a (K, h, w) block that stays in
    # L2; untuned (no GPU was available when this was written).
    block = 1024
    grid = (triton.cdiv(hh * ww, block),)
    kernel[grid](
        x, out, best if best is not None else out,
        k, h, w, hh, ww, scale_h, scale_w,
        RESIZE=resize, FMA=fma, CL_VEC=channels_last_vec, STORE_BEST=best is not None, BLOCK=block,
        num_warps=4,
        # Only the fmas we spell: Triton would otherwise fuse `a * b + c` of the plain variant.
        enable_fp_fusion=False,
    )
    return out


@torch.library.custom_op("maskformer::upsample_argmax_triton", mutates_args=("out",))
def _upsample_argmax_triton_op(scores: torch.Tensor, out: torch.Tensor, resize: bool) -> None:
    """One image: scores (K, h, w) -> out (H, W) int labels, in place."""
    x = scores.contiguous()
    fma, vec = rounding_for(x, tuple(out.shape) if resize else None)
    _launch_one(x, out, resize, fma, vec)


@_upsample_argmax_triton_op.register_fake
def _upsample_argmax_triton_fake(scores, out, resize):
    return None


def upsample_argmax(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Fused bilinear upsample + argmax (Triton), one launch per image.

    Same arguments and result as ``upsample_argmax_ref``; never materialises (K, H, W). Raises
    ValueError with ``not_supported_reasons`` when it cannot run.
    """
    reasons = not_supported_reasons(scores, target_sizes, out_dtype, out)
    if reasons:
        raise ValueError("maskformer::upsample_argmax_triton cannot run: " + "; ".join(reasons))
    images, sizes, batched = _images_and_sizes(scores, target_sizes)
    outs = _outputs(images, sizes, out_dtype, out, batched)
    for img, size, o in zip(images, sizes, outs):
        torch.ops.maskformer.upsample_argmax_triton(img, o, size is not None)
    return outs if batched else outs[0]


def upsample_argmax_cpp(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Fused bilinear upsample + argmax on CPU (``torch.ops.maskformer.upsample_argmax_out``).

    Same arguments and result as ``upsample_argmax_ref``; extra memory is O(K * tile) per thread
    plus the candidate tables (O(h * w * max(4, K/16)) ints), never (K, H, W). Raises ValueError
    with ``cpp_not_supported_reasons`` when it cannot run.
    """
    reasons = cpp_not_supported_reasons(scores, target_sizes, out_dtype, out)
    if reasons:
        raise ValueError("maskformer::upsample_argmax_out (C++) cannot run: " + "; ".join(reasons))
    images, sizes, batched = _images_and_sizes(scores, target_sizes)
    outs = _outputs(images, sizes, out_dtype, out, batched)
    for img, size, o in zip(images, sizes, outs):
        fma, vec = rounding_for(img, size)
        torch.ops.maskformer.upsample_argmax_out(img, o, size is not None, fma, vec)
    return outs if batched else outs[0]
