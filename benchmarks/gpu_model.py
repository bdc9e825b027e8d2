"""`python -m benchmarks.gpu_model`: what a GPU would spend on MaskFormer, computed without one.

    python -m benchmarks.gpu_model                  # default set -> out/benchmarks/gpu-model.json and .md
    python -m benchmarks.gpu_model --json out.json  # elsewhere (the Markdown beside it; --overwrite replaces)
    python -m benchmarks.gpu_model --models toy --batches 1 --dtypes fp32 --host-us-per-op 40 --efficiency 0.5

For each implementation (``transformers-eager``: transformers' MaskFormerForInstanceSegmentation
and its ``post_process_semantic_segmentation``; ``maskformer-reference``: ours with the backend
``reference``; ``maskformer-fast``: ours with ``auto``, which on CUDA runs our Triton ops; the
trace fails if it fell back to the reference) it traces one forward plus semantic
post-processing to the input size on **fake CUDA tensors** (``FakeTensorMode``: shapes, dtypes and
a device, no data, no GPU; on a CPU-only torch ``CudaBindings`` stands in for the CUDA device
guard of the few Tensor methods that take one), the weights cast to the dtype as the end-to-end
benchmark does, and records every op with a ``TorchDispatchMode`` (``OpTracer``):

* **launches**: the CUDA kernels an op makes. Views, allocations and metadata make none; an aten
  op one, unless ``_launches`` says more (a convolution with a bias: cuDNN's kernel and aten's
  bias add; a constant pad: a fill and a copy; a group norm: three). Composite ops (``linear``,
  ``matmul``, ``einsum``, ``contiguous``, ``group_norm``, ...) are decomposed by aten's own C++
  code, as eager CUDA runs them, so a ``reshape`` that copies counts and one that views does not;
  SDPA is one fused kernel. A convolution writes channels-last where cuDNN would. Our Triton ops
  are ``torch.library`` ops: their fake implementations give the shapes, and ``_FUSED_COSTS``,
  keyed by the op's library name (``maskformer::window_attention``, ...), lists the kernels each
  call launches (one per Triton kernel, plus the torch ops inside it, e.g. window attention's
  q/k/v GEMM) with the FLOPs and bytes of the fused work. A library op without an entry is an
  error, not a zero.
* **FLOPs**: ``torch.utils.flop_counter``'s formulas (GEMMs, convolutions); attention and our fused
  ops by the same rule (2 per multiply-add); pointwise ops and reductions count none.
* **bytes**: every tensor operand read once and every output written once (a broadcast dimension
  once): a lower bound on the traffic to HBM.
* **syncs**: host reads of device values (``.item()``, ``bool()``), answered True when boolean
  (the finite checks) and refused otherwise.

Each kernel has a class: matmul/conv, attention (everything inside an attention module except
its Linear projections, and fused attention), norms, elementwise, copies/permutes, and
post-processing (everything the post-processing call runs).

Time on a device (``DEVICES``: H100, H200) is a roofline per kernel and a simulation of the host
issuing them (``simulate``): a kernel takes ``max(flops / peak(unit), bytes / bandwidth) /
efficiency``, at least the launch floor, the unit being fp32 CUDA cores for fp32 GEMMs (torch's
default: no TF32), TF32 for fp32 convolutions (cuDNN's default), bf16 tensor cores for bf16.
Eager: the host spends ``host_us_per_op`` issuing each op; a kernel starts once issued and the
GPU is free; a sync makes the host wait. CUDA graphs: the forward is one graph
(``maskformer.CUDAGraphRunner``: one issue for the input copy, one for the replay, the kernels
back to back); the input check and the post-processing stay eager. Both as the end-to-end
benchmark times an iteration: forward, sync, post-processing, sync.

Calibration: ``host_us_per_op`` and ``efficiency`` are fitted (``fit_constants``: the smallest
largest relative error) on the measured H200 rows of transformers fp32 in
``benchmarks/results/gpu-report-2026-11-26-h200/run1`` (read from its JSON files, with their input
sizes) and written to the JSON with their ``calibration`` rows; the peaks and bandwidths are
measured or datasheet figures (``DEVICES``); the launch floor is assumed (``--launch-floor-us``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, dispatch, reporting
from maskformer._ext import cpu_model, tf32_matmul_allowed
from maskformer.bench import MODELS as BENCH_MODELS
from maskformer.inputs import check_finite
from maskformer.kernels import registry
from maskformer.kernels.nan_inf_flags import reset_flag_words

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MEASURED_DIR = os.path.join(HERE, "results", "gpu-report-2026-11-26-h200", "run1")

IMPLS = ("transformers-eager", "maskformer-reference", "maskformer-fast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLASSES = ("matmul/conv", "attention", "norms", "elementwise", "copies/permutes", "post-processing")


# ---------------------------------------------------------------------------------------------
# What one traced op costs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Kernel:
    """One kernel launch: ``math`` is the unit its FLOPs run on ("fp32", "tf32", "bf16"; None when
    it has none), ``cls`` one of ``CLASSES``."""

    name: str
    cls: str
    flops: float
    bytes: float
    math: Optional[str] = None


@dataclasses.dataclass
class Op:
    """One traced op: the phase it ran in ("input-check", "forward", "postprocess"), its CUDA
    kernels (none for an op on CPU tensors), the calls the host makes to issue it in eager mode
    (one per aten op, however many kernels it makes; one per kernel of a library op, whose torch
    ops and Triton launchers are separate Python calls), and whether the host then waits for the
    GPU (a device-to-host read)."""

    name: str
    phase: str
    kernels: List[Kernel]
    sync: bool = False
    issues: int = 1


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements, a broadcast (stride 0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= int(size)
    return n * t.element_size()


def _math(dtype: torch.dtype, kind: str) -> str:
    """The unit a GEMM ("matmul"), convolution ("conv") or attention ("attention") of ``dtype``
    runs on, under torch's settings in this process (their defaults: fp32 matmuls exact, fp32
    cuDNN convolutions TF32; the H200 run reported ``tf32_matmul_allowed: false`` and left cuDNN's)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    if kind == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    if kind == "matmul":
        return "tf32" if tf32_matmul_allowed() else "fp32"
    return "fp32"


# aten ops that launch nothing on CUDA beyond what `func.is_view` already covers: allocations,
# metadata, host-side choices.
_FREE_OPS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_fused_sdp_choice", "aten::lift_fresh", "aten::detach", "aten::alias", "aten::resize_",
    "aten::set_", "aten::_has_compatible_shallow_copy_type", "aten::is_same_size", "aten::sym_size",
    "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_contiguous",
    "aten::_unsafe_view", "aten::as_strided_", "aten::_reshape_alias", "aten::detach_",
}
_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_CONV_OPS = {"aten::convolution", "aten::_convolution", "aten::cudnn_convolution"}
_ATTENTION_OPS = {"aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                  "aten::_scaled_dot_product_cudnn_attention", "aten::_efficient_attention_forward",
                  "aten::_flash_attention_forward", "aten::_scaled_dot_product_flash_attention_for_cpu"}
_NORM_OPS = {"aten::native_layer_norm", "aten::native_group_norm", "aten::native_batch_norm",
             "aten::_native_batch_norm_legit_no_training"}
_COPY_OPS = {"aten::clone", "aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::roll",
             "aten::constant_pad_nd", "aten::index", "aten::index_select", "aten::gather", "aten::_unsafe_index",
             "aten::repeat", "aten::permute_copy", "aten::expand_copy", "aten::flip", "aten::_unsafe_view_copy"}
# Outputs these ops write without reading them first.
_WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::random_"}


def _launches(name: str, args, kwargs) -> int:
    """Kernels one aten op launches on CUDA (torch 2.x sources named)."""
    if name in _CONV_OPS:
        # aten/src/ATen/native/Convolution.cpp: cuDNN's convolution, then `output.add_(bias)`.
        return 2 if len(args) > 2 and args[2] is not None else 1
    if name == "aten::constant_pad_nd":
        # native/PadNd.cpp: an empty output, `fill_(value)`, then the input copied into its middle.
        return 2 if any(p > 0 for p in args[1]) else 1
    if name == "aten::native_group_norm":
        # native/cuda/group_norm_kernel.cu: RowwiseMoments, ComputeFusedParams, then the apply.
        return 3
    return 1


