"""Panoptic post-processing: ours (C++, reference) against transformers'
``post_process_panoptic_segmentation``, at COCO-panoptic scale: 133 classes, 100 queries,
160x213 masks -> 640x853 maps, batch 2, realistic logits (``make_realistic_logits``), in two
scenarios: 12 confident objects per image (12 kept queries) and 100 (every query kept: the
per-image (Q, H, W) tensors of the torch ops reach 218 MB each).

Script mode (verify, then time, then write files)::

    python -m benchmarks.bench_panoptic            # or: python benchmarks/bench_panoptic.py
    python -m benchmarks.bench_panoptic --compare benchmarks/results/panoptic-cpu.json --fail-if-regression

writes ``out/benchmarks/panoptic-cpu.json`` and ``.md`` (``--out STEM``; the environment of
``maskformer.reporting``, the config, one table per scenario; an existing file is replaced only with
``--overwrite``). pytest-benchmark entries (both scenarios; transformers, ours on the
reference and C++ backends; ~25 s on 2 CPU cores)::

    pytest benchmarks/bench_panoptic.py --benchmark-only

There is no Triton entry: panoptic post-processing has no Triton kernel (``query_argmax`` runs the
reference ops on CUDA), and this benchmark runs on the CPU only. The ``query_argmax`` step alone,
reference against C++, is in ``bench_ops.py``.

How things are measured (as ``bench_postprocess``, whose helpers this reuses)
-----------------------------------------------------------------------------
* Verify first: ours on every backend must return transformers' segmentation maps (``torch.equal``)
  and ``segments_info`` (no fused labels here, so deviations 1 and 2 of ``maskformer.processing``
  do not apply; deviation 3 would only show at boundary pixels with probability in
  [mask_threshold, mask_threshold / score), and the check says so if it ever does), else the script
  stops before timing.
* Time: wall clock of the whole call, median and 10th/90th percentiles over ``--iters`` runs after
  ``--warmup``, all torch threads. The machine may be shared: the load average at the start and the end is recorded.
* Peak extra memory: one fresh subprocess per implementation, peak RSS reset with
  ``/proc/self/clear_refs`` just before the call, ``VmHWM - VmRSS`` after it.
* Components: ``query_argmax`` alone (reference torch ops vs C++) on the kept queries of both
  images, with the effective bandwidth of the C++ kernel (kept probabilities read once + int64
  labels written once) next to the measured copy bandwidth.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # script mode: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_postprocess import copy_bandwidth_gbs, time_call, write_report  # noqa: E402
from maskformer import reporting  # noqa: E402
from maskformer.measure import measure_peak_extra  # noqa: E402

CONFIG = {
    "batch": 2, "queries": 100, "classes": 133, "mask": (160, 213), "target": (640, 853), "seed": 0,
    "threshold": 0.5, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8,
}
SCENARIOS = {"12 objects": 12, "100 objects (every query kept)": 100}


# ---------------------------------------------------------------------------------------------
# Inputs and implementations
# ---------------------------------------------------------------------------------------------


def make_inputs(objects: int, config=CONFIG):
    from maskformer.kernels.mask_einsum import make_realistic_logits

    cl, ml = make_realistic_logits(config["batch"], config["queries"], config["classes"], *config["mask"],
                                   n_objects=objects, seed=config["seed"])
    return cl, ml, [tuple(config["target"])] * config["batch"]


def _kwargs(sizes):
    c = CONFIG
    return dict(threshold=c["threshold"], mask_threshold=c["mask_threshold"],
                overlap_mask_area_threshold=c["overlap_mask_area_threshold"], target_sizes=sizes)


def kept_queries(cl, ml):
    """Per image: the kept queries' (Q_i, h, w) probabilities and (Q_i,) scores, as the processor
    selects them."""
    scores, labels = cl.softmax(-1).max(-1)
    keep = labels.ne(cl.shape[-1] - 1) & (scores > CONFIG["threshold"])
    probs = ml.sigmoid()
    return [(probs[i][keep[i]], scores[i][keep[i]]) for i in range(cl.shape[0])]


def implementations():
    """name -> fn(class_logits, mask_logits, target_sizes). Whole pipelines first (they return the
    processors' list of dicts), then components (marked with a '/')."""
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

    from maskformer import _ext, dispatch
    from maskformer.kernels import query_argmax as qa
    from maskformer.processing import MaskFormerImageProcessor

    hf = MaskFormerImageProcessorPil()
    ours_processor = MaskFormerImageProcessor()

    def transformers_pp(cl, ml, sizes):
        out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=cl, masks_queries_logits=ml)
        return hf.post_process_panoptic_segmentation(out, **_kwargs(sizes))

    def ours(backend_name):
        def run(cl, ml, sizes):
            with dispatch.backend(backend_name):
                return ours_processor.post_process_panoptic_segmentation(
                    {"class_queries_logits": cl, "masks_queries_logits": ml}, **_kwargs(sizes)
                )

        return run

    cache = {}

    def component(fn):
        def run(cl, ml, sizes):
            if cache.get("key") != id(cl):  # the kept queries, computed once per input
                cache.update(key=id(cl), kept=kept_queries(cl, ml))
            return [fn(p, s, size, CONFIG["mask_threshold"]) for (p, s), size in zip(cache["kept"], sizes)]

        return run

    impls = {"transformers": transformers_pp, "ours-reference": ours("reference")}
    notes = {"ours-triton": "not run: query_argmax has no Triton kernel (on CUDA the reference runs)"}
    if _ext.load_cpp() is not None:
        impls["ours-cpp"] = ours("cpp")
        impls["component/query_argmax (reference torch ops)"] = component(qa.query_argmax_ref)
        impls["component/query_argmax (C++)"] = component(qa.query_argmax_cpp)
        impls["component/query_argmax (C++ dense sweep)"] = component(
            lambda p, s, size, t: qa.query_argmax_cpp(p, s, size, t, prune=False))
    else:
        notes["ours-cpp"] = f"not run: {_ext.cpp_import_error()}"
    return impls, notes


