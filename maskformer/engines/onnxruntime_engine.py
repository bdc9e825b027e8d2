"""ONNX Runtime engine: the exported graph in an ``InferenceSession`` on the CPU execution provider.

The input is bound as a pointer to the tensor's memory (``io_binding``: no copy into ONNX
Runtime) and the outputs are ONNX Runtime's own buffers, handed out as tensors over the same
memory (``OrtValue.numpy()`` is a view that keeps the buffer alive; ``torch.from_numpy`` shares
it). Threads: ``intra_op_num_threads`` = the model's ``threads``, one inter-op thread, no
spinning of idle threads, sequential execution, all graph optimisations (ONNX Runtime fuses
LayerNorm, GELU, attention patterns and the bias adds into the GEMMs). Precision: float32 only.
The CPU execution provider has no bfloat16 kernel for MatMul, Gemm or Add (onnxruntime 1.32,
checked: NOT_IMPLEMENTED at session creation) and ONNX's Conv takes no bf16 at all; its one bf16
option, ``mlas.enable_gemm_fastmath_arm64_bfloat16``, is for ARM64. So ``dtype=torch.bfloat16``
is refused naming OpenVINO; float16 would need a second, float16 copy of the graph (ONNX Runtime
has no precision setting) and is refused too. The graph keeps dynamic
sizes: fixing them per input size (``add_free_dimension_override_by_name``) measured within 2%
of it for Swin-T at 512x683 (2161 against 2203 ms, noise on this machine), so one session serves
every size.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

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


def precision_plan(precision: str, cpu_lacks: Optional[str]) -> Tuple[str, Optional[str]]:
    """("float32", None) for float32; ValueError naming the alternative for bfloat16 and float16
    (see the module docstring). ``cpu_lacks``: the CPU flags ``precision`` needs and this CPU
    lacks (None when it has one)."""
    if precision == "float32":
        return precision, None
    if precision == "bfloat16":
        # keyword spelling (engine='openvino'): segment's command line rewrites it as --engine openvino
        where = ("engine='openvino', which computes bf16 natively on this CPU, or "
                 if cpu_lacks is None else f"dtype='float32' (this CPU is not native in bf16 anyway: it {cpu_lacks}), or ")
        raise ValueError("engine='onnxruntime' computes in float32 only, not dtype='bfloat16': its CPU execution provider "
                         "has no bfloat16 kernels for MatMul, Gemm or Add. Use " + where + "engine='torch'")
    raise ValueError("engine='onnxruntime' computes in float32 only, not dtype='float16': it would need a second, "
                     "float16 copy of the exported graph, which maskformer does not make"
                     + (f", and this CPU is not native in float16 ({cpu_lacks})" if cpu_lacks else "")
                     + ". Use dtype='float32', or engine='openvino' with dtype='bfloat16' where `maskformer info` says "
                       "bf16 is native")


def precision_facts() -> Dict[str, str]:
    """What ``maskformer info`` says of ONNX Runtime's precisions beyond the plans."""
    return {"providers": "CPUExecutionProvider (float32 kernels; no precision setting)"}


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
    def from_onnx(cls, path: str, threads: int, precision: str = "float32") -> "Runner":
        _float32_only(precision)
        return cls(path, threads)

    @classmethod
    def from_entry(cls, entry: str, threads: int, keep_compiled: bool = True, precision: str = "float32") -> "Runner":
        """``keep_compiled``: nothing to keep (ONNX Runtime plans the graph in memory at each load)."""
        _float32_only(precision)
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


def _float32_only(precision: str) -> None:
    if precision != "float32":
        precision_plan(precision, None)  # raises, naming the alternative
