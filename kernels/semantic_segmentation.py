"""Semantic segmentation from raw logits: ``mask_einsum`` then ``upsample_argmax``, composed.

transformers' ``post_process_semantic_segmentation`` (label maps only) is the two ops in a row:
class scores ``einsum(softmax(class)[..., :-1], sigmoid(mask))`` (B, K, h, w), then per image a
bilinear resize to the target size and the argmax over classes. This file declares the composition
as an op of its own, because each backend composes it differently:

* reference: ``upsample_argmax_ref(mask_einsum_ref(...))``, i.e. transformers' ops;
* ``cpp``: the scores with those same torch ops (bit-identical; the einsum one image at a time, so
  one (K, h, w) score map is alive besides the batch's sigmoid), labelled by the C++
  ``upsample_argmax``, which reproduces torch's interpolation rounding and reads a crop in place.
  The fused C++ ``mask_einsum`` is not used here: it is a few fp32 ulps from torch's einsum, and
  bit-identity with transformers matters more on CPU than that fusion;
* ``triton``: the fused Triton ``mask_einsum`` then the Triton ``upsample_argmax`` on its fp32
  scores (a few ulps from torch's einsum, so labels are identical except where two classes tie
  within that).

It has no kernel of its own (no AOT launches: ``mask_einsum``'s and ``upsample_argmax``'s are
its kernels).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from maskformer import _ext
from maskformer.kernels import mask_einsum as me
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels.registry import Impl, Op

__all__ = ["OP", "semantic_segmentation_ref", "semantic_segmentation_triton", "semantic_segmentation_cpp",
           "check_args", "triton_reasons", "cpp_reasons"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Sizes = Optional[Sequence[Tuple[int, int]]]
Extents = Optional[Sequence[Optional[Tuple[float, float]]]]


def check_args(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor, target_sizes: Sizes = None,
               out_dtype: torch.dtype = torch.int64, source_extents: Extents = None) -> None:
    """The op's argument check: ``mask_einsum``'s shapes and devices, B target sizes (transformers'
    message), a label dtype that holds K - 1, B valid extents; ValueError naming the problem."""
    _arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)


def _arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents):
    """(per-image sizes or None, per-image extents or None), checked (``check_args``)."""
    me.check_args(class_queries_logits, masks_queries_logits)
    batch = class_queries_logits.shape[0]
    sizes = None
    if target_sizes is not None:
        if len(target_sizes) != batch:
            raise ValueError(
                "Make sure that you pass in as many target sizes as the batch dimension of the logits "
                f"({len(target_sizes)} target sizes, batch {batch})"
            )
        sizes = [ua.as_size(s) for s in target_sizes]
    ua.check_out_dtype(out_dtype, class_queries_logits.shape[-1] - 1)
    extents = ua.as_extents(masks_queries_logits, source_extents, batched=True)
    return sizes, (None if source_extents is None else extents)


def semantic_segmentation_ref(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sizes = None,
    out_dtype: torch.dtype = torch.int64,
    source_extents: Extents = None,
) -> List[torch.Tensor]:
    """transformers' ``post_process_semantic_segmentation`` on raw logits, label maps only.

    Args:
        class_queries_logits: (B, Q, K+1) float (fp32/fp16/bf16; fp16/bf16 computed in fp32).
        masks_queries_logits: (B, Q, h, w) float, on the same device.
        target_sizes: None (labels at (h, w), or at the crop size) or B (H_b, W_b) pairs.
        out_dtype: int64 (transformers' dtype), or int32/int16/uint8 when K - 1 fits.
        source_extents: None (transformers: the whole, possibly padded, logits are resized), or B
            entries, each None or the image's valid region ``(eh, ew)`` in mask-logit pixels
            (floats, ``0 < eh <= h``, ``0 < ew <= w``; an image of 803 padded-input rows at stride
            4 spans 200.75 rows). The class scores are computed on the whole batch as transformers
            does, then each image's scores are cropped to ``[:, :ceil(eh), :ceil(ew)]`` and resized
            so that the first eh rows map exactly onto its H_b rows (``upsample_argmax``); padding
            never influences the labels.

    Returns:
        B label maps (H_b, W_b) (or (h, w), or the crop size) of ``out_dtype``. Identical to
        transformers' for fp32 inputs without extents: this is ``upsample_argmax_ref`` of
        ``mask_einsum_ref``, transformers' ops; the ``cpp`` implementation gives the same maps, the
        ``triton`` one too except where two classes tie within a few fp32 ulps (module docstring).
    """
    sizes, extents = _arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    if class_queries_logits.shape[0] == 0:
        return []
    scores = me.mask_einsum_ref(class_queries_logits, masks_queries_logits)
    return ua.upsample_argmax_ref(scores, sizes, out_dtype, source_extents=extents)


def semantic_segmentation_triton(class_queries_logits, masks_queries_logits, target_sizes=None,
                                 out_dtype=torch.int64, source_extents=None) -> List[torch.Tensor]:
    """The Triton composition: fused scores (``mask_einsum``), then ``upsample_argmax`` on them.
    Arguments and result as ``semantic_segmentation_ref``."""
    sizes, extents = _arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    if class_queries_logits.shape[0] == 0:
        return []
    scores = me.mask_einsum(class_queries_logits, masks_queries_logits)
    return ua.upsample_argmax(scores, sizes, out_dtype, source_extents=extents)


def semantic_segmentation_cpp(class_queries_logits, masks_queries_logits, target_sizes=None,
                              out_dtype=torch.int64, source_extents=None) -> List[torch.Tensor]:
    """The CPU composition: transformers' scores with torch ops, labelled by the C++
    ``upsample_argmax`` one image at a time. Arguments and result as ``semantic_segmentation_ref``."""
    sizes, extents = _arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    # transformers' softmax and sigmoid over the whole batch (see ref_factors: the sigmoid's
    # rounding depends on the batch), then its einsum one image at a time: only one image's
    # (K, h, w) scores are alive, and they are transformers' bit for bit.
    masks_classes, masks_probs = me.ref_factors(class_queries_logits, masks_queries_logits)
    labels = []
    for i in range(class_queries_logits.shape[0]):
        scores = me.ref_contract(masks_classes[i : i + 1], masks_probs[i : i + 1])[0]
        labels.append(ua.upsample_argmax_cpp(scores, None if sizes is None else sizes[i], out_dtype,
                                             source_extents=None if extents is None else extents[i]))
        del scores
    return labels


def _offset_reasons(class_queries_logits, masks_queries_logits) -> List[str]:
    cl, ml = class_queries_logits, masks_queries_logits
    if ml.dim() == 4 and ml.shape[2] * ml.shape[3] * max(cl.shape[-1] - 1, 1) >= 2**31:
        return ["one image's scores would have >= 2**31 elements: offsets are int32"]
    return []


def triton_reasons(class_queries_logits, masks_queries_logits, target_sizes=None, out_dtype=torch.int64,
                   source_extents=None) -> List[str]:
    """Why the Triton composition cannot serve these arguments: ``mask_einsum``'s Triton reasons,
    and one image's scores under 2**31 elements; [] when it can."""
    return (me.not_supported_reasons(class_queries_logits, masks_queries_logits)
            + _offset_reasons(class_queries_logits, masks_queries_logits))


def cpp_reasons(class_queries_logits, masks_queries_logits, target_sizes=None, out_dtype=torch.int64,
                source_extents=None) -> List[str]:
    """Why the CPU composition cannot serve these arguments (extension, device, dtypes, int32
    offsets); [] when it can."""
    reasons = list(_ext.cpp_missing_ops("upsample_argmax_out"))
    for name, t in (("class_queries_logits", class_queries_logits), ("masks_queries_logits", masks_queries_logits)):
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}: the C++ kernel is CPU-only")
        if t.dtype not in _DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    return reasons + _offset_reasons(class_queries_logits, masks_queries_logits)


OP = Op(
    name="semantic_segmentation",
    reference=semantic_segmentation_ref,
    check=check_args,
    description="transformers' post_process_semantic_segmentation on raw logits (mask_einsum then "
                "upsample_argmax): (B, Q, K+1), (B, Q, h, w) -> B label maps",
    role="semantic post-processing",
    tasks=("semantic",),
    # Mask2Former's semantic task runs mask2former_semantic (the 384x384 resize fused in)
    models=("maskformer",),
    impls=(
        Impl("triton", semantic_segmentation_triton, devices=("cuda",), dtypes=_DTYPES, reasons=triton_reasons),
        Impl("cpp", semantic_segmentation_cpp, devices=("cpu",), dtypes=_DTYPES, reasons=cpp_reasons),
    ),
)
