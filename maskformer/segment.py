"""``maskformer.segment_folder``: folders of real photos to label maps, overlays and JSON, safely.
``maskformer segment`` (``cli.py``) is a thin command-line layer over it.

    import maskformer
    summary = maskformer.segment_folder(["photos/"], "seg", model="facebook/maskformer-swin-base-coco",
                                        task="panoptic")
    print(len(summary.done), len(summary.skipped), summary.failed)

This module is the run: options, the model, grouping images into batches, post-processing into
maps, torchrun sharding, progress and the summary. Finding and decoding the inputs is
``segment_inputs``; writing results crash-safe, and the lock on the output folder, is
``segment_outputs`` (each module's docstring lists its guarantees; ``tests/test_segment_cli.py``
tests each of them).

Right maps
  * Every image's maps come from its own, unpadded region of the model's output: the mask logits
    are cropped to the image's valid region before they are resized to the photo's size
    (``post_process_*(..., pixel_mask=...)``; transformers resizes the padded logits, which shifts
    and squashes the maps of every image smaller than its batch's largest).
  * Images are only batched with images of the same padded input size (never padded to another
    image), and on the CPU the network runs one image at a time: outputs are byte-identical
    whatever ``batch_size`` (on CUDA the batch's GEMMs may round differently from batch 1, in
    the last bits; use ``batch_size=1`` where that matters).

One bad input never stops the others
  * Whatever fails for one input (reading, decoding, converting, the network, post-processing,
    writing) fails that input with its name and reason, and the run goes on; a second call skips
    what is complete and redoes what was interrupted.
  * Ctrl-C stops the run between two files (nothing is left torn) and raises ``SegmentInterrupted``
    (a ``KeyboardInterrupt`` carrying the summary so far); the command exits 130.

Under ``torchrun`` (WORLD_SIZE > 1) each rank takes its own shard of the inputs (rank r takes
inputs r, r + W, ...), rank 0 holds the lock, and every rank returns the combined summary.

Messages name options in Python's spelling (``max_pixels=...``); the command line rewrites them
into its own (``--max-pixels ...``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from . import dispatch
from ._ext import cpu_features, native_cpu_bf16  # noqa: F401  (importable from here, as before)
from .kernels import registry
from .loading import DEFAULT_MODEL_DIR, checkpoint_family, family_classes, load_default_model
from .overlay import color_map_image, colour_table, render_overlay
from .segment_inputs import (  # noqa: F401  (IMAGE_EXTENSIONS: importable from here, as before)
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Input,
    InputRefused,
    LoadedImage,
    discover,
    load_image,
    model_input_size,
)
from .segment_outputs import (
    RECORD_FORMAT,
    ForeignFileError,
    OutputError,
    OutputLock,
    check_out_folder,
    check_targets,
    ensure_folder,
    output_files,
    read_record,
    record_state,
    save_label_map,
    write_result,
)

log = logging.getLogger("maskformer.segment")

TASKS = ("semantic", "panoptic", "instance")
ENGINES = ("torch", "onnxruntime", "openvino")
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("auto", "reference", "triton", "cpp")

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one input (or of an input folder that was asked for)."""

    input: str  # the path as found (a folder, pattern or file as given for a refused spec)
    reason: str = ""  # why it was skipped or failed; "" when done
    outputs: Tuple[str, ...] = ()  # its result files (record first): done, or skipped as complete


@dataclasses.dataclass
class SegmentSummary:
    """What ``segment_folder`` did. ``done``, ``skipped`` and ``failed`` list ``Outcome``s in
    input order (what discovery refused or skipped first)."""

    out_dir: str
    done: List[Outcome] = dataclasses.field(default_factory=list)
    skipped: List[Outcome] = dataclasses.field(default_factory=list)  # complete results; unreadable subfolders
    failed: List[Outcome] = dataclasses.field(default_factory=list)  # each with the reason
    notes: List[str] = dataclasses.field(default_factory=list)  # subfolders or result files left out, ...
    seconds: float = 0.0  # wall time of the run after the model loaded (the slowest rank's)
    interrupted: bool = False
    world_size: int = 1  # torchrun ranks that shared the inputs
    backend_plan: str = ""  # which op ran where, for a forced backend
    ran: List[str] = dataclasses.field(default_factory=list)  # the last dispatch of each op, as dispatch records it

    @property
    def exit_status(self) -> int:
        """The command's: 130 when interrupted, 1 when an input failed, else 0 (skips are fine)."""
        return 130 if self.interrupted else 1 if self.failed else 0

    def __str__(self) -> str:
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        return (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed, {rate:.2f} images/s"
                + (f" ({self.world_size} ranks)" if self.world_size > 1 else "")
                + (" (interrupted: run it again to finish)" if self.interrupted else ""))


class SegmentInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``segment_folder``: nothing was left torn; ``summary`` says what was done."""

    def __init__(self, summary: SegmentSummary):
        super().__init__(str(summary))
        self.summary = summary


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _positive(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a whole number >= 1")
    return value


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if dtype not in names:
            raise ValueError(f"dtype={str(dtype).replace('torch.', '')!r} is not one of {', '.join(DTYPES)}")
        return names[dtype]
    return _choice("dtype", dtype, DTYPES)


def _check_engine(engine: str, dtype: str, device: str) -> Optional[str]:
    """What the CPU engines cannot do, refused before anything loads (from_pretrained would refuse
    too, after resolving the checkpoint). Returns the note to give when the engine will compute in
    another precision than ``dtype`` (float32 for bfloat16 where the CPU has no native bf16)."""
    if engine == "torch":
        return None
    # here: the engines package (export, cache) is needed by engine runs only
    from .engines.precision import precision_plan

    if device.split(":")[0] != "cpu":
        raise ValueError(f"engine={engine!r} runs on the CPU, not device={device!r}: pass device='cpu', or "
                         "engine='torch' on a GPU")
    return precision_plan(engine, dtype).note  # imports the engine's package (openvino...) only here


# ---------------------------------------------------------------------------------------------
# Backends and CPU features
# ---------------------------------------------------------------------------------------------
# Which dispatch ops each task runs, and which backends have a kernel for them. The op registry
# (issue 20) is to replace these three tables: backend_plan is the one function that reads them.
def backend_plan(name: Optional[str], device: str, task: str, family: str = "maskformer"
                 ) -> Tuple[Optional[str], Optional[str], str]:
    """A forced ``backend`` applies to the ops of this task (and model family) that it has a
    kernel for, read from the op registry; the rest run on ``auto``. Returns (network backend,
    post-processing backend, one line saying which op runs where); raises ValueError up front
    when the backend is unusable or has nothing to run."""
    if name in (None, "auto"):
        return None, None, ""
    if name == "reference":
        return "reference", "reference", "backend reference: every op runs the pure-PyTorch reference"
    from . import _ext  # the extension's and Triton's state, only for a forced backend

    err = _ext.cpp_import_error() if name == "cpp" else _ext.triton_import_error()
    if err is None and name == "triton" and device.split(":")[0] != "cuda" and not _ext.triton_interpret_mode():
        err = f"Triton kernels run on CUDA tensors and device={device!r}"
    if err is None and name == "cpp" and device.split(":")[0] != "cpu":
        err = f"the C++ kernels run on CPU tensors and device={device!r}"
    if err:
        raise ValueError(f"backend={name!r} cannot run here: {err}; use backend='auto'")
    ops = registry.task_ops(task, family)
    missing = [op for op in ops if op.impl(name) is None]
    if len(missing) == len(ops):
        raise ValueError(f"backend={name!r} has no kernel for anything task={task!r} runs ("
                         + ", ".join(f"{op.name}: {op.role}" for op in missing) + "); use backend='auto'")
    # One backend is forced per phase (dispatch.backend() is not per op): the network's only when
    # every network op has a kernel on it (Mask2Former on cpp: the deformable attention has one,
    # the window attention not, so the network runs on auto, which picks the C++ kernel anyway).
    network = [op for op in ops if op.role == "network"]
    post_ops = [op for op in ops if op.role != "network"]
    forward = name if network and not any(op in missing for op in network) else None
    post = name if post_ops and not any(op in missing for op in post_ops) else None

    if forward is None and post is None:
        raise ValueError(f"backend={name!r} cannot be forced on any phase of task={task!r} for a {family} model ("
                         + ", ".join(f"{op.name}: {op.role}" for op in missing) + f" has no {name} kernel); "
                         "use backend='auto'")
    forced = [op for op in ops if op not in missing and (forward if op.role == "network" else post)]
    unforced = [op for op in ops if op not in missing and op not in forced]
    line = f"backend {name}: " + ", ".join(f"{op.name} ({op.role}) on {name}" for op in forced)
    if unforced:
        line += "; " + ", ".join(f"{op.name} ({op.role})" for op in unforced) + " on auto (its phase has ops " \
                f"without a {name} kernel)"
    if missing:
        line += "; no " + name + " kernel for " + ", ".join(f"{op.name} ({op.role})" for op in missing) + ": auto"
    return forward, post, line


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------
def _distributed():
    """(rank, world_size, initialised_here) from torchrun's environment; gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist  # only under torchrun

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(), dist.get_world_size(), False


