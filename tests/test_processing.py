"""Tests of maskformer.processing against transformers' MaskFormerImageProcessor (the oracle).

transformers 5.23 without torchvision resolves `MaskFormerImageProcessor` to its PIL/NumPy
backend; that is what every parity test below compares with. Pixel values, masks and label maps
are compared with `torch.equal` (bit-exact): both sides run the same Pillow resize and the same
float64-then-float32 rescale and float32 normalise, so there is no rounding budget to justify.
Each deviation listed in the `maskformer.processing` docstring has a test named there; those tests
also assert that transformers still shows the behaviour we deviate from, so an upgrade of the
oracle that fixes it is noticed.
"""

from __future__ import annotations

import json
import os
import sys
import types
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # silence the "falling back to the PIL backend" notice

from transformers import MaskFormerImageProcessor as HFProcessor  # noqa: E402
from transformers.models.maskformer.modeling_maskformer import (  # noqa: E402
    MaskFormerForInstanceSegmentationOutput,
)

from maskformer import processing  # noqa: E402
from maskformer.processing import BatchFeature, MaskFormerImageProcessor  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def assert_equal(actual, expected, name: str) -> None:
    """Exact comparison of two tensors / arrays that says where and by how much they differ."""
    actual = torch.as_tensor(np.asarray(actual)) if not isinstance(actual, torch.Tensor) else actual
    expected = torch.as_tensor(np.asarray(expected)) if not isinstance(expected, torch.Tensor) else expected
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    diff = actual != expected
    idx = tuple(int(i) for i in torch.nonzero(diff)[0])
    a, e = actual.double(), expected.double()
    max_abs = (a - e).abs().max().item()
    raise AssertionError(
        f"{name}: {int(diff.sum())} of {diff.numel()} elements differ (max |diff| {max_abs:.6g}); "
        f"first at {idx}: ours {actual[idx].item()!r} vs transformers {expected[idx].item()!r}"
    )


def hf(**kwargs) -> HFProcessor:
    """transformers' processor; do_convert_rgb=True so it accepts the non-RGB inputs we test."""
    kwargs.setdefault("do_convert_rgb", True)
    return HFProcessor(**kwargs)


def compare_batches(ours, theirs, with_labels: bool = False) -> None:
    assert_equal(ours["pixel_values"], theirs["pixel_values"], "pixel_values")
    assert_equal(ours["pixel_mask"], theirs["pixel_mask"], "pixel_mask")
    if with_labels:
        assert len(ours["mask_labels"]) == len(theirs["mask_labels"])
        for i, (a, b) in enumerate(zip(ours["mask_labels"], theirs["mask_labels"])):
            assert_equal(a, b, f"mask_labels[{i}]")
        for i, (a, b) in enumerate(zip(ours["class_labels"], theirs["class_labels"])):
            assert_equal(a, b, f"class_labels[{i}]")


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def label_map(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    """Blocky label map (labels 0..n-1) so that resized maps keep every label."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n, (max(1, h // 4 + 1), max(1, w // 4 + 1)), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4), dtype=np.uint8))[:h, :w]


def rle_decode(rle, shape) -> torch.Tensor:
    flat = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
    for start, length in zip(rle[::2], rle[1::2]):
        flat[int(start) - 1 : int(start) - 1 + int(length)] = 1
    return flat.view(shape)


# ------------------------------------------------------------------------------------------------
# Pre-processing parity
# ------------------------------------------------------------------------------------------------
SIZE_CONFIGS = {
    "short+long,div32": dict(size={"shortest_edge": 64, "longest_edge": 100}, size_divisor=32),
    "short+long,div0": dict(size={"shortest_edge": 64, "longest_edge": 100}, size_divisor=0),
    "short+long,div1": dict(size={"shortest_edge": 57, "longest_edge": 131}, size_divisor=1),
    "height+width,div32": dict(size={"height": 45, "width": 71}, size_divisor=32),
    "max_hw,div0": dict(size={"max_height": 90, "max_width": 60}, size_divisor=0),
    "int+max_size": dict(size=48, max_size=97, size_divisor=16),
}
# (height, width): odd, prime, portrait, landscape, tiny.
ODD_SIZES = [(17, 301), (513, 259), (1, 1), (2, 3), (301, 17), (259, 513), (97, 97)]


@pytest.mark.parametrize("config", list(SIZE_CONFIGS), ids=list(SIZE_CONFIGS))
def test_pixel_parity_sizes(config):
    kwargs = SIZE_CONFIGS[config]
    ours, theirs = MaskFormerImageProcessor(**kwargs), hf(**kwargs)
    images = [rgb(h, w, seed=i) for i, (h, w) in enumerate(ODD_SIZES)]
    for img, (h, w) in zip(images, ODD_SIZES):
        try:
            expected = theirs(img, return_tensors="pt")
        except ValueError:
            # transformers cannot resize this aspect ratio with this size (a side becomes 0); we
            # must refuse too, loudly.
            with pytest.raises(ValueError, match="a side is 0"):
                ours(img)
            continue
        compare_batches(ours(img), expected)
    # The same images as one mixed batch (padding to the batch maximum).
    batch = [img for img, (h, w) in zip(images, ODD_SIZES) if h * 100 >= w and w * 100 >= h]
    compare_batches(ours(batch), theirs(batch, return_tensors="pt"))


def test_pixel_parity_default_config():
    """transformers' defaults: shortest 800 / longest 1333, divisor 32."""
    images = [rgb(17, 301), rgb(513, 259, 1), rgb(640, 480, 2)]
    compare_batches(MaskFormerImageProcessor()(images), hf()(images, return_tensors="pt"))


def _mode_inputs():
    base = rgb(37, 53, seed=3)
    pil = PIL.Image.fromarray(base)
    p_transparent = pil.convert("P")
    p_transparent.info["transparency"] = 5
    rgba = np.concatenate([base, np.random.default_rng(4).integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=-1)
    return {
        "PIL RGB": pil,
        "PIL L": pil.convert("L"),
        "PIL RGBA": PIL.Image.fromarray(rgba),
        "PIL P": pil.convert("P"),
        "PIL P+transparency": p_transparent,
        "PIL LA": PIL.Image.fromarray(rgba).convert("LA"),
        "PIL 1": pil.convert("1"),
        "PIL I": pil.convert("I"),
        "PIL CMYK": pil.convert("CMYK"),
        "np uint8 HWC": base,
        "np uint8 CHW": np.ascontiguousarray(base.transpose(2, 0, 1)),
        "np uint8 HW1": base[:, :, :1],
        "np uint8 HWC RGBA": rgba,
        "np float32 CHW in [0,1]": base.transpose(2, 0, 1).astype(np.float32) / 255,
        "np float64 HWC integer-valued": base.astype(np.float64),
        "np float32 RGBA in [0,1]": rgba.astype(np.float32) / 255,
        "np int64 HWC": base.astype(np.int64),
        "np bool HWC": base > 127,
        "torch uint8 CHW": torch.from_numpy(np.ascontiguousarray(base.transpose(2, 0, 1))),
        "torch float32 HWC integer-valued": torch.from_numpy(base.astype(np.float32)),
    }


MODE_INPUTS = _mode_inputs()


@pytest.mark.filterwarnings("ignore:.*values in \\[0, 1\\] and do_rescale=True")
@pytest.mark.parametrize("name", list(MODE_INPUTS), ids=list(MODE_INPUTS))
def test_pixel_parity_modes(name):
    """Every mode/layout/dtype, with our default do_convert_rgb=None against transformers' True."""
    kwargs = dict(size={"shortest_edge": 40, "longest_edge": 70})
    image = MODE_INPUTS[name]
    compare_batches(MaskFormerImageProcessor(**kwargs)(image), hf(**kwargs)(image, return_tensors="pt"))
    if name in ("PIL L", "PIL RGBA", "np uint8 HW1"):
        # Deviation 11: transformers' default (do_convert_rgb=None) does not convert and fails.
        with pytest.raises(ValueError, match="mean must have"):
            HFProcessor(**kwargs)(image, return_tensors="pt")


@pytest.mark.filterwarnings("ignore:.*values in \\[0, 1\\] and do_rescale=True")
def test_pixel_parity_mixed_batch_and_nesting():
    kwargs = dict(size={"shortest_edge": 40, "longest_edge": 70})
    images = [MODE_INPUTS[k] for k in MODE_INPUTS] + [rgb(5, 90, 7), rgb(61, 29, 8)]
    ours, theirs = MaskFormerImageProcessor(**kwargs), hf(**kwargs)
    expected = theirs(images, return_tensors="pt")
    compare_batches(ours(images), expected)
    # Nested lists and a rank-4 batch array flatten like transformers'.
    compare_batches(ours([images[:3], images[3:]]), expected)
    stack = np.stack([rgb(20, 30, 1), rgb(20, 30, 2)])
    compare_batches(ours(stack), theirs(stack, return_tensors="pt"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_resize=False),
        dict(do_rescale=False),
        dict(do_normalize=False),
        dict(image_mean=0.5, image_std=0.25),
        dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7], rescale_factor=1 / 127.5),
        dict(resample=PIL.Image.Resampling.NEAREST),
        dict(resample=3),
        dict(resample=PIL.Image.Resampling.LANCZOS, size={"height": 33, "width": 65}),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_pixel_parity_options(kwargs):
    kwargs = dict(dict(size={"shortest_edge": 40, "longest_edge": 70}), **kwargs)
    images = [rgb(17, 41, 1), rgb(30, 22, 2)]
    ours = MaskFormerImageProcessor(**kwargs)(images)
    theirs = hf(**kwargs)(images, return_tensors="pt")
    if not (kwargs.get("do_rescale", True) or kwargs.get("do_normalize", True)):
        theirs["pixel_values"] = theirs["pixel_values"].float()  # deviation 9, tested below
    compare_batches(ours, theirs)


def test_call_time_overrides_match_constructor():
    image = rgb(50, 70)
    proc = MaskFormerImageProcessor()
    ours = proc(image, size={"shortest_edge": 40, "longest_edge": 70}, size_divisor=0, image_mean=0.5)
    expected = hf(size={"shortest_edge": 40, "longest_edge": 70}, size_divisor=0, image_mean=0.5)(
        image, return_tensors="pt"
    )
    compare_batches(ours, expected)
    assert proc.size == {"shortest_edge": 800, "longest_edge": 1333}, "a call-time override leaked into the config"


def test_pad_size():
    images = [rgb(17, 41, 1), rgb(30, 22, 2)]
    kwargs = dict(size={"shortest_edge": 40, "longest_edge": 70}, pad_size={"height": 130, "width": 101})
    compare_batches(MaskFormerImageProcessor(**kwargs)(images), hf(**kwargs)(images, return_tensors="pt"))
    # Deviation 14: a plain dict at call time (transformers wants its SizeDict there).
    with pytest.raises(Exception, match="pad_size"):
        hf(size=kwargs["size"])(images, pad_size={"height": 130, "width": 101}, return_tensors="pt")
    ours = MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70})(
        images, pad_size={"height": 130, "width": 101}
    )
    compare_batches(ours, hf(**kwargs)(images, return_tensors="pt"))
    with pytest.raises(ValueError, match="pad_size .* is smaller than the largest processed image"):
        MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70})(images, pad_size=10)


