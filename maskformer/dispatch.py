"""Backend selection for maskformer's fast ops: reference PyTorch, Triton, or the C++ extension.

Choose with the ``MASKFORMER_BACKEND`` environment variable (read at every call, not at import) or
programmatically: ``with backend(name):`` forces a backend for the code inside the block, in this
thread (or asyncio task) only; ``set_backend(name)`` forces it process-wide, for every thread.
The block wins over the setter, the setter over the variable; ``set_backend(None)`` returns to it.
A function compiled by ``torch.compile`` keeps the backend it was traced with.

* ``reference``: pure PyTorch, the ``*_ref`` functions next to each kernel. Always available.
* ``triton``: the Triton kernels. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
* ``cpp``: the CPU kernels of ``maskformer._C`` (``csrc/``), when the extension was built.
* ``auto`` (default): Triton for CUDA tensors, C++ for CPU tensors, the reference otherwise or when
  the fast op cannot serve the call. Falling back is silent, but the reason is kept:
  ``last_dispatch(op)`` (and ``last_dispatch_reason``) say what ran and why in the calling thread,
  and the ``maskformer.dispatch`` logger says it at DEBUG level.

A *forced* backend (``triton`` or ``cpp``) never falls back: a call it cannot serve raises
``BackendNotSupportedError`` listing every reason (device, dtype, triton missing, extension not
built and why its import failed, TRITON_INTERPRET not set for CPU tensors, ...).

Each fast op declares what it supports through ``not_supported_reasons(...)`` (human-readable
reasons, [] when it can run), next to its kernel in ``maskformer/kernels/``. Importing this module
imports neither triton nor the extension and never initialises CUDA.

Whatever the backend, malformed arguments raise ValueError before any choice is made, tensors on
different devices included (a meta tensor among CPU tensors would otherwise reach an op's fake
kernel and come back as unwritten memory; ``maskformer._devices``). Tensors all on the meta device
run the reference (shape propagation); a forced fast backend refuses them.

Padded batches: ``upsample_argmax`` / ``semantic_segmentation`` take ``source_extents`` and
``query_argmax`` ``source_extent``, each image's valid region in mask pixels (fractional: logits
have stride 4), so that only that region is resized to the image's size; see
``maskformer.kernels.upsample_argmax.upsample_argmax_ref`` for the exact semantics.

Ops: ``mask_einsum``, ``upsample_argmax`` and their composition ``semantic_segmentation`` (the
whole of transformers' ``post_process_semantic_segmentation``); ``query_argmax`` (the per-pixel
step of ``post_process_panoptic_segmentation``: resize, score-weighted argmax over queries and
per-query mask areas; C++ only, the reference runs on CUDA); ``window_attention`` (the Swin
blocks' shifted-window attention, Triton only: the model asks ``select`` and runs its own
reference code when the answer is "reference"); ``ms_deform_attn`` (Mask2Former's multi-scale
deformable attention: Triton on CUDA, C++ on CPU).
"""
import contextlib
import contextvars
import dataclasses
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendNotSupportedError",
    "set_backend",
    "get_backend",
    "backend",
    "last_dispatch",
    "not_supported_reasons",
    "mask_einsum",
    "upsample_argmax",
    "semantic_segmentation",
    "query_argmax",
    "ms_deform_attn",
    "select",
    "describe",
]

BACKENDS = ("auto", "reference", "triton", "cpp")
ENV_VAR = "MASKFORMER_BACKEND"
OPS = ("mask_einsum", "upsample_argmax", "semantic_segmentation", "query_argmax", "window_attention",
       "ms_deform_attn")

_log = logging.getLogger(__name__)
_override: Optional[str] = None  # set_backend(): process-wide
_NOT_SET = "<not set>"
# with backend(): this thread / asyncio task only. None inside a block means "the variable".
_context_override: contextvars.ContextVar = contextvars.ContextVar("maskformer_backend", default=_NOT_SET)


class BackendNotSupportedError(RuntimeError):
    """A forced backend cannot serve the call; ``reasons`` lists why."""

    def __init__(self, op: str, backend_name: str, reasons: List[str], source: str):
        self.op, self.backend, self.reasons = op, backend_name, list(reasons)
        super().__init__(
            f"{op}: backend '{backend_name}' was forced ({source}) but cannot run: " + "; ".join(self.reasons)
        )


