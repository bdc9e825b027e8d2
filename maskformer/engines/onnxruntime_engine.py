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

Mask2Former's deformable attention: where onnxruntime-extensions is installed and maskformer's C++
extension loads, the export writes the sampling as one ``com.maskformer::MultiScaleDeformableAttention``
node (the node OpenVINO's extension runs too) and ONNX Runtime runs it with our C++ kernel
(``torch.ops.maskformer.ms_deform_attn_cpu``) through onnxruntime-extensions' Python custom ops: the
onnxruntime wheel ships no C/C++ API headers to build a custom-op library against, and
onnxruntime-extensions' library calls a Python function per node run (6 per Mask2Former forward)
with numpy copies of the inputs. Two things of that path are handled here (``_register_msda``):
its own return path turns each output into a Python list (``tolist()``), 152-158 ms per call at
Swin-T's 512x683 shapes against 5-6 ms when the array itself is handed back (the C++ side accepts
an array and copies it with one memcpy); and an exception raised inside a Python op ends the
process (``std::terminate``; onnxruntime-extensions 0.15.2, onnxruntime 1.32), so the op never
raises: it hands back an empty output, on which the next node (the output projection's MatMul)
stops the run with an error, and ``Runner.run`` raises the op's own exception instead.
The op runs on torch's threads (``torch.get_num_threads()``, the engines' default ``threads``),
not the session's ``intra_op_num_threads``: the node carries no thread count, and setting torch's
process-wide count per call would race between sessions. Python runs it under the GIL, so two
sessions in two threads take turns through the op (their other nodes still run side by side).
``MASKFORMER_ONNXRUNTIME_MSDA=0`` keeps the portable formulation (grid_sample per level).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import _ext

NAME = "onnxruntime"
EXTRA = "onnx"
PACKAGES = ("onnxruntime",)
ONNX_FILE = "model.onnx"

# Set to 0 to export Mask2Former's deformable attention in the portable formulation even where our
# operation can run (benchmarks compare the two; a user can rule the Python custom op out).
MSDA_ENV = "MASKFORMER_ONNXRUNTIME_MSDA"
# The node maskformer.engines.export writes (its MSDA_DOMAIN; openvino_engine.MSDA_OP): one node
# for both engines. onnxruntime-extensions registers a Python op under "domain::name".
MSDA_DOMAIN = "com.maskformer"
MSDA_OP = "MultiScaleDeformableAttention"
EXTENSIONS_FIX = "pip install onnxruntime-extensions (or maskformer[onnx])"


def versions() -> Dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def prepare(entry: str, onnx_path: str) -> None:
    """Nothing to convert: ONNX Runtime reads the ONNX file (``model.onnx``) itself."""
    if os.path.basename(onnx_path) != ONNX_FILE:
        os.replace(onnx_path, os.path.join(entry, ONNX_FILE))


def msda_custom_op() -> Tuple[Optional[str], str]:
    """(path of onnxruntime-extensions' custom-op library, "") once our deformable-attention op is
    registered with it, or (None, why it is not used): switched off by MASKFORMER_ONNXRUNTIME_MSDA=0,
    onnxruntime-extensions not installed, or maskformer's C++ extension (the kernel) not loaded."""
    if os.environ.get(MSDA_ENV, "1") == "0":
        return None, f"{MSDA_ENV}=0"
    if importlib.util.find_spec("onnxruntime_extensions") is None:
        return None, f"onnxruntime-extensions is not installed ({EXTENSIONS_FIX})"
    missing = _ext.cpp_missing_ops("ms_deform_attn_cpu")
    if missing:
        return None, f"maskformer's C++ extension, whose kernel the op runs, is not usable: {missing[0]}"
    return _register_msda()


# Exceptions of our op, by the thread that ran it (ONNX Runtime runs a sequential session's nodes
# in the thread that called run): Runner.run raises them after ONNX Runtime's own error.
_msda_failures: Dict[int, BaseException] = {}


@functools.lru_cache(maxsize=None)
def _register_msda() -> Tuple[Optional[str], str]:
    import onnxruntime as ort

    try:
        import onnxruntime_extensions as ortx
        from onnxruntime_extensions import _ocos

        # an onnxruntime older than the library's API version refuses it here, not at every session
        ort.SessionOptions().register_custom_ops_library(ortx.get_library_path())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"onnxruntime-extensions does not load into onnxruntime {ort.__version__} ({first}); "
                      f"install versions that match ({EXTENSIONS_FIX})")
    float_, int64 = ortx.PyOp.dt_float, ortx.PyOp.dt_int64
    op = ortx.onnx_op(op_type=f"{MSDA_DOMAIN}::{MSDA_OP}", inputs=[float_, int64, float_, float_],
                      outputs=[float_])(_msda_numpy)
    if hasattr(_ocos, "_on_pyop_invocation"):  # the library's own invoker, for every other op
        def invoke(op_id, feed, attributes):
            if op_id != op._id:
                return _ocos._on_pyop_invocation(op_id, feed, attributes)
            out = _msda_numpy(*feed)
            return (op_id, out.shape, out.reshape(-1))  # the array, not out.flatten().tolist()

        ortx.PyOp.install_hooker(invoke)  # process-wide: one invoker serves every Python op
    return ortx.get_library_path(), ""