def test_return_tensors_np_and_none():
    images = [rgb(17, 41, 1), rgb(30, 22, 2)]
    proc = MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70})
    pt = proc(images)
    np_out = proc(images, return_tensors="np")
    assert isinstance(np_out["pixel_values"], np.ndarray)
    assert_equal(np_out["pixel_values"], pt["pixel_values"], "np pixel_values")
    none_out = proc(images, return_tensors=None)
    assert isinstance(none_out["pixel_values"], list) and len(none_out["pixel_values"]) == 2
    assert_equal(np.stack(none_out["pixel_mask"]), pt["pixel_mask"], "list pixel_mask")


def test_batch_feature_access_and_unpacking():
    out = MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70})(
        rgb(20, 30), segmentation_maps=label_map(20, 30, 3), ignore_index=255
    )
    assert isinstance(out, BatchFeature) and isinstance(out, dict)
    assert out.pixel_values is out["pixel_values"]
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.shape == (1, 3, 64, 64)
    assert out.pixel_mask.dtype == torch.int64 and out.pixel_mask.shape == (1, 64, 64)
    assert out.mask_labels[0].dtype == torch.float32 and out.class_labels[0].dtype == torch.int64

    def forward(pixel_values, pixel_mask=None, mask_labels=None, class_labels=None):
        return pixel_values.shape, pixel_mask.shape, len(mask_labels), len(class_labels)

    assert forward(**out) == ((1, 3, 64, 64), (1, 64, 64), 1, 1)
    with pytest.raises(AttributeError, match="no key 'nope'"):
        out.nope
    moved = out.to(torch.float64)
    assert moved.pixel_values.dtype == torch.float64 and moved.pixel_mask.dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# Config loading / saving
# ------------------------------------------------------------------------------------------------
def _json(proc) -> dict:
    return json.loads(proc.to_json_string())


def test_to_dict_matches_transformers():
    for kwargs in [
        dict(),
        dict(size={"shortest_edge": 300, "longest_edge": 500}, do_reduce_labels=True, ignore_index=255, num_labels=150),
        dict(size={"height": 64, "width": 32}, size_divisor=0, resample=3, pad_size={"height": 70, "width": 40}),
    ]:
        theirs = _json(HFProcessor(**kwargs))
        ours = _json(MaskFormerImageProcessor(**kwargs))
        assert ours == theirs, f"to_dict differs for {kwargs}:\nours   {ours}\ntheirs {theirs}"


def test_from_pretrained_transformers_saved(tmp_path):
    kwargs = dict(size={"shortest_edge": 48, "longest_edge": 90}, size_divisor=16, ignore_index=255, do_reduce_labels=True)
    HFProcessor(**kwargs).save_pretrained(tmp_path)
    ours = MaskFormerImageProcessor.from_pretrained(tmp_path)
    theirs = hf(**kwargs)
    images, maps = [rgb(17, 41, 1), rgb(30, 22, 2)], [label_map(17, 41, 4, 1), label_map(30, 22, 5, 2)]
    compare_batches(ours(images, maps), theirs(images, maps, return_tensors="pt"), with_labels=True)
    # Path to the JSON file itself, and overrides.
    from_file = MaskFormerImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json", size_divisor=0)
    assert from_file.size_divisor == 0 and from_file.size == kwargs["size"]


