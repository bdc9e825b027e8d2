"""Which precisions this CPU computes natively, and the switch of the bf16 CPU fast path.

``cpu_precisions()`` answers "what can I ask of this CPU" for ``maskformer info``: for float32,
bfloat16, float16 and int8, whether the CPU has instructions that compute in it (bf16 dot products:
``avx512_bf16`` or AMX; fp16 arithmetic: ``avx512_fp16`` or AMX-FP16; int8 dot products: VNNI or
AMX) or whether oneDNN/PyTorch would emulate it through fp32, naming the missing flags.

The bf16 fast path (``use_fast_cpu_bf16``) is what the model modules switch on: on a CPU with
native bf16, with bf16 weights and activations, the Swin blocks run their GEMMs through oneDNN's
linear (bias and GELU/ReLU applied to the fp32 accumulator before the one rounding to bf16) and
the window attention with fp32 scores and softmax (``SwinLayer.forward_fast_cpu_bf16``). On under
the ``auto`` backend only (``maskformer.dispatch``): ``reference`` runs transformers' operations, a
forced ``triton`` or ``cpp`` what it names. Off when gradients are needed, in training mode, under
autocast, while tracing (``torch.compile``/``torch.export``: the reference path is what is
exported), on a CPU without native bf16 (there oneDNN converts bf16 through fp32 arithmetic; not
measured here, this project's CPU has avx512_bf16) and where torch lacks the oneDNN ops.
``set_fast_cpu_bf16(False)`` turns it off for the process (benchmarks and tests toggle it on
identical weights); float32 never takes it, so float32 results are the same either way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

import torch

from ._ext import cpu_flags

__all__ = ["PrecisionSupport", "cpu_precisions", "native_precisions", "cpu_bf16_native", "set_fast_cpu_bf16",
           "fast_cpu_bf16_enabled", "use_fast_cpu_bf16"]

# (precision, flags any one of which makes it native, what those flags do); x86 names as in /proc/cpuinfo.
_NATIVE_FLAGS: Tuple[Tuple[str, Tuple[str, ...], str], ...] = (
    ("float32", ("avx512f", "avx2", "fma"), "fp32 FMA"),
    ("bfloat16", ("avx512_bf16", "amx_bf16"), "bf16 dot products (vdpbf16ps / AMX tiles)"),
    ("float16", ("avx512_fp16", "amx_fp16"), "fp16 arithmetic (AVX512-FP16 / AMX-FP16)"),
    ("int8", ("amx_int8", "avx512_vnni", "avx_vnni"), "int8 dot products (VNNI / AMX)"),
)


@dataclasses.dataclass(frozen=True)
class PrecisionSupport:
    """One precision on this CPU. ``native``: the CPU computes in it (``via``: the flags it has);
    otherwise ``why_not`` names the missing flags and what happens instead."""

    precision: str
    native: bool
    via: Tuple[str, ...]
    why_not: Optional[str] = None

    def describe(self) -> str:
        if self.native:
            return f"native ({', '.join(self.via)})"
        return f"not native: {self.why_not}"


def _cpu_flags() -> Dict[str, bool]:
    return cpu_flags(sorted({f for _, flags, _ in _NATIVE_FLAGS for f in flags}))


@functools.lru_cache(maxsize=None)
def cpu_precisions() -> Tuple[PrecisionSupport, ...]:
    """float32, bfloat16, float16, int8 on this CPU (x86 flags from /proc/cpuinfo; where that
    cannot be read, every reduced precision says so). Cached: the CPU does not change."""
    flags = _cpu_flags()
    readable = any(flags.values())
    out: List[PrecisionSupport] = []
    for precision, wanted, what in _NATIVE_FLAGS:
        have = tuple(f for f in wanted if flags.get(f))
        if precision == "float32":
            # Always computed natively; the flags only say how wide.
            out.append(PrecisionSupport(precision, True, have or ("scalar/SSE",)))
        elif have:
            out.append(PrecisionSupport(precision, True, have))
        elif not readable:
            out.append(PrecisionSupport(precision, False, (), "CPU flags unknown (no x86 flags in /proc/cpuinfo)"))
        else:
            instead = {
                "bfloat16": "bf16 is converted to fp32 around fp32 arithmetic (oneDNN/PyTorch emulation): "
                            "expect no speed-up over float32; use float32",
                "float16": "fp16 is converted to fp32 around fp32 arithmetic (emulation: Swin-T took 33 s per "
                           "image in fp16 against 1.0 s in fp32 on an AVX2 EPYC, maskformer.bench); use float32",
                "int8": "no int8 dot-product instructions: quantized GEMMs gain little or nothing here",
            }[precision]
            out.append(PrecisionSupport(precision, False, (), f"needs {' or '.join(wanted)} ({what}); {instead}"))
    return tuple(out)


def native_precisions() -> Dict[str, str]:
    """{precision: one line} for ``maskformer info``, e.g. ``{"bfloat16": "native (avx512_bf16)",
    "float16": "not native: needs avx512_fp16 or amx_fp16 (...); ..."}``."""
    return {p.precision: p.describe() for p in cpu_precisions()}


def cpu_bf16_native() -> bool:
    """True when this CPU has bf16 dot-product instructions (``avx512_bf16`` or ``amx_bf16``)."""
    return next(p for p in cpu_precisions() if p.precision == "bfloat16").native


# ---------------------------------------------------------------------------------------------
# The switch of the bf16 CPU fast path
_fast_cpu_bf16 = True


def set_fast_cpu_bf16(enabled: bool) -> None:
    """Allow (default) or forbid the bf16 CPU fast path in every thread of the process."""
    global _fast_cpu_bf16
    _fast_cpu_bf16 = bool(enabled)


def fast_cpu_bf16_enabled() -> bool:
    return _fast_cpu_bf16


@functools.lru_cache(maxsize=None)
def _fast_cpu_bf16_available() -> bool:
    # The fused linear is oneDNN's (torch.ops.mkldnn._linear_pointwise, what inductor's CPU
    # fusions call); a torch built without oneDNN has no such op.
    return (cpu_bf16_native() and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def use_fast_cpu_bf16(x: torch.Tensor, module: Optional[torch.nn.Module] = None) -> bool:
    """Whether ``module``, called on activations ``x``, takes the bf16 CPU fast path now: x bf16 on
    the CPU, every parameter of ``module`` bf16, inference (eval mode, no gradient needed), no
    autocast, not tracing, the ``auto`` backend, switched on, and a CPU with native bf16."""
    if not _fast_cpu_bf16 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False  # tracing exports the reference; autocast decides dtypes op by op itself
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if module is not None:
        if module.training:
            return False
        grad = torch.is_grad_enabled()
        # bf16 weights only (a module cast in part, or fp32 weights under bf16 activations, runs
        # the reference), none requiring grad when grad mode is on
        if any(p.dtype != torch.bfloat16 or (grad and p.requires_grad) for p in module.parameters()):
            return False
    # dispatch loads every op module when imported (and refuses a bad MASKFORMER_OP_MODULES):
    # kept out of `import maskformer`, which imports this module through swin.py.
    from . import dispatch

    return dispatch.get_backend() == "auto" and _fast_cpu_bf16_available()
