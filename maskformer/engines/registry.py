"""The engine registry: which engines exist, whether each can run here (and the install command
when not), their versions, and a runner for an ONNX file (at a precision: see
``maskformer.engines.precision``). A leaf of the import graph: it imports an engine's module only
when asked for it (``maskformer.export`` uses it to verify exports)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, Optional

import torch

__all__ = ["ENGINES", "EngineUnavailableError", "engine_unavailable", "require", "describe", "engine_module",
           "default_threads", "runner_for_file"]

# name -> module; "torch" is the model itself.
_REGISTRY = {
    "onnxruntime": "maskformer.engines.onnxruntime_engine",
    "openvino": "maskformer.engines.openvino_engine",
}
ENGINES = ("torch",) + tuple(_REGISTRY)
# Packages every non-torch engine needs to build its ONNX file (torch.onnx's exporter).
_EXPORT_PACKAGES = ("onnx", "onnxscript")


class EngineUnavailableError(ImportError):
    """An engine whose packages are not installed; the message gives the install command."""


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
        notes = getattr(engine_module(name), "notes", None)  # what the engine adds of ours (OpenVINO's extension)
        if notes is not None:
            out[name] += "; " + notes()
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
    ``precision``: what the engine computes in, as ``engines.precision.precision_plan(name, ...).runs``
    says."""
    require(name)
    return engine_module(name).Runner.from_onnx(path, default_threads(threads), precision=precision)
