"""Drop-in API of the processor, side by side with transformers' (its PIL backend, the oracle of
tests/test_processing.py): images with other channel counts, and serialisation."""
import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from maskformer import MaskFormerImageProcessor


def hf_processor(**kwargs):
    from transformers import MaskFormerImageProcessor as HF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ... falling back to the PIL backend"
        return HF(**kwargs)


def same_batch(ours, theirs):
    assert set(ours) == set(theirs)
    for key in ("pixel_values", "pixel_mask"):
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), f"{key}: max diff {(ours[key] - theirs[key]).abs().max()}"


def images(channels, layout="last", seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(37, 52), (61, 29)]
    arrays = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in shapes]
    return arrays if layout == "last" else [np.moveaxis(a, -1, 0) for a in arrays]


SIZE = dict(size={"shortest_edge": 40, "longest_edge": 70})


# ------------------------------------------------------------------------------------------------
# 4. images with 1, 2 or 4 channels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels, settings, call",
    [
        # the case: do_convert_rgb=False with one mean/std value per channel
        (4, dict(do_convert_rgb=False, image_mean=[0.1, 0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7, 0.8]), {}),
        # transformers' own 4-channel test: the default do_convert_rgb, scalar mean and std, channels_last
        (4, dict(image_mean=0, image_std=1), dict(input_data_format="channels_last")),
        (4, dict(do_normalize=False), {}),
        (1, dict(do_convert_rgb=False, image_mean=[0.5], image_std=[0.25]), {}),
        (1, dict(image_mean=0.5, image_std=0.5), {}),
        (2, dict(do_convert_rgb=False, image_mean=0.5, image_std=0.5), dict(input_data_format="channels_last")),
        (4, dict(do_convert_rgb=False, image_mean=0.5, image_std=0.5, do_resize=False), {}),
    ],
)
def test_other_channel_counts_match_transformers(channels, settings, call):
    kwargs = dict(SIZE, **settings)
    batch = images(channels)
    theirs = hf_processor(**kwargs)(batch, return_tensors="pt", **call)
    ours = MaskFormerImageProcessor(**kwargs)(batch, **call)
    same_batch(ours, theirs)
    assert ours["pixel_values"].shape[1] == channels


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK"])
def test_pil_modes_keep_their_channels_as_transformers(mode):
    rgba = PIL.Image.fromarray(images(4)[0])
    image = rgba.convert(mode)
    for kwargs in (dict(do_convert_rgb=False, image_mean=0.5, image_std=0.5), dict(do_normalize=False)):
        kwargs = dict(SIZE, **kwargs)
        same_batch(MaskFormerImageProcessor(**kwargs)(image), hf_processor(**kwargs)(image, return_tensors="pt"))


def test_default_still_converts_when_the_normalisation_needs_rgb():
    """The default ImageNet mean/std have 3 values: non-RGB images are converted (our deviation 11;
    transformers fails here), matching transformers' do_convert_rgb=True."""
    batch = images(4)
    with pytest.raises(ValueError, match="mean must have 4 elements"):
        hf_processor(**SIZE)(batch, return_tensors="pt")
    same_batch(MaskFormerImageProcessor(**SIZE)(batch), hf_processor(do_convert_rgb=True, **SIZE)(batch, return_tensors="pt"))


@pytest.mark.parametrize(
    "batch, settings, match",
    [
        (images(3), dict(do_convert_rgb=False, image_mean=[0.5] * 4, image_std=[0.5] * 4),
         r"image_mean has 4 values but the image has 3 channel"),
        (images(4)[:1] + images(3)[1:], dict(do_convert_rgb=False, image_mean=0.5, image_std=0.5),
         r"same number of channels, got \[4, 3\]"),
        (images(2), dict(do_convert_rgb=True), "2-channel arrays are not converted"),
        ([np.zeros((20, 30, 5), np.uint8)], dict(do_convert_rgb=False, image_mean=0.5, image_std=0.5),
         r"5 channels, and Pillow resizes images of 1 to 4 .* do_resize=False"),
        ([np.zeros((20, 30, 5), np.uint8)], dict(do_resize=False), r"5 channels .* only 1 to 4 channels convert to RGB"),
    ],
)
def test_channel_errors_say_what_to_do(batch, settings, match):
    theirs = hf_processor(**SIZE, **settings)
    with pytest.raises((ValueError, TypeError)):  # transformers fails on these too, less clearly
        theirs(batch, return_tensors="pt", input_data_format="channels_last")
    with pytest.raises(ValueError, match=match):
        MaskFormerImageProcessor(**SIZE, **settings)(batch, input_data_format="channels_last")


