"""OpenVINO engine: the exported graph as OpenVINO IR, compiled for the CPU once per input shape.

``prepare`` converts the ONNX file to IR (``model.xml`` + ``model.bin``, float32 weights: the
default fp16 compression of ``save_model`` is turned off) so that later loads skip the ONNX
import. The runner compiles the model for each input shape it meets (``reshape`` to that shape,
then ``compile_model``): OpenVINO plans a static shape faster than a dynamic one (Swin-T at
512x683 on this project's 2-core EPYC: 1.80 s against 1.87 s per forward). Up to 8 shapes stay
compiled in memory.

Compiled shapes are also kept on disk, in ``compiled/`` of the cache entry, by this module rather
than by OpenVINO's ``CACHE_DIR``, which keeps every shape it meets (issue #24 measured 119 MB,
about 8 MB per shape, for the 7 MB default model): each blob is
``CompiledModel.export_model()``'s bytes, named by the shape, the compile settings and the blob's
own SHA-256, which is checked before ``import_model`` (a damaged blob is deleted and the shape
compiled again). Reading a blob back saves most of a compile: Swin-T at 512x683, 2.7 s against
6.6 s (2.4x, paired; load 14 on this project's 2-core EPYC; benchmarks/results/engine-cache-cpu.md).
A blob is the model compiled for one shape, weights included: 175 MB for Swin-T's 168 MB of
weights.

Precision: ``INFERENCE_PRECISION_HINT`` is always set, and checked on the compiled model. OpenVINO's
own default on a CPU with avx512_bf16 or AMX is bf16 (OpenVINO 2026.4 on this project's Zen 4
EPYC), so "float32" must be asked for to mean float32. ``bfloat16`` runs where the CPU device
lists BF16 among its ``OPTIMIZATION_CAPABILITIES``, and float32 with a ``PrecisionWarning``
elsewhere; ``float16`` runs where it lists FP16 and is refused elsewhere, because there OpenVINO
silently computes an f16 hint in bf16 (checked on this CPU: the compiled model reports bf16).
Weights and inputs stay float32 in the IR; OpenVINO converts them when it compiles, so one IR
serves every precision, and the compiled blobs on disk carry the precision in their names.
Threads: ``INFERENCE_NUM_THREADS`` = the model's ``threads``, one stream, the latency hint.

No copies on our side: the input tensor's memory is shared with OpenVINO, and each call's outputs
are fresh torch tensors set as the request's output tensors, which OpenVINO writes in place
(checked: the request's output data pointer is the tensor's).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import threading
import uuid
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

NAME = "openvino"
EXTRA = "openvino"
PACKAGES = ("openvino",)
IR_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
COMPILED_DIR = "compiled"
MAX_SHAPES = 8
# The compiled/ folder's bound, in bytes: 4x the model's weights (a blob is about the weights'
# size, see above), at least 64 MB: the four shapes used last, so the entry stays within about 5x
# its model on disk (0.85 GB for Swin-T) while a run over photos of a few sizes reads its shapes
# back; the least recently used blob goes first.
COMPILED_MODELS_KEPT = 4
COMPILED_MIN_BYTES = 64 << 20
# What the build says it is doing between the export and the verification.
PREPARE_STEP = "converting the ONNX file to OpenVINO IR (float32 weights)"


# Set to 0 to export Mask2Former's deformable attention in the portable formulation even where the
# extension is built (benchmarks compare the two; a user can rule the extension out).
MSDA_ENV = "MASKFORMER_OPENVINO_MSDA"
MSDA_OP = "MultiScaleDeformableAttention"


def msda_extension() -> Tuple[Optional[str], str]:
    """(path, "") of the OpenVINO extension that runs Mask2Former's deformable attention with our C++
    kernel (csrc/openvino/msda_extension.cpp, built by setup.py as maskformer/_openvino_msda*.so),
    or (None, why it is not used): not built, switched off by MASKFORMER_OPENVINO_MSDA=0, or built
    against another OpenVINO than the one installed (OpenVINO refuses to load it)."""
    if os.environ.get(MSDA_ENV, "1") == "0":
        return None, f"{MSDA_ENV}=0"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(n for n in os.listdir(package) if n.startswith("_openvino_msda") and n.endswith(".so"))
    if not found:
        return None, ("not built (setup.py builds it when openvino is installed before maskformer: "
                      "`pip install --no-build-isolation -e .` again after installing openvino)")
    return _loadable(os.path.join(package, found[-1]))


@functools.lru_cache(maxsize=None)
def _loadable(path: str) -> Tuple[Optional[str], str]:
    import openvino as ov

    try:
        ov.Core().add_extension(path)
    except Exception as exc:  # built against another OpenVINO: undefined symbols, another soname
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"{os.path.basename(path)} does not load into OpenVINO {versions()['openvino']} ({first}); "
                      "reinstall maskformer to rebuild it against this OpenVINO")
    return path, ""


def notes() -> str:
    """For ``maskformer info``: which deformable attention a Mask2Former engine will run."""
    path, why = msda_extension()
    if path is not None:
        return f"Mask2Former's deformable attention: maskformer's extension ({os.path.basename(path)})"
    return f"Mask2Former's deformable attention: the portable formulation (the extension: {why})"


def export_options(config) -> Dict[str, str]:
    """What this engine asks of the ONNX export beyond the portable default (part of the engine
    cache key): Mask2Former's deformable attention as one ``com.maskformer::MultiScaleDeformableAttention``
    node, run by the extension, where the extension loads; {} otherwise."""
    if getattr(config, "model_type", None) != "mask2former":
        return {}
    path, _ = msda_extension()
    if path is None:
        return {}
    with open(path, "rb") as f:  # a rebuilt extension is a new engine: verified again
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"deformable_attention": "openvino-extension", "extension_sha256": digest}


def new_core():
    """An ``ov.Core`` that knows our operation when the extension loads."""
    import openvino as ov

    core = ov.Core()
    path, _ = msda_extension()
    if path is not None:
        core.add_extension(path)
    return core


def _read_model(core, path: str):
    try:
        return core.read_model(path)
    except Exception as exc:
        if MSDA_OP in str(exc):
            raise RuntimeError(f"{path} uses maskformer's deformable-attention operation ({MSDA_OP}), which needs "
                               f"maskformer's OpenVINO extension, and it is not available here: {msda_extension()[1]}. "
                               "Rebuild the engine without it (delete the engine cache entry) or export with "
                               "deformable_attention='portable'") from exc
        raise


def versions() -> Dict[str, str]:
    import openvino

    return {"openvino": openvino.__version__}


def prepare(entry: str, onnx_path: str) -> None:
    """ONNX -> IR in ``entry`` (float32 weights); the ONNX file is removed."""
    import openvino as ov

    model = _read_model(new_core(), onnx_path)
    ov.save_model(model, os.path.join(entry, IR_FILE), compress_to_fp16=False)
    for path in (onnx_path, onnx_path + ".data"):
        if os.path.exists(path):
            os.remove(path)


# precision -> OpenVINO's INFERENCE_PRECISION_HINT value, and the CPU device capability that
# makes it native.
HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_CAPABILITY = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}
_TYPE_NAMES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16",
               "float16": "float16"}


@functools.lru_cache(maxsize=None)
def cpu_capabilities() -> Tuple[str, ...]:
    """The CPU device's ``OPTIMIZATION_CAPABILITIES`` (e.g. BF16, FP32, INT8 on this project's Zen 4)."""
    import openvino as ov

    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def precision_of(value) -> str:
    """An ``INFERENCE_PRECISION_HINT`` value (an ``ov.Type`` or its name) -> "float32", "bfloat16", ..."""
    name = str(getattr(value, "to_string", lambda: value)()).lower()
    return _TYPE_NAMES.get(name, name)


@functools.lru_cache(maxsize=None)
def default_precision() -> str:
    """The precision OpenVINO computes in on this CPU when no hint is given ("bfloat16" here)."""
    import openvino as ov

    return precision_of(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def precision_plan(precision: str, cpu_lacks: Optional[str]) -> Tuple[str, Optional[str]]:
    """(the precision to compile for, a note when it is not the one asked for); ValueError for
    float16 where the CPU device has no FP16. ``cpu_lacks``: the CPU flags ``precision`` needs and
    /proc/cpuinfo does not show ("needs avx512_bf16 or amx_bf16 (...)"; None when it shows one)."""
    caps = cpu_capabilities()
    if precision == "float32" or _CAPABILITY[precision] in caps:
        return precision, None
    why = (f"this CPU is not native in it ({cpu_lacks}), and " if cpu_lacks else "") + (
        f"OpenVINO {versions()['openvino'].split('-')[0]}'s CPU device lists no {_CAPABILITY[precision]} "
        f"({', '.join(caps)})")
    if precision == "bfloat16":
        # keyword spelling (dtype='float32'): segment's command line rewrites it as --dtype float32
        return "float32", (f"dtype='bfloat16' asked of engine='openvino', but {why}, so bf16 would not be computed "
                           "natively: running float32 instead (pass dtype='float32' to say so; `maskformer info` "
                           "lists what this CPU runs natively)")
    raise ValueError(f"engine='openvino' cannot compute dtype='float16' here: {why}; asked for f16 it would silently "
                     "compute bf16 or f32. Use dtype='bfloat16'" + (" (native here)" if _CAPABILITY["bfloat16"] in caps
                                                                    else "") + " or dtype='float32'")


def precision_facts() -> Dict[str, str]:
    """What ``maskformer info`` says of OpenVINO's precisions beyond the plans."""
    return {"cpu_capabilities": ", ".join(cpu_capabilities()),
            "int8": "not a dtype=: `maskformer quantize MODEL --calibration DIR OUT` makes an int8 model (NNCF) and "
                    "writes it only when it keeps >= 99% of the fp32 maps on held-out images and is faster here",
            "default_precision": f"{default_precision()} (what OpenVINO computes in without a hint on this CPU; "
                                 "maskformer always sets one: float32 unless dtype= asks otherwise)"}