def _broadcast(value, rank: int, world: int):
    if world == 1:
        return value
    import torch.distributed as dist  # only under torchrun

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _combine(summary: SegmentSummary, world: int) -> SegmentSummary:
    """Every rank's summary -> one, on every rank."""
    if world == 1:
        return summary
    import torch.distributed as dist  # only under torchrun

    gathered: List[Optional[SegmentSummary]] = [None] * world
    dist.all_gather_object(gathered, summary)
    first = gathered[0]
    return dataclasses.replace(
        first,
        done=[o for g in gathered for o in g.done],
        skipped=[o for g in gathered for o in g.skipped],
        failed=[o for g in gathered for o in g.failed],
        seconds=max(g.seconds for g in gathered),
        interrupted=any(g.interrupted for g in gathered),
    )


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    label_map: np.ndarray  # (H, W) int64 PNG values
    segments: List[dict]
    names: Dict[int, str]  # PNG value -> label name ("no segment" for 0 in panoptic/instance maps)
    png: str  # what the label PNG's values mean


class _Logits:
    """The two fields post-processing reads, as fp32 (bf16/fp16 model outputs included)."""

    def __init__(self, outputs):
        self.class_queries_logits = outputs.class_queries_logits.float()
        self.masks_queries_logits = outputs.masks_queries_logits.float()