# ---------------------------------------------------------------------------------------------
# Verification and measurements
# ---------------------------------------------------------------------------------------------


def _same(a, b) -> str:
    """'' when two processor results are identical, else what differs."""
    for i, (ra, rb) in enumerate(zip(a, b)):
        sa, sb = ra["segmentation"], rb["segmentation"]
        if sa.shape != sb.shape or sa.dtype != sb.dtype or not torch.equal(sa, sb):
            n = int((sa != sb).sum()) if sa.shape == sb.shape else -1
            return f"image {i}: segmentation differs ({n} pixels, dtypes {sa.dtype}/{sb.dtype})"
        if ra["segments_info"] != rb["segments_info"]:
            return f"image {i}: segments_info differs:\n  {ra['segments_info']}\n  {rb['segments_info']}"
    return ""


def memory_probe(name: str, objects: int) -> dict:
    """Run in a fresh process: peak extra memory of one call of ``name``."""
    impls, _ = implementations()
    fn = impls[name]
    cl, ml, sizes = make_inputs(objects)
    small = {**CONFIG, "batch": 1, "mask": (16, 21), "target": (64, 85)}
    fn(*make_inputs(min(objects, 12), small))  # warm-up: thread pools, extension, calibration
    _, mib, method = measure_peak_extra(fn, cl, ml, sizes)
    return {"peak_extra_mib": mib, "method": method}


