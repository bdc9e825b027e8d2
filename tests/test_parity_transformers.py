"""Logits parity with transformers' MaskFormer on identical (perturbed random) weights.

Tolerance: fp32 relative error (max |ours - ref| / max |ref|) at most 1e-5. Our reference path
runs the same operations in the same order as transformers. Measured on the CPU (torch 2.13):
0.0 on the small configurations, and 5e-7 to 8e-7 on the decoder-side outputs of the Swin-B
configuration (the backbone and pixel decoder are exact there), where a batched einsum and an
expanded rather than repeated query tensor let BLAS block the fp32 sums differently. The 1e-5
bar leaves a 10x margin over that for other CPUs and thread counts.
"""
import pytest
import torch

from maskformer import MaskFormerModel

from hf_oracle import assert_close_rel, make_hf_model, ours_from_hf

TOL = 1e-5
FIELDS = (
    "class_queries_logits",
    "masks_queries_logits",
    "encoder_last_hidden_state",
    "pixel_decoder_last_hidden_state",
    "transformer_decoder_last_hidden_state",
)


def compare(hf_model, ours, pixel_values, **kwargs):
    with torch.no_grad():
        ref = hf_model(pixel_values, **kwargs)
        out = ours(pixel_values, **kwargs)
    for name in FIELDS:
        assert_close_rel(out[name], ref[name], TOL, name)
    return ref, out


@pytest.mark.parametrize(
    "window_size, height, width, batch",
    [
        (7, 64, 64, 1),  # window 7 with padding at every stage (16x16 -> 21x21, 8x8 -> 14x14, ...)
        (7, 112, 224, 2),  # exact multiples at stage 1 (28x56), padding later; batch > 1
        (12, 96, 96, 1),  # window 12: 24x24 exact, then 12x12, 6x6 -> 12x12 padded
        (12, 97, 131, 2),  # odd sizes: patch padding (97 -> 100), odd merges (25x33 -> 13x17 -> 7x9 -> 4x5)
        (3, 50, 70, 3),  # small window, shifted windows at every stage, batch 3
        (2, 33, 17, 1),  # window 2 (shift 1), a very narrow image
    ],
)
def test_logits_match_transformers(window_size, height, width, batch):
    hf_model = make_hf_model(window_size=window_size)
    ours = ours_from_hf(hf_model)
    compare(hf_model, ours, torch.randn(batch, 3, height, width))


def test_hidden_states_attentions_and_tuples_match_transformers():
    hf_model = make_hf_model(window_size=3, decoder_layers=3)
    ours = ours_from_hf(hf_model)
    x = torch.randn(2, 3, 61, 45)
    ref, out = compare(hf_model, ours, x, output_hidden_states=True, output_attentions=True)
    for name in ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states",
                 "hidden_states", "attentions"):
        assert len(out[name]) == len(ref[name]) > 0, name
        for i, (a, b) in enumerate(zip(out[name], ref[name])):
            assert_close_rel(a, b, TOL, f"{name}[{i}]")
    assert list(out.keys()) == list(ref.keys())
    with torch.no_grad():
        ref_tuple = hf_model(x, return_dict=False)
        out_tuple = ours(x, return_dict=False)
    assert len(out_tuple) == len(ref_tuple)
    for i, (a, b) in enumerate(zip(out_tuple, ref_tuple)):
        assert_close_rel(a, b, TOL, f"tuple[{i}]")


def test_base_model_matches_transformers():
    from transformers import MaskFormerModel as HFModel

    hf_full = make_hf_model(window_size=7)
    hf_base = HFModel(hf_full.config).eval()
    hf_base.load_state_dict(hf_full.model.state_dict())
    ours = ours_from_hf(hf_base, MaskFormerModel)
    x = torch.randn(1, 3, 80, 72)
    with torch.no_grad():
        ref, out = hf_base(x), ours(x)
    for name in ("encoder_last_hidden_state", "pixel_decoder_last_hidden_state", "transformer_decoder_last_hidden_state"):
        assert_close_rel(out[name], ref[name], TOL, name)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_and_label_counts(act):
    from transformers import MaskFormerForInstanceSegmentation as HF

    from hf_oracle import hf_maskformer_config, perturb_

    config = hf_maskformer_config(window_size=5, num_labels=1, num_queries=3)
    config.backbone_config.hidden_act = act
    config.decoder_config.activation_function = act
    hf_model = perturb_(HF(config)).eval()
    ours = ours_from_hf(hf_model)
    assert ours.class_predictor.out_features == 2  # one class + no-object
    compare(hf_model, ours, torch.randn(1, 3, 40, 52))


def test_decoder_auxiliary_loss_flag_matches_transformers():
    # With decoder_config.auxiliary_loss, transformers normalises the running decoder state after
    # every layer (and the last one twice); we reproduce it.
    from transformers import MaskFormerForInstanceSegmentation as HF

    from hf_oracle import hf_maskformer_config, perturb_

    config = hf_maskformer_config(window_size=3)
    config.decoder_config.auxiliary_loss = True
    hf_model = perturb_(HF(config)).eval()
    compare(hf_model, ours_from_hf(hf_model), torch.randn(1, 3, 48, 48))


def test_auxiliary_logits_match_transformers():
    # The one use_auxiliary_loss combination transformers 5.23 can run (see README deviations).
    from transformers import MaskFormerForInstanceSegmentation as HF

    from hf_oracle import hf_maskformer_config, perturb_

    config = hf_maskformer_config(window_size=3, decoder_layers=3, use_auxiliary_loss=True)
    hf_model = perturb_(HF(config)).eval()
    ours = ours_from_hf(hf_model)
    ref, out = compare(hf_model, ours, torch.randn(2, 3, 40, 40), output_hidden_states=True, output_auxiliary_logits=True)
    assert len(out.auxiliary_logits) == len(ref.auxiliary_logits) == 3
    for i, (a, b) in enumerate(zip(out.auxiliary_logits, ref.auxiliary_logits)):
        for key in ("class_queries_logits", "masks_queries_logits"):
            assert_close_rel(a[key], b[key], TOL, f"auxiliary_logits[{i}][{key}]")
    # and where transformers raises (output_hidden_states=False), we still give the same logits
    with torch.no_grad():
        plain = ours(torch.zeros(1, 3, 40, 40) + 0.5, output_auxiliary_logits=True)
    assert len(plain.auxiliary_logits) == 3


def test_real_size_swin_base_matches_transformers():
    """facebook/maskformer-swin-base-ade's architecture (Swin-B, window 12, 150 classes, 100 queries,
    6 decoder layers, 256-d) at a 256x320 input, which needs window padding at stages 1 and 3."""
    from transformers import MaskFormerForInstanceSegmentation as HF

    from hf_oracle import hf_maskformer_config, perturb_

    config = hf_maskformer_config(window_size=12, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                  num_queries=100, d_model=256, decoder_layers=6, num_labels=150, fpn=256, mask=256)
    config.decoder_config.decoder_ffn_dim = 2048
    config.decoder_config.decoder_attention_heads = 8
    hf_model = perturb_(HF(config), scale=0.02).eval()
    ours = ours_from_hf(hf_model)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())
    compare(hf_model, ours, torch.randn(1, 3, 256, 320))
