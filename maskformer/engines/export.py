"""ONNX export of the reference path, with dynamic batch, height and width, verified against PyTorch.

Its public path is ``maskformer.export`` (and ``maskformer.export_onnx``). It lives in the engines
package because its verification runs the engines' runners and the engine cache builds on it:
``registry`` and the engine modules (run a file) < ``export`` < ``cache`` < ``model`` (the
``EngineModel``), and nothing in this package imports ``maskformer.export``.

    from maskformer import MaskFormerForInstanceSegmentation, export_onnx
    model = MaskFormerForInstanceSegmentation.from_pretrained("facebook/maskformer-swin-tiny-ade")
    report = export_onnx(model, "maskformer.onnx")      # or: maskformer export MODEL OUT.onnx
    print(report.table())

How: the model is traced by ``torch.export`` in strict mode (the reference path: no fast
kernel is traced), with dynamic batch, height and width, and the exported program is translated
to ONNX by ``torch.onnx`` (onnxscript). The reference path has no branch on a size and no
``.item()``: patch, window and merge padding are written as arithmetic on sizes, caches keyed by
size are bypassed while tracing, and the window shuffles copy unconditionally where ``reshape``
would copy in all but the single-window case (``maskformer.windows``), so the graph holds for every
size. Views that flatten a window grid still ask whether a grid side is 1 (PyTorch's view
algorithm), which the trace answers size-obliviously (``backed_size_oblivious``): the answer
holds for 1 too, and the verification below includes sizes whose last stage is one window.

Verification: every export is run by an engine (ONNX Runtime, else OpenVINO) at
``verify_sizes`` - at least three, by default a batch of 2 and sizes that need patch padding, odd
patch merges and window padding at every stage - and compared with the PyTorch model on the same
inputs: ``max |engine - torch| / max |torch|`` per output, which must stay below ``REL_ERROR_BAR``,
and the semantic maps of both (our post-processing) pixel by pixel.

Writing: the file is written into a temporary folder beside ``path``, verified there, and only
then renamed onto ``path`` (``os.replace``: a link at ``path`` is replaced by the file, its
target is never written). A kill during the export or the verification leaves the old file (or
none) at ``path``, never an unverified one; the next export to that path removes the folder a
killed one left.

Outputs: ``class_queries_logits`` (B, Q, K+1) and ``masks_queries_logits`` (B, Q, ceil(H/4),
ceil(W/4)), then by default the three ``*_last_hidden_state`` fields the torch model returns
(``outputs="all"``); ``outputs="logits"`` keeps the first two. Input: ``pixel_values`` (B, 3, H,
W) float32.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import dispatch
from ..msda_pixel_decoder import engine_op_export
from .registry import engine_unavailable, runner_for_file

__all__ = ["export_onnx", "verify_onnx", "verify_rows", "ExportReport", "OUTPUT_FIELDS", "LOGIT_FIELDS", "REL_ERROR_BAR",
           "FP64_FACTOR", "EXPORT_FORMAT", "default_verify_sizes", "padded_stages", "min_side", "estimate_export_seconds",
           "export_program", "tracing_context", "report_json", "semantic_maps", "check_exportable",
           "MASK2FORMER_REL_ERROR_BAR", "rel_error_bar"]

LOGIT_FIELDS = ("class_queries_logits", "masks_queries_logits")
OUTPUT_FIELDS = LOGIT_FIELDS + ("encoder_last_hidden_state", "pixel_decoder_last_hidden_state",
                                "transformer_decoder_last_hidden_state")
# Mask2Former's deformable attention in an export: standard operators, or our operation, run by
# OpenVINO's extension or by ONNX Runtime through onnxruntime-extensions (export_onnx's
# deformable_attention; the value names the engine that verifies the file).
DEFORMABLE_ATTENTION = ("portable", "openvino-extension", "onnxruntime-extensions")
_OP_ENGINE = {"openvino-extension": "openvino", "onnxruntime-extensions": "onnxruntime"}
MSDA_DOMAIN = "com.maskformer"
# Bumped whenever the exported graph changes for the same weights: part of the engine cache key.
EXPORT_FORMAT = 1
# Engines sum fp32 products in their own order (MLAS / oneDNN GEMM blocking, fused LayerNorm,
# GELU and softmax kernels, exp/erf approximations), so their logits are not PyTorch's bit for
# bit. Measured on this project's CPU (max |engine - torch| / max |torch| over the outputs):
# the default model 1.5e-7 to 1.4e-6, Swin-T with perturbed weights up to 1.2e-5 (README,
# "Engines"). The bar leaves a margin of 8x over the worst measured; a real export error (a
# wrong pad, a frozen size, a missing bias) gives errors of order 1.
REL_ERROR_BAR = 1e-4
# ... unless PyTorch's own fp32 result is further than that from its float64 result: a model with
# very peaked attention (a fine-tune, or random weights scaled up) can amplify rounding by 1e5
# (measured: Swin-T with query embeddings x5 and decoder q/k x4 differed from its fp64 self by
# 0.44-0.61 relative, and its engine export by 0.47-0.68). No engine can be asked to be closer to
# fp32 PyTorch than fp32 PyTorch is to the exact result, so a row's bar per output is
# max(REL_ERROR_BAR, FP64_FACTOR x that output's fp32-vs-fp64 error), and the row says so.
FP64_FACTOR = 4.0
# Mask2Former: the bar is MASK2FORMER_REL_ERROR_BAR. Its masked attention thresholds sigmoid(mask
# logit) at 0.5 in every decoder layer: where a logit lies within rounding of 0, two fp32
# computations can disagree on an attention-mask bit, and the decoder's self-attention then spreads
# that bit's effect into every query. The float64 reference cannot see such a flip where PyTorch
# fp32 happens to round like float64, and re-running PyTorch on the input changed by one ulp per
# pixel did not reproduce the engine's flips either (3 tries: 4e-5). Measured: the Swin-T
# m2f-tiny benchmark model (bench.lively_weights_; PyTorch fp32 vs float64 2.8e-5 to 3.8e-5) at
# 1x3x98x73 on a noise input: ONNX Runtime 3.3e-5 to 5.2e-5 from PyTorch, OpenVINO 1.8e-3 to
# 2.4e-3 on the same file (per query: median 3.9e-4, max 2.4e-3); transformers' default
# initialisation at 1x3x512x683: errors that come in equal steps, as flips do (7.3e-5 / 1.6e-4 on
# the class / mask logits for both our export on ONNX Runtime and transformers' own export on
# OpenVINO, 6.3e-4 / 1.0e-3 for ours on OpenVINO; maps equal;
# benchmarks/results/mask2former-export-drift-cpu.md). 1e-2 keeps a 4x margin over the worst
# measured, and an export error (a wrong pad, a frozen size) still gives errors of order 1. Raised
# further by FP64_FACTOR x PyTorch's own error, as for MaskFormer.
MASK2FORMER_REL_ERROR_BAR = 1e-2


def rel_error_bar(config) -> float:
    """The verification's base bar for a model of ``config`` (REL_ERROR_BAR, or
    MASK2FORMER_REL_ERROR_BAR for Mask2Former)."""
    return MASK2FORMER_REL_ERROR_BAR if _thresholds_attention(config) else REL_ERROR_BAR


def _thresholds_attention(config) -> bool:
    return getattr(config, "model_type", "maskformer") == "mask2former"


def padded_stages(config, height: int, width: int) -> List[int]:
    """The Swin stages (1-based) whose token map must be padded to a multiple of the window for an
    input of ``height`` x ``width`` pixels."""
    bb = config.backbone_config
    patch = bb.patch_size if isinstance(bb.patch_size, (list, tuple)) else (bb.patch_size, bb.patch_size)
    h, w = -(-height // patch[0]), -(-width // patch[1])
    stages = []
    for i in range(len(bb.depths)):
        if h % bb.window_size or w % bb.window_size:
            stages.append(i + 1)
        h, w = (h + 1) // 2, (w + 1) // 2
    return stages


def default_verify_sizes(config) -> List[Tuple[int, int, int]]:
    """(batch, height, width) of the verification inputs: three sizes, one a batch of 2, that
    need patch padding (sides not multiples of 4), odd patch merges and window padding: each
    window-padded at every stage where its map is not a multiple of the window."""
    stride = 4 * 2 ** (len(config.backbone_config.depths) - 1)
    sizes = [(1, 8 * stride + 5, 10 * stride + 3), (2, 5 * stride + 1, 4 * stride + 7), (1, 3 * stride + 2, 2 * stride + 9)]
    return sizes


def min_side(config) -> int:
    """The smallest height and width the export serves: one more than the coarsest stage's
    stride (33 pixels for the usual 4 stages), so that no stage's map has a side of 1. The
    engines refuse smaller inputs (the torch model takes them)."""
    return 4 * 2 ** (len(config.backbone_config.depths) - 1) + 1


class _ExportWrapper(nn.Module):
    """pixel_values -> the chosen output fields as a tuple (what an ONNX graph returns)."""

    def __init__(self, model, fields: Sequence[str]):
        super().__init__()
        self.model = model
        self.fields = tuple(fields)

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values, return_dict=True)
        return tuple(out[name] for name in self.fields)


@contextlib.contextmanager
def tracing_context():
    """What every trace of the reference path runs under: the reference backend (no custom op is
    traced), no autograd, and size-oblivious answers for the view algorithm's size-1 questions."""
    # torch's private fx config: imported only where a trace runs, so that a torch that moved it
    # breaks the export alone, not `import maskformer.engines`
    import torch.fx.experimental._config as fx_config

    with dispatch.backend("reference"), torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own chatter, not ours to show a user of ``segment --engine``: a warning per
    torchvision op it cannot register (torchvision is deliberately not installed) and pytree
    deprecation FutureWarnings. Errors still raise; logging at ERROR still shows."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            yield
    finally:
        logger.setLevel(level)


