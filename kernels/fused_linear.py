"""A Linear layer with its epilogue fused: ``act(x @ W^T + b) + residual`` in one GEMM launch.

A Swin block runs, after its window attention, ``shortcut + dense(attn)``, then
``fc2(gelu(fc1(layernorm(h)))) + h``. In eager PyTorch each Linear is a cuBLAS GEMM with the bias
in its epilogue, and the GELU and both residual adds are kernels of their own, each reading and
writing a full activation: for Swin-L at 640x640 in bf16 the cost model
(``benchmarks/gpu_model.py``, H100, before this op) put the 24 GELUs at 0.375 ms (0.61 GB: the
fc1 output, 4C wide, read and written again) and the 82 adds (the blocks' 48 residual adds among
them) at 0.392 ms of a 3.41 ms forward; with this op, elementwise work is 0.20 ms in all.
Here the GEMM's epilogue does them on the fp32 accumulator before the one store:

* ``fused_linear`` (Triton): one program per (BLOCK_M x BLOCK_N) output tile, grouped along M so
  that neighbouring programs share weight tiles in L2; a ``tl.dot`` loop over K with an fp32
  accumulator (tensor cores for fp16/bf16 operands, TF32 ones for fp32 when torch allows TF32
  matmuls, exact FFMA otherwise, as ``window_attention``), then + bias, GELU (exact, erf: what
  ``nn.GELU()`` and transformers' ``"gelu"`` compute), + residual, one rounding to the output
  dtype and one store. The fc1 output is written once in bf16 and never re-read for the GELU;
  a residual is read once by the GEMM instead of by an add.
* ``fused_linear_ref``: the same three steps with torch ops, in fp32 for fp16/bf16 inputs (rounded
  once at the end: the op's accuracy target; torch's eager bf16 rounds after the GEMM, after the
  GELU and after the add, which the tests take as the budget).

Limits: forward only (no backward: inputs that need grad under grad mode are refused); Triton on
CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (tests); every tensor in x's dtype (fp32, fp16,
bf16); activation ``"none"`` or ``"gelu"``; x's last dimension contiguous (else copied). The tile
sizes (``default_blocks``) are untuned: no GPU was available when this was written; compiled
for sm_80 and sm_90 by ``python -m benchmarks.aot --kernels fused_linear`` (no spills, tensor
cores where a launch is declared with them). The Swin block calls it only in inference on the
Triton path (``maskformer.swin.SwinLayer``); the CPU path keeps its ``nn.Linear`` modules.
"""
import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from maskformer import _devices, _ext
from maskformer.kernels.registry import AOT_DTYPES, DTYPE_LABELS, IMAGES, AOTLaunch, Impl, Op, triton_reasons

__all__ = ["OP", "fused_linear", "fused_linear_ref", "check_args", "not_supported_reasons", "launch",
           "default_blocks", "dot_precision", "aot_launches", "ACTIVATIONS", "SWIN_MLP"]

