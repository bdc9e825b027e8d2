"""Benchmark: Swin window attention, the Triton op against the reference, transformers-style eager
attention and SDPA with a materialised bias, at the Swin-L stage shapes of a 640x640 input
(window 12, head_dim 32; stages 160x160x192/6 heads, 80x80x384/12, 40x40x768/24, 20x20x1536/48).

Script mode verifies every implementation against the fp32 reference first, then times it
(``triton.testing.do_bench``: median and 20/80% quantiles of CUDA-event times), and writes
``out/benchmarks/window_attention-<device>.json`` (``--out FILE``; an existing file is replaced only
with ``--overwrite``) with the environment of ``maskformer.reporting`` (device, versions, commit),
the kernel source's hash and the config:

    python benchmarks/bench_window_attention.py                 # bf16 + fp16, both shifts, batch 1
    python benchmarks/bench_window_attention.py --sweep         # + the kernel's tile configurations
    python benchmarks/bench_window_attention.py --dry-run --out x.json   # CPU, interpreter, one tiny stage

Without a CUDA device it says so, skips every GPU timing and times the reference on CPU at one
small shape. ``--dry-run`` (under TRITON_INTERPRET=1, on CPU) runs the GPU path's logic, verify
then time every implementation, at one 11x12 stage, to test the plumbing (``benchmarks.gpu_report
--dry-run``); its times mean nothing. Compiling for sm_80/sm_90 without a GPU (registers, spills,
tensor cores) is ``python -m benchmarks.aot``. pytest-benchmark entries (GPU ones skip with a reason on a CPU machine):

    pytest benchmarks/bench_window_attention.py --benchmark-only

Implementations (every one includes the q/k/v projection, so the times compare whole ops):
- ``triton``: ``maskformer.kernels.window_attention.window_attention`` (one GEMM + the kernel)
  with the dense (heads, N, N) bias that a Swin layer caches, as the model calls it;
- ``ref``: ``window_attention_ref`` (computes in fp32 whatever the input dtype);
- ``eager``: the same math in the input dtype, as transformers' MaskFormerSwin does it;
- ``sdpa``: eager with ``F.scaled_dot_product_attention`` and the bias + shift mask materialised
  as its ``attn_mask`` (gathered every call, as a model would);
- ``triton_kernel``/``sdpa_kernel``: attention only, on a precomputed q/k/v (ours: (B, H, W, 3C)
  and the dense bias; SDPA: windows already partitioned, mask already built): the kernel-level
  comparison.

FLOPs (for TFLOP/s): attention 4 * B * nW * heads * N^2 * head_dim over the padded windows (padded
tokens take part, so that work is required), plus 6 * B * H * W * C^2 for the q/k/v projection of
the real tokens in the whole-op rows.
"""
import argparse
import functools
import hashlib
import json
import os
import sys
import time

import pytest
import torch

from maskformer import reporting
from maskformer.kernels import window_attention as wa

