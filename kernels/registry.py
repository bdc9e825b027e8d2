"""The op registry: every fast op is declared once, in its own ``kernels/<op>.py``, and read from here.

An op module ends with ``OP = Op(...)``, which holds everything about the op:

* ``reference``: the pure-PyTorch ``<op>_ref``; every other callable of the op takes its arguments;
* ``impls``: one ``Impl`` per fast backend (``"triton"``, ``"cpp"``): the callable, the device
  types ``auto`` offers it, the dtypes it takes, and ``reasons(*args)``: why it cannot serve a call
  ([] when it can);
* ``check``: the argument check run before any choice (ValueError naming the problem and the fix);
* ``fakes``: the fake (meta) kernels of the C++ ops it calls, registered when the extension loads
  (the Triton custom ops register theirs with ``@register_fake`` next to them);
* ``aot_launches(full)``: the representative launches ``benchmarks/aot.py`` compiles;
* for the other readers: ``description`` (``maskformer info``), ``role`` (network / semantic
  post-processing / panoptic post-processing), ``tasks`` and ``models`` (the segmentation tasks and
  model families that dispatch it: the segment command's backend plan, ``task_ops``), and
  ``missing``: why a backend has no implementation, where that needs saying.

Readers: ``maskformer.dispatch`` (chooses among an op's implementations, names no op),
``maskformer info``, ``benchmarks/aot.py``, ``benchmarks/gpu_report.py`` and the segment backend
plan.

How an op module is registered:

* the project's ops: one line in ``OP_MODULES`` below;
* any other module that defines ``OP``: list it in ``MASKFORMER_OP_MODULES`` (importable module
  names, comma-separated; read once, at the first query in a process), or call
  ``register_module("pkg.my_op")`` (or ``register(op)`` with an ``Op``) at run time.

An op name is registered once: a second op of the same name raises ValueError unless
``replace=True``. Importing this module imports no op module (they load on the first query),
neither triton nor the C++ extension.
"""
import dataclasses
import importlib
import os
import threading
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from maskformer import _ext

__all__ = ["Op", "Impl", "AOTLaunch", "OP_MODULES", "ENV_VAR", "FAST_BACKENDS", "ROLES", "TASKS", "MODELS",
           "IMAGES", "POSTPROCESS_HEADS", "AOT_DTYPES", "DTYPE_LABELS", "ops", "get", "names", "register", "register_module", "unregister",
           "task_ops", "aot_launches", "aot_kernels"]

# The project's op modules, in the order readers list them. Adding an op: one line here.
OP_MODULES = (
    "maskformer.kernels.window_attention",
    "maskformer.kernels.fused_linear",
    "maskformer.kernels.ms_deform_attn",
    "maskformer.kernels.mask_einsum",
    "maskformer.kernels.upsample_argmax",
    "maskformer.kernels.semantic_segmentation",
    "maskformer.kernels.mask2former_semantic",
    "maskformer.kernels.query_argmax",
    "maskformer.kernels.nan_inf_flags",
)
ENV_VAR = "MASKFORMER_OP_MODULES"

# What an implementation can be (maskformer.dispatch's forced backends besides "reference").
FAST_BACKENDS = ("triton", "cpp")
BACKEND_NAMES = {"triton": "Triton", "cpp": "C++"}
ROLES = ("network", "semantic post-processing", "panoptic post-processing")
TASKS = ("semantic", "instance", "panoptic")
MODELS = ("maskformer", "mask2former")

# Representative shapes the ops' AOT launches are built from. Inputs at ADE20K's short sides, as
# the model gets them unpadded (512x683) and padded to a multiple of 32 by the processor (512x704).
IMAGES = ((512, 512), (512, 683), (512, 704), (640, 640), (640, 853), (640, 864))
# Post-processing heads: (queries, classes): ADE20K, COCO panoptic, COCO-Stuff, the default model.
POSTPROCESS_HEADS = ((100, 150), (100, 133), (100, 171), (8, 4))
# The kernels' input dtypes, and how a launch's config names them.
AOT_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_LABELS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                "uint8": "u8"}


@dataclasses.dataclass(frozen=True)
class Impl:
    """One fast implementation of an op.

    backend: ``"triton"`` or ``"cpp"`` (what ``MASKFORMER_BACKEND`` forces).
    fn: the callable, with the op reference's arguments and result.
    devices: the device types ``auto`` offers it (``("cuda",)``); a forced backend ignores them and
        asks ``reasons`` (Triton also runs CPU tensors under ``TRITON_INTERPRET=1``).
    dtypes: the input dtypes it takes (for readers; ``reasons`` is what decides).
    reasons: the op reference's arguments -> why ``fn`` cannot serve them, human-readable; [] when
        it can.
    """

    backend: str
    fn: Callable
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    reasons: Callable[..., List[str]]

    def __post_init__(self):
        if self.backend not in FAST_BACKENDS:
            raise ValueError(f"Impl backend {self.backend!r}: choose one of {', '.join(FAST_BACKENDS)}")
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "dtypes", tuple(self.dtypes))