def test_four_channel_batch_runs_through_a_four_channel_model():
    from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation

    config = MaskFormerConfig(
        backbone_config=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], num_channels=4, window_size=3),
        decoder_config=dict(d_model=32, decoder_layers=1, decoder_ffn_dim=64, decoder_attention_heads=2, num_queries=3),
        fpn_feature_size=32, mask_feature_size=32, num_labels=2,
    )
    batch = MaskFormerImageProcessor(do_convert_rgb=False, image_mean=[0.5] * 4, image_std=[0.5] * 4, **SIZE)(images(4))
    with torch.no_grad():
        out = MaskFormerForInstanceSegmentation(config).eval()(**batch)
    assert out.masks_queries_logits.shape[:2] == (2, 3)


# ------------------------------------------------------------------------------------------------
# 5. serialisation: save_pretrained returns the files written, to_json_file / to_json_string / to_dict
# ------------------------------------------------------------------------------------------------
SETTINGS = dict(do_resize=True, size={"shortest_edge": 32, "longest_edge": 1333}, do_normalize=True,
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size_divisor=0, num_labels=10,
                do_reduce_labels=True, ignore_index=255)


def test_save_pretrained_returns_the_files_written_as_transformers(tmp_path):
    theirs = hf_processor(**SETTINGS).save_pretrained(tmp_path / "theirs")
    ours = MaskFormerImageProcessor(**SETTINGS).save_pretrained(tmp_path / "ours")
    assert isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs) == 1
    assert os.path.basename(ours[0]) == os.path.basename(theirs[0]) == "preprocessor_config.json"
    assert json.load(open(ours[0])) == json.load(open(theirs[0]))


def as_json(data):
    """A dict as JSON reads it back (transformers' to_dict holds tuples or lists depending on how the
    processor was built; the file is the same)."""
    return json.loads(json.dumps(data))


def test_json_string_file_and_dict_as_transformers(tmp_path):
    from transformers import MaskFormerImageProcessor as HF

    theirs, ours = hf_processor(**SETTINGS), MaskFormerImageProcessor(**SETTINGS)
    for processor in (theirs, ours):
        text = json.loads(processor.to_json_string())
        assert all(text[k] == v for k, v in SETTINGS.items())
    assert as_json(ours.to_dict()) == as_json(theirs.to_dict())
    ours.to_json_file(tmp_path / "ours.json")
    theirs.to_json_file(tmp_path / "theirs.json")
    assert MaskFormerImageProcessor.from_json_file(tmp_path / "theirs.json").to_dict() == ours.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert as_json(HF.from_json_file(tmp_path / "ours.json").to_dict()) == as_json(theirs.to_dict())
    assert MaskFormerImageProcessor.from_json_file(tmp_path / "ours.json").to_dict() == ours.to_dict()


def test_scalar_mean_round_trips_as_given():
    theirs, ours = hf_processor(image_mean=0.5, image_std=0.25), MaskFormerImageProcessor(image_mean=0.5, image_std=0.25)
    assert ours.to_dict()["image_mean"] == theirs.to_dict()["image_mean"] == 0.5
    assert MaskFormerImageProcessor.from_dict(ours.to_dict()).to_dict() == ours.to_dict()