@dataclasses.dataclass(frozen=True)
class DispatchRecord:
    """What one call ran. ``refused``: fast backends considered and why each could not run."""

    op: str
    requested: str
    backend: str
    refused: Dict[str, List[str]]

    def __str__(self):
        why = "; ".join(f"{b} refused: {', '.join(r)}" for b, r in self.refused.items())
        return f"{self.op}: requested {self.requested}, ran {self.backend}" + (f" ({why})" if why else "")


class _Records(threading.local):
    """The latest decisions of the calling thread (a thread sees only its own calls)."""

    def __init__(self):
        self.by_op: Dict[str, DispatchRecord] = {}
        self.latest: Optional[DispatchRecord] = None


_records = _Records()


# ---------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------


def _validate_name(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown maskformer backend {name!r} ({source}); choose one of {', '.join(BACKENDS)}")
    return value


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op (``auto``, ``reference``, ``triton``, ``cpp``) in every thread of
    the process; None returns to ``MASKFORMER_BACKEND`` (default ``auto``). A ``with backend(...)``
    block still wins inside it. To choose for one thread or task only, use ``with backend(name):``."""
    global _override
    _override = None if name is None else _validate_name(name, "set_backend")


def _block_override() -> Optional[str]:
    return _context_override.get()


# torch.compile cannot trace ContextVar.get, so the value is read once, when tracing: what
# torch.compiler.assume_constant_result(fn) marks. That call imports torch._dynamo, and triton
# with it, which importing this module must not do; its mark is this attribute.
_block_override._dynamo_marked_constant = True


def _requested() -> Tuple[str, str]:
    """(backend, where the choice comes from)."""
    block = _block_override()
    if block not in (_NOT_SET, None):
        return block, "with backend()"
    if block is _NOT_SET and _override is not None:
        return _override, "set_backend()"
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        return _validate_name(env, f"{ENV_VAR}={env}"), f"{ENV_VAR}={env}"
    return "auto", "default"


def get_backend() -> str:
    """The requested backend: ``set_backend``'s if set, else ``MASKFORMER_BACKEND``, else ``auto``."""
    return _requested()[0]


@contextlib.contextmanager
def backend(name: Optional[str]):
    """``with backend("reference"): ...``: force a backend for the code inside the block, in this
    thread (or asyncio task) only; other threads keep theirs. Blocks nest, and each restores what
    was in force before it, whatever other threads do meanwhile. ``backend(None)`` uses
    ``MASKFORMER_BACKEND`` inside the block, ignoring ``set_backend``."""
    token = _context_override.set(None if name is None else _validate_name(name, "backend()"))
    try:
        yield
    finally:
        _context_override.reset(token)


def last_dispatch(op: Optional[str] = None) -> Optional[DispatchRecord]:
    """The calling thread's latest decision for ``op`` (any op when None), or None before its first call."""
    return _records.latest if op is None else _records.by_op.get(op)


def __getattr__(name):
    # ``last_dispatch_reason``: one line about the calling thread's latest decision (any op).
    if name == "last_dispatch_reason":
        return str(_records.latest) if _records.latest is not None else ""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _record(rec: DispatchRecord) -> str:
    # Not while tracing (torch.compile, torch.export): the decision is made once, at trace time,
    # and writing the thread's record from a compiled graph would make the next call fail the
    # guard on the record and recompile the whole model (measured: a second 2-minute compile of
    # the default model); torch.compile cannot trace an enabled logger call either.
    if torch.compiler.is_compiling():
        return rec.backend
    _records.by_op[rec.op] = rec
    _records.latest = rec
    _log.debug("%s", rec)
    return rec.backend


# ---------------------------------------------------------------------------------------------
# What each fast op supports
# ---------------------------------------------------------------------------------------------


def _kernels():
    # maskformer.kernels.* import neither triton nor the extension at import time.
    from maskformer.kernels import mask_einsum as me
    from maskformer.kernels import upsample_argmax as ua

    return me, ua


def _semantic_reasons(fast: str, class_queries_logits, masks_queries_logits, target_sizes=None,
                      out_dtype=torch.int64, source_extents=None) -> List[str]:
    me, ua = _kernels()
    cl, ml = class_queries_logits, masks_queries_logits
    if fast == "triton":
        # mask_einsum (Triton) then upsample_argmax (Triton) on its fp32 scores.
        reasons = me.not_supported_reasons(cl, ml)
        if ml.dim() == 4 and ml.shape[2] * ml.shape[3] * max(cl.shape[-1] - 1, 1) >= 2**31:
            reasons.append("one image's scores would have >= 2**31 elements: offsets are int32")
        return reasons
    # cpp: torch's own softmax/sigmoid/einsum per image (bit-identical scores), then the C++
    # upsample_argmax.
    reasons = list(_ext_cpp_missing("upsample_argmax_out"))
    for name, t in (("class_queries_logits", cl), ("masks_queries_logits", ml)):
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}: the C++ kernel is CPU-only")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if ml.dim() == 4 and ml.shape[2] * ml.shape[3] * max(cl.shape[-1] - 1, 1) >= 2**31:
        reasons.append("one image's scores would have >= 2**31 elements: offsets are int32")
    return reasons


