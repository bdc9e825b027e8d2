"""Engines: who runs the network. ``torch`` (the model itself), or the model's ONNX export run by
ONNX Runtime or OpenVINO behind the same call signature and outputs.

    model = MaskFormerForInstanceSegmentation.from_pretrained(path, engine="openvino")
    outputs = model(pixel_values)                       # the torch model's call, its output fields
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=...)   # our C++ path

What ``from_pretrained(..., engine=...)`` does for an engine other than torch:

* refuses at once, naming the install command, when the engine's packages are missing
  (``pip install 'maskformer[onnx]'`` / ``'maskformer[openvino]'``), and refuses what an exported
  inference graph cannot do (a dtype other than float32, a device other than the CPU, training);
* looks the checkpoint up in the engine cache (``maskformer.engines.cache``): the key is the
  SHA-256 of the weight files and of the effective config, the engine, and the versions of
  maskformer, the export format, torch, onnxscript and the engine. A hit is loaded; on a miss the
  torch model is loaded, exported (``maskformer.export``), verified against PyTorch at three
  sizes by the engine itself, prepared for the engine (OpenVINO: its IR) and stored; entries of
  the same checkpoint under another key (stale: other weights or versions) are removed;
* returns an ``EngineModel``: ``model(pixel_values, pixel_mask=None, ...)`` with the torch model's
  input checks, returning ``MaskFormerForInstanceSegmentationOutput`` with the class and mask
  logits and the three ``*_last_hidden_state`` fields. The engine's output buffers become the
  output tensors (``torch.from_numpy`` of the engine-owned arrays: no copy), and the input is
  handed to the engine as a pointer to the tensor's memory, so the C++ post-processing reads
  what the engine wrote.

Threads: ``threads=`` (default ``torch.get_num_threads()`` at load time) sets ONNX Runtime's
intra-op threads and OpenVINO's ``INFERENCE_NUM_THREADS``; ``model.threads`` says what was used.

Each engine lives in its own module (``onnxruntime_engine``, ``openvino_engine``) and declares
``NAME``, ``EXTRA``, ``PACKAGES``, ``versions()``, ``prepare(entry, onnx_path)`` and a
``Runner``; this module names no engine's internals beyond the registry line below.
"""
from __future__ import annotations

from .registry import (  # noqa: F401
    ENGINES,
    EngineUnavailableError,
    default_threads,
    describe,
    engine_module,
    engine_unavailable,
    runner_for_file,
)

__all__ = ["ENGINES", "EngineModel", "EngineUnavailableError", "engine_unavailable", "describe", "runner_for_file",
           "load_engine_model"]


def __getattr__(name):
    # The model side (inputs, outputs, the cache) loads on first use: ``maskformer.export`` imports
    # the registry above without it.
    import importlib

    if name in ("EngineModel", "load_engine_model"):
        return getattr(importlib.import_module(".model", __name__), name)
    if name == "cache":
        return importlib.import_module(".cache", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
