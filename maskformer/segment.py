"""``maskformer segment``: folders of real photos to label maps, overlays and JSON, safely.

What a run promises (each promise has a test in ``tests/test_segment_cli.py`` that drives the
command in a subprocess):

Right maps
  * Every image's maps come from its own, unpadded region of the model's output: the mask logits
    are cropped to the image's valid region before they are resized to the photo's size
    (``post_process_*(..., pixel_mask=...)``; transformers resizes the padded logits, which shifts
    and squashes the maps of every image smaller than its batch's largest).
  * Images are only batched with images of the same padded input size (never padded to another
    image), and on the CPU the network runs one image at a time: outputs are byte-identical
    whatever ``--batch-size`` (on CUDA the batch's GEMMs may round differently from batch 1, in
    the last bits; use ``--batch-size 1`` where that matters).
  * EXIF orientation is applied on load; 16-bit images are scaled to 8 bits, not clipped; the
    first frame of an animated file is used and the JSON says so.

Nothing lost, nothing torn
  * Outputs mirror the input's path relative to the folder (or glob base) it was found in and keep
    its extension: ``photos/trip/a.jpg`` -> ``OUT/trip/a.jpg.label.png``. Two inputs that would map
    to the same outputs in one run are both refused, up front; an existing result that records
    another source image is never written over, ``--overwrite`` or not.
  * Every file is written to a temporary name in its folder and renamed into place. An input's
    JSON record is written first ("status": "writing", naming its source), then its images, then
    the record again as "complete" with each file's size: a set killed half-way is detected and
    redone by the next run; a complete one is skipped (``--overwrite`` redoes it).
  * Nothing is written through a symbolic link: a link (or a non-folder) inside ``--out`` where an
    output goes fails that input with its name.
  * One run per output folder: an advisory lock (``OUT/.maskformer-segment.lock``) makes a second
    concurrent run exit at once, naming the first one's pid.

One bad input never stops the others
  * Each input is checked before decoding: a regular file (a FIFO named ``x.png`` is refused, not
    read), non-empty, an image Pillow identifies, at most ``--max-pixels`` pixels by its header.
    Big JPEGs are decoded at a reduced scale (Pillow's ``draft``) when that still leaves at least
    twice the model's input size; other big images are ``reduce``d after decoding. Failures are
    reported by name and the run goes on.
"""
from __future__ import annotations

import dataclasses
import errno
import fnmatch
import glob
import json
import os
import stat
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
RECORD_FORMAT = 1
LOCK_NAME = ".maskformer-segment.lock"
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS)