def export_program(model, fields: Sequence[str] = OUTPUT_FIELDS, example: Optional[torch.Tensor] = None,
                   strict: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``model``'s reference path with dynamic batch, height and width.

    ``example``: the tracing input (default: a batch of 2 random images of a size with padding
    everywhere); the graph does not depend on its values or its size."""
    model = model.eval()
    if example is None:
        stride = 4 * 2 ** (len(model.config.backbone_config.depths) - 1)
        example = torch.randn(2, model.config.backbone_config.num_channels, 4 * stride + 3, 5 * stride + 5)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Sides of at least min_side(): every stage's map is then at least 2 wide, which the traced
    # graph assumes (a side of 1 is a special case of several ops' shape rules).
    height = torch.export.Dim("height", min=min_side(model.config), max=65536)
    width = torch.export.Dim("width", min=min_side(model.config), max=65536)
    wrapper = _ExportWrapper(model, fields).eval()
    with tracing_context():
        return torch.export.export(wrapper, (example.to(model.dtype),),
                                   dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}}, strict=strict)


@dataclasses.dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the export compared with PyTorch."""

    path: str
    fields: Tuple[str, ...]
    opset: Optional[int]
    seconds: float
    verify_engine: Optional[str] = None
    rows: List[Dict] = dataclasses.field(default_factory=list)  # one per verified size
    bar: float = REL_ERROR_BAR

    @property
    def max_rel_error(self) -> float:
        return max((r["max_rel_error"] for r in self.rows), default=float("nan"))

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)

    def table(self) -> str:
        lines = [f"exported {self.path} ({', '.join(self.fields)}; opset {self.opset}) in {self.seconds:.1f} s"]
        if not self.rows:
            return "\n".join(lines + ["not verified"])
        lines.append(f"verified with {self.verify_engine} against PyTorch (bar: max relative error <= {self.bar:g}):")
        lines.append(f"  {'input':>18}  {'padded stages':>13}  {'max rel error':>13}  {'bar':>8}  {'worst output':>36}  "
                     "maps agree")
        for r in self.rows:
            b, h, w = r["size"]
            pad = ",".join(str(s) for s in r["padded_stages"]) or "none"
            lines.append(f"  {f'{b}x3x{h}x{w}':>18}  {pad:>13}  {r['max_rel_error']:13.2e}  {r['bar']:8.1e}  "
                         f"{r['worst_output']:>36}  {r['maps_agree']:.4%}")
        raised = [r for r in self.rows if r["bar"] > self.bar]
        if raised:
            worst = max(max(r["torch_fp32_vs_fp64"].values()) for r in raised)
            lines.append(f"note: PyTorch's own fp32 result differs from float64 by up to {worst:.1e} (relative) on this "
                         f"model, so the bar was raised to {FP64_FACTOR:g}x that: the model amplifies rounding, and an "
                         "export cannot be checked more closely than fp32 itself agrees with the exact result")
        lines.append("OK" if self.ok else
                     "FAILED: " + "; ".join(f"{r['size'][0]}x3x{r['size'][1]}x{r['size'][2]}: {r['worst_output']} "
                                            f"{r['max_rel_error']:.2e} > {r['bar']:.1e}" for r in self.rows if not r["ok"]))
        return "\n".join(lines)

    def to_dict(self) -> Dict:
        return {**dataclasses.asdict(self), "max_rel_error": self.max_rel_error, "ok": self.ok}