def results_for_task(task: str, processor, outputs, sizes, pixel_mask, id2label: Dict[int, str]) -> List[Result]:
    """Post-process a batch -> one ``Result`` per image, maps at ``sizes`` ([(H, W)]) from each
    image's own valid region (``pixel_mask``: (B, H_in, W_in) of the processor's output)."""
    from .postprocessing import binary_mask_to_rle  # imports Pillow (via preprocessing): on first use only

    results = []
    if task == "semantic":
        maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, pixel_mask=pixel_mask)
        for label_map in maps:
            label_map = label_map.cpu().numpy()
            counts = np.bincount(label_map.ravel(), minlength=1)
            ids = np.flatnonzero(counts).tolist()
            segments = [{"id": i, "label_id": i, "label": id2label.get(i, "?"), "area": int(counts[i])} for i in ids]
            results.append(Result(label_map, segments, {i: id2label.get(i, "?") for i in ids},
                                  "class id of each pixel (label_id in segments)"))
        return results
    if task == "panoptic":
        raw = processor.post_process_panoptic_segmentation(outputs, target_sizes=sizes, pixel_mask=pixel_mask)
    else:
        raw = processor.post_process_instance_segmentation(outputs, target_sizes=sizes, pixel_mask=pixel_mask)
    # PNG value = segment id + 1 for instance maps (their background is -1); panoptic ids already
    # start at 1 with 0 for "no segment" (-1 everywhere when nothing survived).
    offset = 1 if task == "instance" else 0
    for item in raw:
        label_map = (item["segmentation"].cpu().round().numpy().astype(np.int64) + offset).clip(min=0)
        counts = np.bincount(label_map.ravel(), minlength=1)
        segments, names = [], {0: "no segment"}
        for info in item["segments_info"]:
            value = int(info["id"]) + offset
            area = int(counts[value]) if value < len(counts) else 0
            segments.append({
                "id": int(info["id"]),
                "png_value": value,
                "label_id": int(info["label_id"]),
                "label": id2label.get(int(info["label_id"]), "?"),
                "score": float(info["score"]),
                "area": area,
                "rle": binary_mask_to_rle(label_map == value) if area else [],
            })
            names[value] = id2label.get(int(info["label_id"]), "?")
        results.append(Result(label_map, segments, names, "png_value of each pixel's segment (0: no segment)"))
    return results


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class Progress:
    """tqdm on a terminal; otherwise a line on stderr every ``every`` inputs or ``seconds``."""

    def __init__(self, total: int, desc: str, every: int = 25, seconds: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.every, self.seconds = total, desc, every, seconds
        self.count = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="img")

    def update(self, n: int, summary: SegmentSummary):
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        crossed = self.count // self.every > (self.count - n) // self.every
        if self.enabled and (crossed or now - self.last >= self.seconds) and self.count < self.total:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.count}/{self.total} inputs ({len(summary.done)} done, {len(summary.skipped)} "
                  f"skipped, {len(summary.failed)} failed), {rate:.2f} inputs/s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _load_model(model: Optional[str], engine: str, dtype: str, device: str, announce: bool):
    """(model, processor, the model's id in the records, family)."""
    from .processing import MaskFormerImageProcessor  # Pillow and SciPy: on first use only

    torch_dtype = getattr(torch, dtype)
    if model is None:
        if announce:
            log.info("no model given, using the shipped default model (trained on generated shapes: background, "
                     "disc, box, stripe; for photos pass a checkpoint, e.g. model='facebook/maskformer-swin-base-coco')")
        return (load_default_model(dtype=torch_dtype, device=device, engine=engine),
                MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR), "default", "maskformer")
    # config.json's model_type picks the family: MaskFormer or Mask2Former (model and processor)
    family = checkpoint_family(model)
    model_cls, processor_cls = family_classes(family)
    loaded = model_cls.from_pretrained(model, dtype=torch_dtype, device=device, engine=engine)
    try:
        processor = processor_cls.from_pretrained(model)
    except FileNotFoundError:
        processor = processor_cls()
    return loaded, processor, os.path.abspath(model) if os.path.isdir(model) else model, family


