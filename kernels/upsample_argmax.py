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

Padded batches: ``source_extents`` gives each image's valid region (eh, ew) in source pixels,
generally fractional (803 input rows span 200.75 rows of stride-4 logits). The scores are cropped
to the view ``x[:, :ceil(eh), :ceil(ew)]`` and resized with aten's explicit scale factors
``H / eh`` (fractional) or none (integer), so the first eh rows map exactly onto the H output rows
and the padding is never read (see ``upsample_argmax_ref``). Both kernels read the crop in place
through its plane and row strides (unit column stride; fp32 is never copied) and take aten's
float source step for each axis (``kernel_scales``).

Identical labels, not just close ones. At a region boundary two classes' upsampled scores cross
between output pixels, so an ulp of difference in the interpolated values flips pixels. The
kernels therefore reproduce PyTorch's arithmetic bit for bit (ATen/native/UpSample.h and
native/cpu/UpSampleKernel.cpp in torch 2.13):

* source index ``scale * (i + 0.5) - 0.5`` with ``scale = float(in) / float(out)`` (with a scale
  factor s: ``scale = float(1.0 / s)``, the double quotient rounded), clamped at 0;
  ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = clamp(src - i0, 0, 1)``,
  ``l0 = 1 - l1``; identity when ``in == out``, whatever the scale;
* generic kernel: ``t_r = x[r][i0]*lw0 + x[r][i1]*lw1`` then ``t_h0*lh0 + t_h1*lh1``;
* channels-last kernel, which aten picks when ``H + W <= 128``, for a channels-last contiguous input
  with K > 3 (a contiguous 1x1 map; not a 1x1 crop view of a larger one), and for K == 3 on one
  thread: ``w00 = lh0*lw0`` ... and a per-class summation order that depends on whether the class
  sits in a full SIMD vector (see ``csrc/semantic.cpp``). ``rounding_for`` decides on the tensor
  aten would see (sizes and strides of the crop);
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
import math
import numbers
import struct
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from maskformer import _devices, _ext
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, IMAGES, POSTPROCESS_HEADS, AOTLaunch, Impl, Op, triton_reasons

__all__ = [
    "OP",
    "upsample_argmax",
    "upsample_argmax_ref",
    "upsample_argmax_cpp",
    "check_args",
    "not_supported_reasons",
    "cpp_not_supported_reasons",
    "launch_one",
    "aot_launches",
    "BilinearRounding",
    "torch_cpu_bilinear_rounding",
    "torch_cpu_uses_channels_last",
    "bilinear_resize_emulated",
    "rounding_for",
    "as_size",
    "as_extent",
    "as_extents",
    "check_out_dtype",
    "crop_size",
    "extent_view",
    "aten_scales",
    "kernel_scales",
    "NO_SCALE",
    "OUT_DTYPES",
]

OUT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_MAX_LABEL = {torch.int64: 2**63 - 1, torch.int32: 2**31 - 1, torch.int16: 2**15 - 1, torch.uint8: 255}
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Size = Tuple[int, int]
Extent = Tuple[float, float]

#: The kernels' "no scale factor given" step (see ``kernel_scales``): any negative value.
NO_SCALE = -1.0


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _images_and_sizes(scores: torch.Tensor, target_sizes) -> Tuple[List[torch.Tensor], List[Optional[Size]], bool]:
    """(per-image (K, h, w) views, per-image target size or None, batched?). Raises ValueError."""
    if scores.dim() == 3:
        images, batched = [scores], False
        sizes = [None if target_sizes is None else as_size(target_sizes)]
    elif scores.dim() == 4:
        images, batched = list(scores.unbind(0)), True
        if target_sizes is None:
            sizes = [None] * len(images)
        else:
            sizes = [as_size(s) for s in target_sizes]
            if len(sizes) != len(images):
                raise ValueError(f"{len(sizes)} target sizes for a batch of {len(images)} score maps")
    else:
        raise ValueError(f"scores must be (K, h, w) or (B, K, h, w), got {tuple(scores.shape)}")
    if scores.shape[-3] < 1 or scores.shape[-2] < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have K, h, w >= 1, got {tuple(scores.shape)}")
    return images, sizes, batched


