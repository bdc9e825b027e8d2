"""The engine cache: one folder per (checkpoint, engine, versions), built on first use and checked
on every load.

Where: ``engine_cache_dir=`` of ``from_pretrained``, else ``$MASKFORMER_ENGINE_CACHE``, else
``maskformer/engines`` inside the Hugging Face cache (``$HF_HOME``, default
``~/.cache/huggingface``). The checkpoint's own folder is never written to (a hub snapshot is a
tree of links into the hub's blob store, and a user's folder is theirs).

Key: SHA-256 over the SHA-256 of every weight file (in the order the checkpoint lists them), the
effective config (config.json with the overrides passed to ``from_pretrained``) without its
labels, the engine, and the versions that shape the result: maskformer, its export format
(``EXPORT_FORMAT``), this cache's format, torch, onnx, onnxscript and the engine's packages. The
labels (``id2label``/``label2id``) name the classes but shape no tensor, so ``id2label=`` reuses
the plain checkpoint's entry; the returned model's config carries the labels asked for.

A weight file's hash is remembered in ``file-hashes.json`` by (real path, device, inode, size,
mtime, ctime), so a warm load does not re-read the weights. ctime is what a user cannot keep
unchanged by accident: the kernel sets it on every write, rename, chmod and utime (which is how
``cp -p`` or ``touch -r`` restore an mtime), and no call sets it back; a file replaced by another
also gets another inode. Hashing the weights on every load instead would cost, on this project's
2-core AMD EPYC (SHA-NI; file in the page cache; a shared machine at load 11-16): 0.59-0.63 s for
Swin-T's 167 MB and 3.3-3.7 s for Swin-L's 850 MB, against 2 us for the ``os.stat``
(``benchmarks/results/engine-cache-cpu{-run1,}.md``).

An entry (``<engine>-<key[:24]>/``) holds the engine's files and ``manifest.json``: the key, what
went into it, the source, each file's size and SHA-256 recorded when it was built, and the
verification against PyTorch. Every load checks that the entry holds exactly those files with
those sizes and hashes. For Swin-T's 170 MB entry that took 0.31 s of a 1.16 s warm load (ONNX
Runtime) and 0.37 s of 0.72 s (OpenVINO) at load 14-15 here (27% and 52%, paired), so about 5x
that, 1.6-1.9 s, for Swin-L's 850 MB at the same load: the price of never serving another model's
file or a zeroed block. An entry that fails (a file replaced, truncated, zeroed or missing, an
unreadable manifest) is rebuilt, with a line saying why.

Building: under the entry's lock, ``.<entry>.lock`` in the cache folder: the builder holds an
exclusive ``flock`` on it and writes its pid and host into it. Another process that needs the
same entry says whom it waits for, waits, and then loads what was built. A killed builder's lock
is released by the kernel with its process, so a stale lock never blocks; the next build removes
the lock files and ``.build-*`` folders that killed builds left. The build writes into
``.build-<entry>-<pid>-<random>/``, renamed into place when complete (a crash leaves no half
entry). Folders and files are created with the process's umask (a cache shared by a group works
with umask 002), and a cache that cannot be written to is named, with how to choose another,
before the minutes of exporting. After a build, entries of the same source, engine and overrides
under another key (older weights, older versions) are deleted: a stale entry is replaced, not
kept beside the new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .._version import __version__
from ..checkpoint import find_checkpoint_files
from ..config import MaskFormerConfig
from ..hub import HUB_KWARGS
from . import export

MANIFEST = "manifest.json"
FILE_HASHES = "file-hashes.json"
ENV_VAR = "MASKFORMER_ENGINE_CACHE"
# Bumped when the key or the entry layout changes: part of the key. 2: labels out of the key,
# content hashes in the manifest.
CACHE_FORMAT = 2
LABEL_FIELDS = ("id2label", "label2id")
_BUILD_DIR = re.compile(r"^\.build-(?P<entry>[a-z0-9_]+-[0-9a-f]{24})-(?P<pid>\d+)-[0-9a-f]+$")
# A ``.build-*`` folder whose name this version did not write (an older maskformer's) is stale
# once it has not changed for this long; a build writes into its folder at least once a phase.
_FOREIGN_BUILD_STALE_S = 3600
# A file changed less than this long ago is hashed but not remembered: the kernel stamps ctime
# from a clock that ticks every few milliseconds, so a second write within the same tick would
# leave every stat field but the content unchanged (git's "racily clean" files).
_RACY_S = 1.0


class EngineCacheError(OSError):
    """The engine cache cannot serve or store an entry (not writable, or a damaged entry that
    cannot be replaced); the message names the folder and how to choose another. ``errno`` is the
    cause's (EROFS, EACCES...)."""

    def __init__(self, message: str, cause: Optional[OSError] = None):
        super().__init__(message)
        self.errno = getattr(cause, "errno", None)


