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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .inputs import NAN, nan_inf_flags
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
    pixel_mask: torch.Tensor | np.ndarray | None = None,
) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
    """`MaskFormerImageProcessor.post_process_semantic_segmentation` (documented there)."""
    fn = "post_process_semantic_segmentation"
    class_logits, mask_logits = _check_outputs(outputs, fn)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0], fn)
    extents = valid_extents(pixel_mask, mask_logits, fn)
    num_classes = class_logits.shape[-1] - 1
    if not return_segmentation_scores:
        # maskformer.dispatch picks the fused kernels (C++ on CPU, Triton on CUDA) or
        # semantic_segmentation_ref's computation, per MASKFORMER_BACKEND / set_backend.
        from . import dispatch

        _check_memory(sizes, 8, fn, mask_logits.device)
        kwargs = {} if extents is None else {"source_extents": extents}
        with _memory_errors_name(fn, sizes):
            return dispatch.semantic_segmentation(class_logits, mask_logits, sizes, **kwargs)
    _check_memory(sizes, 8 + 4 * num_classes, fn, mask_logits.device)
    scores = _semantic_scores(class_logits, mask_logits)
    results = []
    with _memory_errors_name(fn, sizes):
        for i in range(scores.shape[0]):
            s = scores[i]
            if extents is not None:
                s, scales = crop_to_extent(s, extents[i])
                if sizes is not None:
                    s = _resize(s, sizes[i], scales, "bilinear")
            elif sizes is not None:
                s = F.interpolate(s[None], size=sizes[i], mode="bilinear", align_corners=False)[0]
            results.append(SemanticSegmentationResult(segmentation=s.argmax(dim=0), segmentation_scores=s))
    return results


def instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    return_coco_annotation: bool | None = False,
    return_binary_maps: bool | None = False,
    pixel_mask: torch.Tensor | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """`MaskFormerImageProcessor.post_process_instance_segmentation` (documented there)."""
    fn = "post_process_instance_segmentation"
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
    threshold = _check_fraction(threshold, "threshold", fn)
    class_logits, mask_logits = _check_outputs(outputs, fn)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0], fn)
    extents = valid_extents(pixel_mask, mask_logits, fn)
    _check_memory(sizes, 8, fn, mask_logits.device)
    with _memory_errors_name(fn, sizes):
        return [
            _instance_one(
                class_logits[i],
                mask_logits[i],
                threshold,
                None if sizes is None else sizes[i],
                bool(return_coco_annotation),
                bool(return_binary_maps),
                None if extents is None else extents[i],
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
    pixel_mask: torch.Tensor | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """`MaskFormerImageProcessor.post_process_panoptic_segmentation` (documented there)."""
    fn = "post_process_panoptic_segmentation"
    threshold = _check_fraction(threshold, "threshold", fn)
    mask_threshold = _check_fraction(mask_threshold, "mask_threshold", fn)
    overlap_mask_area_threshold = _check_fraction(overlap_mask_area_threshold, "overlap_mask_area_threshold", fn)
    class_logits, mask_logits = _check_outputs(outputs, fn)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0], fn)
    extents = valid_extents(pixel_mask, mask_logits, fn)
    _check_memory(sizes, 16, fn, mask_logits.device)  # the int32 map, the int64 owner map, the id lookup
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
    with _memory_errors_name(fn, sizes):
        for i in range(class_logits.shape[0]):
            extent = None if extents is None else extents[i]
            if sizes is not None:
                out_size = sizes[i]
            elif extent is not None:
                out_size = (math.ceil(extent[0]), math.ceil(extent[1]))
            else:
                out_size = tuple(mask_logits.shape[-2:])
            results.append(
                _panoptic_one(
                    mask_probs[i][keep[i]],
                    pred_scores[i][keep[i]],
                    pred_labels[i][keep[i]],
                    mask_threshold,
                    overlap_mask_area_threshold,
                    fuse,
                    out_size,
                    sizes is not None,
                    extent,
                )
            )
    return results


