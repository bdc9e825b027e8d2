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
  SHA-256 of the weight files and of the effective config without its labels, the engine, and the
  versions of maskformer, the export format, torch, onnxscript and the engine. A hit is checked
  (every file's SHA-256 against the one recorded at its build) and loaded; a damaged entry is
  rebuilt, saying so. On a miss, under the entry's lock (a second process waits for the first),
  the torch model is loaded, exported (``maskformer.export``), prepared for the engine (OpenVINO:
  its IR), verified against PyTorch at three sizes by the engine itself and stored, a line per
  phase on stderr; entries of the same checkpoint and overrides under another key (stale: other
  weights or versions) are removed;
* returns an ``EngineModel``: ``model(pixel_values, pixel_mask=None, ...)`` with the torch model's
  input checks, returning ``MaskFormerForInstanceSegmentationOutput`` with the class and mask
  logits and the three ``*_last_hidden_state`` fields. The engine's output buffers become the
  output tensors (``torch.from_numpy`` of the engine-owned arrays: no copy), and the input is
  handed to the engine as a pointer to the tensor's memory, so the C++ post-processing reads
  what the engine wrote.

Threads: ``threads=`` (default ``torch.get_num_threads()`` at load time) sets ONNX Runtime's
intra-op threads and OpenVINO's ``INFERENCE_NUM_THREADS``; ``model.threads`` says what was used.

Layers, bottom up: ``registry`` and the engine modules (``onnxruntime_engine``,
``openvino_engine``: run a file; they import nothing of maskformer), ``export`` (the ONNX export,
verified with those runners; public as ``maskformer.export``), ``cache`` (builds with the
export), ``model`` (the ``EngineModel``). Nothing here imports ``maskformer.export``.

Each engine lives in its own module and declares ``NAME``, ``EXTRA``, ``PACKAGES``,
``versions()``, ``prepare(entry, onnx_path)`` (with ``PREPARE_STEP``, what the build says while it
runs, when there is something to prepare) and a ``Runner``; this package names no engine's
internals beyond the registry line.
"""
from __future__ import annotations

from . import cache  # noqa: F401
from .cache import EngineCacheError
from .model import EngineModel, load_engine_model
from .registry import (  # noqa: F401
    ENGINES,
    EngineUnavailableError,
    default_threads,
    describe,
    engine_module,
    engine_unavailable,
    runner_for_file,
)

__all__ = ["ENGINES", "EngineCacheError", "EngineModel", "EngineUnavailableError", "engine_unavailable", "describe", "runner_for_file",
           "load_engine_model"]
