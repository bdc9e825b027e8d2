"""OpenVINO engine: the exported graph as OpenVINO IR, compiled for the CPU once per input shape.

``prepare`` converts the ONNX file to IR (``model.xml`` + ``model.bin``, float32 weights: the
default fp16 compression of ``save_model`` is turned off) so that later loads skip the ONNX
import. The runner compiles the model for each input shape it meets (``reshape`` to that shape,
then ``compile_model``): OpenVINO plans a static shape faster than a dynamic one (Swin-T at
512x683 on this project's 2-core EPYC: 1.80 s against 1.87 s per forward), and the compiled
blob is also cached on disk (``CACHE_DIR`` = ``compiled/`` in the cache entry: a cold compile
took 1.3 s, a warm one 0.6 s). Up to 8 shapes stay compiled in memory.

Inference precision is pinned to f32: on CPUs with avx512_bf16/AMX, OpenVINO would otherwise run
in bf16 by default. Threads: ``INFERENCE_NUM_THREADS`` = the model's ``threads``, one stream,
the latency hint.

No copies on our side: the input tensor's memory is shared with OpenVINO, and each call's outputs
are fresh torch tensors set as the request's output tensors, which OpenVINO writes in place
(checked: the request's output data pointer is the tensor's).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

NAME = "openvino"
EXTRA = "openvino"
PACKAGES = ("openvino",)
IR_FILE = "model.xml"
COMPILED_DIR = "compiled"
MAX_SHAPES = 8


def versions() -> Dict[str, str]:
    import openvino

    return {"openvino": openvino.__version__}


def prepare(entry: str, onnx_path: str) -> None:
    """ONNX -> IR in ``entry`` (float32 weights); the ONNX file is removed."""
    import openvino as ov

    model = ov.Core().read_model(onnx_path)
    ov.save_model(model, os.path.join(entry, IR_FILE), compress_to_fp16=False)
    for path in (onnx_path, onnx_path + ".data"):
        if os.path.exists(path):
            os.remove(path)


def compile_config(threads: int) -> Dict[str, object]:
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"}


class Runner:
    """``run(pixel_values)`` -> output tensors (in ``output_names`` order)."""

    def __init__(self, model_path: str, threads: int, cache_dir: Optional[str] = None, static_shapes: bool = True):
        import openvino as ov

        self.core = ov.Core()
        if cache_dir:
            self.core.set_property({"CACHE_DIR": cache_dir})
        self.model = self.core.read_model(model_path)
        self.threads = threads
        self.config = compile_config(threads)
        self.static_shapes = static_shapes
        self.output_names: List[str] = [o.get_any_name() for o in self.model.outputs]
        self._compiled: "OrderedDict[tuple, object]" = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_onnx(cls, path: str, threads: int) -> "Runner":
        return cls(path, threads)

    @classmethod
    def from_entry(cls, entry: str, threads: int) -> "Runner":
        return cls(os.path.join(entry, IR_FILE), threads, cache_dir=os.path.join(entry, COMPILED_DIR))

    def compiled_for(self, shape: tuple):
        """The model compiled for input ``shape`` (compiled on first use; 8 shapes kept)."""
        key = shape if self.static_shapes else None
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
            model = self.model
            if self.static_shapes:
                model = self.model.clone()
                model.reshape({self.model.inputs[0].get_any_name(): list(shape)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)
            return compiled

    def run(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values: contiguous float32 CPU (B, C, H, W); shared with OpenVINO, not copied."""
        import openvino as ov

        x = pixel_values
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
            x = x.to(device="cpu", dtype=torch.float32).contiguous()
        # One request per call (0.1 ms to create): concurrent calls are safe.
        return self.infer(self.compiled_for(tuple(x.shape)).create_infer_request(), x)

    def infer(self, request, x: torch.Tensor) -> List[torch.Tensor]:
        """Run ``request`` (of the model compiled for ``x``'s shape) on ``x``: contiguous float32."""
        import openvino as ov

        outs = None
        if self.static_shapes:
            # Fresh output tensors per call, written in place by OpenVINO.
            outs = [torch.empty(tuple(o.get_shape()), dtype=torch.float32) for o in request.model_outputs]
            for i, t in enumerate(outs):
                request.set_output_tensor(i, ov.Tensor(t.numpy(), shared_memory=True))
        request.infer({0: x.numpy()}, share_inputs=True, share_outputs=True)
        if outs is None:  # dynamic shapes: the request's buffers (kept alive by the arrays)
            outs = [torch.from_numpy(np.asarray(request.get_output_tensor(i).data)) for i in range(len(self.output_names))]
        return outs
