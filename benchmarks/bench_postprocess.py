"""Semantic post-processing: ours (C++, reference; Triton on CUDA) against transformers'
``post_process_semantic_segmentation``, at ADE20k scale: 150 classes, 100 queries, 160x213 masks
-> 640x853 maps, batch 2, realistic logits (``make_realistic_logits``).

Script mode (verify, then time, then write files)::

    python -m benchmarks.bench_postprocess            # or: python benchmarks/bench_postprocess.py
    python -m benchmarks.bench_postprocess --compare benchmarks/results/postprocess-cpu.json --fail-if-regression
    # issue #13's two figures: realistic logits, then the worst case (random logits: flat scores,
    # where per-cell candidate pruning cannot help), one image per target size
    python -m benchmarks.bench_postprocess --mask 160x216 --targets 640x853,512x683 --logits realistic
    python -m benchmarks.bench_postprocess --mask 160x216 --targets 640x853,512x683 --logits random

Mask2Former (issue #21.4: the 384x384 resize of the mask logits, then the same steps; Swin-T ADE's
head: 150 classes, 128x171 masks of a 512x683 input, one image)::

    python -m benchmarks.bench_postprocess --model mask2former --queries 200 \
        --out benchmarks/results/postprocess-mask2former-cpu

rows: transformers' ``Mask2FormerImageProcessor``, ours fused (``mask2former_semantic``: C++ on
CPU, Triton on CUDA), ours before the fused op (transformers' resize, then the C++
``semantic_segmentation``) and the reference. The fused maps are verified up to near ties: a pixel
may differ from transformers' only where transformers' two scores are within ``TIE_ATOL``.

``--logits``: ``realistic`` (default; a trained model's shape of outputs: a few confident queries,
sharp regions) or ``random`` (``torch.randn`` class and mask logits: every class scores about the
same everywhere, so many classes stay candidates in every source cell - the worst case of the C++
kernel). ``--targets``: one ``HxW`` per image (cycled over the batch); default 640x853 for all.

writes ``out/benchmarks/postprocess-<device>.json`` and ``.md`` (``--out STEM``; the environment of
``maskformer.reporting``: device, CPU model and flags, threads, load average, versions, commit; then
the config and one row per implementation; an existing file is replaced only with ``--overwrite``).
pytest-benchmark entries::

    pytest benchmarks/bench_postprocess.py --benchmark-only

How things are measured
-----------------------
* Verify first: every implementation's label maps must equal transformers' (``torch.equal``),
  else the script stops before timing.
* Time: wall clock of the whole call (CUDA synchronised), median and 10th/90th percentiles over
  ``--iters`` runs after ``--warmup`` runs, all threads torch uses (``torch.get_num_threads()``).
  The rows are interleaved (each iteration runs every implementation once), so a load that comes
  and goes on a shared machine slows all rows alike and the ratios stay comparable.
* Peak extra memory: tracemalloc cannot see torch's allocations (they go through the C allocator,
  MKL and OpenMP), so each implementation runs once in a fresh subprocess: inputs are built and a
  small warm-up call made (thread pools, the extension, the rounding calibration), then the
  kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and the process
  records ``VmHWM - VmRSS`` across one call: every page the call touched beyond what was already
  resident, whoever allocated it. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.
* Roofline figure: effective bandwidth of the fused upsample+argmax (scores read once + labels
  written once, over its time) next to this machine's measured copy bandwidth (a 256 MiB clone).
"""
import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from maskformer import reporting
from maskformer.measure import measure_peak_extra

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# "targets": None (every image at "target") or one (H, W) per image, cycled over the batch.
CONFIG = {"batch": 2, "queries": 100, "classes": 150, "mask": (160, 213), "target": (640, 853), "targets": None,
          "logits": "realistic", "seed": 0}
# --model mask2former: Mask2Former Swin-T ADE's semantic head at a 512x683 input, one image.
M2F_CONFIG = {"model": "mask2former", "batch": 1, "queries": 100, "classes": 150, "mask": (128, 171),
              "target": (512, 683), "targets": None, "logits": "realistic", "seed": 0}
# --dry-run (benchmarks.gpu_report --dry-run): the same steps on inputs a second's work in total.
DRY_RUN_CONFIG = {"batch": 2, "queries": 10, "classes": 6, "mask": (12, 17), "target": (48, 67), "targets": None,
                  "seed": 0}