class InputRefused(Exception):
    """An input that cannot be segmented; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Input:
    path: str  # as found (spec joined with the relative path)
    name: str  # output name: the path relative to its spec's base, "/"-separated, extension kept
    real: str  # os.path.realpath(path): the identity recorded in the result


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _glob_base(spec: str) -> str:
    """The folder part of a glob pattern before its first wildcard."""
    parts = spec.split(os.sep)
    base = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return os.sep.join(base) if base else "."


def discover(specs: List[str], recursive: bool) -> Tuple[List[Input], List[Tuple[str, str]], List[str]]:
    """Files, folders and globs -> (inputs in order, [(spec or path, failure reason)], notes).

    Folders give their image files (by extension; sorted); subfolders only with ``recursive``
    (otherwise one note names the skipped ones), each real folder visited once (symlink loops).
    A file named explicitly is taken whatever its extension. The same real file found twice is
    one input (the first name). Two different files with the same output name are both refused.
    """
    inputs: List[Input] = []
    failures: List[Tuple[str, str]] = []
    notes: List[str] = []
    seen_real: Dict[str, str] = {}

    def add(path: str, name: str):
        real = os.path.realpath(path)
        if real in seen_real:
            return
        seen_real[real] = path
        inputs.append(Input(path=path, name=name.replace(os.sep, "/"), real=real))

    for spec in specs:
        if os.path.isdir(spec):
            visited = set()
            skipped_dirs: List[str] = []
            found_any = False
            for root, dirs, files in os.walk(spec, followlinks=True):
                st = os.stat(root)
                key = (st.st_dev, st.st_ino)
                if key in visited:  # a symlink loop, or two links to one folder
                    dirs[:] = []
                    continue
                visited.add(key)
                dirs.sort()
                if not recursive:
                    skipped_dirs.extend(os.path.join(root, d) for d in dirs)
                    dirs[:] = []
                for f in sorted(files):
                    if _is_image_name(f):
                        found_any = True
                        path = os.path.join(root, f)
                        add(path, os.path.relpath(path, spec))
            if skipped_dirs:
                shown = ", ".join(skipped_dirs[:3]) + (f" and {len(skipped_dirs) - 3} more" if len(skipped_dirs) > 3 else "")
                notes.append(f"skipped {len(skipped_dirs)} subfolder(s) of {spec} ({shown}); pass --recursive to include them")
            if not found_any:
                failures.append((spec, "folder holds no images (" + ", ".join(IMAGE_EXTENSIONS) + ")"
                                 + ("" if recursive else "; pass --recursive to look in subfolders")))
        elif os.path.lexists(spec):  # a file, even one whose name has glob characters ("a[1].jpg")
            add(spec, os.path.basename(spec))
        elif glob.has_magic(spec):
            base = _glob_base(spec)
            found = sorted(f for f in glob.glob(spec, recursive=True) if not os.path.isdir(f))
            if not found:
                failures.append((spec, "pattern matches no file"))
            for f in found:
                add(f, os.path.relpath(f, base))
        else:
            failures.append((spec, "no such file or folder"))

    by_name: Dict[str, List[Input]] = {}
    for item in inputs:
        by_name.setdefault(item.name, []).append(item)
    clashing = {name for name, items in by_name.items() if len(items) > 1}
    if clashing:
        for name in sorted(clashing):
            paths = [i.path for i in by_name[name]]
            for item in by_name[name]:
                others = ", ".join(p for p in paths if p != item.path)
                failures.append((item.path, f"its outputs ({name}.*) would collide with those of {others}; segment "
                                            "their common parent folder instead, or use a separate --out for each"))
        inputs = [i for i in inputs if i.name not in clashing]
    return inputs, failures, notes


# ---------------------------------------------------------------------------------------------
# Reading an image safely
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedImage:
    image: "object"  # PIL RGB image, possibly decoded at a reduced scale
    size: Tuple[int, int]  # (H, W) of the photo as a viewer shows it (after EXIF orientation)
    notes: Dict[str, object]


def _model_input_size(processor, height: int, width: int) -> Tuple[int, int]:
    from .preprocessing import get_output_image_size

    if not processor.do_resize:
        return height, width
    return get_output_image_size(height, width, processor.size, processor.size_divisor)


def load_image(path: str, processor, max_pixels: int) -> LoadedImage:
    """Check, then decode one input. Raises ``InputRefused`` with a reason a person can act on."""
    import PIL.Image
    from PIL import ImageOps

    from .preprocessing import to_8bit

    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then says what it is
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputRefused(f"cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else \
                "a device" if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else "not a regular file"
            raise InputRefused(f"is {kind}, not an image file")
        if st.st_size == 0:
            raise InputRefused("is empty (0 bytes)")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    with f:
        saved = PIL.Image.MAX_IMAGE_PIXELS
        PIL.Image.MAX_IMAGE_PIXELS = None  # our own --max-pixels check below, with the file's name
        try:
            img = PIL.Image.open(f)
        except PIL.Image.UnidentifiedImageError:
            raise InputRefused("is not an image Pillow can read (unknown format or corrupt header)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputRefused(f"cannot read image ({type(exc).__name__}: {exc})") from None
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = saved
        width, height = img.size
        if width < 1 or height < 1:
            raise InputRefused(f"has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise InputRefused(f"is {width}x{height} = {width * height:,} pixels, over --max-pixels {max_pixels:,} "
                               "(a decompression bomb, or a very large photo: raise --max-pixels if you trust it)")
        notes: Dict[str, object] = {}
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > 1:
            notes["frames"] = frames
            notes["frame_used"] = 0
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
        # The photo as shown: EXIF orientations 5-8 swap width and height.
        shown_h, shown_w = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
        model_h, model_w = _model_input_size(processor, shown_h, shown_w)
        if img.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when that still leaves >= 2x the model input.
            want = (2 * model_w, 2 * model_h) if orientation not in (5, 6, 7, 8) else (2 * model_h, 2 * model_w)
            img.draft(None, want)
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InputRefused(f"cannot decode image ({type(exc).__name__}: {exc})") from None
        reduced = img.size != (width, height)
        if orientation != 1:
            notes["exif_orientation"] = orientation
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            notes["source_mode"] = img.mode
        try:
            img = to_8bit(img, "the image")
        except ValueError as exc:
            raise InputRefused(str(exc)) from None
        factor = min(img.size[0] // max(1, 2 * model_w), img.size[1] // max(1, 2 * model_h))
        if factor >= 2:  # big non-JPEG: shrink before the processor's copies
            img = img.reduce(factor)
            reduced = True
        if reduced:
            notes["decoded_size"] = [img.size[1], img.size[0]]
        if img.mode != "RGB":
            from .preprocessing import _pil_to_rgb

            img = _pil_to_rgb(img)
        # `f` closes on return; the pixels were read by load(), and a reduced or rotated copy owns its own
        return LoadedImage(image=img, size=(shown_h, shown_w), notes=notes)


# ---------------------------------------------------------------------------------------------
# Writing safely
# ---------------------------------------------------------------------------------------------
class OutputError(Exception):
    """An output cannot be written safely; the message names the path."""


def check_out_folder(out: str) -> str:
    """Fail early (before the model loads) when ``--out`` cannot be a folder. Returns it absolute."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} exists and is not a folder; pass a folder path (it is created if missing)")
    return os.path.abspath(out)


