"""Optional backends: is the C++ extension loaded, is triton importable, and why not.

Nothing here runs at import time. ``load_cpp()`` imports ``maskformer._C`` once (which registers the
``torch.ops.maskformer.*`` CPU ops from ``csrc/``) and remembers the exception text if that fails,
so every later dispatch decision can say *why* the C++ path is off. Set
``MASKFORMER_DISABLE_CPP=1`` to pretend the extension is missing (read at first load).

Thread-safe: the first loads run under a lock and publish their result only when complete, so
threads racing on the first call all see the extension loaded, or all see why it is not.
"""
import functools
import os
import threading
from typing import List, Optional

import torch

__all__ = ["load_cpp", "cpp_import_error", "cpp_missing_ops", "triton_import_error", "triton_interpret_mode",
           "tf32_matmul_allowed", "cpu_model", "cpu_flags"]

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
                from . import _C as module  # noqa: F401  (loading the .so registers the ops)
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


@functools.lru_cache(maxsize=None)
def _register_fakes_once():
    """Shape functions of the C++ ops, so torch.compile / export / opcheck can trace them. They are
    also the Meta kernels: a call mixing a real meta tensor with CPU ones dispatches here, so they
    check devices (ValueError) rather than return an output that nothing wrote."""
    from maskformer._devices import check_same_device

    def fake_mask_einsum(class_queries_logits, masks_queries_logits):
        check_same_device("maskformer::mask_einsum", class_queries_logits=class_queries_logits,
                          masks_queries_logits=masks_queries_logits)
        b, q, k1 = class_queries_logits.shape
        return masks_queries_logits.new_empty((b, k1 - 1) + tuple(masks_queries_logits.shape[2:]), dtype=torch.float32)

    def fake_upsample_argmax_out(scores, out, resize, use_fma, channels_last_vec, scale_h=-1.0, scale_w=-1.0):
        check_same_device("maskformer::upsample_argmax_out", scores=scores, out=out)
        return out

    def fake_bilinear_resize(x, H, W, use_fma, channels_last_vec, scale_h=-1.0, scale_w=-1.0):
        return x.new_empty((x.shape[0], H, W), dtype=torch.float32)

    def fake_query_argmax_out(mask_probs, weights, mask_threshold, resize, use_fma, channels_last_vec, allow_prune,
                              labels, own_area, scale_h=-1.0, scale_w=-1.0):
        check_same_device("maskformer::query_argmax_out", mask_probs=mask_probs, weights=weights, labels=labels,
                          own_area=own_area)
        return None

    def fake_ms_deform_attn_cpu(value, spatial_shapes, sampling_locations, attention_weights):
        check_same_device("maskformer::ms_deform_attn_cpu", value=value, sampling_locations=sampling_locations,
                          attention_weights=attention_weights)
        b, _, nh, d = value.shape
        return value.new_empty((b, sampling_locations.shape[1], nh * d))

    def fake_ms_deform_attn_cpu_out(value, spatial_shapes, sampling_locations, attention_weights, out):
        check_same_device("maskformer::ms_deform_attn_cpu_out", value=value, sampling_locations=sampling_locations,
                          attention_weights=attention_weights, out=out)
        return out

    for name, fn in (
        ("maskformer::mask_einsum", fake_mask_einsum),
        ("maskformer::ms_deform_attn_cpu_out", fake_ms_deform_attn_cpu_out),
        ("maskformer::ms_deform_attn_cpu", fake_ms_deform_attn_cpu),
        ("maskformer::upsample_argmax_out", fake_upsample_argmax_out),
        ("maskformer::bilinear_resize", fake_bilinear_resize),
        ("maskformer::query_argmax_out", fake_query_argmax_out),
    ):
        if hasattr(torch.ops.maskformer, name.split("::")[1]):
            torch.library.register_fake(name)(fn)
    return True


def _register_fakes():
    try:
        _register_fakes_once()
    except Exception:  # an older torch without register_fake: eager use is unaffected
        pass


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
    import platform

    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags(names) -> "dict":
    """name -> whether the CPU has that ISA flag (``avx2``, ``avx512_bf16``...), for each of
    ``names``; all False where /proc/cpuinfo is not readable."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {name: name in flags for name in names}
