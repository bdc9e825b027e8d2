"""The whole model on the fast backends against its own reference path (same weights).

Under TRITON_INTERPRET=1 (tests/kernels/conftest.py) the Triton window attention runs on CPU
tensors, so a forced ``triton`` backend exercises the model integration end to end.
"""
import pytest
import torch

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, dispatch
from maskformer.dispatch import BackendNotSupportedError


def small_model(window_size=7, seed=0):
    config = MaskFormerConfig(
        backbone_config=dict(embed_dim=32, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=window_size),
        decoder_config=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, num_queries=6),
        fpn_feature_size=32, mask_feature_size=32, num_labels=5,
    )
    torch.manual_seed(seed)
    model = MaskFormerForInstanceSegmentation(config).eval()
    with torch.no_grad():  # non-zero biases and position tables, so every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def exact_fp32_cuda():
    """No TF32 in cuDNN convolutions and cuBLAS matmuls while a test runs (restored after).

    cuDNN's default (``torch.backends.cudnn.allow_tf32 = True``) rounds conv inputs to a 10-bit
    mantissa, so a 1e-7 difference upstream (the attention's summation order) can move a product
    by ~5e-4 of its value: on an H200 (2026-11-26) the whole model differed from its own reference
    by 3.0e-4 / 3.5e-4 relative with TF32 convolutions, which hides what this test measures."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("window_size, size", [(7, (60, 44)), (3, (40, 52))])
def test_triton_backend_matches_reference(triton_device, window_size, size, exact_fp32_cuda):
    model = small_model(window_size).to(triton_device)
    x = torch.randn(2, 3, *size, device=triton_device)
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref = model(x)
        with dispatch.backend("triton"):
            fast = model(x)
            assert dispatch.last_dispatch("window_attention").backend == "triton"
    # fp32 kernel with exact (ieee) dots and an online softmax: it differs from the reference's
    # matmul-softmax-matmul only in summation order, ~1e-7 relative per block (measured 1e-6
    # max over the whole model); 1e-4 leaves room while a wrong bias, mask or padding (errors
    # of order 1) cannot pass.
    for name in ("class_queries_logits", "masks_queries_logits"):
        a, b = fast[name], ref[name]
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_semantic_postprocessing_dispatch_matches_reference():
    model = small_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    processor = MaskFormerImageProcessor()
    with dispatch.backend("reference"):
        ref = processor.post_process_semantic_segmentation(out, target_sizes=[(97, 131), (50, 40)])
    with dispatch.backend("auto"):
        fast = processor.post_process_semantic_segmentation(out, target_sizes=[(97, 131), (50, 40)])
        record = dispatch.last_dispatch("semantic_segmentation")
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    assert record.backend in ("cpp", "reference"), record


def test_forced_triton_refuses_to_train_and_auto_trains_on_the_reference(triton_device, monkeypatch):
    model = small_model().to(triton_device).train()
    x = torch.randn(1, 3, 48, 48, device=triton_device)
    labels = dict(mask_labels=[torch.ones(1, 48, 48, device=triton_device)],
                  class_labels=[torch.tensor([1], device=triton_device)])
    with dispatch.backend("triton"):
        with pytest.raises(BackendNotSupportedError, match="grad"):
            model(x, **labels)
    # auto: the window attention must not even be offered to the kernel when gradients are needed
    calls = []
    real_select = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *a, **k: calls.append(a[0]) or real_select(*a, **k))
    with dispatch.backend("auto"):
        loss = model(x, **labels).loss
        loss.backward()
    assert "window_attention" not in calls
    assert all(p.grad is not None for n, p in model.named_parameters() if "query.weight" in n)


@pytest.mark.filterwarnings("error::UserWarning")  # dynamo's "cannot trace" warnings mean graph breaks
def test_compile_whole_model_with_triton_backend(triton_device, exact_fp32_cuda):
    model = small_model().to(triton_device)
    x = torch.randn(1, 3, 40, 40, device=triton_device)
    with torch.no_grad(), dispatch.backend("triton"):
        eager = model(x).masks_queries_logits
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(x).masks_queries_logits
    assert torch.allclose(out, eager, rtol=0, atol=1e-6)


def test_cpu_auto_builds_no_fused_weights_and_forced_cpp_says_why():
    """On the CPU the reference runs the Swin blocks: no second copy of the q/k/v weights is made."""
    model = small_model()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad(), dispatch.backend("auto"):
        model(x)
        record = dispatch.last_dispatch("window_attention")
    assert record.backend == "reference" and "no C++ kernel" in str(record)
    attns = [m for m in model.modules() if type(m).__name__ == "SwinSelfAttention"]
    assert attns and not any(hasattr(a, "_qkv_cache") for a in attns)
    with torch.no_grad(), dispatch.backend("cpp"):
        with pytest.raises(BackendNotSupportedError, match="window_attention has no C.. kernel"):
            model(x)


def test_triton_window_attention_runs_in_half_precision_under_autocast(triton_device, monkeypatch):
    """Autocast does not reach into custom ops and hands the blocks fp32 layernorm outputs; the
    Swin block casts x and the fused q/k/v weights to autocast's dtype before the kernel."""
    from maskformer.kernels import window_attention as wa

    model = small_model().to(triton_device)
    x = torch.randn(1, 3, 60, 44, device=triton_device)
    seen = []
    real = wa.window_attention
    monkeypatch.setattr(wa, "window_attention", lambda *a: seen.append((a[0].dtype, a[1].dtype)) or real(*a))
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref = model(x)
            with torch.autocast(triton_device.type, dtype=torch.bfloat16):
                ref_bf16 = model(x)
        with dispatch.backend("triton"), torch.autocast(triton_device.type, dtype=torch.bfloat16):
            fast = model(x)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, seen
    # Judged against the reference's own error under the same autocast (both vs fp32): through
    # 5 Swin blocks, the FPN and 2 decoder layers of this perturbed model, bf16 rounding gives
    # ~1-3% of the logit scale for both (measured: reference 1.5% / 1.8%, kernel 1.4% / 2.4%,
    # class / mask). The kernel keeps scores and softmax in fp32, so it must not be worse than
    # 1.5x the reference; a wrong bias, mask or shift gives errors of order 100%.
    for name in ("class_queries_logits", "masks_queries_logits"):
        scale = ref[name].abs().max()
        err = ((fast[name].float() - ref[name]).abs().max() / scale).item()
        ref_err = ((ref_bf16[name].float() - ref[name]).abs().max() / scale).item()
        assert err <= 1.5 * ref_err + 1e-3, f"{name}: kernel error {err:.2e} vs reference bf16 error {ref_err:.2e}"


