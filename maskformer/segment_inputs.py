"""What ``maskformer segment`` reads: finding the inputs in files, folders and globs, and decoding
each one safely.

Finding (``discover``)
  * Folders give their image files (by extension, sorted); subfolders only with ``recursive``
    (otherwise one note names the skipped ones), each real folder visited once (symlink loops).
    A file named explicitly is taken whatever its extension; the same real file found twice is one
    input. Two different files with the same output name are both refused, up front.
  * The output folder and the result files ``maskformer segment`` wrote are never inputs: a folder
    below the input folder that is the output folder is not entered (``segment nest --recursive
    --out nest/seg`` run three times made 2, 6, then 18 result sets before), and a
    ``NAME.label.png`` / ``.color.png`` / ``.overlay.png`` whose ``NAME.json`` is our record
    claiming it is left out (``--out`` equal to the input folder). A user's own file of such a name
    is an input like any other.
  * A folder that cannot be listed is reported: an input folder as a failure, a subfolder met
    under ``recursive`` as a skip, with the reason (before, it was skipped in silence).

Decoding (``load_image``)
  * Each input is checked before decoding: a regular file (a FIFO named ``x.png`` is refused, not
    read), non-empty, an image Pillow identifies, at most ``max_pixels`` pixels by its header.
  * EXIF orientation is applied; 16-bit and float images are scaled to 8 bits, not clipped; the
    first frame of an animated file is used and the notes say so; every mode Pillow opens (1, L,
    P, LA, PA, I;16*, I, F, RGB, RGBA, CMYK, YCbCr, LAB...) is converted to RGB *before* a big
    image is shrunk (``Image.reduce`` refuses modes 1 and P: a palette GIF or 1-bit TIFF among good
    photos used to abort the whole run with "image has wrong mode").
  * Big JPEGs are decoded at a reduced scale (Pillow's ``draft``) when that still leaves at least
    twice the model's input size; other big images are ``reduce``d after decoding.
  * Whatever goes wrong (Pillow's OSError, ValueError, SyntaxError, EOFError, struct errors,
    MemoryError...) comes out as ``InputRefused`` naming the problem; the caller names the file.

Pillow is imported inside the functions that decode: ``import maskformer`` stays light.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

from .segment_outputs import is_result_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS)


class InputRefused(Exception):
    """An input that cannot be segmented; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Finding the inputs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Input:
    path: str  # as found (spec joined with the relative path)
    name: str  # output name: the path relative to its spec's base, "/"-separated, extension kept
    real: str  # os.path.realpath(path): the identity recorded in the result


@dataclasses.dataclass
class Discovery:
    """What ``discover`` found: the inputs in order, and what it could not or would not take."""

    inputs: List[Input]
    failures: List[Tuple[str, str]]  # (spec or path, reason): asked for, cannot be segmented
    skipped: List[Tuple[str, str]]  # (folder, reason): met on the way (an unreadable subfolder)
    notes: List[str]  # one line each: subfolders left out without --recursive, results left out


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


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _shown(paths: List[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def discover(specs: Sequence[str], recursive: bool, out_dir: Optional[str] = None) -> Discovery:
    """Files, folders and globs -> the inputs in order, with failures, skips and notes.

    ``out_dir``: the output folder; when it lies below an input folder (or glob base) it is not
    entered, and result files ``maskformer segment`` wrote are left out wherever they are.
    """
    inputs: List[Input] = []
    failures: List[Tuple[str, str]] = []
    skipped: List[Tuple[str, str]] = []
    notes: List[str] = []
    seen_real: Dict[str, str] = {}
    out_real = os.path.realpath(out_dir) if out_dir is not None else None
    results_left_out: List[str] = []
    out_left_out: List[str] = []

    def add(path: str, name: str):
        real = os.path.realpath(path)
        if real in seen_real:
            return
        if is_result_file(path):
            results_left_out.append(path)
            return
        seen_real[real] = path
        inputs.append(Input(path=path, name=name.replace(os.sep, "/"), real=real))

    def is_out_below(folder: str, base_real: str) -> bool:
        # The output folder below the folder being searched; not when the search starts in (or
        # inside) the output folder itself: the user asked for it, and our files are left out anyway.
        if out_real is None or _inside(base_real, out_real):
            return False
        return _inside(os.path.realpath(folder), out_real)

    for spec in specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            spec_real = os.path.realpath(spec)
            visited = set()
            skipped_dirs: List[str] = []
            found_any = False
            walk_errors: List[OSError] = []
            for root, dirs, files in os.walk(spec, followlinks=True, onerror=walk_errors.append):
                try:
                    st = os.stat(root)
                except OSError as exc:
                    walk_errors.append(exc)
                    dirs[:] = []
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:  # a symlink loop, or two links to one folder
                    dirs[:] = []
                    continue
                visited.add(key)
                dirs.sort()
                for d in [d for d in dirs if is_out_below(os.path.join(root, d), spec_real)]:
                    dirs.remove(d)  # not entered, nor named among the subfolders recursive would add
                    if recursive:
                        out_left_out.append(os.path.join(root, d))
                if not recursive:
                    skipped_dirs.extend(os.path.join(root, d) for d in dirs)
                    dirs[:] = []
                for f in sorted(files):
                    if _is_image_name(f):
                        found_any = True
                        path = os.path.join(root, f)
                        add(path, os.path.relpath(path, spec))
            for exc in walk_errors:
                folder = exc.filename or spec
                reason = f"cannot list folder ({exc.strerror or exc})"
                if os.path.realpath(folder) == spec_real:
                    failures.append((spec, reason + "; check its permissions"))
                else:
                    skipped.append((folder, reason + "; its images were not segmented"))
            if skipped_dirs:
                notes.append(f"skipped {len(skipped_dirs)} subfolder(s) of {spec} ({_shown(skipped_dirs)}); pass "
                             "recursive=True to include them")
            if not found_any and not any(os.path.realpath(e.filename or spec) == spec_real for e in walk_errors):
                failures.append((spec, "folder holds no images (" + ", ".join(IMAGE_EXTENSIONS) + ")"
                                 + ("" if recursive else "; pass recursive=True to look in subfolders")))
        elif os.path.lexists(spec):  # a file, even one whose name has glob characters ("a[1].jpg")
            add(spec, os.path.basename(spec))
        elif glob.has_magic(spec):
            base = _glob_base(spec)
            base_real = os.path.realpath(base)
            found, in_out = [], []
            for f in sorted(glob.glob(spec, recursive=True)):
                if not os.path.isdir(f):
                    (in_out if is_out_below(os.path.dirname(f) or ".", base_real) else found).append(f)
            out_left_out.extend(in_out)
            if not found and not in_out:
                failures.append((spec, "pattern matches no file"))
            for f in found:
                add(f, os.path.relpath(f, base))
        else:
            failures.append((spec, "no such file or folder"))

    if out_left_out:
        notes.append(f"left out the output folder {out_dir}, which is inside an input folder: results are never inputs")
    if results_left_out:
        notes.append(f"left out {len(results_left_out)} result file(s) written by maskformer segment "
                     f"({_shown(results_left_out)}): results are never inputs")

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
                                            "their common parent folder instead, or use a separate out_dir for each"))
        inputs = [i for i in inputs if i.name not in clashing]
    return Discovery(inputs, failures, skipped, notes)


