"""Half precision end to end: bf16/fp16 weights, and fp32 weights under autocast, against fp32.

The bar is the end-to-end one of the fast path: semantic maps agree with the fp32 model on at
least 99.9% of pixels. It is checked on the trained default model with images of its domain
(random weights give near-tied logits, where agreement measures nothing). Logit errors are
bounded by the dtype's own rounding: bf16 keeps 8 mantissa bits (unit roundoff 2**-9 = 2e-3),
fp16 11 bits (2**-12 = 2.4e-4); ~20 rounded layers in sequence give errors of a few percent of the
logit scale in bf16 and a tenth of that in fp16. Measured on this CPU (8 images, 160x224): bf16
0.36% (class) / 0.61% (mask), autocast-bf16 0.35% / 0.63%, fp16 0.04% / 0.08%; maps agree on
99.989% (bf16), 99.988% (autocast), 99.998% (fp16). The bounds below are ~5x the measurements.
"""
import numpy as np
import pytest
import torch

from maskformer import MaskFormerImageProcessor, dispatch
from maskformer.loading import DEFAULT_MODEL_DIR, load_default_model
from maskformer.synthetic import make_sample

# max |logit error| / max |fp32 logit| for each way of running in half precision
LOGIT_BOUND = {"bfloat16": 0.03, "float16": 0.005, "autocast-bfloat16": 0.03}


@pytest.fixture(scope="module")
def fp32_run():
    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    samples = [make_sample(4 * 10**7 + i, 160, 224) for i in range(8)]
    pixel_values = processor(images=[s[0] for s in samples], return_tensors="pt")["pixel_values"]
    model = load_default_model()
    with torch.inference_mode():
        out = model(pixel_values)
    sizes = [(160, 224)] * len(samples)
    maps = processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    return processor, pixel_values, sizes, out, torch.stack(maps)


@pytest.mark.parametrize("mode", sorted(LOGIT_BOUND))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_half_precision_maps_agree_with_fp32(fp32_run, mode, backend):
    processor, pixel_values, sizes, ref, ref_maps = fp32_run
    model = load_default_model()
    with torch.inference_mode(), dispatch.backend(backend):
        if mode.startswith("autocast"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(pixel_values)
                maps = processor.post_process_semantic_segmentation(out, target_sizes=sizes)
            expected_dtype = torch.bfloat16
        else:
            expected_dtype = getattr(torch, mode)
            model = model.to(expected_dtype)
            out = model(pixel_values)  # fp32 processor output is cast to the weights' dtype
            maps = processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    assert out.masks_queries_logits.dtype == expected_dtype, out.masks_queries_logits.dtype
    for name in ("class_queries_logits", "masks_queries_logits"):
        err = ((out[name].float() - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert err < LOGIT_BOUND[mode], f"{mode} {backend} {name}: relative error {err:.3e} > {LOGIT_BOUND[mode]}"
    maps = torch.stack(maps)
    assert maps.dtype == ref_maps.dtype and maps.shape == ref_maps.shape
    agree = (maps == ref_maps).double().mean().item()
    assert agree >= 0.999, f"{mode} {backend}: semantic maps agree with fp32 on {agree:.5%} of pixels (< 99.9%)"


def test_position_embedding_is_built_once_per_shape(monkeypatch):
    from maskformer import transformer_decoder

    model = load_default_model()
    module = model.model.transformer_module
    calls = []
    real = transformer_decoder.sine_position_embedding
    monkeypatch.setattr(transformer_decoder, "sine_position_embedding", lambda *a, **k: calls.append(a[:3]) or real(*a, **k))
    module._pos_cache.clear()
    with torch.inference_mode():
        for shape in [(1, 3, 128, 128), (2, 3, 128, 128), (1, 3, 96, 160), (1, 3, 128, 128)]:
            model(torch.randn(shape))
    # batch size does not matter; two spatial sizes -> two builds, at batch 1
    assert calls == [(1, 4, 4), (1, 3, 5)], calls
    d = model.config.decoder_config.d_model
    cached = module._pos_cache[(4, 4, d, torch.device("cpu"), torch.float32)]
    fresh = real(3, 4, 4, d // 2, "cpu", torch.float32).flatten(2).transpose(1, 2)
    assert torch.equal(cached.expand(3, -1, -1), fresh)


def test_cuda_graph_runner_refuses_cpu_tensors_and_training():
    from maskformer import CUDAGraphRunner, InputError

    model = load_default_model()
    with pytest.raises(InputError, match="CUDA graphs need CUDA tensors"):
        CUDAGraphRunner(model, torch.randn(1, 3, 64, 64))
    if torch.cuda.is_available():
        with pytest.raises(InputError, match="model.eval"):
            CUDAGraphRunner(model.cuda().train(), torch.randn(1, 3, 64, 64, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU machines only)")
def test_cuda_graph_runner_matches_eager():
    from maskformer import CUDAGraphRunner, InputError

    model = load_default_model().cuda().eval()
    x = [torch.randn(2, 3, 128, 160, device="cuda") for _ in range(3)]
    runner = CUDAGraphRunner(model, x[0])
    for xi in x:
        with torch.inference_mode():
            eager = model(xi).masks_queries_logits
        got = runner(xi).masks_queries_logits
        assert torch.allclose(got, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    with pytest.raises(InputError, match="captured for pixel_values of shape"):
        runner(torch.randn(1, 3, 128, 160, device="cuda"))