def test_from_pretrained_legacy_keys(tmp_path):
    # The shape of old hub configs (facebook/maskformer-swin-base-ade): int size + max_size.
    legacy = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "MaskFormerFeatureExtractor",
        "ignore_index": 255,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "max_size": 97,
        "reduce_labels": False,
        "size": 48,
        "size_divisibility": 32,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = MaskFormerImageProcessor.from_pretrained(tmp_path)
    theirs = HFProcessor.from_pretrained(tmp_path, do_convert_rgb=True)
    assert ours.size == {"shortest_edge": 48, "longest_edge": 97}
    images, maps = [rgb(17, 41, 1), rgb(30, 22, 2)], [label_map(17, 41, 4, 1), label_map(30, 22, 5, 2)]
    compare_batches(ours(images, maps), theirs(images, maps, return_tensors="pt"), with_labels=True)


def test_legacy_keys_are_honoured(tmp_path):
    """Deviation 8: reduce_labels / size_divisibility map to the new names (5.23 drops them)."""
    legacy = {"size": 48, "max_size": 97, "size_divisibility": 16, "reduce_labels": True, "ignore_index": 255}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = MaskFormerImageProcessor.from_pretrained(tmp_path)
    theirs = HFProcessor.from_pretrained(tmp_path)
    assert (ours.size_divisor, ours.do_reduce_labels) == (16, True)
    assert (theirs.size_divisor, theirs.do_reduce_labels) == (32, False), (
        "transformers now honours the legacy keys; deviation 8 can go"
    )
    # Ours equals transformers given the new names.
    modern = hf(size={"shortest_edge": 48, "longest_edge": 97}, size_divisor=16, do_reduce_labels=True, ignore_index=255)
    images, maps = [rgb(17, 41, 1)], [label_map(17, 41, 4, 1)]
    compare_batches(ours(images, maps), modern(images, maps, return_tensors="pt"), with_labels=True)
    # The new name wins over the legacy one.
    assert MaskFormerImageProcessor(size_divisor=8, size_divisibility=16).size_divisor == 8
    assert MaskFormerImageProcessor(do_reduce_labels=False, reduce_labels=True).do_reduce_labels is False


def test_save_pretrained_roundtrip(tmp_path):
    ours = MaskFormerImageProcessor(
        size={"shortest_edge": 40, "longest_edge": 70}, size_divisor=8, ignore_index=7, do_reduce_labels=True
    )
    (path,) = ours.save_pretrained(tmp_path / "saved")  # the list of files written, as transformers
    assert os.path.basename(path) == "preprocessor_config.json"
    again = MaskFormerImageProcessor.from_pretrained(tmp_path / "saved")
    assert again.to_dict() == ours.to_dict()
    theirs = HFProcessor.from_pretrained(tmp_path / "saved", do_convert_rgb=True)
    images, maps = [rgb(17, 41, 1), rgb(30, 22, 2)], [label_map(17, 41, 9, 1), label_map(30, 22, 9, 2)]
    compare_batches(ours(images, maps), theirs(images, maps, return_tensors="pt"), with_labels=True)


def test_config_file_priority(tmp_path):
    """Deviation 17: preprocessor_config.json first; transformers prefers processor_config.json."""
    MaskFormerImageProcessor(size_divisor=8).save_pretrained(tmp_path)
    nested = {"image_processor": MaskFormerImageProcessor(size_divisor=16).to_dict()}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert MaskFormerImageProcessor.from_pretrained(tmp_path).size_divisor == 8
    assert HFProcessor.from_pretrained(tmp_path).size_divisor == 16, "transformers changed; revisit deviation 17"
    os.remove(tmp_path / "preprocessor_config.json")
    assert MaskFormerImageProcessor.from_pretrained(tmp_path).size_divisor == 16


def _fake_hub_cache(cache_dir, repo_id: str, files: dict) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_from_pretrained_hub_cache(tmp_path):
    config = MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70}, size_divisor=0).to_json_string()
    _fake_hub_cache(tmp_path, "acme/tiny-maskformer", {"preprocessor_config.json": config})
    proc = MaskFormerImageProcessor.from_pretrained("acme/tiny-maskformer", cache_dir=tmp_path, local_files_only=True)
    assert proc.size == {"shortest_edge": 40, "longest_edge": 70} and proc.size_divisor == 0
    # Newer repos keep the config inside processor_config.json.
    nested = json.dumps({"image_processor": json.loads(config), "processor_class": "X"})
    _fake_hub_cache(tmp_path, "acme/nested", {"processor_config.json": nested})
    proc = MaskFormerImageProcessor.from_pretrained("acme/nested", cache_dir=tmp_path, local_files_only=True)
    assert proc.size_divisor == 0


