"""Optional backends: is the C++ extension loaded, is triton importable, and why not.

Nothing here runs at import time. ``load_cpp()`` imports ``maskformer._C`` once (which registers the
``torch.ops.maskformer.*`` CPU ops from ``csrc/``) and remembers the exception text if that fails,
so every later dispatch decision can say *why* the C++ path is off. Set
``MASKFORMER_DISABLE_CPP=1`` to pretend the extension is missing (read at first load).

Thread-safe: the first loads run under a lock and publish their result only when complete, so
threads racing on the first call all see the extension loaded, or all see why it is not.
"""
import contextlib
import functools
import importlib
import os
import platform
import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

__all__ = ["load_cpp", "cpp_import_error", "cpp_missing_ops", "register_fakes_on_load", "triton_import_error",
           "triton_interpret_mode", "tf32_matmul_allowed", "tf32_matmul", "cpu_model", "cpu_flags", "cpu_features",
           "native_cpu_bf16"]

_cpp_module = None
_cpp_error: Optional[str] = None
_cpp_tried = False  # set last, once _cpp_module or _cpp_error holds the outcome
_load_lock = threading.Lock()


def load_cpp():
    """The ``maskformer._C`` module, or None (then ``cpp_import_error()`` says why). Cached."""
    global _cpp_module, _cpp_error, _cpp_tried
    if _cpp_tried:  # fast path: the outcome is published (and never changes afterwards)
        return _cpp_module
    with _load_lock:
        if _cpp_tried:  # another thread finished the load while this one waited
            return _cpp_module
        module, error = None, None
        if os.environ.get("MASKFORMER_DISABLE_CPP", "0").strip().lower() in ("1", "true", "yes", "on"):
            error = "disabled by MASKFORMER_DISABLE_CPP"
        else:
            try:
                # Loading the .so registers the ops. By its full name: ``from . import _C`` is an
                # import of the package __init__ (the top layer) from this bottom one.
                module = importlib.import_module("maskformer._C")
            except Exception as exc:  # ImportError when not built; OSError/undefined symbol when built against another torch
                error = (
                    f"maskformer._C could not be imported ({type(exc).__name__}: {exc}); build it with "
                    "`pip install --no-build-isolation -e .` (needs a C++ compiler)"
                )
            else:
                _register_fakes()
        _cpp_module, _cpp_error = module, error
        _cpp_tried = True
    return _cpp_module


def cpp_import_error() -> Optional[str]:
    """Why the C++ extension is unusable, or None when it loaded."""
    load_cpp()
    return _cpp_error


def cpp_missing_ops(*names: str) -> List[str]:
    """Reasons for ops of ``torch.ops.maskformer`` that the loaded extension does not provide
    (an extension built from an older checkout)."""
    if load_cpp() is None:
        return [cpp_import_error()]
    missing = [n for n in names if not hasattr(torch.ops.maskformer, n)]
    return [f"maskformer._C has no op {', '.join(missing)} (stale build? rebuild the extension)"] if missing else []


# Fake (meta) kernels of the C++ ops, declared by the op modules that call them (each
# ``kernels/<op>.py``'s ``Op(fakes=...)``): qualified op name -> function. Registered with
# torch.library once the extension is loaded, so torch.compile / export / opcheck can trace the
# ops. They are also the Meta kernels: a call mixing a real meta tensor with CPU ones dispatches
# there, so each checks devices (ValueError) rather than return an output nothing wrote.
_fakes: Dict[str, Callable] = {}
_fakes_registered: set = set()


def register_fakes_on_load(fakes: Dict[str, Callable]) -> None:
    """Register ``fakes`` ({"maskformer::op": fake}) with ``torch.library.register_fake`` when the
    extension loads, or now if it is loaded. ValueError when another fake of a name was declared."""
    with _load_lock:
        for name, fn in fakes.items():
            if _fakes.get(name, fn) is not fn:
                raise ValueError(f"two fake kernels declared for {name}: {_fakes[name].__module__} and {fn.__module__}")
            _fakes[name] = fn
        if _cpp_module is not None:
            _register_fakes()


def _register_fakes() -> None:
    """Register the declared fakes not yet registered (the caller holds _load_lock). Ops missing
    from the loaded extension (an older build) are skipped: the dispatch reasons name them."""
    for name, fn in _fakes.items():
        if name in _fakes_registered or not hasattr(torch.ops.maskformer, name.split("::")[1]):
            continue
        try:
            torch.library.register_fake(name)(fn)
        except Exception:  # an older torch without register_fake: eager use is unaffected
            pass
        _fakes_registered.add(name)


_UNCHECKED = object()
_triton_error = _UNCHECKED  # a plain global, not lru_cache: torch.compile reads it as a constant


def triton_import_error() -> Optional[str]:
    """Why triton cannot be used, or None. Importing triton happens here, on first call."""
    global _triton_error
    if _triton_error is _UNCHECKED:
        with _load_lock:
            if _triton_error is _UNCHECKED:
                try:
                    import triton  # noqa: F401
                    import triton.language  # noqa: F401

                    error = None
                except Exception as exc:  # ImportError, or a broken install raising anything else
                    error = f"triton is not importable ({type(exc).__name__}: {exc})"
                _triton_error = error
    return _triton_error


def triton_interpret_mode() -> bool:
    """Whether TRITON_INTERPRET is on (then Triton kernels run on CPU tensors, in numpy).

    Read from the environment, the source triton's own ``knobs.runtime.interpret`` reads: unlike
    the knob (a C++ getenv), torch.compile can trace an ``os.environ`` lookup, so the dispatch
    checks compile without a graph break.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")




def tf32_matmul_allowed() -> bool:
    """torch's policy for fp32 matmuls on CUDA, which the fp32 Triton dots follow: True when they
    may use TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``torch.set_float32_matmul_precision``
    "high"/"medium"), False for exact fp32 (torch's default). torch refuses ``allow_tf32`` once its
    legacy and new TF32 settings were mixed; then the new setting (or the global one it inherits)
    decides, as it does for cuBLAS."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        precision = getattr(matmul, "fp32_precision", "none")
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"


@contextlib.contextmanager
def tf32_matmul(allowed: bool) -> Iterator[None]:
    """torch's fp32 matmul policy set to TF32 (True) or exact fp32 (False) inside the block, with
    the new API (``fp32_precision``; mixing it with ``allow_tf32`` makes torch refuse to answer).
    For compiling or timing the kernels under each policy (``benchmarks/aot.py``)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if allowed else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


# ---------------------------------------------------------------------------------------------
# The CPU: what every CPU figure must be recorded with (model, ISA flags), from /proc/cpuinfo.
@functools.lru_cache(maxsize=None)
def _cpuinfo_field(prefix: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC ..."), or platform.processor(), or "unknown"."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags(names) -> "dict":
    """name -> whether the CPU has that ISA flag (``avx2``, ``avx512_bf16``...), for each of
    ``names``; all False where /proc/cpuinfo is not readable."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {name: name in flags for name in names}


def cpu_features() -> "dict":
    """The x86 features that decide CPU speed here (from /proc/cpuinfo; all False elsewhere)."""
    return cpu_flags(("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), where bf16 can beat fp32."""
    feats = cpu_features()
    return feats["avx512_bf16"] or feats["amx_bf16"]
