"""The GPU report: everything this project wants to know from its first GPU, in one command.

    python -m benchmarks.gpu_report --out gpu-report        # a CUDA machine; under 9 minutes
    make gpu-report                                          # the same, into gpu-report/
    python -m benchmarks.gpu_report --dry-run --out /tmp/r   # CPU: the plumbing on tiny shapes (CI)

On a bare GPU machine with torch, triton, transformers and pytest (``pip install --no-deps
--no-build-isolation -e .``, no network needed), it runs these parts in order, the decisive rows
first, each in its own process with its own time limit, and writes ``<part>.json`` and
``<part>.md`` under ``--out`` as soon as the part ends, then ``report.json`` / ``report.md`` (every
part's status, time, files and, for a part that failed, the tail of its log; logs in ``logs/``).
A part that fails or runs out of time is recorded and the report goes on; the e2e parts also
save after every row.

| part | what (GPU run) | time limit |
|---|---|---|
| environment | GPU, driver, versions, commit, TF32 policy | 30 s |
| e2e-smoke | ``maskformer bench``: Swin-L (640x853) then Swin-T (512x683), random weights, bf16, batch 1: transformers eager, maskformer fast, fast + CUDA graphs (and the fp32 reference row the benchmark loads for agreement); each row beside the cost model's prediction (``benchmarks/results/gpu-model.json``) and the ratio measured / predicted; 60 s per row | 200 s |
| kernel_tests | ``pytest tests/kernels`` with ``TRITON_INTERPRET=0``: every kernel test compiled on CUDA | 120 s |
| e2e | the same models in fp32, batch 1: maskformer reference, transformers eager, maskformer fast, fast + CUDA graphs (the reference rows give the agreement); beside the predictions | 120 s |
| window_attention | ``bench_window_attention.py``: Triton vs SDPA with the bias materialised vs transformers-style eager, Swin-L stages at 640x640, bf16/fp16/fp32, shifts 0 and 6, batch 1; verified first | 90 s |
| postprocess | ``bench_postprocess``: semantic post-processing vs transformers, 150 classes, 100 queries, 160x213 -> 640x853, batch 2 | 60 s |
| e2e-mask2former | Mask2Former Swin-T (``m2f-tiny``): transformers eager, maskformer fast (Triton MSDA and window attention), fp32 and bf16 | 90 s |
| e2e-throughput | Swin-T and Swin-L at batch 8, fp32 and bf16 | what is left |
| e2e-compile | transformers + ``torch.compile``, bf16, batch 1; 240 s per row | what is left |

The whole run stops starting parts at ``--budget`` seconds (default 510, under 9 minutes with
process start-up): a part's limit is the smaller of its own and what is left, and a part with
less than 20 s left is listed as not run. Exit status 0 when every part succeeded, 1 otherwise
(the files are written either way).

Every part runs with its working directory in a fresh temporary folder outside the checkout, its
paths absolute and the checkout on ``PYTHONPATH`` (for ``benchmarks``; an installed maskformer
is the same code): nothing in the directory a part starts in can shadow a package it imports.
The GPU paths use only APIs of torch >= 2.4 and triton >= 3.0 (``torch.library.custom_op``,
``tl.dot(..., input_precision=)``, ``F.scaled_dot_product_attention(scale=)``): the last lent
machine had torch 2.11 and triton 3.6.

``--dry-run`` runs every part that does not need CUDA, on the CPU and on tiny shapes, and writes
the same files, marked as a dry run (``"dry_run": true`` in every JSON, a banner in every
Markdown file); its times mean nothing, and its limits and default budget are ``DRY_LIMIT_SCALE``
times the GPU run's (a loaded 2-core CI machine took 78-90 s of e2e-mask2former's 90 s). There
``kernel_tests`` runs a few kernel tests under ``TRITON_INTERPRET=1``, ``window_attention`` one
11x12 stage through the interpreter, ``postprocess`` a batch of 10 queries x 6 classes, and the e2e
parts the toy model without CUDA graphs (e2e-compile is not run: compiling takes minutes on a
CPU); no row has a prediction (no GPU). ``tests/test_gpu_report.py`` runs it in CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional

from maskformer import reporting

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_BUDGET_S = 510.0
MIN_PART_S = 20.0
# Dry runs: every part's limit and the default budget times this. The dry shapes are tiny, but a
# part's processes import torch and transformers, which on a loaded 2-core machine took most of a
# GPU-sized limit (e2e-mask2former: 78-90 s of 90 s in other engineers' runs).
DRY_LIMIT_SCALE = 4.0
# The cost model's predictions the e2e rows are printed beside (``make gpu-model``: its default set
# includes the e2e benchmark's input sizes).
PREDICTION_FILES = (os.path.join(ROOT, "benchmarks", "results", "gpu-model.json"),)
DRY_BANNER = "**DRY RUN (CPU, tiny shapes): checks the report's plumbing; no number here is a GPU measurement.**"


@dataclasses.dataclass
class Part:
    name: str
    what: str
    limit_s: float
    command: Callable[[str, bool], Optional[List[str]]]  # (out dir, dry run) -> argv, None = not run
    env: Callable[[bool], Dict[str, str]] = lambda dry: {}
    summarise: Optional[Callable[[str, str, bool], Dict]] = None  # (out dir, log path, dry) -> summary; writes md


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------


def _kernel_tests_cmd(out: str, dry: bool) -> List[str]:
    # --rootdir: the checkout's conftest files and settings, whatever the working directory
    cmd = _py("-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", ROOT, "--junitxml",
              os.path.join(out, "kernel_tests.xml"))
    if dry:  # a few interpreter tests of the Triton kernels: the junit/summary plumbing, not the kernels
        return cmd + _triton_kernel_test_files() + ["-k", "writes_every_element or dense_bias_table or opcheck"]
    return cmd + [os.path.join(ROOT, "tests", "kernels")]


def _triton_kernel_test_files() -> List[str]:
    """``tests/kernels/test_<op>.py`` of every registered op with a Triton implementation (the
    op registry, ``maskformer.kernels.registry``), where that file exists."""
    from maskformer.kernels import registry

    files = [os.path.join(ROOT, "tests", "kernels", f"test_{op.name}.py") for op in registry.ops() if op.impl("triton")]
    return [f for f in files if os.path.isfile(f)]


def _summarise_kernel_tests(out: str, log: str, dry: bool) -> Dict:
    """Counts and failures from the junit XML, or from the -v log when pytest was cut short."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    xml = os.path.join(out, "kernel_tests.xml")
    source = "junit"
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                counts["failed" if problem.tag == "failure" else "errors"] += 1
                failures.append(dict(test=name, message=(problem.get("message") or "").strip()[:500]))
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    else:  # timed out before pytest wrote the XML: the -v lines say what finished
        source = "log (pytest did not finish)"
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        for test, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M):
            counts[{"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}[outcome]] += 1
            if outcome in ("FAILED", "ERROR"):
                failures.append(dict(test=test, message=""))
    summary = dict(part="kernel_tests", source=source, **counts, failures=failures, dry_run=dry)
    lines = ["# Kernel tests compiled on CUDA" if not dry else "# Kernel tests (dry run: interpreter subset)", "",
             f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped (from the {source})", ""]
    lines += [f"- FAILED `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}" for f in failures]
    _write(out, "kernel_tests", summary, lines, dry)
    return summary


def _window_attention_cmd(out: str, dry: bool) -> List[str]:
    cmd = _py(os.path.join(ROOT, "benchmarks", "bench_window_attention.py"), "--out", os.path.join(out, "window_attention.json"), "--overwrite")
    if dry:
        return cmd + ["--dry-run", "--dtypes", "bf16", "--shifts", "6"]
    return cmd + ["--dtypes", "bf16,fp16,fp32", "--shifts", "0,6"]


def _summarise_window_attention(out: str, log: str, dry: bool) -> Dict:
    path = os.path.join(out, "window_attention.json")
    record = json.load(open(path))
    env = record.get("environment", {})
    lines = ["# Window attention: Triton vs SDPA (bias materialised) vs eager", "",
             f"device {env.get('device_name')}, torch {env.get('versions', {}).get('torch')}, triton "
             f"{env.get('versions', {}).get('triton')}, commit {reporting.commit_text(env)}; verified: "
             f"{record.get('verified')}", ""]
    bad = [v for v in record.get("verification", []) if not all(x.get("ok", True) for x in v.values() if isinstance(x, dict))]
    lines += [f"- MISMATCH: {v['stage']} {v['dtype']} shift {v['shift']}" for v in bad]
    lines += ["", "| stage | dtype | shift | impl | ms (median) | p20-p80 | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in record.get("results", []):
        spread = f"{r['ms_p20']:.4f}-{r['ms_p80']:.4f}" if "ms_p20" in r else "-"
        lines.append(f"| {r['stage']} {r['H']}x{r['W']}x{r['C']} | {r['dtype']} | {r['shift']} | {r['impl']} | "
                     f"{r['ms']:.4f} | {spread} | {r['tflops']:.2f} |")
    _mark_json(path, dry)
    summary = dict(part="window_attention", verified=record.get("verified"), rows=len(record.get("results", [])),
                   mismatches=len(bad), dry_run=dry)
    _write(out, "window_attention_summary", summary, lines, dry, md_name="window_attention.md")
    return summary


def _postprocess_cmd(out: str, dry: bool) -> List[str]:
    stem = os.path.join(out, "postprocess")
    if dry:
        return _py("-m", "benchmarks.bench_postprocess", "--device", "cpu", "--dry-run", "--out", stem, "--overwrite")
    return _py("-m", "benchmarks.bench_postprocess", "--device", "cuda", "--iters", "10", "--out", stem, "--overwrite")


def _summarise_postprocess(out: str, log: str, dry: bool) -> Dict:
    path = os.path.join(out, "postprocess.json")
    report = json.load(open(path))
    _mark_json(path, dry)
    _mark_md(os.path.join(out, "postprocess.md"), dry)
    return dict(part="postprocess", rows={r["name"]: round(r["median_ms"], 3) for r in report["rows"]},
                verification=report.get("verification"), dry_run=dry)


def _e2e_cmd(name: str, batches: str, impls: str, dtypes: str, row_timeout: int = 100, models: str = "tiny,large",
             dry_models: str = "toy"):
    def cmd(out: str, dry: bool) -> Optional[List[str]]:
        common = ["--out", out, "--name", name, "--batches", batches, "--overwrite"]
        if dry:
            if "transformers-compile" in impls:
                return None  # minutes of compilation per row on a CPU
            impls_dry = ",".join(i for i in impls.split(",") if i != "maskformer-fast-cudagraph")
            return _py("-m", "maskformer.bench", *common, "--models", dry_models, "--dtypes", "float32", "--device", "cpu",
                       "--impls", impls_dry, "--warmup", "0", "--repeats", "1", "--row-timeout", "120")
        return _py("-m", "maskformer.bench", *common, "--models", models, "--dtypes", dtypes, "--device", "cuda",
                   "--impls", impls, "--warmup", "2", "--repeats", "5", "--row-timeout", str(row_timeout))
    return cmd


def gpu_key(name: Optional[str]) -> Optional[str]:
    """The cost model's device key ("h100", "h200") of a CUDA device name, None for any other."""
    for key in ("h100", "h200"):
        if name and key in name.lower():
            return key
    return None


_DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16"}


def load_predictions(files=PREDICTION_FILES) -> List[Dict]:
    """The cost model's rows (``benchmarks/gpu_model.py`` JSON ``rows``) of every file that exists."""
    rows = []
    for path in files:
        if os.path.exists(path):
            rows += json.load(open(path)).get("rows", [])
    return rows


def compare_with_predictions(rows: List[Dict], device: Optional[str], predictions: List[Dict]) -> List[Dict]:
    """Each measured e2e row (``maskformer.bench`` JSON rows: model, impl, dtype, batch, input,
    latency_ms per batch) beside the cost model's prediction for the same model, input size, batch
    and dtype on ``device`` ("h100"/"h200"; None: no prediction): transformers eager and maskformer
    fast against ``predicted_ms_eager``, maskformer fast + CUDA graphs against
    ``predicted_ms_graphs``. -> one dict per row: the row's keys, measured_ms, predicted_ms and
    ratio (measured / predicted), None where there is no prediction."""
    out = []
    for r in rows:
        if "error" in r:
            continue
        impl, column = r["impl"], "predicted_ms_eager"
        if impl == "maskformer-fast-cudagraph":
            impl, column = "maskformer-fast", "predicted_ms_graphs"
        match = [p for p in predictions if device is not None and p.get("device") == device
                 and p.get("model") == r["model"] and p.get("impl") == impl and p.get("batch") == r["batch"]
                 and p.get("dtype") == _DTYPE_KEYS.get(r["dtype"]) and list(p.get("input", [])) == list(r.get("input", []))]
        predicted = match[0][column] if match else None
        out.append(dict(model=r["model"], impl=r["impl"], dtype=r["dtype"], batch=r["batch"], input=r.get("input"),
                        device=device, measured_ms=r["latency_ms"], predicted_ms=predicted,
                        ratio=round(r["latency_ms"] / predicted, 3) if predicted else None))
    return out


def _comparison_lines(compared: List[Dict]) -> List[str]:
    lines = ["## Measured beside the cost model", "",
             "Predictions: `python -m benchmarks.gpu_model` (`benchmarks/results/gpu-model.json`), calibrated on "
             "the H200 transformers fp32 rows; ratio = measured / predicted (per batch, forward + post-processing).",
             "", "| model | input | impl | dtype | batch | measured ms | predicted ms | device | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in compared:
        size = "x".join(map(str, c["input"])) if c["input"] else "-"
        predicted = f"{c['predicted_ms']:.3f}" if c["predicted_ms"] is not None else "-"
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        lines.append(f"| {c['model']} | {size} | {c['impl']} | {c['dtype']} | {c['batch']} | {c['measured_ms']:.2f} | "
                     f"{predicted} | {c['device'] or '-'} | {ratio} |")
    return lines


def _summarise_e2e(name: str):
    def summarise(out: str, log: str, dry: bool) -> Dict:
        path = os.path.join(out, f"{name}.json")
        report = json.load(open(path))
        _mark_json(path, dry)
        md = os.path.join(out, f"{name}.md")
        env_path = os.path.join(out, "environment.json")
        env = json.load(open(env_path)) if os.path.exists(env_path) else {}
        rows = report["rows"]
        compared = compare_with_predictions(rows, gpu_key(env.get("gpu")), load_predictions())
        if os.path.exists(md):  # the rows beside the predictions, after the benchmark's own tables
            reporting.write_text(md, open(md).read().rstrip("\n") + "\n\n" + "\n".join(_comparison_lines(compared)) + "\n")
        _mark_md(md, dry)
        return dict(part=name, rows=len(rows), failed=[f"{r['model']} {r['impl']} {r['dtype']} b{r['batch']}: {r['error']}"
                                                     for r in rows if "error" in r],
                    speedups=report.get("speedups"), predictions=compared, dry_run=dry)
    return summarise


def _interpreter_env(dry: bool) -> Dict[str, str]:
    return {"TRITON_INTERPRET": "1" if dry else "0"}


E2E_IMPLS = "maskformer-reference,transformers-eager,maskformer-fast,maskformer-fast-cudagraph"
SMOKE_IMPLS = "transformers-eager,maskformer-fast,maskformer-fast-cudagraph"
PARTS = [
    Part("e2e-smoke", "the decisive rows: Swin-T and Swin-L, batch 1, bf16, fast with and without CUDA graphs vs "
         "transformers eager, beside the cost model", 200,
         # Swin-L first: the target row. maskformer.bench also loads an fp32 reference row per
         # model (agreement), so a model is 4 row loads; the H200 run's e2e rows loaded in ~10-20 s each.
         _e2e_cmd("e2e-smoke", "1", SMOKE_IMPLS, "bfloat16", row_timeout=60, models="large,tiny"),
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_e2e("e2e-smoke")),
    # 69 s on the H200 (run2 of gpu-report-2026-11-26-h200), before the fused ops' tests were added
    Part("kernel_tests", "every kernel test compiled on CUDA (TRITON_INTERPRET=0)", 120, _kernel_tests_cmd,
         _interpreter_env, _summarise_kernel_tests),
    Part("e2e", "end to end, batch 1, fp32 (with the reference rows: agreement)", 120,
         _e2e_cmd("e2e", "1", E2E_IMPLS, "float32"),
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_e2e("e2e")),
    Part("window_attention", "Triton vs SDPA vs eager at Swin-L stage shapes", 90, _window_attention_cmd,
         _interpreter_env, _summarise_window_attention),
    Part("postprocess", "semantic post-processing vs transformers", 60, _postprocess_cmd,
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_postprocess),
    Part("e2e-mask2former", "Mask2Former Swin-T end to end, batch 1 (MSDA and window-attention kernels)", 90,
         _e2e_cmd("e2e-mask2former", "1", "maskformer-reference,transformers-eager,maskformer-fast", "float32,bfloat16",
                  models="m2f-tiny", dry_models="m2f-toy"),
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_e2e("e2e-mask2former")),
    Part("e2e-throughput", "end to end, batch 8", 10**6, _e2e_cmd("e2e-throughput", "8", E2E_IMPLS, "float32,bfloat16"),
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_e2e("e2e-throughput")),
    Part("e2e-compile", "transformers + torch.compile, bf16, batch 1", 10**6,
         _e2e_cmd("e2e-compile", "1", "transformers-compile", "bfloat16", row_timeout=240),
         lambda dry: {"TRITON_INTERPRET": "0"}, _summarise_e2e("e2e-compile")),
]


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _write(out: str, name: str, data: Dict, md_lines: List[str], dry: bool, md_name: Optional[str] = None) -> None:
    data = dict(data, dry_run=dry)
    reporting.write_text(os.path.join(out, f"{name}.json"), json.dumps(data, indent=1, default=str) + "\n")
    reporting.write_text(os.path.join(out, md_name or f"{name}.md"), "\n".join(([DRY_BANNER, ""] if dry else []) + md_lines) + "\n")


# The parts' own files are rewritten in place (marked as a dry run): they lie in the report's
# folder, which main() claimed (maskformer.reporting.claim_folder).
def _mark_json(path: str, dry: bool) -> None:
    if dry and os.path.exists(path):
        data = json.load(open(path))
        data["dry_run"] = True
        reporting.write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _mark_md(path: str, dry: bool) -> None:
    if dry and os.path.exists(path):
        text = open(path).read()
        if DRY_BANNER not in text:
            reporting.write_text(path, DRY_BANNER + "\n\n" + text)


def environment(dry: bool) -> Dict:
    """``maskformer.reporting.environment`` of the GPU (the CPU in a dry run) with the GPU's
    details, the TF32 policy and whether the C++ extension loads."""
    import torch

    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            return f"unavailable ({type(exc).__name__})"

    env = reporting.environment("cuda" if torch.cuda.is_available() else "cpu")
    env["dry_run"] = dry
    env["cuda_available"] = torch.cuda.is_available()
    try:
        from maskformer import _ext

        env["tf32_matmul_allowed"] = _ext.tf32_matmul_allowed()
        env["cpp_extension"] = _ext.cpp_import_error() or "available"
    except Exception as exc:
        env["maskformer"] = f"import failed: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"sm_{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count(),
                   nvidia_smi=run("nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"))
    return env


def write_report(out: str, state: Dict) -> None:
    reporting.write_text(os.path.join(out, "report.json"), json.dumps(state, indent=1, default=str) + "\n")
    env = state["environment"]
    versions = env.get("versions", {})
    lines = ([DRY_BANNER, ""] if state["dry_run"] else []) + [
        "# GPU report" + (" (dry run)" if state["dry_run"] else ""), "",
        f"{env.get('gpu', 'no GPU')} ({env.get('capability', '-')}), torch {versions.get('torch')} (CUDA "
        f"{env.get('cuda')}), triton {versions.get('triton')}, transformers {versions.get('transformers')}, commit "
        f"{reporting.commit_text(env)}, {env.get('date')}; budget {state['budget_s']:.0f} s, "
        f"{state['elapsed_s']:.0f} s used.", "",
        "| part | status | seconds | limit s | files |", "|---|---|---|---|---|"]
    for p in state["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {p.get('limit_s', 0):.0f} | "
                     + ", ".join(p.get("files", [])) + " |")
    for p in state["parts"]:
        if p["status"] not in ("ok",):
            lines += ["", f"## {p['name']}: {p['status']}", ""]
            if p.get("reason"):
                lines.append(p["reason"])
            if p.get("log_tail"):
                lines += ["```", p["log_tail"], "```"]
    for p in state["parts"]:
        md = os.path.join(out, f"{p['name']}.md")
        if p["status"] == "ok" and os.path.exists(md):
            body = open(md).read().replace(DRY_BANNER, "").strip()
            lines += ["", "---", "", re.sub(r"^# ", f"## {p['name']}: ", body, count=1)]
    reporting.write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_part(part: Part, out: str, dry: bool, limit_s: float) -> Dict:
    """Run one part's process with a time limit (its whole process group is killed at the limit);
    -> its entry for report.json. Never raises."""
    entry = dict(name=part.name, what=part.what, limit_s=round(limit_s, 1))
    log = os.path.join(out, "logs", f"{part.name}.log")
    before = set(os.listdir(out))
    try:
        cmd = part.command(out, dry)
    except Exception as exc:
        return dict(entry, status="failed", reason=f"could not build its command: {exc!r}")
    if cmd is None:
        return dict(entry, status="not run", reason="not part of the dry run (needs CUDA or takes minutes on a CPU)")
    entry["command"] = " ".join(cmd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **part.env(dry))
    env.pop("MASKFORMER_BACKEND", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # A fresh, empty working directory outside the checkout: nothing in it can shadow an import
    # (Python puts the working directory first on sys.path for -m and -c).
    cwd = tempfile.mkdtemp(prefix=f"gpu-report-{part.name}-")
    entry["cwd"] = cwd
    t0 = time.monotonic()
    status, reason = "ok", None
    try:
        with open(log, "w") as f:
            f.write(f"$ cd {cwd} && {entry['command']}\n")
            f.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as exc:
                return dict(entry, status="failed", reason=f"could not start: {exc}")
            try:
                rc = proc.wait(timeout=limit_s)
                if rc != 0:
                    status, reason = "failed", f"exit status {rc}"
            except subprocess.TimeoutExpired:
                status, reason = "timed out", f"killed after {limit_s:.0f} s"
                _kill_group(proc)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    entry["seconds"] = round(time.monotonic() - t0, 1)
    if part.summarise is not None:
        try:
            entry["summary"] = part.summarise(out, log, dry)
        except Exception as exc:  # e.g. the part died before writing its file
            if status == "ok":
                status, reason = "failed", f"its results could not be read: {type(exc).__name__}: {exc}"
            entry["summary_error"] = f"{type(exc).__name__}: {exc}"
        if status == "ok" and part.name == "kernel_tests" and (entry["summary"]["failed"] or entry["summary"]["errors"]):
            status, reason = "failed", f"{entry['summary']['failed']} tests failed, {entry['summary']['errors']} errors"
    entry.update(status=status, log=os.path.relpath(log, out))
    if reason:
        entry["reason"] = reason
    if status != "ok":
        text = open(log, errors="replace").read()
        entry["log_tail"] = "\n".join(text.strip().splitlines()[-25:])
    entry["files"] = sorted(set(os.listdir(out)) - before - {"logs"})
    return entry


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True,
                        help="folder for the report (created; a folder that holds files is refused unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write over the files of an earlier report in --out")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: test the plumbing")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds after which no part starts (default {DEFAULT_BUDGET_S:.0f}; "
                        f"{DRY_LIMIT_SCALE:g}x that in a dry run)")
    parser.add_argument("--parts", default=None, help="comma list, a subset of: " + ", ".join(p.name for p in PARTS))
    args = parser.parse_args(argv)
    scale = DRY_LIMIT_SCALE if args.dry_run else 1.0
    if args.budget is None:
        args.budget = DEFAULT_BUDGET_S * scale
    wanted = [p.strip() for p in args.parts.split(",")] if args.parts else [p.name for p in PARTS]
    unknown = [w for w in wanted if w not in {p.name for p in PARTS}]
    if unknown:
        parser.error(f"unknown parts {unknown}")
    try:  # the report's folder is this run's: its parts write into it with --overwrite
        out = reporting.claim_folder(args.out, overwrite=args.overwrite)
    except reporting.ResultsExistError as exc:
        print(f"gpu_report: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    started = time.monotonic()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU (the GPU parts need CUDA)", file=sys.stderr)
        return 2
    try:  # every part needs the package and its kernels: fail in a second, not after 8 minutes
        from maskformer.kernels import registry

        registry.ops()  # imports every registered op module
    except ImportError as exc:
        print(f"cannot import maskformer's kernels ({exc}): install the checkout first with "
              "`pip install --no-deps --no-build-isolation -e .` (MASKFORMER_BUILD_CPP=0 skips the C++ build), "
              "or run from the checkout's root", file=sys.stderr)
        return 2
    state = dict(dry_run=args.dry_run, budget_s=args.budget, elapsed_s=0.0, parts=[])
    t0 = time.monotonic()
    try:
        state["environment"] = environment(args.dry_run)
        env_entry = dict(name="environment", what="GPU, driver, versions, commit", status="ok",
                         seconds=round(time.monotonic() - t0, 1), limit_s=30, files=["environment.json", "environment.md"])
    except Exception as exc:
        state["environment"] = dict(error=repr(exc), torch="?", torch_cuda="?", triton="?", transformers="?",
                                    commit="?", dirty=False, date="?")
        env_entry = dict(name="environment", status="failed", reason=repr(exc), seconds=0, limit_s=30, files=[])
    _write(out, "environment", state["environment"],
           ["# Environment", ""] + [f"- {k}: {v}" for k, v in state["environment"].items()], args.dry_run)
    state["parts"].append(env_entry)
    write_report(out, state)
    for part in PARTS:
        if part.name not in wanted:
            continue
        left = args.budget - (time.monotonic() - started)
        if left < MIN_PART_S:
            entry = dict(name=part.name, what=part.what, status="not run",
                         reason=f"the {args.budget:.0f} s budget was spent ({left:.0f} s left)")
        else:
            limit = min(part.limit_s * scale, left)
            print(f"[gpu_report] {part.name}: {part.what} (limit {limit:.0f} s)", flush=True)
            if part.name.startswith("e2e"):
                # the benchmark stops starting rows itself, leaving time to write its files
                part = dataclasses.replace(part, command=_with_max_seconds(part.command, limit - 15))
            entry = run_part(part, out, args.dry_run, limit)
            print(f"[gpu_report] {part.name}: {entry['status']} in {entry.get('seconds', 0):.0f} s"
                  + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
            for c in (entry.get("summary") or {}).get("predictions") or []:
                predicted = (f"predicted {c['predicted_ms']:.2f} ms ({c['device']}), ratio {c['ratio']:.2f}"
                             if c["predicted_ms"] is not None else "no prediction")
                print(f"[gpu_report]   {c['model']} {c['impl']} {c['dtype']} b{c['batch']}: measured "
                      f"{c['measured_ms']:.2f} ms, {predicted}", flush=True)
        state["parts"].append(entry)
        state["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(out, state)
    state["elapsed_s"] = round(time.monotonic() - started, 1)
    write_report(out, state)
    print(f"[gpu_report] wrote {os.path.join(out, 'report.md')} ({state['elapsed_s']:.0f} s)")
    return 0 if all(p["status"] in ("ok", "not run" if args.dry_run else "ok") for p in state["parts"]) else 1


def _with_max_seconds(command, seconds: float):
    def wrapped(out: str, dry: bool):
        cmd = command(out, dry)
        return None if cmd is None else cmd + ["--max-seconds", f"{max(1.0, seconds):.0f}"]
    return wrapped


if __name__ == "__main__":
    sys.exit(main())
