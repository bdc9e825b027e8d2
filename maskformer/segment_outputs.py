"""What ``maskformer segment`` writes, crash-safe: one input's result set, its JSON record, and the
lock on the output folder.

A set is ``OUT/NAME.json`` (the record), ``NAME.label.png``, ``NAME.color.png`` (unless
``color_map=False``) and ``NAME.overlay.png``; NAME is the input's path relative to the folder or
glob base it was found in, extension kept.

Nothing lost, nothing torn
  * Every file is written to a temporary name in its folder and then put in place. The record is
    written first (``"status": "writing"``, naming its source and *claiming* the file names it is
    about to write), then the images, then the record again as ``"complete"`` with each file's
    size: a set killed half-way is detected and redone by the next run; a complete one is skipped.
  * No file this command did not write is replaced, ``overwrite`` or not: a file at one of a set's
    names is replaced only when our record for the same source image claims it. Any other file
    there (a user's ``a.png.label.png`` with ``--out`` equal to the input folder, a foreign
    ``g0.png.overlay.png``) fails that input with its name, and a file that was absent is created
    with ``link()``, which fails rather than replace one that appeared meanwhile.
  * Nothing is written through a symbolic link: a link (or a non-folder) inside the output folder
    where an output goes fails that input with its name.
  * One run per output folder: an advisory lock (``OUT/.maskformer-segment.lock``) makes a second
    concurrent run exit at once, naming the first one's pid; the lock file is removed when the run
    ends (it was left behind before).
"""
from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import stat
import time
from typing import Dict, List, Optional

import numpy as np

RECORD_FORMAT = 1
LOCK_NAME = ".maskformer-segment.lock"
RESULT_KINDS = ("label", "color", "overlay")  # the images of a set, in writing order, beside NAME.json


class OutputError(Exception):
    """An output cannot be written safely; the message names the path."""


class ForeignFileError(OutputError):
    """A result would replace a file this command did not write (a user's file, or another image's
    result). Found while planning, the input is reported and skipped (issue 24: "reported and
    skipped"), never a reason to touch the file; found while writing (it appeared meanwhile), the
    input fails."""


def check_out_folder(out: str) -> str:
    """Fail early (before the model loads) when ``out`` cannot be a folder. Returns it absolute."""
    out = os.fspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"out_dir={out!r} exists and is not a folder; pass a folder path (it is created if missing)")
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
            raise OutputError(f"{path} is a symbolic link; refusing to write through it (remove it or choose another "
                              "out_dir)")
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


# link() is refused by some file systems (FAT, some FUSE and SMB mounts): there a file that was
# absent is created by rename after one more existence check (a window of microseconds).
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV}


def atomic_write(path: str, write, replace: bool) -> int:
    """Write a file through ``write(fileobj)`` to a temporary name in its folder, then put it at
    ``path``: readers see the old file or the whole new one, never a torn one. Never follows a link
    (the temporary is created with O_EXCL | O_NOFOLLOW; ``path`` must not be a link).

    ``replace``: ``path`` may hold a file of ours, which is replaced (rename). Otherwise ``path``
    must be absent and stays ours alone: the file is hard-linked into place, which fails if
    anything appeared there in the meantime (``OutputError``; the other file is kept).
    Returns the size written."""
    folder, base = os.path.split(path)
    _check_target(path)
    if not replace and os.path.lexists(path):
        raise ForeignFileError(_foreign_message(path))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            size = f.tell()
        _check_target(path)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError:
                raise ForeignFileError(_foreign_message(path)) from None
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if os.path.lexists(path):
                    raise ForeignFileError(_foreign_message(path)) from None
                os.rename(tmp, path)
            else:
                os.unlink(tmp)
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


def output_files(out: str, name: str, color_map: bool = True) -> Dict[str, str]:
    """The files of one input's result set: ``OUT/<name>.json``, ``.label.png``, ``.color.png``
    (only with ``color_map``), ``.overlay.png``."""
    base = os.path.join(out, *name.split("/"))
    return {"json": base + ".json", **{kind: f"{base}.{kind}.png" for kind in RESULT_KINDS
                                       if color_map or kind != "color"}}


def _load_record(path: str) -> Optional[dict]:
    """Our record at ``path`` (a regular file holding one), else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:  # records are KBs; 64 MB is not one
            return None
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and record.get("maskformer_segment") == RECORD_FORMAT else None


def read_record(path: str) -> Optional[dict]:
    """The JSON record at ``path``; None when absent. Raises OutputError for a link, a non-file or
    a file that is not one of our records (we never write over those)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} is a symbolic link or not a regular file; refusing to replace it (remove it)")
    record = _load_record(path)
    if record is None:
        raise OutputError(f"{path} exists and is not a maskformer segment record; refusing to replace it "
                          "(move it away or choose another out_dir)")
    return record


def claimed_kinds(record: Optional[dict], source: str) -> set:
    """The kinds of image ("label", "color", "overlay") that our record for the image ``source``
    (a real path) claims: what a run may replace."""
    if record is None or record.get("source") != source or not isinstance(record.get("files"), dict):
        return set()
    return set(record["files"]) & set(RESULT_KINDS)