# The fused Mask2Former maps may differ from transformers' where transformers' two scores are this
# close (tests/hf_oracle.py TIE_ATOL: 5x the largest score difference measured at Q=200, K=150).
TIE_ATOL = 4e-6
LOGITS = ("realistic", "random")


# ---------------------------------------------------------------------------------------------
# Inputs and implementations
# ---------------------------------------------------------------------------------------------


def target_sizes(config=CONFIG):
    """One (H, W) per image: ``targets`` cycled over the batch, else ``target`` for all."""
    targets = config.get("targets") or [config["target"]]
    return [tuple(targets[i % len(targets)]) for i in range(config["batch"])]


def make_inputs(device="cpu", config=CONFIG):
    """(class logits (B, Q, K+1), mask logits (B, Q, h, w), target sizes) fp32 on ``device``.
    ``config["logits"]``: "realistic" (``make_realistic_logits``) or "random" (``torch.randn`` for
    both: flat class scores, the C++ kernel's worst case)."""
    from maskformer.kernels.mask_einsum import make_realistic_logits

    b, q, k, (h, w) = config["batch"], config["queries"], config["classes"], config["mask"]
    kind = config.get("logits", "realistic")
    if kind == "realistic":
        cl, ml = make_realistic_logits(b, q, k, h, w, seed=config["seed"], device=device)
    elif kind == "random":
        gen = torch.Generator().manual_seed(config["seed"])
        cl = torch.randn(b, q, k + 1, generator=gen).to(device)
        ml = torch.randn(b, q, h, w, generator=gen).to(device)
    else:
        raise ValueError(f"unknown logits kind {kind!r} ({', '.join(LOGITS)})")
    return cl, ml, target_sizes(config)


def mask2former_implementations(device: str):
    """Mask2Former rows: name -> fn(class_logits, mask_logits, target_sizes) -> label maps."""
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    from maskformer import _ext, dispatch
    from maskformer.kernels import mask2former_semantic as m2

    processor = Mask2FormerImageProcessorPil()

    def transformers_pp(cl, ml, sizes):
        out = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=cl, masks_queries_logits=ml)
        return processor.post_process_semantic_segmentation(out, target_sizes=sizes)

    def fused(backend_name):
        def run(cl, ml, sizes):
            with dispatch.backend(backend_name):
                return dispatch.mask2former_semantic(cl, ml, sizes)

        return run

    def before(cl, ml, sizes):  # main before the fused op: transformers' resize, then the C++ op
        with dispatch.backend("cpp"):
            return dispatch.semantic_segmentation(cl, m2.resize_mask_logits_ref(ml), sizes)

    impls = {"transformers": transformers_pp}
    notes = {}
    fast = "triton" if device == "cuda" else "cpp"
    if device == "cpu" and _ext.load_cpp() is None:
        notes["ours-fused (C++)"] = f"not run: {_ext.cpp_import_error()}"
    else:
        impls[f"ours-fused ({'Triton' if fast == 'triton' else 'C++'})"] = fused(fast)
    if device == "cpu" and _ext.load_cpp() is not None:
        impls["ours-before (384 resize, then C++ semantic_segmentation)"] = before
    impls["ours-reference"] = fused("reference")
    return impls, notes


def _verify_up_to_ties(got, cl, ml, sizes):
    """The number of pixels where ``got`` differs from transformers' maps; raises SystemExit when
    one of them is not a near tie of transformers' scores (within TIE_ATOL)."""
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    out = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=cl.cpu(), masks_queries_logits=ml.cpu())
    theirs = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(out, target_sizes=sizes,
                                                                               return_segmentation_scores=True)
    differ = 0
    for i, (g, t) in enumerate(zip(got, theirs)):
        g, seg, scores = g.cpu(), t.segmentation, t.segmentation_scores
        diff = g != seg
        gap = (scores.gather(0, seg[None])[0] - scores.gather(0, g[None])[0]).abs()
        if (diff & (gap > TIE_ATOL)).any():
            raise SystemExit(f"VERIFY FAILED: image {i}: {int((diff & (gap > TIE_ATOL)).sum())} labels differ from "
                             f"transformers' by more than a near tie ({TIE_ATOL:g})")
        differ += int(diff.sum())
    return differ