def peak_extra_memory(name: str, objects: int) -> dict:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--objects", str(objects)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if res.returncode != 0:
        return {"peak_extra_mib": None, "error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_scenario(label: str, objects: int, args) -> dict:
    impls, notes = implementations()
    cl, ml, sizes = make_inputs(objects)
    kept = [int(p.shape[0]) for p, _ in kept_queries(cl, ml)]
    expected = impls["transformers"](cl, ml, sizes)
    checked = []
    for name, fn in impls.items():
        if name.startswith("component/"):
            continue
        diff = _same(fn(cl, ml, sizes), expected)
        if diff:
            raise SystemExit(f"VERIFY FAILED ({label}): {name} vs transformers: {diff}")
        checked.append(name)
    ref_name = "component/query_argmax (reference torch ops)"
    ref_parts = impls[ref_name](cl, ml, sizes) if ref_name in impls else []
    for comp in ("component/query_argmax (C++)", "component/query_argmax (C++ dense sweep)"):
        if comp in impls:
            for (gl, ga), (rl, ra) in zip(impls[comp](cl, ml, sizes), ref_parts):
                if not (torch.equal(gl, rl) and torch.equal(ga, ra)):
                    raise SystemExit(f"VERIFY FAILED ({label}): {comp} differs from query_argmax_ref")
            checked.append(comp)
    print(f"[{label}] kept queries per image {kept}. All results match ({', '.join(checked)}). Starting benchmarks.")

    rows = []
    for name, fn in impls.items():
        iters = args.iters if name != "transformers" or objects <= 12 else max(3, args.iters // 2)
        t = time_call(fn, (cl, ml, sizes), "cpu", args.warmup, iters)
        measure = not args.no_memory and not name.startswith("component/")
        mem = peak_extra_memory(name, objects) if measure else {"peak_extra_mib": None}
        rows.append({"name": name, **t, **mem})
        peak = mem.get("peak_extra_mib")
        print(f"  {name:44s} median {t['median_ms']:9.2f} ms  (p10 {t['p10_ms']:.2f}, p90 {t['p90_ms']:.2f})"
              f"  peak extra {'-' if peak is None else round(peak, 1)} MiB")
    base = rows[0]
    for r in rows:
        r["speedup"] = base["median_ms"] / r["median_ms"]
        if r.get("peak_extra_mib") is not None and base.get("peak_extra_mib"):
            r["memory_ratio"] = r["peak_extra_mib"] / base["peak_extra_mib"]
    roofline = None
    cpp_row = next((r for r in rows if r["name"] == "component/query_argmax (C++)"), None)
    if cpp_row:
        c = CONFIG
        moved = sum(k * c["mask"][0] * c["mask"][1] * 4 + c["target"][0] * c["target"][1] * 8 for k in kept)
        eff = moved / (cpp_row["median_ms"] / 1e3) / 1e9
        roofline = (f"query_argmax (C++): {eff:.2f} GB/s effective (kept probabilities read once + int64 labels "
                    f"written, {moved / 2**20:.0f} MiB, over its median time) = {100 * eff / args.bandwidth:.0f}% of "
                    f"the {args.bandwidth:.1f} GB/s measured copy bandwidth")
    return {"scenario": label, "objects": objects, "kept_queries": kept, "rows": rows, "notes": notes,
            "verification": f"segmentation maps and segments_info identical to transformers for "
                            f"{', '.join(c for c in checked if not c.startswith('component/'))}; "
                            f"query_argmax components identical to query_argmax_ref",
            "roofline": roofline}


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        "# Panoptic post-processing benchmark",
        "",
        *reporting.environment_markdown(report["environment"], loadavg_end=report.get("loadavg_end")),
        f"- config: batch {c['batch']}, {c['queries']} queries, {c['classes']} classes, mask {c['mask'][0]}x{c['mask'][1]}"
        f" -> target {c['target'][0]}x{c['target'][1]}, realistic logits (seed {c['seed']}), threshold "
        f"{c['threshold']}, mask_threshold {c['mask_threshold']}, overlap {c['overlap_mask_area_threshold']}",
        f"- memory method: {report['memory_method']}",
        f"- measured copy bandwidth: {report['copy_bandwidth_gbs']:.1f} GB/s",
    ]
    for sc in report["scenarios"]:
        lines += [
            "",
            f"## {sc['scenario']}: kept queries per image {sc['kept_queries']}",
            "",
            f"- verification: {sc['verification']}",
            "",
            "| implementation | median ms | p10-p90 ms | speedup vs transformers | peak extra MiB | memory vs transformers |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in sc["rows"]:
            mem = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.1f}"
            ratio = "-" if not r.get("memory_ratio") else f"1/{1 / r['memory_ratio']:.1f}"
            lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
                         f"{r['speedup']:.1f}x | {mem} | {ratio} |")
        for name, note in sc.get("notes", {}).items():
            lines.append(f"\n- {name}: {note}")
        if sc.get("roofline"):
            lines.append(f"\n- {sc['roofline']}")
    if report.get("comparison"):
        lines.append("\n## Against the stored baseline\n")
        for name, ratio in report["comparison"].items():
            lines.append(f"- {name}: {ratio:.2f}x the baseline's median time")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=None,
                        help=f"results file stem (default {reporting.DEFAULT_RESULTS_DIR}/panoptic-cpu, or the next "
                             "free -2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files if they exist")
    parser.add_argument("--compare", type=Path, default=None, help="a previous results JSON to compare with")
    parser.add_argument("--fail-if-regression", action="store_true",
                        help="exit 1 when an implementation is > 1.25x slower than in --compare")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--objects", type=int, default=12, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.objects)))
        return 0
    try:
        stem = reporting.results_stem(args.out, "panoptic-cpu", overwrite=args.overwrite)  # before measuring
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    env = reporting.environment("cpu")
    args.bandwidth = copy_bandwidth_gbs("cpu")
    scenarios = [run_scenario(label, objects, args) for label, objects in SCENARIOS.items()]
    report = {"environment": env, "loadavg_end": reporting.loadavg(), "config": CONFIG,
              "copy_bandwidth_gbs": args.bandwidth,
              "memory_method": "not measured" if args.no_memory else "VmHWM - VmRSS (clear_refs)",
              "scenarios": scenarios}
    if baseline:
        old = {(s["scenario"], r["name"]): r for s in baseline["scenarios"] for r in s["rows"]}
        report["comparison"] = {f"{s['scenario']} / {r['name']}": r["median_ms"] / old[(s["scenario"], r["name"])]["median_ms"]
                                for s in scenarios for r in s["rows"] if (s["scenario"], r["name"]) in old}
    return write_report(stem, report, markdown, args.fail_if_regression, args.overwrite)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entries
