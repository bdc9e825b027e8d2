"""Post-processing of MaskFormer outputs: semantic, instance and panoptic maps, and RLE.

Every function accepts any object with `class_queries_logits` `(B, Q, K+1)` and
`masks_queries_logits` `(B, Q, h, w)` (transformers' output objects included) and runs the same
torch ops as transformers, so ties and float rounding resolve identically. The semantic maps and
the panoptic per-pixel step (resize, score-weighted argmax over queries, mask areas) go through
`maskformer.dispatch`: on CPU its C++ kernels reproduce those torch ops bit for bit without the
full-resolution (classes or queries, H, W) tensors; `MASKFORMER_BACKEND=reference` runs the torch
ops themselves. `MaskFormerImageProcessor.post_process_*` are the documented entry points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .preprocessing import BatchFeature


class SemanticSegmentationResult(BatchFeature):
    """One image's semantic result when `return_segmentation_scores=True`.

    Keys / attributes:
        segmentation: `(H, W)` int64 class ids.
        segmentation_scores: `(K, H, W)` float, the per-class scores whose argmax is `segmentation`.
    """


def semantic_segmentation(
    outputs: Any,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    return_segmentation_scores: bool = False,
) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
    """`MaskFormerImageProcessor.post_process_semantic_segmentation` (documented there)."""
    class_logits, mask_logits = _check_outputs(outputs, "post_process_semantic_segmentation")
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    if not return_segmentation_scores:
        # maskformer.dispatch picks the fused kernels (C++ on CPU, Triton on CUDA) or
        # semantic_segmentation_ref's computation, per MASKFORMER_BACKEND / set_backend.
        from . import dispatch

        return dispatch.semantic_segmentation(class_logits, mask_logits, sizes)
    scores = _semantic_scores(class_logits, mask_logits)
    results = []
    for i in range(scores.shape[0]):
        s = scores[i]
        if sizes is not None:
            s = F.interpolate(s[None], size=sizes[i], mode="bilinear", align_corners=False)[0]
        results.append(SemanticSegmentationResult(segmentation=s.argmax(dim=0), segmentation_scores=s))
    return results


def instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    return_coco_annotation: bool | None = False,
    return_binary_maps: bool | None = False,
) -> list[dict[str, Any]]:
    """`MaskFormerImageProcessor.post_process_instance_segmentation` (documented there)."""
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
    class_logits, mask_logits = _check_outputs(outputs, "post_process_instance_segmentation")
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    return [
        _instance_one(
            class_logits[i],
            mask_logits[i],
            threshold,
            None if sizes is None else sizes[i],
            bool(return_coco_annotation),
            bool(return_binary_maps),
        )
        for i in range(class_logits.shape[0])
    ]


def panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: set[int] | None = None,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """`MaskFormerImageProcessor.post_process_panoptic_segmentation` (documented there)."""
    class_logits, mask_logits = _check_outputs(outputs, "post_process_panoptic_segmentation")
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    fuse = set() if label_ids_to_fuse is None else {int(x) for x in label_ids_to_fuse}
    num_labels = class_logits.shape[-1] - 1
    # sigmoid over the whole batch, as transformers: torch's CPU kernel evaluates a buffer's tail
    # with the scalar exp and the rest with the vectorised one, so applying it to the kept
    # queries only could move a value by one ulp and flip an exact threshold or argmax tie.
    mask_probs = mask_logits.sigmoid()
    pred_scores, pred_labels = F.softmax(class_logits, dim=-1).max(-1)
    # Same torch comparison as transformers (the python threshold is cast to the logits' dtype).
    keep = pred_labels.ne(num_labels) & (pred_scores > threshold)
    results = []
    for i in range(class_logits.shape[0]):
        results.append(
            _panoptic_one(
                mask_probs[i][keep[i]],
                pred_scores[i][keep[i]],
                pred_labels[i][keep[i]],
                mask_threshold,
                overlap_mask_area_threshold,
                fuse,
                tuple(mask_logits.shape[-2:]) if sizes is None else sizes[i],
                sizes is not None,
            )
        )
    return results

def _check_outputs(outputs: Any, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    def get(name: str) -> Any:
        if isinstance(outputs, Mapping) and name in outputs:
            return outputs[name]
        if hasattr(outputs, name):
            return getattr(outputs, name)
        raise TypeError(
            f"{fn} needs an object with a `{name}` attribute (e.g. the model output); got {type(outputs).__name__}."
        )

    class_logits, mask_logits = get("class_queries_logits"), get("masks_queries_logits")
    if isinstance(class_logits, np.ndarray):
        class_logits = torch.from_numpy(class_logits)
    if isinstance(mask_logits, np.ndarray):
        mask_logits = torch.from_numpy(mask_logits)
    if not isinstance(class_logits, torch.Tensor) or not isinstance(mask_logits, torch.Tensor):
        raise TypeError(f"{fn}: class_queries_logits and masks_queries_logits must be torch tensors.")
    if class_logits.ndim != 3:
        raise ValueError(
            f"{fn}: class_queries_logits must be (batch, queries, classes + 1), got shape {tuple(class_logits.shape)}."
        )
    if mask_logits.ndim != 4:
        raise ValueError(
            f"{fn}: masks_queries_logits must be (batch, queries, height, width), got shape {tuple(mask_logits.shape)}."
        )
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"{fn}: class_queries_logits {tuple(class_logits.shape)} and masks_queries_logits "
            f"{tuple(mask_logits.shape)} disagree on (batch, queries)."
        )
    if class_logits.shape[0] == 0 or class_logits.shape[1] == 0:
        raise ValueError(f"{fn}: empty batch or no queries (shape {tuple(class_logits.shape)}).")
    if class_logits.shape[2] < 2:
        raise ValueError(
            f"{fn}: class_queries_logits has {class_logits.shape[2]} class(es); it needs at least one real class "
            "plus the trailing 'no object' class."
        )
    if not class_logits.is_floating_point() or not mask_logits.is_floating_point():
        raise TypeError(
            f"{fn}: logits must be floating point, got {class_logits.dtype} and {mask_logits.dtype}; pass the "
            "model's raw logits (cast with .float())."
        )
    # A sum is one pass with no (B, Q, h, w) bool temporary; only a non-finite sum needs the exact test
    # (a sum can also overflow to inf, or be inf - inf, without any NaN in the logits).
    for name, t in (("class_queries_logits", class_logits), ("masks_queries_logits", mask_logits)):
        if not torch.isfinite(t.sum()) and torch.isnan(t).any():
            raise ValueError(f"{fn}: {name} contains NaN; the model output is invalid (check the inputs/weights).")
    return class_logits, mask_logits


def _check_target_sizes(target_sizes: Any, batch_size: int) -> list[tuple[int, int]] | None:
    if target_sizes is None:
        return None
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"Make sure that you pass in as many target sizes as the batch dimension of the logits: got "
            f"{len(target_sizes)} target sizes for a batch of {batch_size}."
        )
    out = []
    for i, hw in enumerate(target_sizes):
        try:
            h, w = (int(v) for v in hw)
        except (TypeError, ValueError):
            raise ValueError(f"target_sizes[{i}] must be a (height, width) pair, got {hw!r}.") from None
        if h <= 0 or w <= 0:
            raise ValueError(f"target_sizes[{i}] must be positive, got {(h, w)}.")
        out.append((h, w))
    return out


def _semantic_scores(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) class scores, transformers' ops (``maskformer.kernels.mask_einsum.mask_einsum_ref``)."""
    from .kernels.mask_einsum import mask_einsum_ref

    return mask_einsum_ref(class_queries_logits, masks_queries_logits)


