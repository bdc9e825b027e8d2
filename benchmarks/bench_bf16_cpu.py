"""bf16 on a CPU with native bf16: our torch forward before and after the bf16 CPU fast path,
against OpenVINO's bf16 forward on our own ONNX export.

    python -m benchmarks.bench_bf16_cpu [--threads 1,2] [--rounds 7] [--images 4] [--name NAME]

Model: the MaskFormer Swin-T ADE architecture (150 labels, 100 queries) with the benchmark's lively
random weights (``maskformer.bench.make_checkpoint("tiny")``), 512x683, batch 1, synthetic images
(``maskformer.bench.synthetic_pixel_values``). Rows:

- ``torch-bf16-reference``: ``from_pretrained(ckpt, dtype=torch.bfloat16)`` with the fast path
  switched off (``maskformer.precision.set_fast_cpu_bf16(False)``): the bf16 path before it;
- ``torch-bf16-fast``: the same model with it on (the default);
- ``openvino-bf16``: our export (``maskformer.export.export_onnx``, the file our OpenVINO engine
  runs) compiled with ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO's default on such a CPU), a
  static input shape, the latency hint and the same threads.

Steps, in this order (verify, then time):
1. **Agreement**: each route's semantic maps (our post-processing) against fp32 transformers' maps
   (transformers' model and post-processing) on ``--images`` images; the same for the trained
   default model (well conditioned) on generated images of its domain.
2. **Profile** (1 thread, one process): per aten op, the thread CPU time of one forward of each
   torch row (a TorchDispatchMode timer: thread CPU time is what a loaded machine leaves least
   disturbed), grouped by kind; OpenVINO's own per-node counters (``PERF_COUNT``), by node type.
3. **Ablation** (1 thread): the reference and fast rows, and the fast path with one of its changes
   undone (``ABLATIONS``), timed as in 4, all in processes that keep freed memory (``KEPT_MEMORY``),
   so that page-fault counts, which differ from process to process, do not decide the comparison.
4. **Timing**: every row in its own process, loaded and warmed up, then timed interleaved round
   by round (the order rotating), for each thread count; per forward the wall time, the process
   CPU time and the page faults; per round the 1-minute load; paired per-round ratios. The torch
   rows also run keeping freed memory (``KEPT_MEMORY``) and, with 2+ threads, with passive OpenMP
   threads (``OMP_PASSIVE``): on a loaded machine either decides more than any kernel.

Results: ``benchmarks/results/bf16-cpu-<name>.json`` and ``.md``, with the CPU model and flags,
threads, load averages, versions, commit and the malloc settings of the environment (glibc's
trimming of freed memory decides how many page faults a torch forward takes; see the report).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HEIGHT, WIDTH = 512, 683
ROWS = ("torch-bf16-reference", "torch-bf16-fast", "openvino-bf16")
AGREE_BAR = 0.995  # issue 22: bf16 maps vs fp32 transformers' maps, lively weights

# Each ablation row is the fast path with one of its changes undone
# (maskformer.swin.SwinLayer.forward_fast_cpu_bf16), by patching a module attribute in its process.
ABLATIONS = {
    "torch-bf16-fast-unfused-linear": "GEMMs through F.linear (aten::addmm) and GELU as its own op, instead of "
                                      "oneDNN's linear with the bias and GELU in its epilogue",
    "torch-bf16-fast-whole-attention": "attention over the whole map at once instead of chunks of 192 (window, head) rows",
}


def apply_ablation(row: str) -> None:
    from maskformer import swin

    if row == "torch-bf16-fast-unfused-linear":
        def unfused_linear(x, weight, bias, epilogue=None, residual=None):
            out = torch.nn.functional.linear(x, weight, bias)  # onednn_epilogue returns None below
            return out if residual is None else out.add_(residual)

        swin.fused_linear, swin.onednn_epilogue = unfused_linear, lambda act: None
    elif row == "torch-bf16-fast-whole-attention":
        swin._FAST_ATTENTION_ROWS = 1 << 30
    elif row in ABLATIONS:
        raise AssertionError(row)


# ---------------------------------------------------------------------------------------------
# environment
def environment(threads: List[int]) -> Dict:
    from maskformer import precision
    from maskformer._ext import cpu_flags, cpu_model
    from maskformer import reporting

    flags = cpu_flags(("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8"))
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "flags": flags, "threads": threads,
        "native_precisions": precision.native_precisions(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": reporting.versions(), "commit": reporting.git_commit(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "model": "MaskFormer Swin-T ADE architecture (150 labels, 100 queries), lively random weights",
        "input": f"1x3x{HEIGHT}x{WIDTH}",
    }


def _load():
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------
# the rows
def _openvino_forward(onnx_path: str, threads: int, precision_hint: str, perf_count: bool = False):
    """OpenVINO's plain API on our export: (B, 3, H, W) fp32 -> (class logits, mask logits, request)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(onnx_path)
    model.reshape({model.inputs[0].get_any_name(): [1, 3, HEIGHT, WIDTH]})
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": precision_hint}
    if perf_count:
        config["PERF_COUNT"] = True
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    class_out, mask_out = compiled.output("class_queries_logits"), compiled.output("masks_queries_logits")

    def forward(x: torch.Tensor):
        result = request.infer({0: x.numpy()})
        return torch.from_numpy(result[class_out].copy()), torch.from_numpy(result[mask_out].copy())

    forward.request = request
    return forward


