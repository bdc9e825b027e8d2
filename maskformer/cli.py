"""The ``maskformer`` command line.

    maskformer demo [--out DIR] [--overwrite]   segment a generated image with the shipped default model
    maskformer segment INPUT... [--model PATH_OR_ID] --out DIR [--task semantic|panoptic|instance]
                                                segment images, folders and globs (maskformer.segment_folder)
    maskformer info                             versions, devices, CPU features and precisions, fast paths, engines
                                                (and the precisions each runs) and why any is off
    maskformer export MODEL OUT.onnx            the model to ONNX (dynamic batch/height/width), verified against PyTorch
    maskformer bench [...]                      end-to-end benchmark against transformers (maskformer.bench)
    maskformer quantize MODEL --calibration DIR OUT
                                                int8 OpenVINO model, written only when it keeps >= 99% of the fp32
                                                maps and is faster than fp32/bf16 here (maskformer.quantize)

Under ``torchrun`` (WORLD_SIZE > 1) ``segment`` gives each rank its own shard of the inputs
(rank r takes inputs r, r + W, ...) and rank 0 prints the combined summary.

The default model shipped in the package (``maskformer/default_model``, trained by
``scripts/train_default.py``) is a small MaskFormer that knows four classes of the procedural
``maskformer.synthetic`` images: background, disc, box, stripe. It is a real, trained model,
but only for that toy domain: for natural images pass ``--model`` with a hub checkpoint.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from . import __version__, _ext
from .config import MaskFormerConfig
from .loading import DEFAULT_MODEL_DIR, checkpoint_family, family_classes, load_default_model
from .modeling import MaskFormerForInstanceSegmentation
from .overlay import color_map_image, colour_table, render_overlay
from .precision import native_precisions
from .segment_inputs import DEFAULT_MAX_PIXELS
from .segment_outputs import save_label_map
from .synthetic import SYNTHETIC_LABELS, make_sample, mean_iou

SHIPPED_MODEL = ("the shipped default model: a small MaskFormer trained on generated images of four classes "
                 "(background, disc, box, stripe); it knows nothing else, so for photos pass --model with a "
                 "checkpoint folder or hub id (e.g. facebook/maskformer-swin-large-ade)")


def demo_config():
    """The default model's architecture: Swin 32-d, depths 1-1-2-1, window 7, 8 queries, 64-d
    decoder, 4 classes (the synthetic dataset's)."""
    return MaskFormerConfig(
        backbone_config=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, drop_path_rate=0.0),
        decoder_config=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, decoder_attention_heads=4, num_queries=8,
                            dropout=0.0),
        fpn_feature_size=64,
        mask_feature_size=64,
        id2label=dict(enumerate(SYNTHETIC_LABELS)),
    )


