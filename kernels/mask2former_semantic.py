"""Mask2Former semantic post-processing fused: the 384x384 resize of the mask logits, sigmoid,
class-weighted sum over queries, then resize to the target size and argmax.

transformers' ``Mask2FormerImageProcessor.post_process_semantic_segmentation`` (label maps only) is::

    masks = F.interpolate(masks_queries_logits, size=(384, 384), mode="bilinear", align_corners=False)
    scores = einsum("bqc, bqhw -> bchw", softmax(class)[..., :-1], masks.sigmoid())   # (B, K, 384, 384)
    labels[b] = F.interpolate(scores[b:b+1], size=target_sizes[b], ...)[0].argmax(0)    # or at 384x384

which writes the (B, Q, 384, 384) resized logits and their sigmoid (2 x 118 MB per image at
Q=200) before the einsum reads them back. ``mask2former_semantic_ref`` is that composition
(``semantic_segmentation_ref`` after the resize; with ``source_extents`` each image's valid crop is
resized on its own, ``maskformer.processing_mask2former``'s deviation 21). The kernels:

* ``cpp`` (``csrc/semantic.cpp``, ``maskformer::mask2former_scores``): per image, per 8x32 tile
  of the 384 grid, the Q resized logits are interpolated with aten's arithmetic
  (generic formula, calibrated fma variant, a fractional crop through aten's scale factors), put
  through a vectorised sigmoid (<= 3 ulp) and contracted with the class probabilities (torch's
  softmax, as the reference) in registers; only the (K, 384, 384) fp32 scores are written (88 MB at
  K=150), then labelled by the C++ ``upsample_argmax`` (never (K, H, W) at the target size). Per
  tile, classes whose upper bound (from the tile's source logits) is below another class's
  lower bound are not summed: they cannot win any pixel whose taps touch the tile, and their
  scores are written as 0, which provably leaves every label unchanged (csrc/semantic.cpp's
  header; tested: the labels equal the unpruned kernel's). Realistic logits at Q=200, K=150 keep
  33% of the sums (73 ms vs 94 ms for the scores on the 2-core EPYC); flat scores keep most.
* ``triton``: the same fusion as one Triton kernel per image (bilinear taps from host tables
  computed with aten's rounding, sigmoid, ``tl.dot`` with ``mask_einsum``'s precision policy),
  then the Triton ``upsample_argmax`` on the scores.

Not bit-identical to the reference: the sigmoid and the summation order differ (the scores agree
within 8.4e-7 at Q=200, K=150 on realistic logits; scores are <= 1), so labels are identical except
where two classes' reference scores are within ~1e-6. Exact ties (two classes with equal class
probabilities in every query) stay exact: both classes' sums take the same operations, and the
first class wins, as in torch.argmax.

fp16/bf16 logits: the reference resizes in that dtype (aten rounds its intermediates to it) and
computes the rest in fp32; the kernels interpolate the logits in fp32, so they are closer to the
fp32 computation than the reference is (tests: the budget is the reference's own disagreement
with its fp32 maps).

Limits: CPU (C++) or CUDA (Triton), fp32/fp16/bf16. The C++ kernel refuses (and ``auto`` falls
back to the reference) when aten would resize these logits with its channels-last kernel (1x1 mask
logits or a single query), whose rounding it does not reproduce; and scores over 2**31 elements.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch

from maskformer import _devices, _ext
from maskformer.kernels import mask_einsum as me
from maskformer.kernels import semantic_segmentation as ss
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, AOTLaunch, Impl, Op, triton_reasons

__all__ = ["OP", "POSTPROCESS_SIZE", "mask2former_semantic_ref", "mask2former_semantic_cpp",
           "mask2former_semantic_triton", "resize_mask_logits_ref", "check_args", "cpp_reasons",
           "triton_not_supported_reasons"]

# transformers resizes the mask logits to this size before every Mask2Former post-processing
# ("scale back to preprocessed image size - (384, 384) for all models").
POSTPROCESS_SIZE = (384, 384)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Sizes = Optional[Sequence[Tuple[int, int]]]
Extents = Optional[Sequence[Optional[Tuple[float, float]]]]


def check_args(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor, target_sizes: Sizes = None,
               out_dtype: torch.dtype = torch.int64, source_extents: Extents = None) -> None:
    """The op's argument check (``semantic_segmentation``'s): shapes and devices, B target sizes, a
    label dtype that holds K - 1, B valid extents in mask-logit pixels; ValueError naming the problem."""
    ss.check_args(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)


def resize_mask_logits_ref(masks_queries_logits: torch.Tensor, source_extents: Extents = None,
                           size: Tuple[int, int] = POSTPROCESS_SIZE) -> torch.Tensor:
    """transformers' resize of the mask logits: (B, Q, h, w) -> (B, Q, H, W), bilinear,
    align_corners=False, in the logits' dtype. ``source_extents``: None (one ``F.interpolate`` on the
    batch, transformers) or B entries, None or an image's valid ``(eh, ew)`` in logit pixels: that
    crop alone is resized, its fractional edge landing on the output's edge (aten's scale factors)."""
    if source_extents is None or all(e is None for e in source_extents):
        return torch.nn.functional.interpolate(masks_queries_logits, size=size, mode="bilinear", align_corners=False)
    resized = []
    for img, extent in zip(masks_queries_logits, source_extents):
        crop = ua.extent_view(img, extent)
        resized.append(torch.ops.aten.upsample_bilinear2d(crop[None], list(size), False,
                                                          *ua.aten_scales(extent, size))[0])
    return torch.stack(resized)


def mask2former_semantic_ref(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sizes = None,
    out_dtype: torch.dtype = torch.int64,
    source_extents: Extents = None,
) -> List[torch.Tensor]:
    """transformers' Mask2Former ``post_process_semantic_segmentation`` on raw logits, label maps only.

    Args:
        class_queries_logits: (B, Q, K+1) float (fp32/fp16/bf16); the last class is "no object".
        masks_queries_logits: (B, Q, h, w) float, same device; resized to 384x384 in its own dtype,
            then (fp16/bf16) upcast to fp32 for the sigmoid and the sum.
        target_sizes: None (384x384 maps) or B (H_b, W_b) pairs.
        out_dtype: int64 (transformers'), or int32/int16/uint8 when K - 1 fits.
        source_extents: None or B entries, each None or the image's valid region ``(eh, ew)`` of the
            logits (floats, ``0 < eh <= h``): that region alone is resized to 384x384.

    Returns:
        B label maps (H_b, W_b) (384x384 without target sizes) of ``out_dtype``; for fp32 inputs
        without extents, transformers' maps bit for bit.
    """
    _, extents = ss._arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    resized = resize_mask_logits_ref(masks_queries_logits, extents)
    return ss.semantic_segmentation_ref(class_queries_logits, resized, target_sizes, out_dtype)


def _class_probs(class_queries_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) fp32 class probabilities, the reference's softmax (null class dropped)."""
    return me._upcast(class_queries_logits).softmax(dim=-1)[..., :-1].float()


def mask2former_semantic_cpp(class_queries_logits, masks_queries_logits, target_sizes=None, out_dtype=torch.int64,
                             source_extents=None) -> List[torch.Tensor]:
    """The C++ kernels: ``maskformer::mask2former_scores`` (resize + sigmoid + sum, fused) per
    image, then ``upsample_argmax_cpp``. Arguments and result as ``mask2former_semantic_ref``;
    ValueError with ``cpp_reasons`` when it cannot run."""
    reasons = cpp_reasons(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    if reasons:
        raise ValueError("maskformer::mask2former_scores (C++) cannot run: " + "; ".join(reasons))
    sizes, extents = ss._arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    probs = _class_probs(class_queries_logits)
    labels = []
    for i in range(class_queries_logits.shape[0]):
        extent = None if extents is None else extents[i]
        fma, _ = ua.rounding_for(masks_queries_logits[i], POSTPROCESS_SIZE, extent)
        # prune=True: classes that cannot win anywhere near a tile are not summed there (their
        # scores are written as 0, which cannot change a label: csrc/semantic.cpp says why)
        scores = torch.ops.maskformer.mask2former_scores(
            probs[i].contiguous(), ua.extent_view(masks_queries_logits[i], extent), *POSTPROCESS_SIZE, fma,
            *ua.kernel_scales(extent, POSTPROCESS_SIZE), True)
        labels.append(ua.upsample_argmax_cpp(scores, None if sizes is None else sizes[i], out_dtype))
        del scores  # one image's (K, 384, 384) scores alive at a time
    return labels


def _first_resize_reasons(masks_queries_logits, source_extents) -> List[str]:
    """aten's channels-last kernel for the 384x384 resize (1x1 logits, one query): not reproduced."""
    ml = masks_queries_logits
    try:
        extents = ua.as_extents(ml, source_extents, batched=True)
    except ValueError:
        return []  # check_args names it
    for img, extent in zip(ml.unbind(0) if ml.shape[0] else [], extents):
        if ua.rounding_for(img, POSTPROCESS_SIZE, extent)[1]:
            return ["aten resizes these mask logits with its channels-last kernel (1x1 logits or a single "
                    "query), whose rounding the fused kernel does not reproduce"]
    return []


def _size_reasons(class_queries_logits, masks_queries_logits, target_sizes) -> List[str]:
    k = class_queries_logits.shape[-1] - 1
    reasons = []
    if k * POSTPROCESS_SIZE[0] * POSTPROCESS_SIZE[1] >= 2**31:
        reasons.append(f"{k} classes x 384 x 384 scores >= 2**31 elements: offsets are int32")
    if target_sizes is not None and any(int(s[0]) * int(s[1]) >= 2**31 for s in target_sizes):
        reasons.append("a target has >= 2**31 pixels: offsets are int32")
    return reasons


def cpp_reasons(class_queries_logits, masks_queries_logits, target_sizes=None, out_dtype=torch.int64,
                source_extents=None) -> List[str]:
    """Why the C++ kernels cannot serve these arguments (extension, device, dtypes, aten's kernel
    choice for the 384x384 resize, int32 offsets); [] when they can."""
    reasons = list(_ext.cpp_missing_ops("mask2former_scores", "upsample_argmax_out"))
    for name, t in (("class_queries_logits", class_queries_logits), ("masks_queries_logits", masks_queries_logits)):
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}: the C++ kernel is CPU-only")
        if t.dtype not in _DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if reasons:
        return reasons
    return (_first_resize_reasons(masks_queries_logits, source_extents)
            + _size_reasons(class_queries_logits, masks_queries_logits, target_sizes))


# ---------------------------------------------------------------------------------------------
# Triton (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """The @triton.jit kernel (interpreted or compiled, fixed at its first build)."""
    global triton, tl, _mask2former_scores_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _mask2former_scores_kernel(
        probs_ptr, msk_ptr, out_ptr, ri0_ptr, ri1_ptr, rl0_ptr, rl1_ptr, ci0_ptr, ci1_ptr, cl0_ptr, cl1_ptr,
        Q, K, W, HW, stride_q, stride_h,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """out[k, p] = sum_q probs[k, q] * sigmoid(bilinear(msk[q])(p)) for one image; grid
        (cdiv(HW, BLOCK_P), cdiv(K, BLOCK_K)); probs (K, Q) in the dot's operand dtype, msk (Q, h, w)
        with unit column stride (a crop read in place), out (K, H, W) fp32; the row/column taps
        (i0, i1, l0, l1) are aten's, from the host."""
        pid_p = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        k_ok = offs_k < K
        p_ok = offs_p < HW
        oh = tl.where(p_ok, offs_p // W, 0)
        ow = tl.where(p_ok, offs_p % W, 0)
        r0 = tl.load(ri0_ptr + oh)
        r1 = tl.load(ri1_ptr + oh)
        lh0 = tl.load(rl0_ptr + oh)
        lh1 = tl.load(rl1_ptr + oh)
        c0 = tl.load(ci0_ptr + ow)
        c1 = tl.load(ci1_ptr + ow)
        lw0 = tl.load(cl0_ptr + ow)
        lw1 = tl.load(cl1_ptr + ow)
        p00 = (r0 * stride_h + c0)[None, :]
        p01 = (r0 * stride_h + c1)[None, :]
        p10 = (r1 * stride_h + c0)[None, :]
        p11 = (r1 * stride_h + c1)[None, :]
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < Q
            pr = tl.load(probs_ptr + offs_k[:, None] * Q + offs_q[None, :], mask=k_ok[:, None] & q_ok[None, :],
                         other=0.0)  # (BLOCK_K, BLOCK_Q), 0 for padded classes and queries
            base = msk_ptr + offs_q[:, None].to(tl.int64) * stride_q
            ok = q_ok[:, None] & p_ok[None, :]
            a = tl.load(base + p00, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(base + p01, mask=ok, other=0.0).to(tl.float32)
            c = tl.load(base + p10, mask=ok, other=0.0).to(tl.float32)
            d = tl.load(base + p11, mask=ok, other=0.0).to(tl.float32)
            # aten's generic formula, fma variant (nvcc contracts it; upsample_argmax's CUDA rounding)
            t0 = tl.fma(a, lw0[None, :], b * lw1[None, :])
            t1 = tl.fma(c, lw0[None, :], d * lw1[None, :])
            v = tl.fma(t0, lh0[None, :], t1 * lh1[None, :])
            e = tl.exp(-tl.abs(v))  # sigmoid without overflow: exp of a non-positive number
            sig = tl.where(v >= 0, 1.0, e) / (1.0 + e)  # padded queries meet pr = 0
            if UPCAST_DOT:
                # Interpreter only (mask_einsum: triton-lang/triton#11584): exact fp32 dot of the rounded operands.
                acc += tl.dot(pr.to(tl.float32), sig.to(pr.dtype).to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(pr, sig.to(pr.dtype), input_precision=DOT_PRECISION)
        tl.store(out_ptr + offs_k[:, None] * HW + offs_p[None, :], acc, mask=k_ok[:, None] & p_ok[None, :])

    return _mask2former_scores_kernel


def _axis_tables(n_in: int, n_out: int, step: float, device) -> List[torch.Tensor]:
    """aten's (i0, i1, l0, l1) for one axis of the resize (fma rounding, as on CUDA): int32, int32,
    fp32, fp32 tensors of n_out entries on ``device``."""
    i0, i1, l0, l1 = ua._axis(n_in, n_out, True, step)
    return [i0.to(device=device, dtype=torch.int32), i1.to(device=device, dtype=torch.int32),
            l0.to(device=device, dtype=torch.float32), l1.to(device=device, dtype=torch.float32)]


def launch_scores(probs: torch.Tensor, masks: torch.Tensor, out: torch.Tensor, steps=(ua.NO_SCALE, ua.NO_SCALE),
                  compile_only: bool = False):
    """One image: probs (K, Q) contiguous in the dot's operand dtype, masks (Q, h, w) with unit
    column stride, out (K, H, W) fp32 contiguous; ``steps``: ``kernel_scales`` of the crop. Returns
    out, or with ``compile_only`` the ``CompiledKernel`` (``benchmarks/aot.py``, meta tensors)."""
    kernel = _build_kernel()
    k, q = probs.shape
    _, h, w = masks.shape
    _, hh, ww = out.shape
    device = "cpu" if masks.device.type == "meta" else masks.device
    tables = _axis_tables(h, hh, steps[0], device) + _axis_tables(w, ww, steps[1], device)
    if masks.device.type == "meta":
        tables = [t.to("meta") for t in tables]
    precision = me.dot_precision(probs.dtype)
    block_k, block_p, block_q, num_warps = me.default_blocks(k, probs.dtype, precision)
    grid = (triton.cdiv(hh * ww, block_p), triton.cdiv(k, block_k))
    args = (probs, masks, out, *tables, q, k, ww, hh * ww, masks.stride(0), masks.stride(1))
    meta = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_P=block_p, DOT_PRECISION=precision,
                UPCAST_DOT=_ext.triton_interpret_mode() and probs.dtype == torch.bfloat16, num_warps=num_warps,
                # explicit, as mask_einsum (triton 3.10 turns the default off): the resize spells its
                # fmas (tl.fma of a product), so fusion can only touch the sigmoid, which the parity
                # bar allows either way
                enable_fp_fusion=True)
    if compile_only:
        return kernel.warmup(*args, grid=grid, **meta)
    kernel[grid](*args, **meta)
    return out


def triton_not_supported_reasons(class_queries_logits, masks_queries_logits, target_sizes=None,
                                 out_dtype=torch.int64, source_extents=None) -> List[str]:
    """Why the Triton kernels cannot serve these arguments; [] when they can."""
    cl, ml = class_queries_logits, masks_queries_logits
    reasons = triton_reasons(ml, "tensors are")
    if cl.device != ml.device:
        reasons.append(f"class logits on {cl.device}, mask logits on {ml.device}")
    for name, t in (("class_queries_logits", cl), ("masks_queries_logits", ml)):
        if t.dtype not in _DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if ml.dim() == 4 and ml[0].numel() >= 2**31:
        reasons.append("one image's mask logits have >= 2**31 elements: offsets are int32")
    return reasons + _size_reasons(cl, ml, target_sizes)


def mask2former_semantic_triton(class_queries_logits, masks_queries_logits, target_sizes=None,
                                out_dtype=torch.int64, source_extents=None) -> List[torch.Tensor]:
    """The Triton kernels: fused (K, 384, 384) scores per image, then ``upsample_argmax`` (Triton).
    Arguments and result as ``mask2former_semantic_ref``."""
    reasons = triton_not_supported_reasons(class_queries_logits, masks_queries_logits, target_sizes, out_dtype,
                                           source_extents)
    if reasons:
        raise ValueError("mask2former_semantic (Triton) cannot run: " + "; ".join(reasons))
    sizes, extents = ss._arguments(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents)
    k = class_queries_logits.shape[-1] - 1
    operand = me.dot_dtype(masks_queries_logits.dtype)
    probs = _class_probs(class_queries_logits).transpose(1, 2).to(operand).contiguous()  # (B, K, Q)
    labels = []
    for i in range(class_queries_logits.shape[0]):
        extent = None if extents is None else extents[i]
        masks = ua.extent_view(masks_queries_logits[i], extent)
        masks = masks if masks.stride(-1) == 1 else masks.contiguous()
        scores = torch.empty((k, *POSTPROCESS_SIZE), device=masks.device, dtype=torch.float32)
        launch_scores(probs[i], masks, scores, ua.kernel_scales(extent, POSTPROCESS_SIZE))
        labels.append(ua.upsample_argmax(scores, None if sizes is None else sizes[i], out_dtype))
        del scores
    return labels


# ---------------------------------------------------------------------------------------------
# Fakes, ahead-of-time launches, the op's declaration
# ---------------------------------------------------------------------------------------------


def _mask2former_scores_fake(class_probs, mask_logits, H, W, use_fma, scale_h=-1.0, scale_w=-1.0, prune=False):
    """Fake (and Meta) kernel of the C++ ``maskformer::mask2former_scores``: (K, H, W) fp32."""
    _devices.check_same_device("maskformer::mask2former_scores", class_probs=class_probs, mask_logits=mask_logits)
    return class_probs.new_empty((class_probs.shape[1], H, W), dtype=torch.float32)


def _aot_launch(queries: int, classes: int, mh: int, mw: int, dtype: str, tf32: Optional[bool]) -> AOTLaunch:
    dt = getattr(torch, dtype)

    def compile_():
        with _ext.tf32_matmul(bool(tf32)):
            operand = me.dot_dtype(dt)
            probs = torch.empty(classes, queries, device="meta", dtype=operand)
            masks = torch.empty(queries, mh, mw, device="meta", dtype=dt)
            out = torch.empty(classes, *POSTPROCESS_SIZE, device="meta", dtype=torch.float32)
            return launch_scores(probs, masks, out, compile_only=True)

    config = dict(Q=queries, K=classes, masks=f"{mh}x{mw}", dtype=DTYPE_LABELS[dtype])
    if dtype == "float32":
        config["tf32"] = bool(tf32)
    return AOTLaunch("mask2former_semantic", config, compile_, tensor_cores=dtype != "float32" or bool(tf32))


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles (the scores kernel; the labels are
    ``upsample_argmax``'s launches). CI: Mask2Former Swin-T ADE (100 queries, 150 classes, 128x171
    masks of a 512x683 input) in each dtype, fp32 under both TF32 settings. Full: also 200 queries
    and COCO panoptic's 133 classes, and masks of a 640x853 input."""
    heads = [(100, 150)] if not full else [(100, 150), (200, 150), (100, 133), (200, 133)]
    masks = [(128, 171)] if not full else [(128, 171), (160, 214)]
    out = []
    for queries, classes in heads:
        for mh, mw in masks:
            for dtype in AOT_DTYPES:
                for tf32 in ((False, True) if dtype == "float32" else (None,)):
                    out.append(_aot_launch(queries, classes, mh, mw, dtype, tf32))
    return out


OP = Op(
    name="mask2former_semantic",
    reference=mask2former_semantic_ref,
    check=check_args,
    description="transformers' Mask2Former post_process_semantic_segmentation on raw logits (384x384 resize, "
                "sigmoid, class-weighted sum, resize + argmax) without the (Q, 384, 384) logits: "
                "(B, Q, K+1), (B, Q, h, w) -> B label maps",
    role="semantic post-processing",
    tasks=("semantic",),
    models=("mask2former",),
    impls=(
        Impl("triton", mask2former_semantic_triton, devices=("cuda",), dtypes=_DTYPES,
             reasons=triton_not_supported_reasons),
        Impl("cpp", mask2former_semantic_cpp, devices=("cpu",), dtypes=_DTYPES, reasons=cpp_reasons),
    ),
    fakes={"maskformer::mask2former_scores": _mask2former_scores_fake},
    aot_launches=aot_launches,
)