class _Run:
    """One rank's pass over its shard: plan each input, decode it, group images of one padded
    input size, run and post-process a group, write each result."""

    def __init__(self, out: str, model, processor, model_id: str, options: dict, backends, summary: SegmentSummary,
                 total: int, desc: str):
        self.out, self.model, self.processor, self.options, self.summary = out, model, processor, options, summary
        self.params = {"task": options["task"], "model": model_id, "dtype": options["dtype"],
                       "color_map": options["color_map"]}
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.device = options["device"]
        forward_backend, post_backend = backends
        self.forward_ctx = (lambda: dispatch.backend(forward_backend)) if forward_backend else contextlib.nullcontext
        self.post_ctx = (lambda: dispatch.backend(post_backend)) if post_backend else contextlib.nullcontext
        self.on_cuda = self.device.startswith("cuda")
        self.oom_types = (torch.cuda.OutOfMemoryError, MemoryError)
        # padded input size -> [(input, files, previous record, decoded image)] waiting for a batch
        self.pending: Dict[Tuple[int, int], list] = {}
        self.progress = Progress(total, desc, enabled=options["progress"])

    # -- outcomes ---------------------------------------------------------------------------------
    def fail(self, path: str, reason: str, exc: Optional[BaseException] = None):
        if exc is not None and self.options["raise_errors"]:
            raise exc
        self.summary.failed.append(Outcome(path, reason))

    # -- planning ---------------------------------------------------------------------------------
    def plan(self, item: Input) -> int:
        """Skip, fail, or decode and queue one input; returns how many inputs it finished (a full
        group runs when this one completes it)."""
        options = self.options
        files = output_files(self.out, item.name, options["color_map"])
        try:
            record = read_record(files["json"])
            state = record_state(record, item.real, files, self.params)
            if state == "foreign":
                raise ForeignFileError(f"{files['json']} holds the result of another image ({record.get('image')}); "
                                  "refusing to overwrite it, even with overwrite=True (choose another out_dir)")
            if state == "complete" and not options["overwrite"]:
                self.summary.skipped.append(Outcome(item.path, "complete result exists", tuple(files.values())))
                return 1
            if state == "other-params" and not options["overwrite"]:
                old = record.get("params", {})
                raise OutputError(f"{files['json']} already holds a {old.get('task')} result (model "
                                  f"{old.get('model')}, dtype {old.get('dtype')}); pass overwrite=True to replace it, "
                                  "or choose another out_dir")
            check_targets(record, item.real, files)  # links and foreign files: before the decoding
        except ForeignFileError as exc:
            self.summary.skipped.append(Outcome(item.path, str(exc)))
            return 1
        except OutputError as exc:
            self.fail(item.path, str(exc), exc)
            return 1
        try:
            loaded = load_image(item.path, self.processor, options["max_pixels"])
        except InputRefused as exc:
            self.fail(item.path, str(exc), exc)
            return 1
        key = model_input_size(self.processor, loaded.image.height, loaded.image.width)
        group = self.pending.setdefault(key, [])
        group.append((item, files, record, loaded))
        if len(group) >= options["batch_size"]:
            return self.run_group(self.pending.pop(key))
        if sum(len(g) for g in self.pending.values()) >= 4 * options["batch_size"]:
            key = max(self.pending, key=lambda k: len(self.pending[k]))  # bound what waits in memory
            return self.run_group(self.pending.pop(key))
        return 0

    def flush(self) -> None:
        for key in list(self.pending):
            group = self.pending.pop(key)
            self.progress.update(self.run_group(group), self.summary)

    # -- running ----------------------------------------------------------------------------------
    def infer(self, images, sizes) -> List[Result]:
        """One forward pass and post-processing -> one Result per image."""
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_mask = inputs["pixel_mask"].to(self.device)
        with torch.inference_mode(), self.forward_ctx():
            outputs = self.model(inputs["pixel_values"].to(self.device), pixel_mask=pixel_mask)
        with self.post_ctx():
            return results_for_task(self.options["task"], self.processor, _Logits(outputs), sizes, pixel_mask,
                                    self.id2label)

    def run_group(self, group) -> int:
        """A group of images with the same padded input size (so none is padded to another).
        Images are grouped by padded input size on every device; on the CPU each image of a group
        then runs alone through the network and the post-processing: measured faster than batching
        on this project's 2-core EPYC (Swin-T at 512x704: 980 ms/img at batch 1, 1260 at batch 4),
        and every output is then independent of batch_size bit for bit (a batched oneDNN
        convolution or small MKL GEMM rounds differently from batch 1, and so does torch's sigmoid
        over a batch-sized buffer)."""
        images = [loaded.image for *_, loaded in group]
        sizes = [loaded.size for *_, loaded in group]
        try:
            if self.on_cuda:
                results = self.infer(images, sizes)
            else:
                results = [r for image, size in zip(images, sizes) for r in self.infer([image], [size])]
        except Exception as exc:  # noqa: BLE001: the whole group failed: say why for each image, go on
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, self.oom_types) or "out of memory" in str(exc).lower():
                msg = f"out of memory at batch size {len(group)}; retry with a smaller batch_size or max_pixels"
            for item, *_ in group:
                self.fail(item.path, msg, exc)
            return len(group)
        for (item, files, record, loaded), result in zip(group, results):
            try:
                self.write(item, files, record, loaded, result)
            except Exception as exc:  # noqa: BLE001: rendering or writing one set; the others go on
                self.fail(item.path, str(exc) if isinstance(exc, (OutputError, OSError)) else
                          f"{type(exc).__name__}: {exc}", exc)
        return len(group)

    def write(self, item: Input, files: Dict[str, str], previous: Optional[dict], loaded: LoadedImage,
              result: Result) -> None:
        st = os.stat(item.real)
        table = colour_table(result.label_map, result.names)
        overlay = render_overlay(loaded.image, result.label_map, result.names, table,
                                 per_segment=self.options["task"] != "semantic")
        images = {"label": lambda f: save_label_map(result.label_map, f),
                  "overlay": lambda f: overlay.save(f, format="PNG")}
        if "color" in files:
            color = color_map_image(result.label_map, table)
            images["color"] = lambda f: color.save(f, format="PNG")
        record = {
            "maskformer_segment": RECORD_FORMAT,
            "image": item.path,
            "source": item.real,
            "source_bytes": st.st_size,
            "source_mtime_ns": st.st_mtime_ns,
            "params": self.params,
            "task": self.options["task"],
            "size": list(loaded.size),
            **loaded.notes,
            "label_png": result.png,
            "segments": result.segments,
        }
        ensure_folder(self.out, os.path.dirname(item.name))
        write_result(files, previous, record, images)
        self.summary.done.append(Outcome(item.path, "", tuple(files.values())))

    def go(self, shard: List[Input]) -> bool:
        """Every input of the shard; True when interrupted (Ctrl-C: between two files)."""
        try:
            for item in shard:
                self.progress.update(self.plan(item), self.summary)
            self.flush()
        except KeyboardInterrupt:
            return True
        finally:
            self.progress.close()
        return False


