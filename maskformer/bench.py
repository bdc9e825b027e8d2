"""End-to-end throughput benchmark: ours against transformers, post-processing included.

    maskformer bench [--models tiny,large] [--batches 1,2] [--dtypes float32,bfloat16] [--impls ...]
    python -m benchmarks.e2e ...        (the same)

For each model architecture (Swin-T at ADE20K's 512 short side, Swin-L at 640; random weights
saved once by transformers, since no trained checkpoint can be downloaded here; ``default``: the
trained default model shipped in the package) and each (implementation, dtype, batch), a fresh
subprocess loads the checkpoint, runs ``--warmup`` untimed iterations, then ``--repeats`` timed
ones. One iteration is the model's forward plus semantic post-processing to the original image
size (preprocessing is the same for every row and excluded). The inputs are synthetic images
(``maskformer.synthetic``: textured shapes), normalised as the processor does, not noise. Before
timing, each row's semantic maps are compared with those of our fp32 reference (``agree``:
fraction of equal pixels; ``ref_classes``: how many labels the reference map holds). Random
weights give near-constant maps (one or two labels), on which agreement says little; the
``default`` rows are the ones where it measures rounding against real decision boundaries. Peak memory is the CUDA allocator's peak over
what was allocated before the timed loop on a GPU; on the CPU it is the peak resident memory
during the timed loop over the resident memory just before it (Linux: the kernel's VmHWM mark,
reset through /proc/self/clear_refs), i.e. the activations and outputs, not the weights.

Implementations: ``transformers-eager``, ``transformers-compile`` (torch.compile of the model),
``maskformer-reference`` (backend "reference"), ``maskformer-fast`` (backend "auto"),
``maskformer-fast-cudagraph`` (backend "auto", the forward replayed as one CUDA graph by
``maskformer.CUDAGraphRunner``; CUDA only, not in the default set).
Results: ``benchmarks/results/<device-slug>.json`` (top-level device, torch, triton, commit,
rows) and a Markdown table beside it, rewritten after every row, so a run cut short keeps the rows
it finished. ``--row-timeout`` bounds each row's process and ``--max-seconds`` the whole run: rows
not started in time are listed as not run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

# ADE20K checkpoints' architectures (facebook/maskformer-swin-{tiny,large}-ade) and the input
# sizes their processors produce for a 4:3 image at the ADE short side.
MODELS = {
    "tiny": dict(backbone=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
                 image=(512, 683)),
    "large": dict(backbone=dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12),
                  image=(640, 853)),
    # a seconds-long smoke configuration for tests, not a published number
    "toy": dict(backbone=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7),
                decoder=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, num_queries=10), fpn=64,
                image=(96, 128)),
}
# The only trained weights available offline: the package's default model (synthetic shapes).
MODELS["default"] = dict(checkpoint="default", image=(512, 683))
AGREE_BAR = 0.999  # semantic maps vs the fp32 reference (issue target: >= 99.9% of pixels)
IMPLS = ("transformers-eager", "transformers-compile", "maskformer-reference", "maskformer-fast")
# Asked for by name only (--impls): not part of the default set.
EXTRA_IMPLS = ("maskformer-fast-cudagraph",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_name(model: str) -> str:
    return "default-model" if model == "default" else f"swin-{model}"


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_checkpoint(model: str, folder: str) -> str:
    """Save a transformers MaskFormer of the given architecture (random weights, seed 0) to ``folder``."""
    from transformers import DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig
    import torch

    spec = MODELS[model]
    if spec.get("checkpoint") == "default":
        from .loading import DEFAULT_MODEL_DIR

        return DEFAULT_MODEL_DIR  # read-only use: every row loads it, nothing writes there
    fpn = spec.get("fpn", 256)
    config = MaskFormerConfig(
        backbone_config=SwinConfig(image_size=384, out_features=["stage1", "stage2", "stage3", "stage4"], **spec["backbone"]),
        decoder_config=DetrConfig(**spec.get("decoder", {})),
        fpn_feature_size=fpn,
        mask_feature_size=fpn,
        id2label={i: f"class_{i}" for i in range(150)},
    )
    torch.manual_seed(0)
    MaskFormerForInstanceSegmentation(config).eval().save_pretrained(folder)
    return folder


def speedups(rows: List[Dict]) -> List[Dict]:
    """maskformer-fast's latency ratio against transformers rows of the same model and batch."""
    ok = {(r["model"], r["batch"], r["impl"], r["dtype"]): r["latency_ms"] for r in rows if "error" not in r}
    out = []
    for (model, batch, impl, dtype), latency in ok.items():
        if impl != "maskformer-fast":
            continue
        ratio = lambda other: round(other / latency, 3) if other else None  # noqa: E731
        out.append(dict(model=model, batch=batch, dtype=dtype,
                        vs_eager_fp32=ratio(ok.get((model, batch, "transformers-eager", "float32"))),
                        vs_eager_same=ratio(ok.get((model, batch, "transformers-eager", dtype))),
                        vs_compile_same=ratio(ok.get((model, batch, "transformers-compile", dtype)))))
    return out