def _ext_cpp_missing(*ops):
    from maskformer import _ext

    return _ext.cpp_missing_ops(*ops)


def not_supported_reasons(op: str, backend_name: str, *args, **kwargs) -> List[str]:
    """Why ``backend_name`` ("triton" or "cpp") cannot run ``op`` on these arguments; [] if it can.
    Arguments as the op's (``mask_einsum``, ``upsample_argmax``, ``semantic_segmentation``,
    ``query_argmax``, ``window_attention``, ``ms_deform_attn``)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if backend_name == "reference":
        return []
    if backend_name not in ("triton", "cpp"):
        raise ValueError(f"not a fast backend: {backend_name!r} (triton, cpp)")
    if op == "window_attention":
        if backend_name == "cpp":
            return ["window_attention has no C++ kernel (the reference PyTorch code is the CPU path)"]
        from maskformer.kernels import window_attention as wa

        return wa.not_supported_reasons(*args, **kwargs)
    if op == "ms_deform_attn":
        from maskformer.kernels import ms_deform_attn as msda

        fn = msda.not_supported_reasons if backend_name == "triton" else msda.cpp_not_supported_reasons
        return fn(*args, **kwargs)
    if op == "query_argmax":
        from maskformer.kernels import query_argmax as qa

        fn = qa.not_supported_reasons if backend_name == "triton" else qa.cpp_not_supported_reasons
        return fn(*args, **kwargs)
    me, ua = _kernels()
    if op == "mask_einsum":
        fn = me.not_supported_reasons if backend_name == "triton" else me.cpp_not_supported_reasons
        return fn(*args, **kwargs)
    if op == "upsample_argmax":
        fn = ua.not_supported_reasons if backend_name == "triton" else ua.cpp_not_supported_reasons
        return fn(*args, **kwargs)
    return _semantic_reasons(backend_name, *args, **kwargs)


def candidate(device: torch.device) -> Optional[str]:
    """The fast backend a call on ``device`` would try ("triton" or "cpp"), or None when the
    reference is requested or no fast backend exists for the device. Records nothing: callers use
    it to skip preparing arguments (e.g. fused weights) that only a fast path would read."""
    requested = _requested()[0]
    if requested == "reference":
        return None
    if requested in ("triton", "cpp"):
        return requested
    return {"cuda": "triton", "cpu": "cpp"}.get(torch.device(device).type)


def _choose(op: str, device: torch.device, *args) -> str:
    requested, source = _requested()
    if requested == "reference":
        return _record(DispatchRecord(op, requested, "reference", {}))
    if requested in ("triton", "cpp"):
        reasons = not_supported_reasons(op, requested, *args)
        if reasons:
            _record(DispatchRecord(op, requested, "none (raised)", {requested: reasons}))
            raise BackendNotSupportedError(op, requested, reasons, source)
        return _record(DispatchRecord(op, requested, requested, {}))
    # auto: one fast candidate per device type.
    fast = candidate(device)
    if fast is None:
        return _record(DispatchRecord(op, requested, "reference", {"fast": [f"no fast backend for {device.type}"]}))
    reasons = not_supported_reasons(op, fast, *args)
    if reasons:
        return _record(DispatchRecord(op, requested, "reference", {fast: reasons}))
    return _record(DispatchRecord(op, requested, fast, {}))


def select(op: str, device: torch.device, *args) -> str:
    """The backend that runs ``op`` on these arguments: "reference", "triton" or "cpp".

    For ops whose reference lives in a model module (``window_attention``): the caller runs its
    own code on "reference". Honours forcing (raises ``BackendNotSupportedError``) and records
    the decision like every other op."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if op == "window_attention":
        from maskformer.kernels import window_attention as wa

        wa.check_devices(*args[:4])
    return _choose(op, device, *args)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def mask_einsum(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """Semantic class scores (B, Q, K+1), (B, Q, h, w) -> (B, K, h, w); see
    ``maskformer.kernels.mask_einsum``. The fast backends agree with the reference to a few fp32
    ulps (not bit for bit). ValueError for malformed shapes or tensors on different devices."""
    me, _ = _kernels()
    me._check_shapes(class_queries_logits, masks_queries_logits)
    name = _choose("mask_einsum", masks_queries_logits.device, class_queries_logits, masks_queries_logits)
    if name == "triton":
        return me.mask_einsum(class_queries_logits, masks_queries_logits)
    if name == "cpp":
        return me.mask_einsum_cpp(class_queries_logits, masks_queries_logits)
    return me.mask_einsum_ref(class_queries_logits, masks_queries_logits)


def upsample_argmax(
    scores: torch.Tensor,
    target_sizes=None,
    out_dtype: torch.dtype = torch.int64,
    out=None,
    source_extents=None,
):
    """Bilinear resize (align_corners=False) + argmax over classes without (K, H, W) scores; see
    ``maskformer.kernels.upsample_argmax``. Every backend gives the reference's labels exactly.

    Args:
        scores: (K, h, w) or (B, K, h, w) float class scores (fp32, or fp16/bf16 computed as their
            fp32 upcast).
        target_sizes: (K, h, w): one (H, W) pair or None; (B, K, h, w): B pairs or None. None: no
            resize.
        out_dtype: int64 (default), int32, int16 or uint8 when K - 1 fits.
        out: optional preallocated contiguous label map(s) of the result's shape and dtype.
        source_extents: None, or each image's valid region ``(eh, ew)`` in score pixels (floats,
            ``0 < eh <= h``, ``0 < ew <= w``): one pair (or None) for (K, h, w), B entries each a
            pair or None for (B, K, h, w). Only rows [0, eh) and columns [0, ew) are read: the view
            ``[:, :ceil(eh), :ceil(ew)]`` is resized with aten's scale factors H / eh, W / ew (None
            where the extent is an integer), so the first eh rows map exactly onto the H output
            rows. Without a target size the labels are at (ceil(eh), ceil(ew)). A full extent
            (h, w) gives the same labels as None.

    Returns:
        (H, W) labels for (K, h, w) scores, a list of B (H_b, W_b) maps for (B, K, h, w), of
        ``out_dtype``; ties to the lowest class, NaN wins (torch.argmax).
    """
    _, ua = _kernels()
    reasons = ua._arg_reasons(scores, target_sizes, out_dtype, out, source_extents)
    if reasons:
        raise ValueError("upsample_argmax: " + "; ".join(reasons))
    name = _choose("upsample_argmax", scores.device, scores, target_sizes, out_dtype, out, source_extents)
    fn = {"triton": ua.upsample_argmax, "cpp": ua.upsample_argmax_cpp}.get(name, ua.upsample_argmax_ref)
    return fn(scores, target_sizes, out_dtype, out, source_extents)


def _validate_semantic(class_queries_logits, masks_queries_logits, target_sizes, out_dtype, source_extents):
    """(sizes, extents) per image, or ValueError."""
    me, ua = _kernels()
    me._check_shapes(class_queries_logits, masks_queries_logits)
    batch = class_queries_logits.shape[0]
    sizes = None
    if target_sizes is not None:
        if len(target_sizes) != batch:
            raise ValueError(
                "Make sure that you pass in as many target sizes as the batch dimension of the logits "
                f"({len(target_sizes)} target sizes, batch {batch})"
            )
        sizes = [ua._as_size(s) for s in target_sizes]
    ua._check_out_dtype(out_dtype, class_queries_logits.shape[-1] - 1)
    extents = ua._extents(masks_queries_logits, source_extents, batched=True)
    return sizes, (None if source_extents is None else extents)


def semantic_segmentation(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    out_dtype: torch.dtype = torch.int64,
    source_extents: Optional[Sequence[Optional[Tuple[float, float]]]] = None,
) -> List[torch.Tensor]:
    """transformers' ``post_process_semantic_segmentation`` on raw logits, label maps only.

    Args:
        class_queries_logits: (B, Q, K+1) float (fp32/fp16/bf16; fp16/bf16 computed in fp32).
        masks_queries_logits: (B, Q, h, w) float, on the same device.
        target_sizes: None (labels at (h, w), or at the crop size) or B (H_b, W_b) pairs.
        out_dtype: int64 (transformers' dtype), or int32/int16/uint8 when K - 1 fits.
        source_extents: None (transformers: the whole, possibly padded, logits are resized), or B
            entries, each None or the image's valid region ``(eh, ew)`` in mask-logit pixels
            (floats, ``0 < eh <= h``, ``0 < ew <= w``; an image of 803 padded-input rows at stride
            4 spans 200.75 rows). The class scores are computed on the whole batch as transformers
            does, then each image's scores are cropped to ``[:, :ceil(eh), :ceil(ew)]`` and resized
            so that the first eh rows map exactly onto its H_b rows (``upsample_argmax``); padding
            never influences the labels.

    Returns:
        B label maps (H_b, W_b) (or (h, w), or the crop size). Identical to transformers' for fp32
        inputs without extents: the reference path is ``upsample_argmax_ref(mask_einsum_ref(...))``,
        i.e. transformers' ops; the ``cpp`` path computes the scores with those same torch ops
        (bit-identical; the einsum one image at a time, so one (K, h, w) score map is alive besides
        the batch's sigmoid) and labels them with the C++ upsample_argmax, which reproduces torch's
        interpolation rounding (and reads a crop in place); the ``triton`` path fuses the scores too
        (a few ulps from torch's einsum, so labels are identical except where two classes tie
        within that).
    """
    sizes, extents = _validate_semantic(class_queries_logits, masks_queries_logits, target_sizes, out_dtype,
                                        source_extents)
    batch = class_queries_logits.shape[0]
    name = _choose(
        "semantic_segmentation", masks_queries_logits.device, class_queries_logits, masks_queries_logits,
        target_sizes, out_dtype, source_extents,
    )
    if batch == 0:
        return []
    me, ua = _kernels()
    if name == "triton":
        scores = me.mask_einsum(class_queries_logits, masks_queries_logits)
        return ua.upsample_argmax(scores, sizes, out_dtype, source_extents=extents)
    if name == "cpp":
        # transformers' softmax and sigmoid over the whole batch (see ref_factors: the sigmoid's
        # rounding depends on the batch), then its einsum one image at a time: only one image's
        # (K, h, w) scores are alive, and they are transformers' bit for bit.
        masks_classes, masks_probs = me.ref_factors(class_queries_logits, masks_queries_logits)
        labels = []
        for i in range(batch):
            scores = me.ref_contract(masks_classes[i : i + 1], masks_probs[i : i + 1])[0]
            labels.append(ua.upsample_argmax_cpp(scores, None if sizes is None else sizes[i], out_dtype,
                                                 source_extents=None if extents is None else extents[i]))
            del scores
        return labels
    return ua.upsample_argmax_ref(me.mask_einsum_ref(class_queries_logits, masks_queries_logits), sizes, out_dtype,
                                  source_extents=extents)


def query_argmax(
    mask_probs: torch.Tensor,
    weights: torch.Tensor,
    target_size: Optional[Tuple[int, int]] = None,
    mask_threshold: float = 0.5,
    source_extent: Optional[Tuple[float, float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel step of panoptic post-processing on one image's kept queries, without a
    (Q, H, W) tensor on the C++ backend; see ``maskformer.kernels.query_argmax``.

    Args:
        mask_probs: (Q, h, w) float mask probabilities, Q >= 1.
        weights: (Q,) float per-query weights (class scores), on mask_probs' device.
        target_size: (H, W) for a bilinear resize (align_corners=False) first, or None.
        mask_threshold: own-mask threshold, compared in mask_probs' dtype.
        source_extent: None, or the image's valid region ``(eh, ew)`` in mask pixels (floats,
            ``0 < eh <= h``, ``0 < ew <= w``): mask_probs is cropped to ``[:, :ceil(eh),
            :ceil(ew)]`` and resized so that the first eh rows map exactly onto the H output rows
            (aten's scale factor H / eh, none for an integer eh); without a target size the result
            is at the crop size. The full extent (h, w) is the same as None.

    Returns:
        ``(labels (H, W) int64, own_area (Q,) int64)``: ``argmax_q weights[q] * P[q]`` (first index
        on ties) and ``#{P[q] >= mask_threshold}``, P the resized probabilities. Every backend
        gives the reference's (``query_argmax_ref``, the processor's torch ops) exactly.
    """
    from maskformer.kernels import query_argmax as qa

    qa._check_args(mask_probs, weights, target_size, source_extent)  # ValueError whatever the backend
    name = _choose("query_argmax", mask_probs.device, mask_probs, weights, target_size, mask_threshold, source_extent)
    if name == "cpp":
        return qa.query_argmax_cpp(mask_probs, weights, target_size, mask_threshold, source_extent=source_extent)
    return qa.query_argmax_ref(mask_probs, weights, target_size, mask_threshold, source_extent)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Mask2Former's pixel decoder); see
    ``maskformer.kernels.ms_deform_attn``.

    Args:
        value: (B, S, H, D), the L levels' maps flattened row-major and concatenated.
        spatial_shapes: L (h, w) pairs of ints, S = sum(h * w).
        sampling_locations: (B, Q, H, L, P, 2), (x, y) in [0, 1] (``align_corners=False``; points
            outside read zeros).
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H*D) in value's dtype. The reference is transformers' function bit for bit; the
        Triton kernel (CUDA) and the C++ kernel (CPU, ``csrc/ms_deform_attn.cpp``) compute in fp32
        and agree within the reference's own rounding error; without the extension the reference
        runs on CPU (``auto`` records why). ValueError for malformed shapes or tensors on different
        devices, whatever the backend.
    """
    from maskformer.kernels import ms_deform_attn as msda

    msda._check_devices(value, sampling_locations, attention_weights)
    shapes = msda.check_ms_deform_attn_args(value, spatial_shapes, sampling_locations, attention_weights)
    name = _choose("ms_deform_attn", value.device, value, shapes, sampling_locations, attention_weights)
    if name == "triton":
        return msda.ms_deform_attn(value, shapes, sampling_locations, attention_weights)
    if name == "cpp":
        return msda.ms_deform_attn_cpp(value, shapes, sampling_locations, attention_weights)
    return msda.ms_deform_attn_ref(value, shapes, sampling_locations, attention_weights)


def describe() -> Dict[str, Union[str, Dict[str, str]]]:
    """The requested backend and the availability of each fast one, for reports and the CLI."""
    from maskformer import _ext

    requested, source = _requested()
    cpp_err = _ext.cpp_import_error()
    triton_err = _ext.triton_import_error()
    if triton_err is not None:
        triton_state = triton_err
    elif torch.cuda.is_available():
        triton_state = "available (CUDA" + (", and CPU tensors: TRITON_INTERPRET=1)" if _ext.triton_interpret_mode() else ")")
    elif _ext.triton_interpret_mode():
        triton_state = "installed, no CUDA device: runs on CPU tensors only because TRITON_INTERPRET=1 (slow; for tests)"
    else:
        triton_state = "installed, no CUDA device: the Triton kernels cannot run here"
    info = {
        "requested": requested,
        "source": source,
        "cpp": "available" if cpp_err is None else cpp_err,
        "triton": triton_state,
    }
    if _records.by_op:
        info["last"] = {op: str(rec) for op, rec in _records.by_op.items()}
    return info