WINDOW = 12
# (name, H, W, C, heads) at a 640x640 input: Swin-L embed_dim 192, heads (6, 12, 24, 48), patch 4.
STAGES = [
    ("stage1", 160, 160, 192, 6),
    ("stage2", 80, 80, 384, 12),
    ("stage3", 40, 40, 768, 24),
    ("stage4", 20, 20, 1536, 48),
]
# --dry-run: one stage small enough for the interpreter (one window of 12, padded from 11 rows).
DRY_RUN_STAGES = [("tiny", 11, 12, 32, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tile configurations for --sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages).
SWEEP = [
    (16, 16, 1, 2), (32, 16, 2, 2), (64, 16, 4, 2), (64, 16, 4, 3), (32, 32, 2, 2),
    (64, 32, 4, 2), (64, 64, 4, 2), (128, 16, 8, 2), (128, 32, 8, 2),
]


# ---------------------------------------------------------------------------------------------
# inputs, implementations, FLOPs
# ---------------------------------------------------------------------------------------------


def make_inputs(batch, h, w, c, heads, dtype, device, seed=0):
    """Layernormed x (B, H, W, C), W_qkv (3C, C), b_qkv (3C,), table ((2w-1)^2, heads), in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.layer_norm(torch.randn(batch, h, w, c, generator=g), (c,))
    weight = torch.randn(3 * c, c, generator=g) * (1.5 / c**0.5)
    bias = torch.randn(3 * c, generator=g) * 0.5
    table = 2.0 * torch.randn((2 * WINDOW - 1) ** 2, heads, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias, table))


def _triton_as_the_model_calls_it(x, weight, bias, table, window, shift, heads):
    """The op with the dense (heads, N, N) bias, which a Swin layer builds once and caches
    (``SwinSelfAttention.dense_relative_position_bias``); given the raw table the op expands it at
    every call (a gather and an index copy to the device), which is not what a model pays."""
    return wa.window_attention(x, weight, bias, _dense_cached(table, window), window, shift, heads)


_DENSE = {}


def _dense_cached(table, window):
    key = (table.data_ptr(), table.dtype, table.device, window)
    if key not in _DENSE:
        _DENSE.clear()
        _DENSE[key] = wa.dense_relative_position_bias(table, window)
    return _DENSE[key]


def implementations():
    return {
        "triton": _triton_as_the_model_calls_it,
        "ref": wa.window_attention_ref,
        "eager": wa.window_attention_eager,
        "sdpa": functools.partial(wa.window_attention_eager, use_sdpa=True),
    }


def kernel_only(args, shift, heads):
    """(name -> zero-argument callable) for the attention alone on precomputed inputs."""
    x, weight, bias, table = args
    b, h, w, c = x.shape
    qkv = torch.nn.functional.linear(x, weight, bias)
    out = torch.empty_like(x)
    n, d = WINDOW * WINDOW, c // heads
    hp, wp = -(-h // WINDOW) * WINDOW, -(-w // WINDOW) * WINDOW
    xp = torch.nn.functional.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if shift:
        xp = torch.roll(xp, (-shift, -shift), (1, 2))
    windows = wa.window_partition(xp, WINDOW).reshape(-1, n, c)
    q, k, v = torch.nn.functional.linear(windows, weight, bias).view(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    index = wa.relative_position_index(WINDOW).to(x.device)
    mask = table[index.view(-1)].view(n, n, heads).permute(2, 0, 1).unsqueeze(0)
    if shift:
        mask = (mask + wa.shift_attention_mask(hp, wp, WINDOW, shift, x.device, x.dtype).unsqueeze(1)).repeat(b, 1, 1, 1)
    mask = mask.contiguous()
    # Both kernel rows get their bias precomputed: SDPA the (B, heads, N, N) mask, ours the
    # (heads, N, N) dense table (on the H200, 2026-11-26, passing the raw table made every call
    # rebuild it: ~0.3 ms at every stage, host-bound, whatever the stage's size).
    dense = wa.dense_relative_position_bias(table, WINDOW)
    return {
        "triton_kernel": lambda: wa.launch(qkv, bias, dense, out, WINDOW, shift, heads),
        "sdpa_kernel": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }


def flops(batch, h, w, c, heads, projection=True):
    n = WINDOW * WINDOW
    windows = (-(-h // WINDOW)) * (-(-w // WINDOW))
    attention = 4 * batch * windows * heads * n * n * (c // heads)
    return attention + (6 * batch * h * w * c * c if projection else 0)


# ---------------------------------------------------------------------------------------------
# verification, timing
# ---------------------------------------------------------------------------------------------


def verify(args, shift, heads):
    """Every implementation against the float64 reference: max error <= 2x the eager (input dtype)
    error + one ulp at the output's scale, the rule of tests/kernels/test_window_attention.py.
    Returns {impl: (max_err, bound, ok)}.

    The gold is float64, not fp32: against an fp32 gold the fp32 eager path (the same ops) has zero
    error, so the bar collapsed to one ulp and any other summation order failed it (H200,
    2026-11-26: Triton 6.7e-6 and SDPA 7.6e-6 against a bar of 8.7e-7 at stage 1)."""
    x, weight, bias, table = args
    gold = wa.window_attention_ref(x.double(), weight.double(), bias.double(), table.double(), WINDOW, shift, heads)
    eager_err = (wa.window_attention_eager(*args, WINDOW, shift, heads).double() - gold).abs().max().item()
    bound = 2 * eager_err + torch.finfo(x.dtype).eps * gold.abs().max().item()
    report = {}
    for name, fn in implementations().items():
        out = fn(*args, WINDOW, shift, heads)
        err = (out.double() - gold).abs().max().item()
        ok = out.shape == x.shape and out.dtype == x.dtype and err <= bound and not torch.isnan(out).any().item()
        report[name] = (err, bound, bool(ok))
    return report


def time_cuda(fn):
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def time_cpu(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def environment():
    """``maskformer.reporting.environment`` plus the SHA-256 of the kernel's source file, which
    identifies the kernel that was timed, committed or not."""
    env = reporting.environment("cuda" if torch.cuda.is_available() else "cpu")
    with open(wa.__file__, "rb") as f:
        env["kernel_source_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return env


# ---------------------------------------------------------------------------------------------
# script mode
# ---------------------------------------------------------------------------------------------


def run_gpu(args, record, device="cuda", timer=time_cuda, stages=STAGES):
    """Verify then time every implementation at every stage/dtype/shift (device/timer/stages are
    parameters only so the logic can be dry-run on CPU under the interpreter)."""
    ok = True
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for stage, h, w, c, heads in stages:
            inputs = make_inputs(args.batch, h, w, c, heads, dtype, device)
            for shift in args.shifts:
                label = f"{stage} {h}x{w}x{c} heads={heads} {dtype_name} shift={shift}"
                report = verify(inputs, shift, heads)
                record["verification"].append(
                    dict(stage=stage, dtype=dtype_name, shift=shift,
                         **{impl: dict(max_err=e, bound=b, ok=o) for impl, (e, b, o) in report.items()})
                )
                bad = [impl for impl, (_, _, o) in report.items() if not o]
                print(f"{label}: verified " + ", ".join(f"{k} {e:.2e}/{b:.2e}" for k, (e, b, _) in report.items()))
                if bad:
                    print(f"  MISMATCH in {bad}: not timing this shape", file=sys.stderr)
                    ok = False
                    continue
                fns = {name: functools.partial(fn, *inputs, WINDOW, shift, heads) for name, fn in implementations().items()}
                fns.update(kernel_only(inputs, shift, heads))
                for name, fn in fns.items():
                    median, p20, p80 = timer(fn)
                    total = flops(args.batch, h, w, c, heads, projection=not name.endswith("_kernel"))
                    tflops = total / (median * 1e-3) / 1e12
                    record["results"].append(dict(stage=stage, H=h, W=w, C=c, heads=heads, dtype=dtype_name, shift=shift,
                                                  impl=name, ms=median, ms_p20=p20, ms_p80=p80, flops=total, tflops=tflops))
                    print(f"  {name:>14}: {median:8.4f} ms  [{p20:.4f}, {p80:.4f}]  {tflops:7.2f} TFLOP/s")
                if args.sweep:
                    qkv = torch.nn.functional.linear(inputs[0], inputs[1], inputs[2])
                    out = torch.empty_like(inputs[0])
                    # Other tiles round P (fp16/bf16) against another running max: ~1 ulp apart.
                    default_out = wa.launch(qkv, inputs[2], inputs[3], torch.empty_like(out), WINDOW, shift, heads)
                    for bm, bn, warps, n_stages in SWEEP:
                        fn = functools.partial(wa.launch, qkv, inputs[2], inputs[3], out, WINDOW, shift, heads,
                                               block_m=bm, block_n=bn, num_warps=warps, num_stages=n_stages)
                        fn()
                        same = (out.float() - default_out.float()).abs().max().item()
                        median, _, _ = timer(fn)
                        tflops = flops(args.batch, h, w, c, heads, projection=False) / (median * 1e-3) / 1e12
                        record["sweep"].append(dict(stage=stage, dtype=dtype_name, shift=shift, block_m=bm, block_n=bn,
                                                    num_warps=warps, num_stages=n_stages, ms=median, tflops=tflops,
                                                    max_diff_vs_default=same))
                        print(f"    tiles {bm:>3}x{bn:<3} warps {warps} stages {n_stages}: {median:8.4f} ms {tflops:7.2f} TFLOP/s"
                              f" (max diff vs default {same:.1e})")
    return ok


def run_cpu(args, record):
    """No GPU: time the reference at the smallest stage (stage 4), batch 1, fp32."""
    stage, h, w, c, heads = STAGES[-1]
    inputs = make_inputs(1, h, w, c, heads, torch.float32, "cpu")
    for shift in args.shifts:
        median, lo, hi = time_cpu(functools.partial(wa.window_attention_ref, *inputs, WINDOW, shift, heads))
        total = flops(1, h, w, c, heads)
        record["results"].append(dict(stage=stage, H=h, W=w, C=c, heads=heads, dtype="fp32", shift=shift, impl="ref",
                                      device="cpu", ms=median, ms_min=lo, ms_max=hi, flops=total,
                                      tflops=total / (median * 1e-3) / 1e12))
        print(f"cpu ref {stage} {h}x{w}x{c} heads={heads} fp32 shift={shift}: {median:.2f} ms "
              f"({total / (median * 1e-3) / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--shifts", default="0,6", help="comma-separated shift sizes (window 12: 0 and 6)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile configurations")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU under TRITON_INTERPRET=1, one tiny stage, one repetition: tests the plumbing")
    parser.add_argument("--out", default=None,
                        help=f"results file (default {reporting.DEFAULT_RESULTS_DIR}/window_attention-<device>.json, or "
                             "the next free -2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results file if it exists")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.shifts = [int(s) for s in args.shifts.split(",")]
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.dry_run and not interpreted:
        parser.error("--dry-run runs the Triton op on CPU tensors: set TRITON_INTERPRET=1")
    if interpreted and not args.dry_run:
        parser.error("unset TRITON_INTERPRET: the benchmark times the compiled kernel")

    if args.out is not None and not args.out.endswith(".json"):
        parser.error(f"--out {args.out!r}: the results file is JSON; name it FILE.json")
    # Claimed before measuring: a taken --out is refused now, not after the run.
    try:
        path = reporting.results_stem(None if args.out is None else args.out[:-len(".json")],
                                      f"window_attention-{reporting.slug(device_name())}", overwrite=args.overwrite,
                                      suffixes=(".json",)) + ".json"
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    env = environment()
    record = dict(environment=env, op="window_attention", window=WINDOW, batch=args.batch, dtypes=args.dtypes,
                  shifts=args.shifts, stages=[dict(zip(("name", "H", "W", "C", "heads"), s)) for s in STAGES],
                  verification=[], results=[], sweep=[])
    print(f"device: {env['device_name']}; torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
          f"commit {reporting.commit_text(env)}")
    ok = True
    if args.dry_run:
        print("DRY RUN: CPU tensors under the Triton interpreter, one tiny stage; the times mean nothing")
        record["dry_run"] = True
        record["stages"] = [dict(zip(("name", "H", "W", "C", "heads"), s)) for s in DRY_RUN_STAGES]
        ok = run_gpu(args, record, device="cpu", timer=functools.partial(time_cpu, reps=1), stages=DRY_RUN_STAGES)
        record["verified"] = ok
    elif torch.cuda.is_available():
        reasons = wa.not_supported_reasons(*make_inputs(1, 24, 24, 64, 2, torch.bfloat16, "cuda"), WINDOW, 6, 2)
        if reasons:
            print("the Triton op cannot run here: " + "; ".join(reasons), file=sys.stderr)
            return 2
        ok = run_gpu(args, record)
        record["verified"] = ok
        if ok:
            print("All results match.")
    else:
        print("No CUDA device: the GPU verification and timings are skipped (no GPU numbers in this file); "
              "timing the reference on CPU at one small shape instead.")
        record["gpu_skipped"] = "no CUDA device"
        run_cpu(args, record)
    record["loadavg_end"] = reporting.loadavg()
    reporting.write_text(path, json.dumps(record, indent=1) + "\n", overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entries
# ---------------------------------------------------------------------------------------------


def _cuda_or_skip():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: GPU benchmarks need the compiled kernel")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU benchmark skipped")


@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager", "ref"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", STAGES, ids=[s[0] for s in STAGES])
def test_bench_gpu(benchmark, stage, dtype, impl):
    _cuda_or_skip()
    name, h, w, c, heads = stage
    inputs = make_inputs(1, h, w, c, heads, DTYPES[dtype], "cuda")
    report = verify(inputs, WINDOW // 2, heads)
    err, bound, ok = report[impl]
    assert ok, f"{impl} {name} {dtype}: max error {err:.3e} > bound {bound:.3e}"
    fn = implementations()[impl]

    def run():
        fn(*inputs, WINDOW, WINDOW // 2, heads)
        torch.cuda.synchronize()

    benchmark.extra_info.update(stage=name, dtype=dtype, impl=impl, flops=flops(1, h, w, c, heads))
    benchmark(run)


def test_bench_cpu_reference(benchmark):
    """The one CPU entry: the reference at stage 4 (20x20x1536, 48 heads), fp32, shifted."""
    name, h, w, c, heads = STAGES[-1]
    inputs = make_inputs(1, h, w, c, heads, torch.float32, "cpu")
    benchmark.extra_info.update(stage=name, dtype="fp32", impl="ref", flops=flops(1, h, w, c, heads))
    out = benchmark(wa.window_attention_ref, *inputs, WINDOW, WINDOW // 2, heads)
    assert out.shape == inputs[0].shape


if __name__ == "__main__":
    sys.exit(main())