def ensure_folder(root: str, rel_dir: str) -> str:
    """``root/rel_dir``, created as needed; every component below ``root`` must be a real folder
    (not a symbolic link), so nothing is ever written outside ``root``."""
    path = root
    for part in [p for p in rel_dir.split("/") if p]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{path} is a symbolic link; refusing to write through it (remove it or use another --out)")
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path} exists and is not a folder")
    return path


def _check_target(path: str):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path} is a symbolic link; refusing to write through or replace it (remove it)")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} exists and is not a regular file")


def atomic_write(path: str, write) -> int:
    """Write a file through ``write(fileobj)`` to a temporary name in its folder, then rename it
    over ``path``: readers see the old file or the whole new one, never a torn one. Never follows
    a link (the temporary is created with O_EXCL | O_NOFOLLOW; ``path`` must not be a link).
    Returns the size written."""
    folder, base = os.path.split(path)
    _check_target(path)
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            size = f.tell()
        _check_target(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size


def remove_stale_temporaries(folder: str, base: str):
    """Temporaries a killed run left for ``base`` (``.{base}.tmp-*``); regular files only."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in fnmatch.filter(names, f".{glob.escape(base)}.tmp-*"):
        p = os.path.join(folder, name)
        if stat.S_ISREG(os.lstat(p).st_mode):
            os.unlink(p)


def output_files(out: str, name: str) -> Dict[str, str]:
    """The files of one input's result set: ``OUT/<name>.json``, ``.label.png``, ``.color.png``, ``.overlay.png``."""
    base = os.path.join(out, *name.split("/"))
    return {"json": base + ".json", "label": base + ".label.png", "color": base + ".color.png",
            "overlay": base + ".overlay.png"}


def read_record(path: str) -> Optional[dict]:
    """The JSON record at ``path``; None when absent. Raises OutputError for a link, a non-file or
    a file that is not one of our records (we never write over those)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} is a symbolic link or not a regular file; refusing to replace it (remove it)")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("maskformer_segment") != RECORD_FORMAT:
        raise OutputError(f"{path} exists and is not a maskformer segment record; refusing to replace it "
                          "(move it away or use another --out)")
    return record


def record_state(record: Optional[dict], item: Input, files: Dict[str, str], params: dict) -> str:
    """"absent", "foreign" (another source image), "other-params" (same image, another
    task/model/...), "incomplete", "stale" (the source changed since) or "complete"."""
    if record is None:
        return "absent"
    if record.get("source") != item.real:
        return "foreign"
    if record.get("status") != "complete":
        return "incomplete"
    if record.get("params") != params:
        return "other-params"
    try:
        st = os.stat(item.real)
        if record.get("source_bytes") != st.st_size or record.get("source_mtime_ns") != st.st_mtime_ns:
            return "stale"
    except OSError:
        return "stale"
    for kind, size in (record.get("files") or {}).items():
        path = files.get(kind)
        try:
            st = os.lstat(path) if path else None
        except FileNotFoundError:
            return "incomplete"
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return "incomplete"
    if set(record.get("files") or {}) != set(k for k in files if k != "json"):
        return "incomplete"
    return "complete"


class OutputLock:
    """An advisory lock on the output folder (fcntl.flock on ``OUT/.maskformer-segment.lock``),
    held for the whole run; a second run on the same folder is refused with the holder's pid."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd = -1

    def acquire(self):
        import fcntl

        _check_target(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"another maskformer segment run ({holder}) is writing to {os.path.dirname(self.path)}; "
                                  "wait for it to finish or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race)
            self.fd = -1


def record_json(record: dict) -> str:
    """JSON text a person can read: one top-level key per line, one segment per line."""
    lines = []
    for key, value in record.items():
        if key == "segments" and value:
            text = "[\n" + ",\n".join("  " + json.dumps(v) for v in value) + "\n ]"
        else:
            text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_result(files: Dict[str, str], record: dict, label_map: np.ndarray, overlay, color) -> None:
    """Write one input's set: the record as "writing", the images, the record as "complete"."""

    folder, json_base = os.path.split(files["json"])
    for kind, path in files.items():
        remove_stale_temporaries(folder, os.path.basename(path))
        if kind != "json":
            _check_target(path)

    def dump(rec):
        return lambda f: f.write(record_json(rec).encode("utf-8"))

    atomic_write(files["json"], dump(dict(record, status="writing", files={})))
    sizes = {"label": atomic_write(files["label"], lambda f: save_label_map(label_map, f))}
    if color is not None and "color" in files:
        sizes["color"] = atomic_write(files["color"], lambda f: color.save(f, format="PNG"))
    sizes["overlay"] = atomic_write(files["overlay"], lambda f: overlay.save(f, format="PNG"))
    atomic_write(files["json"], dump(dict(record, status="complete", files=sizes)))


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
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img")

    def update(self, n: int, stats: Dict[str, int]):
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        crossed = self.count // self.every > (self.count - n) // self.every
        if self.enabled and (crossed or now - self.last >= self.seconds) and self.count < self.total:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.count}/{self.total} inputs ({stats['done']} done, {stats['skipped']} skipped, "
                  f"{stats['failed']} failed), {rate:.2f} inputs/s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def save_label_map(label_map: np.ndarray, f) -> None:
    """Lossless PNG of the ids as stored: 8-bit when they fit, else 16-bit. ``f``: path or file."""
    from PIL import Image

    lo, hi = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"label ids {lo}..{hi} do not fit a 16-bit PNG")
    dtype = np.uint8 if hi < 256 else np.uint16
    Image.fromarray(label_map.astype(dtype)).save(f, format="PNG")


@dataclasses.dataclass
class Result:
    label_map: np.ndarray  # (H, W) PNG values
    segments: List[dict]
    names: Dict[int, str]  # PNG value -> label name ("no segment" for 0 in panoptic/instance maps)
    png: str  # what the label PNG's values mean


def results_for_task(task: str, processor, outputs, sizes, pixel_mask, id2label: Dict[int, str]) -> List[Result]:
    """Post-process a batch -> one ``Result`` per image, maps at ``sizes`` from each image's own
    valid region (``pixel_mask``)."""
    from .postprocessing import binary_mask_to_rle

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
# Backends and CPU features
# ---------------------------------------------------------------------------------------------
# Which dispatch ops each task runs, and which backends have a kernel for them.
TASK_OPS = {"semantic": ["window_attention", "semantic_segmentation"], "panoptic": ["window_attention", "query_argmax"],
            "instance": ["window_attention"]}
KERNELS = {"cpp": {"semantic_segmentation", "query_argmax"}, "triton": {"semantic_segmentation", "window_attention"}}
OP_ROLE = {"window_attention": "network", "semantic_segmentation": "semantic post-processing",
           "query_argmax": "panoptic post-processing"}


def backend_plan(name: Optional[str], device: str, task: str) -> Tuple[Optional[str], Optional[str], str]:
    """A forced ``--backend`` applies to the ops of this task that it has a kernel for; the rest
    run on ``auto``. Returns (network backend, post-processing backend, one line saying which op
    runs where); raises ValueError up front when the backend is unusable or has nothing to run."""
    if name in (None, "auto"):
        return None, None, ""
    if name == "reference":
        return "reference", "reference", "backend reference: every op runs the pure-PyTorch reference"
    from . import _ext

    err = _ext.cpp_import_error() if name == "cpp" else _ext.triton_import_error()
    if err is None and name == "triton" and device.split(":")[0] != "cuda" and not _ext.triton_interpret_mode():
        err = f"Triton kernels run on CUDA tensors and --device is {device}"
    if err is None and name == "cpp" and device.split(":")[0] != "cpu":
        err = f"the C++ kernels run on CPU tensors and --device is {device}"
    if err:
        raise ValueError(f"--backend {name} cannot run here: {err}; use --backend auto")
    served = [op for op in TASK_OPS[task] if op in KERNELS[name]]
    missing = [op for op in TASK_OPS[task] if op not in KERNELS[name]]
    if not served:
        raise ValueError(f"--backend {name} has no kernel for anything --task {task} runs ("
                         + ", ".join(f"{op}: {OP_ROLE[op]}" for op in missing) + "); use --backend auto")
    line = f"backend {name}: " + ", ".join(f"{op} ({OP_ROLE[op]}) on {name}" for op in served)
    if missing:
        line += "; no " + name + " kernel for " + ", ".join(f"{op} ({OP_ROLE[op]})" for op in missing) + ": auto"
    forward = name if "window_attention" in served else None
    post = name if any(op != "window_attention" for op in served) else None
    return forward, post, line


def cpu_features() -> Dict[str, bool]:
    """The x86 features that decide CPU speed here (from /proc/cpuinfo; all False elsewhere)."""
    from ._ext import cpu_flags

    return cpu_flags(("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))


def native_cpu_bf16() -> bool:
    feats = cpu_features()
    return feats["avx512_bf16"] or feats["amx_bf16"]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _distributed():
    """(rank, world_size, initialised_here) from torchrun's environment; gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(), dist.get_world_size(), False


def _broadcast(value, rank: int, world: int):
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Logits:
    """The two fields post-processing reads, as fp32 (bf16/fp16 model outputs included)."""

    def __init__(self, outputs):
        self.class_queries_logits = outputs.class_queries_logits.float()
        self.masks_queries_logits = outputs.masks_queries_logits.float()


def run(args) -> int:
    """``maskformer segment``; returns the exit status (0: nothing failed; skips are not failures)."""
    import torch

    out = check_out_folder(args.out)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}); use --device cpu")
    forward_backend, post_backend, plan = backend_plan(args.backend, device, args.task)
    rank, world, owns_group = _distributed()
    inputs, failures, notes = discover(args.inputs, args.recursive)
    shard = inputs[rank::world]
    failures = failures if rank == 0 else []  # spec errors are reported once
    if rank == 0:
        for note in notes:
            print(f"maskformer segment: {note}", file=sys.stderr)

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
    try:
        return _run_locked(args, out, shard, failures, (rank, world, owns_group), (forward_backend, post_backend, plan))
    finally:
        lock.release()


def _run_locked(args, out: str, shard: List[Input], failures: List[Tuple[str, str]], ranks, backends) -> int:
    import contextlib

    import torch

    from . import dispatch
    from .overlay import color_map_image, colour_table, render_overlay
    from .processing import MaskFormerImageProcessor

    rank, world, owns_group = ranks
    forward_backend, post_backend, plan = backends
    device = args.device
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model is None:
        from .loading import DEFAULT_MODEL_DIR, load_default_model

        model = load_default_model(dtype=dtype, device=device, engine=getattr(args, "engine", "torch"))
        processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
        model_id = "default"
        if rank == 0:
            print("maskformer segment: no --model given, using the shipped default model (trained on generated shapes: "
                  "background, disc, box, stripe; for photos pass --model)", file=sys.stderr)
    else:
        from .loading import checkpoint_family, family_classes

        # config.json's model_type picks the family: MaskFormer or Mask2Former (model and processor)
        model_cls, processor_cls = family_classes(checkpoint_family(args.model))
        model = model_cls.from_pretrained(args.model, dtype=dtype, device=device, engine=getattr(args, "engine", "torch"))
        try:
            processor = processor_cls.from_pretrained(args.model)
        except FileNotFoundError:
            processor = processor_cls()
        model_id = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    model.eval()
    if rank == 0 and dtype == torch.bfloat16 and device == "cpu" and not native_cpu_bf16():
        print("maskformer segment: warning: --dtype bfloat16 on a CPU without avx512_bf16/AMX is emulated in float32 "
              "arithmetic; see `maskformer info` and prefer --dtype float32 here", file=sys.stderr)
    if rank == 0 and plan:
        print(f"maskformer segment: {plan}", file=sys.stderr)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    params = {"task": args.task, "model": model_id, "dtype": args.dtype, "color_map": not args.no_color_map}
    # Images are grouped by padded input size (up to --batch-size per group) on every device. On the
    # CPU each image of a group then runs alone through the network and the post-processing:
    # measured faster than batching on this project's 2-core EPYC (Swin-T at 512x704: 980 ms/img at
    # batch 1, 1260 at batch 4), and it makes every output independent of --batch-size bit for bit
    # (a batched oneDNN convolution or small MKL GEMM rounds differently from batch 1, and so does
    # torch's sigmoid over a batch-sized buffer).
    on_cuda = device.startswith("cuda")
    batch_size = args.batch_size
    stats = {"done": 0, "skipped": 0, "failed": 0}
    progress = Progress(len(shard), f"segment[{rank}]" if world > 1 else "segment", enabled=not args.quiet)
    pending: Dict[Tuple[int, int], list] = {}
    forward_ctx = (lambda: dispatch.backend(forward_backend)) if forward_backend else contextlib.nullcontext
    post_ctx = (lambda: dispatch.backend(post_backend)) if post_backend else contextlib.nullcontext

    def fail(path: str, reason: str):
        failures.append((path, reason))
        stats["failed"] += 1

    def infer(images, sizes):
        """One forward pass and post-processing -> one Result per image."""
        inputs = processor(images=images, return_tensors="pt")
        with torch.inference_mode(), forward_ctx():
            outputs = model(inputs["pixel_values"].to(device), pixel_mask=inputs["pixel_mask"].to(device))
        with post_ctx():
            return results_for_task(args.task, processor, _Logits(outputs), sizes, inputs["pixel_mask"].to(device),
                                    id2label)

    def run_group(group):
        """A group of images with the same padded input size (so none is padded to another)."""
        images = [loaded.image for _, _, loaded in group]
        sizes = [loaded.size for _, _, loaded in group]
        try:
            if on_cuda:
                results = infer(images, sizes)
            else:  # one image at a time: see batch_size above
                results = [r for image, size in zip(images, sizes) for r in infer([image], [size])]
        except Exception as exc:  # the whole group failed: say why for each image, go on with the others
            if args.verbose:
                raise
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
                msg = f"out of memory at batch size {len(group)}; retry with a smaller --batch-size or --max-pixels"
            for item, _, _ in group:
                fail(item.path, msg)
            return
        for (item, files, loaded), result in zip(group, results):
            try:
                st = os.stat(item.real)
                table = colour_table(result.label_map, result.names)
                overlay = render_overlay(loaded.image, result.label_map, result.names, table)
                color = None if args.no_color_map else color_map_image(result.label_map, table)
                record = {
                    "maskformer_segment": RECORD_FORMAT,
                    "image": item.path,
                    "source": item.real,
                    "source_bytes": st.st_size,
                    "source_mtime_ns": st.st_mtime_ns,
                    "params": params,
                    "task": args.task,
                    "size": list(loaded.size),
                    **loaded.notes,
                    "label_png": result.png,
                    "segments": result.segments,
                }
                ensure_folder(out, os.path.dirname(item.name))
                write_result(files, record, result.label_map, overlay, color)
                stats["done"] += 1
            except (OutputError, OSError, ValueError) as exc:
                if args.verbose:
                    raise
                fail(item.path, str(exc))

    start = time.perf_counter()
    interrupted = False
    try:
        for item in shard:
            files = output_files(out, item.name)
            if args.no_color_map:
                files.pop("color")
            try:
                record = read_record(files["json"])
                state = record_state(record, item, files, params)
            except OutputError as exc:
                fail(item.path, str(exc))
                progress.update(1, stats)
                continue
            if state == "foreign":
                fail(item.path, f"{files['json']} holds the result of another image ({record.get('image')}); refusing to "
                                "overwrite it, even with --overwrite (use another --out)")
            elif state == "complete" and not args.overwrite:
                stats["skipped"] += 1
            elif state == "other-params" and not args.overwrite:
                old = record.get("params", {})
                fail(item.path, f"{files['json']} already holds a {old.get('task')} result (model {old.get('model')}, "
                                f"dtype {old.get('dtype')}); pass --overwrite to replace it, or choose another --out")
            else:
                try:
                    loaded = load_image(item.path, processor, args.max_pixels)
                except InputRefused as exc:
                    fail(item.path, str(exc))
                else:
                    h, w = _model_input_size(processor, loaded.image.height, loaded.image.width)
                    group = pending.setdefault((h, w), [])
                    group.append((item, files, loaded))
                    if len(group) >= batch_size:
                        run_group(pending.pop((h, w)))
                        progress.update(len(group), stats)
                    elif sum(len(g) for g in pending.values()) >= 4 * batch_size:
                        key = max(pending, key=lambda k: len(pending[k]))  # bound what waits in memory
                        group = pending.pop(key)
                        run_group(group)
                        progress.update(len(group), stats)
                    continue
            progress.update(1, stats)
        for key in list(pending):
            group = pending.pop(key)
            run_group(group)
            progress.update(len(group), stats)
    except KeyboardInterrupt:
        interrupted = True
    progress.close()
    seconds = time.perf_counter() - start

    summary = {"done": stats["done"], "skipped": stats["skipped"], "seconds": seconds, "failures": failures,
               "interrupted": interrupted}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        summary = {
            "done": sum(g["done"] for g in gathered),
            "skipped": sum(g["skipped"] for g in gathered),
            "seconds": max(g["seconds"] for g in gathered),
            "failures": [f for g in gathered for f in g["failures"]],
            "interrupted": any(g["interrupted"] for g in gathered),
        }
        if owns_group:
            dist.destroy_process_group()
    if rank == 0:
        rate = summary["done"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
        print(f"maskformer segment: {summary['done']} done, {summary['skipped']} skipped, {len(summary['failures'])} "
              f"failed, {rate:.2f} images/s" + (f" ({world} ranks)" if world > 1 else "")
              + (" (interrupted: re-run the same command to finish)" if summary["interrupted"] else ""))
        for spec, reason in summary["failures"]:
            print(f"  failed: {spec}: {reason}", file=sys.stderr)
        if plan or args.verbose:
            ran = [str(dispatch.last_dispatch(op)) for op in TASK_OPS[args.task] if dispatch.last_dispatch(op)]
            if ran:
                print("maskformer segment: ran " + "; ".join(ran), file=sys.stderr)
    if summary["interrupted"]:
        return 130
    # Rank 0 owns the summary and the exit status; other ranks exit 0 so that torchrun does not
    # tear rank 0 down before it has printed the combined report.
    return 1 if summary["failures"] and rank == 0 else 0