def is_result_file(path: str) -> bool:
    """``path`` is one of the images of a set this command wrote: ``NAME.<kind>.png`` beside a
    ``NAME.json`` record of ours that claims it (or is still writing its set)."""
    name = os.path.basename(path)
    for kind in RESULT_KINDS:
        suffix = f".{kind}.png"
        if name.endswith(suffix) and len(name) > len(suffix):
            record = _load_record(path[: -len(suffix)] + ".json")
            if record is None:
                return False
            files = record.get("files")
            return (isinstance(files, dict) and kind in files) or record.get("status") != "complete"
    return False


def _foreign_message(path: str) -> str:
    return (f"{path} exists and was not written by maskformer segment for this image (no record of ours claims "
            "it); refusing to replace it, even with overwrite=True: move it away or choose another out_dir")


def check_targets(record: Optional[dict], source: str, files: Dict[str, str]) -> None:
    """Raise OutputError when an image of the set cannot be written: a link or non-file where it
    goes, or an existing file that our record for ``source`` does not claim (a foreign file)."""
    mine = claimed_kinds(record, source)
    for kind in RESULT_KINDS:
        path = files.get(kind)
        if path is None:
            continue
        _check_target(path)
        if kind not in mine and os.path.lexists(path):
            raise ForeignFileError(_foreign_message(path))


def record_state(record: Optional[dict], source: str, files: Dict[str, str], params: dict) -> str:
    """"absent", "foreign" (another source image), "other-params" (same image, another
    task/model/...), "incomplete", "stale" (the source changed since) or "complete"."""
    if record is None:
        return "absent"
    if record.get("source") != source:
        return "foreign"
    if record.get("status") != "complete":
        return "incomplete"
    if record.get("params") != params:
        return "other-params"
    try:
        st = os.stat(source)
        if record.get("source_bytes") != st.st_size or record.get("source_mtime_ns") != st.st_mtime_ns:
            return "stale"
    except OSError:
        return "stale"
    recorded = record.get("files") or {}
    for kind, size in recorded.items():
        path = files.get(kind)
        try:
            st = os.lstat(path) if path else None
        except FileNotFoundError:
            return "incomplete"
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return "incomplete"
    if set(recorded) != set(k for k in files if k != "json"):
        return "incomplete"
    return "complete"


class OutputLock:
    """An advisory lock on the output folder (fcntl.flock on ``OUT/.maskformer-segment.lock``),
    held for the whole run; a second run on the same folder is refused with the holder's pid.

    The file is unlinked on release, while the lock is still held; a run that opened the file just
    before that and then gets the lock sees that the path no longer names the file it locked, and
    starts again (so two runs can never both hold a lock)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd = -1

    def acquire(self):
        import fcntl

        for _ in range(100):  # each retry means another run released the lock in between
            _check_target(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"another maskformer segment run ({holder}) is writing to "
                                      f"{os.path.dirname(self.path)}; wait for it to finish or choose another "
                                      "out_dir") from None
                raise
            mine = os.fstat(fd)
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)  # locked a file its holder had just removed: take the new one
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
            self.fd = fd
            return
        raise OutputError(f"could not take the lock {self.path}: it was replaced 100 times in a row")

    def release(self):
        if self.fd >= 0:
            try:
                os.unlink(self.path)  # before closing: see the class docstring
            except OSError:
                pass
            os.close(self.fd)
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


def save_label_map(label_map: np.ndarray, f) -> None:
    """Lossless PNG of an (H, W) integer map as stored: 8-bit when the values fit, else 16-bit.
    ``f``: path or binary file."""
    from PIL import Image  # Pillow on first use: import maskformer stays light

    lo, hi = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"label ids {lo}..{hi} do not fit a 16-bit PNG")
    dtype = np.uint8 if hi < 256 else np.uint16
    Image.fromarray(label_map.astype(dtype)).save(f, format="PNG")


def write_result(files: Dict[str, str], previous: Optional[dict], record: dict, images: Dict[str, object]) -> None:
    """Write one input's set: the record as "writing", the images, the record as "complete".

    ``previous``: the record found at ``files["json"]`` (ours, for the same source) or None;
    ``images``: {kind: writer(fileobj)} for each image kind in ``files``."""
    folder = os.path.dirname(files["json"])
    source = record["source"]
    check_targets(previous, source, files)
    for path in files.values():
        remove_stale_temporaries(folder, os.path.basename(path))
    earlier = claimed_kinds(previous, source)
    kinds = [k for k in RESULT_KINDS if k in files]

    def dump(rec):
        return lambda f: f.write(record_json(rec).encode("utf-8"))

    # The "writing" record claims what this set may leave behind if killed: what it writes now and
    # what an earlier set of ours wrote (sizes unknown yet: null).
    claims = {k: None for k in RESULT_KINDS if k in kinds or k in earlier}
    atomic_write(files["json"], dump(dict(record, status="writing", files=claims)), replace=previous is not None)
    sizes = {}
    for kind in kinds:
        sizes[kind] = atomic_write(files[kind], images[kind], replace=kind in earlier)
    for kind in sorted(earlier - set(kinds)):  # ours, no longer part of the set (color_map=False now)
        stale = files["json"][: -len(".json")] + f".{kind}.png"
        _check_target(stale)
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    atomic_write(files["json"], dump(dict(record, status="complete", files=sizes)), replace=True)


__all__: List[str] = [
    "LOCK_NAME", "RECORD_FORMAT", "RESULT_KINDS", "ForeignFileError", "OutputError", "OutputLock", "atomic_write", "check_out_folder",
    "check_targets", "claimed_kinds", "ensure_folder", "is_result_file", "output_files", "read_record",
    "record_json", "record_state", "save_label_map", "write_result",
]