def _msda_numpy(value, spatial_wh, sampling_locations, attention_weights) -> np.ndarray:
    """The op's body: numpy copies ONNX Runtime made of the node's inputs (value (B, S, H, D) float32,
    spatial_wh (L, 2) int64 (w, h), sampling_locations (B, Q, H, L, P, 2), attention_weights
    (B, Q, H, L, P)) -> (B, Q, H*D) float32 contiguous, by ``torch.ops.maskformer.ms_deform_attn_cpu``
    over the same memory. Never raises (module docstring): a failure is kept for ``Runner.run`` and
    an empty (0,) array goes back."""
    try:
        if spatial_wh.ndim != 2 or spatial_wh.shape[1] != 2:
            raise ValueError(f"spatial_wh must be (levels, 2) (w, h), got shape {tuple(spatial_wh.shape)}")
        flat = [int(side) for w, h in spatial_wh.tolist() for side in (h, w)]
        out = torch.ops.maskformer.ms_deform_attn_cpu(torch.from_numpy(value), flat, torch.from_numpy(sampling_locations),
                                                      torch.from_numpy(attention_weights))
        return out.numpy()
    except BaseException as exc:  # KeyboardInterrupt too: raising here would abort the process
        _msda_failures[threading.get_ident()] = exc
        return np.zeros((0,), np.float32)


def notes() -> str:
    """For ``maskformer info``: which deformable attention a Mask2Former engine will run."""
    path, why = msda_custom_op()
    if path is not None:
        return ("Mask2Former's deformable attention: maskformer's C++ kernel as an onnxruntime-extensions Python op "
                f"(onnxruntime-extensions {_extensions_version()})")
    return f"Mask2Former's deformable attention: the portable formulation (maskformer's op: {why})"


def export_options(config) -> Dict[str, str]:
    """What this engine asks of the ONNX export beyond the portable default (part of the engine
    cache key): Mask2Former's deformable attention as one ``com.maskformer::MultiScaleDeformableAttention``
    node, run by our C++ kernel, where ``msda_custom_op()`` can run it; {} otherwise."""
    if getattr(config, "model_type", None) != "mask2former":
        return {}
    path, _ = msda_custom_op()
    if path is None:
        return {}
    # a rebuilt kernel is a new engine: verified again
    return {"deformable_attention": "onnxruntime-extensions", "onnxruntime_extensions": _extensions_version(),
            "cpp_extension_sha256": _file_sha256(_ext.load_cpp().__file__)}


def _extensions_version() -> str:
    import onnxruntime_extensions

    return onnxruntime_extensions.__version__


def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # 17 MB for maskformer._C: hashed once
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    library, _ = msda_custom_op()
    if library is not None:  # a Mask2Former file may hold our deformable-attention node
        options.register_custom_ops_library(library)
    return options


def new_session(path: str, threads: int):
    """An ``InferenceSession`` of ``path`` on the CPU with ``session_options(threads)``; a file with
    our deformable-attention node where our op cannot run gets an error naming the fix."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        if MSDA_OP not in str(exc):
            raise
        raise RuntimeError(f"{path} uses maskformer's deformable-attention operation ({MSDA_DOMAIN}::{MSDA_OP}), "
                           f"which ONNX Runtime runs only through onnxruntime-extensions with maskformer's C++ "
                           f"extension, and it is not available here: {msda_custom_op()[1]}. Install it, or rebuild "
                           "the engine without it (delete the engine cache entry) or export with "
                           "deformable_attention='portable'") from exc


def checked_run(run):
    """``run()`` (a session's run in this thread) -> its result; where our deformable-attention op
    failed inside it (which ONNX Runtime reports, if at all, as a shape error of the next node), the
    op's own exception instead: RuntimeError naming it, or a KeyboardInterrupt / SystemExit as it came."""
    _msda_failures.pop(threading.get_ident(), None)
    error = None
    try:
        result = run()
    except Exception as exc:
        error = exc
    failure = _msda_failures.pop(threading.get_ident(), None)
    if failure is not None:
        if not isinstance(failure, Exception):
            raise failure from error
        raise RuntimeError(f"maskformer's deformable attention failed inside ONNX Runtime: "
                           f"{type(failure).__name__}: {failure}") from failure
    if error is not None:
        raise error
    return result


def deformable_attention_of(path: str) -> Optional[str]:
    """Which deformable attention the ONNX file at ``path`` holds: "onnxruntime-extensions" (our
    node), "portable" (GridSample) or None (no deformable attention: MaskFormer, or onnx missing).
    Reads the graph without external weights."""
    try:
        import onnx
    except ImportError:
        return None
    types = {(node.domain, node.op_type) for node in onnx.load(path, load_external_data=False).graph.node}
    if (MSDA_DOMAIN, MSDA_OP) in types:
        return "onnxruntime-extensions"
    return "portable" if ("", "GridSample") in types else None


class Runner:
    """``run(pixel_values)`` -> output tensors (in ``output_names`` order) for an ONNX file."""

    def __init__(self, path: str, threads: int):
        self.path = path
        self.threads = threads
        self.session = new_session(path, threads)
        # Which deformable attention the graph runs (Mask2Former): our op or the portable
        # formulation; None for a graph without one (MaskFormer).
        self.deformable_attention = deformable_attention_of(path)
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
        checked_run(lambda: self.session.run_with_iobinding(binding))
        # numpy() views ONNX Runtime's buffer (and keeps it alive): no copy on the way to torch.
        outs = [torch.from_numpy(value.numpy()) for value in binding.get_outputs()]
        del x  # the input had to outlive the run: the binding holds a raw pointer only
        return outs


def _float32_only(precision: str) -> None:
    if precision != "float32":
        precision_plan(precision, None)  # raises, naming the alternative
