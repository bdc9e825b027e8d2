"""Multi-scale deformable attention on CPU: the reference (grid_sample per level + weighted sum)
against the C++ kernel, timed interleaved on a shared machine.

Run::

    python -m benchmarks.bench_ms_deform_attn                 # 9 rounds, 2 threads, 512x683
    python -m benchmarks.bench_ms_deform_attn --rounds 15 --threads 1

Shape: one pixel-decoder layer of Mask2Former Swin-T on ADE20K at 512x683 (levels at strides 32,
16, 8: 16x22, 32x43, 64x86 = 6,304 tokens, every token a query; 8 heads x 32, 4 points per level,
fp32, batch 1), inputs from ``bench_ops.make_msda_inputs`` (each token's centre plus N(0, 2)-pixel
offsets). The C++ output is verified first (``bench_ops.check_ms_deform_attn``: within twice the
fp32 reference's own error plus the kernel's rounding budget), then the two run alternately
(reference, C++, reference, C++, ...) after one warm-up call each, so a load change on the shared
machine hits both; the report gives each one's median, min and max, and the median and range of
the per-round ratios reference / C++. The environment (``maskformer.reporting``: CPU model, ISA
flags, torch threads, load average at the start and the end, versions, commit) goes into the JSON
and Markdown files, ``out/benchmarks/ms_deform_attn-cpu-<threads>t`` by default (``--out STEM``;
an existing file is replaced only with ``--overwrite``).
"""
import argparse
import json
import statistics
import time

import torch

from benchmarks import bench_ops
from maskformer import reporting
from maskformer.kernels import ms_deform_attn as msda

LEVELS = [(16, 22), (32, 43), (64, 86)]  # 512x683 at strides 32, 16, 8
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def _time(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    env = reporting.environment("cpu", threads=threads)
    args = bench_ops.make_msda_inputs(1, LEVELS, HEADS, HEAD_DIM, POINTS)
    ref32 = msda.ms_deform_attn_ref(*args)
    case = bench_ops.Case("ms_deform_attn", "cpp", "cpu")
    verified = bench_ops.check_ms_deform_attn(case, msda.ms_deform_attn_cpp(*args), ref32, args)
    print(f"verified: {verified}. Starting interleaved timing.")
    _time(msda.ms_deform_attn_ref, args)  # warm-up
    _time(msda.ms_deform_attn_cpp, args)
    ref_ms, cpp_ms = [], []
    for i in range(rounds):
        ref_ms.append(1e3 * _time(msda.ms_deform_attn_ref, args))
        cpp_ms.append(1e3 * _time(msda.ms_deform_attn_cpp, args))
        print(f"round {i}: reference {ref_ms[-1]:.1f} ms, cpp {cpp_ms[-1]:.2f} ms, ratio {ref_ms[-1] / cpp_ms[-1]:.1f}")
    ratios = [r / c for r, c in zip(ref_ms, cpp_ms)]
    value, _, loc, _ = args
    return {
        "environment": env,
        "loadavg_end": reporting.loadavg(),
        "op": "ms_deform_attn",
        "shape": {"levels": LEVELS, "tokens": value.shape[1], "queries": loc.shape[1], "heads": HEADS,
                  "head_dim": HEAD_DIM, "points": POINTS, "batch": 1, "dtype": "fp32"},
        "rounds": rounds,
        "verified": verified,
        "reference_ms": ref_ms,
        "cpp_ms": cpp_ms,
        "summary": {
            "reference_median_ms": statistics.median(ref_ms), "reference_min_ms": min(ref_ms),
            "reference_max_ms": max(ref_ms),
            "cpp_median_ms": statistics.median(cpp_ms), "cpp_min_ms": min(cpp_ms), "cpp_max_ms": max(cpp_ms),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        },
    }


def markdown(report: dict) -> str:
    s, sh = report["summary"], report["shape"]
    lines = [
        "# Multi-scale deformable attention on CPU: reference vs C++ (interleaved)",
        "",
        *reporting.environment_markdown(report["environment"], loadavg_end=report["loadavg_end"]),
        "",
        f"Shape: levels {' + '.join(f'{h}x{w}' for h, w in sh['levels'])} ({sh['tokens']} tokens = queries), "
        f"{sh['heads']} heads x {sh['head_dim']}, {sh['points']} points, batch 1, fp32. Verified: {report['verified']}.",
        "",
        "| | median ms | min ms | max ms |",
        "|---|---|---|---|",
        f"| reference (grid_sample) | {s['reference_median_ms']:.1f} | {s['reference_min_ms']:.1f} | "
        f"{s['reference_max_ms']:.1f} |",
        f"| C++ | {s['cpp_median_ms']:.2f} | {s['cpp_min_ms']:.2f} | {s['cpp_max_ms']:.2f} |",
        "",
        f"Paired ratio reference / C++ over {report['rounds']} rounds: median {s['ratio_median']:.1f}x "
        f"(range {s['ratio_min']:.1f}x to {s['ratio_max']:.1f}x).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None,
                        help=f"results file stem (default {reporting.DEFAULT_RESULTS_DIR}/ms_deform_attn-cpu-<threads>t, "
                             "or the next free -2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files if they exist")
    ns = parser.parse_args(argv)
    try:
        stem = reporting.results_stem(ns.out, f"ms_deform_attn-cpu-{ns.threads}t", overwrite=ns.overwrite)
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    report = run(ns.rounds, ns.threads)
    paths = reporting.write_report(stem, report, markdown(report), overwrite=ns.overwrite)
    print(json.dumps(report["summary"], indent=1))
    print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