def _aten_kernels(func, args, kwargs, out, cls: str) -> List[Kernel]:
    """The kernels of one (non-view) aten op: launches, FLOPs (flop_counter) and bytes."""
    name = func._schema.name
    schema_args = func._schema.arguments
    written, read = [], []
    for i, a in enumerate(schema_args):
        value = args[i] if i < len(args) else kwargs.get(a.name)
        tensors = _tensors(value)
        if a.alias_info is not None and a.alias_info.is_write:
            written += tensors
            if name not in _WRITE_ONLY:
                read += tensors
        else:
            read += tensors
    written += _tensors(out)
    unique_read = {id(t): t for t in read}
    unique_written = {id(t): t for t in written}
    nbytes = sum(_nbytes(t) for t in unique_read.values()) + sum(_nbytes(t) for t in unique_written.values())
    # torch.utils.flop_counter imports triton (through torch._inductor): only once tracing starts.
    from torch.utils.flop_counter import flop_registry

    flops = 0.0
    packet = func.overloadpacket
    if packet in flop_registry:
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
    kind = "conv" if name in _CONV_OPS else "matmul" if name in _MATMUL_OPS else "attention"
    dtype = next((t.dtype for t in _tensors(args) if t.is_floating_point()), torch.float32)
    math_unit = _math(dtype, kind) if flops else None
    n = _launches(name, args, kwargs)
    if n == 1:
        return [Kernel(name, cls, flops, nbytes, math_unit)]
    if name in _CONV_OPS:
        bias = args[2]
        out_t = _tensors(out)[0]
        add_bytes = 2 * _nbytes(out_t) + _nbytes(bias)
        return [Kernel(name, cls, flops, nbytes, math_unit),
                Kernel(name + " (bias add)", "elementwise", 0.0, add_bytes)]
    # Other multi-kernel ops: the bytes once over the first kernel, the rest touch little (a lower bound).
    return [Kernel(name, cls, flops, nbytes, math_unit)] + [Kernel(name, cls, 0.0, 0.0) for _ in range(n - 1)]


# ---------------------------------------------------------------------------------------------
# Our torch.library ops: the launches each call makes, by the op's library name
# ---------------------------------------------------------------------------------------------
# Each entry reads the op's (fake) arguments and lists its kernels as its implementation in
# kernels/<op>.py launches them; keep it in step when an op's implementation changes.