ACTIVATIONS = ("none", "gelu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Arguments and the reference
# ---------------------------------------------------------------------------------------------


def _shape_problems(x, weight, bias, activation, residual) -> List[str]:
    problems = []
    tensors = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            problems.append(f"{name} must be a tensor, got {type(t).__name__}")
    if problems:
        return problems
    if activation not in ACTIVATIONS:
        problems.append(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if x.dim() < 1 or weight.dim() != 2:
        return problems + [f"x must be (..., K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}"]
    n, k = weight.shape
    if x.shape[-1] != k:
        problems.append(f"x's last dimension {x.shape[-1]} is not weight's K={k} (weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (n,):
        problems.append(f"bias must be (N,) = ({n},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(x.shape[:-1]) + (n,):
        problems.append(f"residual must be x's shape with N={n} last, {tuple(x.shape[:-1]) + (n,)}, "
                        f"got {tuple(residual.shape)}")
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        problems.append("every tensor must have x's dtype (as nn.Linear and the add need): "
                        + ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in dtypes.items()))
    if not x.is_floating_point():
        problems.append(f"x is {x.dtype}: a float tensor is needed")
    return problems


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: str = "none",
               residual: Optional[torch.Tensor] = None) -> None:
    """The op's argument check: shapes, dtypes, the activation's name and one device; ValueError
    "fused_linear: ..." naming the problem."""
    _devices.check_same_device("fused_linear", x=x, weight=weight, bias=bias, residual=residual)
    problems = _shape_problems(x, weight, bias, activation, residual)
    if problems:
        raise ValueError("fused_linear: " + "; ".join(problems))


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference ``act(x @ weight^T + bias) + residual``.

    Args:
        x: (..., K) float.
        weight: (N, K), ``nn.Linear.weight``, x's dtype.
        bias: (N,) or None.
        activation: "none" or "gelu" (exact, erf-based: ``F.gelu``), applied before the residual.
        residual: None or (..., N), x's leading dimensions: added after the activation.

    Returns:
        (..., N) in x's dtype. fp16/bf16 inputs are computed in fp32 and rounded once (the
        op's accuracy target, not a model of eager bf16, which rounds after every step); fp32 and
        fp64 in their own dtype. ValueError for shapes, dtypes or devices that do not fit.
    """
    check_args(x, weight, bias, activation, residual)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = F.linear(x.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def not_supported_reasons(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          activation: str = "none", residual: Optional[torch.Tensor] = None) -> List[str]:
    """Why the Triton ``fused_linear`` cannot serve these arguments; [] when it can: argument
    problems, triton missing, device, dtype, autograd (forward only)."""
    try:
        check_args(x, weight, bias, activation, residual)
    except ValueError as exc:
        return [str(exc)]
    reasons = []
    reasons += triton_reasons(x, "x is")
    if x.dtype not in _DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported (fp32, fp16, bf16)")
    if torch.is_grad_enabled():
        needing = [name for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual))
                   if t is not None and t.requires_grad]
        if needing:
            reasons.append(f"{', '.join(needing)} require grad: the kernel is forward-only (no backward)")
    return reasons


# ---------------------------------------------------------------------------------------------
# Triton kernel (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """The @triton.jit kernel (interpreted or compiled, fixed at its first build). Triton resolves
    the names a kernel uses in its module's globals, hence the ``global``."""
    global triton, tl, _fused_linear_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_linear_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_wk, stride_rm, stride_om,
        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """out (M, N) = act(x (M, K) @ w (N, K)^T + b) + r; x and r with unit column stride."""
        # Tiles in groups of GROUP_M rows: the GROUP_M programs that run together read the same
        # weight tiles (L2 hits) while stepping through x.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows and columns past the edge wrap around: the loop's loads need no mask on M and N, and
        # what they compute there is never stored.
        rows = (offs_m % M).to(tl.int64)
        cols = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if UPCAST_DOT:
                # Interpreter only: it multiplies bf16 bit patterns as integers
                # (triton-lang/triton#11584). Products of bf16 values are exact in fp32, so an fp32
                # dot of the operands is what the tensor cores compute, up to summation order.
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        # The epilogue, on the fp32 accumulator: bias, activation, residual, one rounding.
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU, as nn.GELU()
        out_rows = offs_m.to(tl.int64)[:, None]
        keep = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_RESIDUAL:
            acc += tl.load(r_ptr + out_rows * stride_rm + offs_n[None, :], mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)

    return _fused_linear_kernel


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp16/bf16 operands always run on the tensor cores; fp32 follows
    torch's fp32 matmul policy (``maskformer._ext.tf32_matmul_allowed``): "tf32" when allowed,
    exact "ieee" FFMA otherwise (torch's default, what cuBLAS then computes)."""
    return "tf32" if dtype != torch.float32 or _ext.tf32_matmul_allowed() else "ieee"


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def default_blocks(m: int, n: int, k: int, precision: str, element_size: int) -> Tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Untuned (no GPU when written);
    each must compile for sm_80 and sm_90 without spills (``benchmarks/aot.py``).

    Tensor cores (fp16/bf16, TF32): 128 x 128 output tiles over 8 warps, K in steps of 64 (16-bit)
    or 32 (TF32), 3 stages: 96 KiB of shared memory for the pipelined x and W tiles, within both
    architectures' per-block limit. When 128-row tiles would give fewer than 132 programs (an
    H100's SMs; Swin-L's stage 4 at batch 1 has M = 400 tokens), 64-row tiles over 4 warps double
    the programs. Exact fp32 (FFMA): 64 x 64 x 16 over 8 warps, 2 stages; a thread holds its
    rows of x and columns of W for a whole K step, so larger tiles take more registers. Every
    block is at least 16 (tl.dot's minimum) and at most the next power of two of the size."""
    if precision == "ieee":
        block_m, block_n, block_k, warps, stages = 64, 64, 16, 8, 2
    else:
        block_m, block_n, block_k = 128, 128, 64 if element_size == 2 else 32
        warps, stages = 8, 3
        if -(-m // 128) * -(-n // 128) < 132:
            block_m, warps = 64, 4
    block_m = min(block_m, _pow2_at_least(m))
    block_n = min(block_n, _pow2_at_least(n))
    block_k = min(block_k, _pow2_at_least(k))
    return block_m, block_n, block_k, 8, warps, stages


def launch(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
           residual2: Optional[torch.Tensor], out: torch.Tensor, blocks: Optional[Tuple[int, ...]] = None,
           compile_only: bool = False):
    """Run the kernel on 2-D operands: x2 (M, K) and residual2 (M, N) with unit column stride,
    weight (N, K) (any strides), bias (N,) or None -> out (M, N) with unit column stride, written
    and returned. ``blocks`` overrides ``default_blocks`` (tests). ``compile_only``: compile for
    the active triton target and return the ``CompiledKernel`` without launching
    (``benchmarks/aot.py``, with meta tensors)."""
    kernel = _build_kernel()
    m, k = x2.shape
    n = weight.shape[0]
    precision = dot_precision(x2.dtype)
    block_m, block_n, block_k, group_m, warps, stages = blocks or default_blocks(m, n, k, precision,
                                                                                x2.element_size())
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    bias_arg = bias if bias is not None else weight  # a valid pointer the kernel never reads
    res_arg = residual2 if residual2 is not None else out
    args = (x2, weight, bias_arg, res_arg, out, m, n, k,
            x2.stride(0), weight.stride(0), weight.stride(1), res_arg.stride(0), out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, GELU=activation == "gelu", HAS_RESIDUAL=residual2 is not None,
                EVEN_K=k % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                DOT_PRECISION=precision,
                UPCAST_DOT=_ext.triton_interpret_mode() and x2.dtype == torch.bfloat16,
                num_warps=warps, num_stages=stages,
                # Explicit (triton 3.10 turns the default off): the epilogue's a * b + c may become
                # FMAs; the tests' budget allows either rounding.
                enable_fp_fusion=True)
    if compile_only:
        return kernel.warmup(*args, grid=grid, **meta)
    if m and n:
        kernel[grid](*args, **meta)
    return out


def _unit_last(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t (..., cols) as a 2-D view with a unit column stride (copied only when it cannot be)."""
    t2 = t.reshape(-1, cols)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


@torch.library.custom_op("maskformer::fused_linear", mutates_args=())
def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                     residual: Optional[torch.Tensor]) -> torch.Tensor:
    reasons = not_supported_reasons(x, weight, bias, activation, residual)
    if reasons:
        raise ValueError("maskformer::fused_linear (Triton) cannot run: " + "; ".join(reasons))
    n, k = weight.shape
    x2 = _unit_last(x, k)
    r2 = None if residual is None else _unit_last(residual, n)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    launch(x2, weight, bias, activation, r2, out)
    return out.view(tuple(x.shape[:-1]) + (n,))


@_fused_linear_op.register_fake
def _fused_linear_fake(x, weight, bias, activation, residual):
    check_args(x, weight, bias, activation, residual)
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused Linear + epilogue (Triton), ``torch.ops.maskformer.fused_linear``: one launch.

    Same arguments, shapes and result as ``fused_linear_ref``: x (..., K), weight (N, K), bias (N,)
    or None, activation "none"/"gelu", residual (..., N) or None -> (..., N) in x's dtype, a new
    contiguous tensor. The accumulator and the epilogue are fp32; fp16/bf16 operands run on the
    tensor cores, fp32 ones exactly or in TF32 as torch's matmul policy says. Forward only.
    Raises ValueError with ``not_supported_reasons`` when it cannot run. Tensors all on the meta
    device give a meta result (the op's fake kernel: shape propagation).
    """
    check_args(x, weight, bias, activation, residual)
    return torch.ops.maskformer.fused_linear(x, weight, bias, activation, residual)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time launches and the op's declaration
# ---------------------------------------------------------------------------------------------
# The Swin blocks' three fused Linears per stage: (name, K, N, activation, residual) for a stage of
# C channels (mlp_ratio 4): the attention's output projection + shortcut, fc1 + GELU, fc2 + shortcut.
SWIN_MLP = (("attention output", 1, 1, "none", True), ("fc1", 1, 4, "gelu", False), ("fc2", 4, 1, "none", True))
# Swin backbones (embed_dim): Swin-T/S 96, Swin-B 128, Swin-L 192; the shipped default model 32.
_EMBED = {"swin-tiny": 96, "swin-base": 128, "swin-large": 192, "default-model": 32}


def _stage_tokens(height: int, width: int):
    """Tokens of the four Swin stages for an input (patch 4, each merge halves, rounding up)."""
    h, w = -(-height // 4), -(-width // 4)
    for _ in range(4):
        yield h * w
        h, w = -(-h // 2), -(-w // 2)


def _aot_launch(model: str, stage: int, m: int, c: int, layer, dtype: str, tf32: Optional[bool]) -> AOTLaunch:
    name, k_mult, n_mult, activation, residual = layer
    k, n = c * k_mult, c * n_mult
    dt = getattr(torch, dtype)

    def compile_():
        x2 = torch.empty(m, k, device="meta", dtype=dt)
        weight = torch.empty(n, k, device="meta", dtype=dt)
        bias = torch.empty(n, device="meta", dtype=dt)
        r2 = torch.empty(m, n, device="meta", dtype=dt) if residual else None
        with _ext.tf32_matmul(bool(tf32)):
            return launch(x2, weight, bias, activation, r2, torch.empty(m, n, device="meta", dtype=dt),
                          compile_only=True)

    config = dict(model=model, stage=stage + 1, layer=name, M=m, K=k, N=n, dtype=DTYPE_LABELS[dtype])
    if dtype == "float32":
        config["tf32"] = bool(tf32)
    return AOTLaunch("fused_linear", config, compile_, tensor_cores=dtype != "float32" or bool(tf32))


def _launches(models, images, batches, dtypes, stages=(0, 1, 2, 3), layers=SWIN_MLP) -> List[AOTLaunch]:
    out = []
    for model in models:
        for image in images:
            tokens = list(_stage_tokens(*image))
            for batch in batches:
                for stage in stages:
                    for layer in layers:
                        for dtype in dtypes:
                            for tf32 in ((False, True) if dtype == "float32" else (None,)):
                                out.append(_aot_launch(model, stage, batch * tokens[stage], _EMBED[model] * 2**stage,
                                                       layer, dtype, tf32))
    return out


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles. Full: the three fused Linears of every stage of
    Swin-T, Swin-B, Swin-L and the default model at each input size (``IMAGES``), batch 1 and 8,
    fp32 (both TF32 settings), fp16, bf16. CI: Swin-L at 640x640, batch 1: stage 1 (128-row tiles,
    K = 192 and 768) and stage 4 (M = 400: 64-row tiles), every dtype and setting; and fc1 of
    Swin-T's stage 1 at 512x683 in bf16 (K = 96: a K step of 32)."""
    if full:
        return _launches(list(_EMBED), IMAGES, (1, 8), AOT_DTYPES)
    return (_launches(["swin-large"], [(640, 640)], (1,), AOT_DTYPES, stages=(0, 3))
            + _launches(["swin-tiny"], [(512, 683)], (1,), ("bfloat16",), stages=(0,), layers=SWIN_MLP[1:2]))


OP = Op(
    name="fused_linear",
    reference=fused_linear_ref,
    check=check_args,
    description="a Linear with its epilogue in one GEMM launch, act(x @ W^T + b) + residual (activation none or "
                "exact GELU): (..., K) -> (..., N); the Swin blocks' output projection, fc1 and fc2",
    role="network",
    tasks=(),  # inside the Swin blocks, which run their own module code where it cannot serve
    impls=(Impl("triton", fused_linear, devices=("cuda",), dtypes=_DTYPES, reasons=not_supported_reasons),),
    missing={"cpp": "the nn.Linear modules (oneDNN) are the CPU path"},
    aot_launches=aot_launches,
)