def export_onnx(model, path, *, outputs: str = "all", opset: Optional[int] = None, verify: bool = True,
                verify_sizes: Optional[Sequence[Tuple[int, int, int]]] = None, verify_engine: Optional[str] = None,
                threads: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
                deformable_attention: str = "portable") -> ExportReport:
    """Export ``model`` (a ``MaskFormerForInstanceSegmentation`` or a
    ``Mask2FormerForUniversalSegmentation``) to ONNX at ``path``.

    Args:
        model: the torch model (fp32 weights on the CPU are exported; other dtypes/devices are
            copied to that first).
        path: the .onnx file to write (its folder is created; an existing file, or a link, at
            ``path`` is replaced only once the new file is verified: see the module docstring).
            Weights are stored inside the file, or beside it (``path + ".data"``) for models
            over 1.5 GB.
        outputs: "all" (the five fields of the torch model's default output, see the module
            docstring) or "logits" (class and mask logits only).
        opset: ONNX opset, default torch.onnx's (18 with torch 2.13).
        verify: run the export with an engine and compare with PyTorch (``verify_onnx``);
            raises ``RuntimeError`` when the error is over ``REL_ERROR_BAR``, and ``path`` is
            then left as it was.
        verify_sizes: (batch, height, width) triples, at least three; default
            ``default_verify_sizes(model.config)``.
        verify_engine: "onnxruntime" or "openvino"; default the first one installed.
        threads: engine threads for the verification (default ``torch.get_num_threads()``).
        log: called with a line per phase (the export with its expected duration, each
            verified size, the result); default silent. The command line prints them.
        deformable_attention: Mask2Former only. "portable" (default: standard ONNX operators,
            one grid_sample per level, any engine), "openvino-extension" or "onnxruntime-extensions"
            (the sampling as one ``com.maskformer::MultiScaleDeformableAttention`` node, run by our
            C++ kernel: in OpenVINO with maskformer's extension, in ONNX Runtime through
            onnxruntime-extensions (``onnxruntime_engine.msda_custom_op``); each engine's choice
            where it can run the node; verified with that engine).

    Returns:
        ``ExportReport`` (``.table()`` prints the verification).
    """
    fields = {"all": OUTPUT_FIELDS, "logits": LOGIT_FIELDS}.get(outputs)
    if fields is None:
        raise ValueError(f"outputs must be 'all' or 'logits', got {outputs!r}")
    check_exportable(model)
    if deformable_attention not in DEFORMABLE_ATTENTION:
        raise ValueError(f"deformable_attention must be one of {', '.join(map(repr, DEFORMABLE_ATTENTION))}, "
                         f"got {deformable_attention!r}")
    if deformable_attention != "portable":
        if getattr(model.config, "model_type", None) != "mask2former":
            raise ValueError(f"deformable_attention={deformable_attention!r} is for Mask2Former models (MaskFormer has "
                             "no deformable attention)")
        runs_on = _OP_ENGINE[deformable_attention]
        if verify_engine not in (None, runs_on):
            raise ValueError(f"an export with deformable_attention={deformable_attention!r} runs only on {runs_on} "
                             f"with maskformer's operation, so it cannot be verified with {verify_engine}")
        verify_engine = runs_on
        _require_engine_op(deformable_attention)
    _require_exporter()
    log = log or (lambda message: None)
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(f"{path} is a folder: give the path of the .onnx file to write")
    sizes = None
    if verify:  # checked before the export, not after it
        engine = verify_engine or _first_engine()
        sizes = list(verify_sizes) if verify_sizes is not None else default_verify_sizes(model.config)
        if len(sizes) < 3:
            raise ValueError(f"verify_sizes: give at least three (batch, height, width) sizes, got {sizes}")
    model = _cpu_fp32(model)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_abandoned_work(folder, name)
    # os.mkdir, not tempfile.mkdtemp: the files keep the umask's permissions (mkdtemp makes 0700).
    work = os.path.join(folder, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(work)
    try:
        staged = os.path.join(work, name)  # the final name: an external .data file keeps its reference
        report = _write_onnx(model, staged, fields, opset, log, deformable_attention)
        report.path = path
        if verify:
            report.verify_engine = engine
            report.bar = rel_error_bar(model.config)
            report.rows = verify_onnx(model, staged, sizes, engine=engine, threads=threads, fields=fields, log=log)
            if not report.ok:
                raise RuntimeError(f"the ONNX export does not match PyTorch, so {path} was not written:\n"
                                   + report.table())
        # The weights file first: a kill between the two renames (microseconds) could pair a new
        # .data with the old .onnx, but never leaves an unverified .onnx.
        for suffix in (".data", ""):
            if os.path.exists(staged + suffix):
                os.replace(staged + suffix, path + suffix)
            elif suffix and os.path.lexists(path + suffix):
                os.remove(path + suffix)  # the old file's weights; the new file holds its own
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_onnx(model, path: str, fields: Sequence[str], opset: Optional[int], log,
                deformable_attention: str = "portable") -> ExportReport:
    """Trace ``model`` and write its ONNX file at ``path`` (no verification)."""
    start = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    log(f"exporting to ONNX ({params / 1e6:.1f} M parameters): torch.export traces the model, torch.onnx writes "
        f"the file; roughly {estimate_export_seconds(model.config):.0f} s{_busy_note()}")
    extension = deformable_attention != "portable"
    table = {}
    with _quiet_exporter(), (engine_op_export() if extension else contextlib.nullcontext()):
        if extension:
            table = {torch.ops.maskformer.ms_deform_attn_engine.default: _msda_onnx_node()}
        program = export_program(model, fields)
        nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        with tracing_context():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=["pixel_values"],
                                             output_names=list(fields), optimize=True, verbose=False,
                                             custom_translation_table=table or None)
    onnx_program.save(path, external_data=nbytes > 1.5e9)
    _name_dynamic_dims(path, program)
    seconds = time.perf_counter() - start
    log(f"exported in {seconds:.1f} s ({os.path.getsize(path) / 1e6:.1f} MB)")
    return ExportReport(path=path, fields=tuple(fields), opset=_opset_of(path), seconds=seconds)


