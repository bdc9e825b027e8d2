"""What the engine cache's checks and steps cost: the numbers behind the comments of
``maskformer/engines/cache.py``, ``openvino_engine.py`` and the export's time estimate.

    python -m benchmarks.bench_engine_cache [--rounds 3] [--threads N] [--out STEM] [--overwrite]

Rows, on models made in a temporary folder (random "lively" weights, ``maskformer.bench``):

* export: ``export_onnx(verify=False)`` of the shipped default model and of a Swin-T ADE
  architecture (41.8 M parameters), with the number of layers traced (Swin blocks + decoder
  layers): the fit behind ``maskformer.engines.export.estimate_export_seconds``;
* hash: SHA-256 of the Swin-T and Swin-L weight files (page cache warm), against the ``os.stat``
  that stands in for it when the file is unchanged (``cache.file_sha256``);
* load: a warm ``from_pretrained(engine=...)`` of Swin-T (ONNX Runtime, OpenVINO), interleaved
  with the entry check alone (``cache.check_entry``: every file's SHA-256): the check's share;
* compiled: OpenVINO's compiled blob per input shape against the model's weights, and a compile
  against reading the blob back (512x683), interleaved.

Writes ``engine-cache-cpu.json`` / ``.md`` (``maskformer.reporting``: under out/benchmarks/ by default,
never over an existing file without ``--overwrite``) with the environment (CPU model and flags,
threads, versions, commit) and the 1-minute load average of every row (this machine is shared:
compare within a run only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _layers(config) -> int:
    return sum(config.backbone_config.depths) + config.decoder_config.decoder_layers


def export_rows(tmp: str, checkpoints, rounds: int):
    from maskformer import MaskFormerForInstanceSegmentation
    from maskformer.export import export_onnx

    rows = []
    for r in range(rounds):
        for name, path in checkpoints.items():
            model = MaskFormerForInstanceSegmentation.from_pretrained(path, dtype="float32", device="cpu")
            out = os.path.join(tmp, f"{name}-{r}.onnx")
            load = _load()
            report = export_onnx(model, out, verify=False)
            rows.append(dict(model=name, round=r, layers=_layers(model.config),
                             params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                             seconds=round(report.seconds, 1), loadavg=[load, _load()]))
            os.remove(out)
    return rows


def hash_rows(files, rounds: int):
    from maskformer.engines.cache import sha256_of

    rows = []
    for name, path in files.items():
        sha256_of(path)  # into the page cache
        seconds, stats = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            sha256_of(path)
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(1000):
                os.stat(path)
            stats.append((time.perf_counter() - start) / 1000)
        mb = os.path.getsize(path) / 1e6
        rows.append(dict(file=name, mb=round(mb, 1), sha256_ms=round(statistics.median(seconds) * 1e3, 1),
                         mb_per_s=round(mb / statistics.median(seconds)), stat_us=round(statistics.median(stats) * 1e6, 2),
                         loadavg=_load()))
    return rows


def load_rows(checkpoint: str, cache_dir: str, rounds: int, threads: int):
    from maskformer import MaskFormerForInstanceSegmentation
    from maskformer.engines import cache

    rows = []
    for engine in ("onnxruntime", "openvino"):
        model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine=engine, engine_cache_dir=cache_dir,
                                                                  threads=threads)  # builds once
        manifest = json.load(open(os.path.join(model.cache_entry, cache.MANIFEST)))
        key = manifest["key"]
        loads, checks = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine=engine, engine_cache_dir=cache_dir,
                                                              threads=threads)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert cache.check_entry(model.cache_entry, key) is None
            checks.append(time.perf_counter() - start)
        files = {n: os.path.getsize(os.path.join(model.cache_entry, n)) for n in os.listdir(model.cache_entry)
                 if os.path.isfile(os.path.join(model.cache_entry, n))}
        rows.append(dict(engine=engine, build_seconds=manifest["build_seconds"],
                         export_reused=bool(manifest["export_reused_from"]), entry_mb=round(sum(files.values()) / 1e6, 1),
                         warm_load_ms=round(statistics.median(loads) * 1e3), check_ms=round(statistics.median(checks) * 1e3),
                         check_share_paired=round(statistics.median(c / l for c, l in zip(checks, loads)), 3),
                         loadavg=_load()))
    return rows


def compiled_rows(checkpoint: str, cache_dir: str, rounds: int, threads: int):
    from maskformer import MaskFormerForInstanceSegmentation
    from maskformer.engines import openvino_engine

    model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine="openvino", engine_cache_dir=cache_dir,
                                                              threads=threads)
    entry = model.cache_entry
    shape = (1, 3, 512, 683)
    cold, warm = [], []
    for _ in range(rounds):
        runner = openvino_engine.Runner.from_entry(entry, threads)  # reads a kept blob back if there is one
        uncached = openvino_engine.Runner.from_entry(entry, threads, keep_compiled=False)
        start = time.perf_counter()
        uncached.compiled_for(shape)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.compiled_for(shape)
        warm.append(time.perf_counter() - start)
    folder = os.path.join(entry, openvino_engine.COMPILED_DIR)
    blobs = [os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)]
    weights = os.path.getsize(os.path.join(entry, openvino_engine.WEIGHTS_FILE))
    return [dict(shape=list(shape), weights_mb=round(weights / 1e6, 1), blob_mb=round(max(blobs) / 1e6, 1),
                 compile_ms=round(statistics.median(cold[1:] or cold) * 1e3),
                 read_back_ms=round(statistics.median(warm[1:] or warm) * 1e3),
                 read_back_speedup_paired=round(statistics.median(c / w for c, w in zip(cold[1:], warm[1:])), 2)
                 if rounds > 1 else None, loadavg=_load())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--export-rounds", type=int, default=1, help="exports of each model (minutes each here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results file stem (default out/benchmarks/engine-cache-cpu, or "
                                                    "the next free -2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files if they exist")
    args = parser.parse_args(argv)
    from maskformer import reporting

    try:
        stem = reporting.results_stem(args.out, "engine-cache-cpu", overwrite=args.overwrite)  # before measuring
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    import onnxruntime  # noqa: F401  (both engines must be installed: fail before minutes of measuring)
    import openvino  # noqa: F401

    from maskformer._ext import cpu_flags
    from maskformer.bench import make_checkpoint
    from maskformer.loading import DEFAULT_MODEL_DIR

    env = reporting.environment("cpu", threads=threads)
    report = dict(environment=env, sha_ni=cpu_flags(("sha_ni",))["sha_ni"], loadavg_start=_load())
    with tempfile.TemporaryDirectory() as tmp:
        swin_t = make_checkpoint("tiny", os.path.join(tmp, "swin-t"))
        report["export"] = export_rows(tmp, {"default": DEFAULT_MODEL_DIR, "swin-t": swin_t}, args.export_rounds)
        swin_l = make_checkpoint("large", os.path.join(tmp, "swin-l"))
        report["hash"] = hash_rows({"swin-t model.safetensors": os.path.join(swin_t, "model.safetensors"),
                                    "swin-l model.safetensors": os.path.join(swin_l, "model.safetensors")}, args.rounds)
        cache_dir = os.path.join(tmp, "cache")
        report["load"] = load_rows(swin_t, cache_dir, args.rounds, threads)
        report["compiled"] = compiled_rows(swin_t, cache_dir, args.rounds, threads)
    report["loadavg_end"] = _load()
    lines = ["# Engine cache: what its checks and steps cost (CPU)", "",
             *reporting.environment_markdown(env, loadavg_end=[report["loadavg_end"]]),
             f"SHA extensions (sha_ni): {'yes' if report['sha_ni'] else 'no'}; 1-minute load "
             f"{report['loadavg_start']} at the start (a shared machine).", "",
             "## Export (trace + write, no verification)", "",
             "| model | parameters | layers traced | seconds | 1-min load |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params_m']} M | {r['layers']} | {r['seconds']} | {r['loadavg'][0]}-{r['loadavg'][1]} |"
              for r in report["export"]]
    lines += ["", "## SHA-256 of weight files (page cache warm) against a stat", "",
              "| file | MB | SHA-256 ms | MB/s | os.stat us | 1-min load |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['mb']} | {r['sha256_ms']} | {r['mb_per_s']} | {r['stat_us']} | {r['loadavg']} |"
              for r in report["hash"]]
    lines += ["", "## Warm load of Swin-T and the entry check within it", "",
              "| engine | build s (first use) | entry MB | warm load ms | check ms | check / load (paired) | 1-min load |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r.get('build_seconds')}{' (export reused)' if r.get('export_reused') else ''} | "
              f"{r['entry_mb']} | {r['warm_load_ms']} | {r['check_ms']} | {r['check_share_paired']} | "
              f"{r['loadavg']} |" for r in report["load"]]
    lines += ["", "## OpenVINO compiled shapes (Swin-T)", "",
              "| shape | model.bin MB | blob MB | compile ms | read back ms | compile / read back (paired) | 1-min load |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {'x'.join(map(str, r['shape']))} | {r['weights_mb']} | {r['blob_mb']} | {r['compile_ms']} | "
              f"{r['read_back_ms']} | {r['read_back_speedup_paired']} | {r['loadavg']} |" for r in report["compiled"]]
    reporting.write_report(stem, report, "\n".join(lines) + "\n", overwrite=args.overwrite)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