def random_model(seed: int = 0):
    """``demo_config()`` with weights drawn from ``seed``: untrained, for tests and benchmarks."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MaskFormerForInstanceSegmentation(demo_config())
    return model.eval()


def _check_outputs_free(paths: List[str], overwrite: bool):
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them, or choose another --out")
    links = [p for p in paths if os.path.islink(p)]
    if links:
        raise FileExistsError(f"{', '.join(links)} are symbolic links; refusing to write through them (remove them)")


def run_demo(out_dir: str, overwrite: bool = False, seed: int = 0) -> dict:
    """Segment a synthetic image with the embedded default model; write image, label map, overlay and JSON."""
    # the processor pulls in SciPy: imported by the commands that process images, not by `info`
    from .processing import MaskFormerImageProcessor

    names = ("image.png", "semantic.png", "semantic.color.png", "overlay.png", "segments.json")
    paths = {n: os.path.join(out_dir, n) for n in names}
    _check_outputs_free(list(paths.values()), overwrite)
    os.makedirs(out_dir, exist_ok=True)

    model = load_default_model()
    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    image, truth = make_sample(seed=10**7 + seed, height=240, width=320)
    start = time.perf_counter()
    inputs = processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    seconds = time.perf_counter() - start
    label_map = label_map.cpu().numpy()

    image.save(paths["image.png"])
    save_label_map(label_map, paths["semantic.png"])
    label_names = {int(i): model.config.id2label[int(i)] for i in np.unique(label_map)}
    table = colour_table(label_map, label_names)
    render_overlay(image, label_map, label_names, table).save(paths["overlay.png"])
    color_map_image(label_map, table).save(paths["semantic.color.png"])
    ids, counts = np.unique(label_map, return_counts=True)

    miou, _ = mean_iou(label_map.astype(np.int64), truth, len(SYNTHETIC_LABELS))
    summary = {
        "model": "maskformer default model (trained on maskformer.synthetic shapes: background/disc/box/stripe)",
        "miou_vs_ground_truth": round(miou, 4),
        "image_size": [image.height, image.width],
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "seconds": round(seconds, 4),
        "segments": [
            {"label_id": int(i), "label": model.config.id2label[int(i)], "area": int(c)} for i, c in zip(ids, counts)
        ],
    }
    with open(paths["segments.json"], "w") as f:
        json.dump(summary, f, indent=2)
    summary["files"] = [paths[n] for n in names]
    return summary


def info() -> dict:
    """Versions, devices, CPU features and which fast paths can run here (with the reason when one cannot)."""
    cuda = torch.cuda.is_available()
    report = {
        "maskformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
    }
    feats = _ext.cpu_features()
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    native_bf16 = feats["avx512_bf16"] or feats["amx_bf16"]
    report["cpu"] = {
        "model": _ext.cpu_model(),
        "features": {k: v for k, v in feats.items()},
        "torch_cpu_capability": capability,
        "bfloat16": "native (avx512_bf16/AMX): --dtype bfloat16 can be faster than float32" if native_bf16 else
                    "no avx512_bf16/AMX: bfloat16 matmuls are emulated; --dtype float32 is the fast choice here",
        # which precisions the CPU computes in (its flags), then what each engine does with each
        "native_precisions": native_precisions(),
    }
    # What each fast backend serves comes from the op registry (each kernels/<op>.py declares its
    # implementations), so an op added there shows up here without an edit.
    from .kernels import registry

    try:
        ops = registry.ops()
        registry_error = None
    except ImportError as exc:  # a module named in MASKFORMER_OP_MODULES that does not import
        ops, registry_error = [], str(exc)

    def served(backend: str) -> str:
        names = [op.name for op in ops if op.impl(backend) is not None]
        return ", ".join(names) or "no op"

    triton_err = _ext.triton_import_error()
    if triton_err is not None:
        report["triton"] = f"not usable: {triton_err}"
    else:
        import triton

        if cuda:
            report["triton"] = (f"installed ({triton.__version__}), CUDA device present: the Triton kernels run "
                                f"({served('triton')})")
        else:
            report["triton"] = (f"installed ({triton.__version__}), no CUDA device: the Triton kernels "
                                f"({served('triton')}) cannot run here"
                                + (" (TRITON_INTERPRET=1 is set: they run slowly on CPU tensors, for tests)"
                                   if _ext.triton_interpret_mode() else ""))
    cpp_err = _ext.cpp_import_error()
    report["cpp"] = (f"built: the C++ kernels run on CPU tensors ({served('cpp')})" if cpp_err is None
                     else f"not usable: {cpp_err}")
    # dispatch.describe(): the requested backend and every registered op (description, role,
    # tasks, implementations with devices and dtypes, what has no kernel and why).
    if registry_error is None:
        # dispatch loads every op module when imported: only once the registry loaded
        from . import dispatch

        report["backends"] = dispatch.describe()
    else:
        report["backends"] = f"the op registry did not load: {registry_error}"
    # The engines package builds on the export, which runs the model with dispatch's reference
    # backend; an op module that does not import breaks that import too, and info still reports.
    try:
        # see above: the engines import the export and dispatch
        from .engines.precision import describe_precisions
        from .engines.registry import describe as describe_engines

        report["engines"] = describe_engines()
        # per engine: what dtype= of each precision does on this CPU, and the engine's own facts
        report["engine_precisions"] = describe_precisions()
    except ImportError as exc:
        report["engines"] = f"not listed: {exc}"
    report["model_families"] = {
        "maskformer": "MaskFormerForInstanceSegmentation + MaskFormerImageProcessor (config model_type 'maskformer'; "
                      "engines torch, onnxruntime, openvino)",
        "mask2former": "Mask2FormerForUniversalSegmentation + Mask2FormerImageProcessor (config model_type "
                       "'mask2former'; engines torch, onnxruntime, openvino)",
    }
    report["threads"] = torch.get_num_threads()
    return report


def set_threads(threads: int) -> None:
    """``--threads``: torch's intra-op threads, which the engines also take by default."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def run_export(args) -> int:
    """``maskformer export``: write (to a temporary file, renamed into place once verified), verify,
    print the verification table; a line per phase on stderr."""
    # the export (torch.onnx, the engines) only for the command that exports
    from .export import export_onnx

    if args.threads is not None:
        set_threads(args.threads)
    existing = [p for p in (args.out, args.out + ".data") if os.path.lexists(p)]
    if existing and not args.overwrite:  # checked before the minute of exporting, not after
        raise ValueError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                         "pass --overwrite to replace it, or choose another output path")
    if os.path.isdir(args.out) and not os.path.islink(args.out):
        raise ValueError(f"{args.out} is a folder: give the path of the .onnx file to write")
    sizes = None
    if args.verify_sizes:
        try:
            sizes = [tuple(int(v) for v in item.lower().split("x")) for item in args.verify_sizes.split(",")]
        except ValueError:
            sizes = [()]
        if any(len(s) != 3 or min(s) < 1 for s in sizes):
            raise ValueError(f"--verify-sizes must be BxHxW sizes such as 1x512x683,2x97x131,1x224x288, got "
                             f"{args.verify_sizes!r}")

    def log(message: str) -> None:
        print(f"maskformer export: {message}", file=sys.stderr, flush=True)

    if args.model == "default":
        model = load_default_model()
    else:
        # config.json's model_type picks the class: MaskFormer or Mask2Former, both exported
        model_cls, _ = family_classes(checkpoint_family(args.model))
        model = model_cls.from_pretrained(args.model, dtype="float32", device="cpu")
    report = export_onnx(model, args.out, outputs=args.outputs, opset=args.opset, verify=not args.no_verify,
                         verify_sizes=sizes, verify_engine=args.verify_engine, threads=args.threads, log=log)
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if (args.no_verify or report.ok) else 1


