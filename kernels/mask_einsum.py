"""Semantic class scores from MaskFormer outputs: softmax, sigmoid and the query contraction fused.

transformers' ``post_process_semantic_segmentation`` starts with::

    masks_classes = class_queries_logits.softmax(dim=-1)[..., :-1]   # (B, Q, K), null class dropped
    masks_probs = masks_queries_logits.sigmoid()                       # (B, Q, h, w)
    segmentation = torch.einsum("bqc, bqhw -> bchw", masks_classes, masks_probs)   # (B, K, h, w)

``mask_einsum_ref`` is exactly that (upcasting fp16/bf16 inputs to fp32 first). It writes the
(B, Q, h, w) sigmoid to memory and reads it back for the GEMM. The kernels read each mask logit once:

* ``mask_einsum`` (Triton): the class softmax once per call with torch (B x Q x (K+1) values, laid
  out (B, K, Q) in the dot's operand dtype), then one program per (block of pixels, block of
  classes, image) computes the sigmoid of a (queries x pixels) tile of mask logits in fp32 and
  accumulates ``probs^T @ sigmoid`` with ``tl.dot`` into an fp32 accumulator. The dot's operands
  follow torch's matmul precision policy: fp16/bf16 inputs -> both operands rounded to that dtype
  (tensor cores: wgmma on sm_90, mma.sync on sm_80), as transformers' own einsum in that dtype
  rounds them; fp32 inputs -> exact fp32 FFMA, or TF32 tensor cores when torch's fp32 matmuls may
  use TF32 (``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision``, as transformers'
  einsum would on CUDA; ~1e-3 relative, which flips argmaxes at region boundaries: off by default).
* ``mask_einsum_cpp``: the same fusion on CPU (``csrc/semantic.cpp``), multithreaded over
  (image, 128-pixel tiles), fp32 accumulation.

Neither is bit-identical to the reference (MKL/cuBLAS sum in their own order): they agree to a
few fp32 ulps. The ``semantic_segmentation`` op's C++ implementation
(``kernels/semantic_segmentation.py``) therefore computes the CPU scores with the reference ops,
contracting one image at a time, where bit-identity with transformers matters more than the fusion
(``ref_factors`` explains the one batch-sized intermediate that costs); these kernels serve
``dispatch.mask_einsum`` and the GPU path.

Limits: forward only; Triton on CUDA (or CPU tensors under TRITON_INTERPRET=1, for tests);
fp32/fp16/bf16; K >= 1 real class.

Compiled figures (``python -m benchmarks.aot``, CI set: triton 3.9, bundled ptxas 12.9 for sm_80
and 13.4 for sm_90; B=2, Q=100, K=150, 160x214 masks): registers / spill bytes (stores + loads) /
tensor-core instructions in the PTX, and static SASS instructions.

| version | sm_80 fp32 | sm_80 fp16, bf16 | sm_90 fp32 | sm_90 fp16, bf16 |
|---|---|---|---|---|
| before: softmax in every program, 64x64x32 tiles over 4 warps, fp32 "ieee" dot for every dtype | 255 / 376 / 0; 4054 | 255 / 352 / 0; 4048-4104 | 255 / 436 / 0; 4086 | 255 / 416 / 0; 4057-4081 |
| after, exact fp32: 64x64x16 over 8 warps (FFMA) | 128 / 0 / 0; 607 | | 128 / 0 / 0; 617 | |
| after, TF32 allowed (fp32) or fp16/bf16: 64x128x32 over 8 warps | 128 / 0 / 32 mma.sync; 1043 | 126-128 / 0 / 16 mma.sync; 861-966 | 105 / 0 / 4 wgmma; 922 | 101-103 / 0 / 2 wgmma; 695-718 |

Occupancy went from 12.5% (255 registers) to 25%. Before, each program also recomputed the
softmax of all Q x (K+1) logits: ~1600 times per 640x853 image at K=150 (3 class blocks x 533
pixel blocks) instead of once. Not timed: there was no GPU.
"""
import functools
from typing import List, Optional, Tuple

import torch

from maskformer import _devices, _ext
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, IMAGES, POSTPROCESS_HEADS, AOTLaunch, Impl, Op, triton_reasons