def estimate_export_seconds(config, loadavg: Optional[float] = None) -> float:
    """Roughly how long ``export_onnx`` traces and writes a model of ``config`` here: tracing is
    one Python thread whose time grows with the layers traced (Swin blocks + decoder layers), not
    with the weights, and a busy machine gives it a share of a core (``loadavg``: the 1-minute
    load, default the current one)."""
    layers = sum(config.backbone_config.depths) + _decoder_layers(config)
    if loadavg is None:
        loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return _EXPORT_SECONDS_PER_LAYER * layers * max(1.0, loadavg / (os.cpu_count() or 1))


# Seconds per traced layer on a core of its own: 4 exports on this project's 2-core AMD EPYC (Zen 4),
# each time divided by its layers and by max(1, load / cores) over the export, in two runs of
# benchmarks/bench_engine_cache.py (benchmarks/results/engine-cache-cpu{-run1,}.md): the default
# model (7 layers) 207 s at load 23 -> 2.6 and 126 s at load 9 -> 3.9; a Swin-T (18 layers) 542 s
# at load 14 -> 4.2 and 515 s at load 10 -> 5.8. The median, 4.0: an estimate to within a factor
# of 2, not a promise.
_EXPORT_SECONDS_PER_LAYER = 4.0


def _decoder_layers(config) -> int:
    """The layers traced after the backbone: MaskFormer's transformer decoder, or Mask2Former's
    deformable encoder layers and masked-attention decoder layers."""
    if getattr(config, "model_type", "maskformer") == "mask2former":
        return config.encoder_layers + config.decoder_layers
    return config.decoder_config.decoder_layers


