"""MaskFormer image processing: pre-processing for the model and post-processing of its outputs.

`MaskFormerImageProcessor` is our own implementation of transformers' class of the same name
(transformers 5.23). Without torchvision, transformers resolves that name to its PIL/NumPy backend
(`MaskFormerImageProcessorPil`); that backend is the oracle we match, number for number:

* resize: output size from `size` (`shortest_edge`+`longest_edge`, `height`+`width` or
  `max_height`+`max_width`) with transformers' rounding (`int()` truncation, `round()` on the
  clamped short side), then each side rounded *up* to a multiple of `size_divisor` (the image is
  stretched to it, not padded); the pixels are resampled by Pillow after the same uint8
  conversion transformers does (floats in [0, 1] are scaled by 255 and *truncated*),
* rescale in float64 then cast to float32, normalise in float32, pad bottom/right with zeros to
  the largest image of the batch, `pixel_mask` 1 on real pixels,
* segmentation maps resized with Pillow NEAREST, split into one binary mask per label.

Apart from the deviations listed below, the result is bit-identical to transformers for every
input transformers accepts (the tests check `torch.equal`). With torchvision installed,
transformers defaults to its torchvision backend instead, whose antialiased tensor resize differs
from Pillow's by small amounts; that backend is not what we match.

The post-processing functions accept any object with `class_queries_logits`
`(B, Q, K+1)` and `masks_queries_logits` `(B, Q, h, w)` (transformers' output objects included)
and run the same torch ops as transformers so ties and float rounding resolve identically. The
semantic maps and the panoptic per-pixel step (resize, score-weighted argmax over queries, mask
areas) go through `maskformer.dispatch`: on CPU its C++ kernels reproduce those torch ops bit for
bit without the full-resolution (classes or queries, H, W) tensors; `MASKFORMER_BACKEND=reference`
runs the torch ops themselves.

transformers is *not* imported here: it is a test-only dependency.

Deviations from transformers
----------------------------
Each one has a test in `tests/test_processing.py` (named in brackets).

Bug fixes: transformers returns a wrong or self-contradictory result.

1. Panoptic: segment ids are never reused. transformers resets its id counter to the id of a fused
   label when it meets a second instance of that label, so the next new segment receives an id
   that is already taken by another segment (two different segments share one id in the map and
   in `segments_info`). We keep a separate, monotonically increasing counter.
   [test_panoptic_fused_ids_are_unique]
2. Panoptic: one `segments_info` entry per segment id. transformers appends an entry for every
   fused *instance*, so a fused label appears several times with the same id (and different
   scores). As in the original implementation (facebookresearch MaskFormer / Mask2Former
   `panoptic_inference`, which `continue`s), later instances of a fused label are merged into the
   first one's segment and add no entry; that entry keeps the score of the first (lowest-index)
   query. [test_panoptic_fused_ids_are_unique]
3. Panoptic: the overlap test compares a segment's area with the area of its query's *own* mask,
   `sigmoid(mask) >= mask_threshold`. transformers multiplies the probabilities by the class score
   in place before thresholding, so it measures `score * sigmoid(mask) >= mask_threshold`; with
   `threshold < mask_threshold` every query whose score is below `mask_threshold` is silently
   dropped (its "original area" is 0), and in general boundary pixels are miscounted. The original
   `panoptic_inference` thresholds the unweighted mask (`cur_masks[k] >= 0.5`, the score-weighted
   copy `cur_prob_masks` only feeds the argmax). [test_panoptic_low_score_segments_survive]
4. Panoptic: when no query survives, `segmentation` is int32 (filled with -1) like the non-empty
   case; transformers returns a float32 map there. [test_panoptic_empty_result_dtype]
5. Instance, `return_coco_annotation=True`: one RLE per entry of `segments_info`, in the same order,
   each encoding that instance's own binary mask (so overlapping instances stay intact, which is
   what the transformers docstring promises). transformers encodes every distinct value of the
   overlaid id map instead: the background (-1) comes first, instances hidden by later ones vanish,
   so `rle[i]` does not describe `segments_info[i]`. The RLE format itself
   (`binary_mask_to_rle`: row-major, 1-based start / length pairs) is unchanged.
   [test_instance_coco_rle_aligned_with_segments]
6. Instance, `return_binary_maps=True` with no instance found: an empty `(0, H, W)` float32 tensor
   instead of transformers' `(H, W)` map of -1. [test_instance_binary_maps_empty]
7. Segmentation maps with `do_reduce_labels=True` and an `ignore_index` outside 0..255 (e.g. -100):
   transformers computes on uint8 and wraps the ignore value (-100 becomes class 156, 1000 becomes
   232), so ignored pixels turn into a real class mask. We compute on int64.
   [test_reduce_labels_ignore_index_outside_uint8]
8. Legacy config keys `reduce_labels` and `size_divisibility` (found in older hub configs such as
   facebook/maskformer-swin-*-ade) are honoured as `do_reduce_labels` / `size_divisor` (as
   transformers 4.x did); 5.23 silently ignores them. The new names win when both are given.
   [test_legacy_keys_are_honoured]
9. `pixel_values` are always float32. transformers returns uint8 when `do_rescale` and
   `do_normalize` are both off, and float64 for float64 input that is not rescaled.
   [test_pixel_values_always_float32]

Inputs transformers rejects or crashes on, which we process:

10. `size={"shortest_edge": n}` (also what `size=n` without `max_size` becomes): transformers'
    MaskFormer resize lacks this branch and raises. We use the rule of transformers' generic
    backend (`get_resize_output_image_size`: short side = n, long side = int(n * long / short)).
    A dict size with only `shortest_edge` plus a legacy `max_size` gets `longest_edge = max_size`.
    [test_shortest_edge_only]
11. Non-RGB images by default: transformers' default `do_convert_rgb=None` leaves grayscale, RGBA,
    palette ... images alone and then fails in `normalize`; we convert them exactly as transformers
    does with `do_convert_rgb=True` (Pillow `convert("RGB")`, alpha composited onto white).
    [test_pixel_parity_modes]
12. Segmentation maps with `ignore_index=None` (the default) in a batch that needs padding:
    transformers crashes ("Unsupported format: None"); we pad the binary masks with 0.
    [test_seg_ignore_index_none_mixed_sizes]
13. Segmentation labels above 255 with `do_resize=True`: transformers' PIL backend can only resize
    uint8 maps; we resize int maps with the identical Pillow NEAREST sampling (mode "I").
    [test_seg_labels_above_255, test_nearest_label_resize_matches_uint8_path]
14. `pad_size` given as a plain dict at call time (transformers only takes its `SizeDict` there).
    [test_pad_size]

Stricter validation: transformers silently gives a wrong result, or fails with an unrelated error.

15. A segmentation map whose (H, W) differs from its image's is an error (transformers resizes it on
    its own aspect ratio and returns misaligned masks). Also: empty batch, NaN/inf pixels, 2 or 5+
    channels, wrong rank, bad `target_sizes` length (transformers' instance/panoptic silently use
    the first B entries of a longer list), NaN logits, a resize to a zero-sized side, float
    segmentation maps with non-integer values, unknown `instance_id_to_semantic_id` ids.
    [test_bad_*]
16. Float images whose values all lie in [0, 1] with `do_rescale=True` get a warning (they are
    rescaled twice, as in transformers; the numbers are unchanged). [test_warns_double_rescale]

Loading:

17. `from_pretrained` reads `preprocessor_config.json` and only falls back to the
    `"image_processor"` entry of `processor_config.json` when the former is absent; transformers
    prefers the `processor_config.json` entry when both files exist (they normally agree).
    [test_config_file_priority]

Not changed, on purpose (parity kept, noted for users):

* With `ignore_index` set, padding pixels of `mask_labels` hold `ignore_index` (e.g. 255.0) in
  binary 0/1 masks, as in transformers (both backends, and 4.x).
* Panoptic pixels are assigned by argmax of score-weighted probabilities only (the original
  MaskFormer also requires `sigmoid >= 0.5`); pixels of rejected segments are 0.
* Instance ids start at 0 and the background of the instance map is -1 (float32), as in
  transformers; panoptic ids start at 1.
* The RLE is transformers' row-major "start, length" encoding, not COCO's column-major one.

Changes with no effect on results: instance post-processing allocates its maps on the logits'
device (transformers allocates on the CPU and so fails for CUDA logits; untested here, no GPU), and
only the candidate masks are resized to `target_sizes`; `label_ids_to_fuse=None` logs nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

__all__ = [
    "BatchFeature",
    "MaskFormerImageProcessor",
    "SemanticSegmentationResult",
    "binary_mask_to_rle",
    "convert_segmentation_to_rle",
    "get_output_image_size",
    "semantic_segmentation_ref",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"

# Keys transformers writes into configs that carry no processing meaning.
_SERVICE_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "_max_size", "_auto_class"}
_VALID_SIZE_KEY_SETS = (
    frozenset({"shortest_edge", "longest_edge"}),
    frozenset({"shortest_edge"}),
    frozenset({"height", "width"}),
    frozenset({"max_height", "max_width"}),
)
_CALL_ONLY_KEYS = ("return_tensors", "input_data_format", "device")


# ---------------------------------------------------------------------------------------------
# Output container
# ---------------------------------------------------------------------------------------------
class BatchFeature(dict):
    """A dict whose keys are also attributes: `out["pixel_values"]` == `out.pixel_values`.

    Being a real `dict`, it unpacks into a model call: `model(**out)`.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}; keys: {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move every tensor (and every tensor inside a list value) with `Tensor.to(*args, **kwargs)`.

        Integer tensors are only moved between devices, never cast to a float dtype, so
        `out.to(torch.float16)` leaves `pixel_mask` and `class_labels` int64.
        """

        def move(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device")
            for a in args:
                if isinstance(a, (str, torch.device)):
                    device = a
            return t.to(device) if device is not None else t

        for key, value in list(self.items()):
            if isinstance(value, list):
                self[key] = [move(v) for v in value]
            else:
                self[key] = move(value)
        return self


class SemanticSegmentationResult(BatchFeature):
    """One image's semantic result when `return_segmentation_scores=True`.

    Keys / attributes:
        segmentation: `(H, W)` int64 class ids.
        segmentation_scores: `(K, H, W)` float, the per-class scores whose argmax is `segmentation`.
    """


# ---------------------------------------------------------------------------------------------
# Size arithmetic (transformers' rounding, reproduced exactly)
# ---------------------------------------------------------------------------------------------
def _normalize_size(size: Any, max_size: int | None = None, param: str = "size") -> dict[str, int]:
    """Turn an int / (h, w) / dict / SizeDict-like `size` into one of the supported dicts.

    Returns a new dict with one of the key sets `{shortest_edge, longest_edge}`, `{shortest_edge}`,
    `{height, width}`, `{max_height, max_width}`; values are positive ints.
    """
    if isinstance(size, bool):
        raise TypeError(f"`{param}` must be an int, a (height, width) pair or a dict, got a bool.")
    if isinstance(size, int):
        out = {"shortest_edge": size}
        if max_size is not None:
            out["longest_edge"] = max_size
    elif isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"`{param}` as a sequence must be (height, width), got {size!r}.")
        out = {"height": size[0], "width": size[1]}
    else:
        if not isinstance(size, Mapping):
            try:  # transformers' SizeDict iterates as (key, value) pairs of its set fields
                size = dict(size)
            except (TypeError, ValueError):
                raise TypeError(
                    f"`{param}` must be an int, a (height, width) pair or a dict, got {type(size).__name__}."
                ) from None
        out = {k: v for k, v in size.items() if v is not None}
        if set(out) == {"shortest_edge"} and max_size is not None:
            out["longest_edge"] = max_size
    keys = frozenset(out)
    if keys not in _VALID_SIZE_KEY_SETS:
        raise ValueError(
            f"`{param}` must have the keys {{'shortest_edge', 'longest_edge'}}, {{'shortest_edge'}}, "
            f"{{'height', 'width'}} or {{'max_height', 'max_width'}}; got {sorted(out)}. "
            "A `longest_edge` alone is not supported: add a `shortest_edge`."
        )
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"`{param}[{k!r}]` must be a positive int, got {v!r}.")
        out[k] = int(v)
    return out


def _normalize_pad_size(pad_size: Any) -> dict[str, int] | None:
    if pad_size is None:
        return None
    if isinstance(pad_size, int) and not isinstance(pad_size, bool):
        pad_size = {"height": pad_size, "width": pad_size}
    out = _normalize_size(pad_size, param="pad_size")
    if set(out) != {"height", "width"}:
        raise ValueError(f"`pad_size` must have the keys 'height' and 'width', got {sorted(out)}.")
    return out


def _shortest_longest_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    # Same float expressions as transformers' get_size_with_aspect_ratio: the order of the
    # multiplications and the int()/round() calls decide the last pixel.
    short_target = shortest
    raw_short = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * short_target > longest:
        raw_short = longest * lo / hi
        short_target = int(round(raw_short))
    if (height <= width and height == short_target) or (width <= height and width == short_target):
        return height, width
    if width < height:
        new_w = short_target
        new_h = int(raw_short * height / width) if raw_short is not None else int(short_target * height / width)
    else:
        new_h = short_target
        new_w = int(raw_short * width / height) if raw_short is not None else int(short_target * width / height)
    return new_h, new_w


def _shortest_only_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    # transformers' generic get_resize_output_image_size(default_to_square=False, max_size=None).
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def get_output_image_size(height: int, width: int, size: Mapping[str, int], size_divisor: int = 0) -> tuple[int, int]:
    """Size `(new_height, new_width)` an `(height, width)` image is resized to.

    Args:
        height, width: input size in pixels (>= 1).
        size: a normalised size dict (see `MaskFormerImageProcessor`).
        size_divisor: when > 0, each side is rounded *up* to a multiple of it (the image is
            stretched to that size, as transformers does).
    """
    keys = set(size)
    if keys == {"shortest_edge", "longest_edge"}:
        new_h, new_w = _shortest_longest_size(height, width, size["shortest_edge"], size["longest_edge"])
    elif keys == {"shortest_edge"}:
        new_h, new_w = _shortest_only_size(height, width, size["shortest_edge"])
    elif keys == {"max_height", "max_width"}:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        new_h, new_w = int(height * scale), int(width * scale)
    elif keys == {"height", "width"}:
        new_h, new_w = size["height"], size["width"]
    else:
        raise ValueError(f"Unsupported size dict {dict(size)}.")
    if size_divisor and size_divisor > 0:
        new_h = int(math.ceil(new_h / size_divisor) * size_divisor)
        new_w = int(math.ceil(new_w / size_divisor) * size_divisor)
    return new_h, new_w


# ---------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------
def _is_image_like(x: Any) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _flatten_inputs(items: Any, expected_ndim: int, what: str) -> list[Any]:
    """One image / one batch array / a (nested) list of them -> flat list of single items."""
    if _is_image_like(items):
        items = [items]
    elif not isinstance(items, (list, tuple)):
        raise TypeError(
            f"{what} must be a PIL image, a numpy array, a torch tensor or a list of them; "
            f"got {type(items).__name__}."
        )
    flat: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten_inputs(item, expected_ndim, f"{what}[{i}]") if len(item) else [])
            continue
        if isinstance(item, PIL.Image.Image):
            flat.append(item)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            if item.ndim == expected_ndim:
                flat.append(item)
            elif item.ndim == expected_ndim + 1:
                flat.extend(list(item))
            else:
                layout = "(C, H, W) or (H, W, C)" if expected_ndim == 3 else "(H, W)"
                raise ValueError(
                    f"{what}[{i}] has shape {tuple(item.shape)} (rank {item.ndim}); expected rank {expected_ndim} "
                    f"{layout}, or rank {expected_ndim + 1} for a batch of them."
                )
        else:
            raise TypeError(
                f"{what}[{i}] is a {type(item).__name__}; expected a PIL image, a numpy array or a torch tensor."
            )
    return flat


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _pil_to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    # transformers' convert_to_rgb: any transparency is composited onto white first.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _infer_channel_axis(shape: tuple[int, ...], where: str) -> int:
    # transformers' rule with num_channels=(1, 3, 4): channels-first wins when both ends fit.
    first_ok, last_ok = shape[0] in (1, 3, 4), shape[2] in (1, 3, 4)
    if first_ok:
        return 0
    if last_ok:
        return 2
    raise ValueError(
        f"{where} has shape {shape}: cannot find a channel axis of size 1, 3 or 4 first or last. "
        "Images must be RGB (3 channels), grayscale (1) or RGBA (4) in (C, H, W) or (H, W, C) layout; "
        "convert other channel counts (e.g. 2 or 5) to RGB first."
    )


def _image_to_chw(image: Any, do_convert_rgb: bool | None, input_data_format: str | None, where: str) -> np.ndarray:
    """One input image -> `(3, H, W)` numpy array, dtype as given (bool becomes uint8)."""
    if isinstance(image, PIL.Image.Image):
        if do_convert_rgb or (do_convert_rgb is None and image.mode != "RGB"):
            image = _pil_to_rgb(image)
        arr = np.array(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = np.moveaxis(arr, -1, 0)
        if arr.shape[0] != 3:
            raise ValueError(
                f"{where} is a PIL image of mode {image.mode!r} ({arr.shape[0]} channels) and do_convert_rgb=False; "
                "pass do_convert_rgb=True (or None) to convert it to RGB."
            )
        return arr

    arr = _tensor_to_numpy(image) if isinstance(image, torch.Tensor) else image
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{where} has dtype {arr.dtype}; expected an integer or floating dtype.")
    if input_data_format is None:
        axis = _infer_channel_axis(tuple(arr.shape), where)
    elif input_data_format in ("channels_first", "first"):
        axis = 0
    elif input_data_format in ("channels_last", "last"):
        axis = 2
    else:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}.")
    hwc = np.moveaxis(arr, axis, -1)
    channels = hwc.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{where} has {channels} channels (shape {tuple(arr.shape)}); expected 1, 3 or 4. "
            "Convert it to RGB first."
        )
    if np.issubdtype(hwc.dtype, np.floating) and not np.isfinite(hwc).all():
        raise ValueError(f"{where} contains NaN or infinite values; clean the image before preprocessing.")
    if channels != 3:
        if do_convert_rgb is False:
            raise ValueError(
                f"{where} has {channels} channel(s) and do_convert_rgb=False; pass do_convert_rgb=True (or None) "
                "to convert it to RGB."
            )
        if channels == 1:
            hwc = np.repeat(hwc, 3, axis=-1)
        else:
            # Blend onto white with transformers' numpy arithmetic (rounding for integer dtypes).
            if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
                raise ValueError(
                    f"{where} is a float RGBA image with values in [{hwc.min()}, {hwc.max()}]; "
                    "float RGBA images must lie in [0, 1]."
                )
            white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
            alpha = hwc[..., 3:4] / white
            blended = alpha * hwc[..., :3] + (1 - alpha) * white
            hwc = np.round(blended).astype(hwc.dtype) if white == 255 else blended.astype(hwc.dtype)
    if hwc.shape[0] < 1 or hwc.shape[1] < 1:
        raise ValueError(f"{where} has an empty spatial size {hwc.shape[:2]}.")
    return np.moveaxis(hwc, -1, 0)


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


# ---------------------------------------------------------------------------------------------
# Pixel operations
# ---------------------------------------------------------------------------------------------
def _resize_image(chw: np.ndarray, size_hw: tuple[int, int], resample: int, where: str) -> np.ndarray:
    """Resize a `(3, H, W)` image with Pillow exactly as transformers' PIL backend does.

    Non-uint8 input goes through uint8 first (transformers' `to_pil_image`): integer-valued data in
    [0, 255] is cast, data in [0, 1] is multiplied by 255 (float64, then float32) and truncated, and
    the result is scaled back by 1/255 (float32). Returns `(3, h, w)` uint8 or float32.
    """
    new_h, new_w = size_hw
    if new_h <= 0 or new_w <= 0:
        raise ValueError(
            f"{where} of size {tuple(chw.shape[1:])} would be resized to {size_hw}: a side is 0. The image's aspect "
            "ratio is too extreme for `size`; crop or pad it first, or use a larger `longest_edge`."
        )
    hwc = np.moveaxis(chw, 0, -1)
    scaled_to_255 = False
    if hwc.dtype != np.uint8:
        if np.allclose(hwc, hwc.astype(int)):
            if hwc.min() < 0 or hwc.max() > 255:
                raise ValueError(
                    f"{where} has integer values in [{hwc.min()}, {hwc.max()}]; resizing needs them in [0, 255]."
                )
        elif hwc.min() >= 0 and hwc.max() <= 1:
            scaled_to_255 = True
            hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
        else:
            raise ValueError(
                f"{where} has float values in [{hwc.min()}, {hwc.max()}]; float images must be in [0, 1] "
                "or hold integer values in [0, 255]."
            )
        hwc = hwc.astype(np.uint8)
    pil = PIL.Image.fromarray(np.ascontiguousarray(hwc))
    out = np.array(pil.resize((new_w, new_h), resample=resample))
    out = np.moveaxis(out, -1, 0)
    if scaled_to_255:
        out = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    return out


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


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    # float64 product then float32, as transformers (avoids float32 double rounding of x * 1/255).
    return (image.astype(np.float64) * scale).astype(np.float32)


def _normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # Float input keeps its dtype (as transformers); integer input is computed in float32.
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    m = np.asarray(mean, dtype=image.dtype)[:, None, None]
    s = np.asarray(std, dtype=image.dtype)[:, None, None]
    return (image - m) / s


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


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------
class MaskFormerImageProcessor:
    r"""Prepare images (and optional segmentation maps) for MaskFormer and post-process its outputs.

    Keyword arguments and defaults are transformers' (5.23):

    Args:
        do_resize (`bool`, default True): resize images (and segmentation maps).
        size (`int | (h, w) | dict`, default `{"shortest_edge": 800, "longest_edge": 1333}`): target size.
            Dict key sets: `shortest_edge` + `longest_edge` (keep aspect ratio, clamp the long side),
            `shortest_edge` alone, `height` + `width`, `max_height` + `max_width`. An int means
            `{"shortest_edge": n}` (plus `longest_edge=max_size` when `max_size` is given), a pair
            means `(height, width)`.
        size_divisor (`int`, default 32): each resized side is rounded up to a multiple of it
            (0 or 1: no rounding).
        resample (`PIL.Image.Resampling | int`, default BILINEAR): Pillow filter for images.
        do_rescale (`bool`, default True), rescale_factor (`float`, default 1/255).
        do_normalize (`bool`, default True), image_mean / image_std (3 floats or one float, default
            ImageNet's).
        ignore_index (`int | None`, default None): label dropped from `mask_labels`; also the value
            padding pixels of `mask_labels` get (0 when None).
        do_reduce_labels (`bool`, default False): label 0 becomes `ignore_index`, others minus 1.
        num_labels (`int | None`): stored only (as in transformers).
        pad_size (`dict | int | None`): pad every batch to this `{"height", "width"}` instead of the
            batch maximum.
        do_convert_rgb (`bool | None`, default None): None converts only non-RGB images, True always
            runs the RGB conversion (it also composites RGB images that carry a transparency key),
            False never converts (non-RGB input then raises).
        max_size, size_divisibility, reduce_labels: legacy spellings, see the module docstring.
    """

    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(
        self,
        do_resize: bool = True,
        size: Any = None,
        size_divisor: int | None = None,
        resample: int | PIL.Image.Resampling = PIL.Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: float | Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        num_labels: int | None = None,
        pad_size: Any = None,
        do_convert_rgb: bool | None = None,
        max_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        size_divisibility = kwargs.pop("size_divisibility", None)
        reduce_labels = kwargs.pop("reduce_labels", None)
        for key in _SERVICE_KEYS:
            kwargs.pop(key, None)
        # transformers also accepts and ignores these generic ImagesKwargs for MaskFormer.
        for key in ("default_to_square", "do_pad", "do_center_crop", "crop_size", "data_format", "disable_grouping"):
            kwargs.pop(key, None)
        if kwargs:
            warnings.warn(
                f"MaskFormerImageProcessor ignores unknown config keys {sorted(kwargs)}.", UserWarning, stacklevel=2
            )

        if size is None:
            size = {"shortest_edge": 800, "longest_edge": 1333 if max_size is None else max_size}
        self.size = _normalize_size(size, max_size=max_size)
        if size_divisor is None:
            size_divisor = 32 if size_divisibility is None else size_divisibility
        if do_reduce_labels is None:
            do_reduce_labels = bool(reduce_labels) if reduce_labels is not None else False
        self.do_resize = bool(do_resize)
        self.size_divisor = int(size_divisor)
        self.resample = _check_resample(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _check_mean_std(image_mean, "image_mean")
        self.image_std = _check_mean_std(image_std, "image_std")
        self.ignore_index = ignore_index if ignore_index is None else int(ignore_index)
        self.do_reduce_labels = bool(do_reduce_labels)
        self.num_labels = num_labels
        self.pad_size = _normalize_pad_size(pad_size)
        self.do_convert_rgb = do_convert_rgb
        if self.size_divisor < 0:
            raise ValueError(f"size_divisor must be >= 0, got {self.size_divisor}.")

    # -- serialisation -----------------------------------------------------------------------
    _CONFIG_KEYS = (
        "do_resize",
        "size",
        "size_divisor",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "ignore_index",
        "do_reduce_labels",
        "num_labels",
        "pad_size",
        "do_convert_rgb",
    )

    def to_dict(self) -> dict[str, Any]:
        """Config as a JSON-ready dict (keys whose value is None are left out, as transformers does).

        transformers' `MaskFormerImageProcessor.from_dict` / `from_pretrained` read it back.
        """
        out: dict[str, Any] = {}
        for key in self._CONFIG_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif key == "resample":
                value = int(value)
            out[key] = value
        out["image_processor_type"] = "MaskFormerImageProcessor"
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` into `save_directory` (created if needed); returns its path."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained needs a directory, but {save_directory!r} is a file.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> MaskFormerImageProcessor:
        """Build from a config dict (e.g. a parsed `preprocessor_config.json`); `overrides` win."""
        merged = dict(config)
        merged.update(overrides)
        return cls(**merged)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        subfolder: str = "",
        **overrides: Any,
    ) -> MaskFormerImageProcessor:
        """Load from a local folder, a JSON file, or a hub repo id (through `huggingface_hub`).

        Reads `preprocessor_config.json`; when a folder or repo has none, falls back to the
        `"image_processor"` entry of `processor_config.json` (what newer transformers writes).
        Keyword `overrides` replace config values. Raises `FileNotFoundError` / `OSError` when
        the file cannot be found or fetched, `ValueError` when it is not a valid JSON object,
        `ImportError` when a repo id is given and huggingface_hub is not installed.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            return cls.from_dict(_read_json_config(path), **overrides)
        if os.path.isdir(path):
            folder = os.path.join(path, subfolder) if subfolder else path
            config_path = os.path.join(folder, CONFIG_NAME)
            if os.path.isfile(config_path):
                return cls.from_dict(_read_json_config(config_path), **overrides)
            nested = os.path.join(folder, PROCESSOR_CONFIG_NAME)
            if os.path.isfile(nested):
                return cls.from_dict(_nested_image_processor_config(nested), **overrides)
            raise FileNotFoundError(
                f"No {CONFIG_NAME} (nor {PROCESSOR_CONFIG_NAME}) in the folder {folder!r}. Save one with "
                "`MaskFormerImageProcessor(...).save_pretrained(folder)` or point to the right folder."
            )
        if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep + os.sep in path:
            raise FileNotFoundError(
                f"{path!r} looks like a local path but no such folder or file exists (a hub repo id has the "
                "form 'owner/name')."
            )
        return cls.from_dict(
            _hub_config(path, cache_dir, revision, token, local_files_only, subfolder), **overrides
        )

    # -- preprocessing -----------------------------------------------------------------------
    def _resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        valid = set(self._CONFIG_KEYS) | set(_CALL_ONLY_KEYS)
        unknown = sorted(set(overrides) - valid)
        if unknown:
            hint = ""
            if "reduce_labels" in unknown or "size_divisibility" in unknown or "max_size" in unknown:
                hint = " (legacy names: use do_reduce_labels / size_divisor / size={'shortest_edge', 'longest_edge'})"
            raise TypeError(f"Unknown preprocessing argument(s) {unknown}{hint}. Valid ones: {sorted(valid)}.")
        cfg = {k: getattr(self, k) for k in self._CONFIG_KEYS}
        for k, v in overrides.items():
            if v is not None or k in ("ignore_index", "pad_size", "do_convert_rgb"):
                cfg[k] = v
        if overrides.get("size") is not None:
            cfg["size"] = _normalize_size(overrides["size"])
        if "pad_size" in overrides:
            cfg["pad_size"] = _normalize_pad_size(overrides["pad_size"])
        cfg["resample"] = _check_resample(cfg["resample"])
        cfg["image_mean"] = _check_mean_std(cfg["image_mean"], "image_mean")
        cfg["image_std"] = _check_mean_std(cfg["image_std"], "image_std")
        return cfg

    def __call__(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int]] | None = None,
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(
            images, segmentation_maps, instance_id_to_semantic_id, return_tensors=return_tensors, **overrides
        )

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int]] | None = None,
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """Resize, rescale, normalise and pad a batch; optionally encode segmentation maps.

        Args:
            images: one image or a list (possibly nested) of images of any sizes: PIL images (any
                mode), numpy arrays or torch tensors `(C, H, W)` / `(H, W, C)` with C in {1, 3, 4},
                uint8, other integer or float (floats in [0, 1] or integer-valued in [0, 255]), or
                rank-4 batches of those.
            segmentation_maps: optional, one `(H, W)` integer label map per image (PIL "L"/"P"/"I"
                image, numpy array or tensor), each the same H, W as its image.
            instance_id_to_semantic_id: optional `{instance_id: class_id}` (one dict for all images
                or one per image); when given, the map holds instance ids.
            return_tensors: "pt" (default), "np", or None (lists of numpy arrays).
            **overrides: any constructor setting for this call (e.g. `size=...`), plus
                `input_data_format` ("channels_first"/"channels_last") and `device`.

        Returns:
            `BatchFeature` with
              - `pixel_values`: `(B, 3, H, W)` float32, H/W the batch maxima (or `pad_size`),
              - `pixel_mask`: `(B, H, W)` int64, 1 on image pixels, 0 on padding,
              - with segmentation maps, `mask_labels`: list of B `(N_i, H, W)` float32 binary
                masks and `class_labels`: list of B `(N_i,)` int64 class ids.
        """
        cfg = self._resolve(dict(overrides, return_tensors=return_tensors))
        image_list = _flatten_inputs(images, 3, "images")
        if not image_list:
            raise ValueError("Got an empty batch of images; pass at least one image.")
        chw_images = [
            _image_to_chw(img, cfg["do_convert_rgb"], cfg.get("input_data_format"), f"images[{i}]")
            for i, img in enumerate(image_list)
        ]
        seg_list = None
        if segmentation_maps is not None:
            seg_list = _flatten_inputs(segmentation_maps, 2, "segmentation_maps")
            if len(seg_list) != len(chw_images):
                raise ValueError(
                    f"Got {len(chw_images)} images but {len(seg_list)} segmentation maps; pass one map per image."
                )
            seg_list = [_seg_map_to_2d(s, f"segmentation_maps[{i}]") for i, s in enumerate(seg_list)]
            for i, (img, seg) in enumerate(zip(chw_images, seg_list)):
                if tuple(seg.shape) != tuple(img.shape[1:]):
                    raise ValueError(
                        f"segmentation_maps[{i}] has size {tuple(seg.shape)} but images[{i}] has size "
                        f"{tuple(img.shape[1:])} (H, W); a segmentation map must match its image pixel for pixel."
                    )
        if cfg["do_rescale"]:
            for i, img in enumerate(chw_images):
                if np.issubdtype(img.dtype, np.floating) and img.min() >= 0 and img.max() <= 1:
                    warnings.warn(
                        f"images[{i}] is a float image with values in [0, 1] and do_rescale=True: it will be "
                        "multiplied by rescale_factor again (as transformers does). Pass do_rescale=False if it "
                        "is already rescaled.",
                        UserWarning,
                        stacklevel=3,
                    )
                    break

        if cfg["do_resize"]:
            sizes = [get_output_image_size(*img.shape[1:], cfg["size"], cfg["size_divisor"]) for img in chw_images]
            chw_images = [
                _resize_image(img, hw, cfg["resample"], f"images[{i}]")
                for i, (img, hw) in enumerate(zip(chw_images, sizes))
            ]
            if seg_list is not None:
                seg_list = [_resize_label_map(seg, hw) for seg, hw in zip(seg_list, sizes)]

        processed = []
        for img in chw_images:
            if cfg["do_rescale"]:
                img = _rescale(img, cfg["rescale_factor"])
            if cfg["do_normalize"]:
                img = _normalize(img, cfg["image_mean"], cfg["image_std"])
            processed.append(img)

        encoded = _pad_and_encode(
            processed,
            seg_list,
            instance_id_to_semantic_id,
            ignore_index=cfg["ignore_index"],
            do_reduce_labels=cfg["do_reduce_labels"],
            pad_size=cfg["pad_size"],
        )
        return _finalize(encoded, cfg.get("return_tensors"), cfg.get("device"))

    def encode_inputs(
        self,
        pixel_values_list: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int]] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        return_tensors: str | None = "pt",
        pad_size: Any = None,
    ) -> BatchFeature:
        """Pad already-processed images to one batch and encode their segmentation maps.

        No resize / rescale / normalise: this is the last step of `preprocess` on its own (the
        transformers 4.x method of the same name).

        Args:
            pixel_values_list: list of `(3, H_i, W_i)` float arrays or tensors (channels first).
            segmentation_maps: optional list of `(H_i, W_i)` integer label maps.
            instance_id_to_semantic_id, ignore_index, do_reduce_labels, pad_size: as in `preprocess`
                (None falls back to this processor's settings).

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, H, W)` float32, `pixel_mask` `(B, H, W)`
            int64 and, with maps, `mask_labels` (list of `(N_i, H, W)` float32) and
            `class_labels` (list of `(N_i,)` int64).
        """
        items = _flatten_inputs(pixel_values_list, 3, "pixel_values_list")
        if not items:
            raise ValueError("Got an empty batch of images; pass at least one image.")
        arrays = []
        for i, item in enumerate(items):
            arr = _tensor_to_numpy(item) if isinstance(item, torch.Tensor) else np.asarray(item)
            if arr.shape[0] != 3:
                raise ValueError(
                    f"pixel_values_list[{i}] has shape {tuple(arr.shape)}; encode_inputs takes processed (3, H, W) "
                    "channels-first images (use `preprocess` for raw images)."
                )
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise ValueError(f"pixel_values_list[{i}] contains NaN or infinite values.")
            arrays.append(arr)
        seg_list = None
        if segmentation_maps is not None:
            seg_list = _flatten_inputs(segmentation_maps, 2, "segmentation_maps")
            if len(seg_list) != len(arrays):
                raise ValueError(f"Got {len(arrays)} images but {len(seg_list)} segmentation maps.")
            seg_list = [_seg_map_to_2d(s, f"segmentation_maps[{i}]") for i, s in enumerate(seg_list)]
            for i, (img, seg) in enumerate(zip(arrays, seg_list)):
                if tuple(seg.shape) != tuple(img.shape[1:]):
                    raise ValueError(
                        f"segmentation_maps[{i}] has size {tuple(seg.shape)} but pixel_values_list[{i}] has size "
                        f"{tuple(img.shape[1:])}; they must match."
                    )
        encoded = _pad_and_encode(
            arrays,
            seg_list,
            instance_id_to_semantic_id,
            ignore_index=self.ignore_index if ignore_index is None else ignore_index,
            do_reduce_labels=self.do_reduce_labels if do_reduce_labels is None else do_reduce_labels,
            pad_size=self.pad_size if pad_size is None else _normalize_pad_size(pad_size),
        )
        return _finalize(encoded, return_tensors, None)

    # -- post-processing ---------------------------------------------------------------------
    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
        """Per-pixel class ids.

        Args:
            outputs: any object with `class_queries_logits` `(B, Q, K+1)` and
                `masks_queries_logits` `(B, Q, h, w)` (float tensors; the last class is "no object").
            target_sizes: optional B pairs `(H_i, W_i)` (list or `(B, 2)` tensor); the per-class
                scores are bilinearly resized to them before the argmax. None: maps at `(h, w)`.
            return_segmentation_scores: also return the `(K, H_i, W_i)` scores.

        Returns:
            list of B `(H_i, W_i)` int64 tensors, or of `SemanticSegmentationResult` with
            `segmentation` and `segmentation_scores` when `return_segmentation_scores=True`.
        """
        class_logits, mask_logits = _check_outputs(outputs, "post_process_semantic_segmentation")
        sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
        if not return_segmentation_scores:
            # maskformer.dispatch picks the fused kernels (C++ on CPU, Triton on CUDA) or
            # semantic_segmentation_ref's computation, per MASKFORMER_BACKEND / set_backend.
            from .dispatch import semantic_segmentation

            return semantic_segmentation(class_logits, mask_logits, sizes)
        scores = _semantic_scores(class_logits, mask_logits)
        results = []
        for i in range(scores.shape[0]):
            s = scores[i]
            if sizes is not None:
                s = F.interpolate(s[None], size=sizes[i], mode="bilinear", align_corners=False)[0]
            results.append(SemanticSegmentationResult(segmentation=s.argmax(dim=0), segmentation_scores=s))
        return results

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
    ) -> list[dict[str, Any]]:
        """Instances: the top-Q (query, class) pairs scored by class probability x mean mask probability.

        Args:
            outputs: object with `class_queries_logits` `(B, Q, K+1)`, `masks_queries_logits` `(B, Q, h, w)`.
            threshold: keep instances whose score is >= it.
            mask_threshold, overlap_mask_area_threshold: accepted for API parity; unused (as in
                transformers, masks are binarised at logit 0).
            target_sizes: optional B pairs `(H_i, W_i)`; binary masks are resized (nearest) to them.
            return_coco_annotation: `segmentation` becomes a list of RLEs, one per `segments_info`
                entry (see module docstring, deviation 5).
            return_binary_maps: `segmentation` becomes `(N, H, W)` float32 binary masks, one per
                `segments_info` entry (overlaps preserved).

        Returns:
            list of B dicts with `segmentation` (`(H, W)` float32 map of instance ids, -1 for
            background; or RLEs; or binary maps) and `segments_info` (list of dicts with `id`,
            `label_id`, `was_fused` (always False), `score` rounded to 6 decimals).
        """
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

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Panoptic maps: every pixel goes to the query with the largest score x mask probability.

        Args:
            outputs: object with `class_queries_logits` `(B, Q, K+1)`, `masks_queries_logits` `(B, Q, h, w)`.
            threshold: keep queries whose top class is not "no object" and whose probability is > it.
            mask_threshold: a query's own mask is `sigmoid(mask) >= mask_threshold`.
            overlap_mask_area_threshold: keep a segment when (pixels it wins) / (its own mask area)
                is > this.
            label_ids_to_fuse: class ids whose instances are merged into one segment.
            target_sizes: optional B pairs `(H_i, W_i)`; probabilities are bilinearly resized first.

        Returns:
            list of B dicts with `segmentation`: `(H, W)` int32 segment ids (1, 2, ...; 0 where no
            segment won; all -1 when no query survived) and `segments_info`: one dict per id with
            `id`, `label_id`, `was_fused`, `score` (rounded to 6 decimals).
        """
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


# ---------------------------------------------------------------------------------------------
# Helpers of the processor
# ---------------------------------------------------------------------------------------------
def _check_resample(resample: Any) -> PIL.Image.Resampling:
    try:
        return PIL.Image.Resampling(int(resample))
    except (TypeError, ValueError):
        raise ValueError(
            f"resample must be a PIL.Image.Resampling value (0..5, e.g. 2 = BILINEAR), got {resample!r}."
        ) from None


def _check_mean_std(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(value)}: {value}.")
    if name == "image_std" and any(v == 0 for v in value):
        raise ValueError(f"image_std must be non-zero, got {value}.")
    return value


def _pad_and_encode(
    images: list[np.ndarray],
    seg_list: list[np.ndarray] | None,
    instance_id_to_semantic_id: Any,
    ignore_index: int | None,
    do_reduce_labels: bool,
    pad_size: dict[str, int] | None,
) -> dict[str, Any]:
    """Pad `(3, h_i, w_i)` images bottom/right with zeros; encode the maps at the same pixels."""
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    if pad_size is not None:
        if pad_size["height"] < max_h or pad_size["width"] < max_w:
            raise ValueError(
                f"pad_size {pad_size} is smaller than the largest processed image ({max_h}, {max_w}); "
                "increase pad_size or reduce `size`."
            )
        max_h, max_w = pad_size["height"], pad_size["width"]
    out_dtype = np.float32
    pixel_values = np.zeros((len(images), 3, max_h, max_w), dtype=out_dtype)
    pixel_mask = np.zeros((len(images), max_h, max_w), dtype=np.int64)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        pixel_values[i, :, :h, :w] = img
        pixel_mask[i, :h, :w] = 1
    encoded: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    if seg_list is None:
        return encoded
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
            seg, mapping, ignore_index, do_reduce_labels, f"segmentation_maps[{i}]", (max_h, max_w), fill
        )
        mask_labels.append(masks)
        class_labels.append(classes)
    encoded["mask_labels"] = mask_labels
    encoded["class_labels"] = class_labels
    return encoded


def _finalize(encoded: dict[str, Any], return_tensors: str | None, device: Any) -> BatchFeature:
    if return_tensors not in ("pt", "np", None):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
    if return_tensors is None:
        encoded["pixel_values"] = list(encoded["pixel_values"])
        encoded["pixel_mask"] = list(encoded["pixel_mask"])
        return BatchFeature(encoded)
    if return_tensors == "np":
        return BatchFeature(encoded)
    out = BatchFeature(
        {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else [torch.from_numpy(x) for x in v]
            for k, v in encoded.items()
        }
    )
    if device is not None:
        out.to(device)
    return out


def _read_json_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise OSError(f"Could not read the image processor config {path!r}: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"The image processor config {path!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}); re-download or re-save it."
        ) from exc
    if not isinstance(config, dict):
        raise ValueError(f"The image processor config {path!r} holds a JSON {type(config).__name__}, not an object.")
    return config


def _nested_image_processor_config(path: str) -> dict[str, Any]:
    config = _read_json_config(path)
    nested = config.get("image_processor")
    if not isinstance(nested, dict):
        raise ValueError(f"{path!r} has no 'image_processor' object, so it holds no image processor config.")
    return nested


def _hub_config(
    repo_id: str,
    cache_dir: Any,
    revision: str | None,
    token: Any,
    local_files_only: bool,
    subfolder: str,
) -> dict[str, Any]:
    """preprocessor_config.json (or processor_config.json's nested entry) of a hub repo, via
    ``maskformer.loading.resolve_file`` (its errors name the fix: install huggingface_hub, go online...)."""
    from .loading import resolve_file

    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    path = resolve_file(repo_id, prefix + CONFIG_NAME, required=False, **hub)
    if path is not None:
        return _read_json_config(path)
    path = resolve_file(repo_id, prefix + PROCESSOR_CONFIG_NAME, required=False, **hub)
    if path is not None:
        return _nested_image_processor_config(path)
    raise FileNotFoundError(
        f"hub repo {repo_id!r} has neither {prefix + CONFIG_NAME} nor {prefix + PROCESSOR_CONFIG_NAME} (or they are not "
        "in the local cache while offline); pass a local folder that holds preprocessor_config.json"
    )


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------
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