def as_size(size) -> Size:
    """One target size (a pair of numbers, or a 2-element tensor) as positive ints (H, W); raises
    ValueError naming the value."""
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    try:
        hh, ww = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"a target size must be a (height, width) pair, got {size!r}") from None
    if hh < 1 or ww < 1:
        raise ValueError(f"target size must be positive, got {(hh, ww)}")
    return hh, ww


def as_extent(extent, h: int, w: int, name: str = "source_extents") -> Extent:
    """One source extent as a float pair, checked against the (h, w) source: 0 < eh <= h and
    0 < ew <= w (NaN and inf fail). Raises ValueError naming ``name`` and the values."""
    if isinstance(extent, torch.Tensor):
        extent = extent.tolist()
    pair = None
    if not isinstance(extent, (str, bytes)):
        try:
            items = list(extent)
        except TypeError:
            items = []
        if len(items) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
            pair = (float(items[0]), float(items[1]))
    if pair is None:
        raise ValueError(f"{name}: an extent must be a (height, width) pair of numbers or None, got {extent!r}")
    eh, ew = pair
    if not (0.0 < eh <= h and 0.0 < ew <= w):
        raise ValueError(
            f"{name}: extent {(eh, ew)} is outside the source: need 0 < height <= {h} and 0 < width <= {w}"
        )
    return pair


def as_extents(scores: torch.Tensor, source_extents, batched: bool) -> List[Optional[Extent]]:
    """Per-image validated extent or None, for (K, h, w) scores (``batched`` False: one extent or
    None) or (B, K, h, w) ones (None or B entries); see ``upsample_argmax_ref``. Raises ValueError."""
    h, w = scores.shape[-2], scores.shape[-1]
    if not batched:
        return [None if source_extents is None else as_extent(source_extents, h, w)]
    b = scores.shape[0]
    if source_extents is None:
        return [None] * b
    if isinstance(source_extents, torch.Tensor):
        source_extents = source_extents.tolist()
    try:
        entries = list(source_extents)
    except TypeError:
        raise ValueError(f"source_extents must be None or a sequence of {b} extents, got {source_extents!r}") from None
    if len(entries) != b:
        raise ValueError(f"source_extents has {len(entries)} entries for a batch of {b} score maps")
    return [None if e is None else as_extent(e, h, w, f"source_extents[{i}]") for i, e in enumerate(entries)]


def crop_size(extent: Extent) -> Size:
    """The source rows and columns an extent touches: (ceil(eh), ceil(ew))."""
    return math.ceil(extent[0]), math.ceil(extent[1])


def extent_view(img: torch.Tensor, extent: Optional[Extent]) -> torch.Tensor:
    """(K, h, w) -> the (K, ceil(eh), ceil(ew)) view of its valid region (img itself for None)."""
    if extent is None:
        return img
    ch, cw = crop_size(extent)
    return img[:, :ch, :cw]


def aten_scales(extent: Optional[Extent], size: Size) -> Tuple[Optional[float], Optional[float]]:
    """The ``scales_h, scales_w`` arguments of ``aten.upsample_bilinear2d`` that map the first eh
    (ew) source rows (columns) onto H (W) output rows (columns): H / eh for a fractional extent,
    None for an integer one (then aten uses float(in) / float(out), as F.interpolate(size=...))."""
    if extent is None:
        return None, None
    return tuple(None if float(e).is_integer() else n / e for e, n in zip(extent, size))


def kernel_scales(extent: Optional[Extent], size: Optional[Size]) -> Tuple[float, float]:
    """The per-axis source step aten derives from ``aten_scales``, for the kernels:
    ``static_cast<float>(1.0 / scales_h)`` (compute_scales_value), or ``NO_SCALE`` where no
    scale is given (the kernels then use float(in) / float(out))."""
    if extent is None or size is None:
        return NO_SCALE, NO_SCALE
    return tuple(NO_SCALE if s is None else _to_float32(1.0 / s) for s in aten_scales(extent, size))


def _to_float32(x: float) -> float:
    """x rounded to the nearest float32 (as C's double -> float cast), as a python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def check_out_dtype(out_dtype: torch.dtype, num_classes: int) -> None:
    """ValueError unless ``out_dtype`` is a label dtype (``OUT_DTYPES``) that holds class index
    ``num_classes - 1``."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    if num_classes - 1 > _MAX_LABEL[out_dtype]:
        raise ValueError(f"out_dtype {out_dtype} cannot hold class index {num_classes - 1}")