# ---------------------------------------------------------------------------------------------
# Cropping each image's valid region (the opt-in `pixel_mask=` of every post_process_*)
# ---------------------------------------------------------------------------------------------
def valid_extents(pixel_mask: Any, mask_logits: torch.Tensor, fn: str) -> list[tuple[float, float]] | None:
    """Per image, the `(rows, cols)` of the mask logits that hold the image, not batch padding.

    Args:
        pixel_mask: None, or the processor's `(B, H, W)` mask (1 on image pixels, 0 on padding;
            each image's ones must be a top-left rectangle, as the processor pads bottom/right).
        mask_logits: `(B, Q, h, w)`; the logits cover the padded input at stride `s = H / h`
            (4 for MaskFormer; when H is not a multiple of h the backbone padded the input up to
            one, so `s = ceil(H / h)`).

    Returns:
        None when there is no pixel_mask or no image has padding; else B `(vh / s, vw / s)` float
        pairs (`vh`, `vw`: the image's rows and columns in the mask), capped at `(h, w)`: the
        fractional extent of each image in logit rows and columns.
    """
    if pixel_mask is None:
        return None
    if isinstance(pixel_mask, np.ndarray):
        pixel_mask = torch.from_numpy(pixel_mask)
    if not isinstance(pixel_mask, torch.Tensor):
        raise TypeError(f"{fn}: pixel_mask must be the processor's (batch, height, width) tensor, got "
                        f"{type(pixel_mask).__name__}.")
    b, _, h, w = mask_logits.shape
    if pixel_mask.ndim != 3 or pixel_mask.shape[0] != b:
        raise ValueError(f"{fn}: pixel_mask must be (batch, height, width) with batch {b} (the logits'), got shape "
                         f"{tuple(pixel_mask.shape)}; pass the `pixel_mask` the processor returned with these inputs.")
    big_h, big_w = pixel_mask.shape[1:]
    if big_h < h or big_w < w:
        raise ValueError(f"{fn}: pixel_mask is {big_h}x{big_w}, smaller than the mask logits' {h}x{w}; pass the "
                         "processor's pixel_mask (at the input resolution).")
    valid = pixel_mask.detach().to("cpu") != 0
    rows, cols = valid.any(dim=2), valid.any(dim=1)
    vh, vw = rows.sum(dim=1), cols.sum(dim=1)
    stride_h = big_h // h if big_h % h == 0 else math.ceil(big_h / h)
    stride_w = big_w // w if big_w % w == 0 else math.ceil(big_w / w)
    extents = []
    for i in range(b):
        hi, wi = int(vh[i]), int(vw[i])
        if hi == 0 or wi == 0:
            raise ValueError(f"{fn}: pixel_mask[{i}] has no valid pixel; every image needs at least one.")
        if int(valid[i].sum()) != hi * wi or not bool(valid[i, :hi, :wi].all()):
            raise ValueError(f"{fn}: pixel_mask[{i}] is not a top-left rectangle of ones (the processor pads images "
                             "bottom/right); pass the processor's pixel_mask.")
        extents.append((min(hi / stride_h, float(h)), min(wi / stride_w, float(w))))
    if all(e == (float(h), float(w)) for e in extents):
        return None  # nothing to crop: the same computation as without pixel_mask
    return extents


def crop_to_extent(x: torch.Tensor, extent: tuple[float, float]) -> tuple[torch.Tensor, tuple[float | None, float | None]]:
    """`x[..., :ceil(eh), :ceil(ew)]` (a view) and aten's `scales` for a resize that maps the
    extent onto the output: `(H / eh, W / ew)` per axis, None where the extent is a whole number
    of rows/columns (then the crop is resized exactly as `F.interpolate` resizes it)."""
    eh, ew = extent
    ch, cw = math.ceil(eh), math.ceil(ew)
    return x[..., :ch, :cw], (None if float(eh).is_integer() else eh, None if float(ew).is_integer() else ew)


def _resize(x: torch.Tensor, size: tuple[int, int], extents: tuple[float | None, float | None], mode: str):
    """`(C, h, w)` -> `(C, H, W)`: aten's bilinear (align_corners=False) or nearest resize, with
    `scales_h = H / eh` where an extent is fractional (so source row `eh` lands on output row H)."""
    sh = None if extents[0] is None else size[0] / extents[0]
    sw = None if extents[1] is None else size[1] / extents[1]
    if mode == "bilinear":
        return torch.ops.aten.upsample_bilinear2d(x[None], list(size), False, sh, sw)[0]
    return torch.ops.aten.upsample_nearest2d(x[None], list(size), sh, sw)[0]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _check_fraction(value: Any, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: {name} must be a number in [0, 1], got {value!r}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}.")
    return value


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(sizes: list[tuple[int, int]] | None, bytes_per_pixel: int, fn: str, device: torch.device) -> None:
    """Refuse, naming the argument, a target size whose output alone cannot fit in memory."""
    if sizes is None:
        return
    available = _available_bytes(device)
    if available is None:
        return
    for i, (h, w) in enumerate(sizes):
        need = h * w * bytes_per_pixel
        if need > available:
            raise ValueError(
                f"{fn}: target_sizes[{i}] = {(h, w)} needs about {need / 2**30:.1f} GiB for its maps, more than the "
                f"{available / 2**30:.1f} GiB of {device.type} memory available; pass a smaller target size."
            )