def semantic_maps(config, class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor,
                  target_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """The family's semantic post-processing (what ``maskformer segment`` computes): class
    logits (B, Q, K+1) and mask logits (B, Q, h, w) float -> B maps (H_i, W_i) int64. Mask2Former's
    processor first resizes the mask logits to 384x384, as transformers'."""
    if getattr(config, "model_type", "maskformer") == "mask2former":
        # the processors import Pillow and SciPy: only to verify a Mask2Former export
        from ..processing_mask2former import resize_mask_logits

        masks_queries_logits = resize_mask_logits(masks_queries_logits)
    return dispatch.semantic_segmentation(class_queries_logits, masks_queries_logits, target_sizes)


def check_exportable(model) -> None:
    """Refuse, naming the fix, a model the export does not serve: only the models with heads
    (``MaskFormerForInstanceSegmentation``, ``Mask2FormerForUniversalSegmentation``) return the
    class and mask logits the export writes."""
    if getattr(type(model), "checkpoint_prefix", None) != "model.":
        raise TypeError(f"the ONNX export serves MaskFormerForInstanceSegmentation and "
                        f"Mask2FormerForUniversalSegmentation (the models with heads), got {type(model).__name__}: "
                        "load the checkpoint with the class that has heads")


def _busy_note() -> str:
    """", longer than alone: this machine's load is L on C cores" when other work slows the export."""
    load, cores = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), os.cpu_count() or 1
    return f" (this machine is busy: load {load:.1f} on {cores} cores)" if load > 1.5 * cores else ""


