"""Shared checks for the semantic post-processing kernel tests (mask_einsum, upsample_argmax, C++)."""
import numpy as np
import torch


def assert_labels_equal(ours: torch.Tensor, ref: torch.Tensor, name: str = "") -> None:
    """Label maps identical (shape, dtype, every pixel), or a message with the number of
    mismatches and the first ones."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    bad = (ours.cpu().long() != ref.cpu().long()).nonzero()
    if len(bad):
        first = [tuple(int(i) for i in p) for p in bad[:5]]
        shown = ", ".join(f"{p}: ours {int(ours[p])} vs ref {int(ref[p])}" for p in first)
        raise AssertionError(f"{name}: {len(bad)} of {ref.numel()} labels differ; first {shown}")


def assert_within_budget(fast, ref32, ref_lowp, atol: float, name: str = "") -> None:
    """flash-attention style: |fast - ref32| <= 2 * |ref_lowp - ref32| + atol, elementwise, where
    ref_lowp is the reference's own error at the lower precision. Reports where and how much."""
    fast, ref32, ref_lowp = fast.double().cpu(), ref32.double().cpu(), ref_lowp.double().cpu()
    err = (fast - ref32).abs()
    budget = 2 * (ref_lowp - ref32).abs() + atol
    over = err > budget
    if over.any():
        i = int(torch.argmax((err - budget).flatten()))
        idx = np.unravel_index(i, tuple(err.shape))
        raise AssertionError(
            f"{name}: {int(over.sum())} of {err.numel()} elements over budget; worst at {tuple(int(v) for v in idx)}: "
            f"fast {fast[idx].item():.9g}, ref32 {ref32[idx].item():.9g}, ref_lowp {ref_lowp[idx].item():.9g}, "
            f"err {err[idx].item():.3g} > budget {budget[idx].item():.3g} (atol {atol:.1e})"
        )


def realistic_scores(k: int, h: int, w: int, seed: int = 0, batch: int = 1, queries: int = 24) -> torch.Tensor:
    """(batch, K, h, w) fp32 scores of realistic MaskFormer outputs (reference einsum)."""
    from maskformer.kernels.mask_einsum import make_realistic_logits, mask_einsum_ref

    cl, ml = make_realistic_logits(batch, queries, k, h, w, seed=seed)
    return mask_einsum_ref(cl, ml)