__all__ = [
    "OP",
    "mask_einsum",
    "mask_einsum_ref",
    "mask_einsum_cpp",
    "check_args",
    "not_supported_reasons",
    "cpp_not_supported_reasons",
    "launch",
    "default_blocks",
    "dot_dtype",
    "dot_precision",
    "aot_launches",
    "make_realistic_logits",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mask_einsum_ref(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """Semantic class scores, transformers' three lines verbatim.

    Args:
        class_queries_logits: (B, Q, K+1) float; the last class is "no object".
        masks_queries_logits: (B, Q, h, w) float.

    Returns:
        (B, K, h, w): ``sum_q softmax(class)[b, q, k] * sigmoid(mask)[b, q]``. fp16/bf16 inputs are
        upcast to fp32 first (fp32 math); fp32 and fp64 are computed in their own dtype. For fp32
        inputs this is bit-identical to transformers' post-processing.
    """
    masks_classes, masks_probs = ref_factors(class_queries_logits, masks_queries_logits)
    return ref_contract(masks_classes, masks_probs)


def ref_factors(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor):
    """The reference's two factors: (B, Q, K) class probabilities (null class dropped, a view) and
    the (B, Q, h, w) mask probabilities, fp32 math for fp16/bf16 inputs.

    Compute them over the whole batch, as transformers does: torch's vectorised sigmoid rounds an
    element differently depending on where it falls relative to the SIMD and thread chunks of the
    whole tensor, so ``sigmoid(x[i:i+1])`` can differ from ``sigmoid(x)[i]`` by an ulp (measured
    on torch 2.13 CPU). The contraction, in turn, may be done one image at a time:
    ``ref_contract(classes[i:i+1], probs[i:i+1])`` equals the batched einsum's image i (tested).
    """
    check_args(class_queries_logits, masks_queries_logits)
    masks_classes = _upcast(class_queries_logits).softmax(dim=-1)[..., :-1]
    masks_probs = _upcast(masks_queries_logits).sigmoid()
    return masks_classes, masks_probs


def ref_contract(masks_classes: torch.Tensor, masks_probs: torch.Tensor) -> torch.Tensor:
    """(B, Q, K), (B, Q, h, w) -> (B, K, h, w): transformers' einsum, verbatim."""
    return torch.einsum("bqc, bqhw -> bchw", masks_classes, masks_probs)


def _shape_reasons(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> List[str]:
    cl, ml = class_queries_logits, masks_queries_logits
    if cl.dim() != 3 or ml.dim() != 4:
        return [f"expected class logits (B, Q, K+1) and mask logits (B, Q, h, w), got {tuple(cl.shape)} and {tuple(ml.shape)}"]
    reasons = []
    if cl.shape[:2] != ml.shape[:2]:
        reasons.append(f"batch/queries differ: class logits {tuple(cl.shape)} vs mask logits {tuple(ml.shape)}")
    if cl.shape[2] < 2:
        reasons.append(f"class logits need K+1 >= 2 entries (at least one class besides 'no object'), got {cl.shape[2]}")
    return reasons


def check_args(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> None:
    """The op's argument check: (B, Q, K+1) class logits with K >= 1 and (B, Q, h, w) mask logits on
    one device, else ValueError (every entry, and the fake kernels, which is where a meta tensor
    mixed with real ones would land)."""
    _devices.check_same_device("mask_einsum", class_queries_logits=class_queries_logits,
                               masks_queries_logits=masks_queries_logits)
    reasons = _shape_reasons(class_queries_logits, masks_queries_logits)
    if reasons:
        raise ValueError("mask_einsum: " + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def not_supported_reasons(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> List[str]:
    """Why the Triton ``mask_einsum`` cannot serve these arguments; [] when it can."""
    cl, ml = class_queries_logits, masks_queries_logits
    reasons = _shape_reasons(cl, ml)
    if cl.device != ml.device:
        reasons.append(f"class logits on {cl.device}, mask logits on {ml.device}")
    reasons += triton_reasons(ml, "tensors are")
    for name, t in (("class_queries_logits", cl), ("masks_queries_logits", ml)):
        if t.dtype not in _KERNEL_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    return reasons


def cpp_not_supported_reasons(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> List[str]:
    """Why ``mask_einsum_cpp`` cannot serve these arguments; [] when it can."""
    cl, ml = class_queries_logits, masks_queries_logits
    reasons = _shape_reasons(cl, ml)
    reasons += _ext.cpp_missing_ops("mask_einsum")
    for name, t in (("class_queries_logits", cl), ("masks_queries_logits", ml)):
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}: the C++ kernel is CPU-only")
        if t.dtype not in _KERNEL_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    return reasons


# ---------------------------------------------------------------------------------------------
# Triton kernel (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """The @triton.jit kernel. triton.jit decides at decoration time whether it is interpreted, so
    TRITON_INTERPRET must be set before the first call. Triton resolves names (tl) in the kernel's
    module globals, hence the ``global``."""
    global triton, tl, _mask_einsum_fwd_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _mask_einsum_fwd_kernel(
        probs_ptr, msk_ptr, out_ptr,
        Q, K, HW,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """out[b, k, p] = sum_q probs[b, k, q] * sigmoid(msk[b, q, p]); grid
        (cdiv(HW, BLOCK_P), cdiv(K, BLOCK_K), B); probs (B, K, Q) in the dot's operand dtype,
        msk (B, Q, HW), out (B, K, HW) fp32, all contiguous."""
        pid_p = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        k_ok = offs_k < K
        p_ok = offs_p < HW
        probs_b = probs_ptr + pid_b * K * Q
        msk_b = msk_ptr + pid_b * Q * HW
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < Q
            pr = tl.load(probs_b + offs_k[:, None] * Q + offs_q[None, :], mask=k_ok[:, None] & q_ok[None, :],
                         other=0.0)  # (BLOCK_K, BLOCK_Q), 0 for padded classes and queries
            ml = tl.load(msk_b + offs_q[:, None] * HW + offs_p[None, :], mask=q_ok[:, None] & p_ok[None, :],
                         other=0.0).to(tl.float32)
            e = tl.exp(-tl.abs(ml))  # sigmoid without overflow: exp of a non-positive number
            sig = tl.where(ml >= 0, 1.0, e) / (1.0 + e)  # (BLOCK_Q, BLOCK_P); padded queries meet pr = 0
            if UPCAST_DOT:
                # Interpreter only: it multiplies bf16 bit patterns as integers
                # (triton-lang/triton#11584). Products of bf16 values are exact in fp32, so an fp32
                # dot of the rounded operands is what the tensor cores compute, up to summation order.
                acc += tl.dot(pr.to(tl.float32), sig.to(pr.dtype).to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(pr, sig.to(pr.dtype), input_precision=DOT_PRECISION)
        out_b = out_ptr + pid_b * K * HW
        tl.store(out_b + offs_k[:, None] * HW + offs_p[None, :], acc, mask=k_ok[:, None] & p_ok[None, :])

    return _mask_einsum_fwd_kernel


def dot_dtype(masks_dtype: torch.dtype) -> torch.dtype:
    """The dot's operand dtype: fp16/bf16 mask logits -> that dtype (tensor cores, fp32
    accumulation), fp32 -> fp32."""
    return masks_dtype if masks_dtype in (torch.float16, torch.bfloat16) else torch.float32


def dot_precision(dot_dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "tf32" (tensor cores; for fp16/bf16 operands triton ignores it)
    unless the operands are fp32 and torch's fp32 matmul policy is exact
    (``maskformer._ext.tf32_matmul_allowed``), then "ieee" (FFMA)."""
    return "tf32" if dot_dtype != torch.float32 or _ext.tf32_matmul_allowed() else "ieee"


def default_blocks(k: int, dot_dtype: torch.dtype, precision: str) -> Tuple[int, int, int, int]:
    """(BLOCK_K, BLOCK_P, BLOCK_Q, num_warps). The accumulator is BLOCK_K x BLOCK_P fp32 in
    registers; see the module docstring for the compiled figures behind these choices."""
    block_k = 64 if k > 32 else (32 if k > 16 else 16)  # tl.dot needs every block >= 16
    if precision == "ieee":
        # FFMA dot: each thread holds its accumulator's rows of A and columns of B over the whole
        # BLOCK_Q; 64 x 64 x 16 over 8 warps is 128 registers, 64 x 64 x 32 over 4 warps spilled.
        return block_k, 64, 16, 8
    # Tensor cores (fp16/bf16, TF32): 64 x 128 over 8 warps, 101-128 registers.
    return block_k, 128, 32, 8


def launch(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor, out: torch.Tensor,
            compile_only: bool = False, blocks: Optional[Tuple[int, int, int, int]] = None):
    """Run the kernel: (B, Q, K+1), (B, Q, h, w) -> out (B, K, h, w) fp32 contiguous, returned.
    ``blocks`` (BLOCK_K, BLOCK_P, BLOCK_Q, num_warps) overrides ``default_blocks`` (tests, sweeps).
    ``compile_only``: compile for the active triton target and return the ``CompiledKernel``
    without launching (``benchmarks/aot.py``, with meta tensors)."""
    ml = masks_queries_logits.contiguous()
    b, q, c = class_queries_logits.shape
    k = c - 1
    hw = ml.shape[2] * ml.shape[3]
    operand_dtype = dot_dtype(ml.dtype)
    precision = dot_precision(operand_dtype)
    # The class softmax once per call (B x Q x (K+1): 15k values for an ADE20K image), laid out
    # (B, K, Q) for the dot; recomputing it in every (pixel, class) block, as this kernel first
    # did, was ~1600 softmaxes per 640x853 image and 255 registers with spills.
    probs = torch.softmax(class_queries_logits, dim=-1, dtype=torch.float32)[..., :-1]
    probs = probs.transpose(1, 2).to(operand_dtype).contiguous()
    block_k, block_p, block_q, num_warps = blocks or default_blocks(k, operand_dtype, precision)
    kernel = _build_kernel()
    grid = (triton.cdiv(hw, block_p), triton.cdiv(k, block_k), b)
    interpret = _ext.triton_interpret_mode()
    args = (probs, ml, out, q, k, hw)
    # enable_fp_fusion explicit (triton 3.10 turns the default off): the sigmoid's arithmetic may
    # fuse; the parity bar allows either rounding.
    meta = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_P=block_p, DOT_PRECISION=precision,
                UPCAST_DOT=interpret and operand_dtype == torch.bfloat16, num_warps=num_warps, enable_fp_fusion=True)
    if compile_only:
        return kernel.warmup(*args, grid=grid, **meta)
    if b and hw:
        kernel[grid](*args, **meta)
    return out


@torch.library.custom_op("maskformer::mask_einsum_triton", mutates_args=())
def _mask_einsum_triton_op(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    reasons = not_supported_reasons(class_queries_logits, masks_queries_logits)
    if reasons:
        raise ValueError("maskformer::mask_einsum_triton cannot run: " + "; ".join(reasons))
    b, q, c = class_queries_logits.shape
    out = torch.empty((b, c - 1) + tuple(masks_queries_logits.shape[2:]), device=masks_queries_logits.device,
                      dtype=torch.float32)
    return launch(class_queries_logits, masks_queries_logits, out)


@_mask_einsum_triton_op.register_fake
def _mask_einsum_triton_fake(class_queries_logits, masks_queries_logits):
    check_args(class_queries_logits, masks_queries_logits)
    b, q, c = class_queries_logits.shape
    return masks_queries_logits.new_empty((b, c - 1) + tuple(masks_queries_logits.shape[2:]), dtype=torch.float32)


def mask_einsum(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """Fused semantic class scores (Triton), ``torch.ops.maskformer.mask_einsum_triton``.

    Args and result as ``mask_einsum_ref``: (B, Q, K+1), (B, Q, h, w) -> (B, K, h, w) fp32 (fp32
    math for every input dtype). Raises ValueError with ``not_supported_reasons`` when it cannot run
    (and for tensors on different devices). Tensors all on the meta device give a meta result (the
    op's fake kernel: shape propagation).
    """
    check_args(class_queries_logits, masks_queries_logits)
    return torch.ops.maskformer.mask_einsum_triton(class_queries_logits, masks_queries_logits)


def mask_einsum_cpp(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """Fused semantic class scores on CPU (``csrc/semantic.cpp``), ``torch.ops.maskformer.mask_einsum``.

    Args and result as ``mask_einsum_ref``: (B, Q, K+1), (B, Q, h, w) fp32/fp16/bf16 CPU tensors ->
    (B, K, h, w) fp32. Raises ValueError with ``cpp_not_supported_reasons`` when it cannot run.
    """
    _devices.check_same_device("mask_einsum", class_queries_logits=class_queries_logits,
                               masks_queries_logits=masks_queries_logits)
    reasons = cpp_not_supported_reasons(class_queries_logits, masks_queries_logits)
    if reasons:
        raise ValueError("maskformer::mask_einsum (C++) cannot run: " + "; ".join(reasons))
    return torch.ops.maskformer.mask_einsum(class_queries_logits, masks_queries_logits)


def _mask_einsum_cpp_fake(class_queries_logits, masks_queries_logits):
    """Fake (and Meta) kernel of the C++ ``maskformer::mask_einsum``."""
    _devices.check_same_device("maskformer::mask_einsum", class_queries_logits=class_queries_logits,
                               masks_queries_logits=masks_queries_logits)
    b, q, k1 = class_queries_logits.shape
    return masks_queries_logits.new_empty((b, k1 - 1) + tuple(masks_queries_logits.shape[2:]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time launches (benchmarks/aot.py)
# ---------------------------------------------------------------------------------------------


def _aot_launch(batch: int, queries: int, classes: int, mh: int, mw: int, dtype: str, tf32: Optional[bool]) -> AOTLaunch:
    dt = getattr(torch, dtype)

    def compile_():
        cl = torch.empty(batch, queries, classes + 1, device="meta", dtype=dt)
        ml = torch.empty(batch, queries, mh, mw, device="meta", dtype=dt)
        out = torch.empty(batch, classes, mh, mw, device="meta", dtype=torch.float32)
        with _ext.tf32_matmul(bool(tf32)):
            return launch(cl, ml, out, compile_only=True)

    config = dict(B=batch, Q=queries, K=classes, masks=f"{mh}x{mw}", dtype=DTYPE_LABELS[dtype])
    if dtype == "float32":
        config["tf32"] = bool(tf32)
    return AOTLaunch("mask_einsum", config, compile_, tensor_cores=dtype != "float32" or bool(tf32))


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles. Full: every post-processing head
    (``POSTPROCESS_HEADS``) with masks at a quarter of each input size (``IMAGES``), batch 1 and 2,
    each dtype, fp32 under both TF32 settings. CI: ADE20K (100 queries, 150 classes) at 640x853 and
    the default model (8 queries, 4 classes) at 512x683, batch 2, the same dtypes and settings."""
    shapes = ([(q, k, image, batch) for q, k in POSTPROCESS_HEADS for image in IMAGES for batch in (1, 2)] if full
              else [(100, 150, (640, 853), 2), (8, 4, (512, 683), 2)])
    out = []
    for queries, classes, image, batch in shapes:
        mh, mw = -(-image[0] // 4), -(-image[1] // 4)
        for dtype in AOT_DTYPES:
            for tf32 in ((False, True) if dtype == "float32" else (None,)):
                out.append(_aot_launch(batch, queries, classes, mh, mw, dtype, tf32))
    return out


OP = Op(
    name="mask_einsum",
    reference=mask_einsum_ref,
    check=check_args,
    description="semantic class scores, softmax + sigmoid + query contraction fused: (B, Q, K+1), (B, Q, h, w) -> "
                "(B, K, h, w) fp32",
    role="semantic post-processing",
    tasks=(),  # the semantic task runs it inside semantic_segmentation, never on its own
    impls=(
        Impl("triton", mask_einsum, devices=("cuda",), dtypes=_KERNEL_DTYPES, reasons=not_supported_reasons),
        Impl("cpp", mask_einsum_cpp, devices=("cpu",), dtypes=_KERNEL_DTYPES, reasons=cpp_not_supported_reasons),
    ),
    fakes={"maskformer::mask_einsum": _mask_einsum_cpp_fake},
    aot_launches=aot_launches,
)


# ---------------------------------------------------------------------------------------------
# Inputs that look like a trained MaskFormer's (tests and benchmarks)
# ---------------------------------------------------------------------------------------------


def make_realistic_logits(
    batch: int,
    queries: int,
    classes: int,
    height: int,
    width: int,
    *,
    n_objects: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (class_queries_logits (B, Q, K+1), masks_queries_logits (B, Q, h, w)).

    Like a trained model's outputs: ``n_objects`` confident queries (default min(Q, 12)) each own one
    Voronoi region of the image (mask logit +6 inside, -6 outside, N(0, 1.5) noise) and one clear
    class (logit +10 over N(0, 1) others, no-object logit -6); every other query predicts "no
    object" (logit +6) with a mask near -8. Region boundaries are sharp at mask resolution, so
    after upsampling two classes cross between source pixels - where argmax ties and rounding
    matter.
    """
    gen = torch.Generator().manual_seed(seed)
    n_obj = max(1, min(queries, 12 if n_objects is None else n_objects))
    cls = torch.randn(batch, queries, classes + 1, generator=gen)
    cls[..., classes] += 6.0
    masks = torch.randn(batch, queries, height, width, generator=gen) * 0.5 - 8.0
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    for b in range(batch):
        centres = torch.rand(n_obj, 2, generator=gen)
        owner = torch.stack([(ys - cy) ** 2 + (xs - cx) ** 2 for cy, cx in centres.tolist()]).argmin(0)
        chosen = torch.randperm(queries, generator=gen)[:n_obj].tolist()
        labels = torch.randint(0, classes, (n_obj,), generator=gen).tolist()
        for i, q in enumerate(chosen):
            cls[b, q, classes] -= 12.0
            cls[b, q, labels[i]] += 10.0
            noise = torch.randn(height, width, generator=gen) * 1.5
            masks[b, q] = torch.where(owner == i, 6.0, -6.0) + noise
    return cls.to(device=device, dtype=dtype), masks.to(device=device, dtype=dtype)
