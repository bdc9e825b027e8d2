"""The engine registry: which engines exist, whether each can run here (and the install command
when not), their versions, the precisions each runs, and a runner for an ONNX file. A leaf of the
import graph: it imports an engine's module only when asked for it (``maskformer.export`` uses it
to verify exports).

Precision. The exported graph is float32; the precision an engine computes in is a setting of its
session or compilation (``precision_plan``), never a second export. Each engine module declares
``precision_plan(precision, cpu_lacks) -> (precision it runs, note or None)``, raising
``ValueError`` (naming the alternative) for what it refuses (``cpu_lacks``: the CPU flags missing
for that precision, from ``maskformer._ext``, for its messages), and ``precision_facts()``, what
``maskformer info`` adds about it."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Dict, Optional

import torch

from .._ext import missing_precision_flags

__all__ = ["ENGINES", "PRECISIONS", "EngineUnavailableError", "PrecisionWarning", "PrecisionPlan", "engine_unavailable",
           "require", "describe", "describe_precisions", "engine_module", "default_threads", "precision_name",
           "precision_plan", "runner_for_file"]

# name -> module; "torch" is the model itself.
_REGISTRY = {
    "onnxruntime": "maskformer.engines.onnxruntime_engine",
    "openvino": "maskformer.engines.openvino_engine",
}
ENGINES = ("torch",) + tuple(_REGISTRY)
# Packages every non-torch engine needs to build its ONNX file (torch.onnx's exporter).
_EXPORT_PACKAGES = ("onnx", "onnxscript")


# What ``dtype=`` may ask of an engine: its compute precision (inputs and outputs stay float32).
PRECISIONS = ("float32", "bfloat16", "float16")


class EngineUnavailableError(ImportError):
    """An engine whose packages are not installed; the message gives the install command."""


class PrecisionWarning(UserWarning):
    """The engine runs another precision than the one asked for (float32 where the CPU has no
    native bf16); the message says why, naming the missing CPU flag."""


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """``requested``: the precision asked for; ``runs``: the one the engine computes in
    ("float32", "bfloat16", "float16"); ``note``: why they differ (None when they do not)."""

    engine: str
    requested: str
    runs: str
    note: Optional[str] = None


def precision_name(dtype) -> str:
    """``dtype=`` of ``from_pretrained`` (None, "auto", a torch dtype or its name) -> "float32",
    "bfloat16" or "float16"; ValueError for anything else."""
    if dtype is None or dtype == "auto":
        return "float32"  # the export's own precision (a checkpoint's stored dtype does not apply)
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    else:
        name = None
    if name not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r}: an engine computes in one of {', '.join(PRECISIONS)} (its inputs and "
                         "outputs stay float32)")
    return name


def precision_plan(engine: str, dtype) -> PrecisionPlan:
    """What ``engine`` computes in when ``dtype`` is asked for (see the module docstring); raises
    ``ValueError`` where the engine refuses it, naming what to use instead. Imports the engine."""
    requested = precision_name(dtype)
    if engine == "torch":
        return PrecisionPlan(engine, requested, requested)
    require(engine)
    runs, note = engine_module(engine).precision_plan(requested, missing_precision_flags(requested))
    return PrecisionPlan(engine, requested, runs, note)


def engine_module(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return importlib.import_module(_REGISTRY[name])


def engine_unavailable(name: str) -> Optional[str]:
    """Why ``name`` cannot run here (missing packages and the install command), or None. Imports
    nothing heavy: only looks the packages up."""
    if name == "torch":
        return None
    mod = engine_module(name)
    missing = [p for p in mod.PACKAGES + _EXPORT_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return (f"engine {name!r} needs {', '.join(missing)}, not installed: pip install 'maskformer[{mod.EXTRA}]' "
                f"(installs {', '.join(mod.PACKAGES + _EXPORT_PACKAGES)}; none of them installs torch)")
    return None


def require(name: str) -> None:
    why = engine_unavailable(name)
    if why:
        raise EngineUnavailableError(why)


def describe() -> Dict[str, str]:
    """engine -> "usable (versions)" or why not, for ``maskformer info``."""
    out = {"torch": f"usable (torch {torch.__version__})"}
    for name in _REGISTRY:
        why = engine_unavailable(name)
        if why:
            out[name] = "not usable: " + why
            continue
        try:
            versions = engine_module(name).versions()
        except Exception as exc:  # installed but broken (e.g. a missing shared library)
            out[name] = f"not usable: {name} is installed but fails to import ({type(exc).__name__}: {exc})"
            continue
        out[name] = "usable (" + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")"
    return out


def describe_precisions() -> Dict[str, object]:
    """engine -> {precision: what ``dtype=`` of it does on this CPU, plus the engine's
    ``precision_facts()``}, for ``maskformer info``; a line instead for an engine that cannot run."""
    out: Dict[str, object] = {}
    for name in _REGISTRY:
        if engine_unavailable(name):
            out[name] = "not usable (see engines)"
            continue
        try:
            report: Dict[str, str] = {}
            for precision in PRECISIONS:
                try:
                    plan = precision_plan(name, precision)
                except ValueError as exc:
                    report[precision] = f"refused: {exc}"
                    continue
                if plan.note is not None:
                    report[precision] = f"runs {plan.runs} instead, with a warning: {plan.note}"
                else:
                    report[precision] = f"runs {plan.runs}" + (" natively" if plan.runs != "float32" else "")
            report.update(engine_module(name).precision_facts())
        except Exception as exc:  # installed but broken: describe() says how
            report = f"unknown ({type(exc).__name__}: {exc})"
        out[name] = report
    return out


def default_threads(threads: Optional[int]) -> int:
    if threads is None:
        return torch.get_num_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


def runner_for_file(name: str, path: str, *, threads: Optional[int] = None, precision: str = "float32"):
    """A ``Runner`` of engine ``name`` for an ONNX file (no cache): ``runner.run(x)`` -> tensors in
    ``runner.output_names`` order. Used by the export's verification and the benchmark.
    ``precision``: what the engine computes in, as ``precision_plan(name, ...).runs`` says."""
    require(name)
    return engine_module(name).Runner.from_onnx(path, default_threads(threads), precision=precision)