def test_bad_from_pretrained(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="hub repo 'acme/absent' has neither preprocessor_config.json"):
        MaskFormerImageProcessor.from_pretrained("acme/absent", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="No preprocessor_config.json"):
        MaskFormerImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        MaskFormerImageProcessor.from_pretrained(str(tmp_path / "missing" / "dir"))
    (tmp_path / "preprocessor_config.json").write_text('{"size": 40, ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        MaskFormerImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        MaskFormerImageProcessor.from_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # "not installed"
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        MaskFormerImageProcessor.from_pretrained("acme/tiny-maskformer")


# ------------------------------------------------------------------------------------------------
# Segmentation maps
# ------------------------------------------------------------------------------------------------
SEG_CASES = {
    "ignore255": dict(ignore_index=255),
    "ignore255,reduce": dict(ignore_index=255, do_reduce_labels=True),
    "ignore0": dict(ignore_index=0),
    "instance map": dict(ignore_index=255, instance_id_to_semantic_id={0: 7, 1: 7, 2: 8, 3: 9, 4: 3}),
    "instance map,reduce": dict(
        ignore_index=255, do_reduce_labels=True, instance_id_to_semantic_id={1: 7, 2: 8, 3: 9, 4: 3}
    ),
    "instance map per image": dict(
        ignore_index=255, instance_id_to_semantic_id=[{i: i + 10 for i in range(5)}, {i: 20 - i for i in range(5)}]
    ),
    "no resize": dict(ignore_index=255, do_resize=False),
}


@pytest.mark.parametrize("case", list(SEG_CASES), ids=list(SEG_CASES))
def test_seg_parity(case):
    kwargs = dict(SEG_CASES[case])
    mapping = kwargs.pop("instance_id_to_semantic_id", None)
    size = dict(size={"shortest_edge": 40, "longest_edge": 90})
    images = [rgb(37, 53, 1), rgb(61, 20, 2)]
    maps = [label_map(37, 53, 5, 3), PIL.Image.fromarray(label_map(61, 20, 5, 4))]
    ours = MaskFormerImageProcessor(**size, **kwargs)(images, maps, instance_id_to_semantic_id=mapping)
    theirs = hf(**size, **kwargs)(images, maps, instance_id_to_semantic_id=mapping, return_tensors="pt")
    compare_batches(ours, theirs, with_labels=True)


def test_seg_parity_single_image_input_kinds():
    size = dict(size={"shortest_edge": 40, "longest_edge": 90})
    image, seg = rgb(37, 53, 1), label_map(37, 53, 6, 3)
    theirs = hf(**size)(image, seg, return_tensors="pt")
    for kind, s in {
        "numpy": seg,
        "numpy (1,H,W)": seg[None],
        "torch": torch.from_numpy(seg),
        "PIL L": PIL.Image.fromarray(seg),
        "PIL P": PIL.Image.fromarray(seg).convert("P"),
        "int32": seg.astype(np.int32),
    }.items():
        ours = MaskFormerImageProcessor(**size)(image, s)
        try:
            compare_batches(ours, theirs, with_labels=True)
        except AssertionError as exc:
            raise AssertionError(f"segmentation map given as {kind}: {exc}") from None


def test_encode_inputs_parity():
    """encode_inputs pads processed images; transformers' oracle: preprocess with every step off."""
    rng = np.random.default_rng(5)
    pixel_values = [rng.standard_normal((3, 17, 41)).astype(np.float32), rng.standard_normal((3, 30, 22)).astype(np.float32)]
    maps = [label_map(17, 41, 5, 1), label_map(30, 22, 5, 2)]
    off = dict(do_resize=False, do_rescale=False, do_normalize=False, ignore_index=255, do_reduce_labels=True)
    theirs = HFProcessor(**off)(pixel_values, maps, return_tensors="pt")
    ours = MaskFormerImageProcessor(ignore_index=255, do_reduce_labels=True).encode_inputs(pixel_values, maps)
    compare_batches(ours, theirs, with_labels=True)
    ours_t = MaskFormerImageProcessor().encode_inputs(
        [torch.from_numpy(p) for p in pixel_values], maps, ignore_index=255, do_reduce_labels=True
    )
    compare_batches(ours_t, theirs, with_labels=True)


def test_seg_ignore_index_none_mixed_sizes():
    """Deviation 12: transformers crashes when padding masks with ignore_index=None; we pad with 0."""
    images, maps = [rgb(37, 53, 1), rgb(61, 20, 2)], [label_map(37, 53, 4, 1), label_map(61, 20, 4, 2)]
    size = dict(size={"shortest_edge": 40, "longest_edge": 90})
    with pytest.raises(ValueError, match="Unsupported format: None"):
        hf(**size)(images, maps, return_tensors="pt")
    ours = MaskFormerImageProcessor(**size)(images, maps)
    # Same as transformers with ignore_index=255 except that padding is 0 and label 255 is kept.
    ref = hf(**size, ignore_index=255)(images, maps, return_tensors="pt")
    for i in range(2):
        expected = ref["mask_labels"][i].clone()
        expected[:, ref["pixel_mask"][i] == 0] = 0.0
        assert_equal(ours.mask_labels[i], expected, f"mask_labels[{i}]")
        assert_equal(ours.class_labels[i], ref["class_labels"][i], f"class_labels[{i}]")


@pytest.mark.parametrize("ignore_index", [-100, 1000])
def test_reduce_labels_ignore_index_outside_uint8(ignore_index):
    """Deviation 7: transformers wraps the ignore value into uint8 and makes a fake class of it."""
    image, seg = rgb(37, 53, 1), label_map(37, 53, 4, 1)
    kwargs = dict(size={"shortest_edge": 40, "longest_edge": 90}, ignore_index=ignore_index, do_reduce_labels=True)
    theirs = hf(**kwargs)(image, seg, return_tensors="pt")
    wrapped = ignore_index % 256
    assert wrapped in theirs["class_labels"][0].tolist(), "transformers no longer wraps ignore_index; revisit deviation 7"
    ours = MaskFormerImageProcessor(**kwargs)(image, seg)
    assert ours.class_labels[0].tolist() == [0, 1, 2]
    # The real classes' masks are transformers' minus the fake one.
    keep = theirs["class_labels"][0] != wrapped
    assert_equal(ours.mask_labels[0], theirs["mask_labels"][0][keep], "mask_labels[0]")


def test_seg_labels_above_255():
    """Deviation 13: transformers' PIL backend cannot resize labels > 255; we can, with the same sampling."""
    image, seg = rgb(37, 53, 1), label_map(37, 53, 6, 1).astype(np.int64)
    kwargs = dict(size={"shortest_edge": 40, "longest_edge": 90}, ignore_index=255)
    with pytest.raises(ValueError, match="outside the range"):
        hf(**kwargs)(image, seg + 300, return_tensors="pt")
    ours_low = MaskFormerImageProcessor(**kwargs)(image, seg)
    ours_high = MaskFormerImageProcessor(**kwargs)(image, seg + 300)
    assert_equal(ours_high.mask_labels[0], ours_low.mask_labels[0], "mask_labels (labels + 300)")
    assert_equal(ours_high.class_labels[0], ours_low.class_labels[0] + 300, "class_labels (labels + 300)")
    # Without resizing transformers does accept them: exact parity there.
    no_resize = dict(kwargs, do_resize=False)
    compare_batches(
        MaskFormerImageProcessor(**no_resize)(image, seg + 300),
        hf(**no_resize)(image, seg + 300, return_tensors="pt"),
        with_labels=True,
    )


@pytest.mark.parametrize("src,dst", [((37, 53), (40, 57)), ((61, 20), (96, 32)), ((300, 7), (13, 5)), ((1, 1), (3, 2))])
def test_nearest_label_resize_matches_uint8_path(src, dst):
    """Pillow NEAREST picks the same source pixels in mode 'I' as in mode 'L' (deviation 13's premise)."""
    seg = np.random.default_rng(0).integers(0, 256, src).astype(np.int64)
    low = processing._resize_label_map(seg, dst)  # 0..255: mode L, transformers' path
    high = processing._resize_label_map(seg + 70000, dst)  # mode I
    assert_equal(torch.from_numpy(high - 70000), torch.from_numpy(low), f"NEAREST {src}->{dst}")


# ------------------------------------------------------------------------------------------------
# Deviations of pre-processing
# ------------------------------------------------------------------------------------------------
def test_shortest_edge_only():
    """Deviation 10: an int size without max_size (the facebook/mask2former-* hub configs) is read as
    transformers 4.x did, {shortest_edge: n, longest_edge: 1333}; transformers 5.23 raises. A dict with
    shortest_edge alone is refused at resize, as transformers does (tests/test_dropin_processing.py)."""
    for image in [rgb(17, 301), rgb(10, 301), rgb(513, 259, 1), rgb(40, 40, 2)]:  # 10x301: the cap bites (1926 > 1333)
        with pytest.raises(ValueError, match="Size must contain"):
            hf(size=64)(image, return_tensors="pt")
        expected = hf(size={"shortest_edge": 64, "longest_edge": 1333})(image, return_tensors="pt")
        compare_batches(MaskFormerImageProcessor(size=64)(image), expected)
        with pytest.raises(ValueError, match="Size must contain"):
            MaskFormerImageProcessor(size={"shortest_edge": 64})(image)
    assert MaskFormerImageProcessor(size=64).size == {"shortest_edge": 64, "longest_edge": 1333}
    # A dict with only shortest_edge plus legacy max_size gets longest_edge (transformers ignores it).
    assert MaskFormerImageProcessor(size={"shortest_edge": 64}, max_size=90).size == {
        "shortest_edge": 64,
        "longest_edge": 90,
    }


def test_pixel_values_always_float32():
    """Deviation 9."""
    image = rgb(20, 30)
    off = dict(size={"shortest_edge": 40, "longest_edge": 70}, do_rescale=False, do_normalize=False)
    theirs = hf(**off)(image, return_tensors="pt")["pixel_values"]
    assert theirs.dtype == torch.uint8, "transformers now returns float; revisit deviation 9"
    ours = MaskFormerImageProcessor(**off)(image).pixel_values
    assert_equal(ours, theirs.float(), "pixel_values")
    f64 = rgb(20, 30).astype(np.float64)
    no = dict(do_resize=False, do_rescale=False)
    theirs64 = hf(**no)(f64, return_tensors="pt")["pixel_values"]
    assert theirs64.dtype == torch.float64
    assert_equal(MaskFormerImageProcessor(**no)(f64).pixel_values, theirs64.float(), "pixel_values (float64 in)")


def test_warns_double_rescale():
    image = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    with pytest.warns(UserWarning, match="multiplied by rescale_factor again"):
        MaskFormerImageProcessor()(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskFormerImageProcessor(do_rescale=False)(image)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
BAD_PREPROCESS = {
    "empty batch": (dict(images=[]), ValueError, "empty batch"),
    "rank 2 array": (dict(images=np.zeros((20, 30), np.uint8)), ValueError, r"rank 2.*expected rank 3"),
    "rank 5 array": (dict(images=np.zeros((1, 1, 3, 20, 30), np.uint8)), ValueError, "rank 5"),
    "2 channels": (dict(images=np.zeros((20, 30, 2), np.uint8)), ValueError, "channel axis of size 1, 3 or 4"),
    "5 channels": (dict(images=np.zeros((5, 20, 30), np.uint8)), ValueError, "channel axis of size 1, 3 or 4"),
    "NaN pixels": (
        dict(images=np.full((3, 20, 30), np.nan, np.float32)),
        ValueError,
        r"images\[0\] contains NaN or infinite",
    ),
    "inf pixels": (dict(images=np.full((20, 30, 3), np.inf, np.float32)), ValueError, "NaN or infinite"),
    "float out of range": (
        dict(images=np.full((20, 30, 3), 300.5, np.float32)),
        ValueError,
        r"float images must be in \[0, 1\]",
    ),
    "int out of range": (dict(images=np.full((20, 30, 3), -4, np.int32)), ValueError, r"needs them in \[0, 255\]"),
    "string": (dict(images="cat.png"), TypeError, "must be a PIL image, a numpy array"),
    "list of str": (dict(images=["cat.png"]), TypeError, r"images\[0\] is a str"),
    "seg count": (
        dict(images=[rgb(20, 30)], segmentation_maps=[label_map(20, 30, 2), label_map(20, 30, 2)]),
        ValueError,
        "1 images but 2 segmentation maps",
    ),
    "seg size mismatch": (
        dict(images=[rgb(20, 30)], segmentation_maps=[label_map(30, 20, 2)]),
        ValueError,
        r"segmentation_maps\[0\] has size \(30, 20\) but images\[0\] has size \(20, 30\)",
    ),
    "seg RGB": (
        dict(images=[rgb(20, 30)], segmentation_maps=[PIL.Image.fromarray(rgb(20, 30))]),
        ValueError,
        "single-channel",
    ),
    "seg float labels": (
        dict(images=[rgb(20, 30)], segmentation_maps=[np.full((20, 30), 0.5)]),
        ValueError,
        "non-integer",
    ),
    "reduce without ignore": (
        dict(images=[rgb(20, 30)], segmentation_maps=[label_map(20, 30, 2)], do_reduce_labels=True),
        ValueError,
        "ignore_index` must be provided",
    ),
    "unknown instance id": (
        dict(images=[rgb(20, 30)], segmentation_maps=[label_map(20, 30, 3)], instance_id_to_semantic_id={0: 1}),
        ValueError,
        r"instance ids \[1, 2\] appear in the segmentation map but not in instance_id_to_semantic_id",
    ),
    "zero-sized resize": (dict(images=PIL.Image.fromarray(rgb(1, 400))), ValueError, "a side is 0"),
    "unknown kwarg": (dict(images=rgb(20, 30), reduce_labels=True), TypeError, "legacy names: use do_reduce_labels"),
    "bad return_tensors": (dict(images=rgb(20, 30), return_tensors="tf"), ValueError, "return_tensors must be"),
    "no RGB conversion": (dict(images=rgb(20, 30)[:, :, :1], do_convert_rgb=False), ValueError, "do_convert_rgb=False"),
}


@pytest.mark.parametrize("case", list(BAD_PREPROCESS), ids=list(BAD_PREPROCESS))
def test_bad_preprocess_inputs(case):
    call, exc, message = BAD_PREPROCESS[case]
    call = dict(call)
    images = call.pop("images")
    with pytest.raises(exc, match=message):
        MaskFormerImageProcessor(size={"shortest_edge": 40, "longest_edge": 70})(images, **call)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(size={"longest_edge": 100}), ValueError, "A `longest_edge` alone is not supported"),
        (dict(size={"height": 0, "width": 3}), ValueError, r"size\['height'\]` must be a positive int"),
        (dict(image_mean=[]), ValueError, r"image_mean must have one value per channel, got none"),
        (dict(image_std=0.0), ValueError, "image_std must be non-zero"),
        (dict(resample="bilinear"), ValueError, "resample must be a PIL.Image.Resampling"),
        (dict(size_divisor=-1), ValueError, "size_divisor must be >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        MaskFormerImageProcessor(**kwargs)


def test_unknown_config_key_warns():
    with pytest.warns(UserWarning, match=r"ignores unknown config keys \['do_normalise'\]"):
        MaskFormerImageProcessor(do_normalise=False)


# ------------------------------------------------------------------------------------------------
# Post-processing: realistic logits
# ------------------------------------------------------------------------------------------------
def make_outputs(objects_per_image, num_queries: int, num_classes: int, size, seed: int = 0):
    """Logits shaped like a trained MaskFormer's, not noise.

    `objects_per_image[b]` is a list of `(query, class_id, class_logit, (cy, cx, ry, rx))`: the
    query predicts an ellipse with a sharp but ramped border (mask logit = 6 * signed distance,
    clipped to +-12, so a couple of pixels sit between) and its class wins with `class_logit`.
    Every other query is "no object": its null class has logit 8 and its mask is low noise.
    Returns `(class_queries_logits (B, Q, K+1), masks_queries_logits (B, Q, h, w))`.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    batch = len(objects_per_image)
    class_logits = rng.normal(0.0, 0.5, (batch, num_queries, num_classes + 1)).astype(np.float32)
    mask_logits = rng.normal(-4.0, 1.5, (batch, num_queries, h, w)).astype(np.float32)
    class_logits[:, :, -1] = 8.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for b, objects in enumerate(objects_per_image):
        for query, class_id, logit, (cy, cx, ry, rx) in objects:
            dist = 1.0 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            mask_logits[b, query] = np.clip(6.0 * dist * min(ry, rx), -12, 12)
            class_logits[b, query, -1] = -2.0
            class_logits[b, query, class_id] = logit
    return torch.from_numpy(class_logits), torch.from_numpy(mask_logits)


# Image 0: a big "stuff" region (class 0), two people (class 3, one partly occluding the other),
# a car (class 5), a duplicate weaker query for the car, a moderate-confidence object (class 2).
# Image 1: two stuff regions of class 0 (fusable), one of class 1, an object of class 7.
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


@pytest.fixture(scope="module")
def scene_outputs():
    class_logits, mask_logits = make_outputs(SCENE, NUM_QUERIES, NUM_CLASSES, MASK_SIZE)
    return types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


TARGETS = {
    "none": None,
    "smaller": [(13, 19), (13, 19)],
    "larger": [(97, 150), (97, 150)],
    "odd mixed": [(61, 43), (7, 300)],
}


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_semantic_parity(scene_outputs, target):
    ours = MaskFormerImageProcessor().post_process_semantic_segmentation(scene_outputs, target_sizes=TARGETS[target])
    theirs = HFProcessor().post_process_semantic_segmentation(scene_outputs, target_sizes=TARGETS[target])
    assert len(ours) == len(theirs) == 2
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_equal(a, b, f"semantic map {i} (target {target})")
    # The scene's classes really show up (the logits are not degenerate).
    assert {0, 3, 5} <= set(torch.unique(ours[0]).tolist())


def test_semantic_scores_and_many_classes():
    objects = [[(q, (q * 37) % 300, 9.0, (3 + q, 2 + 2 * q, 4, 5)) for q in range(0, 12, 2)]]
    class_logits, mask_logits = make_outputs(objects, 12, 300, (20, 29), seed=1)
    outputs = MaskFormerForInstanceSegmentationOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    for target in (None, [(45, 31)]):
        ours = MaskFormerImageProcessor().post_process_semantic_segmentation(
            outputs, target_sizes=target, return_segmentation_scores=True
        )
        theirs = HFProcessor().post_process_semantic_segmentation(
            outputs, target_sizes=target, return_segmentation_scores=True
        )
        assert_equal(ours[0].segmentation, theirs[0].segmentation, "segmentation")
        assert_equal(ours[0].segmentation_scores, theirs[0].segmentation_scores, "segmentation_scores")
    # One real class: the map is all zeros, as transformers'.
    one = make_outputs([[(0, 0, 5.0, (5, 5, 3, 3))]], 3, 1, (9, 11), seed=2)
    ours = MaskFormerImageProcessor().post_process_semantic_segmentation(
        types.SimpleNamespace(class_queries_logits=one[0], masks_queries_logits=one[1])
    )
    assert_equal(ours[0], torch.zeros(9, 11, dtype=torch.int64), "one-class map")


def test_semantic_goes_through_dispatch(monkeypatch, scene_outputs):
    """post_process_semantic_segmentation routes through maskformer.dispatch (the backend switch),
    and its reference backend gives `semantic_segmentation_ref`'s maps."""
    from maskformer import dispatch

    calls = []
    real = dispatch.semantic_segmentation

    def spy(class_logits, mask_logits, target_sizes, *args):
        calls.append(target_sizes)
        return real(class_logits, mask_logits, target_sizes, *args)

    monkeypatch.setattr(dispatch, "semantic_segmentation", spy)
    sizes = torch.tensor([[5, 6], [7, 8]])
    with dispatch.backend("reference"):
        maps = MaskFormerImageProcessor().post_process_semantic_segmentation(scene_outputs, target_sizes=sizes)
    assert calls == [[(5, 6), (7, 8)]]
    ref = processing.semantic_segmentation_ref(scene_outputs.class_queries_logits, scene_outputs.masks_queries_logits,
                                               [(5, 6), (7, 8)])
    for a, b in zip(maps, ref):
        assert_equal(a, b, "reference backend vs semantic_segmentation_ref")


def _strip(results):
    return [(r["segmentation"], r["segments_info"]) for r in results]


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.9])
def test_instance_parity(scene_outputs, target, threshold):
    kwargs = dict(threshold=threshold, target_sizes=TARGETS[target])
    ours = MaskFormerImageProcessor().post_process_instance_segmentation(scene_outputs, **kwargs)
    theirs = HFProcessor().post_process_instance_segmentation(scene_outputs, **kwargs)
    for i, ((seg_a, info_a), (seg_b, info_b)) in enumerate(zip(_strip(ours), _strip(theirs))):
        assert info_a == info_b, f"image {i}: segments_info\nours   {info_a}\ntheirs {info_b}"
        assert_equal(seg_a, seg_b, f"instance map {i}")
    if threshold == 0.5:
        assert len(ours[0]["segments_info"]) >= 4, "the scene should produce several instances"
    # Binary maps: identical whenever at least one instance was found.
    ours_bin = MaskFormerImageProcessor().post_process_instance_segmentation(scene_outputs, return_binary_maps=True, **kwargs)
    theirs_bin = HFProcessor().post_process_instance_segmentation(scene_outputs, return_binary_maps=True, **kwargs)
    for i, (a, b) in enumerate(zip(ours_bin, theirs_bin)):
        if b["segments_info"]:
            assert_equal(a["segmentation"], b["segmentation"], f"binary maps {i}")


