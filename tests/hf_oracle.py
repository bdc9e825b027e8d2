"""The tests' one shared helpers module (imported as ``hf_oracle`` from tests/ and tests/kernels:
pytest puts tests/ on sys.path through tests/conftest.py; helpers are not in a conftest because
tests/kernels has its own).

* transformers as the oracle: small MaskFormer and Mask2Former configs, random perturbed models
  (``make_hf_model``, ``make_hf_mask2former``), ours on the same weights (``ours_from_hf``);
* comparisons that say where and how much: ``assert_close_rel`` (one relative bar),
  ``assert_within_budget`` (a fast path against a higher-precision reference, budgeted by the
  reference's own low-precision error), ``assert_labels_equal`` (label maps, exactly);
* inputs: ``realistic_scores`` (the scores of realistic MaskFormer outputs).
"""
import os

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


def hf_mask2former_config(window_size=7, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 3), num_queries=10,
                          hidden_dim=32, feature_size=32, mask_feature_size=32, decoder_layers=4, encoder_layers=2,
                          num_labels=5, heads=4, **top):
    """A small transformers Mask2FormerConfig (Swin + deformable pixel decoder + masked attention)."""
    from transformers import Mask2FormerConfig as HFConfig, SwinConfig

    backbone = SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                          out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0)
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    return HFConfig(backbone_config=backbone, feature_size=feature_size, mask_feature_size=mask_feature_size,
                    hidden_dim=hidden_dim, encoder_feedforward_dim=2 * feature_size, dim_feedforward=2 * hidden_dim,
                    encoder_layers=encoder_layers, decoder_layers=decoder_layers, num_attention_heads=heads,
                    num_queries=num_queries, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **top)


def make_hf_mask2former(seed=0, scale=0.2, cls_name="Mask2FormerForUniversalSegmentation", **kwargs):
    """A transformers Mask2Former model (``cls_name``) with random weights perturbed by N(0, scale),
    eager attention, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = hf_mask2former_config(**kwargs)
    config._attn_implementation = "eager"
    return perturb_(getattr(transformers, cls_name)(config), scale=scale, seed=seed).eval()


def ours_from_hf(hf_model, cls=None):
    """Our model on a transformers model's config and weights, in eval mode. ``cls``: our class
    (default: the one of the same name, e.g. ``maskformer.Mask2FormerForUniversalSegmentation``)."""
    import maskformer
    from maskformer.loading import load_model_state

    cls = cls or getattr(maskformer, type(hf_model).__name__)
    ours = cls(cls.config_class.from_dict(hf_model.config.to_dict())).eval()
    load_model_state(ours, dict(hf_model.state_dict()))
    return ours


def assert_within_budget(fast, gold, baseline, atol=None, name="", *, reduce="elementwise"):
    """flash-attention's rule for a fast path: ``|fast - gold| <= 2 |baseline - gold| + atol``.

    gold: the reference in higher precision (fp64, or fp32 for a low-precision fast path);
    baseline: the reference (or the path it replaces) in the fast path's precision, whose own
    error is the budget. atol: a float or a tensor broadcast to the output (default: one ulp of
    ``fast``'s dtype at the largest ``|gold|``, so a nearly exact baseline cannot demand more than
    the output dtype represents). reduce: ``"elementwise"`` (every element within its own budget)
    or ``"max_and_mean"`` (the largest error within ``2 max|baseline - gold| + atol`` and the mean
    error within ``2 mean|baseline - gold| + atol / 10``: for ops whose per-element error is noise
    around a small mean, e.g. attention). ``fast`` must be NaN exactly where ``gold`` is: outputs
    left at a NaN sentinel (never written) fail. A failure says how many elements are over, where
    the worst one is and every value there.
    """
    fast64, gold, baseline = fast.double().cpu(), gold.double().cpu(), baseline.double().cpu()
    assert fast64.shape == gold.shape, f"{name}: shape {tuple(fast64.shape)} != {tuple(gold.shape)}"
    nan_gold, nan_fast = gold.isnan(), fast64.isnan()
    if not torch.equal(nan_gold, nan_fast):
        bad = (nan_gold != nan_fast).nonzero()
        first = tuple(int(v) for v in bad[0])
        what = "never written (NaN sentinel) or NaN" if nan_fast[first] else "not NaN where the reference is"
        raise AssertionError(f"{name}: {len(bad)} of {gold.numel()} outputs {what}; first at {first}: "
                             f"fast {fast64[first].item()}, reference {gold[first].item()}")
    if atol is None:
        atol = torch.finfo(fast.dtype).eps * max(gold.nan_to_num().abs().max().item(), 1e-30)
    atol = torch.as_tensor(atol, dtype=torch.float64).cpu()
    ok = ~nan_gold
    err = torch.where(ok, (fast64 - gold).abs(), 0.0)
    base = torch.where(ok, (baseline - gold).abs(), 0.0)
    if reduce == "elementwise":
        budget = torch.where(ok, 2 * base + atol, 1.0)
        over = err > budget
        if not over.any():
            return
        worst = int(torch.argmax((err - budget).flatten()))
        summary = f"{int(over.sum())} of {err.numel()} elements over budget"
    elif reduce == "max_and_mean":
        atol = atol.max().item()
        max_bound, mean_bound = 2 * base.max().item() + atol, 2 * base.mean().item() + atol / 10
        if err.max().item() <= max_bound and err.mean().item() <= mean_bound:
            return
        budget = torch.full_like(err, max_bound)
        worst = int(err.argmax())
        summary = (f"max |fast - gold| {err.max().item():.3e} (bound {max_bound:.3e}), mean {err.mean().item():.3e} (bound "
                   f"{mean_bound:.3e}); {int((err > max_bound).sum())} of {err.numel()} elements over the max bound")
    else:
        raise ValueError(f"reduce must be 'elementwise' or 'max_and_mean', got {reduce!r}")
    idx = tuple(int(v) for v in np.unravel_index(worst, tuple(err.shape)))
    atol_here = float(torch.broadcast_to(atol, err.shape)[idx]) if torch.is_tensor(atol) else atol
    raise AssertionError(
        f"{name}: {summary}; worst at {idx}: fast {fast64[idx].item():.9g}, gold {gold[idx].item():.9g}, baseline "
        f"{baseline[idx].item():.9g}, err {err[idx].item():.3g} > budget {budget[idx].item():.3g} "
        f"(atol {atol_here:.2e})")


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


# Mask2Former's fused semantic post-processing (maskformer.kernels.mask2former_semantic): its labels
# may differ from the reference's only where the reference's two scores are this close: the fused
# scores are not bit-identical (sigmoid_fast <= 3 ulp, another summation order). Measured
# max |fused - reference| on the (K, 384, 384) scores: 8.4e-7 at Q=200, K=150, realistic logits
# (AMD EPYC Zen 4); scores are <= 1 and the second resize is a convex combination, so the error at
# the target is no larger. 4e-6 is ~5x that.
TIE_ATOL = 4e-6


def assert_labels_up_to_ties(ours, ref_labels, scores, name, atol=TIE_ATOL, max_fraction=1e-3):
    """Label maps (H, W) equal to the reference's except where the reference's scores of both
    labels are within ``atol`` (a near tie, which the fast path's rounding may resolve the other
    way); at most ``max_fraction`` of the pixels may differ. scores: the reference's (K, H, W)."""
    assert tuple(ours.shape) == tuple(ref_labels.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref_labels.shape)}"
    assert ours.dtype == ref_labels.dtype, f"{name}: dtype {ours.dtype} != {ref_labels.dtype}"
    diff = ours.long() != ref_labels.long()
    if not diff.any():
        return
    s_ours = scores.gather(0, ours.long()[None])[0].double()
    s_ref = scores.gather(0, ref_labels.long()[None])[0].double()
    gap = (s_ref - s_ours).abs()
    bad = diff & (gap > atol)
    n = int(diff.sum())
    if bad.any():
        p = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {diff.numel()} labels differ by more than a tie "
                             f"(atol {atol:g}); first at {p}: ours {int(ours[p])} (ref score {s_ours[p].item():.9g}) vs "
                             f"ref {int(ref_labels[p])} ({s_ref[p].item():.9g})")
    assert n <= max(1, max_fraction * diff.numel()), f"{name}: {n} of {diff.numel()} labels differ (near ties)"