def _window_attention_cost(args, kwargs, out) -> List[Kernel]:
    """kernels/window_attention.py ``_window_attention_impl``: one q/k/v GEMM (F.linear, cuBLAS
    with the bias in its epilogue) into (B, H, W, 3C), then one Triton launch that reads it with
    the dense (heads, N, N) bias and writes (B, H, W, C); a raw bias table is expanded first
    (``dense_relative_position_bias``, three launches; the model passes the dense form)."""
    x, weight, bias, table, window, shift, heads = args[:7]
    b, h, w, c = x.shape
    e = x.element_size()
    tokens = b * h * w
    qkv_bytes = tokens * 3 * c * e
    gemm = Kernel("maskformer::window_attention (q/k/v GEMM)", "matmul/conv", 2.0 * tokens * c * 3 * c,
                  tokens * c * e + _nbytes(weight) + (_nbytes(bias) if bias is not None else 0) + qkv_bytes,
                  _math(x.dtype, "matmul"))
    n = window * window
    padded = b * (-(-h // window) * window) * (-(-w // window) * window)  # tokens of the padded map
    head_dim = c // heads
    # q.k^T and p.v over every (padded) window and head: 2 * 2 * N * N * d per window and head.
    attn_flops = 4.0 * (padded // n) * heads * n * n * head_dim
    kernels = []
    if table.dim() == 2:
        # dense_relative_position_bias: the (N, N) int64 index copied to the device, the gather
        # into (N, N, heads), the permuted copy into (heads, N, N).
        dense = heads * n * n * table.element_size()
        kernels += [Kernel("maskformer::window_attention (bias index copy)", "attention", 0.0, 2 * n * n * 8),
                    Kernel("maskformer::window_attention (bias gather)", "attention", 0.0,
                           _nbytes(table) + n * n * 8 + dense),
                    Kernel("maskformer::window_attention (bias permute)", "attention", 0.0, 2 * dense)]
        bias_bytes = dense
    else:
        bias_bytes = _nbytes(table)
    kernels.append(Kernel("maskformer::window_attention (kernel)", "attention", attn_flops,
                          qkv_bytes + bias_bytes + tokens * c * e, _math(x.dtype, "matmul")))
    return [gemm] + kernels


def _mask_einsum_cost(args, kwargs, out) -> List[Kernel]:
    """kernels/mask_einsum.py ``_launch``: the class softmax (torch, fp32), its (B, K, Q) copy in
    the dot's dtype, the mask logits made contiguous when they are not, then one Triton launch:
    sigmoid of (B, Q, h, w) and the (K x Q) @ (Q x hw) product per image into (B, K, h, w) fp32."""
    cl, ml = args[:2]
    b, q, k1 = cl.shape
    k = k1 - 1
    hw = ml.shape[2] * ml.shape[3]
    dot_e = 2 if ml.dtype in (torch.float16, torch.bfloat16) else 4
    kernels = [Kernel("maskformer::mask_einsum_triton (class softmax)", "elementwise", 0.0,
                      _nbytes(cl) + b * q * k1 * 4),
               Kernel("maskformer::mask_einsum_triton (probs copy)", "copies/permutes", 0.0,
                      b * q * k * 4 + b * k * q * dot_e)]
    if not ml.is_contiguous():
        kernels.append(Kernel("maskformer::mask_einsum_triton (masks copy)", "copies/permutes", 0.0, 2 * _nbytes(ml)))
    kernels.append(Kernel("maskformer::mask_einsum_triton (kernel)", "matmul/conv", 2.0 * b * k * q * hw,
                          _nbytes(ml) + b * k * q * dot_e + b * k * hw * 4, _math(ml.dtype, "matmul")))
    return kernels


def _upsample_argmax_cost(args, kwargs, out) -> List[Kernel]:
    """kernels/upsample_argmax.py ``_upsample_argmax_triton_op``: one image, one Triton launch
    (after a copy when the columns are strided): every output pixel interpolates its 4 taps for
    each class (8 fp32 FLOPs on the CUDA cores) and keeps the argmax; reads the (K, h, w) scores
    once, writes the (H, W) labels."""
    scores, labels = args[:2]
    k = scores.shape[0]
    kernels = []
    if scores.stride(-1) != 1:
        kernels.append(Kernel("maskformer::upsample_argmax_triton (copy)", "copies/permutes", 0.0, 2 * _nbytes(scores)))
    kernels.append(Kernel("maskformer::upsample_argmax_triton (kernel)", "elementwise",
                          8.0 * k * labels.numel(), _nbytes(scores) + _nbytes(labels), "fp32"))
    return kernels


def _fused_linear_cost(args, kwargs, out) -> List[Kernel]:
    """kernels/fused_linear.py ``_fused_linear_op``: one Triton GEMM launch, ``act(x @ W^T + b) +
    residual``: 2 M N K FLOPs on the matmul unit of x's dtype; x, W, the bias and the residual read
    once, the (M, N) output written once (the GELU and the add cost no traffic of their own)."""
    x, weight, bias, activation, residual = args[:5]
    n, k = weight.shape
    m = x.numel() // max(k, 1)
    nbytes = _nbytes(x) + _nbytes(weight) + _nbytes(out) + sum(_nbytes(t) for t in (bias, residual) if t is not None)
    return [Kernel("maskformer::fused_linear", "matmul/conv", 2.0 * m * n * k, nbytes, _math(x.dtype, "matmul"))]


def _nan_inf_flags_cost(args, kwargs, out) -> List[Kernel]:
    """kernels/nan_inf_flags.py ``_nan_inf_flags_triton_op``: one Triton launch reading x (and y)
    once, ORing into a 4-byte flag word (the caller's one read is the ``.item()`` after it)."""
    x, y, flags = args[:3]
    return [Kernel("maskformer::nan_inf_flags_triton", "elementwise", 0.0,
                   _nbytes(x) + (_nbytes(y) if y is not None else 0) + _nbytes(flags))]


def _sdpa_cost(args, kwargs, out) -> List[Kernel]:
    """``F.scaled_dot_product_attention`` as one fused kernel (flash or memory-efficient attention,
    what torch picks on an H100/H200 for these shapes and dtypes, with or without a mask; not
    decomposed, since the choice a CPU-only torch makes for a fake CUDA tensor is its math
    fallback): q.k^T and p.v, 2 * 2 * Lq * Lk * D per batch and head; q, k, v, the mask and the
    output once."""
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    flops = 4.0 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
    nbytes = sum(_nbytes(t) for t in (q, k, v, out)) + (_nbytes(mask) if isinstance(mask, torch.Tensor) else 0)
    return [Kernel("aten::scaled_dot_product_attention", "attention", flops, nbytes, _math(q.dtype, "attention"))]


# aten composite ops recorded whole, with their own cost, instead of decomposed.
_WHOLE_OPS: Dict[str, Callable[..., List[Kernel]]] = {"aten::scaled_dot_product_attention": _sdpa_cost}

_FUSED_COSTS: Dict[str, Callable[..., List[Kernel]]] = {
    "maskformer::window_attention": _window_attention_cost,
    "maskformer::mask_einsum_triton": _mask_einsum_cost,
    "maskformer::upsample_argmax_triton": _upsample_argmax_cost,
    "maskformer::fused_linear": _fused_linear_cost,
    "maskformer::nan_inf_flags_triton": _nan_inf_flags_cost,
}


# ---------------------------------------------------------------------------------------------
# Tracing on fake CUDA tensors
# ---------------------------------------------------------------------------------------------


class OpTracer(TorchDispatchMode):
    """Records every op that reaches it as an ``Op`` in ``ops``.

    aten composite ops are decomposed first by aten's own C++ decomposition (their parts come
    back here), so what is recorded is what eager CUDA launches; ``_WHOLE_OPS`` are recorded
    whole; library ops (``maskformer::*``) are recorded whole and costed by ``_FUSED_COSTS``.
    ``phase`` labels what follows; ``modules`` is the stack of running modules (for the
    attention class); while ``suspended`` ops pass through unrecorded. An op on CPU tensors only is
    host work: recorded with no kernel (but its host issue), except while ``CudaBindings`` runs a
    call on CPU twins of CUDA tensors (``twins``)."""

    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []
        self.phase = "forward"
        self.suspended = 0
        self.twins = 0  # >0: CudaBindings runs a call on CPU twins of CUDA tensors
        self.modules: List[torch.nn.Module] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense":
            return self._scalar(args[0])
        if func.namespace == "aten" and name not in _WHOLE_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"):
            # aten's C++ decomposition, as eager CUDA runs it; not ``func.decompose``, which prefers
            # torch._decomp's Python ones (a bilinear upsample becomes a dozen index and
            # arithmetic ops there).
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
        out = func(*args, **kwargs)
        if name == "aten::convolution":
            out = self._cudnn_layout(args, out)
        elif name == "aten::scaled_dot_product_attention":
            out = self._sdpa_layout(out)
        if not self.suspended:
            self._record(func, args, kwargs, out)
        return out

    def _cudnn_layout(self, args, out: torch.Tensor) -> torch.Tensor:
        """A CPU-only torch selects no cuDNN backend for a fake CUDA convolution, and its fake kernel
        answers NCHW; cuDNN writes channels-last when the input or the weight is channels-last
        (aten's ``cudnn_conv_suggest_memory_format``), which decides whether later ops copy."""
        def channels_last(t):
            return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

        if out.device.type == "cuda" and out.dim() == 4 and not channels_last(out) and (
                channels_last(args[0]) or channels_last(args[1])):
            self.suspended += 1
            try:
                return torch.empty_like(out, memory_format=torch.channels_last)
            finally:
                self.suspended -= 1
        return out

    def _sdpa_layout(self, out: torch.Tensor) -> torch.Tensor:
        """A CPU-only torch answers SDPA on fake CUDA tensors with its math fallback's contiguous
        (B, H, L, D) output; CUDA's flash, memory-efficient and cuDNN attention write (B, L, H, D)
        and return its transposed view, so the usual ``out.transpose(1, 2).reshape(B, L, H * D)``
        after it is a view, not a copy."""
        if out.device.type != "cuda" or out.dim() != 4:
            return out
        self.suspended += 1
        try:
            b, h, length, d = out.shape
            return torch.empty(b, length, h, d, dtype=out.dtype, device=out.device).transpose(1, 2)
        finally:
            self.suspended -= 1

    def _scalar(self, t: torch.Tensor):
        """``.item()`` / ``bool()`` of a fake tensor: a device-to-host copy the host waits for, with
        a made-up value: what the checks of a valid input read. A boolean is answered True (a
        finite-input check's ``all()``), an integer 0 (``nan_inf_flags``: no flag set); a float
        would steer the traced code by data that does not exist, and is refused."""
        if t.dtype != torch.bool and t.is_floating_point():
            raise NotImplementedError(
                f"gpu_model: the traced code reads a {t.dtype} tensor's value on the host (.item()); a fake "
                "tensor has none, so the trace cannot follow data-dependent control flow")
        if not self.suspended:
            on_gpu = bool(self.twins) or t.device.type == "cuda"  # a CPU tensor's value is host work
            kernels = [Kernel("aten::_local_scalar_dense", "elementwise", 0.0, 1.0)] if on_gpu else []
            self._append(Op("aten::_local_scalar_dense", self.phase, kernels, sync=on_gpu))
        return True if t.dtype == torch.bool else 0

    def _class(self, name: str) -> str:
        if name in _ATTENTION_OPS:
            return "attention"
        innermost = self.modules[-1] if self.modules else None
        # transformers' MaskFormerDetr{Self,Cross}Attention and MaskFormerSwin{Self,}Attention, our
        # DetrAttention and Swin{Self,}Attention: the modules named for what they compute
        if any(type(m).__name__.endswith("Attention") for m in self.modules) and not isinstance(
                innermost, torch.nn.Linear):
            return "attention"
        if name in _MATMUL_OPS or name in _CONV_OPS:
            return "matmul/conv"
        if name in _NORM_OPS:
            return "norms"
        if name in _COPY_OPS:
            return "copies/permutes"
        return "elementwise"

    def _record(self, func, args, kwargs, out) -> None:
        name = func._schema.name
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if func.namespace == "prim" or func.is_view or name in _FREE_OPS or not (_tensors(out) or writes):
            return  # no kernel: a view, an allocation, metadata
        if name == "aten::copy_" and args[0] is args[1]:
            return
        if not self.twins and not any(t.device.type == "cuda" for t in _tensors((args, kwargs, out))):
            self._append(Op(name, self.phase, []))  # host work on CPU tensors: no kernel
            return
        if func.namespace != "aten":
            cost = _FUSED_COSTS.get(name)
            if cost is None:
                raise NotImplementedError(
                    f"gpu_model: no cost for the library op {name!r}; add its launches, FLOPs and bytes to "
                    "_FUSED_COSTS in benchmarks/gpu_model.py (one entry per torch.library op)")
            kernels = cost(args, kwargs, out)
            self._append(Op(name, self.phase, kernels, issues=len(kernels)))
            return
        if name in _WHOLE_OPS:
            kernels = _WHOLE_OPS[name](args, kwargs, out)
        else:
            kernels = _aten_kernels(func, args, kwargs, out, self._class(name))
        self._append(Op(name, self.phase, kernels))

    def _append(self, op: Op) -> None:
        if op.phase == "postprocess":
            op.kernels = [dataclasses.replace(k, cls="post-processing") for k in op.kernels]
        self.ops.append(op)


class CudaBindings(TorchFunctionMode):
    """A stand-in for the CUDA device guard that a CPU-only torch does not have.

    Ops on fake CUDA tensors reach the fake kernels through the dispatcher without a device
    guard, but a few Python bindings of Tensor methods take one themselves (``contiguous`` of a
    non-contiguous tensor, ``__getitem__``, ``__setitem__``, ``copy_``) and fail with "PyTorch is
    not linked with support for cuda devices" before dispatching anything. Such a call is run
    again on fake CPU twins of its fake CUDA tensors (same sizes, strides and dtypes; the aten ops
    it dispatches are recorded as any other; what the failed attempt recorded is dropped), and
    its tensor results come back as fake CUDA tensors of the same sizes and strides. Fake tensors
    hold no data, so nothing but that metadata is lost (views come back as separate tensors)."""

    def __init__(self, tracer: OpTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mark = len(self.tracer.ops)
        try:
            return func(*args, **kwargs)
        except RuntimeError as error:
            if "not linked with support for cuda" not in str(error):
                raise
        del self.tracer.ops[mark:]
        twins = self._restrided((args, kwargs), "cpu")
        self.tracer.twins += 1
        try:
            out = func(*twins[0], **twins[1])
        finally:
            self.tracer.twins -= 1
        return self._restrided(out, "cuda")

    def _restrided(self, tree, device: str):
        def convert(t):
            if isinstance(t, FakeTensor) and t.device.type != device:
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            return t

        self.tracer.suspended += 1
        try:
            return tree_map(convert, tree)
        finally:
            self.tracer.suspended -= 1


@contextlib.contextmanager
def _module_stack(stack: List[torch.nn.Module]):
    """Keep ``stack`` = the modules whose forward is running (global hooks, removed on exit)."""
    from torch.nn.modules import module as module_mod

    def enter(module, args):
        stack.append(module)

    def leave(module, args, output):
        stack.pop()  # returns None: a hook's non-None return would replace the module's output

    pre = module_mod.register_module_forward_pre_hook(enter)
    post = module_mod.register_module_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@contextlib.contextmanager
def tracing(fake_mode: Optional[FakeTensorMode] = None):
    """Inside: fake tensors (``torch.empty(..., device="cuda")`` works without a GPU; a CPU-only
    torch too, through ``CudaBindings``), inference mode, and an ``OpTracer`` (yielded) recording
    every op. ``fake_mode``: the mode whose fake tensors the block uses (a new one by default)."""
    tracer = OpTracer()
    with warnings.catch_warnings():
        # Our layers' caches of fused q/k/v weights key on data_ptr(), which a fake tensor answers
        # with 0 and a warning; every layer keeps its own cache, so the key still tells a warm one.
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        with fake_mode or FakeTensorMode(), tracer, CudaBindings(tracer), _module_stack(tracer.modules), \
                torch.inference_mode():
            yield tracer


def fake_cuda_module(module: torch.nn.Module, fake_mode: FakeTensorMode, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every parameter and buffer of ``module`` (built on the meta device) by a fake CUDA
    tensor of ``fake_mode`` with the same shape and strides, floating ones in ``dtype``."""
    with fake_mode:
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    fake = torch.empty_strided(t.shape, t.stride(), dtype=dtype if t.is_floating_point() else t.dtype,
                                               device="cuda")
                    table[name] = torch.nn.Parameter(fake, requires_grad=False) if table is m._parameters else fake
    return module


# ---------------------------------------------------------------------------------------------
# The models and one traced iteration
# ---------------------------------------------------------------------------------------------
# Phases only a CUDA graph runs (``maskformer.CUDAGraphRunner``'s captured input check), instead of
# the eager "input-check": left out of the counts, which describe the eager iteration.
GRAPH_ONLY = ("graph-input-check",)
# name -> (maskformer.bench architecture, default input (H, W)): the ADE20K Swin-T / Swin-L of the
# end-to-end benchmark (150 labels, 100 queries); "toy" is its seconds-long test model.
MODELS = {"swin-tiny": ("tiny", (512, 683)), "swin-large": ("large", (640, 640)), "toy": ("toy", (96, 128))}


@dataclasses.dataclass
class Trace:
    """One traced iteration: what ran (``impl``, ``model``, batch, dtype, input size) and its ops;
    ``input_bytes``: the pixel values' size (what a CUDA graph's input copy moves)."""

    impl: str
    model: str
    batch: int
    dtype: str
    height: int
    width: int
    ops: List[Op]
    input_bytes: int

    def kernels(self) -> List[Kernel]:
        """The eager iteration's kernels (``GRAPH_ONLY`` phases left out)."""
        return [k for op in self.ops if op.phase not in GRAPH_ONLY for k in op.kernels]


def hf_config(model: str):
    """transformers' MaskFormerConfig for ``model`` (random init, no hub), as ``maskformer.bench``
    builds it for its checkpoints."""
    from transformers import DetrConfig, SwinConfig  # the oracle: a test-time dependency, slow to import
    from transformers import MaskFormerConfig as HFConfig

    spec = BENCH_MODELS[MODELS[model][0]]
    fpn = spec.get("fpn", 256)
    return HFConfig(
        backbone_config=SwinConfig(image_size=384, out_features=["stage1", "stage2", "stage3", "stage4"],
                                   **spec["backbone"]),
        decoder_config=DetrConfig(**spec.get("decoder", {})),
        fpn_feature_size=fpn, mask_feature_size=fpn, id2label={i: f"class_{i}" for i in range(150)})


def trace(impl: str, model: str, batch: int, dtype: str, height: int, width: int) -> Trace:
    """One forward + semantic post-processing to (height, width) of ``impl`` on fake CUDA tensors:
    pixel_values (batch, 3, height, width) and the weights in ``dtype`` ("fp32", "bf16").

    maskformer impls run one untraced iteration first (it fills the per-shape caches: fused q/k/v
    weights, dense biases, shift masks, as the benchmark's warm-up does), then the traced one;
    their NaN check on the input is its own phase ("input-check": it stays outside a CUDA
    graph). transformers' model is built from its config on the meta device and cast as the
    benchmark does (``.to(dtype)``)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    config = hf_config(model)
    ours = impl.startswith("maskformer")
    if ours:
        with torch.device("meta"):
            net = MaskFormerForInstanceSegmentation(MaskFormerConfig.from_dict(config.to_dict())).eval()
        net.check_finite = False  # traced as the "input-check" phase
        processor = MaskFormerImageProcessor()
        backend = dispatch.backend("reference" if impl == "maskformer-reference" else "auto")
    else:
        # transformers: the oracle, a test-time dependency (several seconds to import)
        from transformers import MaskFormerForInstanceSegmentation as HFModel

        try:  # transformers 5: the post-processing of the torchvision-backed class, without torchvision
            from transformers import MaskFormerImageProcessorPil as HFProcessor
        except ImportError:
            from transformers import MaskFormerImageProcessor as HFProcessor
        with torch.device("meta"):
            net = HFModel(config).eval()
        processor = HFProcessor()
        backend = contextlib.nullcontext()
    fake_mode = FakeTensorMode()
    fake_cuda_module(net, fake_mode, DTYPES[dtype])
    reset_flag_words()  # the check's cached flag word of an earlier trace is another mode's fake tensor
    sizes = [(height, width)] * batch
    with tracing(fake_mode) as tracer, backend:
        x = torch.empty(batch, 3, height, width, dtype=DTYPES[dtype], device="cuda")
        if ours:
            tracer.suspended += 1
            try:
                processor.post_process_semantic_segmentation(net(pixel_values=x), target_sizes=sizes)
            finally:
                tracer.suspended -= 1
            tracer.phase = "input-check"
            decided = {op: dispatch.last_dispatch(op) for op in registry.names()}
            check_finite(x)
            # CUDAGraphRunner's input check: these kernels are captured with the forward and read
            # once after the replay; only the CUDA-graph simulation runs this phase (GRAPH_ONLY).
            tracer.phase = "graph-input-check"
            bool(torch.isfinite(x).all())
        tracer.phase = "forward"
        out = net(pixel_values=x)
        tracer.phase = "postprocess"
        processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    if impl == "maskformer-fast":
        # auto falls back to the reference silently; a "fast" row that did would be a wrong result.
        # The decisions of this iteration (records are per thread, and older ones stay).
        latest = [dispatch.last_dispatch(op) for op in registry.names()]
        fell_back = [str(r) for op, r in zip(registry.names(), latest)
                     if r is not None and r is not decided[op] and r.backend != "triton"]
        if fell_back:
            raise RuntimeError("gpu_model: maskformer-fast did not run the Triton ops on (fake) CUDA tensors: "
                               + "; ".join(fell_back))
    return Trace(impl, model, batch, dtype, height, width, tracer.ops, x.numel() * x.element_size())


# ---------------------------------------------------------------------------------------------
# Devices and the time model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """A GPU's ceilings: dense peak TFLOP/s per math unit and HBM bandwidth (TB/s, bytes read plus
    written), and where each comes from."""

    name: str
    tflops: Dict[str, float]
    hbm_tbps: float
    sources: str


# bf16 and the bandwidth: measured on this workplace's lent machines (/work/.library/device/
# KINDS.md: an 8192^3 bf16 matmul through PyTorch on random data; a large device-to-device copy,
# bytes read plus written); fp32 (CUDA cores) and dense TF32: NVIDIA's H100 SXM datasheet, whose
# rates the H200 shares (H200.md).
DEVICES = {
    "h100": Device("NVIDIA H100 80GB HBM3 (SXM)", {"fp32": 67.0, "tf32": 495.0, "bf16": 798.0}, 3.0,
                   "bf16 798 TFLOP/s and copy 3.0 TB/s measured here 2026-11-13 (KINDS.md); fp32 67 and "
                   "dense TF32 495 TFLOP/s: H100 SXM datasheet"),
    "h200": Device("NVIDIA H200", {"fp32": 67.0, "tf32": 495.0, "bf16": 788.0}, 4.3,
                   "bf16 788 TFLOP/s and copy 4.3 TB/s measured here 2026-10-28 (KINDS.md); fp32 67 and "
                   "dense TF32 495 TFLOP/s: the H100 SXM datasheet's, which the H200 shares (H200.md)"),
}
# The shortest a kernel takes, the gap to the next one in a stream or a graph included. ASSUMED
# (a small elementwise kernel on Hopper), not measured: no GPU run here had a profiler; the next
# GPU run's CUDA-graph rows measure it. It does not move the calibration (batch 1 is host-bound).
DEFAULT_LAUNCH_FLOOR_US = 2.5


@dataclasses.dataclass(frozen=True)
class Constants:
    """The model's free constants: ``host_us_per_op``, what the host spends issuing one op in
    eager mode (Python, dispatcher, launch), and ``efficiency``, the fraction of peak FLOP/s and
    bandwidth a kernel reaches, are fitted; ``launch_floor_us`` is assumed."""

    host_us_per_op: float
    efficiency: float
    launch_floor_us: float = DEFAULT_LAUNCH_FLOOR_US


def roofline_us(k: Kernel, device: Device) -> float:
    """A kernel's time at the device's peak: the larger of its FLOPs and bytes terms."""
    compute = k.flops / (device.tflops[k.math] * 1e6) if k.flops else 0.0
    return max(compute, k.bytes / (device.hbm_tbps * 1e6))


def kernel_us(k: Kernel, device: Device, c: Constants) -> float:
    """Predicted time of one kernel: its roofline over the efficiency, at least the launch floor."""
    return max(roofline_us(k, device) / c.efficiency, c.launch_floor_us)


@dataclasses.dataclass
class Timeline:
    """A trace on one device, ready to simulate fast: per op (phase, host issues, sync, roofline
    µs of each kernel); ``input_us``: the roofline of a CUDA graph's input copy."""

    steps: List[Tuple[str, int, bool, Tuple[float, ...]]]
    input_us: float

    @classmethod
    def of(cls, tr: Trace, device: Device) -> "Timeline":
        steps = [(op.phase, op.issues, op.sync, tuple(roofline_us(k, device) for k in op.kernels))
                 for op in tr.ops]
        return cls(steps, 2.0 * tr.input_bytes / (device.hbm_tbps * 1e6))


def simulate(timeline: Timeline, c: Constants, graphs: bool = False) -> Dict[str, float]:
    """Predicted milliseconds of one iteration, as the end-to-end benchmark times it: forward, a
    sync, post-processing, a sync. Eager: the host issues each op (``host_us_per_op`` per issue);
    a kernel starts once issued and the GPU is free; a device-to-host read makes the host wait;
    the eager "input-check" phase runs, the graph's ("graph-input-check") does not. ``graphs``:
    the forward is one CUDA graph (``maskformer.CUDAGraphRunner``: one issue for the input copy
    and one for the replay, then the captured input check's kernels and the forward's back to back;
    the check's read is issued after the replay and waits with the benchmark's sync); the eager
    input check does not run; the post-processing stays eager. -> ``ms`` (total), ``gpu_ms``
    (kernels' time), ``host_ms`` (the host's issuing time)."""
    h, e, floor = c.host_us_per_op, c.efficiency, c.launch_floor_us
    host = gpu = busy = issue = 0.0
    previous = None
    replayed = False
    skipped = "input-check" if graphs else "graph-input-check"
    forward_phases = ("graph-input-check", "forward")
    read_issues, read_us = 0, 0.0  # the graph runner's read of its check, after the replay

    def leave_forward():
        nonlocal host, gpu, issue
        gpu += read_us
        host += read_issues * h
        issue += read_issues * h
        host = max(host, gpu)  # the benchmark's sync after the forward

    for phase, issues, sync, roofs in timeline.steps:
        if phase == skipped:
            continue
        if previous in forward_phases and phase not in forward_phases:
            leave_forward()
        previous = phase
        durations = [max(r / e, floor) for r in roofs]
        busy += sum(durations)
        if graphs and phase in forward_phases:
            if not replayed:
                replayed = True
                copy = max(timeline.input_us / e, floor)
                busy += copy
                gpu = max(gpu, host + h) + copy  # static_input.copy_(pixel_values)
                host += 2 * h  # ... and graph.replay()
                issue += 2 * h
            if sync:  # not captured: the read after the replay
                read_issues += issues
                read_us += sum(durations)
            else:
                gpu = max(gpu, host) + sum(durations)
            continue
        host += issues * h
        issue += issues * h
        for d in durations:
            gpu = max(gpu, host) + d
        if sync:
            host = max(host, gpu)
    if previous in forward_phases:
        leave_forward()
    return {"ms": max(host, gpu) / 1e3, "gpu_ms": busy / 1e3, "host_ms": issue / 1e3}


# ---------------------------------------------------------------------------------------------
# Calibration on the measured H200 rows
# ---------------------------------------------------------------------------------------------


def measured_rows(directory: str = MEASURED_DIR) -> List[Dict]:
    """The transformers-eager fp32 rows the H200 run measured (``e2e.json``,
    ``e2e-throughput.json``): model, batch, input (H, W) and the median latency in ms."""
    rows = []
    for name in ("e2e.json", "e2e-throughput.json"):
        with open(os.path.join(directory, name)) as f:
            report = json.load(f)
        for r in report["rows"]:
            if r["impl"] == "transformers-eager" and r["dtype"] == "float32" and "error" not in r:
                rows.append({"model": r["model"], "batch": r["batch"], "input": list(r["input"]),
                             "measured_ms": r["latency_ms"], "device": report["device"],
                             "source": os.path.relpath(os.path.join(directory, name), REPO)})
    if not rows:
        raise ValueError(f"no measured transformers-eager float32 rows in {directory}")
    return rows


def fit_constants(timelines: Sequence[Timeline], measured_ms: Sequence[float],
                  launch_floor_us: float = DEFAULT_LAUNCH_FLOOR_US) -> Constants:
    """``host_us_per_op`` and ``efficiency`` minimising the largest relative error of the eager
    prediction over the measured rows: a log grid over 0.5-500 µs x 0.02-1, refined five times
    around the best point (deterministic; about 1000 simulations)."""
    def worst(h, e):
        c = Constants(h, e, launch_floor_us)
        return max(abs(simulate(t, c)["ms"] / m - 1) for t, m in zip(timelines, measured_ms))

    lo_h, hi_h, lo_e, hi_e = math.log(0.5), math.log(500.0), math.log(0.02), math.log(1.0)
    best = None
    for _ in range(6):
        for i in range(13):
            for j in range(13):
                h = math.exp(lo_h + (hi_h - lo_h) * i / 12)
                e = math.exp(lo_e + (hi_e - lo_e) * j / 12)
                err = worst(h, e)
                if best is None or err < best[0]:
                    best = (err, h, e)
        _, h, e = best
        span_h, span_e = (hi_h - lo_h) / 6, (hi_e - lo_e) / 6
        lo_h, hi_h = math.log(h) - span_h, math.log(h) + span_h
        lo_e, hi_e = math.log(e) - span_e, min(math.log(e) + span_e, 0.0)
    return Constants(round(best[1], 2), round(best[2], 3), launch_floor_us)


# ---------------------------------------------------------------------------------------------
# Rows, the report
# ---------------------------------------------------------------------------------------------
# Swin-T at 512x683 and Swin-L at 640x640 (the issue's targets), and Swin-L at 640x853: the size
# the end-to-end benchmark (maskformer.bench) and so the GPU report measure, whose rows
# benchmarks/gpu_report.py prints beside these predictions (Swin-T's size is the same in both).
DEFAULT_MODELS = (("swin-tiny", 512, 683), ("swin-large", 640, 640), ("swin-large", 640, 853))
# The issue's targets (#23), predicted: maskformer-fast against transformers-eager on this row.
TARGET_ROW = {"model": "swin-large", "input": [640, 640], "batch": 1, "dtype": "bf16", "device": "h100"}
TARGETS = {"launches_ratio": 0.5, "bytes_ratio": 0.7, "graphs_ms_per_image": 4.0}
FLOOR_SENSITIVITY_US = (1.0, 2.5, 4.0)


def _op_kinds(tr: Trace, device: Device, c: Constants) -> Dict[str, Dict[str, float]]:
    """Per op kind ("class: kernel name"): launches, bytes, FLOPs and predicted GPU ms."""
    kinds: Dict[str, Dict[str, float]] = {}
    for k in tr.kernels():
        entry = kinds.setdefault(f"{k.cls}: {k.name}", {"launches": 0, "flops": 0.0, "bytes": 0.0, "gpu_ms": 0.0})
        entry["launches"] += 1
        entry["flops"] += k.flops
        entry["bytes"] += k.bytes
        entry["gpu_ms"] += kernel_us(k, device, c) / 1e3
    return kinds


def summarize(tr: Trace, device_key: str, c: Constants) -> Dict:
    """One JSON row: counts, predicted times (eager and CUDA graphs; per batch and per image), the
    op-class breakdown (launches, FLOPs, bytes, predicted GPU ms) and the per-phase one (input
    check, forward, post-processing: launches, host issues, syncs, GPU ms)."""
    device = DEVICES[device_key]
    timeline = Timeline.of(tr, device)
    eager, graphs = simulate(timeline, c), simulate(timeline, c, graphs=True)
    classes = {cls: {"launches": 0, "flops": 0.0, "bytes": 0.0, "gpu_ms": 0.0} for cls in CLASSES}
    for k in tr.kernels():
        entry = classes[k.cls]
        entry["launches"] += 1
        entry["flops"] += k.flops
        entry["bytes"] += k.bytes
        entry["gpu_ms"] += kernel_us(k, device, c) / 1e3
    phases: Dict[str, Dict[str, float]] = {}
    graph_only: Dict[str, Dict[str, float]] = {}
    for op in tr.ops:
        table = graph_only if op.phase in GRAPH_ONLY else phases
        entry = table.setdefault(op.phase, {"launches": 0, "host_issues": 0, "syncs": 0, "gpu_ms": 0.0})
        entry["launches"] += len(op.kernels)
        entry["host_issues"] += op.issues
        entry["syncs"] += int(op.sync)
        entry["gpu_ms"] += sum(kernel_us(k, device, c) for k in op.kernels) / 1e3
    for entry in list(classes.values()) + list(phases.values()) + list(graph_only.values()):
        entry["gpu_ms"] = round(entry["gpu_ms"], 4)
    kernels = tr.kernels()
    eager_ops = [op for op in tr.ops if op.phase not in GRAPH_ONLY]
    return {
        "model": tr.model, "impl": tr.impl, "batch": tr.batch, "dtype": tr.dtype, "device": device_key,
        "input": [tr.height, tr.width], "launches": len(kernels), "flops": sum(k.flops for k in kernels),
        "bytes": sum(k.bytes for k in kernels), "host_issues": sum(op.issues for op in eager_ops),
        "syncs": sum(op.sync for op in eager_ops),
        "predicted_ms_eager": round(eager["ms"], 3), "predicted_ms_graphs": round(graphs["ms"], 3),
        "per_image_ms_eager": round(eager["ms"] / tr.batch, 3), "per_image_ms_graphs": round(graphs["ms"] / tr.batch, 3),
        "gpu_ms": round(eager["gpu_ms"], 3), "host_ms_eager": round(eager["host_ms"], 3), "classes": classes,
        "phases": phases, "graph_only_phases": graph_only,
    }


def top_op_kinds(tr: Trace, device_key: str, c: Constants, n: int = 10) -> Dict[str, List[Dict]]:
    """The ``n`` op kinds with the most predicted GPU time, and with the most launches."""
    kinds = _op_kinds(tr, DEVICES[device_key], c)
    rows = [{"kind": name, "launches": v["launches"], "gpu_ms": round(v["gpu_ms"], 4), "bytes": v["bytes"],
             "flops": v["flops"]} for name, v in kinds.items()]
    return {"by_time": sorted(rows, key=lambda r: -r["gpu_ms"])[:n],
            "by_launches": sorted(rows, key=lambda r: (-r["launches"], -r["gpu_ms"]))[:n]}


def targets(rows: Sequence[Dict]) -> Optional[Dict]:
    """The issue's targets on ``TARGET_ROW`` (None when the run has not both rows): ratios of
    maskformer-fast to transformers-eager, fast's CUDA-graph time per image, whether each is met,
    and per op class where fast's launches, bytes and GPU time go."""
    def pick(impl):
        return next((r for r in rows if r["impl"] == impl and all(r[k] == v for k, v in TARGET_ROW.items())), None)

    fast, eager = pick("maskformer-fast"), pick("transformers-eager")
    if fast is None or eager is None:
        return None
    values = {"launches_ratio": fast["launches"] / eager["launches"], "bytes_ratio": fast["bytes"] / eager["bytes"],
              "graphs_ms_per_image": fast["per_image_ms_graphs"]}
    return {
        "row": TARGET_ROW,
        "results": {k: {"predicted": round(v, 3), "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in values.items()},
        "launches_over_target": fast["launches"] - TARGETS["launches_ratio"] * eager["launches"],
        "bytes_over_target": fast["bytes"] - TARGETS["bytes_ratio"] * eager["bytes"],
        "by_class": {cls: {"fast_launches": fast["classes"][cls]["launches"],
                           "eager_launches": eager["classes"][cls]["launches"],
                           "fast_bytes": fast["classes"][cls]["bytes"], "eager_bytes": eager["classes"][cls]["bytes"],
                           "fast_gpu_ms": fast["classes"][cls]["gpu_ms"]} for cls in CLASSES},
    }


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(models: Sequence[Tuple[str, int, int]] = DEFAULT_MODELS, batches: Sequence[int] = (1, 8),
        dtypes: Sequence[str] = ("fp32", "bf16"), devices: Sequence[str] = ("h100", "h200"),
        impls: Sequence[str] = IMPLS, constants: Optional[Constants] = None,
        launch_floor_us: float = DEFAULT_LAUNCH_FLOOR_US, measured_dir: str = MEASURED_DIR,
        log: Callable[[str], None] = lambda line: None) -> Dict:
    """The report: every (model, batch, dtype, impl) traced once and predicted on every device.

    ``models``: (name, H, W) triples (``MODELS`` names). ``constants``: use these instead of
    fitting ``host_us_per_op`` and ``efficiency`` on the measured rows of ``measured_dir``
    (then the report has no ``calibration`` rows). ``log``: called with a line per trace."""
    for device in devices:
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    started, load_start = time.monotonic(), _loadavg()
    traces: Dict[Tuple, Trace] = {}

    def get(impl, model, batch, dtype, height, width) -> Trace:
        key = (impl, model, batch, dtype, height, width)
        if key not in traces:
            t0 = time.monotonic()
            traces[key] = trace(*key)
            log(f"traced {impl} {model} {height}x{width} batch {batch} {dtype}: {len(traces[key].kernels())} "
                f"launches ({time.monotonic() - t0:.1f} s)")
        return traces[key]

    calibration, fitted, measured_on = [], constants is None, None
    if fitted:
        with open(os.path.join(measured_dir, "environment.json")) as f:
            env = json.load(f)
        measured_on = {k: env.get(k) for k in ("gpu", "torch", "triton", "transformers", "date")}
        measured = measured_rows(measured_dir)
        timelines = [Timeline.of(get("transformers-eager", r["model"], r["batch"], "fp32", *r["input"]), DEVICES["h200"])
                     for r in measured]
        constants = fit_constants(timelines, [r["measured_ms"] for r in measured], launch_floor_us)
        for r, timeline in zip(measured, timelines):
            predicted = simulate(timeline, constants)["ms"]
            calibration.append({"model": r["model"], "batch": r["batch"], "dtype": "fp32", "device": "h200",
                                "input": r["input"], "measured_ms": r["measured_ms"],
                                "predicted_ms": round(predicted, 2),
                                "error": round(predicted / r["measured_ms"] - 1, 3), "source": r["source"]})
    rows, top = [], {}
    for model, height, width in models:
        for batch in batches:
            for dtype in dtypes:
                for impl in impls:
                    tr = get(impl, model, batch, dtype, height, width)
                    for device in devices:
                        rows.append(summarize(tr, device, constants))
                        if impl == "maskformer-fast":
                            top[f"{model} {height}x{width} batch {batch} {dtype} {device}"] = top_op_kinds(
                                tr, device, constants)
    target = targets(rows)
    if target is not None:
        # The launch floor is assumed: the graph time at other floors shows how much rests on it.
        tr = get("maskformer-fast", TARGET_ROW["model"], TARGET_ROW["batch"], TARGET_ROW["dtype"], *TARGET_ROW["input"])
        timeline = Timeline.of(tr, DEVICES[TARGET_ROW["device"]])
        target["graphs_ms_per_image_by_launch_floor_us"] = {
            str(floor): round(simulate(timeline, dataclasses.replace(constants, launch_floor_us=floor), graphs=True)["ms"]
                              / tr.batch, 3) for floor in FLOOR_SENSITIVITY_US}
    return {
        "tool": "python -m benchmarks.gpu_model", "commit": reporting.commit_text(reporting.git_commit()), "date": time.strftime("%Y-%m-%d %H:%M"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "triton": _version("triton")},
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": _loadavg(),
                 "runtime_s": round(time.monotonic() - started, 1)},
        "devices": {k: dataclasses.asdict(v) for k, v in DEVICES.items() if k in devices},
        "tf32": {"matmul": tf32_matmul_allowed(), "cudnn_conv": torch.backends.cudnn.allow_tf32},
        "constants": {
            "host_us_per_op": {"value": constants.host_us_per_op, "fitted": fitted},
            "efficiency": {"value": constants.efficiency, "fitted": fitted},
            "launch_floor_us": {"value": constants.launch_floor_us, "fitted": False, "note": "assumed"},
        },
        "calibration": calibration, "calibration_measured_on": measured_on, "max_calibration_error": max((abs(r["error"]) for r in calibration), default=None),
        "rows": rows, "targets": target, "top_op_kinds_fast": top,
    }


def _version(package: str) -> Optional[str]:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def markdown(report: Dict) -> str:
    """The report as Markdown: constants and calibration, the targets and what the gap is made of,
    every row, the op-class breakdown at batch 1 and maskformer-fast's top op kinds."""
    c = report["constants"]
    fitted = c["host_us_per_op"]["fitted"]
    host = report["host"]
    lines = [
        "# GPU cost model (predicted, no GPU)", "",
        f"`{report['tool']}`, commit {report['commit']}, {report['date']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + f". Traced on {host['cpu']} ({host['cores']} cores) in {host['runtime_s']} s, load average "
          f"{host['loadavg_start']} at the start, {host['loadavg_end']} at the end.", "",
        "Every number below is a **prediction** of this model (`benchmarks/gpu_model.py`'s docstring says how): "
        "one forward + semantic post-processing to the input size, traced on fake CUDA tensors, each kernel "
        "timed by its roofline over an efficiency (at least a launch floor), the host issuing eager ops one by one. "
        "launches, FLOPs and bytes (each operand read once, each output written once: a lower bound) are counts. "
        f"TF32: matmul {report['tf32']['matmul']}, cuDNN convolutions {report['tf32']['cudnn_conv']} (torch's defaults).",
        "",
        "| constant | value | |", "|---|---|---|",
        f"| host µs per eager op | {c['host_us_per_op']['value']} | {'fitted' if fitted else 'given'} |",
        f"| efficiency (of peak FLOP/s and bandwidth) | {c['efficiency']['value']} | {'fitted' if fitted else 'given'} |",
        f"| launch floor µs | {c['launch_floor_us']['value']} | assumed, not measured |", "",
        "| device | fp32 TFLOP/s | TF32 | bf16 | HBM TB/s | source |", "|---|---|---|---|---|---|",
    ]
    for key, d in report["devices"].items():
        t = d["tflops"]
        lines.append(f"| {key} | {t['fp32']} | {t['tf32']} | {t['bf16']} | {d['hbm_tbps']} | {d['sources']} |")
    if report["calibration"]:
        lines += ["", f"## Calibration: transformers eager fp32 on the H200 (largest error "
                      f"{report['max_calibration_error']:.1%}; target 25%)", "",
                  "| model | input | batch | measured ms | predicted ms | error |", "|---|---|---|---|---|---|"]
        for r in report["calibration"]:
            lines.append(f"| {r['model']} | {r['input'][0]}x{r['input'][1]} | {r['batch']} | {r['measured_ms']} | "
                         f"{r['predicted_ms']} | {r['error']:+.1%} |")
        on = report["calibration_measured_on"]
        lines += ["", f"Measured: {report['calibration'][0]['source']} and e2e-throughput.json beside it (median "
                      f"of 5, random weights; {on['gpu']}, torch {on['torch']}, transformers {on['transformers']}, "
                      f"{on['date'][:10]}); traced here with the versions above."]
    t = report["targets"]
    if t:
        row = t["row"]
        lines += ["", f"## Targets: {row['model']} {row['input'][0]}x{row['input'][1]}, batch {row['batch']}, "
                      f"{row['dtype']}, {row['device']} (maskformer-fast vs transformers-eager)", "",
                  "| target | predicted | bound | met |", "|---|---|---|---|"]
        for name, v in t["results"].items():
            lines.append(f"| {name.replace('_', ' ')} | {v['predicted']} | <= {v['target']} | "
                         f"{'yes' if v['met'] else '**no**'} |")
        floors = ", ".join(f"{v} ms at {k} µs" for k, v in t["graphs_ms_per_image_by_launch_floor_us"].items())
        lines += ["", f"fast under CUDA graphs per image, by the assumed launch floor: {floors}."]
        over = [(t["launches_over_target"], "launches"), (t["bytes_over_target"] / 1e9, "GB")]
        lines += ["", "Against the launch and byte bounds: " + ", ".join(
            f"{abs(v):.{0 if unit == 'launches' else 2}f} {unit} {'over' if v > 0 else 'under'}" for v, unit in over)
            + ". Where fast's launches, bytes and GPU time go, by op class:", "",
            "| class | fast launches | eager launches | fast GB | eager GB | fast GPU ms |", "|---|---|---|---|---|---|"]
        for cls, v in t["by_class"].items():
            lines.append(f"| {cls} | {v['fast_launches']} | {v['eager_launches']} | {_gb(v['fast_bytes'])} | "
                         f"{_gb(v['eager_bytes'])} | {v['fast_gpu_ms']:.3f} |")
        lines += ["", "and by phase (a CUDA graph replays the forward; the input check and the post-processing stay "
                      "eager, each host issue and sync on the clock):", "",
                  "| impl | phase | launches | host issues | syncs | GPU ms |", "|---|---|---|---|---|---|"]
        for impl in ("maskformer-fast", "transformers-eager"):
            r = next(r for r in report["rows"] if r["impl"] == impl and all(r[k] == v for k, v in row.items()))
            shown = list(r["phases"].items()) + [(f"{p} (CUDA graphs only)", v)
                                                 for p, v in r.get("graph_only_phases", {}).items()]
            for phase, v in shown:
                lines.append(f"| {impl} | {phase} | {v['launches']} | {v['host_issues']} | {v['syncs']} | "
                             f"{v['gpu_ms']:.3f} |")
    lines += ["", "## Rows", "",
              "| model | input | impl | batch | dtype | device | launches | GFLOP | GB | syncs | eager ms | graphs ms "
              "| graphs ms/image |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['input'][0]}x{r['input'][1]} | {r['impl']} | {r['batch']} | {r['dtype']} | "
                     f"{r['device']} | {r['launches']} | {r['flops'] / 1e9:.1f} | {_gb(r['bytes'])} | {r['syncs']} | "
                     f"{r['predicted_ms_eager']:.2f} | {r['predicted_ms_graphs']:.2f} | {r['per_image_ms_graphs']:.2f} |")
    for r0 in report["rows"]:
        # Batch 1 on the H100 (the target's device) here; every row's breakdown is in the JSON.
        if r0["impl"] != "maskformer-fast" or r0["batch"] != 1 or r0["device"] != "h100":
            continue
        same = [r for r in report["rows"] if all(r[k] == r0[k] for k in ("model", "input", "batch", "dtype", "device"))]
        lines += ["", f"## Op classes: {r0['model']} {r0['input'][0]}x{r0['input'][1]}, batch 1, {r0['dtype']}, "
                      f"{r0['device']} (launches / GB / predicted GPU ms)", "",
                  "| class | " + " | ".join(r["impl"] for r in same) + " |", "|---|" + "---|" * len(same)]
        for cls in CLASSES:
            cells = [f"{r['classes'][cls]['launches']} / {_gb(r['classes'][cls]['bytes'])} / "
                     f"{r['classes'][cls]['gpu_ms']:.3f}" for r in same]
            lines.append(f"| {cls} | " + " | ".join(cells) + " |")
        key = f"{r0['model']} {r0['input'][0]}x{r0['input'][1]} batch 1 {r0['dtype']} {r0['device']}"
        top = report["top_op_kinds_fast"].get(key)
        if top and r0["dtype"] == "bf16":
            for title, field in (("predicted GPU time", "by_time"), ("launches", "by_launches")):
                lines += ["", f"maskformer-fast's top op kinds by {title}:", "",
                          "| op kind | launches | GPU ms | GB |", "|---|---|---|---|"]
                lines += [f"| {k['kind']} | {k['launches']} | {k['gpu_ms']:.3f} | {_gb(k['bytes'])} |" for k in top[field]]
    return "\n".join(lines) + "\n"


def write_report(report: Dict, json_path: str, *, overwrite: bool = False) -> Tuple[str, str]:
    """``json_path`` and the Markdown beside it (same stem, .md), each written atomically under
    ``maskformer.reporting``'s rule: an existing file is replaced only when this run claimed it or
    with ``overwrite``."""
    json_path_written, md_path = reporting.write_report(os.path.splitext(json_path)[0], report, markdown(report),
                                                        overwrite=overwrite)
    return json_path_written, md_path


def _model_arg(text: str) -> Tuple[str, int, int]:
    """"swin-large" or "swin-large:640x853" -> (name, H, W)."""
    name, _, size = text.partition(":")
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if not size:
        return (name,) + MODELS[name][1]
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad input size {size!r} for {name}: write HxW, e.g. {name}:640x853")
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"input {height}x{width} for {name} is too small: at least 32x32")
    return name, height, width


def _list(kind, choices=None):
    def parse(text):
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, choices))}" if bad
                                             else "give at least one value")
        return values

    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="output JSON, Markdown beside it (default "
                        "out/benchmarks/gpu-model.json, or the next free -2, -3 when taken; never over an existing "
                        "file without --overwrite: the committed benchmarks/results/gpu-model.json included)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output files if they exist")
    parser.add_argument("--models", type=lambda s: [_model_arg(v) for v in s.split(",") if v],
                        default=list(DEFAULT_MODELS), help="comma list of NAME or NAME:HxW (default swin-tiny, "
                        "swin-large:640x640, swin-large:640x853; names: " + ", ".join(MODELS) + ")")
    parser.add_argument("--batches", type=_list(int), default=[1, 8])
    parser.add_argument("--dtypes", type=_list(str, DTYPES), default=list(DTYPES))
    parser.add_argument("--devices", type=_list(str, DEVICES), default=list(DEVICES))
    parser.add_argument("--impls", type=_list(str, IMPLS), default=list(IMPLS))
    parser.add_argument("--launch-floor-us", type=float, default=DEFAULT_LAUNCH_FLOOR_US)
    parser.add_argument("--host-us-per-op", type=float, default=None,
                        help="with --efficiency: use these constants instead of fitting them")
    parser.add_argument("--efficiency", type=float, default=None)
    args = parser.parse_args(argv)
    if (args.host_us_per_op is None) != (args.efficiency is None):
        parser.error("give both --host-us-per-op and --efficiency, or neither (then both are fitted)")
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        parser.error(f"--efficiency must be in (0, 1], got {args.efficiency}")
    try:  # claimed before minutes of tracing: a taken name is refused now
        stem = reporting.results_stem(None if args.json is None else os.path.splitext(args.json)[0], "gpu-model",
                                      overwrite=args.overwrite, log=lambda line: print(line, file=sys.stderr))
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    constants = None if args.efficiency is None else Constants(args.host_us_per_op, args.efficiency,
                                                               args.launch_floor_us)
    report = run(args.models, args.batches, args.dtypes, args.devices, args.impls, constants, args.launch_floor_us,
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    json_path, md_path = write_report(report, stem + ".json", overwrite=args.overwrite)
    for r in report["calibration"]:
        print(f"calibration {r['model']} batch {r['batch']}: measured {r['measured_ms']} ms, predicted "
              f"{r['predicted_ms']} ms ({r['error']:+.1%})")
    t = report["targets"]
    if t:
        for name, v in t["results"].items():
            print(f"target {name}: {v['predicted']} (<= {v['target']}: {'met' if v['met'] else 'NOT met'})")
    print(f"wrote {json_path} and {md_path} in {report['host']['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