def _remove_abandoned_work(folder: str, name: str) -> None:
    """Remove the ``.NAME.partial-PID-*`` folders of exports to ``folder/NAME`` killed before they
    finished (their process is gone)."""
    prefix = f".{name}.partial-"
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def verify_onnx(model, path, sizes: Sequence[Tuple[int, int, int]], *, engine: str = "onnxruntime",
                threads: Optional[int] = None, fields: Sequence[str] = OUTPUT_FIELDS, seed: int = 0,
                log: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Run the ONNX file at ``path`` with ``engine`` and ``model`` on the same random inputs
    (one per (batch, height, width) in ``sizes``); one row per size: max relative error per
    output and overall, and the fraction of equal pixels in the two semantic maps."""
    return verify_rows(model, runner_for_file(engine, path, threads=threads), sizes, fields=fields, seed=seed,
                       log=log, engine=engine)


def verify_rows(model, runner, sizes: Sequence[Tuple[int, int, int]], *, fields: Optional[Sequence[str]] = None,
                seed: int = 0, log: Optional[Callable[[str], None]] = None, engine: str = "the engine") -> List[Dict]:
    """``verify_onnx`` with an engine ``Runner`` already made (``runner.run(x)`` -> tensors in
    ``runner.output_names`` order). ``log``: a line per size as it is checked."""
    model = _cpu_fp32(model)
    model64 = None  # made on the first row whose error passes the bar (see FP64_FACTOR)
    base_bar = rel_error_bar(model.config)
    fields = tuple(fields or runner.output_names)
    rows = []
    gen = torch.Generator().manual_seed(seed)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    if log:
        log(f"verifying with {engine} against PyTorch at {len(sizes)} sizes (one forward of each per size)")
    for batch, height, width in sizes:
        started = time.perf_counter()
        x = torch.randn(batch, model.config.backbone_config.num_channels, height, width, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = dict(zip(runner.output_names, runner.run(x)))
        errors = {}
        for name in fields:
            a, b = got[name], ref[name]
            if tuple(a.shape) != tuple(b.shape):
                raise RuntimeError(f"engine output {name} has shape {tuple(a.shape)} at input {tuple(x.shape)}, "
                                   f"PyTorch {tuple(b.shape)}: the export froze a size")
            errors[name] = rel(a, b)
        bars = {name: base_bar for name in fields}
        torch_fp32_errors = None
        if max(errors.values()) > base_bar:
            if model64 is None:
                model64 = copy.deepcopy(model).to(torch.float64).eval()
            with torch.no_grad():
                ref64 = model64(x.double())
            torch_fp32_errors = {name: rel(ref[name], ref64[name]) for name in fields}
            bars = {name: max(base_bar, FP64_FACTOR * torch_fp32_errors[name]) for name in fields}
        target = [(height, width)] * batch
        maps_ref = semantic_maps(model.config, ref.class_queries_logits, ref.masks_queries_logits, target)
        maps_got = semantic_maps(model.config, got["class_queries_logits"], got["masks_queries_logits"], target)
        agree = sum(int((a == b).sum()) for a, b in zip(maps_got, maps_ref)) / sum(m.numel() for m in maps_ref)
        worst = max(errors, key=lambda n: errors[n] / bars[n])
        row = {"size": [batch, height, width], "padded_stages": padded_stages(model.config, height, width),
               "errors": errors, "max_rel_error": errors[worst], "worst_output": worst, "maps_agree": agree,
               "bar": bars[worst], "ok": all(errors[n] <= bars[n] for n in fields)}
        if torch_fp32_errors is not None:
            row["torch_fp32_vs_fp64"] = torch_fp32_errors
        rows.append(row)
        if log:
            log(f"  {batch}x{x.shape[1]}x{height}x{width}: max relative error {errors[worst]:.1e} (bar {bars[worst]:.0e}), "
                f"maps agree {agree:.2%}{'' if row['ok'] else ', FAILED'} ({time.perf_counter() - started:.1f} s)")
    return rows


def _name_dynamic_dims(path: str, program) -> None:
    """Rename the exporter's size symbols (s6, s37, ...) to batch, height and width in the file's
    input and output shapes (ONNX Runtime's free-dimension overrides and readers go by these)."""
    import onnx  # optional: the [onnx] / [openvino] extras

    dims = program.graph_signature.user_inputs and [n for n in program.graph.nodes if n.op == "placeholder"]
    symbols = {}
    for node in dims or []:
        if node.name == "pixel_values" or node.target == "pixel_values":
            shape = node.meta["val"].shape
            for index, name in ((0, "batch"), (2, "height"), (3, "width")):
                symbols[str(shape[index])] = name
    if not symbols:
        return
    proto = onnx.load(path, load_external_data=False)
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in symbols) + r")\b")
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: symbols[m.group(1)], dim.dim_param)
    onnx.save(proto, path)