class _memory_errors_name:
    """Turn an allocator failure inside post-processing into an error that names target_sizes."""

    def __init__(self, fn: str, sizes: list[tuple[int, int]] | None):
        self.fn, self.sizes = fn, sizes

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, (RuntimeError, MemoryError)):
            return False
        text = str(exc).lower()
        if not isinstance(exc, MemoryError) and "alloc" not in text and "out of memory" not in text:
            return False
        largest = max(self.sizes, key=lambda s: s[0] * s[1]) if self.sizes else None
        raise MemoryError(
            f"{self.fn}: ran out of memory"
            + (f" producing maps of up to {largest[0]}x{largest[1]} (target_sizes); pass smaller target sizes"
               if largest else "; the logits are too large for this machine")
            + f" ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


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
    # Both tensors in one check and one read (nan_inf_flags: a fused launch on CUDA; on the CPU one
    # sum per tensor, the exact test only when a sum is not finite). Infinities pass, as before.
    if class_logits.device == mask_logits.device:
        flags = nan_inf_flags(class_logits, mask_logits)
    else:  # checked one by one; where they meet, the kernels refuse the mix with a clear message
        flags = nan_inf_flags(class_logits) + nan_inf_flags(mask_logits)
    for name, found in zip(("class_queries_logits", "masks_queries_logits"), flags):
        if found & NAN:
            raise ValueError(f"{fn}: {name} contains NaN; the model output is invalid (check the inputs/weights).")
    return class_logits, mask_logits


def _check_target_sizes(target_sizes: Any, batch_size: int, fn: str = "post_process") -> list[tuple[int, int]] | None:
    if target_sizes is None:
        return None
    if isinstance(target_sizes, torch.Tensor):
        if target_sizes.is_floating_point() or target_sizes.dtype == torch.bool:
            raise TypeError(f"{fn}: target_sizes must hold integers (height, width), got a {target_sizes.dtype} tensor.")
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"Make sure that you pass in as many target sizes as the batch dimension of the logits: got "
            f"{len(target_sizes)} target sizes for a batch of {batch_size}."
        )
    out = []
    for i, hw in enumerate(target_sizes):
        try:
            values = list(hw.tolist() if isinstance(hw, (torch.Tensor, np.ndarray)) else hw)
        except TypeError:
            raise ValueError(f"{fn}: target_sizes[{i}] must be a (height, width) pair, got {hw!r}.") from None
        values = [v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()
                  and v.dtype != torch.bool else v for v in values]
        if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"{fn}: target_sizes[{i}] must be a (height, width) pair of ints, got {hw!r}.")
        h, w = int(values[0]), int(values[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"target_sizes[{i}] must be positive, got {(h, w)}.")
        out.append((h, w))
    return out


def _semantic_scores(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) class scores, transformers' ops (``maskformer.kernels.mask_einsum.mask_einsum_ref``)."""
    # op modules load on first use, as dispatch does: `import maskformer` loads no op
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
    # op modules load on first use, as dispatch does: `import maskformer` loads no op
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
    extent: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One image of instance post-processing; `mask_cls` (Q, K+1), `mask_pred` (Q, h, w); `extent`:
    the image's valid region of the masks (see `valid_extents`), None for the whole (transformers)."""
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    scales: tuple[float | None, float | None] = (None, None)
    if extent is not None:
        mask_pred, scales = crop_to_extent(mask_pred, extent)
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
    candidates = torch.nonzero(pred_scores.double() >= threshold).flatten().tolist()
    segmentation = torch.full((height, width), -1.0, device=mask_pred.device)
    segments, instance_maps = [], []
    keep_maps = return_coco_annotation or return_binary_maps
    for j in candidates:
        # One candidate at a time at the target size (nearest is per mask, so this is the batched
        # F.interpolate's result): one (H, W) map alive, not (candidates, H, W).
        mask = pred_masks[j]
        if target_size is not None:
            if extent is None:
                mask = F.interpolate(mask[None, None], size=target_size, mode="nearest")[0, 0]
            else:
                mask = _resize(mask[None], target_size, scales, "nearest")[0]
        on = mask == 1
        if not bool(on.any()):
            continue
        segment_id = len(segments)
        segmentation[on] = segment_id
        segments.append(
            {
                "id": segment_id,
                "label_id": int(labels[j]),
                "was_fused": False,
                "score": round(float(pred_scores[j]), 6),
            }
        )
        if keep_maps:
            instance_maps.append(mask)
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
    extent: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One image of panoptic post-processing on the kept queries: `mask_probs` (N, h, w), scores/labels (N,);
    `extent`: the image's valid region of the masks (see `valid_extents`), None for the whole."""
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

    kwargs = {} if extent is None else {"source_extent": extent}
    owner, own_area = query_argmax(mask_probs, pred_scores, out_size if resize else None, mask_threshold, **kwargs)
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