def cache_root(engine_cache_dir: Optional[str] = None) -> str:
    if engine_cache_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(engine_cache_dir)))
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(hf_home, "maskformer", "engines")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_id(st: os.stat_result) -> Dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def file_sha256(path: str, root: str) -> str:
    """SHA-256 of a file's bytes, remembered in ``root/file-hashes.json`` by (real path, device,
    inode, size, mtime, ctime): see the module docstring. The memo is best effort: a cache that
    cannot be written to hashes again on the next load."""
    real = os.path.realpath(path)
    stat_id = _stat_id(os.stat(real))
    index_path = os.path.join(root, FILE_HASHES)
    known = (_read_json(index_path) or {}).get(real)
    if isinstance(known, dict) and {k: known.get(k) for k in stat_id} == stat_id and known.get("sha256"):
        return known["sha256"]
    value = sha256_of(real)
    if _stat_id(os.stat(real)) != stat_id or time.time_ns() - stat_id["ctime_ns"] < _RACY_S * 1e9:
        return value  # changed while being read, or too recently to be told apart by its stat
    index = _read_json(index_path) or {}  # re-read: another process may have added entries meanwhile
    # forget files that are gone (checkpoints deleted since): the memo stays the size of what exists
    index = {p: v for p, v in index.items() if os.path.exists(p)}
    index[real] = {**stat_id, "sha256": value}
    with contextlib.suppress(OSError):
        if os.path.isdir(root):
            _write_json_atomic(index_path, index)
    return value


