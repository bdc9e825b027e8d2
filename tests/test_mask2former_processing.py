"""Tests of maskformer.processing_mask2former against transformers' Mask2FormerImageProcessor (the oracle).

transformers 5.23 without torchvision resolves `Mask2FormerImageProcessor` to its PIL/NumPy
backend, which is what we match. Everything is compared exactly (`torch.equal`, `==` on
`segments_info`): pre-processing runs the same Pillow and float ops, and post-processing the same
torch ops (the 384x384 resize included), so there is no rounding budget to justify. One exception:
the semantic maps of the fused C++ op (`mask2former_semantic`: the 384x384 resize, sigmoid and
class sum in one kernel, another summation order) may differ from transformers' where two classes'
transformers scores are within `TIE_ATOL` (tests/hf_oracle.py, which says why). The logits are
structured like a trained model's (confident ellipses with ramped borders, "no object" queries,
exact ties between queries and between classes), not noise. Each deviation listed in the module
docstring has a test named there, which also asserts that transformers still behaves the way we
deviate from.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the "falling back to the PIL backend" notice

from transformers import Mask2FormerImageProcessor as HFProcessor  # noqa: E402
from transformers import MaskFormerImageProcessor as HFMaskFormerProcessor  # noqa: E402

from maskformer import dispatch, processing_mask2former  # noqa: E402
from tests.hf_oracle import assert_labels_up_to_ties  # noqa: E402
from maskformer.processing import MaskFormerImageProcessor  # noqa: E402
from maskformer.processing_mask2former import Mask2FormerImageProcessor  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _cpp_error():
    from maskformer import _ext

    return None if _ext.load_cpp() is not None else _ext.cpp_import_error()


# Post-processing goes through maskformer.dispatch: the reference and the C++ backend must both
# give transformers' results.
BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(_cpp_error() is not None, reason=f"C++ extension: {_cpp_error()}")),
]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def assert_equal(actual, expected, name: str) -> None:
    """Exact comparison of two tensors that says where and by how much they differ."""
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(np.asarray(actual))
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(np.asarray(expected))
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    diff = actual != expected
    idx = tuple(int(i) for i in torch.nonzero(diff)[0])
    max_abs = (actual.double() - expected.double()).abs().max().item()
    raise AssertionError(
        f"{name}: {int(diff.sum())} of {diff.numel()} elements differ (max |diff| {max_abs:.6g}); "
        f"first at {idx}: ours {actual[idx].item()!r} vs transformers {expected[idx].item()!r}"
    )


def assert_same_results(ours, theirs, name: str, cast_segmentation=None) -> None:
    assert len(ours) == len(theirs), f"{name}: {len(ours)} results vs transformers' {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["segments_info"] == b["segments_info"], (
            f"{name}, image {i}: segments_info\nours         {a['segments_info']}\ntransformers {b['segments_info']}"
        )
        seg_b = b["segmentation"] if cast_segmentation is None else b["segmentation"].to(cast_segmentation)
        assert_equal(a["segmentation"], seg_b, f"{name}, image {i}: segmentation")


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def label_map(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    """Blocky label map (labels 0..n-1) so that resized maps keep every label."""
    coarse = np.random.default_rng(seed).integers(0, n, (h // 4 + 1, w // 4 + 1), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4), dtype=np.uint8))[:h, :w]


def rle_decode(rle, shape) -> torch.Tensor:
    flat = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
    for start, length in zip(rle[::2], rle[1::2]):
        flat[int(start) - 1 : int(start) - 1 + int(length)] = 1
    return flat.view(shape)


def make_outputs(objects_per_image, num_queries, num_classes, size, seed=0):
    """Logits shaped like a trained model's: `objects_per_image[b]` lists `(query, class_id,
    class_logit, (cy, cx, ry, rx))`, an ellipse whose mask logit is 6 x signed distance x radius
    (clipped to +-12: a ramp of a few pixels at the border) and whose class wins with `class_logit`.
    Other queries say "no object" (logit 8) with low-noise masks.
    Returns `types.SimpleNamespace(class_queries_logits (B, Q, K+1), masks_queries_logits (B, Q, h, w))`."""
    rng = np.random.default_rng(seed)
    h, w = size
    class_logits = rng.normal(0.0, 0.5, (len(objects_per_image), num_queries, num_classes + 1)).astype(np.float32)
    mask_logits = rng.normal(-4.0, 1.5, (len(objects_per_image), num_queries, h, w)).astype(np.float32)
    class_logits[:, :, -1] = 8.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for b, objects in enumerate(objects_per_image):
        for query, class_id, logit, (cy, cx, ry, rx) in objects:
            dist = 1.0 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            mask_logits[b, query] = np.clip(6.0 * dist * min(ry, rx), -12, 12)
            class_logits[b, query, -1] = -2.0
            class_logits[b, query, class_id] = logit
    return types.SimpleNamespace(class_queries_logits=torch.from_numpy(class_logits),
                                 masks_queries_logits=torch.from_numpy(mask_logits))


# Image 0: stuff (class 0), two overlapping people (class 3), a car (class 5) with a weaker
# duplicate query, a moderate-confidence object (class 2).
# Image 1: two regions of class 0 (fusable), one of class 1, an object of class 7, and an exact
# duplicate of query 8 in query 14 (same mask, same class logits: ties in every argmax).
SCENE = [
    [
        (1, 0, 9.0, (4, 18, 6, 30)),
        (4, 3, 8.0, (14, 8, 6, 4)),
        (6, 3, 7.5, (15, 13, 5, 4)),
        (9, 5, 9.0, (18, 28, 4, 7)),
        (11, 5, 2.5, (18, 29, 4, 6)),
        (13, 2, 3.0, (10, 31, 3, 3)),
    ],
    [
        (0, 0, 9.0, (3, 9, 4, 10)),
        (3, 1, 8.5, (20, 18, 5, 18)),
        (5, 0, 8.0, (4, 30, 4, 8)),
        (8, 7, 7.0, (12, 18, 3, 4)),
    ],
]
NUM_QUERIES, NUM_CLASSES, MASK_SIZE = 16, 9, (24, 37)
TARGETS = {
    "none": None,
    "smaller": [(13, 19), (13, 19)],
    "larger odd": [(197, 250), (97, 150)],
    "odd mixed": [(61, 43), (7, 300)],
    "tensor": torch.tensor([[40, 64], [64, 40]]),
}


@pytest.fixture(scope="module")
def scene():
    out = make_outputs(SCENE, NUM_QUERIES, NUM_CLASSES, MASK_SIZE)
    cl, ml = out.class_queries_logits, out.masks_queries_logits
    cl[1, 14], ml[1, 14] = cl[1, 8], ml[1, 8]  # exact duplicate query: ties between queries
    return out


@pytest.fixture(scope="module")
def tied_scene():
    """The scene with classes 1 and 4 of image 1 equal in every query: every semantic score of
    class 4 ties with class 1's, and query 3's top class is a tie (its probability halves)."""
    out = make_outputs(SCENE, NUM_QUERIES, NUM_CLASSES, MASK_SIZE)
    out.class_queries_logits[1, :, 4] = out.class_queries_logits[1, :, 1]
    return out


def their_sizes(target):
    """transformers' Mask2Former takes target sizes as a list only (a (B, 2) tensor fails in its
    F.interpolate / torch.zeros); ours also takes the tensor."""
    return target.tolist() if isinstance(target, torch.Tensor) else target


def m2f(**kwargs):
    return Mask2FormerImageProcessor(**kwargs)


def hf(**kwargs):
    kwargs.setdefault("do_convert_rgb", True)
    return HFProcessor(**kwargs)


# ------------------------------------------------------------------------------------------------
# Class, config files
# ------------------------------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(size={"shortest_edge": 300, "longest_edge": 500}, do_reduce_labels=True, ignore_index=255, num_labels=150),
    dict(size={"height": 64, "width": 32}, size_divisor=0, resample=3, pad_size={"height": 70, "width": 40}),
]


def test_m2f_to_dict_matches_transformers():
    for kwargs in CONFIGS:
        theirs = json.loads(HFProcessor(**kwargs).to_json_string())
        ours = json.loads(m2f(**kwargs).to_json_string())
        assert ours == theirs, f"to_json_string differs for {kwargs}:\nours   {ours}\ntheirs {theirs}"
    assert m2f().to_dict()["image_processor_type"] == "Mask2FormerImageProcessor"
    assert MaskFormerImageProcessor().to_dict()["image_processor_type"] == "MaskFormerImageProcessor"
    assert isinstance(m2f(), MaskFormerImageProcessor)
    assert repr(m2f()).startswith("Mask2FormerImageProcessor {")


def test_m2f_save_and_load_both_ways(tmp_path):
    kwargs = dict(size={"shortest_edge": 48, "longest_edge": 90}, size_divisor=16, ignore_index=255,
                  do_reduce_labels=True)
    images, maps = [rgb(17, 41, 1), rgb(30, 22, 2)], [label_map(17, 41, 4, 1), label_map(30, 22, 5, 2)]
    # transformers writes, we read.
    HFProcessor(**kwargs).save_pretrained(tmp_path / "theirs")
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path / "theirs")
    assert type(ours) is Mask2FormerImageProcessor
    compare_batches(ours(images, maps), hf(**kwargs)(images, maps, return_tensors="pt"), with_labels=True)
    # We write, transformers reads (and the file names the Mask2Former class).
    (path,) = m2f(**kwargs).save_pretrained(tmp_path / "ours")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["image_processor_type"] == "Mask2FormerImageProcessor"
    theirs = HFProcessor.from_pretrained(tmp_path / "ours")
    assert json.loads(theirs.to_json_string()) == json.loads(HFProcessor(**kwargs).to_json_string())
    assert Mask2FormerImageProcessor.from_pretrained(tmp_path / "ours").to_dict() == m2f(**kwargs).to_dict()
    # Neither side refuses the other model's processor type: they differ only in post-processing.
    HFMaskFormerProcessor(**kwargs).save_pretrained(tmp_path / "maskformer")
    assert type(HFProcessor.from_pretrained(tmp_path / "maskformer")).__name__ == "Mask2FormerImageProcessorPil"
    loaded = Mask2FormerImageProcessor.from_pretrained(tmp_path / "maskformer")
    assert type(loaded) is Mask2FormerImageProcessor and loaded.to_dict() == m2f(**kwargs).to_dict()
    assert MaskFormerImageProcessor.from_pretrained(tmp_path / "ours").to_dict()["image_processor_type"] == (
        "MaskFormerImageProcessor"
    )


def test_m2f_legacy_hub_config(tmp_path):
    """The shape of the facebook/mask2former-* hub configs: int size 384, size_divisibility,
    reduce_labels, feature_extractor_type. transformers 5.23 drops the legacy keys and cannot
    resize with `{"shortest_edge": 384}` alone; we honour them as transformers 4.x, which wrote them, did
    (MaskFormer deviations 8 and 10: longest_edge 1333)."""
    legacy = {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "Mask2FormerFeatureExtractor",
        "ignore_index": 255, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "num_labels": 80, "reduce_labels": True, "resample": 2, "size": 384, "size_divisibility": 16,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert (ours.size, ours.size_divisor, ours.do_reduce_labels, ours.num_labels) == (
        {"shortest_edge": 384, "longest_edge": 1333}, 16, True, 80
    )
    theirs = HFProcessor.from_pretrained(tmp_path)
    assert (theirs.size_divisor, theirs.do_reduce_labels) == (32, False), "transformers now honours the legacy keys"
    with pytest.raises(ValueError, match="shortest_edge"):
        theirs(rgb(30, 40), return_tensors="pt")
    # 30x40 -> short side 384, long side int(384 * 40 / 30) = 512; both multiples of 16.
    modern = hf(size={"height": 384, "width": 512}, size_divisor=16, do_reduce_labels=True, ignore_index=255)
    image, seg = rgb(30, 40, 3), label_map(30, 40, 6, 3)
    compare_batches(ours(image, seg), modern(image, seg, return_tensors="pt"), with_labels=True)


# ------------------------------------------------------------------------------------------------
# Pre-processing parity
# ------------------------------------------------------------------------------------------------
def compare_batches(ours, theirs, with_labels=False) -> None:
    assert_equal(ours["pixel_values"], theirs["pixel_values"], "pixel_values")
    assert_equal(ours["pixel_mask"], theirs["pixel_mask"], "pixel_mask")
    if with_labels:
        assert len(ours["mask_labels"]) == len(theirs["mask_labels"]), "number of mask_labels"
        for i, (a, b) in enumerate(zip(ours["mask_labels"], theirs["mask_labels"])):
            assert_equal(a, b, f"mask_labels[{i}]")
        for i, (a, b) in enumerate(zip(ours["class_labels"], theirs["class_labels"])):
            assert_equal(a, b, f"class_labels[{i}]")


PRE_CASES = {
    "defaults": dict(),
    "short+long div32, ignore 255, reduce": dict(size={"shortest_edge": 64, "longest_edge": 100}, ignore_index=255,
                                                 do_reduce_labels=True),
    "height+width div0, ignore 0": dict(size={"height": 45, "width": 71}, size_divisor=0, ignore_index=0),
    "int+max_size, bicubic, no normalize": dict(size=48, max_size=97, size_divisor=16, resample=3, do_normalize=False),
    "pad_size, custom mean/std": dict(size={"shortest_edge": 40, "longest_edge": 60},
                                      pad_size={"height": 96, "width": 96},
                                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]),
}


@pytest.mark.parametrize("case", list(PRE_CASES), ids=list(PRE_CASES))
def test_m2f_preprocess_parity(case):
    kwargs = PRE_CASES[case]
    sizes = [(17, 301), (61, 29), (97, 97)] if case != "defaults" else [(61, 29), (40, 53)]
    images = [rgb(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    maps = [label_map(h, w, 7, seed=i) for i, (h, w) in enumerate(sizes)]
    ours, theirs = m2f(**kwargs), hf(**kwargs)
    compare_batches(ours(images), theirs(images, return_tensors="pt"))
    # transformers cannot pad the masks of a mixed-size batch with ignore_index None (MaskFormer
    # deviation 12): give one at call time there.
    call = {} if "ignore_index" in kwargs else dict(ignore_index=255)
    compare_batches(ours(images, maps, **call), theirs(images, maps, return_tensors="pt", **call), with_labels=True)
    # Instance maps with an instance -> class mapping, one dict per image.
    id_maps = [{i: (i * 3) % 5 for i in range(7)} for _ in images]
    compare_batches(
        ours(images, maps, instance_id_to_semantic_id=id_maps, **call),
        theirs(images, maps, instance_id_to_semantic_id=id_maps, return_tensors="pt", **call),
        with_labels=True,
    )


# ------------------------------------------------------------------------------------------------
# Post-processing parity
# ------------------------------------------------------------------------------------------------
def assert_semantic_like_transformers(ours, outputs, target, backend, name):
    """Our semantic maps against transformers' on `outputs`: bit for bit on the reference backend
    (transformers' own ops), up to near ties (`assert_labels_up_to_ties`, judged on transformers'
    scores) on the fused C++ op."""
    theirs = HFProcessor().post_process_semantic_segmentation(outputs, target_sizes=their_sizes(target),
                                                              return_segmentation_scores=True)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        what = f"{name}: semantic map {i} (backend {backend})"
        if backend == "reference":
            assert_equal(a, b.segmentation, what)
        else:
            assert_labels_up_to_ties(a, b.segmentation, b.segmentation_scores, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_m2f_semantic_parity(scene, target, backend):
    with dispatch.backend(backend):
        ours = m2f().post_process_semantic_segmentation(scene, target_sizes=TARGETS[target])
    assert dispatch.last_dispatch("mask2former_semantic").backend == backend
    assert len(ours) == 2
    assert_semantic_like_transformers(ours, scene, TARGETS[target], backend, f"target {target}")
    if target == "none":
        assert ours[0].shape == (384, 384), "Mask2Former maps are 384x384 without target sizes"
    assert {0, 3, 5} <= set(torch.unique(ours[0]).tolist()), "the scene's classes should show up"


@pytest.mark.parametrize("backend", BACKENDS)
def test_m2f_semantic_random_logits(backend):
    """Unstructured logits (flat class scores: many near ties between classes), a batch with
    different target sizes, one smaller than 384 and one odd and larger, then no target sizes."""
    outputs = types.SimpleNamespace(class_queries_logits=torch.randn(2, 20, 31) * 2,
                                    masks_queries_logits=torch.randn(2, 20, 17, 23) * 3)
    for target in ([(100, 77), (401, 523)], None):
        with dispatch.backend(backend):
            ours = m2f().post_process_semantic_segmentation(outputs, target_sizes=target)
        assert dispatch.last_dispatch("mask2former_semantic").backend == backend
        assert_semantic_like_transformers(ours, outputs, target, backend, f"random logits, target {target}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_m2f_semantic_low_precision(dtype):
    """fp16/bf16 logits against transformers' fp32 maps (the gold), with transformers' own
    disagreement in that dtype (it resizes, sums and resizes in it) as the budget: ours may flip
    at most twice as many pixels, plus near ties of the fp32 scores."""
    from maskformer.kernels.mask_einsum import make_realistic_logits

    cl, ml = make_realistic_logits(1, 50, 60, 40, 53, n_objects=10, seed=4)
    gold = HFProcessor().post_process_semantic_segmentation(
        types.SimpleNamespace(class_queries_logits=cl, masks_queries_logits=ml), target_sizes=[(160, 213)],
        return_segmentation_scores=True)[0]
    low = types.SimpleNamespace(class_queries_logits=cl.to(dtype), masks_queries_logits=ml.to(dtype))
    theirs = HFProcessor().post_process_semantic_segmentation(low, target_sizes=[(160, 213)])[0]
    ours = m2f().post_process_semantic_segmentation(low, target_sizes=[(160, 213)])[0]
    their_flips = int((theirs != gold.segmentation).sum())
    our_flips = ours != gold.segmentation
    scores = gold.segmentation_scores.double()
    gap = (scores.gather(0, gold.segmentation[None])[0] - scores.gather(0, ours[None])[0]).abs()
    beyond_ties = int((our_flips & (gap > 4e-6)).sum())
    assert beyond_ties <= 2 * their_flips, (
        f"{dtype}: {beyond_ties} pixels differ from transformers' fp32 maps beyond near ties; transformers in "
        f"{dtype} differs on {their_flips}")


# Query 3's tied top class halves its probability (0.4996 < mask_threshold 0.5), where deviation 3
# would apply; with mask_threshold 0 both sides count every pixel as the query's own area.
TIED_PANOPTIC = dict(threshold=0.3, mask_threshold=0.0, overlap_mask_area_threshold=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_m2f_exact_class_ties(tied_scene, backend):
    """Exact ties between classes: the semantic argmax and the panoptic top class take the lower
    id, as transformers' do."""
    for target in (None, [(61, 43), (7, 300)]):
        with dispatch.backend(backend):
            ours = m2f().post_process_semantic_segmentation(tied_scene, target_sizes=target)
            pan = m2f().post_process_panoptic_segmentation(tied_scene, target_sizes=target, **TIED_PANOPTIC)
        assert_semantic_like_transformers(ours, tied_scene, target, backend, f"tied classes, target {target}")
        labels = set(torch.unique(ours[1]).tolist())
        assert 1 in labels and 4 not in labels, f"tied classes 1/4 should resolve to 1, got labels {labels}"
        assert_same_results(pan, HFProcessor().post_process_panoptic_segmentation(
            tied_scene, target_sizes=target, **TIED_PANOPTIC), f"panoptic with tied classes (target {target})")
        assert 1 in [s["label_id"] for s in pan[1]["segments_info"]]


def test_m2f_semantic_scores():
    for target in (None, [(45, 31)]):
        ours = m2f().post_process_semantic_segmentation(
            SCENE_OUTPUTS_SMALL, target_sizes=target, return_segmentation_scores=True
        )
        theirs = HFProcessor().post_process_semantic_segmentation(
            SCENE_OUTPUTS_SMALL, target_sizes=target, return_segmentation_scores=True
        )
        assert_equal(ours[0].segmentation, theirs[0].segmentation, f"segmentation (target {target})")
        assert_equal(ours[0].segmentation_scores, theirs[0].segmentation_scores,
                     f"segmentation_scores (target {target})")


# 300 classes, 12 queries: the semantic sum with many classes (argmax over > 255 labels).
SCENE_OUTPUTS_SMALL = make_outputs([[(q, (q * 37) % 300, 9.0, (3 + q, 2 + 2 * q, 4, 5)) for q in range(0, 12, 2)]],
                                   12, 300, (20, 29), seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_m2f_semantic_coco_scale(backend):
    """COCO-like outputs (100 queries, 133 classes, 96x128 masks -> 384x384 -> an odd 4x target),
    realistic logits (`make_realistic_logits`: sharp Voronoi regions, so classes cross between
    source pixels): the reference bit-identical, the fused C++ op up to near ties."""
    from maskformer.kernels.mask_einsum import make_realistic_logits

    class_logits, mask_logits = make_realistic_logits(1, 100, 133, 96, 128, n_objects=25, seed=3)
    outputs = types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    for target in ([(383, 511)], None):
        with dispatch.backend(backend):
            ours = m2f().post_process_semantic_segmentation(outputs, target_sizes=target)
        assert_semantic_like_transformers(ours, outputs, target, backend, f"COCO scale, target {target}")
        assert len(torch.unique(ours[0])) >= 10, "the outputs should produce many classes"


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_m2f_instance_parity(scene, target, threshold):
    kwargs = dict(threshold=threshold, target_sizes=TARGETS[target])
    ours = m2f().post_process_instance_segmentation(scene, **kwargs)
    their_kwargs = dict(kwargs, target_sizes=their_sizes(kwargs["target_sizes"]))
    theirs = HFProcessor().post_process_instance_segmentation(scene, **their_kwargs)
    assert_same_results(ours, theirs, f"instance (target {target}, threshold {threshold})")
    if target == "none":
        assert ours[0]["segmentation"].shape == (384, 384)
    if threshold == 0.5:
        assert len(ours[0]["segments_info"]) >= 4, "the scene should produce several instances"
    # Binary maps: identical whenever an instance was found (deviation 6 otherwise).
    ours_bin = m2f().post_process_instance_segmentation(scene, return_binary_maps=True, **kwargs)
    theirs_bin = HFProcessor().post_process_instance_segmentation(scene, return_binary_maps=True, **their_kwargs)
    for i, (a, b) in enumerate(zip(ours_bin, theirs_bin)):
        assert a["segments_info"] == b["segments_info"]
        if b["segments_info"]:
            assert_equal(a["segmentation"], b["segmentation"], f"binary maps {i} (target {target})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_m2f_panoptic_parity(scene, target, backend):
    """Fused label sets that do not trigger deviations 1-2 (no fused label has two instances
    that both survive), several thresholds."""
    settings = [
        dict(),
        dict(label_ids_to_fuse={5, 7}),
        dict(label_ids_to_fuse={1}, threshold=0.8, mask_threshold=0.4, overlap_mask_area_threshold=0.6),
        dict(threshold=0.1, mask_threshold=0.6, overlap_mask_area_threshold=0.3),
    ]
    for kwargs in settings:
        with dispatch.backend(backend):
            ours = m2f().post_process_panoptic_segmentation(scene, target_sizes=TARGETS[target], **kwargs)
        assert dispatch.last_dispatch("query_argmax").backend == backend
        theirs = HFProcessor().post_process_panoptic_segmentation(scene, target_sizes=their_sizes(TARGETS[target]),
                                                                  **kwargs)
        assert_same_results(ours, theirs, f"panoptic (target {target}, {kwargs}, backend {backend})")
        if target == "none":
            assert ours[0]["segmentation"].shape == (384, 384)
    assert len(ours[0]["segments_info"]) >= 3, "the scene should produce several segments"
    # The duplicate query 14 of image 1 ties with query 8 everywhere: the first one wins, the
    # duplicate wins no pixel and makes no segment.
    default = m2f().post_process_panoptic_segmentation(scene, target_sizes=TARGETS[target])[1]["segments_info"]
    assert [s["label_id"] for s in default].count(7) == 1


@pytest.mark.skipif(_cpp_error() is not None, reason=f"C++ extension: {_cpp_error()}")
def test_m2f_panoptic_coco_scale():
    """100 queries, 133 classes, 30 confident objects: the C++ per-pixel step gives transformers'
    maps on the 384x384 logits, with and without targets (no fused labels: deviations 1-2 do not
    apply, and the scores are ~1 so deviation 3 touches no pixel)."""
    from maskformer.kernels.mask_einsum import make_realistic_logits

    class_logits, mask_logits = make_realistic_logits(2, 100, 133, 40, 53, n_objects=30, seed=1)
    outputs = types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    for target in ([(160, 213), (97, 61)], None):
        with dispatch.backend("cpp"):
            ours = m2f().post_process_panoptic_segmentation(outputs, target_sizes=target)
        theirs = HFProcessor().post_process_panoptic_segmentation(outputs, target_sizes=target)
        assert_same_results(ours, theirs, f"panoptic coco scale (target {target})")
        assert len(ours[0]["segments_info"]) >= 5


def test_m2f_tensor_target_sizes(scene):
    """Deviation 22: a (B, 2) tensor of target sizes is accepted (the parity tests above compare it
    with transformers given the same sizes as a list); transformers fails on it."""
    sizes = TARGETS["tensor"]
    for method in ("semantic", "instance", "panoptic"):
        with pytest.raises(TypeError):
            getattr(HFProcessor(), f"post_process_{method}_segmentation")(scene, target_sizes=sizes)
        ours = getattr(m2f(), f"post_process_{method}_segmentation")(scene, target_sizes=sizes)
        first = ours[1] if method == "semantic" else ours[1]["segmentation"]
        assert tuple(first.shape) == tuple(sizes[1].tolist()), f"{method}: shape {tuple(first.shape)}"


def test_m2f_accepts_transformers_output(scene):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    outputs = Mask2FormerForUniversalSegmentationOutput(
        class_queries_logits=scene.class_queries_logits, masks_queries_logits=scene.masks_queries_logits
    )
    assert_equal(m2f().post_process_semantic_segmentation(outputs)[0],
                 HFProcessor().post_process_semantic_segmentation(outputs)[0], "semantic from the output object")
    assert_same_results(m2f().post_process_instance_segmentation(outputs),
                        HFProcessor().post_process_instance_segmentation(outputs), "instance from the output object")


def test_m2f_maskformer_postprocess_differs(scene):
    """The subclass really changes post-processing: MaskFormer's maps are at the mask size."""
    assert MaskFormerImageProcessor().post_process_semantic_segmentation(scene)[0].shape == MASK_SIZE
    assert m2f().post_process_semantic_segmentation(scene)[0].shape == (384, 384)


# ------------------------------------------------------------------------------------------------
# Deviations (module docstring), each also asserting what transformers does instead
# ------------------------------------------------------------------------------------------------
def test_m2f_instance_coco_rle_aligned_with_segments(scene):
    """Deviation 5: one RLE per segments_info entry, each that instance's own mask."""
    for target in (None, [(61, 43), (7, 300)]):
        ours = m2f().post_process_instance_segmentation(scene, target_sizes=target, return_coco_annotation=True)
        binary = HFProcessor().post_process_instance_segmentation(scene, target_sizes=target, return_binary_maps=True)
        theirs = HFProcessor().post_process_instance_segmentation(scene, target_sizes=target,
                                                                  return_coco_annotation=True)
        plain = HFProcessor().post_process_instance_segmentation(scene, target_sizes=target)
        for i in range(2):
            assert ours[i]["segments_info"] == theirs[i]["segments_info"]
            rles, maps = ours[i]["segmentation"], binary[i]["segmentation"]
            assert len(rles) == len(ours[i]["segments_info"]) == maps.shape[0]
            shape = tuple(maps.shape[1:])
            for j, rle in enumerate(rles):
                assert all(type(v) is int for v in rle), "RLE values must be python ints"
                assert_equal(rle_decode(rle, shape), maps[j], f"image {i} instance {j} RLE (target {target})")
            background = (plain[i]["segmentation"] == -1).float()
            assert_equal(rle_decode(theirs[i]["segmentation"][0], shape), background, "transformers rle[0]")


def test_m2f_empty_results(scene):
    """Deviations 4 and 6 at Mask2Former's sizes: nothing survives -> an int32 panoptic map of -1,
    `(0, H, W)` binary maps; 384x384 without target sizes."""
    for target, shape in ((None, (384, 384)), ([(13, 19), (5, 7)], (13, 19))):
        ours = m2f().post_process_panoptic_segmentation(scene, threshold=0.9999, target_sizes=target)
        theirs = HFProcessor().post_process_panoptic_segmentation(scene, threshold=0.9999, target_sizes=target)
        assert theirs[0]["segmentation"].dtype == torch.float32, "transformers changed; revisit deviation 4"
        assert ours[0]["segments_info"] == theirs[0]["segments_info"] == []
        assert_equal(ours[0]["segmentation"], theirs[0]["segmentation"].to(torch.int32), f"empty panoptic ({target})")
        assert ours[0]["segmentation"].shape == shape
        ours = m2f().post_process_instance_segmentation(scene, threshold=1.0, target_sizes=target,
                                                        return_binary_maps=True)
        theirs = HFProcessor().post_process_instance_segmentation(
            scene, threshold=1.0, target_sizes=target, return_binary_maps=True
        )
        assert theirs[0]["segmentation"].shape == shape, "transformers changed; revisit deviation 6"
        assert ours[0]["segmentation"].shape == (0, *shape) and ours[0]["segmentation"].dtype == torch.float32
        plain = m2f().post_process_instance_segmentation(scene, threshold=1.0, target_sizes=target)
        assert_equal(plain[0]["segmentation"], torch.full(shape, -1.0), "empty instance map")


def test_m2f_panoptic_fused_ids_are_unique(scene):
    """Deviations 1 and 2 (image 1: class 0 twice, then classes 1 and 7)."""
    for target in (None, [(61, 43), (30, 50)]):
        ours = m2f().post_process_panoptic_segmentation(scene, label_ids_to_fuse={0}, target_sizes=target)[1]
        theirs = HFProcessor().post_process_panoptic_segmentation(scene, label_ids_to_fuse={0}, target_sizes=target)[1]
        their_ids = [(s["id"], s["label_id"]) for s in theirs["segments_info"]]
        assert their_ids == [(1, 0), (2, 1), (1, 0), (2, 7)], f"transformers changed: {their_ids}"
        our_ids = [(s["id"], s["label_id"], s["was_fused"]) for s in ours["segments_info"]]
        assert our_ids == [(1, 0, True), (2, 1, False), (3, 7, False)], f"target {target}: {our_ids}"
        assert ours["segments_info"][0]["score"] == theirs["segments_info"][0]["score"]
        # Same pixels per segment: ours is transformers' map with the class-7 pixels relabelled 3.
        seg_ours, seg_theirs = ours["segmentation"], theirs["segmentation"]
        semantic = m2f().post_process_semantic_segmentation(scene, target_sizes=target)[1]
        car = (seg_theirs == 2) & (seg_ours == 3)
        assert car.any() and torch.equal(seg_ours == 3, car)
        assert_equal(seg_ours, torch.where(car, torch.tensor(3, dtype=torch.int32), seg_theirs), "unique ids map")
        assert semantic[seg_ours == 3].mode().values == 7, "id 3 should be the class-7 object"


def test_m2f_panoptic_low_score_segments_survive():
    """Deviation 3: queries whose score is below mask_threshold are not silently dropped."""
    outputs = make_outputs([[(0, 2, 1.0, (6, 6, 4, 5)), (2, 4, 1.0, (14, 20, 5, 6))]], 4, 5, (20, 30), seed=3)
    for query, class_id in ((0, 2), (2, 4)):  # unsure but right: probability ~0.40
        outputs.class_queries_logits[0, query, :-1] = 0.0
        outputs.class_queries_logits[0, query, class_id] = 1.0
    scores = outputs.class_queries_logits.softmax(-1).max(-1).values[0, [0, 2]]
    assert ((scores > 0.3) & (scores < 0.5)).all(), f"test setup: scores {scores.tolist()}"
    theirs = HFProcessor().post_process_panoptic_segmentation(outputs, threshold=0.3)[0]
    assert theirs["segments_info"] == [], "transformers now keeps low-score segments; revisit deviation 3"
    ours = m2f().post_process_panoptic_segmentation(outputs, threshold=0.3)[0]
    assert [(s["id"], s["label_id"]) for s in ours["segments_info"]] == [(1, 2), (2, 4)]
    # Ellipse centres (6, 6) and (14, 20) in the 20x30 mask are at 384/20, 384/30 times that.
    assert ours["segmentation"][int(6.5 * 19.2), int(6.5 * 12.8)] == 1
    assert ours["segmentation"][int(14.5 * 19.2), int(20.5 * 12.8)] == 2


def _padded_batch():
    """Two images in one batch: image 0 fills the 96x148 input, image 1 is 64x80 (logits 16x20 at
    stride 4) with padding below and to the right; a confident object sits in image 1's padding."""
    out = make_outputs(SCENE, NUM_QUERIES, NUM_CLASSES, MASK_SIZE, seed=5)
    pixel_mask = torch.zeros(2, 96, 148, dtype=torch.int64)
    pixel_mask[0] = 1
    pixel_mask[1, :64, :80] = 1
    return out, pixel_mask


@pytest.mark.parametrize("target", [None, [(96, 148), (64, 80)]], ids=["none", "image sizes"])
def test_m2f_pixel_mask_crops_each_image(target):
    """Deviation 21: with pixel_mask, image 1's maps are transformers' maps of its own 16x20 logits
    (the padding cropped off before the 384x384 resize); image 0, unpadded, is unchanged; without
    pixel_mask (or without padding) the result is transformers'."""
    out, pixel_mask = _padded_batch()
    proc, theirs_proc = m2f(), HFProcessor()
    alone = types.SimpleNamespace(class_queries_logits=out.class_queries_logits[1:],
                                  masks_queries_logits=out.masks_queries_logits[1:, :, :16, :20].contiguous())
    first = types.SimpleNamespace(class_queries_logits=out.class_queries_logits[:1],
                                  masks_queries_logits=out.masks_queries_logits[:1])
    t0 = None if target is None else target[:1]
    t1 = None if target is None else target[1:]
    sem = proc.post_process_semantic_segmentation(out, target_sizes=target, pixel_mask=pixel_mask)
    assert_equal(sem[0], theirs_proc.post_process_semantic_segmentation(first, target_sizes=t0)[0], "semantic image 0")
    assert_equal(sem[1], theirs_proc.post_process_semantic_segmentation(alone, target_sizes=t1)[0], "semantic image 1")
    inst = proc.post_process_instance_segmentation(out, target_sizes=target, pixel_mask=pixel_mask, threshold=0.3)
    assert_same_results(inst[1:], theirs_proc.post_process_instance_segmentation(alone, target_sizes=t1, threshold=0.3),
                        "instance image 1")
    pan = proc.post_process_panoptic_segmentation(out, target_sizes=target, pixel_mask=pixel_mask)
    assert_same_results(pan[:1], theirs_proc.post_process_panoptic_segmentation(first, target_sizes=t0),
                        "panoptic image 0")
    assert_same_results(pan[1:], theirs_proc.post_process_panoptic_segmentation(alone, target_sizes=t1),
                        "panoptic image 1")
    # Without pixel_mask, or with an all-ones one, it is transformers' whole-batch computation.
    for mask in (None, torch.ones_like(pixel_mask)):
        assert_equal(proc.post_process_semantic_segmentation(out, target_sizes=target, pixel_mask=mask)[1],
                     theirs_proc.post_process_semantic_segmentation(out, target_sizes=target)[1], "no crop")


def test_m2f_pixel_mask_fractional_extent_ignores_padding():
    """An image of 63x79 pixels covers 15.75x19.75 logit pixels: whatever the padding holds, its
    maps do not change (here a confident extra object painted over the padding)."""
    out, pixel_mask = _padded_batch()
    pixel_mask[1] = 0
    pixel_mask[1, :63, :79] = 1
    # Query 2 of image 1 becomes a confident class-6 object with no pixel inside the image.
    out.class_queries_logits[1, 2, -1] = -5.0
    out.class_queries_logits[1, 2, 6] = 9.0
    out.masks_queries_logits[1, 2] = -12.0
    painted = types.SimpleNamespace(class_queries_logits=out.class_queries_logits.clone(),
                                    masks_queries_logits=out.masks_queries_logits.clone())
    # Query 2 of image 1 claims the logit rows/columns that hold padding only (row 15 and column
    # 19 are three quarters image: they belong to it).
    painted.masks_queries_logits[1, 2, 16:, :] = 12.0
    painted.masks_queries_logits[1, 2, :, 20:] = 12.0
    proc = m2f()
    for target in (None, [(96, 148), (63, 79)]):
        a = proc.post_process_semantic_segmentation(out, target_sizes=target, pixel_mask=pixel_mask)[1]
        b = proc.post_process_semantic_segmentation(painted, target_sizes=target, pixel_mask=pixel_mask)[1]
        unmasked = proc.post_process_semantic_segmentation(painted, target_sizes=target)[1]
        assert (unmasked == 6).any(), "test setup: the painted object should show without pixel_mask"
        assert_equal(a, b, f"semantic with painted padding (target {target})")
        pa = proc.post_process_panoptic_segmentation(out, target_sizes=target, pixel_mask=pixel_mask)[1]
        pb = proc.post_process_panoptic_segmentation(painted, target_sizes=target, pixel_mask=pixel_mask)[1]
        assert pa["segments_info"] == pb["segments_info"]
        assert_equal(pa["segmentation"], pb["segmentation"], f"panoptic with painted padding (target {target})")
        assert pa["segmentation"].shape == ((384, 384) if target is None else (63, 79))
        # The fractional extent is mapped onto the output: the result is that of 15.75x19.75
        # logits resized with aten's explicit scales, not of the 16x20 crop stretched.
        crop_outputs = types.SimpleNamespace(class_queries_logits=out.class_queries_logits[1:],
                                             masks_queries_logits=out.masks_queries_logits[1:, :, :16, :20])
        crop_target = None if target is None else target[1:]
        crop = proc.post_process_semantic_segmentation(crop_outputs, target_sizes=crop_target)[0]
        assert not torch.equal(a, crop), "the fractional extent made no difference: test setup"


BAD_POSTPROCESS = {
    "threshold > 1": (dict(threshold=1.5), ValueError, r"threshold must be in \[0, 1\]"),
    "NaN mask_threshold": (dict(mask_threshold=float("nan")), ValueError, r"mask_threshold must be in \[0, 1\]"),
    "too many target sizes": (dict(target_sizes=[(4, 4)] * 3), ValueError, "as many target sizes"),
    "float target size": (dict(target_sizes=[(4.5, 4), (4, 4)]), ValueError, "pair of ints"),
}


BAD_CASES = [(method, case) for method in ("semantic", "instance", "panoptic") for case in BAD_POSTPROCESS
             if not (method == "semantic" and "threshold" in case)]  # semantic takes no threshold


@pytest.mark.parametrize("method, case", BAD_CASES, ids=[f"{m}-{c}" for m, c in BAD_CASES])
def test_m2f_bad_postprocess_inputs(scene, method, case, monkeypatch):
    """Deviation 20: bad arguments raise, and before the 384x384 resize is paid for."""
    kwargs, exc, message = BAD_POSTPROCESS[case]

    def no_resize(*args, **kw):
        raise AssertionError("the logits were resized before the arguments were checked")

    monkeypatch.setattr(processing_mask2former, "resize_mask_logits", no_resize)
    with pytest.raises(exc, match=message):
        getattr(m2f(), f"post_process_{method}_segmentation")(scene, **kwargs)


def test_m2f_bad_logits_and_flags(scene):
    nan = types.SimpleNamespace(class_queries_logits=scene.class_queries_logits,
                                masks_queries_logits=scene.masks_queries_logits.clone())
    nan.masks_queries_logits[0, 0, 0, 0] = float("nan")
    for method in ("semantic", "instance", "panoptic"):
        with pytest.raises(ValueError, match="masks_queries_logits contains NaN"):
            getattr(m2f(), f"post_process_{method}_segmentation")(nan)
    with pytest.raises(ValueError, match="can not be both set"):
        m2f().post_process_instance_segmentation(scene, return_coco_annotation=True, return_binary_maps=True)
