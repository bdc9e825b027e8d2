"""Compiled figures of the window-attention kernel, before (a git revision) and now, without a GPU:
the table in ``kernels/window_attention.py``'s docstring.

    python scripts/window_attention_figures.py --before 2815de5

For Swin-T stage 1 (512x683 input: 128x171 map, 96 channels, 3 heads, window 7, shift 3) and
Swin-L stage 1 (640x640: 160x160, 192 channels, 6 heads, window 12, shift 6), bf16 and fp32 (exact
and TF32), sm_80 and sm_90: registers, spills, shared memory, occupancy, and per window and head
the dynamic instruction count estimated from the SASS (each loop's own instructions times its trip
count, times warps, times query tiles, over heads per program; ``benchmarks.aot.loop_profile``)
for an interior window (every block a conditional branch can skip, skipped: no padded token, no
shift mask) and a border window (all of them run), the global-load, MMA and MUFU instructions
among the latter, and the bias bytes the loads touch. Both
kernels are compiled through their own ``launch(..., compile_only=True)``.
"""
import argparse
import contextlib
import importlib.util
import io
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import aot  # noqa: E402

CASES = [  # label, (B, H, W, C, heads), window, shift
    ("Swin-T stage 1, w7", (1, 128, 171, 96, 3), 7, 3),
    ("Swin-L stage 1, w12", (1, 160, 160, 192, 6), 12, 6),
]
DTYPES = [("bf16", "bfloat16", False), ("fp32", "float32", False), ("fp32 TF32", "float32", True)]


def load_revision(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:kernels/window_attention.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="wa-before-"), "window_attention_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("window_attention_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api(wa, name):
    """``wa.<name>``: public in the module now, ``_<name>`` in the revisions before the op registry."""
    return getattr(wa, name, None) or getattr(wa, "_" + name)


def geometry(wa, shape, window, dtype, tf32):
    """(block_m, block_n, num_warps, heads_per_program) the module's launch picks."""
    b, h, w, c, heads = shape
    n, d = window * window, c // heads
    with aot.tf32_matmul(tf32):
        if "heads_per_program" in api(wa, "launch").__code__.co_varnames:
            precision = api(wa, "dot_precision")(dtype)
            return api(wa, "default_blocks")(n, d, heads, precision, torch.empty((), dtype=dtype).element_size())
        return api(wa, "default_blocks")(n, d) + (1,)


def per_window_head(row, window, blocks):
    """Warp instructions (and loads, MMAs, MUFUs) per window and head from the loop profile."""
    block_m, block_n, warps, hpp = blocks
    n = window * window
    key_tiles, m_tiles = math.ceil(n / block_n), math.ceil(n / block_m)
    levels = ([hpp] if hpp > 1 else []) + ([key_tiles] if key_tiles > 1 else [])
    loops = row["loops"]
    if len(loops) - 1 != len(levels) or any(l["depth"] != i for i, l in enumerate(loops)):
        raise RuntimeError(f"unexpected loop nest {loops} for trip counts {levels}")
    totals = dict(own=0, skippable=0, global_loads=0, mma=0, mufu=0)
    for depth, loop in enumerate(loops):
        trips = math.prod(levels[:depth])
        for k in totals:
            totals[k] += loop[k] * trips
    return {k: round(v * warps * m_tiles / hpp) for k, v in totals.items()}


def bias_bytes(before: bool, window, blocks, heads, table_size):
    """Bias bytes the loads of one window and head touch: the gather reads one element per score
    at a stride of ``heads`` elements from the ((2w-1)^2, heads) table (a 32-byte sector per
    element once heads * size >= 32, else ~32 / (heads * size) elements per sector); the dense
    (heads, N, N) table is read in contiguous rows (padded tiles included)."""
    block_m, block_n, _, _ = blocks
    n = window * window
    scores = math.ceil(n / block_m) * block_m * math.ceil(n / block_n) * block_n
    if before:
        per_sector = max(1, 32 // (heads * table_size))
        return scores * 32 // per_sector
    return scores * table_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="2815de5", help="git revision of the kernel before")
    parser.add_argument("--only", default="", help="rows whose 'case dtype sm_XX' contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET")
    import triton

    from maskformer.kernels import window_attention as now

    versions = [("before", load_revision(args.before)), ("now", now)]
    print("| case | dtype | arch | version | tiles MxN, warps, heads/program | registers | spill B | smem B | occupancy "
          "| warp instr. / window-head: interior window (border window) | global loads | MMA | MUFU "
          "| bias bytes / window-head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True
        for label, shape, window, shift in CASES:
            b, h, w, c, heads = shape
            for dname, dtype_name, tf32 in DTYPES:
                dtype = getattr(torch, dtype_name)
                for arch in (80, 90):
                    if args.only not in f"{label} {dname} sm_{arch}":
                        continue
                    for vname, wa in versions:
                        x = torch.empty(b, h, w, c, device="meta", dtype=dtype)
                        weight = torch.empty(3 * c, c, device="meta", dtype=dtype)
                        bias = torch.empty(3 * c, device="meta", dtype=dtype)
                        table = torch.empty((2 * window - 1) ** 2, heads, device="meta", dtype=dtype)
                        qkv = torch.nn.functional.linear(x, weight, bias)
                        buf = io.StringIO()
                        with aot.target(arch), aot.tf32_matmul(tf32), contextlib.redirect_stdout(buf):
                            compiled = api(wa, "launch")(qkv, bias, table, x.new_empty(x.shape), window, shift,
                                                         heads, compile_only=True)
                        row = aot.analyse(compiled, buf.getvalue(), arch)
                        blocks = geometry(wa, shape, window, dtype, tf32)
                        dyn = per_window_head(row, window, blocks)
                        bb = bias_bytes(vname == "before", window, blocks, heads, dtype.itemsize)
                        print(f"| {label} | {dname} | sm_{arch} | {vname} | {blocks[0]}x{blocks[1]}, {blocks[2]}, "
                              f"{blocks[3]} | {row['registers']} | {row['spill_store_bytes']}/{row['spill_load_bytes']} "
                              f"| {row['shared_bytes']} | {row['occupancy']:.1%} | {dyn['own'] - dyn['skippable']} ({dyn['own']}) "
                              f"| {dyn['global_loads']} "
                              f"| {dyn['mma']} | {dyn['mufu']} | {bb} |", flush=True)


if __name__ == "__main__":
    main()
