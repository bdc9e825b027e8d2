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

10. `size=n` (an int) without `max_size`, as the facebook/mask2former-* hub configs give it
    ("size": 384): transformers 5.23 makes it `{"shortest_edge": n}` and then cannot resize; we read
    it as transformers 4.x did, which wrote those configs: `{"shortest_edge": n, "longest_edge":
    1333}`. A dict size with only `shortest_edge` plus a legacy `max_size` gets `longest_edge =
    max_size`. A dict `{"shortest_edge": n}` alone is refused at resize with transformers' message
    (plus the fix), as transformers (4.x and 5.x) does: MaskFormer's resize caps the long side, and
    a size transformers cannot use must not reach a saved preprocessor_config.json as if valid.
    [test_shortest_edge_only]
11. Non-RGB images by default: transformers' default `do_convert_rgb=None` leaves grayscale, RGBA,
    palette ... images alone and then fails in `normalize` when `image_mean`/`image_std` have 3
    values (the default); there we convert them exactly as transformers does with
    `do_convert_rgb=True` (Pillow `convert("RGB")`, alpha composited onto white). With a scalar or
    per-channel mean/std, or `do_normalize=False`, images keep their 1, 2 or 4 channels, as in
    transformers. [test_pixel_parity_modes, tests/test_dropin_processing.py]
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
    its own aspect ratio and returns misaligned masks). Also: empty batch, NaN/inf pixels, 2 channels
    or 5+ channels without a channel layout given, 5+ channels with do_resize, wrong rank, bad `target_sizes` length (transformers' instance/panoptic silently use
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

Inputs and arguments (added after the list above):

18. PIL images with an EXIF orientation tag are transposed first (`ImageOps.exif_transpose`), so a
    phone photo tagged "rotate 90" is processed the way every viewer shows it; transformers ignores
    the tag. [test_exif_orientation_is_applied]
19. PIL images of more than 8 bits per sample (`I;16` PNG/TIFF, `I`, `F`) are scaled to 8 bits
    (`preprocessing.to_8bit`); transformers refuses them by default ("values outside the range
    [0, 255]") and with `do_convert_rgb=True` its `convert("RGB")` clips them at 255, so a 16-bit
    photo becomes almost all white. Ranges that cannot be mapped are an error. [test_sixteen_bit_images_are_scaled]
20. Post-processing thresholds outside [0, 1] or NaN, `target_sizes` that are not integer pairs,
    a target size whose maps cannot fit in memory (the error names `target_sizes`) and 0x0 images
    are errors (transformers computes on, or fails deep inside torch). [tests/test_postprocess_crop.py]
21. Opt-in `pixel_mask=` on the three post-processings: each image's region of the logits is cropped
    before the resize (see `postprocessing.valid_extents`); without it the result is transformers'.
    [tests/test_postprocess_crop.py]

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
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from . import postprocessing
from .hub import resolve_file
from .postprocessing import (  # noqa: F401  (public names, importable from here as before)
    SemanticSegmentationResult,
    binary_mask_to_rle,
    convert_segmentation_to_rle,
    semantic_segmentation_ref,
)
from .preprocessing import (  # noqa: F401
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    BatchFeature,
    _check_mean_std,
    _check_resample,
    _finalize,
    _flatten_inputs,
    _image_to_chw,
    _normalize,
    _normalize_pad_size,
    _normalize_size,
    _rescale,
    _resize_image,
    _tensor_to_numpy,
    get_output_image_size,
    pad_images,
    resolve_convert_rgb,
)
from .targets import _resize_label_map, _seg_map_to_2d, encode_targets  # noqa: F401

__all__ = [
    "BatchFeature",
    "MaskFormerImageProcessor",
    "SemanticSegmentationResult",
    "binary_mask_to_rle",
    "convert_segmentation_to_rle",
    "get_output_image_size",
    "semantic_segmentation_ref",
]

CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"

# Keys transformers writes into configs that carry no processing meaning.
_SERVICE_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "_max_size", "_auto_class"}
_CALL_ONLY_KEYS = ("return_tensors", "input_data_format", "device")


def _pad_and_encode(
    images: list[np.ndarray],
    seg_list: list[np.ndarray] | None,
    instance_id_to_semantic_id: Any,
    ignore_index: int | None,
    do_reduce_labels: bool,
    pad_size: dict[str, int] | None,
) -> dict[str, Any]:
    """Pad `(3, h_i, w_i)` images bottom/right with zeros; encode the maps at the same pixels."""
    encoded = pad_images(images, pad_size)
    if seg_list is not None:
        padded_hw = tuple(encoded["pixel_mask"].shape[1:])
        encoded.update(encode_targets(seg_list, instance_id_to_semantic_id, ignore_index, do_reduce_labels, padded_hw))
    return encoded


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
            `height` + `width`, `max_height` + `max_width`; `shortest_edge` alone is kept but cannot
            resize (as in transformers). An int means `{"shortest_edge": n, "longest_edge": max_size}`
            (1333 without `max_size`, transformers 4.x's default), a pair means `(height, width)`.
        size_divisor (`int`, default 32): each resized side is rounded up to a multiple of it
            (0 or 1: no rounding).
        resample (`PIL.Image.Resampling | int`, default BILINEAR): Pillow filter for images.
        do_rescale (`bool`, default True), rescale_factor (`float`, default 1/255).
        do_normalize (`bool`, default True), image_mean / image_std (one float per channel, or one
            float for all channels; default ImageNet's 3 values).
        ignore_index (`int | None`, default None): label dropped from `mask_labels`; also the value
            padding pixels of `mask_labels` get (0 when None).
        do_reduce_labels (`bool`, default False): label 0 becomes `ignore_index`, others minus 1.
        num_labels (`int | None`): stored only (as in transformers).
        pad_size (`dict | int | None`): pad every batch to this `{"height", "width"}` instead of the
            batch maximum.
        do_convert_rgb (`bool | None`, default None): None converts non-RGB images when the
            normalisation needs 3 channels (3-value image_mean/image_std) and keeps them otherwise;
            True always runs the RGB conversion (it also composites RGB images that carry a
            transparency key); False never converts: 1, 2 (LA) or 4-channel images give
            `pixel_values` with that many channels (image_mean/image_std then need that many values,
            or one).
        max_size, size_divisibility, reduce_labels: legacy spellings, see the module docstring.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    # What `to_dict` writes as "image_processor_type" (transformers' class name; subclasses set theirs).
    image_processor_type = "MaskFormerImageProcessor"

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
                f"{type(self).__name__} ignores unknown config keys {sorted(kwargs)}.", UserWarning, stacklevel=2
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
            # image_mean / image_std stay tuples, as transformers' to_dict gives them (JSON writes lists,
            # read back as tuples): a save/load round trip compares equal, with transformers' dicts too.
            if isinstance(value, dict):
                value = dict(value)
            elif key == "resample":
                value = int(value)
            out[key] = value
        out["image_processor_type"] = self.image_processor_type
        return out

    def to_json_string(self) -> str:
        """`to_dict()` as JSON text (what `save_pretrained` writes)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write `to_json_string()` to `json_file_path` (transformers' method of the same name)."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> MaskFormerImageProcessor:
        """Build from a JSON file written by `to_json_file` / `save_pretrained` (ours or transformers')."""
        return cls.from_dict(_read_json_config(os.fspath(json_file)))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write `preprocessor_config.json` into `save_directory` (created if needed).

        Returns the list of files written (one path), as transformers does. `push_to_hub=True` is not
        supported: save, then upload the folder with `huggingface_hub`.
        """
        if kwargs.pop("push_to_hub", False):
            raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported; save to a folder, then "
                                      "upload it with huggingface_hub.upload_folder")
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained needs a directory, but {save_directory!r} is a file.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        self.to_json_file(path)
        return [path]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> MaskFormerImageProcessor:
        """Build from a config dict (e.g. a parsed `preprocessor_config.json`); `overrides` win, also
        when given by a legacy name (`size_divisibility=8` replaces the dict's `size_divisor`, as
        transformers 4.x did; 5.23 ignores it)."""
        overrides = dict(overrides)
        for legacy, name in (("size_divisibility", "size_divisor"), ("reduce_labels", "do_reduce_labels")):
            if legacy in overrides and name not in overrides:
                overrides[name] = overrides.pop(legacy)
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
        force_download: bool = False,
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
                f"`{cls.__name__}(...).save_pretrained(folder)` or point to the right folder."
            )
        if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep + os.sep in path:
            raise FileNotFoundError(
                f"{path!r} looks like a local path but no such folder or file exists (a hub repo id has the "
                "form 'owner/name')."
            )
        return cls.from_dict(
            _hub_config(path, cache_dir, revision, token, local_files_only, subfolder, force_download), **overrides
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
        cfg["do_convert_rgb"] = resolve_convert_rgb(
            cfg["do_convert_rgb"], cfg["do_normalize"], cfg["image_mean"], cfg["image_std"]
        )
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
        pixel_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
        """Per-pixel class ids.

        Args:
            outputs: any object with `class_queries_logits` `(B, Q, K+1)` and
                `masks_queries_logits` `(B, Q, h, w)` (float tensors; the last class is "no object").
            target_sizes: optional B pairs `(H_i, W_i)` (list or `(B, 2)` tensor); the per-class
                scores are bilinearly resized to them before the argmax. None: maps at `(h, w)`.
            return_segmentation_scores: also return the `(K, H_i, W_i)` scores.
            pixel_mask: optional, opt-in (not in transformers): the `(B, H, W)` `pixel_mask` the
                processor returned with these inputs. Each image's maps are then made from its own
                region of the logits only: the padding a batch added to smaller images is cropped off
                before the resize, and the image's (fractional) extent in the logits is mapped onto
                its target size. Without it, as in transformers, the padded logits are resized whole
                and the maps of every image smaller than the batch's largest (or not a multiple of
                `size_divisor`) come out shifted and squashed. With `target_sizes=None` the maps are
                at the cropped logit size.

        Returns:
            list of B `(H_i, W_i)` int64 tensors, or of `SemanticSegmentationResult` with
            `segmentation` and `segmentation_scores` when `return_segmentation_scores=True`.
        """
        return postprocessing.semantic_segmentation(outputs, target_sizes, return_segmentation_scores, pixel_mask)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
        pixel_mask: torch.Tensor | None = None,
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
            pixel_mask: optional, opt-in (not in transformers): the processor's `(B, H, W)`
                `pixel_mask`; each image's maps come from its own (unpadded) region of the logits,
                as in `post_process_semantic_segmentation`.

        Returns:
            list of B dicts with `segmentation` (`(H, W)` float32 map of instance ids, -1 for
            background; or RLEs; or binary maps) and `segments_info` (list of dicts with `id`,
            `label_id`, `was_fused` (always False), `score` rounded to 6 decimals).
        """
        postprocessing._check_fraction(mask_threshold, "mask_threshold", "post_process_instance_segmentation")
        postprocessing._check_fraction(
            overlap_mask_area_threshold, "overlap_mask_area_threshold", "post_process_instance_segmentation"
        )
        return postprocessing.instance_segmentation(
            outputs, threshold, target_sizes, return_coco_annotation, return_binary_maps, pixel_mask
        )

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
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
            pixel_mask: optional, opt-in (not in transformers): the processor's `(B, H, W)`
                `pixel_mask`; each image's maps come from its own (unpadded) region of the logits,
                as in `post_process_semantic_segmentation`.

        Returns:
            list of B dicts with `segmentation`: `(H, W)` int32 segment ids (1, 2, ...; 0 where no
            segment won; all -1 when no query survived) and `segments_info`: one dict per id with
            `id`, `label_id`, `was_fused`, `score` (rounded to 6 decimals).
        """
        return postprocessing.panoptic_segmentation(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, target_sizes, pixel_mask
        )


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------
def _read_json_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise OSError(f"Could not read the image processor config {path!r}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"The image processor config {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "re-download or re-save it.") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"The image processor config {path!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}); re-download or re-save it."
        ) from exc
    except RecursionError:
        raise ValueError(f"The image processor config {path!r} nests its JSON deeper than the parser can follow; the "
                         "file is corrupt or hostile: re-download or re-save it.") from None
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
    force_download: bool = False,
) -> dict[str, Any]:
    """preprocessor_config.json (or processor_config.json's nested entry) of a hub repo, via
    ``maskformer.hub.resolve_file`` (its errors name the fix: install huggingface_hub, go online...)."""
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
               force_download=force_download)
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