def implementations(device: str):
    """name -> fn(class_logits, mask_logits, target_sizes) -> list of label maps. Whole pipelines
    first, then components (marked with a '/'). ``CONFIG["model"] == "mask2former"``: the
    Mask2Former rows (``mask2former_implementations``)."""
    if CONFIG.get("model") == "mask2former":
        return mask2former_implementations(device)
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

    from maskformer import _ext, dispatch
    from maskformer.kernels import mask_einsum as me
    from maskformer.kernels import upsample_argmax as ua

    processor = MaskFormerImageProcessorPil()

    def transformers_pp(cl, ml, sizes):
        out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=cl, masks_queries_logits=ml)
        return processor.post_process_semantic_segmentation(out, target_sizes=sizes)

    def ours(backend_name):
        def run(cl, ml, sizes):
            with dispatch.backend(backend_name):
                return dispatch.semantic_segmentation(cl, ml, sizes)

        return run

    impls = {"transformers": transformers_pp, "ours-reference": ours("reference")}
    notes = {}
    if device == "cuda":
        impls["ours-triton"] = ours("triton")
    else:
        notes["ours-triton"] = "not run: the Triton kernels need CUDA (CPU tensors only under TRITON_INTERPRET)"
    if device == "cpu":
        if _ext.load_cpp() is not None:
            impls["ours-cpp"] = ours("cpp")
            scores = {}

            def cpp_upsample_only(cl, ml, sizes):
                key = id(cl)
                if key not in scores:
                    scores.clear()
                    scores[key] = me.mask_einsum_ref(cl, ml)
                return ua.upsample_argmax_cpp(scores[key], sizes)

            impls["component/scores (torch ops, as transformers)"] = lambda cl, ml, sizes: me.mask_einsum_ref(cl, ml)
            impls["component/upsample_argmax (C++)"] = cpp_upsample_only
            impls["component/mask_einsum (C++ fused)"] = lambda cl, ml, sizes: me.mask_einsum_cpp(cl, ml)
        else:
            notes["ours-cpp"] = f"not run: {_ext.cpp_import_error()}"
    return impls, notes


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, args, device, warmup=2, iters=15):
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": samples[0],
            "iters": iters}


def time_interleaved(impls: dict, args, device, warmup=2, iters=15) -> dict:
    """name -> time_call-style stats, the implementations run in turn within each iteration."""
    for fn in impls.values():
        for _ in range(warmup):
            fn(*args)
    _sync(device)
    samples = {name: [] for name in impls}
    for _ in range(iters):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn(*args)
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    stats = {}
    for name, xs in samples.items():
        xs.sort()
        q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else [xs[0]] * 9
        stats[name] = {"median_ms": statistics.median(xs), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": xs[0],
                       "iters": iters}
    return stats


def memory_probe(name: str, device: str) -> dict:
    """Run in a fresh process (see module docstring): peak extra memory of one call of ``name``."""
    impls, _ = implementations(device)
    fn = impls[name]
    cl, ml, sizes = make_inputs(device)
    small = {**CONFIG, "batch": 1, "mask": (16, 21), "target": (64, 85), "targets": None}
    fn(*make_inputs(device, small))  # warm-up: thread pools, extension, calibration
    gc.collect()
    _, mib, method = measure_peak_extra(fn, cl, ml, sizes, device=device)
    return {"peak_extra_mib": mib, "method": method}


