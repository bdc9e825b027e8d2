"""`post_process_*(..., pixel_mask=...)`: each image's maps from its own region of the logits.

transformers resizes the padded logits of a mixed-size batch whole, so the maps of the smaller
images are squashed and shifted; with the processor's `pixel_mask` we crop each image's region
first. The oracle here: the same image's logits *without* padding (what a batch of one gives),
post-processed with no crop, must equal the padded batch post-processed with `pixel_mask`, the
padding filled with logits that would win everywhere if they were read.
Also the argument checks of #12 item 11 (thresholds, target sizes, memory).
"""
import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from maskformer import MaskFormerImageProcessor
from maskformer import postprocessing

STRIDE = 4  # mask logits are at 1/4 of the input


def scene_logits(h, w, queries=6, classes=5, seed=0):
    """Peaked logits of a made-up scene: each query owns a rectangle and a confident class."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.full((queries, h, w), -6.0) + torch.randn(queries, h, w, generator=g)
    for q in range(queries):
        top, left = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        masks[q, top: top + max(2, h // 2), left: left + max(2, w // 2)] += 12.0
    cls = torch.randn(queries, classes + 1, generator=g)
    cls[torch.arange(queries), torch.arange(queries) % classes] += 8.0
    return cls, masks


def padded_batch(shapes, pad_hw, **kw):
    """B images of logit sizes `shapes` padded to `pad_hw` with adversarial logits (a confident
    extra query whose mask is +20 on the padding), and the pixel_mask at input resolution."""
    cls_list, mask_list, alone = [], [], []
    pixel_mask = torch.zeros(len(shapes), pad_hw[0] * STRIDE, pad_hw[1] * STRIDE, dtype=torch.int64)
    for i, (h, w) in enumerate(shapes):
        cls, masks = scene_logits(h, w, seed=i, **kw)
        alone.append(types.SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None]))
        big = torch.full((masks.shape[0], *pad_hw), 20.0)
        big[:, :h, :w] = masks
        cls_list.append(cls)
        mask_list.append(big)
        pixel_mask[i, : h * STRIDE, : w * STRIDE] = 1
    batch = types.SimpleNamespace(class_queries_logits=torch.stack(cls_list), masks_queries_logits=torch.stack(mask_list))
    return batch, alone, pixel_mask


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    from maskformer import _ext, dispatch

    if request.param == "cpp" and _ext.cpp_import_error() is not None:
        pytest.skip(f"C++ extension not built: {_ext.cpp_import_error()}")
    with dispatch.backend(request.param):
        yield request.param


SHAPES = [(9, 13), (16, 16), (5, 20)]
TARGETS = [(37, 50), (61, 64), (18, 83)]


def test_semantic_crop_equals_the_image_alone(backend):
    p = MaskFormerImageProcessor()
    batch, alone, pixel_mask = padded_batch(SHAPES, (16, 20))
    cropped = p.post_process_semantic_segmentation(batch, target_sizes=TARGETS, pixel_mask=pixel_mask)
    scores = p.post_process_semantic_segmentation(batch, target_sizes=TARGETS, pixel_mask=pixel_mask,
                                                  return_segmentation_scores=True)
    plain = p.post_process_semantic_segmentation(batch, target_sizes=TARGETS)  # transformers' way
    for i, (a, t) in enumerate(zip(alone, TARGETS)):
        ref = p.post_process_semantic_segmentation(a, target_sizes=[t])[0]
        assert torch.equal(cropped[i], ref), f"image {i}: {(cropped[i] != ref).sum()} pixels differ"
        assert torch.equal(scores[i]["segmentation"], ref)
        if tuple(SHAPES[i]) != (16, 20):
            assert not torch.equal(plain[i], ref)  # the padding leaks in without the crop
    no_target = p.post_process_semantic_segmentation(batch, pixel_mask=pixel_mask)
    assert [tuple(m.shape) for m in no_target] == SHAPES


def test_panoptic_crop_equals_the_image_alone(backend):
    p = MaskFormerImageProcessor()
    batch, alone, pixel_mask = padded_batch(SHAPES, (16, 20))
    cropped = p.post_process_panoptic_segmentation(batch, threshold=0.3, target_sizes=TARGETS, pixel_mask=pixel_mask)
    for i, (a, t) in enumerate(zip(alone, TARGETS)):
        ref = p.post_process_panoptic_segmentation(a, threshold=0.3, target_sizes=[t])[0]
        assert torch.equal(cropped[i]["segmentation"], ref["segmentation"]), f"image {i}"
        assert [(s["id"], s["label_id"]) for s in cropped[i]["segments_info"]] == \
               [(s["id"], s["label_id"]) for s in ref["segments_info"]]
        for s, r in zip(cropped[i]["segments_info"], ref["segments_info"]):
            assert s["score"] == pytest.approx(r["score"], abs=2e-6)


def test_instance_crop_equals_the_image_alone():
    p = MaskFormerImageProcessor()
    batch, alone, pixel_mask = padded_batch(SHAPES, (16, 20))
    for kwargs in ({}, {"return_binary_maps": True}, {"return_coco_annotation": True}):
        cropped = p.post_process_instance_segmentation(batch, threshold=0.3, target_sizes=TARGETS,
                                                       pixel_mask=pixel_mask, **kwargs)
        for i, (a, t) in enumerate(zip(alone, TARGETS)):
            ref = p.post_process_instance_segmentation(a, threshold=0.3, target_sizes=[t], **kwargs)[0]
            if isinstance(ref["segmentation"], torch.Tensor):
                assert torch.equal(cropped[i]["segmentation"], ref["segmentation"]), f"image {i} {kwargs}"
            else:
                assert cropped[i]["segmentation"] == ref["segmentation"]
            assert [s["label_id"] for s in cropped[i]["segments_info"]] == [s["label_id"] for s in ref["segments_info"]]


def test_fractional_extent_maps_the_image_onto_the_target():
    """Valid input rows not a multiple of the stride (no size_divisor): the image spans 9.25 logit
    rows; the crop keeps 10 and aten's scale maps row 9.25 onto the target's last row."""
    p = MaskFormerImageProcessor()
    cls, masks = scene_logits(12, 12)
    batch = types.SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None])
    pixel_mask = torch.zeros(1, 48, 48, dtype=torch.int64)
    pixel_mask[0, :37, :42] = 1  # 9.25 x 10.5 logit rows/cols
    assert postprocessing.valid_extents(pixel_mask, batch.masks_queries_logits, "t") == [(9.25, 10.5)]
    target = (40, 45)
    got = p.post_process_semantic_segmentation(batch, target_sizes=[target], pixel_mask=pixel_mask)[0]
    scores = postprocessing._semantic_scores(batch.class_queries_logits, batch.masks_queries_logits)[0, :, :10, :11]
    want = torch.ops.aten.upsample_bilinear2d(scores[None], list(target), False, 40 / 9.25, 45 / 10.5)[0].argmax(0)
    assert torch.equal(got, want)
    # the geometry: the score map's source row 9.25 (the image's bottom edge) lands at output row 40
    step = np.float32(1.0 / (40 / 9.25))
    assert abs(float(np.float32(40.0) * step) - 9.25) < 1e-5


def test_full_pixel_mask_is_transformers_exactly():
    p = MaskFormerImageProcessor()
    cls, masks = scene_logits(10, 14)
    batch = types.SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None])
    full = torch.ones(1, 40, 56, dtype=torch.int64)
    assert postprocessing.valid_extents(full, batch.masks_queries_logits, "t") is None
    assert torch.equal(p.post_process_semantic_segmentation(batch, target_sizes=[(33, 47)], pixel_mask=full)[0],
                       p.post_process_semantic_segmentation(batch, target_sizes=[(33, 47)])[0])


def test_processor_pixel_mask_round_trip():
    """With real processor output: the mask it returns is what post-processing takes."""
    p = MaskFormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    images = [Image.new("RGB", (90, 60), (10, 200, 30)), Image.new("RGB", (50, 70), (200, 10, 30))]
    inputs = p(images, return_tensors="pt")
    b, _, hh, ww = inputs["pixel_values"].shape
    cls, masks = scene_logits(hh // 4, ww // 4)
    out = types.SimpleNamespace(class_queries_logits=cls[None].expand(b, -1, -1),
                                masks_queries_logits=masks[None].expand(b, -1, -1, -1))
    ext = postprocessing.valid_extents(inputs["pixel_mask"], out.masks_queries_logits, "t")
    assert ext is not None and ext[0] != ext[1]
    maps = p.post_process_semantic_segmentation(out, target_sizes=[(60, 90), (70, 50)], pixel_mask=inputs["pixel_mask"])
    assert [tuple(m.shape) for m in maps] == [(60, 90), (70, 50)]


@pytest.mark.parametrize("bad, message", [
    (torch.ones(3, 64, 80, dtype=torch.int64), "batch 2"),
    (torch.ones(2, 8, 8, dtype=torch.int64), "smaller than the mask logits"),
    ("mask", "must be the processor's"),
])
def test_bad_pixel_mask(bad, message):
    batch, _, _ = padded_batch([(9, 13), (16, 20)], (16, 20))
    with pytest.raises((ValueError, TypeError), match=message):
        MaskFormerImageProcessor().post_process_semantic_segmentation(batch, pixel_mask=bad)


def test_pixel_mask_that_is_not_a_top_left_rectangle():
    batch, _, pixel_mask = padded_batch([(9, 13), (16, 20)], (16, 20))
    holed = pixel_mask.clone()
    holed[0, 3, 3] = 0
    with pytest.raises(ValueError, match=r"pixel_mask\[0\] is not a top-left rectangle"):
        MaskFormerImageProcessor().post_process_panoptic_segmentation(batch, pixel_mask=holed)
    empty = pixel_mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"pixel_mask\[1\] has no valid pixel"):
        MaskFormerImageProcessor().post_process_instance_segmentation(batch, pixel_mask=empty)


# ---------------------------------------------------------------------------------------------
# #12 item 11: thresholds, sizes, memory
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one():
    cls, masks = scene_logits(8, 8)
    return types.SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None])


@pytest.mark.parametrize("name", ["threshold", "mask_threshold", "overlap_mask_area_threshold"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_thresholds_must_be_fractions(one, name, value):
    p = MaskFormerImageProcessor()
    for fn in (p.post_process_panoptic_segmentation, p.post_process_instance_segmentation):
        with pytest.raises((ValueError, TypeError), match=name):
            fn(one, **{name: value})


@pytest.mark.parametrize("sizes", [[(30.5, 40)], [(True, 40)], torch.tensor([[30.0, 40.0]]), [(30,)], [3]])
def test_target_sizes_must_be_int_pairs(one, sizes):
    p = MaskFormerImageProcessor()
    for fn in (p.post_process_semantic_segmentation, p.post_process_panoptic_segmentation,
               p.post_process_instance_segmentation):
        with pytest.raises((ValueError, TypeError), match="target_sizes"):
            fn(one, target_sizes=sizes)


def test_integer_target_sizes_of_every_kind(one):
    p = MaskFormerImageProcessor()
    for sizes in ([(12, 15)], torch.tensor([[12, 15]]), [np.array([12, 15])], [(torch.tensor(12), torch.tensor(15))]):
        assert p.post_process_semantic_segmentation(one, target_sizes=sizes)[0].shape == (12, 15)


def test_impossible_target_size_names_the_argument(one):
    p = MaskFormerImageProcessor()
    for fn in (p.post_process_semantic_segmentation, p.post_process_panoptic_segmentation,
               p.post_process_instance_segmentation):
        with pytest.raises(ValueError, match=r"target_sizes\[0\] = \(100000, 100000\) needs about .* GiB"):
            fn(one, target_sizes=[(100000, 100000)])


def test_allocator_failure_names_target_sizes(one, monkeypatch):
    from maskformer import dispatch

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(dispatch, "semantic_segmentation", oom)
    with pytest.raises(MemoryError, match=r"maps of up to 20000x20000 \(target_sizes\)"):
        MaskFormerImageProcessor().post_process_semantic_segmentation(one, target_sizes=[(20000, 20000)])


def test_large_target_is_served_by_the_fused_path(one):
    """A 10000 x 10000 semantic map from 8 x 8 logits: the fused path writes the labels only
    (the reference would hold a (K, H, W) float32 tensor: 2 GB at K = 5)."""
    from maskformer import _ext, dispatch

    if _ext.cpp_import_error() is not None:
        pytest.skip(f"C++ extension not built: {_ext.cpp_import_error()}")
    with dispatch.backend("cpp"):
        big = MaskFormerImageProcessor().post_process_semantic_segmentation(one, target_sizes=[(10000, 10000)])[0]
    small = MaskFormerImageProcessor().post_process_semantic_segmentation(one, target_sizes=[(100, 100)])[0]
    assert big.shape == (10000, 10000)
    assert set(big.unique().tolist()) == set(small.unique().tolist())


def test_zero_sized_pil_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"images\[0\] is a PIL image of size 0x0"):
        MaskFormerImageProcessor()(Image.new("RGB", (0, 0)))


def test_extents_are_fractions_of_logit_rows():
    mask_logits = torch.zeros(1, 1, 33, 25)
    pm = torch.zeros(1, 130, 100, dtype=torch.int64)  # 130 = 33 * 4 - 2: the backbone padded it to 132
    pm[0, :101, :37] = 1
    (eh, ew), = postprocessing.valid_extents(pm, mask_logits, "t")
    assert (eh, ew) == (101 / 4, 37 / 4)
    assert math.ceil(eh) == 26