def segment_folder(
    inputs: Union[PathLike, Sequence[PathLike]],
    out_dir: PathLike,
    *,
    model: Optional[PathLike] = None,
    task: str = "semantic",
    engine: str = "torch",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
    overwrite: bool = False,
    recursive: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: Optional[int] = None,
    backend: Optional[str] = None,
    color_map: bool = True,
    progress: bool = True,
    raise_errors: bool = False,
) -> SegmentSummary:
    """Segment image files, folders and glob patterns into ``out_dir``: per input a lossless label
    map, a colour map, an overlay and a JSON record (``maskformer segment`` is this function).

    Args:
        inputs: a path, or a list of files, folders (their images; subfolders with ``recursive``)
            and glob patterns. Our own result files and the output folder are never inputs.
        out_dir: output folder (created if missing). Outputs mirror each input's path relative to
            the folder or glob base it was found in: ``photos/trip/a.jpg`` -> ``out_dir/trip/a.jpg.*``.
        model: checkpoint folder or hub id, MaskFormer or Mask2Former (config.json's model_type
            decides); None: the shipped default model, trained only on generated shapes.
        task: "semantic", "panoptic" or "instance".
        engine: "torch", or "onnxruntime" / "openvino" (MaskFormer or Mask2Former on the CPU;
            float32, or bfloat16 on OpenVINO where the CPU has native bf16: see ``dtype``).
        device: "cpu" or "cuda[:N]" (a ``torch.device`` works too).
        dtype: "float32", "float16" or "bfloat16" (or the torch dtype): the model's precision. With
            an engine, the precision it computes in: "bfloat16" runs on OpenVINO where its CPU
            device lists BF16 (avx512_bf16 or AMX), and float32 with a note naming the missing
            flag elsewhere; what an engine cannot run is refused before anything loads, naming
            the alternative (ONNX Runtime: float32 only).
        batch_size: images per forward pass on CUDA, batched only with images of the same input
            size; on the CPU images run one at a time (faster there, and byte-identical maps).
        overwrite: redo inputs whose complete results exist (default: skip them). Never replaces
            another input's results nor any file this function did not write.
        recursive: also take the images in subfolders of folder inputs.
        max_pixels: refuse images with more pixels than this, by their header, before decoding.
        threads: CPU threads for torch and the engine during the call (restored after).
        backend: force the kernels' backend ("reference", "triton", "cpp") for the ops of the task
            it has a kernel for; the others run on "auto" (the default).
        color_map: write ``NAME.color.png``.
        progress: a bar on a terminal, otherwise a line on stderr every 25 inputs or 30 s.
        raise_errors: raise the first error of an input (with its traceback) instead of recording
            it in ``failed`` (the command's ``--verbose``).

    Returns:
        ``SegmentSummary`` with ``done``, ``skipped`` and ``failed`` lists of ``Outcome(input,
        reason, outputs)``, ``notes``, ``seconds`` and ``exit_status``. A second call with the same
        arguments skips what is complete and redoes what an interrupted call left.

    Raises:
        ValueError: a bad option (before anything loads). ``OutputError``: ``out_dir`` is a file, or
        another run holds its lock. Loading errors of ``from_pretrained``. ``SegmentInterrupted``
        (a KeyboardInterrupt) on Ctrl-C, with ``.summary``.
    """
    specs = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(p) for p in inputs]
    if not specs:
        raise ValueError("inputs is empty: pass image files, folders or glob patterns")
    model = os.fspath(model) if model is not None else None
    options = {
        "task": _choice("task", task, TASKS),
        "engine": _choice("engine", engine, ENGINES),
        "device": str(device),
        "dtype": _dtype_name(dtype),
        "batch_size": _positive("batch_size", batch_size),
        "max_pixels": _positive("max_pixels", max_pixels),
        "threads": _positive("threads", threads, allow_none=True),
        "overwrite": bool(overwrite),
        "color_map": bool(color_map),
        "progress": bool(progress),
        "raise_errors": bool(raise_errors),
    }
    if backend is not None:
        _choice("backend", backend, BACKENDS)
    device = options["device"]
    precision_note = _check_engine(options["engine"], options["dtype"], device)
    out = check_out_folder(out_dir)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here (torch {torch.__version__}); use "
                         "device='cpu'")
    # The forced-backend plan depends on the model family (Mask2Former adds its deformable
    # attention); config.json says which, read before anything heavy loads.
    family = "maskformer" if model is None or backend in (None, "auto", "reference") else checkpoint_family(model)
    forward_backend, post_backend, plan = backend_plan(backend, device, options["task"], family)
    rank, world, owns_group = _distributed()
    found = discover(specs, recursive, out)
    summary = SegmentSummary(out_dir=out, world_size=world, backend_plan=plan)
    if rank == 0:  # what discovery found wrong is reported once
        summary.failed.extend(Outcome(path, reason) for path, reason in found.failures)
        summary.skipped.extend(Outcome(path, reason) for path, reason in found.skipped)
        summary.notes.extend(found.notes)
        for note in found.notes:
            log.info(note)

    lock = OutputLock(out)
    lock_error = None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            lock.acquire()
        except (OutputError, OSError) as exc:
            lock_error = str(exc)
    lock_error = _broadcast(lock_error, rank, world)
    if lock_error:
        raise OutputError(lock_error)
    threads_before = torch.get_num_threads()
    try:
        if options["threads"] is not None:
            torch.set_num_threads(options["threads"])  # the engines take torch's count when built
        with warnings.catch_warnings():
            if options["engine"] != "torch":  # its precision note is given below, once, as a note of the run
                # the engines import the export (torch.onnx): only for a run on an engine
                from .engines.precision import PrecisionWarning

                warnings.simplefilter("ignore", PrecisionWarning)
            loaded, processor, model_id, family = _load_model(model, options["engine"], options["dtype"], device,
                                                              rank == 0)
        loaded.eval()
        warning = precision_note
        if (options["engine"] == "torch" and options["dtype"] == "bfloat16" and device == "cpu"
                and not native_cpu_bf16()):
            warning = ("dtype='bfloat16' on a CPU without avx512_bf16/AMX is emulated in float32 arithmetic; see "
                       "`maskformer info` and prefer dtype='float32' here")
        if rank == 0 and warning:
            summary.notes.append(warning)
            log.warning(warning)
        if rank == 0 and plan:
            log.info(plan)
        shard = found.inputs[rank::world]
        run = _Run(out, loaded, processor, model_id, options, (forward_backend, post_backend), summary, len(shard),
                   f"segment[{rank}]" if world > 1 else "segment")
        start = time.perf_counter()
        summary.interrupted = run.go(shard)
        summary.seconds = time.perf_counter() - start
        summary = _combine(summary, world)
        order = {item.path: i for i, item in enumerate(found.inputs)}  # inputs finish out of order: batches
        for outcomes in (summary.done, summary.skipped, summary.failed):
            outcomes.sort(key=lambda o: order.get(o.input, -1))  # stable: discovery's reports first
        if owns_group:
            import torch.distributed as dist  # only under torchrun

            dist.destroy_process_group()
    finally:
        if options["threads"] is not None:
            torch.set_num_threads(threads_before)
        lock.release()
    summary.ran = [str(dispatch.last_dispatch(op.name)) for op in registry.task_ops(options["task"], family)
                   if dispatch.last_dispatch(op.name)]
    if summary.interrupted:
        raise SegmentInterrupted(summary)
    return summary