def semantic_segmentation_ref(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]] | None,
) -> list[torch.Tensor]:
    """Reference semantic segmentation: class-probability-weighted mask sum, resize, argmax.

    `scores[b, c] = sum_q softmax(class)[b, q, c] * sigmoid(mask)[b, q]` over the K real classes,
    bilinearly resized (align_corners=False) to `target_sizes[b]`, then argmax over c: the
    composition of the kernels' references, which is what ``maskformer.dispatch`` runs on the
    "reference" backend and what the fast backends are tested against.

    Args:
        class_queries_logits: `(B, Q, K+1)` float, last class is "no object".
        masks_queries_logits: `(B, Q, h, w)` float.
        target_sizes: None (maps at `(h, w)`) or B `(H_b, W_b)` int pairs.

    Returns:
        list of B `(H_b, W_b)` int64 tensors of class ids in `[0, K)` (first index on ties).
    """
    from .kernels.upsample_argmax import upsample_argmax_ref

    if class_queries_logits.ndim != 3 or masks_queries_logits.ndim != 4:
        raise ValueError(
            f"semantic_segmentation_ref expects (B, Q, K+1) and (B, Q, h, w), got "
            f"{tuple(class_queries_logits.shape)} and {tuple(masks_queries_logits.shape)}."
        )
    scores = _semantic_scores(class_queries_logits, masks_queries_logits)  # (B, K, h, w)
    if target_sizes is not None and len(target_sizes) != scores.shape[0]:
        raise ValueError(f"{len(target_sizes)} target sizes for a batch of {scores.shape[0]}.")
    sizes = None if target_sizes is None else [tuple(int(v) for v in hw) for hw in target_sizes]
    return list(upsample_argmax_ref(scores, sizes))


