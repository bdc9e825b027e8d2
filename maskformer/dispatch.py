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

The ops are those of ``maskformer.kernels.registry``: each ``kernels/<op>.py`` declares its
reference, its implementations (backend, devices, dtypes, a reasons function: why it cannot serve
a call, human-readable, [] when it can) and its argument check. This module is generic: it names no
op. Every registered op is a function here with its reference's arguments
(``dispatch.upsample_argmax(scores, ...)``, ``dispatch.query_argmax(...)``, ...), and
``call(name, *args, **kwargs)`` does the same by name; ``select(name, device, *args)`` only chooses,
for an op whose caller runs its own reference code (``window_attention``: the Swin block).
``auto`` offers a call to the implementations that declare the tensors' device type, in declared
order; the first with no reasons runs. Importing this module loads the registered op modules,
which import neither triton nor the extension; nothing here initialises CUDA.

Whatever the backend, malformed arguments raise ValueError before any choice is made, tensors on
different devices included (a meta tensor among CPU tensors would otherwise reach an op's fake
kernel and come back as unwritten memory; ``maskformer._devices``). Tensors all on the meta device
run the reference (shape propagation); a forced fast backend refuses them.

Padded batches: ``upsample_argmax`` / ``semantic_segmentation`` take ``source_extents`` and
``query_argmax`` ``source_extent``, each image's valid region in mask pixels (fractional: logits
have stride 4), so that only that region is resized to the image's size; see
``maskformer.kernels.upsample_argmax.upsample_argmax_ref`` for the exact semantics.