def _cpu_fp32(model):
    if model.dtype != torch.float32 or model.device.type != "cpu":
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    return model.eval()


def _msda_onnx_node():
    """The ONNX translation of ``maskformer::ms_deform_attn_engine``: one node of our domain,
    ``com.maskformer::MultiScaleDeformableAttention(value, spatial_wh, sampling_locations,
    attention_weights)`` (shapes: ``maskformer.msda_pixel_decoder.engine_op_export``), given a
    schema so that onnxscript can type it. One node for both engines: OpenVINO maps it to the
    extension's operation, ONNX Runtime runs it as onnxruntime-extensions' Python op registered
    under this domain (``onnxruntime_engine.msda_custom_op``)."""
    import onnx  # the exporter's own dependency, present whenever an export runs
    import onnxscript

    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        "MultiScaleDeformableAttention", MSDA_DOMAIN, 1,
        inputs=[param("value", "T"), param("spatial_wh", "tensor(int64)"), param("sampling_locations", "T"),
                param("attention_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32, as the extension computes")])
    node = onnxscript.values.Op(onnxscript.values.Opset(MSDA_DOMAIN, 1), "MultiScaleDeformableAttention", schema)

    def translate(value, spatial_wh, sampling_locations, attention_weights):
        return node(value, spatial_wh, sampling_locations, attention_weights)

    return translate


def _require_engine_op(deformable_attention: str) -> None:
    """RuntimeError naming the fix where the engine of ``deformable_attention`` cannot run our node."""
    engine = _OP_ENGINE[deformable_attention]
    if engine_unavailable(engine):
        raise RuntimeError(engine_unavailable(engine))
    if engine == "openvino":
        from . import openvino_engine  # imports openvino only when called

        path, why = openvino_engine.msda_extension()
        needs = "maskformer's OpenVINO extension"
    else:
        from . import onnxruntime_engine  # as openvino_engine above: the engine modules load on use

        path, why = onnxruntime_engine.msda_custom_op()
        needs = "onnxruntime-extensions and maskformer's C++ extension"
    if path is None:
        raise RuntimeError(f"deformable_attention={deformable_attention!r} needs {needs}, which is not available "
                           f"here: {why}. Use deformable_attention='portable'")


def _require_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise ImportError(f"the ONNX export needs {' and '.join(missing)}: pip install 'maskformer[onnx]' "
                          "(or pip install onnx onnxscript)")


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _first_engine() -> str:
    for name in ("onnxruntime", "openvino"):
        if engine_unavailable(name) is None:
            return name
    raise ImportError("verifying the export needs ONNX Runtime or OpenVINO: pip install 'maskformer[onnx]' or "
                      "'maskformer[openvino]' (or pass verify=False)")


def _opset_of(path: str) -> Optional[int]:
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # reading the opset is informative only
        return None


def report_json(report: ExportReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