def compile_config(threads: int, precision: str = "float32") -> Dict[str, object]:
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": HINTS[precision]}


def check_compiled_precision(compiled, precision: str) -> None:
    """RuntimeError unless ``compiled`` computes in ``precision`` (OpenVINO may replace a hint it
    cannot serve without a word: f16 became bf16 on this project's Zen 4)."""
    got = precision_of(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != precision:
        raise RuntimeError(f"OpenVINO compiled the model in {got}, not the {precision} asked for "
                           f"(INFERENCE_PRECISION_HINT={HINTS[precision]}); pass dtype=torch.float32")


class Runner:
    """``run(pixel_values)`` -> output tensors (in ``output_names`` order).

    ``compiled_dir``: where compiled shapes are kept on disk (see the module docstring); None
    keeps them in memory only."""

    def __init__(self, model_path: str, threads: int, compiled_dir: Optional[str] = None, static_shapes: bool = True,
                 precision: str = "float32"):
        self.core = new_core()
        self.model = _read_model(self.core, model_path)
        # Which deformable attention the graph runs (Mask2Former): our extension's operation or
        # the portable formulation; None for a graph without one (MaskFormer).
        types = {op.get_type_name() for op in self.model.get_ops()}
        self.deformable_attention = ("openvino-extension" if MSDA_OP in types
                                     else "portable" if "GridSample" in types else None)
        self.threads = threads
        self.precision = precision
        self.config = compile_config(threads, precision)
        self.static_shapes = static_shapes
        self.compiled_dir = compiled_dir
        weights = os.path.join(os.path.dirname(model_path), WEIGHTS_FILE)
        model_bytes = os.path.getsize(weights) if os.path.exists(weights) else 0
        self.compiled_bytes_bound = max(COMPILED_MODELS_KEPT * model_bytes, COMPILED_MIN_BYTES)
        self._settings = hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.output_names: List[str] = [o.get_any_name() for o in self.model.outputs]
        self._compiled: "OrderedDict[tuple, object]" = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_onnx(cls, path: str, threads: int, precision: str = "float32") -> "Runner":
        return cls(path, threads, precision=precision)

    @classmethod
    def from_entry(cls, entry: str, threads: int, keep_compiled: bool = True, precision: str = "float32") -> "Runner":
        return cls(os.path.join(entry, IR_FILE), threads,
                   compiled_dir=os.path.join(entry, COMPILED_DIR) if keep_compiled else None, precision=precision)

    def compiled_for(self, shape: tuple):
        """The model compiled for input ``shape`` (compiled on first use, or read back from
        ``compiled_dir``; 8 shapes kept in memory)."""
        key = shape if self.static_shapes else None
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
            compiled = self._read_compiled(shape) if self.compiled_dir and self.static_shapes else None
            if compiled is None:
                model = self.model
                if self.static_shapes:
                    model = self.model.clone()
                    model.reshape({self.model.inputs[0].get_any_name(): list(shape)})
                compiled = self.core.compile_model(model, "CPU", self.config)
                check_compiled_precision(compiled, self.precision)
                if self.compiled_dir and self.static_shapes:
                    self._keep_compiled(shape, compiled)
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)
            return compiled

    def _blob_prefix(self, shape: tuple) -> str:
        # The precision in the name, for a reader of the folder; the settings hash covers it too.
        return f"{'x'.join(str(int(d)) for d in shape)}-{HINTS[self.precision]}-{self._settings}-"

    def _read_compiled(self, shape: tuple):
        """The model compiled for ``shape`` from a blob in ``compiled_dir`` whose bytes match the
        SHA-256 in its name, or None. Blobs that do not match, or that OpenVINO refuses, are deleted."""
        prefix = self._blob_prefix(shape)
        try:
            names = [n for n in os.listdir(self.compiled_dir) if n.startswith(prefix) and n.endswith(".blob")]
        except OSError:
            return None
        paths = sorted((os.path.join(self.compiled_dir, n) for n in names), key=_mtime, reverse=True)
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            compiled = None
            if hashlib.sha256(data).hexdigest() == os.path.basename(path)[len(prefix):-len(".blob")]:
                try:
                    compiled = self.core.import_model(data, "CPU", self.config)
                    check_compiled_precision(compiled, self.precision)
                except Exception:  # a blob OpenVINO cannot read back (or of another precision): compiled again below
                    compiled = None
            if compiled is None:
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used: the last to go when the folder is trimmed
            return compiled
        return None

    def _keep_compiled(self, shape: tuple, compiled) -> None:
        """Write ``compiled`` to ``compiled_dir`` (complete, by rename) and trim the folder to its
        bound, least recently used first. Best effort: a cache that cannot be written to only
        loses the time a later compile of this shape saves."""
        with contextlib.suppress(OSError):
            stream = io.BytesIO()
            compiled.export_model(stream)
            data = stream.getvalue()
            os.makedirs(self.compiled_dir, exist_ok=True)
            name = f"{self._blob_prefix(shape)}{hashlib.sha256(data).hexdigest()}.blob"
            tmp = os.path.join(self.compiled_dir, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, os.path.join(self.compiled_dir, name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            trim_compiled(self.compiled_dir, self.compiled_bytes_bound, keep=name)

    def run(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        """pixel_values: contiguous float32 CPU (B, C, H, W); shared with OpenVINO, not copied."""
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


def trim_compiled(folder: str, max_bytes: int, keep: Optional[str] = None) -> List[str]:
    """Delete the least recently used blobs of ``folder`` until they total at most ``max_bytes``
    (``keep``, the blob just written, stays); returns the deleted names."""
    blobs = []
    for name in os.listdir(folder):
        if not name.endswith(".blob"):  # another process's .tmp-* being written
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            st = os.stat(path)
            blobs.append((st.st_mtime_ns, st.st_size, name))
    total = sum(size for _, size, _ in blobs)
    removed = []
    for _, size, name in sorted(blobs):
        if total <= max_bytes:
            break
        if name == keep:
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            total -= size
            removed.append(name)
    return removed


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0