def test_instance_coco_rle_aligned_with_segments(scene_outputs):
    """Deviation 5: one RLE per segments_info entry, each the instance's own mask."""
    for target in (None, [(61, 43), (7, 300)]):
        ours = MaskFormerImageProcessor().post_process_instance_segmentation(
            scene_outputs, target_sizes=target, return_coco_annotation=True
        )
        binary = HFProcessor().post_process_instance_segmentation(
            scene_outputs, target_sizes=target, return_binary_maps=True
        )
        theirs = HFProcessor().post_process_instance_segmentation(
            scene_outputs, target_sizes=target, return_coco_annotation=True
        )
        plain = HFProcessor().post_process_instance_segmentation(scene_outputs, target_sizes=target)
        for i in range(2):
            assert ours[i]["segments_info"] == theirs[i]["segments_info"]
            rles, maps = ours[i]["segmentation"], binary[i]["segmentation"]
            assert len(rles) == len(ours[i]["segments_info"]) == maps.shape[0]
            shape = tuple(maps.shape[1:])
            for j, rle in enumerate(rles):
                assert all(type(v) is int for v in rle), "RLE values must be python ints"
                assert_equal(rle_decode(rle, shape), maps[j], f"image {i} instance {j} RLE")
            # What transformers returns instead: the first RLE is the background (-1) region.
            background = (plain[i]["segmentation"] == -1).float()
            assert_equal(rle_decode(theirs[i]["segmentation"][0], shape), background, "transformers rle[0]")


