"""How well-conditioned are the benchmark's lively random weights *as maps*? (issue #22)

The agreement bar for reduced precision (99.5% of pixels equal to the fp32 maps) presumes weights
whose maps do not flip under rounding. ``maskformer.bench.lively_weights_`` makes the logits well
conditioned (fp32 vs float64 about 2e-5 relative), but a semantic map is an argmax over summed
class x mask scores, and near-ties flip under any rounding. This script measures, for the
benchmark's recipe and a few variants (noise on every weight, the query embeddings, the class
head and the mask embedder's last layer scaled), on MaskFormer Swin-T at 512x683, two synthetic
images, our torch model:

* labels per float64 map and the largest label's share;
* fp32 maps vs float64 maps (what fp32 itself can promise);
* bf16 maps (our torch bf16 path) vs fp32 maps.

    python -m benchmarks.bf16_map_conditioning [--out STEM] [--overwrite]

Writes STEM.json / STEM.md (default out/benchmarks/bf16-map-conditioning-cpu).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, reporting
from maskformer.bench import make_checkpoint, synthetic_pixel_values

HEIGHT, WIDTH = 512, 683
# (noise std on every weight, queries_embedder x, class_predictor x, mask_embedder's last layer x);
# the first row is maskformer.bench.lively_weights_'s recipe
VARIANTS = [(0.1, 8, 3, 1), (0.1, 8, 10, 1), (0.1, 8, 30, 1), (0.05, 8, 10, 1), (0.1, 2, 10, 1),
            (0.1, 8, 3, 4), (0.1, 8, 3, 16)]


def _model(folder, noise, q, c, m, seed=0):
    model = MaskFormerForInstanceSegmentation.from_pretrained(folder).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
            if name.endswith("queries_embedder.weight"):
                p.mul_(q)
            elif name == "class_predictor.weight":
                p.mul_(c)
            elif name.startswith("mask_embedder.2.0."):
                p.mul_(m)
    return model


def _maps(model, dtype, pixel_values, processor):
    model = model.to(dtype)
    with torch.no_grad():
        out = model(pixel_values.to(dtype))
    return processor.post_process_semantic_segmentation(out, target_sizes=[(HEIGHT, WIDTH)] * len(pixel_values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results stem; default out/benchmarks/bf16-map-conditioning-cpu")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    stem = reporting.results_stem(args.out, "bf16-map-conditioning-cpu", overwrite=args.overwrite)
    env = reporting.environment("cpu", threads=torch.get_num_threads())
    processor = MaskFormerImageProcessor()
    pixel_values = synthetic_pixel_values(2, HEIGHT, WIDTH)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint("tiny", os.path.join(tmp, "random"), weights="random")
        for noise, q, c, m in VARIANTS:
            t = time.time()
            exact = _maps(_model(folder, noise, q, c, m), torch.float64, pixel_values, processor)
            fp32 = _maps(_model(folder, noise, q, c, m), torch.float32, pixel_values, processor)
            bf16 = _maps(_model(folder, noise, q, c, m), torch.bfloat16, pixel_values, processor)
            rows.append({
                "noise": noise, "queries_x": q, "class_x": c, "mask_x": m,
                "labels": [len(torch.unique(r)) for r in exact],
                "largest_share": [round(float(torch.bincount(r.flatten()).max()) / r.numel(), 4) for r in exact],
                "fp32_vs_fp64": [round(float((a == b).float().mean()), 5) for a, b in zip(fp32, exact)],
                "bf16_vs_fp32": [round(float((a == b).float().mean()), 5) for a, b in zip(bf16, fp32)],
                "seconds": round(time.time() - t, 1),
            })
            print(rows[-1], file=sys.stderr, flush=True)
    report = {"environment": env, "model": "MaskFormer Swin-T ADE architecture, random weights (seed 0) + variant",
              "input": f"2x3x{HEIGHT}x{WIDTH} synthetic", "rows": rows}
    lines = [f"# Are the lively weights' maps well conditioned? MaskFormer Swin-T {HEIGHT}x{WIDTH}, 2 images", ""]
    lines += reporting.environment_markdown(env) + [""]
    lines += ["| noise | queries x | class x | mask x | labels | largest | fp32 = fp64 maps | bf16 = fp32 maps |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['noise']} | {r['queries_x']} | {r['class_x']} | {r['mask_x']} | {r['labels']} | "
                     f"{r['largest_share']} | {r['fp32_vs_fp64']} | {r['bf16_vs_fp32']} |")
    lines += ["", "The first row is `maskformer.bench.lively_weights_`'s recipe (the benchmark's `lively`)."]
    reporting.write_report(stem, report, "\n".join(lines), overwrite=args.overwrite)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
