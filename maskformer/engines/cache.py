"""The engine cache: one folder per (checkpoint, engine, versions), built on first use.

Where: ``engine_cache_dir=`` of ``from_pretrained``, else ``$MASKFORMER_ENGINE_CACHE``, else
``maskformer/engines`` inside the Hugging Face cache (``$HF_HOME``, default
``~/.cache/huggingface``). The checkpoint's own folder is never written to (a hub snapshot is a
tree of links into the hub's blob store, and a user's folder is theirs).

Key: SHA-256 over the SHA-256 of every weight file (in the order the checkpoint lists them), the
effective config (config.json with the overrides passed to ``from_pretrained``, as sorted JSON),
the engine and the versions that shape the result: maskformer, its export format
(``maskformer.export.EXPORT_FORMAT``), torch, onnx, onnxscript and the engine's packages. A file's
hash is remembered by (real path, size, mtime) in ``file-hashes.json`` beside the entries, so a
warm load does not re-read the weights.

An entry (``<engine>-<key[:24]>/``) holds the engine's files and ``manifest.json``: the key, what
went into it, the source, the file sizes, and the verification against PyTorch made when it was
built. It is reused when its manifest names the same key and every file has its recorded size;
otherwise (a torn or edited entry) it is rebuilt. Building writes into a temporary folder that is
renamed into place, so a crash leaves no half entry and two processes building at once both end
with a complete one. After a build, entries of the same source under another key (older weights,
older versions) are deleted: a stale entry is replaced, not kept beside the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

MANIFEST = "manifest.json"
FILE_HASHES = "file-hashes.json"
ENV_VAR = "MASKFORMER_ENGINE_CACHE"


def cache_root(engine_cache_dir: Optional[str] = None) -> str:
    if engine_cache_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(engine_cache_dir)))
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(hf_home, "maskformer", "engines")


def file_sha256(path: str, root: str) -> str:
    """SHA-256 of a file's bytes, remembered in ``root/file-hashes.json`` by (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    index_path = os.path.join(root, FILE_HASHES)
    index = _read_json(index_path) or {}
    known = index.get(real)
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    index = _read_json(index_path) or {}  # re-read: another process may have added entries meanwhile
    index[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
    _write_json_atomic(index_path, index)
    return value


def _versions(engine_module) -> Dict[str, str]:
    import importlib.metadata as md

    from .. import __version__
    from ..export import EXPORT_FORMAT

    found = {"maskformer": __version__, "export_format": str(EXPORT_FORMAT), "torch": torch.__version__}
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


def compute_key(path_or_repo_id, engine: str, engine_module, root: str, **kwargs) -> Tuple[str, Dict, object]:
    """(key, what went into it, the effective config), reading only config.json, the file headers
    the config check needs, and the weight files' bytes (or their remembered hashes)."""
    from ..checkpoint import find_checkpoint_files
    from ..config import MaskFormerConfig
    from ..hub import HUB_KWARGS

    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config = kwargs.get("config")
    if config is None:
        config = MaskFormerConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
    elif not isinstance(config, MaskFormerConfig):
        config = MaskFormerConfig.from_dict(config if isinstance(config, dict) else config.to_dict())
    overrides = {k: v for k, v in kwargs.items() if k in MaskFormerConfig.override_names()}
    config = config.with_overrides(**overrides)
    files = find_checkpoint_files(path_or_repo_id, use_safetensors=kwargs.get("use_safetensors"), **hub_kwargs)
    file_hashes = [file_sha256(p, root) for p in files.paths]
    config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
    parts = {
        "engine": engine,
        "weights_sha256": file_hashes,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "versions": _versions(engine_module),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    parts["source"] = _source(path_or_repo_id, hub_kwargs)
    parts["weight_files"] = [os.path.basename(p) for p in files.paths]
    return key, parts, config


def entry_path(root: str, engine: str, key: str) -> str:
    return os.path.join(root, f"{engine}-{key[:24]}")


def valid_entry(entry: str, key: str) -> bool:
    manifest = _read_json(os.path.join(entry, MANIFEST))
    if not manifest or manifest.get("key") != key:
        return False
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(entry, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def get_or_build(cls, path_or_repo_id, engine: str, engine_module, *, engine_cache_dir: Optional[str] = None,
                 threads: int = 1, log=None, **kwargs) -> Tuple[str, object]:
    """The cache entry folder for this checkpoint and engine (built if missing or invalid), and the
    effective config."""
    root = cache_root(engine_cache_dir)
    os.makedirs(root, exist_ok=True)
    key, parts, config = compute_key(path_or_repo_id, engine, engine_module, root, **kwargs)
    entry = entry_path(root, engine, key)
    if valid_entry(entry, key):
        return entry, config
    if os.path.exists(entry):  # torn or edited: rebuild
        shutil.rmtree(entry, ignore_errors=True)
    build(cls, path_or_repo_id, engine, engine_module, root, entry, key, parts, threads=threads, log=log, **kwargs)
    remove_stale(root, engine, parts["source"], keep=entry)
    return entry, config


def build(cls, path_or_repo_id, engine: str, engine_module, root: str, entry: str, key: str, parts: Dict, *,
          threads: int, log=None, **kwargs) -> None:
    """Load the torch model, export it, prepare the engine's files, verify them against PyTorch, and
    publish the entry."""
    from ..export import REL_ERROR_BAR, default_verify_sizes, export_onnx, verify_rows

    log = log or (lambda msg: None)
    start = time.perf_counter()
    # strict: a checkpoint without heads would get random heads, and a cached export of random
    # heads would pass for the checkpoint's.
    model = cls.from_pretrained(path_or_repo_id, dtype=torch.float32, device="cpu", strict=True, **kwargs)
    tmp = tempfile.mkdtemp(prefix=f".build-{engine}-", dir=root)
    try:
        onnx_path = os.path.join(tmp, "model.onnx")
        reusable = reusable_onnx(root, parts)
        if reusable:  # another engine's entry holds the same export: no second export
            for suffix in ("", ".data"):  # .data: the weights of a model over 1.5 GB
                if os.path.exists(reusable[0] + suffix):
                    shutil.copyfile(reusable[0] + suffix, onnx_path + suffix)
            opset = reusable[1]
        else:
            log(f"maskformer: exporting to ONNX for {engine} (first use of this checkpoint; cached in {entry})")
            opset = export_onnx(model, onnx_path, outputs="all", verify=False).opset
        engine_module.prepare(tmp, onnx_path)
        runner = engine_module.Runner.from_entry(tmp, threads)
        sizes = default_verify_sizes(model.config)
        rows = verify_rows(model, runner, sizes)
        bad = [r for r in rows if not r["ok"]]
        if bad:
            raise RuntimeError(f"the {engine} export of {parts['source']} differs from PyTorch: "
                               + "; ".join(f"{r['worst_output']} by {r['max_rel_error']:.2e} (relative; bar "
                                           f"{r['bar']:.1e}) at {tuple(r['size'])}" for r in bad) + "; not cached")
        raised = [r for r in rows if r["bar"] > REL_ERROR_BAR]
        if raised:
            log(f"maskformer: this model amplifies rounding (PyTorch fp32 vs float64: up to "
                f"{max(max(r['torch_fp32_vs_fp64'].values()) for r in raised):.1e} relative), so the {engine} "
                "export was checked against a bar raised to match; expect its maps to differ from PyTorch's "
                "wherever fp32 rounding already decides them")
        del runner
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
                 if os.path.isfile(os.path.join(tmp, name))}
        manifest = {"key": key, **parts, "files": files, "opset": opset, "export_reused_from": reusable[0] if reusable else None, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "build_seconds": round(time.perf_counter() - start, 1), "verification": rows,
                    "rel_error_bar": REL_ERROR_BAR}
        _write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not valid_entry(entry, key):  # not another process's complete entry: a real error
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# The versions the ONNX file itself depends on (not the engine's).
_EXPORT_VERSIONS = ("maskformer", "export_format", "torch", "onnx", "onnxscript")


def reusable_onnx(root: str, parts: Dict) -> Optional[Tuple[str, Optional[int]]]:
    """(path, opset) of a ``model.onnx`` in another valid entry exported from the same weights and
    config by the same versions of the exporting packages, or None."""
    want = {k: parts["versions"].get(k) for k in _EXPORT_VERSIONS}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        manifest = _read_json(os.path.join(folder, MANIFEST))
        if (not manifest or "model.onnx" not in manifest.get("files", {})
                or manifest.get("weights_sha256") != parts["weights_sha256"]
                or manifest.get("config_sha256") != parts["config_sha256"]
                or {k: manifest.get("versions", {}).get(k) for k in _EXPORT_VERSIONS} != want
                or not valid_entry(folder, manifest.get("key"))):
            continue
        return os.path.join(folder, "model.onnx"), manifest.get("opset")
    return None


def remove_stale(root: str, engine: str, source: str, keep: str) -> List[str]:
    """Delete the entries of ``engine`` built from ``source`` other than ``keep``; returns them."""
    removed = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(f"{engine}-") or path == keep or not os.path.isdir(path):
            continue
        manifest = _read_json(os.path.join(path, MANIFEST))
        if manifest and manifest.get("source") == source:
            shutil.rmtree(path, ignore_errors=True)
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
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