def test_instance_binary_maps_empty(scene_outputs):
    """Deviation 6: no instance -> (0, H, W), not transformers' (H, W) map of -1."""
    for target, shape in ((None, MASK_SIZE), ([(13, 19), (5, 7)], (13, 19))):
        ours = MaskFormerImageProcessor().post_process_instance_segmentation(
            scene_outputs, threshold=1.0, target_sizes=target, return_binary_maps=True
        )
        theirs = HFProcessor().post_process_instance_segmentation(
            scene_outputs, threshold=1.0, target_sizes=target, return_binary_maps=True
        )
        assert theirs[0]["segmentation"].shape == shape, "transformers changed; revisit deviation 6"
        assert ours[0]["segmentation"].shape == (0, *shape) and ours[0]["segmentation"].dtype == torch.float32
        assert ours[0]["segments_info"] == []


def _cpp_error():
    from maskformer import _ext

    return None if _ext.load_cpp() is not None else _ext.cpp_import_error()


# The panoptic per-pixel step goes through maskformer.dispatch: both backends must give transformers'.
PANOPTIC_BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(_cpp_error() is not None, reason=f"C++ extension: {_cpp_error()}")),
]


@pytest.mark.parametrize("backend", PANOPTIC_BACKENDS)
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_panoptic_parity(scene_outputs, target, backend):
    from maskformer import dispatch

    kwargs = dict(target_sizes=TARGETS[target])
    for fuse in (None, {3}, {5, 7}):
        with dispatch.backend(backend):
            ours = MaskFormerImageProcessor().post_process_panoptic_segmentation(
                scene_outputs, label_ids_to_fuse=fuse, **kwargs
            )
        assert dispatch.last_dispatch("query_argmax").backend == backend
        theirs = HFProcessor().post_process_panoptic_segmentation(scene_outputs, label_ids_to_fuse=fuse, **kwargs)
        for i, ((seg_a, info_a), (seg_b, info_b)) in enumerate(zip(_strip(ours), _strip(theirs))):
            if fuse == {3} and i == 0:
                # Two fused people: transformers lists the fused segment twice (deviation 2).
                assert [s["id"] for s in info_b].count(info_a[1]["id"]) == 2
                info_b = [s for j, s in enumerate(info_b) if s["id"] not in {t["id"] for t in info_b[:j]}]
            assert info_a == info_b, f"fuse {fuse}, image {i}: segments_info\nours   {info_a}\ntheirs {info_b}"
            assert_equal(seg_a, seg_b, f"panoptic map {i} (fuse {fuse})")
    assert len(ours[0]["segments_info"]) >= 3, "the scene should produce several segments"