# ---------------------------------------------------------------------------------------------
# Reading an image safely
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedImage:
    image: "object"  # PIL RGB image, possibly decoded at a reduced scale
    size: Tuple[int, int]  # (H, W) of the photo as a viewer shows it (after EXIF orientation)
    notes: Dict[str, object]


def model_input_size(processor, height: int, width: int) -> Tuple[int, int]:
    """(H, W) the processor resizes an (height, width) image to (before padding)."""
    # preprocessing imports Pillow: only when images are read (`maskformer info` imports this module)
    from .preprocessing import get_output_image_size

    if not processor.do_resize:
        return height, width
    return get_output_image_size(height, width, processor.size, processor.size_divisor)


def _open_regular_file(path: str):
    """A binary file object for ``path``, refused unless it is a regular, non-empty file."""
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
    return f


def load_image(path: str, processor, max_pixels: int) -> LoadedImage:
    """Check, then decode one input to an RGB PIL image. Raises ``InputRefused`` (and nothing
    else but KeyboardInterrupt) with a reason a person can act on."""
    f = _open_regular_file(path)
    with f:
        try:
            return _decode(f, processor, max_pixels)
        except InputRefused:
            raise
        except MemoryError:
            raise InputRefused("not enough memory to decode it; lower max_pixels to refuse such images") from None
        except Exception as exc:  # noqa: BLE001: any decoder or conversion error names the file, the run goes on
            raise InputRefused(f"cannot decode or convert image ({type(exc).__name__}: {exc})") from None


def _decode(f, processor, max_pixels: int) -> LoadedImage:
    import PIL.Image
    from PIL import ImageOps

    # as above: Pillow (through preprocessing too) only when images are decoded
    from .preprocessing import _pil_to_rgb, to_8bit

    saved = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None  # our own max_pixels check below, with the file's name
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
        raise InputRefused(f"is {width}x{height} = {width * height:,} pixels, over max_pixels={max_pixels} "
                           "(a decompression bomb, or a very large photo: raise max_pixels if you trust it)")
    notes: Dict[str, object] = {}
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        notes["frames"] = frames
        notes["frame_used"] = 0
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001: a malformed EXIF block: keep the pixels as stored
        orientation = 1
    # The photo as shown: EXIF orientations 5-8 swap width and height.
    shown_h, shown_w = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    model_h, model_w = model_input_size(processor, shown_h, shown_w)
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
    # RGB before reduce: Image.reduce refuses modes 1 and P ("image has wrong mode"), and averaging
    # palette indices would be wrong anyway. A 4000x3000 RGB copy is 36 MB.
    if img.mode != "RGB":
        img = _pil_to_rgb(img)
    factor = min(img.size[0] // max(1, 2 * model_w), img.size[1] // max(1, 2 * model_h))
    if factor >= 2:  # big non-JPEG: shrink before the processor's copies
        img = img.reduce(factor)
        reduced = True
    if reduced:
        notes["decoded_size"] = [img.size[1], img.size[0]]
    # the file closes on return; the pixels were read by load(), and a converted copy owns its own
    return LoadedImage(image=img, size=(shown_h, shown_w), notes=notes)