def make_row(row: str, checkpoint: str, onnx_path: str, threads: int):
    """-> forward(pixel_values fp32) -> (class logits, mask logits), loaded and ready."""
    torch.set_num_threads(threads)  # our post-processing's threads too
    if row.startswith("openvino"):
        return _openvino_forward(onnx_path, threads, row.split("-")[1])
    from maskformer import MaskFormerForInstanceSegmentation, precision

    torch.set_num_threads(threads)
    model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    precision.set_fast_cpu_bf16(row.startswith("torch-bf16-fast"))
    apply_ablation(row)

    def forward(x: torch.Tensor):
        with torch.inference_mode():
            out = model(x)
        return out.class_queries_logits, out.masks_queries_logits

    return forward


def post_process(class_logits, mask_logits):
    from maskformer import MaskFormerImageProcessor
    from maskformer.outputs import MaskFormerForInstanceSegmentationOutput

    out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    return MaskFormerImageProcessor().post_process_semantic_segmentation(out, target_sizes=[(HEIGHT, WIDTH)])[0]


def worker(spec: Dict) -> int:
    """One timed row in its own process: load, warm up, say READY; then RUN (one forward and our
    post-processing, timed) until EXIT, one line each on stdin."""
    from maskformer.bench import synthetic_pixel_values

    forward = make_row(spec["row"].split("@")[0], spec["checkpoint"], spec["onnx"], spec["threads"])
    x = synthetic_pixel_values(1, HEIGHT, WIDTH)
    for _ in range(2):
        post_process(*forward(x))
    print("BENCH " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "RUN":
            break
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.process_time(), time.perf_counter()
        logits = forward(x)
        forward_wall, forward_cpu = time.perf_counter() - wall, time.process_time() - cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        wall = time.perf_counter()
        post_process(*logits)
        post = time.perf_counter() - wall
        print("BENCH " + json.dumps({"forward_ms": forward_wall * 1e3, "forward_cpu_ms": forward_cpu * 1e3,
                                     "faults": faults, "post_ms": post * 1e3}), flush=True)
    return 0


# A row named "<row>@kept-memory" runs in a process whose glibc keeps freed memory instead of returning
# it to the system: no page faults per forward once warm (OpenVINO plans its buffers once; a torch
# forward allocates its activations afresh, and glibc's trimming turns them into 10-50 thousand
# page faults per Swin-T forward, a number that depends on the process's allocation history).
KEPT_MEMORY = {"MALLOC_TRIM_THRESHOLD_": str(1 << 34), "MALLOC_MMAP_THRESHOLD_": str(1 << 34)}
# "@omp-passive": OpenMP threads sleep at once when idle instead of spinning (GNU OpenMP spins first
# by default), which decides how a torch forward with 2 threads fares on a loaded 2-core machine.
OMP_PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
ENVIRONMENTS = {"kept-memory": KEPT_MEMORY, "omp-passive": OMP_PASSIVE}


class Worker:
    def __init__(self, spec: Dict, log_path: str):
        self.log = open(log_path, "w")
        env = dict(os.environ)
        for tag in spec["row"].split("@")[1:]:
            env.update(ENVIRONMENTS[tag])
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_bf16_cpu", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO,
                                     env=env)

    def ask(self, command: Optional[str] = None) -> Dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        self.proc.wait()
        raise RuntimeError(f"worker exited ({self.proc.returncode}); see {self.log.name}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("EXIT\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


def time_rows(rows, checkpoint: str, onnx_path: str, threads: int, rounds: int, tmp: str) -> Dict:
    """Each row in its own process, interleaved round by round (order rotating)."""
    workers = {r: Worker({"row": r, "checkpoint": checkpoint, "onnx": onnx_path, "threads": threads},
                         os.path.join(tmp, f"{r}-{threads}.log")) for r in rows}
    try:
        for w in workers.values():
            w.ask()  # READY
        times = {r: [] for r in rows}
        loads = []
        names = list(rows)
        for i in range(rounds):
            for r in names[i % len(names):] + names[: i % len(names)]:
                times[r].append(workers[r].ask("RUN"))
            loads.append(_load())
    finally:
        for w in workers.values():
            w.close()
    out = {"threads": threads, "rounds": rounds, "loads": loads, "rows": {}}
    for r, ts in times.items():
        out["rows"][r] = {k: round(statistics.median(t[k] for t in ts), 1) for k in ts[0]}
        out["rows"][r]["forward_ms_all"] = [round(t["forward_ms"], 1) for t in ts]
    pairs = [(r, "torch-bf16-fast") for r in rows if "@" not in r and r != "torch-bf16-fast"]
    for tag in ENVIRONMENTS:
        pairs += [(f"torch-bf16-reference@{tag}", f"torch-bf16-fast@{tag}"), ("openvino-bf16", f"torch-bf16-fast@{tag}")]
    pairs.append(("torch-bf16-reference", "openvino-bf16"))
    for r in rows:
        if r.startswith("torch-bf16-fast-") and r.endswith("@kept-memory"):
            pairs.append((r, "torch-bf16-fast@kept-memory"))
    out["paired"] = []
    for a, b in pairs:
        if a in times and b in times:
            for metric in ("forward_ms", "forward_cpu_ms"):
                ratios = [ta[metric] / tb[metric] for ta, tb in zip(times[a], times[b])]
                out["paired"].append({"slower": a, "faster": b, "metric": metric,
                                      "median": round(statistics.median(ratios), 3),
                                      "min": round(min(ratios), 3), "max": round(max(ratios), 3)})
    return out


# ---------------------------------------------------------------------------------------------
# 1. agreement
def agreement(checkpoint: str, onnx_path: str, images: int) -> Dict:
    from transformers import MaskFormerForInstanceSegmentation as HF
    from transformers import MaskFormerImageProcessor as HFProcessor

    from maskformer.bench import synthetic_pixel_values

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    x = synthetic_pixel_values(images, HEIGHT, WIDTH)
    hf = HF.from_pretrained(checkpoint).eval()
    processor = HFProcessor()
    ref = []
    with torch.inference_mode():
        for i in range(images):
            out = hf(pixel_values=x[i : i + 1])
            ref.append(processor.post_process_semantic_segmentation(out, target_sizes=[(HEIGHT, WIDTH)])[0])
    del hf
    result = {"images": images, "reference": "fp32 transformers (model and post-processing)",
              "labels_per_reference_map": [int(r.unique().numel()) for r in ref], "rows": {}}
    for row in ROWS:
        forward = make_row(row, checkpoint, onnx_path, torch.get_num_threads())
        per_image = [float((post_process(*forward(x[i : i + 1])) == ref[i]).double().mean()) for i in range(images)]
        result["rows"][row] = {"per_image": [round(a, 5) for a in per_image], "mean": round(float(np.mean(per_image)), 5),
                               "min": round(min(per_image), 5)}
        del forward
    from maskformer import precision

    precision.set_fast_cpu_bf16(True)
    return result


def agreement_default_model(images: int) -> Dict:
    """The trained default model (4 classes) on generated images of its domain: bf16 reference path
    and fast path against its fp32 maps (ours; transformers' fp32 equals them, tests/test_parity_*)."""
    from maskformer import MaskFormerImageProcessor, precision
    from maskformer.loading import DEFAULT_MODEL_DIR, load_default_model
    from maskformer.synthetic import make_sample

    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    samples = [make_sample(4 * 10**7 + i, HEIGHT, WIDTH)[0] for i in range(images)]
    x = processor(images=samples, return_tensors="pt", do_resize=False)["pixel_values"]
    sizes = [(HEIGHT, WIDTH)] * images
    with torch.inference_mode():
        ref = processor.post_process_semantic_segmentation(load_default_model()(x), target_sizes=sizes)
        model = load_default_model(dtype=torch.bfloat16)
        out = {}
        for row, fast in (("torch-bf16-reference", False), ("torch-bf16-fast", True)):
            precision.set_fast_cpu_bf16(fast)
            maps = processor.post_process_semantic_segmentation(model(x), target_sizes=sizes)
            out[row] = round(float(np.mean([(m == r).double().mean() for m, r in zip(maps, ref)])), 5)
    precision.set_fast_cpu_bf16(True)
    return {"images": images, "reference": "fp32 (ours)", "rows": out}


# ---------------------------------------------------------------------------------------------
# 2. profile
OP_KINDS = [
    ("GEMM (linear)", ("linear", "_linear_pointwise", "addmm", "aten.mm")),
    ("convolution", ("conv2d", "_convolution_pointwise")),
    ("batched matmul (attention)", ("matmul", "bmm", "baddbmm")),
    ("mask einsum (heads)", ("einsum",)),
    ("softmax", ("softmax",)),
    ("LayerNorm / GroupNorm", ("layer_norm", "group_norm")),
    ("activation", ("gelu", "relu")),
    ("elementwise add/mul/div", ("aten.add", "aten.mul", "aten.div", "aten.sub")),
    ("copies, layout, dtype casts", ("reshape", "clone", "copy_", "contiguous", "cat", "pad", "roll", "index",
                                     "aten.to", "upsample", "new_zeros", "new_empty")),
]


def _kind(op: str) -> str:
    for kind, keys in OP_KINDS:
        if any(k in op for k in keys):
            return kind
    return "other"


def profile_torch(checkpoint: str) -> Dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    from maskformer import MaskFormerForInstanceSegmentation, precision
    from maskformer.bench import synthetic_pixel_values

    class Timer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ns = collections.Counter()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.thread_time_ns()
            out = func(*args, **(kwargs or {}))
            self.ns[str(func)] += time.thread_time_ns() - start
            self.calls[str(func)] += 1
            return out

    torch.set_num_threads(1)
    model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    x = synthetic_pixel_values(1, HEIGHT, WIDTH)
    result = {}
    with torch.inference_mode():
        for row, fast in (("torch-bf16-reference", False), ("torch-bf16-fast", True)):
            precision.set_fast_cpu_bf16(fast)
            model(x), model(x)
            start = time.thread_time()
            model(x)
            forward = time.thread_time() - start
            timer = Timer()
            with timer:
                model(x)
            kinds = collections.Counter()
            for op, ns in timer.ns.items():
                kinds[_kind(op)] += ns
            result[row] = {
                "forward_thread_cpu_ms": round(forward * 1e3, 1),
                "ops_thread_cpu_ms": round(sum(timer.ns.values()) / 1e6, 1),
                "by_kind_ms": {k: round(v / 1e6, 1) for k, v in kinds.most_common()},
                "top_ops": [{"op": op, "calls": timer.calls[op], "ms": round(ns / 1e6, 1)}
                            for op, ns in timer.ns.most_common(15)],
                "load": _load(),
            }
    precision.set_fast_cpu_bf16(True)
    return result


def profile_openvino(onnx_path: str) -> Dict:
    from maskformer.bench import synthetic_pixel_values

    forward = _openvino_forward(onnx_path, 1, "bf16", perf_count=True)
    x = synthetic_pixel_values(1, HEIGHT, WIDTH)
    forward(x), forward(x)
    cpu = time.process_time()
    forward(x)
    cpu = time.process_time() - cpu
    by_type, exec_types = collections.Counter(), collections.Counter()
    for p in forward.request.get_profiling_info():
        if p.status != p.Status.EXECUTED:
            continue
        ms = p.real_time.total_seconds() * 1e3
        by_type[p.node_type] += ms
        exec_types[f"{p.node_type} ({p.exec_type})"] += ms
    total = sum(by_type.values())
    return {"forward_process_cpu_ms": round(cpu * 1e3, 1), "nodes_real_ms": round(total, 1),
            "by_node_type_share": {k: round(v / total, 4) for k, v in by_type.most_common()},
            "by_exec_type_ms": {k: round(v, 1) for k, v in exec_types.most_common(12)},
            "load": _load(),
            "note": "node times are OpenVINO's PERF_COUNT real times (wall, disturbed by load); shares are what to compare"}


# ---------------------------------------------------------------------------------------------
def markdown(report: Dict) -> str:
    env = report["environment"]
    flags = ", ".join(k for k, v in env["flags"].items() if v)
    lines = [f"# bf16 on the CPU: our torch forward against OpenVINO bf16 on our export ({env['date']})", "",
             f"{env['cpu']} ({env['cores']} cores), flags {flags}; torch {env['versions'].get('torch')}, "
             f"openvino {env['versions'].get('openvino')}, commit {env['commit']}; {env['model']}, input {env['input']}; "
             f"malloc environment {env['malloc_env'] or 'default'}.", ""]
    if "agreement" in report:
        a = report["agreement"]
        lines += [f"## Agreement with fp32 transformers' maps ({a['images']} images; labels per reference map "
                  f"{a['labels_per_reference_map']}; bar {AGREE_BAR:.1%})", "",
                  "| row | mean | min | per image |", "|---|---|---|---|"]
        for row, v in a["rows"].items():
            lines.append(f"| {row} | {v['mean']:.3%} | {v['min']:.3%} | {', '.join(f'{p:.2%}' for p in v['per_image'])} |")
        if "agreement_default_model" in report:
            d = report["agreement_default_model"]
            lines += ["", f"Trained default model, {d['images']} generated images, against its fp32 maps: "
                      + ", ".join(f"{k} {v:.3%}" for k, v in d["rows"].items()) + "."]
        lines.append("")
    if "profile" in report:
        p = report["profile"]
        kinds = list(dict.fromkeys(k for r in p["torch"].values() for k in r["by_kind_ms"]))
        lines += ["## Profile: one forward, 1 thread, thread CPU time per op kind (ms)", "",
                  "| kind | " + " | ".join(p["torch"]) + " |", "|---|" + "---|" * len(p["torch"])]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(str(r["by_kind_ms"].get(k, 0.0)) for r in p["torch"].values()) + " |")
        lines.append("| **sum of ops** | " + " | ".join(str(r["ops_thread_cpu_ms"]) for r in p["torch"].values()) + " |")
        lines.append("| forward (untimed ops, thread CPU) | "
                     + " | ".join(str(r["forward_thread_cpu_ms"]) for r in p["torch"].values()) + " |")
        ov = p.get("openvino")
        if ov:
            lines += ["", f"OpenVINO bf16, 1 thread: forward {ov['forward_process_cpu_ms']} ms of process CPU; share of "
                      "node time by type: " + ", ".join(f"{k} {v:.1%}" for k, v in list(ov["by_node_type_share"].items())[:9])
                      + f" (load {ov['load']})."]
        lines.append("")
    for t in report.get("ablation", []) + report.get("timing", []):
        title = "Ablation: the fast path with one change undone" if t.get("ablation") else "Timing"
        lines += [f"## {title}: {t['threads']} thread(s), {t['rounds']} interleaved rounds, each row in its own process "
                  f"(load {min(t['loads'])}-{max(t['loads'])})", ""]
        if t.get("ablation"):
            lines += [f"- {r}: {what}" for r, what in ABLATIONS.items()] + [""]
        lines += ["Rows marked @kept-memory run with " + ", ".join(f"{k}={v}" for k, v in KEPT_MEMORY.items())
                  + " (glibc keeps freed memory: no page faults per forward); @omp-passive with OMP_WAIT_POLICY=PASSIVE "
                  "(idle OpenMP threads sleep instead of spinning).", ""]
        lines += ["| row | forward ms (wall) | forward ms (process CPU) | page faults | + our post-processing ms |",
                  "|---|---|---|---|---|"]
        for r, v in t["rows"].items():
            lines.append(f"| {r} | {v['forward_ms']} | {v['forward_cpu_ms']} | {v['faults']:.0f} | {v['post_ms']} |")
        lines += ["", "Paired per-round ratios (slower / faster):", ""]
        for p in t["paired"]:
            lines.append(f"- {p['slower']} / {p['faster']}, {p['metric']}: {p['median']}x (range {p['min']}-{p['max']})")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(report: Dict, stem: str) -> str:
    """The report so far, as stem.json and stem.md (claimed by ``reporting.results_stem`` before
    the run: an earlier result is never replaced without --overwrite)."""
    from maskformer import reporting

    reporting.write_report(stem, report, markdown(report))
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ablation-rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--name", default="swin-tiny", help="the default results stem is bf16-cpu-NAME")
    parser.add_argument("--out", default=None,
                        help="results stem (STEM.json, STEM.md); default out/benchmarks/bf16-cpu-NAME")
    parser.add_argument("--overwrite", action="store_true", help="replace the files at --out")
    parser.add_argument("--work-dir", default=None, help="keeps the checkpoint and the export between runs")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: agreement,profile,ablation,timing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    from maskformer import precision
    from maskformer.bench import make_checkpoint
    from maskformer.export import export_onnx

    if not precision.cpu_bf16_native():
        print("this CPU has no native bf16 (avx512_bf16 or amx_bf16): the fast path does not run here; "
              f"{precision.native_precisions()['bfloat16']}", file=sys.stderr)
        return 2
    from maskformer import reporting

    stem = reporting.results_stem(args.out, f"bf16-cpu-{args.name}", overwrite=args.overwrite)
    threads = [int(t) for t in args.threads.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-bf16-")
    os.makedirs(work, exist_ok=True)
    checkpoint = os.path.join(work, "swin-tiny-lively")
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
        make_checkpoint("tiny", checkpoint, weights="lively")
    onnx_path = os.path.join(work, "ours.onnx")
    if not os.path.exists(onnx_path):
        from maskformer import MaskFormerForInstanceSegmentation

        export_onnx(MaskFormerForInstanceSegmentation.from_pretrained(checkpoint), onnx_path, outputs="all", verify=False)
    report = {"environment": environment(threads)}
    if "agreement" not in skip:
        report["agreement"] = agreement(checkpoint, onnx_path, args.images)
        report["agreement_default_model"] = agreement_default_model(args.images)
        write(report, stem)
    if "profile" not in skip:
        report["profile"] = {"torch": profile_torch(checkpoint), "openvino": profile_openvino(onnx_path)}
        write(report, stem)
    if "ablation" not in skip:
        rows = tuple(r + "@kept-memory" for r in ("torch-bf16-reference", "torch-bf16-fast") + tuple(ABLATIONS))
        report["ablation"] = [dict(time_rows(rows, checkpoint, onnx_path, 1, args.ablation_rounds, work), ablation=True)]
        write(report, stem)
    if "timing" not in skip:
        report["timing"] = []
        for t in threads:
            rows = ROWS + tuple(f"torch-bf16-{p}@kept-memory" for p in ("reference", "fast"))
            if t > 1:
                rows += tuple(f"torch-bf16-{p}@omp-passive" for p in ("reference", "fast"))
            report["timing"].append(time_rows(rows, checkpoint, onnx_path, t, args.rounds, work))
            write(report, stem)
    stem = write(report, stem)
    print(open(stem + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