@dataclasses.dataclass(frozen=True)
class AOTLaunch:
    """One real launch configuration of a Triton kernel, for ``benchmarks/aot.py``: ``compile()``
    goes through the kernel's launch function with meta tensors of the call's shapes and returns
    triton's ``CompiledKernel`` (no launch). ``config``: what the launch is (shown and compared by
    the check). ``tensor_cores``: the binary must contain tensor-core instructions."""

    kernel: str
    config: Dict
    compile: Callable[[], object]
    tensor_cores: bool

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.config.items())


@dataclasses.dataclass(frozen=True)
class Op:
    """One op, as its ``kernels/<op>.py`` declares it (module docstring). Constructing an Op hands
    its ``fakes`` to ``maskformer._ext``, which registers them with ``torch.library`` when (and if)
    the C++ extension loads."""

    name: str
    reference: Callable
    check: Callable[..., None]
    description: str
    role: str
    tasks: Tuple[str, ...] = ()
    models: Tuple[str, ...] = MODELS
    impls: Tuple[Impl, ...] = ()
    missing: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fakes: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    aot_launches: Optional[Callable[[bool], List[AOTLaunch]]] = None

    def __post_init__(self):
        problems = []
        if not self.name.isidentifier():
            problems.append(f"name {self.name!r} is not an identifier (it becomes maskformer.dispatch.{self.name})")
        if self.role not in ROLES:
            problems.append(f"role {self.role!r} is not one of {ROLES}")
        for field, values, allowed in (("tasks", self.tasks, TASKS), ("models", self.models, MODELS)):
            if not set(values) <= set(allowed):
                problems.append(f"{field} {tuple(values)} must be among {allowed}")
        backends = [impl.backend for impl in self.impls]
        if len(set(backends)) != len(backends):
            problems.append(f"one implementation per backend, got {backends}")
        for backend in self.missing:
            if backend not in FAST_BACKENDS or backend in backends:
                problems.append(f"missing[{backend!r}]: only a fast backend without an implementation")
        if problems:
            raise ValueError(f"Op {self.name!r}: " + "; ".join(problems))
        for field in ("tasks", "models", "impls"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        object.__setattr__(self, "missing", dict(self.missing))
        object.__setattr__(self, "fakes", dict(self.fakes))
        _ext.register_fakes_on_load(self.fakes)

    @property
    def backends(self) -> Tuple[str, ...]:
        """The fast backends with an implementation, in declared order."""
        return tuple(impl.backend for impl in self.impls)

    def impl(self, backend: str) -> Optional[Impl]:
        """The implementation on ``backend``, or None."""
        for impl in self.impls:
            if impl.backend == backend:
                return impl
        return None

    def no_impl_reason(self, backend: str) -> str:
        """The refusal of a backend without an implementation, e.g. "query_argmax has no Triton
        kernel (the reference PyTorch ops are the CUDA path)"."""
        why = self.missing.get(backend)
        return f"{self.name} has no {BACKEND_NAMES.get(backend, backend)} kernel" + (f" ({why})" if why else "")

    def summary(self) -> Dict:
        """What ``maskformer info`` and ``dispatch.describe`` show of the op (JSON-able)."""
        return {
            "description": self.description,
            "role": self.role,
            "tasks": list(self.tasks),
            "models": list(self.models),
            "reference": f"{self.reference.__module__}.{self.reference.__qualname__}",
            "implementations": {
                impl.backend: {"devices": list(impl.devices), "dtypes": [str(d).removeprefix("torch.") for d in impl.dtypes]}
                for impl in self.impls
            },
            "no kernel": {b: self.no_impl_reason(b) for b in FAST_BACKENDS if self.impl(b) is None},
            "aot_launches": self.aot_launches is not None,
        }


def triton_reasons(tensor: torch.Tensor, subject: str) -> List[str]:
    """Why no Triton kernel can run on ``tensor`` here: triton does not import, or the tensor is
    neither on CUDA nor on the CPU under TRITON_INTERPRET=1; [] when one can. ``subject`` names
    the tensor in the message ("x is", "scores are")."""
    err = _ext.triton_import_error()
    if err:
        return [err]
    if not (tensor.device.type == "cuda" or (tensor.device.type == "cpu" and _ext.triton_interpret_mode())):
        return [f"{subject} on {tensor.device.type}: the Triton kernel runs on CUDA "
                "(or on CPU tensors under TRITON_INTERPRET=1, which is for tests only)"]
    return []


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
_ops: Dict[str, Op] = {}
_loaded = False  # set last, once OP_MODULES and the variable's modules are in _ops
_loading = False  # inside _load: an op module being imported may call register()
_lock = threading.RLock()  # re-entrant: that register() runs in the loading thread


def _module_op(module_name: str, source: str) -> Op:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ImportError(f"{source} names op module {module_name!r}, which cannot be imported "
                          f"({type(exc).__name__}: {exc}); fix the name or remove it") from exc
    op = getattr(module, "OP", None)
    if not isinstance(op, Op):
        raise ImportError(f"{source} names op module {module_name!r}, which defines no OP = Op(...) "
                          f"(found {type(op).__name__}); see maskformer.kernels.registry")
    return op


def _load() -> None:
    global _loaded, _loading
    if _loaded:  # fast path, lock-free: torch.compile traces the lookups below and cannot trace a lock
        return
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            extra = [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
            sources = [(m, "maskformer.kernels.registry.OP_MODULES") for m in OP_MODULES] + [(m, ENV_VAR) for m in extra]
            for module_name, source in sources:
                op = _module_op(module_name, source)
                if _ops.get(op.name) is not op:
                    _add(op, replace=False)
            _loaded = True
        finally:
            _loading = False


def _add(op: Op, replace: bool) -> None:
    if not isinstance(op, Op):
        raise TypeError(f"register() takes an Op, got {type(op).__name__}")
    old = _ops.get(op.name)
    if old is not None and old is not op and not replace:
        raise ValueError(f"an op named {op.name!r} is already registered (from {old.reference.__module__}); "
                         "choose another name, or pass replace=True")
    _ops[op.name] = op


def register(op: Op, replace: bool = False) -> Op:
    """Add ``op`` to the registry, after the ops already there (the project's first); returns it.
    ValueError when another op of that name is registered, unless ``replace``."""
    _load()  # a no-op when called by an op module that the load itself is importing
    with _lock:
        _add(op, replace)
    return op


def register_module(module_name: str, replace: bool = False) -> Op:
    """Import ``module_name`` and register its ``OP``; returns it."""
    _load()
    op = _module_op(module_name, "register_module()")
    with _lock:
        _add(op, replace)
    return op


def unregister(name: str) -> Op:
    """Remove the op ``name`` (tests: a temporary op); returns it. KeyError when not registered."""
    _load()
    with _lock:
        if name not in _ops:
            raise KeyError(f"no op named {name!r} is registered")
        return _ops.pop(name)


def ops() -> List[Op]:
    """Every registered op, the project's first (``OP_MODULES`` order), then the others."""
    _load()
    return list(_ops.values())


def names() -> List[str]:
    _load()
    return list(_ops)


def get(name: str) -> Op:
    """The op ``name``; ValueError naming the registered ops when there is none."""
    _load()
    op = _ops.get(name)
    if op is None:
        raise ValueError(f"unknown op {name!r}; ops: {', '.join(_ops)}")
    return op


def task_ops(task: str, model: str = "maskformer") -> List[Op]:
    """The ops a segmentation ``task`` dispatches for a ``model`` family, network first, then
    post-processing (registry order within a role): what the segment command's backend plan
    reads. ``[op.name for op in task_ops(t)]`` replaces segment.py's ``TASK_OPS[t]``,
    ``op.backends`` its ``KERNELS``, ``op.role`` its ``OP_ROLE``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model family {model!r}; families: {', '.join(MODELS)}")
    chosen = [op for op in ops() if task in op.tasks and model in op.models]
    return sorted(chosen, key=lambda op: ROLES.index(op.role))


def aot_kernels() -> List[str]:
    """The ops whose Triton kernels ``benchmarks/aot.py`` compiles (those declaring launches)."""
    return [op.name for op in ops() if op.aot_launches is not None]


def aot_launches(full: bool, kernels: Optional[Sequence[str]] = None) -> List[AOTLaunch]:
    """Every declared launch of the CI set (``full=False``) or of the full set, for the ops in
    ``kernels`` (default: all that declare launches)."""
    wanted = aot_kernels() if kernels is None else list(kernels)
    out: List[AOTLaunch] = []
    for name in wanted:
        op = get(name)
        if op.aot_launches is None:
            raise ValueError(f"op {name!r} declares no AOT launches; ops that do: {', '.join(aot_kernels())}")
        out += op.aot_launches(full)
    return out