# segment_folder's keywords -> the command line's options. Messages from the function (and from
# what it calls) name options the Python way, `max_pixels=1000`; the command shows them the way a
# user types them, `--max-pixels 1000`.
SEGMENT_FLAGS = {
    "out_dir": "--out", "model": "--model", "task": "--task", "engine": "--engine", "device": "--device",
    "dtype": "--dtype", "batch_size": "--batch-size", "overwrite": "--overwrite", "recursive": "--recursive",
    "max_pixels": "--max-pixels", "threads": "--threads", "backend": "--backend", "color_map": "--no-color-map",
    "progress": "--quiet",
}
_SWITCHES = {"overwrite": "True", "recursive": "True", "color_map": "False", "progress": "False"}
_KEYWORD = re.compile(r"(?<![\w.\-/])(" + "|".join(SEGMENT_FLAGS) + r")="
                      r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[\w.+\-]*)""")
_BARE = re.compile(r"(?<![\w.\-/])(" + "|".join(k for k in SEGMENT_FLAGS if "_" in k) + r")\b(?!=)")


def cli_spelling(text: str) -> str:
    """``engine='torch'`` -> ``--engine torch``, ``overwrite=True`` -> ``--overwrite``,
    ``color_map=False`` -> ``--no-color-map``, ``max_pixels`` -> ``--max-pixels``: a message of
    ``segment_folder`` as the command line's user types the options."""
    def keyword(match):
        name, value = match.group(1), match.group(2)
        flag = SEGMENT_FLAGS[name]
        if name in _SWITCHES:
            return flag if value in ("", _SWITCHES[name]) else match.group(0)
        if value[:1] in "'\"" and value:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = value[1:-1]
            value = shlex.quote(str(value))
        return f"{flag} {value}" if value else flag

    text = _KEYWORD.sub(keyword, text)
    return _BARE.sub(lambda m: SEGMENT_FLAGS[m.group(1)], text)