def _versions(engine_module) -> Dict[str, str]:
    md = importlib.metadata
    found = {"maskformer": __version__, "export_format": str(export.EXPORT_FORMAT), "cache_format": str(CACHE_FORMAT),
             "torch": torch.__version__}
    for package in ("onnx", "onnxscript"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "missing"
    found.update(engine_module.versions())
    return found


def _source(path_or_repo_id, hub_kwargs: Dict) -> str:
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        base = os.path.realpath(name)
    else:
        base = f"hub:{name}@{hub_kwargs.get('revision') or 'main'}"
    sub = hub_kwargs.get("subfolder")
    return f"{base}/{sub}" if sub else base


def _json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def graph_config(config) -> Dict:
    """The config's fields that shape the exported graph: all of them but the labels (the class
    count stays, as ``num_labels``)."""
    data = {k: v for k, v in config.to_dict().items() if k not in LABEL_FIELDS}
    data["num_labels"] = config.num_labels
    return data


def compute_key(path_or_repo_id, engine: str, engine_module, root: str, config_class=MaskFormerConfig,
                **kwargs) -> Tuple[str, Dict, object]:
    """(key, what went into it, the effective config), reading only config.json, the file headers
    the config check needs, and the weight files' bytes (or their remembered hashes).
    ``config_class``: the model family's (``MaskFormerConfig`` or ``Mask2FormerConfig``; the
    config's ``model_type`` is part of the hashed config, so the families never share a key)."""
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    given = kwargs.get("config")
    config = given
    if config is None:
        config = config_class.from_pretrained(path_or_repo_id, **hub_kwargs)
    elif not isinstance(config, config_class):
        config = config_class.from_dict(config if isinstance(config, dict) else config.to_dict())
    overrides = {k: v for k, v in kwargs.items() if k in config_class.override_names()}
    config = config.with_overrides(**overrides)
    files = find_checkpoint_files(path_or_repo_id, use_safetensors=kwargs.get("use_safetensors"), **hub_kwargs)
    parts = {
        "engine": engine,
        "weights_sha256": [file_sha256(p, root) for p in files.paths],
        "config_sha256": _json_sha256(graph_config(config)),
        "versions": _versions(engine_module),
    }
    # What the engine asks of the export beyond the portable default (OpenVINO: Mask2Former's
    # deformable attention as its extension's operation): another graph, another key.
    options = export_options(engine_module, config)
    if options:
        parts["export_options"] = options
    key = _json_sha256(parts)
    parts["source"] = _source(path_or_repo_id, hub_kwargs)
    # What the caller asked for, labels aside: entries of the same request under another key are stale.
    parts["request"] = _json_sha256({"source": parts["source"], "engine": engine,
                                     "overrides": {k: v for k, v in overrides.items() if k not in LABEL_FIELDS},
                                     "config": graph_config(given) if given is not None and hasattr(given, "to_dict")
                                     else given})
    parts["weight_files"] = [os.path.basename(p) for p in files.paths]
    return key, parts, config


def export_options(engine_module, config) -> Dict[str, str]:
    """The engine module's ``export_options(config)`` ({} for an engine without the hook)."""
    hook = getattr(engine_module, "export_options", None)
    return dict(hook(config)) if hook is not None else {}


def entry_path(root: str, engine: str, key: str) -> str:
    return os.path.join(root, f"{engine}-{key[:24]}")


MISSING = "missing"


def check_entry(entry: str, key: str) -> Optional[str]:
    """None when ``entry`` holds exactly the files its manifest lists, with the sizes and SHA-256
    recorded when it was built, under ``key``; otherwise why not (``MISSING`` when there is no
    entry). Reads every file once (see the module docstring for the cost)."""
    if not os.path.isdir(entry):
        return MISSING
    manifest = _read_json(os.path.join(entry, MANIFEST))
    if manifest is None:
        return f"its {MANIFEST} is missing or unreadable"
    if manifest.get("key") != key:
        return f"its {MANIFEST} names another key"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        return f"its {MANIFEST} records no content hashes"
    try:  # another user's entry made 0700 by an older maskformer cannot be read: say so
        present = {n for n in os.listdir(entry) if n != MANIFEST and os.path.isfile(os.path.join(entry, n))}
        if present != set(files):
            extra, gone = sorted(present - set(files)), sorted(set(files) - present)
            return "; ".join(([f"{', '.join(gone)} missing"] if gone else [])
                             + ([f"{', '.join(extra)} not made by its build"] if extra else []))
        for name, record in sorted(files.items()):
            path = os.path.join(entry, name)
            size = os.path.getsize(path)
            if size != record.get("size"):
                return f"{name} has {size} bytes, {record.get('size')} when built"
            if sha256_of(path) != record["sha256"]:
                return f"{name} differs from the file built (SHA-256)"
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    return None


def get_or_build(cls, path_or_repo_id, engine: str, engine_module, *, engine_cache_dir: Optional[str] = None,
                 threads: int = 1, log: Optional[Callable[[str], None]] = None, **kwargs) -> Tuple[str, object]:
    """The cache entry folder for this checkpoint and engine (built if missing or damaged), and
    the effective config (with the labels asked for)."""
    log = log or (lambda message: None)
    root = cache_root(engine_cache_dir)
    key, parts, config = compute_key(path_or_repo_id, engine, engine_module, root,
                                     config_class=getattr(cls, "config_class", MaskFormerConfig), **kwargs)
    entry = entry_path(root, engine, key)
    problem = check_entry(entry, key)
    if problem is None:
        return entry, config
    if problem != MISSING:
        log(f"the cached {engine} engine {entry} is damaged ({problem}); rebuilding it")
    what = f"the {engine} engine of {parts['source']}"
    with build_lock(root, entry, what=what, log=log,
                    need=" is not in it yet" if problem == MISSING else f" there is damaged ({problem})"):
        problem = check_entry(entry, key)
        if problem is None:  # built by the process we waited for
            return entry, config
        remove_abandoned_builds(root, holding=entry)
        if os.path.lexists(entry):
            _remove_tree(entry, why=f"it is damaged ({problem})")
        build(cls, path_or_repo_id, engine, engine_module, root, entry, key, parts, threads=threads, log=log, **kwargs)
    remove_stale(root, engine, parts["request"], parts["source"], keep=entry)
    return entry, config


def _not_writable(root: str, exc: OSError, what: str, need: str = " is not in it yet") -> EngineCacheError:
    return EngineCacheError(
        f"the engine cache {root} is not writable ({exc.strerror or exc}), and {what}{need}: choose a "
        "writable folder with engine_cache_dir=... (from_pretrained) or the MASKFORMER_ENGINE_CACHE environment "
        "variable (also for the command line), or build it once where this folder is writable", exc)


@contextlib.contextmanager
def build_lock(root: str, entry: str, *, what: str, log: Callable[[str], None],
               need: str = " is not in it yet") -> Iterator[None]:
    """Hold the build lock of ``entry`` (see the module docstring). Raises ``EngineCacheError``,
    naming the folder, when the cache cannot be written to."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds are not serialised; the rename still publishes whole entries
        fcntl = None
    path = os.path.join(root, f".{os.path.basename(entry)}.lock")
    waited = None
    while True:
        try:
            os.makedirs(root, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError as exc:
            try:  # another user's lock file in a shared cache: flock works on a read-only descriptor too
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                raise _not_writable(root, exc, what, need) from exc
        except OSError as exc:
            raise _not_writable(root, exc, what, need) from exc
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            now = time.monotonic()
            if waited is None:
                waited = [now, now]
                log(f"another process ({holder}) is building {what}; waiting for it")
            elif now - waited[1] >= 60:
                waited[1] = now
                log(f"still waiting for {holder} ({now - waited[0]:.0f} s so far)")
            time.sleep(0.5)
            continue
        except OSError:  # no locks on this file system (ENOLCK): go on unserialised
            break
        # The holder unlinks the file before unlocking it: a lock on an unlinked file is no lock.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if waited is not None:
        log(f"the other process finished after {time.monotonic() - waited[0]:.0f} s")
    try:
        with contextlib.suppress(OSError):  # a read-only descriptor: the lock holds, the note is not written
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        note = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {note['pid']} on {note['host']}, since {note['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


def _try_lock(path: str) -> Optional[int]:
    """A descriptor holding ``path``'s flock if nobody holds it (None if someone does, or if there
    is no such file or no flock)."""
    try:
        import fcntl  # not on Windows (see build_lock)

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def remove_abandoned_builds(root: str, holding: str) -> List[str]:
    """Remove what killed builds left in ``root``: ``.build-*`` folders whose entry's lock nobody
    holds (those of ``holding``, whose lock this process holds, included), unheld lock files,
    ``.trash-*`` folders and ``.tmp-*`` files over an hour old. Returns the removed paths."""
    removed = []
    names = sorted(os.listdir(root))
    for name in names:
        path = os.path.join(root, name)
        match = _BUILD_DIR.match(name)
        if match:
            lock = os.path.join(root, f".{match['entry']}.lock")
            if match["entry"] == os.path.basename(holding):
                stale = True
            elif not os.path.exists(lock):
                stale = True  # its builder unlinked its lock: finished or gone; a live build holds its lock file
            else:
                fd = _try_lock(lock)
                stale = fd is not None
                if fd is not None:
                    os.close(fd)
        elif name.startswith(".build-") and os.path.isdir(path):  # an older maskformer's (tempfile.mkdtemp) name
            stale = time.time() - os.path.getmtime(path) > _FOREIGN_BUILD_STALE_S
        elif name.startswith(".trash-"):  # renamed aside to be deleted, by a process killed before it was
            stale = True
        elif name.startswith(".tmp-") and os.path.isfile(path):  # a JSON file a killed process was writing
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(path) > _FOREIGN_BUILD_STALE_S:
                    os.remove(path)
                    removed.append(path)
            continue
        elif (name.startswith(".") and name.endswith(".lock") and name != f".{os.path.basename(holding)}.lock"):
            fd = _try_lock(path)
            if fd is not None:  # nobody holds it: a killed builder's
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
                os.close(fd)
            continue
        else:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    return removed


def _remove_tree(path: str, why: str) -> None:
    """Delete ``path`` (a cache entry): renamed aside first, so that no process ever sees half of
    it; raises ``EngineCacheError`` when it cannot be."""
    aside = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise EngineCacheError(f"{path} must be replaced ({why}) but cannot be ({exc.strerror or exc}): remove it "
                               "(or ask its owner to), or choose another cache folder with engine_cache_dir=... or "
                               "MASKFORMER_ENGINE_CACHE", exc) from exc
    shutil.rmtree(aside, ignore_errors=True)


def _make_build_dir(root: str, entry: str) -> str:
    # os.mkdir, not tempfile.mkdtemp: mkdtemp makes 0700 folders, which another user of a shared
    # cache can neither read nor replace (the entry is this folder, renamed).
    path = os.path.join(root, f".build-{os.path.basename(entry)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    return path


def build(cls, path_or_repo_id, engine: str, engine_module, root: str, entry: str, key: str, parts: Dict, *,
          threads: int, log: Callable[[str], None], **kwargs) -> None:
    """Load the torch model, export it, prepare the engine's files, verify them against PyTorch, and
    publish the entry (the caller holds its lock)."""
    start = time.perf_counter()
    try:  # before the model is loaded: a cache that cannot be written to is said at once
        tmp = _make_build_dir(root, entry)
    except OSError as exc:
        raise _not_writable(root, exc, f"the {engine} engine of {parts['source']}") from exc
    try:
        kwargs.pop("strict", None)
        # strict: a checkpoint without heads would get random heads, and a cached export of random
        # heads would pass for the checkpoint's.
        model = cls.from_pretrained(path_or_repo_id, dtype=torch.float32, device="cpu", strict=True, **kwargs)
        reusable = reusable_onnx(root, parts)
        prepare_step = getattr(engine_module, "PREPARE_STEP", None)
        steps = [f"an ONNX export (roughly {export.estimate_export_seconds(model.config):.0f} s)"
                 if not reusable else "a copy of another engine's ONNX export of the same checkpoint",
                 prepare_step, f"a check against PyTorch at {len(export.default_verify_sizes(model.config))} sizes"]
        log(f"building the {engine} engine of {parts['source']} (first use; stored in {entry}): "
            + ", ".join(s for s in steps if s))
        onnx_path = os.path.join(tmp, "model.onnx")
        if reusable:  # another engine's entry holds the same export: no second export
            for suffix in ("", ".data"):  # .data: the weights of a model over 1.5 GB
                if os.path.exists(reusable[0] + suffix):
                    shutil.copyfile(reusable[0] + suffix, onnx_path + suffix)
            opset = reusable[1]
        else:
            deformable = (parts.get("export_options") or {}).get("deformable_attention", "portable")
            opset = export.export_onnx(model, onnx_path, outputs="all", verify=False, log=log,
                                       deformable_attention=deformable).opset
        phase = time.perf_counter()
        if prepare_step:
            log(prepare_step)
        engine_module.prepare(tmp, onnx_path)
        if prepare_step:
            log(f"done in {time.perf_counter() - phase:.1f} s")
        # keep_compiled=False: the odd verification sizes are not worth keeping compiled on disk
        runner = engine_module.Runner.from_entry(tmp, threads, keep_compiled=False)
        rows = export.verify_rows(model, runner, export.default_verify_sizes(model.config), log=log, engine=engine)
        bad = [r for r in rows if not r["ok"]]
        if bad:
            raise RuntimeError(f"the {engine} export of {parts['source']} differs from PyTorch: "
                               + "; ".join(f"{r['worst_output']} by {r['max_rel_error']:.2e} (relative; bar "
                                           f"{r['bar']:.1e}) at {tuple(r['size'])}" for r in bad) + "; not cached")
        raised = [r for r in rows if r["bar"] > export.rel_error_bar(model.config)]
        if raised:
            log(f"this model amplifies rounding (PyTorch fp32 vs float64: up to "
                f"{max(max(r['torch_fp32_vs_fp64'].values()) for r in raised):.1e} relative), so the {engine} "
                "export was checked against a bar raised to match; expect its maps to differ from PyTorch's "
                "wherever fp32 rounding already decides them")
        del runner
        files = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                files[name] = {"size": os.path.getsize(path), "sha256": sha256_of(path)}
        manifest = {"key": key, **parts, "files": files, "opset": opset,
                    "export_reused_from": os.path.dirname(reusable[0]) if reusable else None,
                    "built": time.strftime("%Y-%m-%d %H:%M:%S"), "build_seconds": round(time.perf_counter() - start, 1),
                    "verification": rows, "rel_error_bar": export.rel_error_bar(model.config)}
        _write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
        os.rename(tmp, entry)  # the caller holds the lock and removed any old entry
        log(f"the {engine} engine is ready (built in {time.perf_counter() - start:.0f} s); later loads reuse it")
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# The versions the ONNX file itself depends on (not the engine's).
_EXPORT_VERSIONS = ("maskformer", "export_format", "torch", "onnx", "onnxscript")


def reusable_onnx(root: str, parts: Dict) -> Optional[Tuple[str, Optional[int]]]:
    """(path, opset) of a ``model.onnx`` in another entry exported from the same weights and
    config by the same versions of the exporting packages, checked like a load, or None."""
    want = {k: parts["versions"].get(k) for k in _EXPORT_VERSIONS}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        manifest = _read_json(os.path.join(folder, MANIFEST))
        if (not manifest or "model.onnx" not in (manifest.get("files") or {})
                or manifest.get("weights_sha256") != parts["weights_sha256"]
                or manifest.get("config_sha256") != parts["config_sha256"]
                or (manifest.get("export_options") or {}) != (parts.get("export_options") or {})
                or {k: (manifest.get("versions") or {}).get(k) for k in _EXPORT_VERSIONS} != want
                or check_entry(folder, manifest.get("key")) is not None):
            continue
        return os.path.join(folder, "model.onnx"), manifest.get("opset")
    return None


def remove_stale(root: str, engine: str, request: str, source: str, keep: str) -> List[str]:
    """Delete the entries of ``engine`` made for the same ``request`` (source and overrides) under
    another key than ``keep``'s (other weights, config or versions), and those of ``source`` made
    by an older cache format (no request recorded); returns them."""
    removed = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(f"{engine}-") or path == keep or not os.path.isdir(path):
            continue
        manifest = _read_json(os.path.join(path, MANIFEST))
        if manifest and (manifest.get("request") == request
                         or (manifest.get("request") is None and manifest.get("source") == source)):
            with contextlib.suppress(EngineCacheError):  # another user's, in a shared cache: theirs to keep
                _remove_tree(path, why="stale")
                removed.append(path)
    return removed


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, value) -> None:
    # os.open with 0o666, not tempfile.mkstemp (0600): the file keeps the umask's permissions.
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