def proc_status_kib(field: str) -> int:
    """A KiB field (VmRSS, VmHWM, ...) of /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: write 5 to clear_refs) and
    return the current RSS in KiB; extra memory since then is ``peak_rss_kib() -`` this."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status_kib("VmRSS")
    except OSError:  # not Linux, or not allowed: fall back to the lifetime peak (an upper bound)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    try:
        return proc_status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_peak_extra(fn, *args, device: str = "cpu"):
    """Run ``fn(*args)`` once -> (result, peak extra MiB during the call, method).

    CUDA: the allocator's peak over what was allocated before. CPU: peak resident memory during
    the call over the resident memory just before it (VmHWM after clear_refs). Run it in a fresh
    process after a warm-up call, so that lazy initialisation is not counted.
    """
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn(*args)
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda allocator"
    base = reset_peak_rss()
    result = fn(*args)
    return result, max(0, peak_rss_kib() - base) / 1024, "VmHWM - VmRSS (clear_refs)"


def synthetic_pixel_values(batch: int, height: int, width: int):
    """(batch, 3, height, width) float32: synthetic images (seeds 5e7 + i), rescaled and
    normalised with the processor's ImageNet mean/std, not resized (the size is the benchmark's)."""
    import torch

    from .processing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from .synthetic import make_sample

    images = np.stack([np.asarray(make_sample(5 * 10**7 + i, height, width)[0]) for i in range(batch)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def default_dtypes(device: str):
    """-> (dtypes to run, {skipped dtype: why}). CUDA: fp32, bf16, fp16. CPU: fp32, plus each half
    type oneDNN computes natively (bf16 needs avx512_bf16 or AMX; without it, and for fp16 on
    most x86 CPUs, PyTorch emulates: measured 33 s per Swin-T image in fp16 on a 2-core EPYC
    where fp32 takes 1.0 s, so such a row says nothing about a half-precision path)."""
    import torch

    if device.startswith("cuda"):
        return ["float32", "bfloat16", "float16"], {}
    dtypes, skipped = ["float32"], {}
    for name, supported in (("bfloat16", torch.ops.mkldnn._is_mkldnn_bf16_supported),
                            ("float16", torch.ops.mkldnn._is_mkldnn_fp16_supported)):
        if supported():
            dtypes.append(name)
        else:
            skipped[name] = "this CPU has no native support (oneDNN would emulate it); pass --dtypes to run it anyway"
    return dtypes, skipped


# ---------------------------------------------------------------------------------------------
# one row, in its own process
def run_row(impl: str, checkpoint: str, dtype_name: str, batch: int, height: int, width: int, device: str,
            warmup: int, repeats: int, maps_out: str) -> Dict:
    import torch

    dtype = getattr(torch, dtype_name)
    pixel_values = synthetic_pixel_values(batch, height, width)
    target_sizes = [(height, width)] * batch

    if impl.startswith("transformers"):
        from transformers import MaskFormerForInstanceSegmentation as HF
        from transformers import MaskFormerImageProcessor as HFProcessor

        # Loaded in fp32, then cast with .to() (every floating parameter and buffer): with
        # transformers 5.17 on CUDA, from_pretrained(dtype=torch.bfloat16) rows failed with
        # "expected scalar type Float but found BFloat16" (H200, 2026-11-26; where, not established:
        # the row kept one line). Rows now keep the traceback's end (error_log) to tell.
        model = HF.from_pretrained(checkpoint).to(device=device, dtype=dtype).eval()
        processor = HFProcessor()
        if impl == "transformers-compile":
            model = torch.compile(model)
    else:
        from . import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor

        model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, dtype=dtype, device=device)
        processor = MaskFormerImageProcessor()
        try:
            from . import dispatch

            dispatch.set_backend("reference" if impl == "maskformer-reference" else "auto")
        except ImportError:
            pass
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    forward = lambda: model(pixel_values=pixel_values)  # noqa: E731
    if impl == "maskformer-fast-cudagraph":
        from .modeling import CUDAGraphRunner

        runner = CUDAGraphRunner(model, pixel_values)  # warm-up and capture (raises off CUDA)
        forward = lambda: runner(pixel_values)  # noqa: E731

    def step():
        with torch.inference_mode():
            out = forward()
            return processor.post_process_semantic_segmentation(out, target_sizes=target_sizes)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    maps = step()  # also the first warm-up (compilation happens here for torch.compile)
    np.save(maps_out, np.stack([m.cpu().numpy().astype(np.int32) for m in maps]))
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = reset_peak_rss()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = max(0, peak_rss_kib() - rss_before) / 1024
    median = float(np.median(times))
    return {"latency_ms": median * 1000, "images_per_s": batch / median, "peak_mem_mb": peak_mb,
            "times_ms": [t * 1000 for t in times]}


# ---------------------------------------------------------------------------------------------
def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="maskformer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--dtypes", default=None,
                        help="default: float32,bfloat16,float16 on CUDA; on the CPU float32 and the half types it "
                             "computes natively")
    parser.add_argument("--impls", default=None,
                        help="comma list of: " + ", ".join(IMPLS + EXTRA_IMPLS) + " (default: the first four on "
                             "CUDA; all but transformers-compile on the CPU, where compiling takes minutes per row)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--name", default=None,
                        help="results file stem (default e2e-<device>-<device name>); for runs that must not "
                             "replace another's file, e.g. a slow model measured separately")
    parser.add_argument("--row-timeout", type=float, default=None, help="seconds per row's process (default none)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no row after this many seconds; the rest are listed as not run (default none)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row and print JSON
    args = parser.parse_args(argv)

    if args.row:
        spec = json.loads(args.row)
        print("ROW " + json.dumps(run_row(**spec)))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtypes:
        dtypes, skipped_dtypes = args.dtypes.split(","), {}
    else:
        dtypes, skipped_dtypes = default_dtypes(device)
        for name, why in skipped_dtypes.items():
            print(f"  skipping {name}: {why}", file=sys.stderr)
    impls = (args.impls or ",".join(i for i in IMPLS if device.startswith("cuda") or i != "transformers-compile")).split(",")
    unknown = [i for i in impls if i not in IMPLS + EXTRA_IMPLS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown implementation or model: {unknown}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = _device_name(device)
    rows = []
    started = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, _slug(args.name or f"e2e-{device}-{device_name}"))
    meta = dict(device=device_name, torch=torch.__version__, triton=triton_version, commit=_commit(),
                date=time.strftime("%Y-%m-%d"), python=platform.python_version(), threads=torch.get_num_threads(),
                warmup=args.warmup, repeats=args.repeats, skipped_dtypes=skipped_dtypes)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            height, width = MODELS[model]["image"]
            checkpoint = None
            # the fp32 reference maps every row is compared with
            plan = [("maskformer-reference", "float32")] + [(i, d) for i in impls for d in dtypes
                                                            if (i, d) != ("maskformer-reference", "float32")]
            for batch in [int(b) for b in args.batches.split(",")]:
                reference_maps = None
                for impl, dtype in plan:
                    if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                        rows.append(dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch,
                                         error=f"not run: the {args.max_seconds:.0f} s budget (--max-seconds) was spent"))
                        continue
                    if checkpoint is None:
                        checkpoint = make_checkpoint(model, os.path.join(tmp, model))
                    rows.append(_run_one(model, impl, dtype, batch, height, width, device, checkpoint, args, tmp,
                                         reference_maps))
                    if "error" not in rows[-1] and reference_maps is None:
                        reference_maps = np.load(os.path.join(tmp, "maps.npy"))
                    write_report(stem, meta, rows)
    write_report(stem, meta, rows)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def _run_one(model, impl, dtype, batch, height, width, device, checkpoint, args, tmp, reference_maps) -> Dict:
    """One row in its own process -> the row (with ``error`` when it failed or timed out)."""
    maps_out = os.path.join(tmp, "maps.npy")
    if os.path.exists(maps_out):
        os.remove(maps_out)
    spec = dict(impl=impl, checkpoint=checkpoint, dtype_name=dtype, batch=batch, height=height,
                width=width, device=device, warmup=args.warmup, repeats=args.repeats, maps_out=maps_out)
    try:
        proc = subprocess.run([sys.executable, "-m", "maskformer.bench", "--row", json.dumps(spec)],
                              capture_output=True, text=True, cwd=REPO, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {model} {impl} {dtype} b{batch}: TIMED OUT after {args.row_timeout:.0f} s", file=sys.stderr)
        return dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch,
                    error=f"timed out after {args.row_timeout:.0f} s (--row-timeout)")
    line = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
    if proc.returncode != 0 or not line:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        print(f"  {model} {impl} {dtype} b{batch}: FAILED: {lines[-1]}", file=sys.stderr)
        # the traceback's end too: a row that fails on a lent GPU must say where, since the next
        # chance to look may be weeks away
        return dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch, error=lines[-1],
                    error_log="\n".join(lines[-25:]))
    result = json.loads(line[0][4:])
    maps = np.load(maps_out)
    reference = maps if reference_maps is None else reference_maps
    agree = float((maps == reference).mean()) if maps.shape == reference.shape else 0.0
    row = dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch,
               images_per_s=round(result["images_per_s"], 4), latency_ms=round(result["latency_ms"], 2),
               peak_mem_mb=round(result["peak_mem_mb"], 1), agree=round(agree, 6),
               agree_ok=agree >= AGREE_BAR, ref_classes=int(len(np.unique(reference))),
               input=[height, width], times_ms=[round(t, 2) for t in result["times_ms"]])
    print(f"  {row['model']:11s} {impl:21s} {dtype:9s} b{batch}: {row['images_per_s']:8.3f} img/s "
          f"{row['latency_ms']:9.1f} ms  peak +{row['peak_mem_mb']:8.1f} MB  agree {agree:.4%}", flush=True)
    return row


def write_report(stem: str, meta: Dict, rows: List[Dict]) -> None:
    """``stem``.json and .md from the rows so far (called after every row)."""
    report = dict(meta, rows=rows, speedups=speedups(rows), note=(
        "swin-* rows: random weights (no trained checkpoint can be downloaded here), near-constant maps; "
        "default-model rows: the trained default model. agree = fraction of semantic-map pixels equal to "
        "maskformer-reference float32 at the same batch; inputs are synthetic images"))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"# End-to-end benchmark: {report['device']}\n\n")
        f.write(f"torch {report['torch']}, triton {report['triton']}, commit {report['commit']}, {report['date']}, "
                f"{report['threads']} threads, median of {report['repeats']} after {report['warmup']} warm-up.\n"
                "One iteration = forward + semantic post-processing to the input size, on synthetic images. "
                "swin-* rows have random weights (their maps hold `ref classes` labels, so `agree` says little "
                "there); default-model rows are the trained default model.\n\n")
        for name, why in report["skipped_dtypes"].items():
            f.write(f"Not run: {name}: {why}.\n\n")
        f.write("| model | impl | dtype | batch | images/s | latency ms | peak MB | agree | ref classes |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            if "error" in r:
                f.write(f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['batch']} | failed: {r['error'][:60]} | | | | |\n")
            else:
                flag = "" if r["agree_ok"] else f" (< {AGREE_BAR:.1%})"
                f.write(f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.3f} | "
                        f"{r['latency_ms']:.1f} | {r['peak_mem_mb']:.1f} | {r['agree']:.4%}{flag} | {r['ref_classes']} |\n")
        if report["speedups"]:
            f.write("\nSpeed-up of maskformer-fast (latency ratio, same model and batch):\n\n"
                    "| model | batch | fast dtype | vs transformers-eager fp32 | vs transformers-eager same dtype "
                    "| vs transformers-compile same dtype |\n|---|---|---|---|---|---|\n")
            for sp in report["speedups"]:
                cells = [f"{sp[k]:.2f}x" if sp.get(k) else "-" for k in ("vs_eager_fp32", "vs_eager_same", "vs_compile_same")]
                f.write(f"| {sp['model']} | {sp['batch']} | {sp['dtype']} | " + " | ".join(cells) + " |\n")


if __name__ == "__main__":
    sys.exit(main())
