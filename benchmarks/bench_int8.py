"""Is an int8 CPU engine worth offering? ONNX Runtime's dynamic int8 quantisation of our export,
against the fp32 export, on the two models the CPU-engines issue names.

    python -m benchmarks.bench_int8 [--rounds 7] [--threads N] [--out STEM] [--overwrite]

For the trained default model (``maskformer/default_model``, on generated images of its four
classes) and a Swin-T ADE-architecture model with the benchmark's lively random weights
(``maskformer.bench.make_checkpoint("tiny")``), at 512x683, batch 1: export fp32 ONNX (logits
only), quantise it with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
quantised per call: ORT's CPU int8 recipe for transformer models), run both with ONNX Runtime,
interleaved round by round, and compare the semantic maps (our post-processing on each) pixel by
pixel. The issue's bar for offering int8: faster than fp32 *and* at least 99% of pixels equal on
the default model and 98% on the lively Swin-T. Writes ``out/benchmarks/int8-cpu.json`` / ``.md``
(``--out STEM``; an existing file is replaced only with ``--overwrite``) with the environment of
``maskformer.reporting`` (CPU model and flags, threads, load averages, versions, commit).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from maskformer import reporting

BARS = {"default": 0.99, "tiny": 0.98}


def _pixel_values(model: str, height: int, width: int) -> torch.Tensor:
    from maskformer.bench import synthetic_pixel_values

    if model != "default":
        return synthetic_pixel_values(1, height, width)
    from maskformer import MaskFormerImageProcessor
    from maskformer.loading import DEFAULT_MODEL_DIR
    from maskformer.synthetic import make_sample

    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    image, _ = make_sample(7, height=height, width=width)
    return processor(images=[image], return_tensors="pt", do_resize=False)["pixel_values"]


def measure(model: str, rounds: int, threads: int, tmp: str):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor
    from maskformer.bench import make_checkpoint
    from maskformer.engines.onnxruntime_engine import session_options
    from maskformer.export import export_onnx
    from maskformer.modeling import MaskFormerForInstanceSegmentationOutput

    height, width = 512, 683
    checkpoint = make_checkpoint(model, os.path.join(tmp, model), "lively")
    torch_model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, dtype="float32", device="cpu")
    fp32 = os.path.join(tmp, f"{model}-fp32.onnx")
    int8 = os.path.join(tmp, f"{model}-int8.onnx")
    export_onnx(torch_model, fp32, outputs="logits", verify=False)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    x = _pixel_values(model, height, width).numpy()
    sessions = {name: ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
                for name, path in (("fp32", fp32), ("int8", int8))}
    processor = MaskFormerImageProcessor()
    maps = {}
    for name, session in sessions.items():
        class_logits, mask_logits = session.run(["class_queries_logits", "masks_queries_logits"], {"pixel_values": x})
        out = MaskFormerForInstanceSegmentationOutput(class_queries_logits=torch.from_numpy(class_logits),
                                                      masks_queries_logits=torch.from_numpy(mask_logits))
        maps[name] = processor.post_process_semantic_segmentation(out, target_sizes=[(height, width)])[0].numpy()
    agree = float((maps["fp32"] == maps["int8"]).mean())
    times = {name: [] for name in sessions}
    loads = []
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(["class_queries_logits", "masks_queries_logits"], {"pixel_values": x})
            times[name].append((time.perf_counter() - start) * 1e3)
        loads.append((reporting.loadavg() or [float("nan")])[0])
    paired = statistics.median(f / i for f, i in zip(times["fp32"], times["int8"]))
    return dict(model=model, size=[height, width], agree=agree, bar=BARS[model],
                labels_fp32=int(len(np.unique(maps["fp32"]))),
                fp32_ms=statistics.median(times["fp32"]), int8_ms=statistics.median(times["int8"]),
                speedup_paired=paired, loadavg_rounds=[round(v, 2) for v in loads],
                offer=bool(paired > 1.0 and agree >= BARS[model]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help=f"results file stem (default {reporting.DEFAULT_RESULTS_DIR}/int8-cpu, or the next free "
                             "-2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files if they exist")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stem = reporting.results_stem(args.out, "int8-cpu", overwrite=args.overwrite)  # before measuring
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    env = reporting.environment("cpu", threads=threads)

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, args.rounds, threads, tmp) for model in ("default", "tiny")]
    report = dict(environment=env, loadavg_end=reporting.loadavg(), rounds=args.rounds, rows=rows)
    lines = [
        "# int8 (ONNX Runtime dynamic quantisation) vs fp32 on the CPU", "",
        *reporting.environment_markdown(env, loadavg_end=report["loadavg_end"]), "",
        f"Forward only, batch 1, {args.rounds} interleaved rounds; agree = semantic-map pixels equal to fp32's.", "",
        "| model | labels (fp32 map) | agree | bar | fp32 ms | int8 ms | int8 speed-up (paired) | 1-min load | offered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['labels_fp32']} | {r['agree']:.4%} | {r['bar']:.0%} | {r['fp32_ms']:.1f} | "
                     f"{r['int8_ms']:.1f} | {r['speedup_paired']:.3f}x | {min(r['loadavg_rounds'])}-"
                     f"{max(r['loadavg_rounds'])} | {'yes' if r['offer'] else 'no'} |")
    paths = reporting.write_report(stem, report, "\n".join(lines), overwrite=args.overwrite)
    print("\n".join(lines))
    print("wrote " + " and ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
