"""How far ONNX exports of Mask2Former drift from the eager model they come from, per engine.

    python -m benchmarks.mask2former_export_drift [--weights lively,random] [--size 512x683] [--out DIR] [--name NAME]

For each weight set of the ``m2f-tiny`` architecture (Swin-T ADE, 150 classes, 100 queries;
``maskformer.bench.make_checkpoint``: ``random`` = transformers' default initialisation, ``lively``
= ``bench.lively_weights_``), on one synthetic image at ``--size``:

* transformers' own export: ``torch.onnx.export(dynamo=True)`` of transformers'
  ``Mask2FormerForUniversalSegmentation`` at that fixed size (``bench.export_transformers_onnx``,
  what a user assembles), run by ONNX Runtime and OpenVINO (f32), against transformers' eager fp32;
* ours: ``maskformer.export_onnx`` (strict, dynamic sizes, verified), run by both engines, against
  our eager fp32 (``MASKFORMER_BACKEND=reference``, the path the export traces) and against
  transformers' eager fp32;
* the yardstick: each eager model's own fp32-vs-float64 error (the export's verification bar is
  4x that when it exceeds 1e-4).

Error = ``max |a - b| / max |b|`` per logits tensor; maps = the fraction of equal pixels of the
semantic maps (transformers' post-processing for transformers' rows, ours for ours). Writes
``out/benchmarks/<name>.{json,md}`` (never over an existing file without ``--overwrite``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

from maskformer import reporting

FIELDS = ("class_queries_logits", "masks_queries_logits")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def agree(a, b) -> float:
    return float(sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(y.numel() for y in b))


def measure(weights: str, height: int, width: int, threads: int, tmp: str, log) -> dict:
    from transformers import Mask2FormerForUniversalSegmentation as HF
    from transformers import Mask2FormerImageProcessor as HFProcessor

    from maskformer import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, dispatch
    from maskformer.bench import export_transformers_onnx, make_checkpoint, synthetic_pixel_values
    from maskformer.engines.registry import runner_for_file
    from maskformer.export import export_onnx

    ckpt = make_checkpoint("m2f-tiny", os.path.join(tmp, f"m2f-{weights}"), weights)
    x = synthetic_pixel_values(1, height, width)
    sizes = [(height, width)]
    hf = HF.from_pretrained(ckpt).eval()
    hf_proc, our_proc = HFProcessor(), Mask2FormerImageProcessor()
    with torch.no_grad():
        hf32 = hf(pixel_values=x)
        hf64 = copy.deepcopy(hf).double()(pixel_values=x.double())
    hf_maps = hf_proc.post_process_semantic_segmentation(hf32, target_sizes=sizes)
    labels = int(len(torch.unique(hf_maps[0])))
    out = {"weights": weights, "size": [1, 3, height, width], "labels_in_transformers_map": labels,
           "transformers_fp32_vs_fp64": {n: rel(hf32[n], hf64[n]) for n in FIELDS},
           "transformers_fp32_vs_fp64_maps": agree(hf_proc.post_process_semantic_segmentation(hf64, target_sizes=sizes),
                                                   hf_maps),
           "rows": []}
    log(f"{weights}: transformers fp32 vs fp64 {out['transformers_fp32_vs_fp64']}, {labels} labels")
    ours = Mask2FormerForUniversalSegmentation.from_pretrained(ckpt).eval()
    with torch.no_grad(), dispatch.backend("reference"):
        ours32 = ours(x)
        ours64 = copy.deepcopy(ours).double()(x.double())
    our_maps = our_proc.post_process_semantic_segmentation(ours32, target_sizes=sizes)
    out["ours_fp32_vs_fp64"] = {n: rel(ours32[n], ours64[n]) for n in FIELDS}
    out["ours_vs_transformers_eager"] = {n: rel(ours32[n], hf32[n]) for n in FIELDS}
    out["ours_vs_transformers_eager_maps"] = agree(our_maps, hf_maps)

    started = time.perf_counter()
    theirs = export_transformers_onnx(ckpt, os.path.join(tmp, f"transformers-{weights}.onnx"), 1, height, width)
    log(f"{weights}: transformers' export in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    report = export_onnx(ours, os.path.join(tmp, f"ours-{weights}.onnx"), outputs="logits", threads=threads, log=log)
    log(f"{weights}: our export in {time.perf_counter() - started:.0f} s, verified: {report.ok}")
    out["our_export_verification"] = report.to_dict()["rows"]
    for engine in ("onnxruntime", "openvino"):
        for who, path in (("transformers' export", theirs), ("our export", os.path.join(tmp, f"ours-{weights}.onnx"))):
            runner = runner_for_file(engine, path, threads=threads)
            got = dict(zip(runner.output_names, runner.run(x)))
            eager, proc, eager_maps = (hf32, hf_proc, hf_maps) if who.startswith("transformers") else (ours32, our_proc, our_maps)
            maps = proc.post_process_semantic_segmentation(
                type("Out", (), {n: torch.as_tensor(got[n]) for n in FIELDS})(), target_sizes=sizes)
            row = {"export": who, "engine": engine,
                   "vs_its_eager": {n: rel(got[n], eager[n]) for n in FIELDS}, "maps_vs_its_eager": agree(maps, eager_maps),
                   "vs_transformers_eager": {n: rel(got[n], hf32[n]) for n in FIELDS},
                   "maps_vs_transformers_eager": agree(maps, hf_maps)}
            out["rows"].append(row)
            log(f"{weights}: {who} on {engine}: {row['vs_its_eager']}, maps {row['maps_vs_its_eager']:.5%}")
            del runner
    return out


def markdown(report: dict) -> str:
    lines = ["# Mask2Former: ONNX exports against their eager models", "",
             *reporting.environment_markdown(report["environment"], loadavg_end=report["loadavg_end"]), "",
             "Error = max |export - eager| / max |eager| (class logits / mask logits); maps = equal pixels of the semantic "
             "maps (each family's own post-processing).", ""]
    for r in report["results"]:
        fp = r["transformers_fp32_vs_fp64"]
        lines += [f"## {r['weights']} weights, input {'x'.join(map(str, r['size']))} "
                  f"({r['labels_in_transformers_map']} labels in transformers' map)", "",
                  f"- transformers eager fp32 vs float64: {fp['class_queries_logits']:.1e} / "
                  f"{fp['masks_queries_logits']:.1e}, maps {r['transformers_fp32_vs_fp64_maps']:.4%}",
                  f"- ours eager fp32 vs float64: {r['ours_fp32_vs_fp64']['class_queries_logits']:.1e} / "
                  f"{r['ours_fp32_vs_fp64']['masks_queries_logits']:.1e}; ours eager vs transformers eager: "
                  f"{r['ours_vs_transformers_eager']['class_queries_logits']:.1e} / "
                  f"{r['ours_vs_transformers_eager']['masks_queries_logits']:.1e}, maps {r['ours_vs_transformers_eager_maps']:.4%}",
                  "", "| export | engine | vs its eager model | maps | vs transformers eager | maps |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            a, b = row["vs_its_eager"], row["vs_transformers_eager"]
            lines.append(f"| {row['export']} | {row['engine']} | {a['class_queries_logits']:.1e} / "
                         f"{a['masks_queries_logits']:.1e} | {row['maps_vs_its_eager']:.4%} | "
                         f"{b['class_queries_logits']:.1e} / {b['masks_queries_logits']:.1e} | "
                         f"{row['maps_vs_transformers_eager']:.4%} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="lively,random")
    parser.add_argument("--size", default="512x683")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    height, width = (int(v) for v in args.size.split("x"))
    env = reporting.environment("cpu", threads=threads)
    folder = args.out or reporting.DEFAULT_RESULTS_DIR
    stem = reporting.results_stem(os.path.join(folder, args.name) if args.name else None, "mask2former-export-drift-cpu",
                                  folder=folder, overwrite=args.overwrite)

    def log(message):
        print(f"drift: {message}", file=sys.stderr, flush=True)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for weights in args.weights.split(","):
            results.append(measure(weights, height, width, threads, tmp, log))
            report = {"environment": env, "loadavg_end": reporting.loadavg(), "results": results}
            reporting.write_report(stem, report, markdown(report), overwrite=args.overwrite)  # after each: a cut run keeps it
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