def _arguments(scores, target_sizes, source_extents, out=None):
    """(images, sizes, extents, batched) for the public functions; ValueError on bad arguments
    (devices included)."""
    _check_devices(scores, out)
    images, sizes, batched = _images_and_sizes(scores, target_sizes)
    extents = as_extents(scores, source_extents, batched)
    return images, sizes, extents, batched


def _check_devices(scores, out) -> None:
    _devices.check_same_device("upsample_argmax", scores=scores, out=out)


def _outputs(images, sizes, extents, out_dtype, out, batched) -> List[torch.Tensor]:
    """Allocate (or check the caller's) label maps, one per image."""
    shapes = [
        tuple(s) if s is not None else (tuple(img.shape[1:]) if e is None else crop_size(e))
        for img, s, e in zip(images, sizes, extents)
    ]
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
    source_extents: Union[None, Extent, Sequence[Optional[Extent]]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Reference upsample + argmax: transformers' per-image ``F.interpolate`` then ``argmax``.

    Args:
        scores: (K, h, w) or (B, K, h, w) float class scores (fp16/bf16 are upcast to fp32).
        target_sizes: for (K, h, w) one (H, W) pair or None; for (B, K, h, w) B pairs or None.
            None: no resize, labels at the source (or crop) size (transformers' ``target_sizes=None``
            branch).
        out_dtype: int64 (default, as transformers), int32, int16 or uint8 (must hold K - 1).
        out: optional preallocated label map(s), contiguous, of the result's shape and dtype.
        source_extents: where each image's content lies in the (padded) source, for (K, h, w) one
            ``(eh, ew)`` pair of floats or None, for (B, K, h, w) None or B entries, each a pair or
            None; ``0 < eh <= h`` and ``0 < ew <= w`` (else ValueError). The image occupies source
            rows [0, eh) and columns [0, ew) (an image of 803 input rows spans 200.75 rows of
            stride-4 logits); the rest is padding and never read. The scores are cropped to the
            view ``x[:, :ceil(eh), :ceil(ew)]`` and, with a target size (H, W), resized by
            ``aten.upsample_bilinear2d(crop[None], [H, W], False, scales_h, scales_w)`` with
            ``scales_h = H / eh`` for a fractional eh and None for an integer one (per axis), so
            the first eh source rows map exactly onto the H output rows; an integer extent is
            ``F.interpolate`` of the crop and a full extent (h, w) gives the result of None.
            Without a target size the labels are at the crop size (ceil(eh), ceil(ew)).

    Returns:
        (H, W) labels for (K, h, w) input, a list of B (H_b, W_b) maps for batched input. Ties go to
        the lowest class index, NaN wins (torch.argmax).
    """
    images, sizes, extents, batched = _arguments(scores, target_sizes, source_extents, out)
    check_out_dtype(out_dtype, scores.shape[-3])
    outs = _outputs(images, sizes, extents, out_dtype, out, batched)
    for img, size, extent, o in zip(images, sizes, extents, outs):
        # Upcast, then crop: fp16/bf16 scores give exactly the labels of their fp32 upcast.
        x = extent_view(img.float() if img.dtype in (torch.float16, torch.bfloat16) else img, extent)
        if size is None:
            labels = x.argmax(dim=0)
        elif extent is None:
            labels = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)
        else:
            resized = torch.ops.aten.upsample_bilinear2d(x.unsqueeze(0), list(size), False, *aten_scales(extent, size))
            labels = resized[0].argmax(dim=0)
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


def _axis(n_in: int, n_out: int, fma: bool, step: float = NO_SCALE):
    """aten's (i0, i1, l0, l1) for one axis, exactly (for steps >= 2**-28 and n_out < 2**14,
    scale * (i + 0.5) - 0.5 fits fp64's 53 bits, so the fp64 fma below rounds once). ``step``:
    aten's source step when a scale factor is given (``kernel_scales``), else NO_SCALE:
    float(n_in) / float(n_out)."""
    if n_in == n_out:
        i = torch.arange(n_out)
        return i, i, torch.ones(n_out), torch.zeros(n_out)
    if step >= 0:
        scale = torch.tensor(step, dtype=torch.float32)
    else:
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


def bilinear_resize_emulated(x: torch.Tensor, size: Size, fma: bool, channels_last_vec: int = 0,
                             steps: Tuple[float, float] = (NO_SCALE, NO_SCALE)) -> torch.Tensor:
    """aten's bilinear resize (align_corners=False) of (C, h, w) fp32 -> (C, H, W), emulated in
    PyTorch with an explicit operation order. ``channels_last_vec`` > 0 selects the channels-last
    kernel's order for that SIMD width; ``steps``: the per-axis source steps of explicit scale
    factors (``kernel_scales``), NO_SCALE for none. For calibration and tests; slow and
    memory-hungry."""
    x = x.float()
    c = x.shape[0]
    hh, ww = size
    a0, a1, h0, h1 = _axis(x.shape[1], hh, fma, steps[0])
    b0, b1, w0, w1 = _axis(x.shape[2], ww, fma, steps[1])
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


def torch_cpu_uses_channels_last(num_classes: int, h: int, w: int, height: int, width: int,
                                 channels_last_input: Optional[bool] = None) -> bool:
    """Whether aten's CPU upsample_bilinear2d takes its channels-last kernel for a (1, K, h, w)
    fp32 input and an (H, W) output (``_use_vectorized_kernel_cond_2d`` and the one-thread RGB rule
    in UpSampleKernel.cpp; checked against torch 2.13 by the tests).

    ``channels_last_input``: whether the input is channels-last contiguous
    (``x.is_contiguous(memory_format=torch.channels_last)``); None means a contiguous input, which
    is channels-last contiguous too only when h * w == 1 (size-1 dims are ignored) or K == 1. A
    strided view is neither: a 1x1 crop of a larger map takes the generic kernel where its
    contiguous copy takes the channels-last one (``rounding_for`` decides on the view).
    """
    if channels_last_input is None:
        channels_last_input = h * w == 1 or num_classes == 1
    return (
        (channels_last_input and num_classes > 3)
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


def _arg_reasons(scores, target_sizes, out_dtype, out=None, source_extents=None) -> List[str]:
    try:
        _arguments(scores, target_sizes, source_extents, out)
        check_out_dtype(out_dtype, scores.shape[-3])
    except ValueError as exc:
        return [str(exc)]
    return []


def check_args(scores: torch.Tensor, target_sizes=None, out_dtype: torch.dtype = torch.int64, out=None,
               source_extents=None) -> None:
    """The op's argument check (``upsample_argmax_ref``'s arguments): shapes, target sizes, extents,
    label dtype, ``out`` and devices; ValueError "upsample_argmax: ..." naming the problem."""
    reasons = _arg_reasons(scores, target_sizes, out_dtype, out, source_extents)
    if reasons:
        raise ValueError("upsample_argmax: " + "; ".join(reasons))


def _offset_reasons(scores, target_sizes, source_extents) -> List[str]:
    """int32 offsets: what one image's kernel reads (its crop, in place when stride(-1) == 1)
    and writes must each span < 2**31 elements. Call after _arg_reasons found nothing."""
    images, sizes, extents, _ = _arguments(scores, target_sizes, source_extents)
    reasons = []
    for img, extent in zip(images, extents):
        x = extent_view(img, extent)
        span = x.numel() if x.stride(-1) != 1 else 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
        if span >= 2**31:
            reasons.append("one image's scores span >= 2**31 elements: offsets are int32")
            break
    if any(s is not None and s[0] * s[1] >= 2**31 for s in sizes):
        reasons.append("a target has >= 2**31 pixels: offsets are int32")
    return reasons


def not_supported_reasons(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out=None,
    source_extents: Union[None, Extent, Sequence[Optional[Extent]]] = None,
) -> List[str]:
    """Why the Triton ``upsample_argmax`` cannot serve these arguments; [] when it can."""
    reasons = _arg_reasons(scores, target_sizes, out_dtype, out, source_extents)
    reasons += triton_reasons(scores, "scores are")
    if scores.dtype not in _SCORE_DTYPES:
        reasons.append(f"scores dtype {scores.dtype} is not supported (fp32, fp16, bf16)")
    if not reasons:
        reasons += _offset_reasons(scores, target_sizes, source_extents)
    return reasons


def cpp_not_supported_reasons(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out=None,
    source_extents: Union[None, Extent, Sequence[Optional[Extent]]] = None,
) -> List[str]:
    """Why ``upsample_argmax_cpp`` cannot serve these arguments; [] when it can."""
    reasons = _arg_reasons(scores, target_sizes, out_dtype, out, source_extents)
    reasons += _ext.cpp_missing_ops("upsample_argmax_out")
    if scores.device.type != "cpu":
        reasons.append(f"scores are on {scores.device}: the C++ kernel is CPU-only")
    if scores.dtype not in _SCORE_DTYPES:
        reasons.append(f"scores dtype {scores.dtype} is not supported (fp32, fp16, bf16)")
    if scores.dim() >= 3 and scores.shape[-3:].numel() >= 2**31:
        reasons.append("one image's scores have >= 2**31 elements: offsets are int32")
    return reasons


def _interpolated_layout(img: torch.Tensor, extent: Optional[Extent]) -> torch.Tensor:
    """A tensor with the sizes and strides of what the reference interpolates for image ``img``
    (K, h, w): its crop, of the fp32 upcast for fp16/bf16 (``.float()`` keeps the strides of a
    dense tensor and makes any other contiguous; built on the meta device: no copy)."""
    if img.dtype in (torch.float16, torch.bfloat16):
        img = torch.empty_strided(img.shape, img.stride(), dtype=img.dtype, device="meta").float()
    return extent_view(img, extent)


# On CUDA: the fma variant of aten's generic formula (nvcc contracts it), never channels-last.
CUDA_ROUNDING: Tuple[bool, int] = (True, 0)


def rounding_for(scores: torch.Tensor, size: Optional[Size], extent: Optional[Extent] = None) -> Tuple[bool, int]:
    """(use_fma, channels_last_vec) the kernels must use to match the reference for this image
    (scores (K, h, w), cropped to ``extent``) and target size on scores' device. aten's kernel
    choice depends on the crop's sizes and on whether the tensor it is handed (a view) is
    channels-last contiguous."""
    if scores.device.type == "cuda":
        return CUDA_ROUNDING
    r = torch_cpu_bilinear_rounding()
    if size is None:
        return r.fma, 0
    x = _interpolated_layout(scores, extent)
    k, h, w = x.shape
    cl_input = x.unsqueeze(0).is_contiguous(memory_format=torch.channels_last)
    return r.fma, (r.channels_last_vec if torch_cpu_uses_channels_last(k, h, w, size[0], size[1], cl_input) else 0)


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
        K, h, w, H, W, stride_k, stride_h, scale_h, scale_w,
        RESIZE: tl.constexpr, FMA: tl.constexpr, CL_VEC: tl.constexpr, STORE_BEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """labels[p] = argmax_k bilinear(x[k])(p) for BLOCK output pixels p of one image; x (K, h, w)
        with unit column stride (x[k, r, c] at k * stride_k + r * stride_h + c: a crop is read in
        place), labels (H, W); scale_h/w: aten's source steps; best (H, W) fp32 gets the winning
        value when STORE_BEST (tests)."""
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
        p00 = r0 * stride_h + c0
        p01 = r0 * stride_h + c1
        p10 = r1 * stride_h + c0
        p11 = r1 * stride_h + c1
        if CL_VEC > 0:
            w00 = lh0 * lw0
            w01 = lh0 * lw1
            w10 = lh1 * lw0
            w11 = lh1 * lw1
            full = K - K % CL_VEC  # classes inside full SIMD vectors of aten's channels-last kernel
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        idx = tl.zeros((BLOCK,), tl.int32)
        for k in range(0, K):
            base = x_ptr + k * stride_k
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


def launch_one(x: torch.Tensor, out: torch.Tensor, resize: bool, fma: bool, channels_last_vec: int,
                best: Optional[torch.Tensor] = None, scale_h: float = NO_SCALE,
                scale_w: float = NO_SCALE, compile_only: bool = False):
    """One image: x (K, h, w) with x.stride(2) == 1, out (H, W) contiguous int; best (H, W) fp32 or
    None; scale_h/w: ``kernel_scales`` (NO_SCALE: float(h) / float(H)). Returns out, or with
    ``compile_only`` the ``CompiledKernel`` for the active triton target, not launched
    (``benchmarks/aot.py``, with meta tensors)."""
    kernel = _build_kernel()
    k, h, w = x.shape
    hh, ww = out.shape
    # float(in) / float(out) in fp32, as aten's area_pixel_compute_scale<float>, or the caller's
    # fp32 step; Triton passes Python floats as fp32, and these values are exactly representable.
    if scale_h < 0:
        scale_h = (torch.tensor(h, dtype=torch.float32) / torch.tensor(hh, dtype=torch.float32)).item()
    if scale_w < 0:
        scale_w = (torch.tensor(w, dtype=torch.float32) / torch.tensor(ww, dtype=torch.float32)).item()
    # 1024 pixels per program: 4 gathers per class and pixel from a (K, h, w) block that stays in
    # L2; untuned (no GPU was available when this was written).
    block = 1024
    grid = (triton.cdiv(hh * ww, block),)
    launch = kernel.warmup if compile_only else kernel[grid]
    compiled = launch(
        x, out, best if best is not None else out,
        k, h, w, hh, ww, x.stride(0), x.stride(1), scale_h, scale_w,
        RESIZE=resize, FMA=fma, CL_VEC=channels_last_vec, STORE_BEST=best is not None, BLOCK=block,
        num_warps=4,
        # Only the fmas we spell: Triton would otherwise fuse `a * b + c` of the plain variant.
        enable_fp_fusion=False,
        **({"grid": grid} if compile_only else {}),
    )
    return compiled if compile_only else out


@torch.library.custom_op("maskformer::upsample_argmax_triton", mutates_args=("out",))
def _upsample_argmax_triton_op(
    scores: torch.Tensor, out: torch.Tensor, resize: bool, use_fma: bool, channels_last_vec: int,
    scale_h: float, scale_w: float,
) -> None:
    """One image: scores (K, h, w) -> out (H, W) int labels, in place. A unit-column-stride view (a
    crop) is read in place; the rounding (use_fma, channels_last_vec) and the source steps
    (scale_h/w, NO_SCALE for none) are the caller's (``rounding_for``, ``kernel_scales``)."""
    x = scores if scores.stride(-1) == 1 else scores.contiguous()
    launch_one(x, out, resize, use_fma, channels_last_vec, None, scale_h, scale_w)


