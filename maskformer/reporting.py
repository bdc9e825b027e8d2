"""What a benchmark's result files record, and how they are written.

One module for every benchmark (``maskformer bench`` and each script in ``benchmarks/``):

* ``environment(device)``: what every figure must be read with: the date, the device (GPU name, or
  CPU model and core count), the CPU's ISA flags and torch's CPU capability, torch's threads, the
  load average, the versions of the packages that decide speed, Python, the platform, and the
  commit (``git_commit``: hash, and whether the working tree differs from it).
* ``environment_markdown(env)``: the same as the opening lines of a Markdown report.
* ``results_stem`` / ``write_report``: a JSON + Markdown pair (or one file, ``write_text``),
  each written to a temporary name in its folder and renamed into place, so a reader never sees
  half a file and a run cut short leaves the previous complete file.

The rule for result files (issue #24, item 19: a default run replaced the committed results that
the docs link): **a file that exists is never replaced unless the caller asked for it**
(``overwrite=True``; ``--overwrite`` on every benchmark command).

* A run with the default name writes under ``out/benchmarks/`` (ignored by git) in the current
  directory; when that name is taken (an earlier run), it takes the next free one (``NAME-2``,
  ``NAME-3``, ...) and says so: a run never fails, and never replaces anything, for a name it chose.
* A name the user chose (``--out``, ``--name``) that is taken is refused before anything is
  measured, with the fix in the message, unless ``overwrite=True``. Refreshing a committed result
  is therefore explicit: ``maskformer bench --out benchmarks/results --overwrite``.
* Within one run the files it claimed (``results_stem``, ``claim_folder``) may be rewritten as
  often as it likes (the end-to-end benchmark saves after every group).

``write_report`` and ``write_text`` enforce the rule themselves, so a script that forgets to claim
its name still cannot replace a file; ``results_stem`` is the early check, made before minutes of
measuring rather than after.

Importing this module imports neither torch nor git; ``environment()`` imports torch.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["CPU_FLAGS", "PACKAGES", "DEFAULT_RESULTS_DIR", "ResultsExistError", "environment",
           "environment_markdown", "git_commit", "commit_text", "loadavg", "versions", "slug", "results_stem",
           "claim_file", "claim_folder", "write_report", "write_text"]

# The ISA extensions that decide CPU speed here: oneDNN's bf16 path needs avx512_bf16 or AMX
# (without them a bf16 Swin-T forward was ~3x slower than fp32 on an AVX2-only EPYC), the C++
# kernels are compiled for AVX2/FMA/AVX-512 and int8 engines want VNNI/AMX.
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# Read from the installed distributions' metadata: nothing is imported (importing triton alone
# takes seconds), and a package that is not installed is recorded as None.
PACKAGES = ("maskformer", "torch", "transformers", "triton", "numpy", "onnx", "onnxscript", "onnxruntime",
            "openvino")
DEFAULT_RESULTS_DIR = os.path.join("out", "benchmarks")

# The checkout this package was imported from (None when installed: then there is no commit).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Paths this process may rewrite: files it wrote or claimed, and folders it claimed.
_claimed_files: set = set()
_claimed_folders: set = set()


class ResultsExistError(FileExistsError):
    """A result file exists and the caller did not ask to replace it; the message names the file
    and the fix."""


# ---------------------------------------------------------------------------------------------
# the environment
def loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15-minute load averages (rounded to 0.01), or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def versions(packages: Iterable[str] = PACKAGES) -> Dict[str, Optional[str]]:
    """package -> installed version (from its metadata, without importing it), or None."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _git(*args: str, cwd: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(root: Optional[str] = None) -> Dict[str, object]:
    """``{"commit": 40-hex hash or None, "dirty": bool or None}`` of the checkout at ``root``
    (default: the one this package was imported from).

    ``dirty``: tracked files differ from the commit, or files git does not ignore are untracked
    (a new module that was timed but not committed counts). Read-only git queries. An installed
    package (no checkout of ours around it: a venv inside some other repository must not lend
    us its commit) and a copied tree without ``.git`` (a lent GPU machine) have no commit; there
    the ``MASKFORMER_COMMIT`` environment variable, when set, says which commit was copied.
    """
    root = os.path.abspath(root or _CHECKOUT)
    top = _git("rev-parse", "--show-toplevel", cwd=root)
    head = _git("rev-parse", "HEAD", cwd=root) if top and os.path.samefile(top, root) else None
    if head is None:
        given = os.environ.get("MASKFORMER_COMMIT", "").strip()
        return {"commit": given or None, "dirty": None}
    tracked = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=root)
    dirty = None if tracked is None or untracked is None else bool(tracked or untracked)
    return {"commit": head, "dirty": dirty}