# ---------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:
    # Rounds after one warm-up: transformers takes ~0.4 s per call with 12 objects and ~2 s with
    # 100 on a 2-core CPU, so 5 and 3 keep both scenarios under ~30 s.
    _ROUNDS = {12: 5, 100: 3}

    @pytest.fixture(scope="module")
    def panoptic_setup():
        """objects -> (implementations, notes, (class_logits, mask_logits, sizes), transformers' result),
        built on first use and kept for the module."""
        impls, notes = implementations()
        cache = {}

        def get(objects):
            if objects not in cache:
                args = make_inputs(objects)
                cache[objects] = (args, impls["transformers"](*args))
            return (impls, notes) + cache[objects]

        return get

    @pytest.mark.parametrize("name", ["transformers", "ours-reference", "ours-cpp"])
    @pytest.mark.parametrize("scenario", list(SCENARIOS), ids=[f"{n}-objects" for n in SCENARIOS.values()])
    def test_panoptic(benchmark, panoptic_setup, scenario, name):
        objects = SCENARIOS[scenario]
        impls, notes, args, expected = panoptic_setup(objects)
        if name not in impls:
            pytest.skip(notes.get(name, f"{name} not available"))
        fn = impls[name]
        diff = _same(fn(*args), expected)  # verify, then time
        assert not diff, f"panoptic {scenario}: {name} vs transformers: {diff}"
        c = CONFIG
        benchmark.extra_info.update(
            scenario=scenario, impl=name, batch=c["batch"], queries=c["queries"], classes=c["classes"],
            mask=f"{c['mask'][0]}x{c['mask'][1]}", target=f"{c['target'][0]}x{c['target'][1]}",
            kept_queries=[int(p.shape[0]) for p, _ in kept_queries(*args[:2])], torch_threads=torch.get_num_threads(),
        )
        benchmark.pedantic(fn, args=args, rounds=_ROUNDS[objects], warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