def realistic_scores(k: int, h: int, w: int, seed: int = 0, batch: int = 1, queries: int = 24) -> torch.Tensor:
    """(batch, K, h, w) fp32 scores of realistic MaskFormer outputs (reference einsum)."""
    from maskformer.kernels.mask_einsum import make_realistic_logits, mask_einsum_ref

    cl, ml = make_realistic_logits(batch, queries, k, h, w, seed=seed)
    return mask_einsum_ref(cl, ml)


# --- the segment command's outputs (tests/test_segment_cli.py, tests/test_segment_folder.py)
def outputs_of(folder):
    """{relative path: bytes} of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found


def label(path):
    """The label map saved at ``path``, as an array."""
    from PIL import Image

    return np.asarray(Image.open(path))


def msda_onnx_graph(spatial_dtype=None, consumer=False, first_input="value") -> bytes:
    """A serialized one-node ONNX graph of our deformable-attention operation,
    ``com.maskformer::MultiScaleDeformableAttention(value, wh, loc, attn) -> out`` (what the
    engines' Mask2Former exports hold), every dim dynamic. ``spatial_dtype``: the ONNX element type
    of ``wh`` (default INT64); ``consumer``: followed by a MatMul with a (16, 16) identity, as the
    output projection follows the node in an export; ``first_input``: the name of ``value``."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MultiScaleDeformableAttention", [first_input, "wh", "loc", "attn"], ["out"],
                            domain="com.maskformer")

    def dyn(name, rank, elem=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, [None] * rank)

    nodes, inits, last = [node], [], "out"
    if consumer:
        nodes.append(helper.make_node("MatMul", ["out", "eye"], ["proj"]))
        inits.append(numpy_helper.from_array(np.eye(16, dtype=np.float32), "eye"))
        last = "proj"
    graph = helper.make_graph(nodes, "msda", [dyn(first_input, 4), dyn("wh", 2, spatial_dtype or TensorProto.INT64),
                                              dyn("loc", 6), dyn("attn", 5)], [dyn(last, 3)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.maskformer", 1)])
    return model.SerializeToString()
