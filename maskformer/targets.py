"""Training targets for MaskFormer: segmentation maps to per-segment binary masks and class ids.

What `MaskFormerImageProcessor.preprocess(images, segmentation_maps=...)` adds to the batch:
`mask_labels` (one `(N_i, H, W)` float32 stack of binary masks per image, padded like the pixels)
and `class_labels` (`(N_i,)` int64), transformers' encoding (deviations 7, 12, 13, 15 of
`maskformer.processing` aside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .preprocessing import _tensor_to_numpy


def _seg_map_to_2d(seg: Any, where: str) -> np.ndarray:
    """One segmentation map -> `(H, W)` int64 numpy array of labels."""
    if isinstance(seg, PIL.Image.Image):
        arr = np.array(seg)
    elif isinstance(seg, torch.Tensor):
        arr = _tensor_to_numpy(seg)
    else:
        arr = seg
    if arr.ndim != 2:
        raise ValueError(
            f"{where} has shape {tuple(arr.shape)}; a segmentation map must be a single-channel (H, W) label map "
            "(a PIL image of mode 'L', 'P', 'I' or an integer array)."
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{where} is a float map with non-integer or non-finite values; labels must be integers.")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where} has dtype {arr.dtype}; expected integer labels.")
    return arr.astype(np.int64)


def _resize_label_map(seg: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """NEAREST-resize an `(H, W)` int64 label map with Pillow; returns `(h, w)` int64.

    Labels in 0..255 use mode "L" (transformers' path); wider labels use mode "I" (int32), which
    Pillow samples at the same source pixels (NEAREST picks pixels, it never mixes values).
    """
    lo, hi = int(seg.min()), int(seg.max())
    if 0 <= lo and hi <= 255:
        pil = PIL.Image.fromarray(seg.astype(np.uint8))
    elif -(2**31) <= lo and hi < 2**31:
        pil = PIL.Image.fromarray(seg.astype(np.int32))
    else:
        raise ValueError(f"segmentation labels in [{lo}, {hi}] do not fit in int32.")
    return np.array(pil.resize((size_hw[1], size_hw[0]), resample=PIL.Image.Resampling.NEAREST)).astype(np.int64)


def _label_map_to_binary_masks(
    labels: np.ndarray,
    instance_id_to_semantic_id: Mapping[int, int] | None,
    ignore_index: int | None,
    do_reduce_labels: bool,
    where: str,
    padded_hw: tuple[int, int] | None = None,
    fill: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`(H, W)` int64 label map -> (`(N, H', W')` float32 binary masks, `(N,)` int64 class ids).

    One mask per distinct label (ascending), `ignore_index` excluded. With `padded_hw`, masks are
    written straight into `(N, *padded_hw)` arrays pre-filled with `fill` (no bool intermediate and
    no second copy: at 150 labels x 800 x 1088 that is 0.5 GB saved per image).
    """
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError("If `do_reduce_labels` is True, `ignore_index` must be provided (e.g. 255).")
        labels = np.where(labels == 0, ignore_index, labels - 1)
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < (1 << 20):
        ids = np.flatnonzero(np.bincount(labels.ravel(), minlength=hi + 1)).astype(np.int64)  # O(n), sorted
    else:
        ids = np.unique(labels)
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    h, w = labels.shape
    out_h, out_w = padded_hw if padded_hw is not None else (h, w)
    if (out_h, out_w) == (h, w):
        masks = np.empty((len(ids), h, w), dtype=np.float32)
    else:
        masks = np.full((len(ids), out_h, out_w), fill, dtype=np.float32)
    for k, label in enumerate(ids):
        np.equal(labels, label, out=masks[k, :h, :w])
    if instance_id_to_semantic_id is None:
        return masks, ids.astype(np.int64)
    offset = 1 if do_reduce_labels else 0
    keys = [int(i) + offset for i in ids]
    missing = [k for k in keys if k not in instance_id_to_semantic_id]
    if missing:
        raise ValueError(
            f"{where}: instance ids {missing} appear in the segmentation map but not in instance_id_to_semantic_id "
            f"(which has {sorted(instance_id_to_semantic_id)[:20]}); add them to the mapping."
        )
    classes = np.array([instance_id_to_semantic_id[k] - offset for k in keys], dtype=np.int64)
    return masks, classes


def encode_targets(
    seg_list: list[np.ndarray],
    instance_id_to_semantic_id: Any,
    ignore_index: int | None,
    do_reduce_labels: bool,
    padded_hw: tuple[int, int],
) -> dict[str, list[np.ndarray]]:
    """`(h_i, w_i)` int64 label maps (already resized like their images) -> `mask_labels` (list of
    `(N_i, *padded_hw)` float32) and `class_labels` (list of `(N_i,)` int64), padded like the pixels."""
    if isinstance(instance_id_to_semantic_id, Sequence) and not isinstance(instance_id_to_semantic_id, Mapping):
        if len(instance_id_to_semantic_id) != len(seg_list):
            raise ValueError(
                f"instance_id_to_semantic_id has {len(instance_id_to_semantic_id)} dicts for {len(seg_list)} maps; "
                "pass one dict per segmentation map (or a single dict for all)."
            )
        mappings = list(instance_id_to_semantic_id)
    else:
        mappings = [instance_id_to_semantic_id] * len(seg_list)
    # transformers pads the binary masks with ignore_index; with no ignore_index it crashes, we use 0.
    fill = 0.0 if ignore_index is None else float(ignore_index)
    mask_labels, class_labels = [], []
    for i, (seg, mapping) in enumerate(zip(seg_list, mappings)):
        masks, classes = _label_map_to_binary_masks(
            seg, mapping, ignore_index, do_reduce_labels, f"segmentation_maps[{i}]", padded_hw, fill
        )
        mask_labels.append(masks)
        class_labels.append(classes)
    return {"mask_labels": mask_labels, "class_labels": class_labels}
