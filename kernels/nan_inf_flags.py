"""Which of one or two tensors hold a NaN and which an infinity: one launch, one read.

The model checks its input for NaN/inf before a forward (``maskformer.inputs.check_finite``) and the
post-processing checks both logits for NaN (``maskformer.postprocessing``). Written with torch ops,
``bool(torch.isfinite(x).all())`` is five CUDA kernels (``isfinite`` decomposes into abs, ne, eq and
mul) and a device-to-host read; the post-processing's sum-then-isnan test of two tensors was twelve
kernels and two reads. On a GPU at batch 1 each launch costs the host tens of microseconds, far
more than the kernel: the cost model (``benchmarks/gpu_model.py``, 43 µs per host issue, fitted)
put these checks at ~0.8 ms of a 4.5 ms Swin-L image, with 3 syncs.

``nan_inf_flags`` (Triton) reads the tensors once in one launch: each program scans its share of
elements as integers (the IEEE bit pattern: a NaN or an infinity is an all-ones exponent; the
mantissa tells them apart; exact in every float dtype, and the interpreter never sees a float
comparison), and sets bits in one int32 flag word (two bits per tensor) with a masked
``atomic_or``: clean inputs make no atomic at all. The word is a one-element buffer per (thread,
device, stream), zeroed once and left at zero by every clean call (a call that finds something
clears it again after reading), so there is no zero-fill launch; the caller gets the flags as
Python ints from one ``.item()``. So a check is 2 host issues and 1 sync, for one tensor or two.

``nan_inf_flags_ref`` is the reference and the CPU path: per tensor one ``sum`` (a NaN or an
infinity always makes the sum non-finite, so a finite sum settles it in one pass with no
full-size boolean temporary), and only when it is not finite the exact ``isnan``/``isinf`` tests
(a finite tensor can overflow its sum). Same flags, always.

Limits: float tensors (fp64, fp32, fp16, bf16), any shape and strides (a non-contiguous tensor is
copied first: the kernel reads a flat range); Triton on CUDA or on CPU tensors under
``TRITON_INTERPRET=1`` (tests); forward only (no autograd: the result is a read).
"""
import functools
import threading
from typing import Dict, List, Optional, Tuple

import torch

from maskformer import _devices
from maskformer.kernels.registry import DTYPE_LABELS, IMAGES, AOTLaunch, Impl, Op, triton_reasons

__all__ = ["OP", "nan_inf_flags", "nan_inf_flags_ref", "check_args", "not_supported_reasons", "launch",
           "reset_flag_words", "flag_word", "aot_launches", "NAN", "INF"]

#: Bits of a tensor's flag: it holds a NaN, it holds +-inf.
NAN, INF = 1, 2
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# float dtype -> (the integer dtype of its bits, exponent mask, mantissa mask)
_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF),
    torch.float16: (torch.int16, 0x7C00, 0x03FF),
    torch.bfloat16: (torch.int16, 0x7F80, 0x007F),
}
# Elements one program reads per loop iteration; programs stride over the tensor. 4096 x 2 B =
# 8 KiB per iteration for 16-bit data; untuned (no GPU was available when this was written).
_BLOCK = 4096
# At most this many programs: enough to fill an H100's 132 SMs several times over, few enough
# that the clean case's per-program work is many iterations of streaming loads.
_MAX_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------------
# Arguments and the reference
# ---------------------------------------------------------------------------------------------


def _tensors(x: torch.Tensor, y: Optional[torch.Tensor]) -> List[torch.Tensor]:
    return [x] if y is None else [x, y]


def check_args(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """The op's argument check: x (and y) float tensors on one device; ValueError naming the problem."""
    problems = []
    for name, t in (("x", x), ("y", y)):
        if t is None and name == "y":
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} must be a tensor, got {type(t).__name__}")
        elif t.dtype not in _DTYPES:
            problems.append(f"{name} is {t.dtype}: only float tensors (fp64, fp32, fp16, bf16) can hold NaN or inf")
    if problems:
        raise ValueError("nan_inf_flags: " + "; ".join(problems))
    _devices.check_same_device("nan_inf_flags", x=x, y=y)