def commit_text(env: Dict) -> str:
    """"abc1234", "abc1234 (dirty)" or "unknown" from an environment (or ``git_commit``) dict."""
    commit = env.get("commit")
    if not commit:
        return "unknown"
    short = commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    return short + (" (dirty)" if env.get("dirty") else "")


def environment(device: str = "cpu", *, threads: Optional[int] = None) -> Dict:
    """What a result file records about where it was measured (call it when the run starts: its
    ``loadavg`` is the load then; record the load at the end with ``loadavg()``).

    device: "cpu" or "cuda[:i]" (CUDA is queried only for a CUDA device, so a CPU run never
    initialises it). threads: the threads the run uses (default ``torch.get_num_threads()``).
    Returns a JSON-ready dict: date (UTC, ISO), device, device_name, cpu, cores, cpu_flags
    ({flag: bool} for ``CPU_FLAGS``), torch_cpu_capability, threads, loadavg, python, platform,
    versions ({package: version or None}), cuda (torch's CUDA version or None), gpu (CUDA
    devices only), commit and dirty (``git_commit``).
    """
    # torch (and _ext, which imports it) only here: the rest of this module is plain files and
    # subprocesses, importable by a script that has not loaded torch.
    import torch

    from ._ext import cpu_flags, cpu_model

    cores = os.cpu_count()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": f"{cpu_model()} ({cores} cores)",
        "cpu": cpu_model(),
        "cores": cores,
        "cpu_flags": cpu_flags(CPU_FLAGS),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "cuda": torch.version.cuda,
    }
    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        env["gpu"] = env["device_name"] = torch.cuda.get_device_name(index)
    env.update(git_commit())
    return env


def environment_markdown(env: Dict, *, loadavg_end: Optional[Sequence[float]] = None) -> List[str]:
    """The Markdown lines (a bullet list) that open every report: device, CPU flags, threads,
    versions, commit, date, and the load average at the start (and at the end, when given)."""
    flags = env.get("cpu_flags") or {}
    have = ", ".join(k for k, v in flags.items() if v) or "-"
    lacks = ", ".join(k for k, v in flags.items() if not v) or "-"
    installed = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    host = f" (CUDA {env.get('cuda')}); host CPU {env.get('cpu')} ({env.get('cores')} cores)" if env.get("gpu") else ""
    lines = [f"- device: {env.get('device_name')}{host}; {env.get('threads')} threads; CPU flags {have} (not: {lacks}); "
             f"torch CPU capability {env.get('torch_cpu_capability')}",
             f"- {installed}; Python {env.get('python')}; commit {commit_text(env)}; {env.get('date')}"]
    load = f"- load average (1, 5, 15 min): {env.get('loadavg')} at the start"
    if loadavg_end is not None:
        load += f", {list(loadavg_end)} at the end"
    return lines + [load]


