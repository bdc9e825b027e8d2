"""Bilinear upsampling of per-query mask probabilities fused with the score-weighted argmax over
queries and the per-query mask areas: panoptic maps without a (Q, H, W) tensor.

transformers' ``post_process_panoptic_segmentation`` (``compute_segments``) does, per image, on the
Q kept queries::

    probs = F.interpolate(mask_probs[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    labels = (probs * scores[:, None, None]).argmax(0)        # (H, W): the query owning each pixel
    own_area = (probs >= mask_threshold).flatten(1).sum(1)    # (Q,): each query's own mask area

(``own_area`` thresholds the unweighted probabilities: deviation 3 of ``maskformer.processing``.)
With ``source_extent=(eh, ew)`` (an image padded into a larger batch) ``mask_probs`` is first
cropped to the view ``[:, :ceil(eh), :ceil(ew)]`` and resized with aten's explicit scale factors,
so the first eh rows map exactly onto the H output rows (``upsample_argmax_ref`` explains the
semantics); the padding is never read, and the C++ kernel reads the crop in place.
``query_argmax_ref`` computes exactly that (weighting ``probs`` in place, as transformers does, and
counting the areas one query at a time) and allocates ``probs``: 218 MB at Q=100 and 640x853.
``query_argmax_cpp`` (``csrc/panoptic.cpp``) computes each query's interpolated value per output
pixel with PyTorch's own rounding (the
emulation of ``maskformer.kernels.upsample_argmax``: fma or not, the channels-last kernel and its
SIMD width, calibrated at runtime), multiplies by the weight in fp32 and keeps the first maximum,
and counts the threshold per query; on MaskFormer-like probabilities it first classifies each
source cell (one possible winner? clearly above / below the threshold?) and evaluates only the
queries a cell leaves open. The results are identical to the reference, not just close.

Limits: fp32 probabilities and weights (other dtypes go to the reference: torch's fp16/bf16
interpolation rounds differently); CPU only. Layouts: a view with unit column stride (a crop) is
read in place, anything else is copied contiguous once; aten's kernel choice (generic or
channels-last) is decided on the strides the reference interpolates, so channels-last inputs are
served too. There is no Triton kernel: on CUDA the reference runs.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from maskformer import _devices, _ext
from maskformer.kernels.registry import Impl, Op
from maskformer.kernels.upsample_argmax import as_extent, aten_scales, extent_view, kernel_scales, rounding_for

__all__ = [
    "OP",
    "query_argmax_ref",
    "query_argmax_cpp",
    "check_args",
    "not_supported_reasons",
    "cpp_not_supported_reasons",
]

# What forcing Triton says: there is no Triton kernel (yet).
_NO_TRITON = "the reference PyTorch ops are the CUDA path"

Size = Tuple[int, int]
Extent = Tuple[float, float]


def _arguments(mask_probs: torch.Tensor, weights: torch.Tensor, target_size, source_extent=None,
               out=None) -> Tuple[Optional[Size], Optional[Extent]]:
    """(target size as an int pair or None, extent as a float pair or None). Raises ValueError on
    malformed arguments, bad extents and tensors on different devices."""
    _devices.check_same_device("query_argmax", mask_probs=mask_probs, weights=weights, out=out)
    if not isinstance(mask_probs, torch.Tensor) or mask_probs.dim() != 3:
        shape = tuple(mask_probs.shape) if isinstance(mask_probs, torch.Tensor) else type(mask_probs).__name__
        raise ValueError(f"mask_probs must be a (Q, h, w) tensor, got {shape}")
    if min(mask_probs.shape) < 1:
        raise ValueError(f"mask_probs must have Q, h, w >= 1, got {tuple(mask_probs.shape)}")
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (mask_probs.shape[0],):
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a ({mask_probs.shape[0]},) tensor (one per query), got {shape}")
    extent = None
    if source_extent is not None:
        extent = as_extent(source_extent, mask_probs.shape[1], mask_probs.shape[2], "source_extent")
    if target_size is None:
        return None, extent
    if isinstance(target_size, torch.Tensor):
        target_size = target_size.tolist()
    try:
        hh, ww = (int(v) for v in target_size)
    except (TypeError, ValueError):
        raise ValueError(f"target_size must be a (height, width) pair or None, got {target_size!r}") from None
    if hh < 1 or ww < 1:
        raise ValueError(f"target_size must be positive, got {(hh, ww)}")
    return (hh, ww), extent


def _threshold_fp32(mask_threshold: float) -> float:
    """The threshold as torch compares it with a float32 tensor: cast to float32."""
    return torch.tensor(float(mask_threshold), dtype=torch.float32).item()


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def query_argmax_ref(
    mask_probs: torch.Tensor,
    weights: torch.Tensor,
    target_size: Optional[Size] = None,
    mask_threshold: float = 0.5,
    source_extent: Optional[Extent] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: the panoptic processor's torch ops, materialising the (Q, H, W) probabilities.

    Args:
        mask_probs: (Q, h, w) float mask probabilities of the kept queries (sigmoid of the logits).
        weights: (Q,) float per-query weights (the kept queries' class scores).
        target_size: (H, W) to resize to (bilinear, align_corners=False), or None: no resize.
        mask_threshold: a pixel belongs to query q's own mask when its probability is >= this
            (compared in mask_probs' dtype, as torch does with a python float).
        source_extent: None, or the image's valid region ``(eh, ew)`` in mask pixels (floats,
            ``0 < eh <= h``, ``0 < ew <= w``, else ValueError): the rest is padding. ``mask_probs``
            is cropped to the view ``[:, :ceil(eh), :ceil(ew)]`` and, with a target size, resized
            by ``aten.upsample_bilinear2d(crop[None], [H, W], False, scales_h, scales_w)`` with
            ``scales_h = H / eh`` for a fractional eh, None for an integer one (per axis): the first
            eh rows map exactly onto the H output rows; an integer extent is ``F.interpolate`` of
            the crop, the full extent (h, w) the same as None. Without a target size, labels are
            at the crop size (ceil(eh), ceil(ew)).

    Returns:
        labels: (H, W) int64, ``argmax_q weights[q] * P[q]`` with P the resized probabilities
            (first index on ties, NaN wins: torch.argmax).
        own_area: (Q,) int64, ``#{pixels: P[q] >= mask_threshold}``.
    """
    size, extent = _arguments(mask_probs, weights, target_size, source_extent)
    probs = extent_view(mask_probs, extent)
    if size is not None and extent is None:
        probs = F.interpolate(mask_probs.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    elif size is not None:
        probs = torch.ops.aten.upsample_bilinear2d(probs.unsqueeze(0), list(size), False, *aten_scales(extent, size))[0]
    # One query at a time: `(probs >= t).flatten(1).sum(1)` gives the same counts but sums through an
    # int64 (Q, H, W) copy of the bool mask (437 MB at Q=100, 640x853; 8x slower).
    own_area = torch.stack([(p >= mask_threshold).sum() for p in probs])
    w = weights.view(-1, 1, 1)
    if size is None:
        return (probs * w).argmax(0), own_area
    # Weighted in place, as transformers does (the same multiply; a new (Q, H, W) tensor would cost
    # 70 ms of page faults at Q=100, 640x853), after the areas have read the unweighted values.
    weighted = probs.mul_(w) if torch.result_type(probs, w) == probs.dtype else probs * w
    return weighted.argmax(0), own_area


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def check_args(mask_probs: torch.Tensor, weights: torch.Tensor, target_size: Optional[Size] = None,
               mask_threshold: float = 0.5, source_extent: Optional[Extent] = None) -> None:
    """The op's argument check (``query_argmax_ref``'s arguments): (Q, h, w) probabilities with
    Q, h, w >= 1, (Q,) weights, on one device, a positive (H, W) or None, a valid extent or None;
    ValueError naming the problem."""
    _arguments(mask_probs, weights, target_size, source_extent)


def _arg_reasons(mask_probs, weights, target_size, source_extent=None) -> List[str]:
    try:
        _arguments(mask_probs, weights, target_size, source_extent)
    except ValueError as exc:
        return [str(exc)]
    return []


def not_supported_reasons(mask_probs, weights, target_size=None, mask_threshold=0.5, source_extent=None) -> List[str]:
    """Why a Triton ``query_argmax`` cannot serve these arguments: there is none yet."""
    return _arg_reasons(mask_probs, weights, target_size, source_extent) + [OP.no_impl_reason("triton")]


def cpp_not_supported_reasons(mask_probs, weights, target_size=None, mask_threshold=0.5,
                              source_extent=None) -> List[str]:
    """Why ``query_argmax_cpp`` cannot serve these arguments; [] when it can."""
    reasons = _arg_reasons(mask_probs, weights, target_size, source_extent)
    reasons += _ext.cpp_missing_ops("query_argmax_out")
    for name, t in (("mask_probs", mask_probs), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}: the C++ kernel is CPU-only")
        if t.dtype != torch.float32:
            reasons.append(
                f"{name} dtype {t.dtype} is not supported (float32 only: torch interpolates and weights "
                "other dtypes with their own rounding)"
            )
    if isinstance(mask_probs, torch.Tensor) and mask_probs.numel() >= 2**31:
        reasons.append("mask_probs has >= 2**31 elements: offsets are int32")
    return reasons


# ---------------------------------------------------------------------------------------------
# C++ kernel
# ---------------------------------------------------------------------------------------------


def query_argmax_cpp(
    mask_probs: torch.Tensor,
    weights: torch.Tensor,
    target_size: Optional[Size] = None,
    mask_threshold: float = 0.5,
    source_extent: Optional[Extent] = None,
    *,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    prune: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused resize + weighted argmax over queries + own areas on CPU
    (``torch.ops.maskformer.query_argmax_out``).

    Same arguments and results as ``query_argmax_ref`` (``source_extent`` included: the crop is read
    in place through its strides), never materialises (Q, H, W). ``out``: an optional
    ``(labels (H, W) int64, own_area (Q,) int64)`` pair of contiguous CPU tensors that is
    overwritten and returned. ``prune=False`` forces the dense sweep over all queries at every pixel
    (for tests and benchmarks; the result is the same). Raises ValueError with
    ``cpp_not_supported_reasons`` when it cannot run.
    """
    # Arguments and devices first (out included), as every other entry: a mixed-device call is
    # named as such whether or not the extension is built.
    size, extent = _arguments(mask_probs, weights, target_size, source_extent, out)
    reasons = cpp_not_supported_reasons(mask_probs, weights, target_size, mask_threshold, source_extent)
    if reasons:
        raise ValueError("maskformer::query_argmax_out (C++) cannot run: " + "; ".join(reasons))
    region = extent_view(mask_probs, extent)
    shape = tuple(region.shape[1:]) if size is None else size
    q = mask_probs.shape[0]
    if out is None:
        labels = torch.empty(shape, dtype=torch.int64)
        own_area = torch.empty(q, dtype=torch.int64)
    else:
        labels, own_area = out
        for name, t, want in (("labels", labels, shape), ("own_area", own_area, (q,))):
            if tuple(t.shape) != want or t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(
                    f"out {name} must be a contiguous {want} int64 CPU tensor, got {tuple(t.shape)} {t.dtype} "
                    f"on {t.device}"
                )
    fma, vec = rounding_for(mask_probs, size, extent)
    torch.ops.maskformer.query_argmax_out(
        region, weights, _threshold_fp32(mask_threshold), size is not None, fma, vec, prune, labels, own_area,
        *kernel_scales(extent, size),
    )
    return labels, own_area


def _query_argmax_out_fake(mask_probs, weights, mask_threshold, resize, use_fma, channels_last_vec, allow_prune,
                           labels, own_area, scale_h=-1.0, scale_w=-1.0):
    """Fake (and Meta) kernel of the C++ ``maskformer::query_argmax_out``: writes labels, own_area."""
    _devices.check_same_device("maskformer::query_argmax_out", mask_probs=mask_probs, weights=weights, labels=labels,
                               own_area=own_area)
    return None


OP = Op(
    name="query_argmax",
    reference=query_argmax_ref,
    check=check_args,
    description="the per-pixel step of panoptic post-processing: resize, score-weighted argmax over queries and "
                "per-query mask areas, without a (Q, H, W) tensor: (Q, h, w), (Q,) -> (H, W) labels, (Q,) areas",
    role="panoptic post-processing",
    tasks=("panoptic",),
    impls=(Impl("cpp", query_argmax_cpp, devices=("cpu",), dtypes=(torch.float32,), reasons=cpp_not_supported_reasons),),
    missing={"triton": _NO_TRITON},
    fakes={"maskformer::query_argmax_out": _query_argmax_out_fake},
)