def binary_mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """Run-length encoding of an `(H, W)` binary mask, transformers' format.

    Row-major scan; returns `[start_1, length_1, start_2, length_2, ...]` (python ints) with
    1-based starts of the runs of ones. (Not COCO's column-major RLE.)
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    pixels = np.concatenate([[0], (np.asarray(mask).reshape(-1) != 0).astype(np.int8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return runs.tolist()


def convert_segmentation_to_rle(segmentation: torch.Tensor) -> list[list[int]]:
    """One RLE (see `binary_mask_to_rle`) per distinct value of an `(H, W)` map, in increasing value order."""
    return [binary_mask_to_rle(segmentation == value) for value in torch.unique(segmentation)]


def _instance_one(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    threshold: float,
    target_size: tuple[int, int] | None,
    return_coco_annotation: bool,
    return_binary_maps: bool,
) -> dict[str, Any]:
    """One image of instance post-processing; `mask_cls` (Q, K+1), `mask_pred` (Q, h, w)."""
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    # Same call as transformers: with sorted=False the order of equal-score candidates (and so the
    # segment ids and which instance is drawn last) is topk's, which we must not change.
    scores_per_query, topk_indices = scores.flatten(0, 1).topk(num_queries, sorted=False)
    labels = topk_indices % num_classes
    query_indices = torch.div(topk_indices, num_classes, rounding_mode="floor")
    mask_pred = mask_pred[query_indices]
    pred_masks = (mask_pred > 0).float()
    flat = pred_masks.flatten(1)
    mask_scores = (mask_pred.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    pred_scores = scores_per_query * mask_scores

    height, width = mask_pred.shape[-2:] if target_size is None else target_size
    # transformers compares `tensor.item() >= threshold` in python (float64): do the same.
    candidates = torch.nonzero(pred_scores.double() >= threshold).flatten()
    pred_masks = pred_masks[candidates]
    if target_size is not None and len(candidates) > 0:
        # Only the candidates are resized (nearest is per channel, so the values are unchanged):
        # 100 queries -> usually < 10 maps at the target size.
        pred_masks = F.interpolate(pred_masks.unsqueeze(0), size=target_size, mode="nearest")[0]
    elif target_size is not None:
        pred_masks = pred_masks.new_zeros((0, height, width))
    segmentation = torch.full((height, width), -1.0, device=mask_pred.device)
    nonempty = pred_masks.flatten(1).any(dim=1).tolist()
    segments, instance_maps = [], []
    for c, j in enumerate(candidates.tolist()):
        if not nonempty[c]:
            continue
        segment_id = len(segments)
        segmentation[pred_masks[c] == 1] = segment_id
        segments.append(
            {
                "id": segment_id,
                "label_id": int(labels[j]),
                "was_fused": False,
                "score": round(float(pred_scores[j]), 6),
            }
        )
        instance_maps.append(pred_masks[c])
    if return_coco_annotation:
        return {"segmentation": [binary_mask_to_rle(m) for m in instance_maps], "segments_info": segments}
    if return_binary_maps:
        maps = (
            torch.stack(instance_maps, dim=0)
            if instance_maps
            else torch.zeros((0, height, width), device=mask_pred.device)
        )
        return {"segmentation": maps, "segments_info": segments}
    return {"segmentation": segmentation, "segments_info": segments}


def _panoptic_one(
    mask_probs: torch.Tensor,
    pred_scores: torch.Tensor,
    pred_labels: torch.Tensor,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: set[int],
    out_size: tuple[int, int],
    resize: bool,
) -> dict[str, Any]:
    """One image of panoptic post-processing on the kept queries: `mask_probs` (N, h, w), scores/labels (N,)."""
    height, width = out_size
    if mask_probs.shape[0] == 0:
        return {
            "segmentation": torch.full((height, width), -1, dtype=torch.int32, device=mask_probs.device),
            "segments_info": [],
        }
    # maskformer.dispatch picks the fused C++ kernel on CPU (no (N, H, W) tensor) or the reference,
    # `query_argmax_ref`: interpolate, `(probs * scores).argmax(0)`, `(probs >= mask_threshold)` areas;
    # identical results either way. owner (H, W): the query that wins each pixel. own_area (N,):
    # deviation 3, the query's own mask, not the score-weighted one (see module docstring).
    from .dispatch import query_argmax

    owner, own_area = query_argmax(mask_probs, pred_scores, out_size if resize else None, mask_threshold)
    n = mask_probs.shape[0]
    won_area = torch.bincount(owner.flatten(), minlength=n)
    # int64 / int64 -> float32, then a python float64 compare: the same rounding as transformers'
    # `(mask_k_area / original_area).item() > threshold`.
    ratio = won_area / own_area
    valid = (won_area > 0) & (own_area > 0) & (ratio.double() > overlap_mask_area_threshold)

    ids = torch.zeros(n, dtype=torch.int32, device=mask_probs.device)
    segments: list[dict[str, Any]] = []
    fused_ids: dict[int, int] = {}
    for k in torch.nonzero(valid).flatten().tolist():
        label = int(pred_labels[k])
        should_fuse = label in label_ids_to_fuse
        if should_fuse and label in fused_ids:
            ids[k] = fused_ids[label]  # deviation 2: merged into the first segment, no new entry
            continue
        segment_id = len(segments) + 1  # deviation 1: never reuses an id
        ids[k] = segment_id
        segments.append(
            {"id": segment_id, "label_id": label, "was_fused": should_fuse, "score": round(float(pred_scores[k]), 6)}
        )
        if should_fuse:
            fused_ids[label] = segment_id
    # Pixels of rejected queries keep 0 (their lookup entry is 0).
    return {"segmentation": ids[owner], "segments_info": segments}