class _CommandLineFormatter(logging.Formatter):
    """The run's notes and warnings on stderr, prefixed and in the command line's spelling."""

    def format(self, record):
        return "maskformer segment: " + cli_spelling(record.getMessage())


def run_segment(args) -> int:
    """``maskformer segment``: parse -> ``segment_folder`` -> print -> exit status (0: nothing
    failed; 1: an input failed; 130: interrupted). Under torchrun only rank 0 prints; the other
    ranks exit 0 so that torchrun does not tear rank 0 down before it has printed."""
    # the segment run imports dispatch, which loads every op module: only for this command
    from .segment import SegmentInterrupted, segment_folder

    logger = logging.getLogger("maskformer.segment")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandLineFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = segment_folder(
            args.inputs, args.out, model=args.model, task=args.task, engine=args.engine, device=args.device,
            dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite, recursive=args.recursive,
            max_pixels=args.max_pixels, threads=args.threads, backend=args.backend, color_map=not args.no_color_map,
            progress=not args.quiet, raise_errors=args.verbose)
    except SegmentInterrupted as exc:
        summary = exc.summary
    except KeyboardInterrupt:  # before the first input (loading the model): nothing was written
        print("maskformer segment: interrupted before any input was segmented", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
    if rank != 0:
        return 0
    print(f"maskformer segment: {summary}")
    for outcome in summary.failed:
        print(f"  failed: {outcome.input}: {cli_spelling(outcome.reason)}", file=sys.stderr)
    for outcome in summary.skipped:
        if outcome.outputs:  # a complete result: the count says it
            continue
        print(f"  skipped: {outcome.input}: {cli_spelling(outcome.reason)}", file=sys.stderr)
    if (summary.backend_plan or args.verbose) and summary.ran:
        print("maskformer segment: ran " + "; ".join(summary.ran), file=sys.stderr)
    return summary.exit_status


SEGMENT_EPILOG = """files written per input (NAME = the input's path relative to the folder or glob base it was
found in, extension kept: photos/trip/a.jpg -> OUT/trip/a.jpg.*):
  NAME.label.png    lossless label map at the photo's size: class ids (semantic), or segment values
                    (panoptic/instance: 0 = no segment); 8-bit, or 16-bit when a value exceeds 255
  NAME.color.png    the same map in colour, for a viewer (skip with --no-color-map)
  NAME.overlay.png  the photo in grey with coloured segments, their outlines and a legend
  NAME.json         size, task, model, segments (label, area; score and RLE for panoptic/instance),
                    EXIF orientation / frames / bit depth notes, and the set's status

Results are resumable: a re-run skips inputs whose results are complete, redoes interrupted ones,
and never writes over another input's results, a file it did not write, or through a symbolic
link. Results and the output folder are never inputs, so --out may be the input folder. Exit
status: 0 when nothing failed (skips are fine), 1 when an input failed, 130 when interrupted.
From Python: maskformer.segment_folder(inputs, out_dir, **options) does the same.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformer", description="Fast MaskFormer inference")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors (default: one line)")
    # The same flag after the subcommand; SUPPRESS keeps it from resetting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    demo = sub.add_parser("demo", parents=[common], help="segment a generated image with the shipped default model",
                          description="Segment a freshly generated image with " + SHIPPED_MODEL + ".")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    demo.add_argument("--seed", type=int, default=0, help="which generated image (default: 0)")
    seg = sub.add_parser(
        "segment", parents=[common], formatter_class=fmt, epilog=SEGMENT_EPILOG,
        help="segment images, folders and globs",
        description="Segment image files, folders (their images; subfolders with --recursive) and glob patterns.\n"
                    "Without --model it uses " + SHIPPED_MODEL + ".")
    seg.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quote globs)")
    seg.add_argument("--model", default=None,
                     help="checkpoint folder or hub id (default: the shipped toy model, see above)")
    seg.add_argument("--out", required=True, help="output folder (created if missing; must not be a file)")
    seg.add_argument("--task", choices=("semantic", "panoptic", "instance"), default="semantic",
                     help="which maps to make (default: semantic)")
    seg.add_argument("--recursive", action="store_true",
                     help="also segment the images in subfolders of folder inputs (default: off; skipped "
                          "subfolders are named on stderr)")
    seg.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    seg.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                     help="model precision (default: float32; bfloat16 pays only on GPUs and CPUs with "
                          "avx512_bf16/AMX: see `maskformer info`). With --engine openvino: the precision it "
                          "computes in (bfloat16 where the CPU has it natively, else float32 with a note)")
    seg.add_argument("--backend", choices=("auto", "reference", "triton", "cpp"), default=None,
                     help="force the kernels' backend for the ops it has a kernel for; the others run on auto, and "
                          "the command says which op ran where (default: auto: Triton on CUDA, C++ on CPU)")
    seg.add_argument("--batch-size", type=int, default=4,
                     help="images per forward pass on CUDA, batched only with images of the same input size "
                          "(default: 4); on the CPU images run one at a time (faster there, see README)")
    seg.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help=f"refuse images with more pixels than this, by their header, before decoding "
                          f"(default: {DEFAULT_MAX_PIXELS:,}, Pillow's decompression-bomb limit)")
    seg.add_argument("--no-color-map", action="store_true", help="do not write NAME.color.png (default: write it)")
    seg.add_argument("--overwrite", action="store_true",
                     help="redo inputs whose complete results exist (default: skip them); never replaces another "
                          "input's results or a file this command did not write")
    seg.add_argument("--quiet", action="store_true",
                     help="no progress lines (default: a bar on a terminal, else a line every 25 inputs or 30 s)")
    seg.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                     help="who runs the network (default: torch). onnxruntime/openvino: its ONNX export on the CPU "
                          "(float32; openvino also --dtype bfloat16), built on first use and cached; post-processing "
                          "stays ours. `maskformer info` says which are installed and which precisions each runs")
    seg.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch and the engine (default: torch's, one per core)")
    sub.add_parser("info", parents=[common], help="versions, devices, CPU features, fast paths and engines")
    exp = sub.add_parser(
        "export", parents=[common], formatter_class=fmt, help="export a model to ONNX, verified against PyTorch",
        description="Export a MaskFormer or Mask2Former checkpoint (folder or hub id) to ONNX with dynamic batch, "
                    "height and width, then run the file with an engine at three or more input sizes (padding at "
                    "every stage) and compare with PyTorch: max relative error per size (must be <= 1e-4; 1e-2 for "
                    "Mask2Former, whose thresholded attention can flip on rounding) and semantic-map agreement.")
    exp.add_argument("model", help="checkpoint folder or hub id ('default': the shipped toy model)")
    exp.add_argument("out", help="the .onnx file to write")
    exp.add_argument("--outputs", choices=("all", "logits"), default="all",
                     help="all: the torch model's five output fields (default); logits: class and mask logits only")
    exp.add_argument("--verify-sizes", default=None,
                     help="BxHxW sizes to verify, comma separated, at least three (default: three sizes with padding)")
    exp.add_argument("--verify-engine", choices=("onnxruntime", "openvino"), default=None,
                     help="engine that runs the verification (default: the first installed)")
    exp.add_argument("--no-verify", action="store_true", help="skip the verification")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    exp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    exp.add_argument("--json", default=None, help="also write the verification report to this JSON file")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    sub.add_parser("bench", help="end-to-end throughput benchmark: `maskformer bench --help`")
    qua = sub.add_parser(
        "quantize", parents=[common], formatter_class=fmt,
        help="int8 OpenVINO model, calibrated on your images; written only when it keeps the maps and is faster",
        description="Quantize the OpenVINO engine of MODEL to int8 (NNCF static post-training quantization, "
                    "calibrated on the images of --calibration), then measure on held-out images (every 4th, or "
                    "--held-out): the share of semantic-map pixels equal to float32's, and the forward time against "
                    "float32 and bf16 (where native), interleaved. OUT (a new folder: the int8 IR and quantize.json) "
                    "is written only when int8 keeps at least 99%% of the pixels and is faster than every other "
                    "precision; otherwise the command prints what it measured, writes nothing and exits 1. Needs "
                    "maskformer[openvino] and NNCF (pip install --no-build-isolation 'maskformer[quantize]'; it installs no torch).")
    qua.add_argument("model", help="MaskFormer checkpoint folder or hub id ('default': the shipped toy model)")
    qua.add_argument("out", help="the folder to write (must not exist)")
    qua.add_argument("--calibration", required=True, help="folder of images to calibrate on (and hold out from)")
    qua.add_argument("--held-out", default=None, help="folder of images to measure on (default: every 4th calibration "
                                                      "image, not used for calibration)")
    qua.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    qua.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    qua.add_argument("--json", default=None, help="also write the measurement to this new JSON file")
    return parser


def run_quantize(args) -> int:
    # NNCF and OpenVINO (optional) come with the quantize module
    from .quantize import quantize_openvino

    if args.json and os.path.lexists(args.json):
        raise ValueError(f"{args.json} exists: pass a new file for --json")
    result = quantize_openvino(None if args.model == "default" else args.model, args.calibration, args.out,
                               held_out=args.held_out, threads=args.threads, rounds=args.rounds,
                               log=lambda m: print(f"maskformer quantize: {m}", file=sys.stderr, flush=True))
    print(result)
    if args.json:
        with open(args.json, "x") as f:
            json.dump(result.to_dict(), f, indent=1)
    return 0 if result.accepted else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own argument parser (maskformer.bench)
        from .bench import main as bench_main  # the benchmark harness: only for `maskformer bench`

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            summary = run_demo(args.out, overwrite=args.overwrite, seed=args.seed)
            print("maskformer demo: the shipped default model (trained on generated shapes: background, disc, box,")
            print("  stripe) segments a freshly generated image; for natural images use --model with a hub checkpoint.")
            print(f"  image {summary['image_size'][1]}x{summary['image_size'][0]}, model input "
                  f"{tuple(summary['pixel_values_shape'])}, {summary['seconds'] * 1000:.0f} ms")
            for seg in summary["segments"]:
                print(f"  {seg['label']:>10s} (id {seg['label_id']}): {seg['area']} px")
            print(f"  mIoU against the image's ground truth: {summary['miou_vs_ground_truth']:.3f}")
            print("  wrote " + ", ".join(summary["files"]))
        elif args.command == "segment":
            return run_segment(args)
        elif args.command == "info":
            print(json.dumps(info(), indent=2))
        elif args.command == "export":
            return run_export(args)
        elif args.command == "quantize":
            return run_quantize(args)
        return 0
    except Exception as exc:  # one clear line unless --verbose
        if args.verbose:
            raise
        message = cli_spelling(str(exc)) if args.command == "segment" else str(exc)
        print(f"maskformer {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