@_upsample_argmax_triton_op.register_fake
def _upsample_argmax_triton_fake(scores, out, resize, use_fma, channels_last_vec, scale_h, scale_w):
    # A real meta tensor mixed with others dispatches here: refuse rather than leave `out` unwritten.
    _devices.check_same_device("maskformer::upsample_argmax_triton", scores=scores, out=out)
    return None


def upsample_argmax(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    source_extents: Union[None, Extent, Sequence[Optional[Extent]]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Fused bilinear upsample + argmax (Triton), one launch per image.

    Same arguments and result as ``upsample_argmax_ref`` (``source_extents`` included: the crop is
    read in place, never copied); never materialises (K, H, W). Raises ValueError with
    ``not_supported_reasons`` when it cannot run.
    """
    reasons = not_supported_reasons(scores, target_sizes, out_dtype, out, source_extents)
    if reasons:
        raise ValueError("maskformer::upsample_argmax_triton cannot run: " + "; ".join(reasons))
    images, sizes, extents, batched = _arguments(scores, target_sizes, source_extents, out)
    outs = _outputs(images, sizes, extents, out_dtype, out, batched)
    for img, size, extent, o in zip(images, sizes, extents, outs):
        fma, vec = rounding_for(img, size, extent)
        torch.ops.maskformer.upsample_argmax_triton(extent_view(img, extent), o, size is not None, fma, vec,
                                                    *kernel_scales(extent, size))
    return outs if batched else outs[0]


def upsample_argmax_cpp(
    scores: torch.Tensor,
    target_sizes: Union[None, Size, Sequence[Size]] = None,
    out_dtype: torch.dtype = torch.int64,
    out: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    source_extents: Union[None, Extent, Sequence[Optional[Extent]]] = None,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Fused bilinear upsample + argmax on CPU (``torch.ops.maskformer.upsample_argmax_out``).

    Same arguments and result as ``upsample_argmax_ref`` (``source_extents`` included: an fp32 crop
    is read in place through its strides, fp16/bf16 crops are upcast, only the crop); extra memory
    is O(K * tile) per thread plus the candidate tables (O(h * w * max(4, K/16)) ints), never
    (K, H, W). Raises ValueError with ``cpp_not_supported_reasons`` when it cannot run.
    """
    reasons = cpp_not_supported_reasons(scores, target_sizes, out_dtype, out, source_extents)
    if reasons:
        raise ValueError("maskformer::upsample_argmax_out (C++) cannot run: " + "; ".join(reasons))
    images, sizes, extents, batched = _arguments(scores, target_sizes, source_extents, out)
    outs = _outputs(images, sizes, extents, out_dtype, out, batched)
    for img, size, extent, o in zip(images, sizes, extents, outs):
        fma, vec = rounding_for(img, size, extent)
        torch.ops.maskformer.upsample_argmax_out(extent_view(img, extent), o, size is not None, fma, vec,
                                                 *kernel_scales(extent, size))
    return outs if batched else outs[0]


# ---------------------------------------------------------------------------------------------
# Fakes of the C++ ops, ahead-of-time launches, the op's declaration
# ---------------------------------------------------------------------------------------------


def _upsample_argmax_out_fake(scores, out, resize, use_fma, channels_last_vec, scale_h=-1.0, scale_w=-1.0):
    """Fake (and Meta) kernel of the C++ ``maskformer::upsample_argmax_out``: writes ``out``."""
    _devices.check_same_device("maskformer::upsample_argmax_out", scores=scores, out=out)
    return out


def _bilinear_resize_fake(x, H, W, use_fma, channels_last_vec, scale_h=-1.0, scale_w=-1.0):
    """Fake kernel of the C++ ``maskformer::bilinear_resize`` (the kernels' interpolation, for tests)."""
    return x.new_empty((x.shape[0], H, W), dtype=torch.float32)


def _aot_launch(classes: int, mh: int, mw: int, target: Optional[Size], dtype: str, out_dtype: str,
                image: int = 0) -> AOTLaunch:
    def compile_():
        # upsample_argmax(scores (B, K, h, w), sizes): image i of the batch, the CUDA rounding.
        scores = torch.empty(image + 1, classes, mh, mw, device="meta", dtype=getattr(torch, dtype))
        out = torch.empty(target if target is not None else (mh, mw), device="meta", dtype=getattr(torch, out_dtype))
        fma, vec = CUDA_ROUNDING
        return launch_one(scores[image], out, target is not None, fma, vec, None, *kernel_scales(None, target),
                          compile_only=True)

    config = dict(K=classes, scores=f"{mh}x{mw}", target="none" if target is None else f"{target[0]}x{target[1]}",
                  dtype=DTYPE_LABELS[dtype], labels=DTYPE_LABELS[out_dtype], image=image)
    return AOTLaunch("upsample_argmax", config, compile_, tensor_cores=False)


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles. Full: every post-processing head's classes
    (``POSTPROCESS_HEADS``), scores at a quarter of each input size (``IMAGES``) resized to the
    input size and not resized, fp32/fp16/bf16 scores, int64/int32/uint8 labels, images 0 and 1 of
    a batch. CI: 150 classes 160x213 -> 640x853 and unresized (fp32, int64), and 128x171 -> 512x683
    (bf16 scores, uint8 labels, the batch's second image)."""
    if not full:
        return [_aot_launch(150, 160, 213, (640, 853), "float32", "int64"),
                _aot_launch(150, 160, 213, None, "float32", "int64"),
                _aot_launch(150, 128, 171, (512, 683), "bfloat16", "uint8", 1)]
    out = []
    for _, classes in POSTPROCESS_HEADS:
        for image in IMAGES:
            mh, mw = -(-image[0] // 4), -(-image[1] // 4)
            for target in (image, None):
                for dtype in AOT_DTYPES:
                    for labels in ("int64", "int32", "uint8"):
                        for i in (0, 1):
                            out.append(_aot_launch(classes, mh, mw, target, dtype, labels, i))
    return out


OP = Op(
    name="upsample_argmax",
    reference=upsample_argmax_ref,
    check=check_args,
    description="bilinear resize (align_corners=False) + argmax over classes without (K, H, W) scores: "
                "(K, h, w) or (B, K, h, w) scores -> (H, W) labels, identical to the reference's",
    role="semantic post-processing",
    tasks=(),  # the semantic task runs it inside semantic_segmentation, never on its own
    impls=(
        Impl("triton", upsample_argmax, devices=("cuda",), dtypes=_SCORE_DTYPES, reasons=not_supported_reasons),
        Impl("cpp", upsample_argmax_cpp, devices=("cpu",), dtypes=_SCORE_DTYPES, reasons=cpp_not_supported_reasons),
    ),
    fakes={"maskformer::upsample_argmax_out": _upsample_argmax_out_fake,
           "maskformer::bilinear_resize": _bilinear_resize_fake},
    aot_launches=aot_launches,
)