# ---------------------------------------------------------------------------------------------
# result files
def slug(name: str) -> str:
    """A file-name-safe form of ``name``: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _claimed(path: str) -> bool:
    path = os.path.abspath(path)
    return path in _claimed_files or os.path.dirname(path) in _claimed_folders


def results_stem(stem: Optional[str], default_name: str, *, folder: Optional[str] = None, overwrite: bool = False,
                 suffixes: Sequence[str] = (".json", ".md"), log=print) -> str:
    """Claim the files of a run before it measures anything -> the absolute stem to write them under.

    stem: the stem the user chose (``--out STEM``: a path, relative to the current folder), or
    None for the command's default: ``default_name`` in ``folder`` (default
    ``DEFAULT_RESULTS_DIR`` under the current folder). suffixes: the files the stem stands for.
    When one of ``stem + suffix`` exists: ``overwrite=True`` replaces them; otherwise a chosen
    stem raises ``ResultsExistError`` (naming the file and the fix) and the default one moves on
    to ``NAME-2``, ``NAME-3``, ... and says so through ``log``. The claimed files may then be
    rewritten by this process at will (``write_report``, ``write_text``).
    """
    chosen = stem is not None
    base = os.path.abspath(stem if chosen else os.path.join(folder or DEFAULT_RESULTS_DIR, default_name))
    candidate, n = base, 1
    while not overwrite and not all(_claimed(candidate + s) for s in suffixes) \
            and any(os.path.exists(candidate + s) for s in suffixes):
        taken = [candidate + s for s in suffixes if os.path.exists(candidate + s)]
        if chosen:
            raise ResultsExistError(
                f"{taken[0]} exists: pass --overwrite (overwrite=True) to replace "
                f"{'it' if len(taken) == 1 else 'them'}, or choose another name")
        n += 1
        candidate = f"{base}-{n}"
    if candidate != base:
        log(f"{base}{suffixes[0]} exists (an earlier run): writing {candidate}{suffixes[0]} instead "
            "(--overwrite replaces it)")
    os.makedirs(os.path.dirname(candidate), exist_ok=True)
    _claimed_files.update(candidate + s for s in suffixes)
    return candidate


def claim_file(path: str, *, overwrite: bool = False) -> str:
    """Claim one file the user named (``--json FILE``) before the run -> its absolute path; taken
    and not ``overwrite``: ``ResultsExistError``."""
    return results_stem(path, os.path.basename(path), overwrite=overwrite, suffixes=("",))


def claim_folder(path: str, *, overwrite: bool = False) -> str:
    """Claim a folder that a run fills with many files (the GPU report) -> its absolute path,
    created. A folder that already holds files is refused (``ResultsExistError``) unless
    ``overwrite``; every file directly in a claimed folder may then be written by this process."""
    path = os.path.abspath(path)
    if not overwrite and path not in _claimed_folders and os.path.isdir(path) and os.listdir(path):
        raise ResultsExistError(f"{path} already holds files (an earlier report?): pass --overwrite to write over "
                                "them, or choose another --out")
    os.makedirs(path, exist_ok=True)
    _claimed_folders.add(path)
    return path


def write_text(path: str, text: str, *, overwrite: bool = False) -> str:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, renamed into
    place) under the module's rule: an existing file that this process did not claim is replaced
    only with ``overwrite=True`` (else ``ResultsExistError``). -> the path."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite and not _claimed(path):
        raise ResultsExistError(f"{path} exists: pass --overwrite (overwrite=True) to replace it, or choose "
                                "another name (--out)")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _claimed_files.add(path)
    return path


def write_report(stem: str, report: Dict, markdown: Optional[str] = None, *, overwrite: bool = False) -> List[str]:
    """``stem.json`` (``report``, indented, non-JSON values as ``str``) and, when given,
    ``stem.md`` (``markdown``), each written atomically under the module's rule. -> the paths."""
    paths = [write_text(stem + ".json", json.dumps(report, indent=1, default=str) + "\n", overwrite=overwrite)]
    if markdown is not None:
        paths.append(write_text(stem + ".md", markdown if markdown.endswith("\n") else markdown + "\n",
                                overwrite=overwrite))
    return paths