Ops (``describe()["ops"]``, ``maskformer info``): ``mask_einsum``, ``upsample_argmax`` and their
composition ``semantic_segmentation`` (the whole of transformers' ``post_process_semantic_segmentation``),
``query_argmax`` (the per-pixel step of panoptic post-processing), ``window_attention`` (Swin) and
``ms_deform_attn`` (Mask2Former's pixel decoder), and any op registered besides them.
"""
import contextlib
import contextvars
import dataclasses
import logging
import os
import textwrap
import threading
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from maskformer import _ext
from maskformer.kernels import registry

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendNotSupportedError",
    "set_backend",
    "get_backend",
    "backend",
    "last_dispatch",
    "not_supported_reasons",
    "call",
    "select",
    "candidate",
    "describe",
    "ops",
]  # and every registered op's function, appended below

BACKENDS = ("auto", "reference") + registry.FAST_BACKENDS
ENV_VAR = "MASKFORMER_BACKEND"
# The fast backend a device type's tensors get first under auto (what ``candidate`` answers); the
# refusal an op without an implementation there records is under this name.
_AUTO_BACKEND = {"cuda": "triton", "cpu": "cpp"}

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
    # An op registered after this module was imported (registry.register): its function, installed.
    if not name.startswith("__") and name in registry.names():
        return _install(registry.get(name))
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
# Choosing among an op's implementations
# ---------------------------------------------------------------------------------------------


def ops() -> List[str]:
    """The registered ops' names (``maskformer.kernels.registry``)."""
    return registry.names()


def not_supported_reasons(op: str, backend_name: str, *args, **kwargs) -> List[str]:
    """Why ``backend_name`` ("triton" or "cpp") cannot run ``op`` on these arguments (the op's
    reference's arguments); [] if it can, and always for "reference"."""
    declared = registry.get(op)
    if backend_name == "reference":
        return []
    if backend_name not in registry.FAST_BACKENDS:
        raise ValueError(f"not a fast backend: {backend_name!r} ({', '.join(registry.FAST_BACKENDS)})")
    impl = declared.impl(backend_name)
    return [declared.no_impl_reason(backend_name)] if impl is None else impl.reasons(*args, **kwargs)


def candidate(device: torch.device) -> Optional[str]:
    """The fast backend a call on ``device`` would try ("triton" or "cpp"), or None when the
    reference is requested or no fast backend exists for the device. Records nothing: callers use
    it to skip preparing arguments (e.g. fused weights) that only a fast path would read."""
    requested = _requested()[0]
    if requested == "reference":
        return None
    if requested in registry.FAST_BACKENDS:
        return requested
    return _AUTO_BACKEND.get(torch.device(device).type)


def _choose(op: registry.Op, device: torch.device, args: tuple, kwargs: dict) -> Optional[registry.Impl]:
    """The implementation that runs (None: the reference), recorded; raises
    BackendNotSupportedError when a forced backend cannot serve the call."""
    requested, source = _requested()
    if requested == "reference":
        _record(DispatchRecord(op.name, requested, "reference", {}))
        return None
    if requested in registry.FAST_BACKENDS:
        impl = op.impl(requested)
        reasons = [op.no_impl_reason(requested)] if impl is None else impl.reasons(*args, **kwargs)
        if reasons:
            _record(DispatchRecord(op.name, requested, "none (raised)", {requested: reasons}))
            raise BackendNotSupportedError(op.name, requested, reasons, source)
        _record(DispatchRecord(op.name, requested, requested, {}))
        return impl
    # auto: the implementations declared for the tensors' device type, in declared order.
    offered = [impl for impl in op.impls if device.type in impl.devices]
    refused: Dict[str, List[str]] = {}
    if not offered:
        fast = _AUTO_BACKEND.get(device.type)
        refused = {fast: [op.no_impl_reason(fast)]} if fast else {"fast": [f"no fast backend for {device.type}"]}
    for impl in offered:
        reasons = impl.reasons(*args, **kwargs)
        if not reasons:
            _record(DispatchRecord(op.name, requested, impl.backend, refused))
            return impl
        refused[impl.backend] = reasons
    _record(DispatchRecord(op.name, requested, "reference", refused))
    return None


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    """The device of the call's first tensor (the op's check has made sure they share one)."""
    for value in args + tuple(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def select(op: str, device: torch.device, *args) -> str:
    """The backend that runs ``op`` on these arguments: "reference", "triton" or "cpp".

    For ops whose caller runs its own reference code (``window_attention``: the Swin block): the
    caller runs its code on "reference". Runs the op's argument check, honours forcing (raises
    ``BackendNotSupportedError``) and records the decision like every other call."""
    declared = registry.get(op)
    declared.check(*args)
    impl = _choose(declared, torch.device(device), args, {})
    return "reference" if impl is None else impl.backend


def call(op: str, *args, **kwargs):
    """Run ``op`` (a registered op's name) on the chosen implementation: its argument check
    (ValueError whatever the backend), then the forced backend, or under ``auto`` the first
    implementation declared for the tensors' device type that can serve the call, else the
    reference. Arguments and result as the op's reference."""
    declared = registry.get(op)
    declared.check(*args, **kwargs)
    impl = _choose(declared, _device_of(args, kwargs), args, kwargs)
    return (declared.reference if impl is None else impl.fn)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# One function per registered op: dispatch.<op>(...) is call("<op>", ...)
# ---------------------------------------------------------------------------------------------


def _op_function(op: registry.Op) -> Callable:
    name = op.name

    def run(*args, **kwargs):
        return call(name, *args, **kwargs)

    impls = ", ".join(f"{i.backend} ({', '.join(i.devices)})" for i in op.impls) or "none"
    ref = op.reference
    run.__name__ = run.__qualname__ = name
    run.__module__ = __name__
    run.__wrapped__ = ref  # inspect.signature and help() show the reference's arguments
    run.__doc__ = (f"{op.description}.\n\nDispatched by ``maskformer.dispatch`` ({op.role}): implementations {impls}, "
                   f"else the reference ``{ref.__module__}.{ref.__qualname__}``, whose arguments and result these are; "
                   f"ValueError for malformed arguments whatever the backend, BackendNotSupportedError when a forced "
                   f"backend cannot serve the call.\n\n{textwrap.dedent(ref.__doc__ or '')}")
    return run


def _install(op: registry.Op) -> Callable:
    fn = _op_function(op)
    globals()[op.name] = fn
    if op.name not in __all__:
        __all__.append(op.name)
    return fn


def describe() -> Dict[str, Union[str, Dict]]:
    """The requested backend, the availability of each fast one and the registered ops (with
    their implementations, role and tasks), for reports and ``maskformer info``."""
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
        "ops": {op.name: op.summary() for op in registry.ops()},
    }
    if _records.by_op:
        info["last"] = {op: str(rec) for op, rec in _records.by_op.items()}
    return info


for _op in registry.ops():
    _install(_op)
del _op