@pytest.mark.skipif(_cpp_error() is not None, reason=f"C++ extension: {_cpp_error()}")
@pytest.mark.parametrize("seed", [0, 1])
def test_panoptic_cpp_matches_reference_and_transformers_coco_scale(seed):
    """COCO-panoptic-like outputs (100 queries, 133 classes, 30 confident objects, realistic logits
    from `make_realistic_logits`), targets 4x, odd and smaller, several thresholds: the C++ backend
    gives the reference backend's maps and segments exactly, and transformers' wherever no listed
    deviation applies (no fused labels; deviation 3 only matters for boundary pixels whose
    probability lies in [mask_threshold, mask_threshold / score), and the scores here are ~1)."""
    from maskformer import dispatch
    from maskformer.kernels.mask_einsum import make_realistic_logits

    class_logits, mask_logits = make_realistic_logits(2, 100, 133, 40, 53, n_objects=30, seed=seed)
    outputs = types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    for target in ([(160, 213), (160, 213)], [(97, 61), (13, 300)], None):
        for threshold, mask_threshold, overlap in ((0.5, 0.5, 0.8), (0.9, 0.3, 0.5), (0.2, 0.7, 0.95)):
            kwargs = dict(threshold=threshold, mask_threshold=mask_threshold,
                          overlap_mask_area_threshold=overlap, target_sizes=target)
            runs = {}
            for backend in ("reference", "cpp"):
                with dispatch.backend(backend):
                    runs[backend] = _strip(MaskFormerImageProcessor().post_process_panoptic_segmentation(outputs, **kwargs))
            theirs = _strip(HFProcessor().post_process_panoptic_segmentation(outputs, **kwargs))
            for i in range(2):
                (seg_c, info_c), (seg_r, info_r), (seg_t, info_t) = runs["cpp"][i], runs["reference"][i], theirs[i]
                where = f"target {target}, thresholds {threshold}/{mask_threshold}/{overlap}, image {i}"
                assert info_c == info_r, f"{where}: segments_info\ncpp       {info_c}\nreference {info_r}"
                assert_equal(seg_c, seg_r, f"{where}: cpp vs reference")
                assert info_c == info_t, f"{where}: segments_info\ncpp          {info_c}\ntransformers {info_t}"
                assert_equal(seg_c, seg_t, f"{where}: cpp vs transformers")
                assert len(info_c) >= 5, f"{where}: the outputs should produce several segments"


def test_panoptic_fused_ids_are_unique(scene_outputs):
    """Deviations 1 and 2: fused label after which new segments follow (image 1: class 0 twice)."""
    for target in (None, [(61, 43), (30, 50)]):
        ours = MaskFormerImageProcessor().post_process_panoptic_segmentation(
            scene_outputs, label_ids_to_fuse={0}, target_sizes=target
        )[1]
        theirs = HFProcessor().post_process_panoptic_segmentation(
            scene_outputs, label_ids_to_fuse={0}, target_sizes=target
        )[1]
        # transformers: queries 0 (class 0), 3 (class 1), 5 (class 0, fused), 8 (class 7) get ids
        # 1, 2, 1, 2 -> class 1 and class 7 share id 2.
        their_ids = [(s["id"], s["label_id"]) for s in theirs["segments_info"]]
        assert their_ids == [(1, 0), (2, 1), (1, 0), (2, 7)], f"transformers changed: {their_ids}"
        our_ids = [(s["id"], s["label_id"], s["was_fused"]) for s in ours["segments_info"]]
        assert our_ids == [(1, 0, True), (2, 1, False), (3, 7, False)]
        assert ours["segments_info"][0]["score"] == theirs["segments_info"][0]["score"]
        # Same pixels per segment: ours is transformers' map with the class-7 pixels relabelled 3.
        seg_ours, seg_theirs = ours["segmentation"], theirs["segmentation"]
        semantic = MaskFormerImageProcessor().post_process_semantic_segmentation(scene_outputs, target_sizes=target)[1]
        car = (seg_theirs == 2) & (seg_ours == 3)
        assert car.any() and torch.equal(seg_ours == 3, car)
        expected = torch.where(car, torch.tensor(3, dtype=torch.int32), seg_theirs)
        assert_equal(seg_ours, expected, "panoptic map with unique ids")
        assert set(torch.unique(seg_ours).tolist()) <= {0, 1, 2, 3}
        assert semantic[seg_ours == 3].mode().values == 7, "id 3 should be the class-7 object"


def test_panoptic_low_score_segments_survive():
    """Deviation 3: queries with score < mask_threshold are not silently dropped."""
    objects = [[(0, 2, 1.0, (6, 6, 4, 5)), (2, 4, 1.0, (14, 20, 5, 6))]]
    class_logits, mask_logits = make_outputs(objects, 4, 5, (20, 30), seed=3)
    # Unsure but right: the class logit 1 over four 0s and a null of -2, probability ~0.40.
    for query, class_id in ((0, 2), (2, 4)):
        class_logits[0, query, :-1] = 0.0
        class_logits[0, query, class_id] = 1.0
    outputs = types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    scores = class_logits.softmax(-1).max(-1).values[0, [0, 2]]
    assert ((scores > 0.3) & (scores < 0.5)).all(), f"test setup: scores {scores.tolist()}"
    theirs = HFProcessor().post_process_panoptic_segmentation(outputs, threshold=0.3)[0]
    assert theirs["segments_info"] == [], "transformers now keeps low-score segments; revisit deviation 3"
    ours = MaskFormerImageProcessor().post_process_panoptic_segmentation(outputs, threshold=0.3)[0]
    assert [(s["id"], s["label_id"]) for s in ours["segments_info"]] == [(1, 2), (2, 4)]
    assert ours["segmentation"][6, 6] == 1 and ours["segmentation"][14, 20] == 2


