"""Mask2Former image processing: `Mask2FormerImageProcessor`, our version of transformers' class.

transformers 5.23's `Mask2FormerImageProcessor` (its PIL/NumPy backend `Mask2FormerImageProcessorPil`
without torchvision, the oracle we match, as for MaskFormer) is generated from the MaskFormer one
and differs from it in only two ways, found by diffing the two files
(`models/mask2former/image_processing_pil_mask2former.py` against
`models/maskformer/image_processing_pil_maskformer.py`):

1. Every post-processing (semantic, instance, panoptic) first resizes `masks_queries_logits`
   `(B, Q, h, w)` to `(B, Q, 384, 384)`, bilinear, `align_corners=False`, in the logits' dtype,
   before any sigmoid ("scale back to preprocessed image size - (384, 384) for all models"). So:
   without `target_sizes` every map is 384x384 whatever the model's mask size (a square map, also
   for non-square inputs, as in transformers); with `target_sizes` the 384x384 maps are resized
   again to each target (bilinear for semantic scores and panoptic probabilities, nearest for
   instance masks). The instance map without `target_sizes` is `torch.zeros((384, 384)) - 1`,
   which is the same thing after the resize.
2. `to_dict` / `save_pretrained` write `"image_processor_type": "Mask2FormerImageProcessor"`.

Everything else is the same code: the defaults (`size={"shortest_edge": 800, "longest_edge":
1333}`, `size_divisor=32`, `ignore_index=None`, `do_reduce_labels=False`, `num_labels=None`,
`resample=BILINEAR`, ImageNet mean/std), the resize / rescale / normalise / pad, the encoding of
segmentation maps into `mask_labels` / `class_labels`, and the three post-processing algorithms
after the resize (instance: top-Q over (query, class) pairs of the class softmax, score =
class probability x mean sigmoid over the mask's `logit > 0` pixels; panoptic: per-query top class,
`remove_low_and_no_objects`, score-weighted argmax, overlap-area test). So this class inherits all
of `MaskFormerImageProcessor` and overrides only the post-processing entry points.

Semantic maps (the default, label maps only) go through the fused op `mask2former_semantic`
(`maskformer.kernels.mask2former_semantic`; C++ on CPU, Triton on CUDA): the 384x384 resize,
sigmoid and class-weighted sum in one kernel, so the `B x Q x 384 x 384` resized logits and their
sigmoid (2 x 118 MB per image at Q = 200) are never built, then the fused resize + argmax to each
target size. Its sums are not bit-identical to transformers' (another summation order and
sigmoid): a pixel's label can differ where transformers' two best scores are within ~1e-6 (exact
ties still go to the lower class id); `MASKFORMER_BACKEND=reference` gives transformers' maps bit
for bit. `return_segmentation_scores=True`, instance and panoptic post-processing resize the logits
exactly as transformers does (the same `F.interpolate` call on the whole batch, materialised) and
hand them to the MaskFormer code, whose kernels reproduce transformers' ops: those results are
bit-identical to transformers' on CPU (the panoptic step by the C++ `query_argmax`).

Configs: `from_pretrained` reads transformers' `preprocessor_config.json` for Mask2Former,
including old hub configs (`feature_extractor_type: Mask2FormerFeatureExtractor`, `size: 384`,
`size_divisibility`, `reduce_labels`; see `maskformer.processing`, deviations 8 and 10). Like
transformers and like our MaskFormer processor, it does not check `image_processor_type`: a
MaskFormer config loads into a Mask2Former processor (and back); the two differ only in
post-processing.

Deviations from transformers
----------------------------
The MaskFormer processor's list (`maskformer.processing` docstring, items 1-21) applies unchanged:
pre-processing is the same code, and post-processing after the 384x384 resize is the same code.
The post-processing deviations are tested again here against transformers' Mask2Former class, on
its 384x384 maps (tests/test_mask2former_processing.py, named in brackets):

1, 2. Panoptic: fused labels never reuse a segment id; one `segments_info` entry per id.
   [test_m2f_panoptic_fused_ids_are_unique]
3. Panoptic: the overlap test uses each query's own mask area. [test_m2f_panoptic_low_score_segments_survive]
4. Panoptic: an empty result is an int32 map of -1 (384x384 without target sizes).
   [test_m2f_empty_results]
5. Instance, `return_coco_annotation=True`: one RLE per `segments_info` entry.
   [test_m2f_instance_coco_rle_aligned_with_segments]
6. Instance, `return_binary_maps=True` with no instance: `(0, H, W)` (H = W = 384 without target
   sizes). [test_m2f_empty_results]
20. Bad thresholds / target sizes / logits raise, before the 384x384 resize is paid for.
   [test_m2f_bad_postprocess_inputs]
21. Opt-in `pixel_mask=` (not in transformers): each image's valid region of the *model's* logits
   (`maskformer.postprocessing.valid_extents`, cropped with its fractional extent) is resized to
   384x384 on its own, so the batch padding never enters the maps; the rest is transformers'
   computation on those logits (without `target_sizes`, maps are 384x384 as on the default path).
   Without `pixel_mask`, or when no image of the batch is padded, the result is transformers'.
   [test_m2f_pixel_mask_crops_each_image, test_m2f_pixel_mask_fractional_extent_ignores_padding]
22. `target_sizes` as a `(B, 2)` integer tensor is accepted (as by our MaskFormer processor);
   transformers' three methods fail on it (`F.interpolate` / `torch.zeros` get a tensor size).
   [test_m2f_tensor_target_sizes]

Not changed, on purpose: the 384x384 resize itself. It assumes a 384x384 model input, so without
`target_sizes` a non-square image's maps are squashed into a square, and with `target_sizes` the
logits are resampled twice (h x w -> 384 x 384 -> target); we keep it so that results equal
transformers'. Pass `target_sizes` (the original image sizes) to get maps in image geometry.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import postprocessing
from .postprocessing import SemanticSegmentationResult
from .processing import MaskFormerImageProcessor

__all__ = ["MASK2FORMER_POSTPROCESS_SIZE", "Mask2FormerImageProcessor", "resize_mask_logits"]

# transformers resizes the mask logits to this size before every post-processing ("scale back to
# preprocessed image size - (384, 384) for all models"), whatever the model's input size.
MASK2FORMER_POSTPROCESS_SIZE = (384, 384)


def resize_mask_logits(
    masks_queries_logits: torch.Tensor,
    extents: Sequence[tuple[float, float]] | None = None,
    size: tuple[int, int] = MASK2FORMER_POSTPROCESS_SIZE,
) -> torch.Tensor:
    """transformers' Mask2Former resize of the mask logits before post-processing.

    Args:
        masks_queries_logits: `(B, Q, h, w)` float tensor (any float dtype; resized in that dtype).
        extents: None (transformers: the whole, possibly padded, logits are resized with one
            `F.interpolate` call on the batch), or B `(eh, ew)` float pairs, each image's valid
            region in logit rows / columns (`maskformer.postprocessing.valid_extents`): that
            region alone is resized, its fractional edge landing exactly on the output's edge.
        size: the output `(H, W)`; transformers' is `(384, 384)`.

    Returns:
        `(B, Q, H, W)` tensor of the input's dtype and device.
    """
    # the op's reference says it once; op modules load on first use (`import maskformer` loads none)
    from .kernels.mask2former_semantic import resize_mask_logits_ref

    return resize_mask_logits_ref(masks_queries_logits, extents, size)


class Mask2FormerImageProcessor(MaskFormerImageProcessor):
    r"""Prepare images (and optional segmentation maps) for Mask2Former and post-process its outputs.

    A drop-in for transformers' `Mask2FormerImageProcessor` (5.23): the same constructor arguments
    and defaults as `MaskFormerImageProcessor` (see there; `size_divisor=32`, `ignore_index=None`,
    `do_reduce_labels=False`, `num_labels=None`), the same pre-processing, `encode_inputs`,
    `to_dict` / `to_json_string` / `to_json_file` / `from_json_file` / `from_dict` /
    `from_pretrained` / `save_pretrained` (writing `"image_processor_type":
    "Mask2FormerImageProcessor"`). The three `post_process_*` methods first resize the mask logits
    to 384x384 as transformers' Mask2Former does (module docstring).
    """

    image_processor_type = "Mask2FormerImageProcessor"

    def _resized_outputs(
        self, outputs: Any, target_sizes: Any, pixel_mask: Any, fn: str
    ) -> tuple[types.SimpleNamespace, Any]:
        """Check the outputs and `target_sizes` (cheap errors first), then resize the mask logits
        to 384x384; returns the resized outputs and the checked target sizes."""
        class_logits, mask_logits = postprocessing._check_outputs(outputs, fn)
        sizes = postprocessing._check_target_sizes(target_sizes, class_logits.shape[0], fn)
        extents = postprocessing.valid_extents(pixel_mask, mask_logits, fn)
        resized = resize_mask_logits(mask_logits, extents)
        return types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=resized), sizes

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
        pixel_mask: torch.Tensor | np.ndarray | None = None,
    ) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
        """Per-pixel class ids, transformers' Mask2Former semantic post-processing.

        The mask logits are resized to 384x384 (bilinear), then as in MaskFormer:
        `scores = einsum(softmax(class)[..., :-1], sigmoid(mask))`, resized bilinearly to each
        target size, argmax over classes. Label maps only: the fused op `mask2former_semantic`
        (module docstring; labels may differ from transformers' only at near ties of its scores);
        with `return_segmentation_scores=True`, transformers' computation, materialised.

        Args:
            outputs: any object with `class_queries_logits` `(B, Q, K+1)` and
                `masks_queries_logits` `(B, Q, h, w)` (transformers' Mask2Former output included).
            target_sizes: optional B pairs `(H_i, W_i)` (list or `(B, 2)` tensor). None: 384x384 maps.
            return_segmentation_scores: also return the `(K, H_i, W_i)` scores.
            pixel_mask: optional, opt-in (not in transformers): the processor's `(B, H, W)`
                `pixel_mask`; each image's unpadded region of the logits is resized to 384x384 on
                its own (module docstring, deviation 21).

        Returns:
            list of B `(H_i, W_i)` int64 tensors (384x384 without target sizes), or of
            `SemanticSegmentationResult` (`segmentation`, `segmentation_scores`) with
            `return_segmentation_scores=True`.
        """
        fn = "post_process_semantic_segmentation"
        if return_segmentation_scores:  # the (K, H_i, W_i) scores are the result: materialised
            resized, sizes = self._resized_outputs(outputs, target_sizes, pixel_mask, fn)
            return postprocessing.semantic_segmentation(resized, sizes, return_segmentation_scores)
        class_logits, mask_logits = postprocessing._check_outputs(outputs, fn)
        sizes = postprocessing._check_target_sizes(target_sizes, class_logits.shape[0], fn)
        extents = postprocessing.valid_extents(pixel_mask, mask_logits, fn)
        postprocessing._check_memory(sizes, 8, fn, mask_logits.device)
        # maskformer.dispatch picks the fused op (the 384x384 resize, sigmoid and class sum without
        # the (Q, 384, 384) logits: C++ on CPU, Triton on CUDA) or mask2former_semantic_ref, today's
        # composition, per MASKFORMER_BACKEND / set_backend.
        from . import dispatch  # loads the op modules: on first use, as postprocessing does

        kwargs = {} if extents is None else {"source_extents": extents}
        with postprocessing._memory_errors_name(fn, sizes):
            return dispatch.mask2former_semantic(class_logits, mask_logits, sizes, **kwargs)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
        pixel_mask: torch.Tensor | np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Instances, transformers' Mask2Former instance post-processing.

        The mask logits are resized to 384x384 (bilinear); then the top-Q (query, class) pairs of
        the class softmax (without "no object") are scored by class probability x the mean sigmoid
        over the pair's mask pixels with logit > 0, and kept when the score is >= `threshold` and
        the mask (resized, nearest, to the target size) is not empty.

        Args:
            outputs: object with `class_queries_logits` `(B, Q, K+1)`, `masks_queries_logits` `(B, Q, h, w)`.
            threshold: keep instances whose score is >= it.
            mask_threshold, overlap_mask_area_threshold: accepted for API parity; unused (as in
                transformers, masks are binarised at logit 0).
            target_sizes: optional B pairs `(H_i, W_i)`. None: 384x384 maps.
            return_coco_annotation: `segmentation` becomes a list of RLEs, one per `segments_info`
                entry (`maskformer.processing`, deviation 5).
            return_binary_maps: `segmentation` becomes `(N, H, W)` float32 binary masks, one per
                `segments_info` entry (`(0, H, W)` when there is none: deviation 6).
            pixel_mask: optional, opt-in (not in transformers), as in `post_process_semantic_segmentation`.

        Returns:
            list of B dicts with `segmentation` (`(H, W)` float32 map of instance ids 0, 1, ...,
            -1 for background; or RLEs; or binary maps) and `segments_info` (dicts with `id`,
            `label_id`, `was_fused` (always False), `score` rounded to 6 decimals).
        """
        fn = "post_process_instance_segmentation"
        if return_coco_annotation and return_binary_maps:
            raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
        for value, name in ((threshold, "threshold"), (mask_threshold, "mask_threshold"),
                            (overlap_mask_area_threshold, "overlap_mask_area_threshold")):
            postprocessing._check_fraction(value, name, fn)
        resized, sizes = self._resized_outputs(outputs, target_sizes, pixel_mask, fn)
        return postprocessing.instance_segmentation(
            resized, threshold, sizes, return_coco_annotation, return_binary_maps
        )

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        pixel_mask: torch.Tensor | np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Panoptic maps, transformers' Mask2Former panoptic post-processing.

        The mask logits are resized to 384x384 (bilinear); then every query whose top class is not
        "no object" and whose probability is > `threshold` competes for the pixels with
        `score x sigmoid(mask)` (resized bilinearly to the target size); a segment is kept when
        (pixels it wins) / (its own mask area, `sigmoid >= mask_threshold`) > `overlap_mask_area_threshold`.

        Args:
            outputs: object with `class_queries_logits` `(B, Q, K+1)`, `masks_queries_logits` `(B, Q, h, w)`.
            threshold, mask_threshold, overlap_mask_area_threshold: as above, each in [0, 1].
            label_ids_to_fuse: class ids whose instances are merged into one segment.
            target_sizes: optional B pairs `(H_i, W_i)`. None: 384x384 maps.
            pixel_mask: optional, opt-in (not in transformers), as in `post_process_semantic_segmentation`.

        Returns:
            list of B dicts with `segmentation`: `(H, W)` int32 segment ids (1, 2, ...; 0 where no
            segment won; all -1 when no query survived) and `segments_info`: one dict per id with
            `id`, `label_id`, `was_fused`, `score` (rounded to 6 decimals). Deviations 1-4 of
            `maskformer.processing` apply.
        """
        fn = "post_process_panoptic_segmentation"
        for value, name in ((threshold, "threshold"), (mask_threshold, "mask_threshold"),
                            (overlap_mask_area_threshold, "overlap_mask_area_threshold")):
            postprocessing._check_fraction(value, name, fn)
        resized, sizes = self._resized_outputs(outputs, target_sizes, pixel_mask, fn)
        return postprocessing.panoptic_segmentation(
            resized, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, sizes
        )