def peak_extra_memory(name: str, device: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--device", device,
           "--config-json", json.dumps(CONFIG)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if res.returncode != 0:
        return {"peak_extra_mib": None, "error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def copy_bandwidth_gbs(device: str) -> float:
    """Measured ceiling: read + write of a 256 MiB clone, best of 5."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        y = x.clone()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        del y
    return 2 * x.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# Semantic post-processing benchmark ({c.get('model', 'maskformer')})",
        "",
        *(["**DRY RUN: tiny inputs, one iteration; the times mean nothing.**", ""] if report.get("dry_run") else []),
        *reporting.environment_markdown(report["environment"], loadavg_end=report.get("loadavg_end")),
        f"- config: {c.get('model', 'maskformer')}, batch {c['batch']}, {c['queries']} queries, {c['classes']} classes, mask {c['mask'][0]}x{c['mask'][1]}"
        f" -> targets {', '.join(f'{t[0]}x{t[1]}' for t in target_sizes(c))}, {c.get('logits', 'realistic')} logits"
        f" (seed {c['seed']})",
        f"- verification: {report['verification']}",
        f"- memory method: {report['memory_method']}",
        f"- measured copy bandwidth: {report['copy_bandwidth_gbs']:.1f} GB/s",
        "",
        "| implementation | median ms | p10-p90 ms | speedup vs transformers | peak extra MiB | memory vs transformers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        mem = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.1f}"
        ratio = "-" if r.get("memory_ratio") is None else f"1/{1 / r['memory_ratio']:.1f}" if r["memory_ratio"] else "-"
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
                     f"{r['speedup']:.1f}x | {mem} | {ratio} |")
    for name, note in report.get("notes", {}).items():
        lines.append(f"\n- {name}: {note}")
    if report.get("roofline"):
        lines.append(f"\n- {report['roofline']}")
    if report.get("comparison"):
        lines.append("\n## Against the stored baseline\n")
        for name, ratio in report["comparison"].items():
            lines.append(f"- {name}: {ratio:.2f}x the baseline's median time")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    device = args.device
    env = reporting.environment(device)
    impls, notes = implementations(device)
    cl, ml, sizes = make_inputs(device)
    expected = impls["transformers"](cl, ml, sizes)
    checked, near_ties = [], []
    for name, fn in impls.items():
        if name.startswith("component/"):
            continue
        got = fn(cl, ml, sizes)
        if name.startswith("ours-fused") and CONFIG.get("model") == "mask2former":
            n = _verify_up_to_ties(got, cl, ml, sizes)
            near_ties.append(f"{name}: {n} of {sum(g.numel() for g in got)} pixels differ, each a near tie "
                             f"(transformers' two scores within {TIE_ATOL:g})")
            continue
        for i, (g, e) in enumerate(zip(got, expected)):
            if not torch.equal(g.cpu(), e.cpu()):
                raise SystemExit(f"VERIFY FAILED: {name} image {i}: {int((g.cpu() != e.cpu()).sum())} labels differ")
        checked.append(name)
    verification = "; ".join([f"label maps identical to transformers (torch.equal) for {', '.join(checked)}"]
                             + near_ties)
    print(f"All results match ({', '.join(checked)}). Starting benchmarks.")

    rows = []
    times = time_interleaved(impls, (cl, ml, sizes), device, args.warmup, args.iters)
    for name, fn in impls.items():
        t = times[name]
        # Memory of whole pipelines only: a component's probe would include its inputs' making.
        measure = not args.no_memory and not name.startswith("component/")
        mem = peak_extra_memory(name, device) if measure else {"peak_extra_mib": None}
        rows.append({"name": name, **t, **mem})
        print(f"{name:48s} median {t['median_ms']:8.2f} ms  (p10 {t['p10_ms']:.2f}, p90 {t['p90_ms']:.2f})"
              f"  peak extra {mem.get('peak_extra_mib') if mem.get('peak_extra_mib') is None else round(mem['peak_extra_mib'], 1)} MiB")
    base = rows[0]
    for r in rows:
        r["speedup"] = base["median_ms"] / r["median_ms"]
        if r.get("peak_extra_mib") is not None and base.get("peak_extra_mib"):
            r["memory_ratio"] = r["peak_extra_mib"] / base["peak_extra_mib"]

    bw = copy_bandwidth_gbs(device)
    roofline = None
    ua_row = next((r for r in rows if r["name"] == "component/upsample_argmax (C++)"), None)
    if ua_row:
        c = CONFIG
        moved = sum(c["classes"] * c["mask"][0] * c["mask"][1] * 4 + th * tw * 8 for th, tw in target_sizes(c))
        eff = moved / (ua_row["median_ms"] / 1e3) / 1e9
        roofline = (f"upsample_argmax (C++): {eff:.2f} GB/s effective (scores read once + int64 labels written, "
                    f"{moved / 2**20:.0f} MiB, over its median time) = {100 * eff / bw:.0f}% of the {bw:.1f} GB/s "
                    "measured copy bandwidth")
    report = {
        "environment": env,
        "config": CONFIG,
        "verification": verification,
        "memory_method": rows[0].get("method", "not measured"),
        "copy_bandwidth_gbs": bw,
        "rows": rows,
        "notes": notes,
        "roofline": roofline,
        "loadavg_end": reporting.loadavg(),
    }
    if args.baseline:
        old_rows = {r["name"]: r for r in args.baseline["rows"]}
        report["comparison"] = {r["name"]: r["median_ms"] / old_rows[r["name"]]["median_ms"]
                                for r in rows if r["name"] in old_rows}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=None,
                        help=f"results file stem (default {reporting.DEFAULT_RESULTS_DIR}/postprocess-<device>, or "
                             "the next free -2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files if they exist")
    parser.add_argument("--compare", type=Path, default=None, help="a previous results JSON to compare with")
    parser.add_argument("--fail-if-regression", action="store_true",
                        help="exit 1 when an implementation is > 1.25x slower than in --compare")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny inputs, one iteration, no memory probes: tests the plumbing (the times mean nothing)")
    parser.add_argument("--logits", choices=LOGITS, default=None,
                        help="realistic (default) or random logits (flat scores: the C++ kernel's worst case)")
    parser.add_argument("--mask", type=_size_arg, default=None, help="mask logits size HxW (default 160x213)")
    parser.add_argument("--targets", type=lambda s: [_size_arg(t) for t in s.split(",")], default=None,
                        help="target sizes HxW[,HxW...], one per image, cycled over the batch (default 640x853)")
    parser.add_argument("--model", choices=("maskformer", "mask2former"), default="maskformer",
                        help="maskformer (default) or mask2former (the 384x384 resize first; M2F_CONFIG)")
    parser.add_argument("--queries", type=int, default=None, help="queries (default 100)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model == "mask2former":
        CONFIG.update(M2F_CONFIG)
    if args.config_json:  # a memory probe: the parent's configuration
        CONFIG.update({k: tuple(v) if k in ("mask", "target") else v for k, v in json.loads(args.config_json).items()})
    for key, value in (("logits", args.logits), ("mask", args.mask), ("targets", args.targets),
                       ("queries", args.queries)):
        if value is not None:
            CONFIG[key] = value
    if args.dry_run:
        CONFIG.update(DRY_RUN_CONFIG)
        args.warmup, args.iters, args.no_memory = 0, 1, True
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device)))
        return 0
    # Claimed before measuring: a taken --out is refused now, not after the run.
    try:
        default = f"postprocess-{args.device}" if args.model == "maskformer" else f"postprocess-mask2former-{args.device}"
        stem = reporting.results_stem(args.out, default, overwrite=args.overwrite)
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    args.baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    report = run(args)
    if args.dry_run:
        report["dry_run"] = True
    return write_report(stem, report, markdown, args.fail_if_regression, args.overwrite)


def _size_arg(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None
    return (h, w)


def write_report(stem: str, report: dict, markdown, fail_if_regression: bool, overwrite: bool = False) -> int:
    """Write ``stem``.json and .md (``maskformer.reporting.write_report``; ``markdown(report)`` the
    text); -> exit status: 1 when ``fail_if_regression`` and some row of ``report["comparison"]``
    (time / baseline time) is above 1.25, else 0."""
    paths = reporting.write_report(stem, report, markdown(report), overwrite=overwrite)
    print("wrote " + " and ".join(paths))
    if fail_if_regression and report.get("comparison"):
        slow = {n: r for n, r in report["comparison"].items() if r > 1.25}
        if slow:
            print(f"REGRESSION (> 1.25x the baseline): {slow}")
            return 1
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entries
# ---------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def bench_setup():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        impls, notes = implementations(device)
        cl, ml, sizes = make_inputs(device)
        expected = impls["transformers"](cl, ml, sizes)
        return device, impls, notes, (cl, ml, sizes), expected

    @pytest.mark.parametrize("name", ["transformers", "ours-reference", "ours-cpp", "ours-triton"])
    def test_postprocess(benchmark, bench_setup, name):
        device, impls, notes, args, expected = bench_setup
        if name not in impls:
            pytest.skip(notes.get(name, f"{name} not available"))
        fn = impls[name]
        got = fn(*args)  # verify, then time
        assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected)), f"{name} labels differ"

        def call():
            fn(*args)
            _sync(device)

        benchmark.pedantic(call, rounds=10, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