def small_mask2former(seed=0):
    from maskformer import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    config = Mask2FormerConfig(
        backbone_config=dict(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 3], window_size=7),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
        encoder_layers=2, decoder_layers=3, num_attention_heads=4, num_queries=6, num_labels=5,
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_mask2former_triton_backend_matches_reference(triton_device, exact_fp32_cuda):
    """Mask2Former end to end on the Triton backend (window attention and multi-scale deformable
    attention kernels) against its own reference path, same weights. Bar: the MaskFormer test's
    1e-4 (summation-order differences are ~1e-6); a wrong sample, weight or level offset, or a
    masked-attention threshold flipped by one, moves the logits by far more."""
    model = small_mask2former().to(triton_device)
    x = torch.randn(1, 3, 60, 44, device=triton_device)
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref = model(x)
        with dispatch.backend("triton"):
            fast = model(x)
            assert dispatch.last_dispatch("window_attention").backend == "triton"
            assert dispatch.last_dispatch("ms_deform_attn").backend == "triton"
    for name in ("class_queries_logits", "masks_queries_logits"):
        a, b = fast[name], ref[name]
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_mask2former_auto_on_cpu_uses_cpp_and_matches_reference(cpp_ops, monkeypatch):
    """Mask2Former end to end on CPU with the default backend (auto): the pixel decoder's
    deformable attention runs the C++ kernel, against the reference path on the same weights.
    Bar: the Triton test's 1e-4 (the kernel differs from grid_sample + weighted sum in rounding
    only: measured 4.6e-7 / 6.8e-7 relative, class / mask logits); a wrong sample, weight or level
    offset moves the logits by far more. Batch 2 with a 4:3-ish input, so the levels are not square."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    model = small_mask2former(seed=1)
    x = torch.randn(2, 3, 60, 76)
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref = model(x)
            assert dispatch.last_dispatch("ms_deform_attn").backend == "reference"
        with dispatch.backend("auto"):
            fast = model(x)
            rec = dispatch.last_dispatch("ms_deform_attn")
            assert (rec.requested, rec.backend) == ("auto", "cpp"), str(rec)
    for name in ("class_queries_logits", "masks_queries_logits"):
        a, b = fast[name], ref[name]
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