def test_from_dict_legacy_overrides_win():
    """transformers 4.x's own test: from_dict(config, size=42, max_size=84, size_divisibility=8) gives
    {shortest_edge: 42, longest_edge: 84} and size_divisor 8. 5.23 drops max_size and size_divisibility
    (pinned here); we keep 4.x's meaning (deviation 8: legacy keys are honoured)."""
    theirs = hf_processor().from_dict(SETTINGS, size=42, max_size=84, size_divisibility=8)
    assert theirs.size_divisor == 0 and theirs.size.longest_edge is None
    ours = MaskFormerImageProcessor.from_dict(SETTINGS, size=42, max_size=84, size_divisibility=8)
    assert ours.size == {"shortest_edge": 42, "longest_edge": 84} and ours.size_divisor == 8


# ------------------------------------------------------------------------------------------------
# Gaps found by running transformers' own image-processing tests against these classes
# ------------------------------------------------------------------------------------------------
def test_to_dict_gives_mean_and_std_as_transformers(tmp_path):
    """Item 21: transformers' to_dict gives image_mean / image_std as tuples, whatever they were built
    from; a save and load (AutoImageProcessor's included) compares equal to the original."""
    from transformers import AutoImageProcessor

    theirs, ours = hf_processor(**SETTINGS), MaskFormerImageProcessor(**SETTINGS)
    for key in ("image_mean", "image_std"):
        assert ours.to_dict()[key] == theirs.to_dict()[key] == (0.5, 0.5, 0.5)
        assert type(ours.to_dict()[key]) is type(theirs.to_dict()[key]) is tuple
    ours.save_pretrained(tmp_path)
    assert MaskFormerImageProcessor.from_pretrained(tmp_path).to_dict() == ours.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert {k: v for k, v in auto.to_dict().items() if k in ours.to_dict()} == ours.to_dict()


@pytest.mark.parametrize("processor", ["MaskFormerImageProcessor", "Mask2FormerImageProcessor"])
@pytest.mark.parametrize("settings", [dict(image_mean=[0.1, 0.2, 0.3, 0.4, 0.5], image_std=[0.5] * 5),
                                      dict(image_mean=0.5, image_std=0.25), dict(do_normalize=False)])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_five_channels_without_resize_as_transformers(processor, settings, layout):
    """Item 22: transformers processes any number of channels when it need not resize them (Pillow
    resizes 1 to 4) and is told where they are; so do we, with the same numbers."""
    import maskformer
    import transformers

    batch = images(5, "first" if layout == "channels_first" else "last")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(transformers, processor)(do_resize=False, **settings)(
            batch, return_tensors="pt", input_data_format=layout)
    ours = getattr(maskformer, processor)(do_resize=False, **settings)(batch, input_data_format=layout)
    same_batch(ours, theirs)
    assert ours["pixel_values"].shape[1] == 5
    with pytest.raises(ValueError, match="5 channels, and Pillow resizes images of 1 to 4 .* do_resize=False"):
        getattr(maskformer, processor)(**settings)(batch, input_data_format=layout)


def test_shortest_edge_alone_is_refused_at_resize_as_transformers():
    """Item 30 (decided: refuse, as transformers 4.x and 5.x do). A {"shortest_edge": n} size is kept
    (transformers builds it too) and cannot resize: MaskFormer's resize caps the long side. A size
    transformers cannot use would otherwise be saved in a preprocessor_config.json as if valid."""
    image = images(3)[0]
    theirs, ours = hf_processor(size={"shortest_edge": 64}), MaskFormerImageProcessor(size={"shortest_edge": 64})
    with pytest.raises(ValueError, match="Size must contain 'height' and 'width' keys or 'shortest_edge' and "
                                         "'longest_edge' keys"):
        theirs(image, return_tensors="pt")
    with pytest.raises(ValueError, match=r"Size must contain .* Add a longest_edge .*'longest_edge': 1333"):
        ours(image)
    same_batch(ours(image, do_resize=False), theirs(image, return_tensors="pt", do_resize=False))