def _flags_one(t: torch.Tensor) -> int:
    # NaN and inf make any sum non-finite, so a finite sum clears the tensor in one pass (fp32
    # accumulation for 16-bit data: an fp16 sum of a few thousand logits of 30 overflows 65504).
    total = t.sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
    if torch.isfinite(total):
        return 0
    # Not finite: NaN, inf, or finite values whose sum overflowed; only the exact tests can tell.
    return (NAN if bool(torch.isnan(t).any()) else 0) | (INF if bool(torch.isinf(t).any()) else 0)


def nan_inf_flags_ref(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[int, ...]:
    """Which of x (and y) hold a NaN and which an infinity.

    Args:
        x: any-shape float tensor (fp64, fp32, fp16, bf16).
        y: None, or a second float tensor on x's device (any shape and dtype): both are checked in
            one call (the post-processing's class and mask logits).

    Returns:
        One int per tensor given (a 1-tuple for x alone, a pair with y): ``NAN`` (1) set when the
        tensor holds a NaN, ``INF`` (2) when it holds +inf or -inf, 0 when every element is
        finite. Empty tensors are finite. ValueError for non-float tensors or different devices.
    """
    check_args(x, y)
    return tuple(_flags_one(t) for t in _tensors(x, y))


# ---------------------------------------------------------------------------------------------
# Support checks
# ---------------------------------------------------------------------------------------------


def not_supported_reasons(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> List[str]:
    """Why the Triton ``nan_inf_flags`` cannot serve these arguments; [] when it can."""
    try:
        check_args(x, y)
    except ValueError as exc:
        return [str(exc)]
    reasons = []
    reasons += triton_reasons(x, "x is")
    return reasons


# ---------------------------------------------------------------------------------------------
# Triton kernel (built on first use: importing this module never imports triton)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_kernel():
    """The @triton.jit kernel (interpreted or compiled, fixed at its first build). Triton resolves
    the names a kernel uses in its module's globals, hence the ``global``."""
    global triton, tl, _scan, _nan_inf_flags_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _scan(bits_ptr, n, flag_ptr, pid, num_programs, iterations, EXP: tl.constexpr, MANT: tl.constexpr,
              SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """OR into *flag_ptr, shifted left by SHIFT, the NaN/inf bits of elements
        pid*BLOCK + i*num_programs*BLOCK + [0, BLOCK) of a flat tensor read as integers."""
        offs = tl.arange(0, BLOCK)
        nan = tl.zeros([BLOCK], dtype=tl.int32)
        inf = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(0, iterations):
            idx = (i * num_programs + pid).to(tl.int64) * BLOCK + offs
            v = tl.load(bits_ptr + idx, mask=idx < n, other=0)
            special = (v & EXP) == EXP  # all-ones exponent: NaN (mantissa != 0) or +-inf (== 0)
            has_mantissa = (v & MANT) != 0
            nan |= (special & has_mantissa).to(tl.int32)
            inf |= (special & ~has_mantissa).to(tl.int32)
        found = tl.max(nan, 0) + 2 * tl.max(inf, 0)
        # Only a program that found something touches the flag word: a clean tensor makes no atomic.
        tl.atomic_or(flag_ptr, found << SHIFT, mask=found != 0)

    @triton.jit
    def _nan_inf_flags_kernel(x_ptr, y_ptr, flags_ptr, nx, ny, iterations_x, iterations_y,
                              EXP_X: tl.constexpr, MANT_X: tl.constexpr, EXP_Y: tl.constexpr,
                              MANT_Y: tl.constexpr, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        """*flags |= NaN/inf bits of x (nx elements read as integers) | those of y << 2."""
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        _scan(x_ptr, nx, flags_ptr, pid, num_programs, iterations_x, EXP_X, MANT_X, 0, BLOCK)
        if HAS_Y:
            _scan(y_ptr, ny, flags_ptr, pid, num_programs, iterations_y, EXP_Y, MANT_Y, 2, BLOCK)

    return _nan_inf_flags_kernel


def _as_bits(t: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(flat integer view of t's elements, exponent mask, mantissa mask); a non-contiguous t is copied."""
    int_dtype, exp, mant = _BITS[t.dtype]
    return t.contiguous().view(-1).view(int_dtype), exp, mant


def launch(x: torch.Tensor, y: Optional[torch.Tensor], flags: torch.Tensor, compile_only: bool = False):
    """OR into ``flags`` (a one-element int32 tensor on x's device) the NaN/inf bits of x (bits 0-1)
    and of y (None: none; bits 2-3); the kernel only ORs (bits already set stay set). One launch; returns flags, or with ``compile_only`` the
    ``CompiledKernel`` for the active triton target, not launched (``benchmarks/aot.py``, with meta
    tensors)."""
    kernel = _build_kernel()
    bx, exp_x, mant_x = _as_bits(x)
    by, exp_y, mant_y = _as_bits(y) if y is not None else (bx, 0, 0)
    nx, ny = bx.numel(), (by.numel() if y is not None else 0)
    blocks = max(triton.cdiv(nx, _BLOCK), triton.cdiv(ny, _BLOCK), 1)
    programs = min(blocks, _MAX_PROGRAMS)
    grid = (programs,)
    args = (bx, by, flags, nx, ny, triton.cdiv(nx, programs * _BLOCK), triton.cdiv(ny, programs * _BLOCK))
    meta = dict(EXP_X=exp_x, MANT_X=mant_x, EXP_Y=exp_y, MANT_Y=mant_y, HAS_Y=y is not None, BLOCK=_BLOCK,
                num_warps=8,
                # explicit, as every launch here (triton 3.10 turns the default off); integer-only
                # code: nothing to fuse
                enable_fp_fusion=True)
    if compile_only:
        return kernel.warmup(*args, grid=grid, **meta)
    if nx or ny:
        kernel[grid](*args, **meta)
    return flags


@torch.library.custom_op("maskformer::nan_inf_flags_triton", mutates_args=("flags",))
def _nan_inf_flags_triton_op(x: torch.Tensor, y: Optional[torch.Tensor], flags: torch.Tensor) -> None:
    """flags (one int32) |= NaN/inf bits of x | those of y << 2, in place (``launch``)."""
    launch(x, y, flags)


@_nan_inf_flags_triton_op.register_fake
def _nan_inf_flags_triton_fake(x, y, flags):
    _devices.check_same_device("maskformer::nan_inf_flags_triton", x=x, y=y, flags=flags)
    return None


class _FlagWords(threading.local):
    """The flag words of this thread: one int32 (1,) tensor per (device, stream), zero between calls."""

    def __init__(self):
        self.by_key: Dict[tuple, torch.Tensor] = {}


_flag_words = _FlagWords()


def flag_word(device: torch.device) -> torch.Tensor:
    """This thread's flag word for ``device`` and its current stream: an int32 (1,) tensor, zero
    between calls (``nan_inf_flags`` clears it after a hit)."""
    # Per stream: two streams' kernels never share a word; per thread: neither do two threads
    # queueing work on one stream. Zeroed once (the only fill), kept at zero by every call.
    # (No stream on fake CUDA tensors of a CPU-only torch: the cost model traces this code.)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    key = (device, torch.cuda.current_stream(device).cuda_stream if on_cuda else None)
    word = _flag_words.by_key.get(key)
    if word is None:
        word = _flag_words.by_key[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return word


def reset_flag_words() -> None:
    """Forget this thread's flag words (the next call allocates and zeroes a new one): for a tracer
    that switches fake-tensor modes between traces (``benchmarks/gpu_model.py``), whose old words
    belong to the old mode."""
    _flag_words.by_key.clear()


def nan_inf_flags(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[int, ...]:
    """Fused NaN/inf flags (Triton): one launch over x and y, one device-to-host read.

    Arguments and result as ``nan_inf_flags_ref``: one int per tensor, ``NAN`` | ``INF`` bits.
    Raises ValueError with ``not_supported_reasons`` when it cannot run. Not inside a CUDA graph
    capture (the result is read on the host).
    """
    reasons = not_supported_reasons(x, y)
    if reasons:
        raise ValueError("maskformer::nan_inf_flags_triton cannot run: " + "; ".join(reasons))
    word = flag_word(x.device)
    torch.ops.maskformer.nan_inf_flags_triton(x, y, word)
    found = word.item()  # the one read (a sync)
    if found:
        word.zero_()  # only after finding something: the next call starts from zero again
    return tuple((found >> (2 * i)) & (NAN | INF) for i in range(len(_tensors(x, y))))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time launches and the op's declaration
# ---------------------------------------------------------------------------------------------


# The launch configs' dtype names: the registry's, and fp64 (pixel values may be double; no other
# kernel takes it).
_LABELS = {**DTYPE_LABELS, "float64": "fp64"}


def _aot_launch(x_shape, x_dtype: str, y_shape=None, y_dtype: Optional[str] = None) -> AOTLaunch:
    def compile_():
        x = torch.empty(x_shape, device="meta", dtype=getattr(torch, x_dtype))
        y = None if y_shape is None else torch.empty(y_shape, device="meta", dtype=getattr(torch, y_dtype))
        return launch(x, y, torch.empty(1, device="meta", dtype=torch.int32), compile_only=True)

    config = dict(x="x".join(map(str, x_shape)), dtype=_LABELS[x_dtype])
    if y_shape is not None:
        config.update(y="x".join(map(str, y_shape)), y_dtype=_LABELS[y_dtype])
    return AOTLaunch("nan_inf_flags", config, compile_, tensor_cores=False)


def aot_launches(full: bool) -> List[AOTLaunch]:
    """The launches ``benchmarks/aot.py`` compiles: the input check (pixel values (B, 3, H, W)) and
    the post-processing check (class logits (B, 100, 151) with mask logits (B, 100, H/4, W/4)).
    Full: every input size (``IMAGES``), batch 1 and 8, fp32/fp16/bf16 (and fp64 pixels). CI: the
    Swin-L size 640x640 at batch 1 in fp32 and bf16, and 512x683 at batch 8 in fp16 (the other
    divisibility of the element counts)."""
    def pair(batch, image, dtype):
        mh, mw = -(-image[0] // 4), -(-image[1] // 4)
        return [_aot_launch((batch, 3) + image, dtype),
                _aot_launch((batch, 100, 151), dtype, (batch, 100, mh, mw), dtype)]

    if not full:
        return pair(1, (640, 640), "float32") + pair(1, (640, 640), "bfloat16") + pair(8, (512, 683), "float16")
    out = []
    for image in IMAGES:
        for batch in (1, 8):
            for dtype in ("float32", "float16", "bfloat16"):
                out += pair(batch, image, dtype)
            out.append(_aot_launch((batch, 3) + image, "float64"))
    return out


OP = Op(
    name="nan_inf_flags",
    reference=nan_inf_flags_ref,
    check=check_args,
    description="which of one or two float tensors hold a NaN and which an infinity, one launch and one "
                "read: x[, y] -> one int of NAN|INF bits per tensor (the input and output checks)",
    role="network",
    tasks=(),  # a check inside the model's forward and the post-processing, not a task's computation
    impls=(Impl("triton", nan_inf_flags, devices=("cuda",), dtypes=_DTYPES, reasons=not_supported_reasons),),
    missing={"cpp": "the reference's one sum per tensor is the CPU path"},
    aot_launches=aot_launches,
)
