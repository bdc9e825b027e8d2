"""ONNX Runtime engine: the exported graph in an ``InferenceSession`` on the CPU execution provider.

The input is bound as a pointer to the tensor's memory (``io_binding``: no copy into ONNX
Runtime) and the outputs are ONNX Runtime's own buffers, handed out as tensors over the same
memory (``OrtValue.numpy()`` is a view that keeps the buffer alive; ``torch.from_numpy`` shares
it). Threads: ``intra_op_num_threads`` = the model's ``threads``, one inter-op thread, no
spinning of idle threads, sequential execution, all graph optimisations (ONNX Runtime fuses
LayerNorm, GELU, attention patterns and the bias adds into the GEMMs). The graph keeps dynamic
sizes: fixing them per input size (``add_free_dimension_override_by_name``) measured within 2%
of it for Swin-T at 512x683 (2161 against 2203 ms, noise on this machine), so one session serves
every size.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch

NAME = "onnxruntime"
EXTRA = "onnx"
PACKAGES = ("onnxruntime",)
ONNX_FILE = "model.onnx"


def versions() -> Dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def prepare(entry: str, onnx_path: str) -> None:
    """Nothing to convert: ONNX Runtime reads the ONNX file (``model.onnx``) itself."""
    if os.path.basename(onnx_path) != ONNX_FILE:
        os.replace(onnx_path, os.path.join(entry, ONNX_FILE))


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ONNX Runtime warns about every unused initializer
    # No spinning: ONNX Runtime's idle threads would otherwise spin after each run, against the
    # post-processing's OpenMP threads in the same process and against other processes. Swin-T
    # at 512x683 on this project's 2-core EPYC (load average 2.8, 5 interleaved runs): 1824 ms
    # without spinning, 2203 ms with it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Runner:
    """``run(pixel_values)`` -> output tensors (in ``output_names`` order) for an ONNX file."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        self.path = path
        self.threads = threads
        self.session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_onnx(cls, path: str, threads: int) -> "Runner":
        return cls(path, threads)

    @classmethod
    def from_entry(cls, entry: str, threads: int, keep_compiled: bool = True) -> "Runner":
        """``keep_compiled``: nothing to keep (ONNX Runtime plans the graph in memory at each load)."""
        return cls(os.path.join(entry, ONNX_FILE), threads)

    def run(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values: contiguous float32 CPU (B, C, H, W); read in place."""
        x = pixel_values
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
            x = x.to(device="cpu", dtype=torch.float32).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cpu", 0, np.float32, list(x.shape), x.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        # numpy() views ONNX Runtime's buffer (and keeps it alive): no copy on the way to torch.
        outs = [torch.from_numpy(value.numpy()) for value in binding.get_outputs()]
        del x  # the input had to outlive the run: the binding holds a raw pointer only
        return outs
