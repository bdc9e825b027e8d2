"""Helpers for tests against transformers (the oracle): small configs, perturbed random weights,
relative-error assertions. Imported as `hf_oracle` (not from conftest: tests/kernels has its own)."""
import numpy as np

import torch


def hf_maskformer_config(window_size=3, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_queries=5,
                         d_model=32, decoder_layers=2, num_labels=4, fpn=32, mask=32, **top):
    """A small transformers MaskFormerConfig (Swin + DETR decoder)."""
    from transformers import DetrConfig, MaskFormerConfig, SwinConfig

    backbone = SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                          image_size=224, out_features=["stage1", "stage2", "stage3", "stage4"][: len(depths)])
    decoder = DetrConfig(d_model=d_model, decoder_layers=decoder_layers, decoder_ffn_dim=2 * d_model,
                         decoder_attention_heads=4, num_queries=num_queries, encoder_layers=1)
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    return MaskFormerConfig(backbone_config=backbone, decoder_config=decoder, fpn_feature_size=fpn,
                            mask_feature_size=mask, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **top)


def perturb_(model, scale=0.2, seed=0):
    """Add N(0, scale) to every float parameter: transformers' default init leaves biases and the
    relative position tables at zero and LayerNorms at identity, which would hide bugs there."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make_hf_model(seed=0, **config_kwargs):
    """A transformers MaskFormerForInstanceSegmentation with random, perturbed weights, in eval mode.

    Uses the eager attention so ``output_attentions`` returns weights."""
    from transformers import MaskFormerForInstanceSegmentation

    torch.manual_seed(seed)
    config = hf_maskformer_config(**config_kwargs)
    config._attn_implementation = "eager"
    config.decoder_config._attn_implementation = "eager"
    return perturb_(MaskFormerForInstanceSegmentation(config), seed=seed).eval()


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: one number that is scale-free across layers."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    denom = ref.abs().max().clamp_min(1e-30)
    return ((ours.double() - ref.double()).abs().max() / denom).item()


def assert_close_rel(ours, ref, tol, name=""):
    err = max_rel_err(ours, ref)
    if err > tol:
        diff = (ours.double() - ref.double()).abs()
        idx = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
        raise AssertionError(
            f"{name}: max relative error {err:.3e} > {tol:.1e}; worst at index {tuple(int(i) for i in idx)}: "
            f"ours {ours[idx].item():.8g} vs reference {ref[idx].item():.8g}; "
            f"{int((diff > tol * ref.abs().max()).sum())} of {diff.numel()} elements over"
        )