def test_panoptic_empty_result_dtype(scene_outputs):
    """Deviation 4: int32 -1 map when nothing survives (transformers: float32)."""
    for target, shape in ((None, MASK_SIZE), ([(13, 19), (5, 7)], (13, 19))):
        ours = MaskFormerImageProcessor().post_process_panoptic_segmentation(scene_outputs, threshold=0.9999, target_sizes=target)
        theirs = HFProcessor().post_process_panoptic_segmentation(scene_outputs, threshold=0.9999, target_sizes=target)
        assert theirs[0]["segmentation"].dtype == torch.float32, "transformers changed; revisit deviation 4"
        assert_equal(ours[0]["segmentation"], theirs[0]["segmentation"].to(torch.int32), "empty panoptic map")
        assert ours[0]["segments_info"] == [] and ours[0]["segmentation"].shape == shape


def test_postprocess_accepts_transformers_output(scene_outputs):
    outputs = MaskFormerForInstanceSegmentationOutput(
        class_queries_logits=scene_outputs.class_queries_logits, masks_queries_logits=scene_outputs.masks_queries_logits
    )
    proc = MaskFormerImageProcessor()
    for method in ("semantic", "instance", "panoptic"):
        a = getattr(proc, f"post_process_{method}_segmentation")(outputs)
        b = getattr(proc, f"post_process_{method}_segmentation")(scene_outputs)
        first_a = a[0] if method == "semantic" else a[0]["segmentation"]
        first_b = b[0] if method == "semantic" else b[0]["segmentation"]
        assert_equal(first_a, first_b, method)


BAD_POSTPROCESS = {
    "no attributes": (object(), None, TypeError, "needs an object with a `class_queries_logits`"),
    "class rank": (
        types.SimpleNamespace(class_queries_logits=torch.zeros(2, 5), masks_queries_logits=torch.zeros(2, 5, 4, 4)),
        None,
        ValueError,
        r"class_queries_logits must be \(batch, queries, classes \+ 1\)",
    ),
    "mask rank": (
        types.SimpleNamespace(class_queries_logits=torch.zeros(2, 5, 3), masks_queries_logits=torch.zeros(2, 5, 4)),
        None,
        ValueError,
        r"masks_queries_logits must be \(batch, queries, height, width\)",
    ),
    "query mismatch": (
        types.SimpleNamespace(class_queries_logits=torch.zeros(2, 5, 3), masks_queries_logits=torch.zeros(2, 6, 4, 4)),
        None,
        ValueError,
        r"disagree on \(batch, queries\)",
    ),
    "only null class": (
        types.SimpleNamespace(class_queries_logits=torch.zeros(2, 5, 1), masks_queries_logits=torch.zeros(2, 5, 4, 4)),
        None,
        ValueError,
        "at least one real class",
    ),
    "integer logits": (
        types.SimpleNamespace(
            class_queries_logits=torch.zeros(2, 5, 3, dtype=torch.int64), masks_queries_logits=torch.zeros(2, 5, 4, 4)
        ),
        None,
        TypeError,
        "logits must be floating point",
    ),
    "NaN logits": (
        types.SimpleNamespace(
            class_queries_logits=torch.zeros(2, 5, 3), masks_queries_logits=torch.full((2, 5, 4, 4), float("nan"))
        ),
        None,
        ValueError,
        "masks_queries_logits contains NaN",
    ),
    "empty batch": (
        types.SimpleNamespace(class_queries_logits=torch.zeros(0, 5, 3), masks_queries_logits=torch.zeros(0, 5, 4, 4)),
        None,
        ValueError,
        "empty batch",
    ),
    "too few target sizes": (None, [(4, 4)], ValueError, "1 target sizes for a batch of 2"),
    "too many target sizes": (None, [(4, 4)] * 3, ValueError, "3 target sizes for a batch of 2"),
    "bad target size": (None, [(4, 4), (0, 3)], ValueError, r"target_sizes\[1\] must be positive"),
    "target not a pair": (None, [(4, 4), 7], ValueError, r"target_sizes\[1\] must be a \(height, width\) pair"),
}


@pytest.mark.parametrize("method", ["semantic", "instance", "panoptic"])
@pytest.mark.parametrize("case", list(BAD_POSTPROCESS), ids=list(BAD_POSTPROCESS))
def test_bad_postprocess_inputs(scene_outputs, method, case):
    outputs, target_sizes, exc, message = BAD_POSTPROCESS[case]
    outputs = scene_outputs if outputs is None else outputs
    fn = getattr(MaskFormerImageProcessor(), f"post_process_{method}_segmentation")
    with pytest.raises(exc, match=message):
        fn(outputs, target_sizes=target_sizes)


def test_bad_instance_flags(scene_outputs):
    with pytest.raises(ValueError, match="can not be both set to True"):
        MaskFormerImageProcessor().post_process_instance_segmentation(
            scene_outputs, return_coco_annotation=True, return_binary_maps=True
        )


def test_rle_helpers_match_transformers():
    from transformers.models.maskformer.image_processing_pil_maskformer import (
        convert_segmentation_to_rle as hf_convert,
    )

    seg = torch.from_numpy(label_map(13, 17, 4, 5).astype(np.int64)) - 1
    seg[0, 0], seg[-1, -1] = 2, 2  # runs touching both ends of the scan
    ours = processing.convert_segmentation_to_rle(seg)
    theirs = hf_convert(seg)
    assert ours == [list(map(int, r)) for r in theirs]


def test_exif_orientation_is_applied():
    """Deviation 18: the tag is applied (transformers ignores it, pinned below)."""
    rng = np.random.default_rng(0)
    upright = PIL.Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # how the camera wrote it; tag 6 undoes it
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    import io

    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    tagged = PIL.Image.open(io.BytesIO(buf.getvalue()))
    assert tagged.getexif().get(0x0112) == 6
    kwargs = dict(size={"height": 32, "width": 32}, return_tensors="pt")
    ours = MaskFormerImageProcessor()(tagged, **kwargs)["pixel_values"]
    assert torch.equal(ours, MaskFormerImageProcessor()(upright, **kwargs)["pixel_values"])
    theirs = HFProcessor()(tagged, **kwargs)["pixel_values"]
    assert torch.equal(theirs, HFProcessor()(stored, **kwargs)["pixel_values"]), "transformers now applies EXIF"


def test_sixteen_bit_images_are_scaled():
    """Deviation 19: an I;16 image is scaled to 8 bits; transformers clips it to (mostly) white."""
    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    deep = PIL.Image.fromarray(eight.astype(np.uint16) * 257)
    assert deep.mode == "I;16"
    ours = MaskFormerImageProcessor()(deep, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, MaskFormerImageProcessor()(PIL.Image.fromarray(eight), return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="outside the range"):  # transformers' default: refuses it...
        HFProcessor()(deep, return_tensors="pt")
    theirs = HFProcessor(do_convert_rgb=True)(deep, return_tensors="pt")["pixel_values"]  # ...or clips it
    white = HFProcessor()(PIL.Image.new("RGB", (30, 20), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    assert (theirs == white).float().mean() > 0.9, "transformers no longer clips 16-bit images"
    mine = MaskFormerImageProcessor(do_convert_rgb=True)(deep, return_tensors="pt")["pixel_values"]
    assert torch.equal(mine, ours)
    with pytest.raises(ValueError, match="Pillow mode 'F'"):
        MaskFormerImageProcessor()(PIL.Image.fromarray(np.full((4, 4), -3.0, dtype=np.float32)))
