"""Ahead-of-time compile check: every Triton kernel compiled for sm_80 (A100) and sm_90 (H100)
without a GPU, through the launch code a real call runs, and judged on what the binaries show.

    python -m benchmarks.aot                          # CI set, sm_80 + sm_90 (~2 min on 2 cores)
    python -m benchmarks.aot --full                   # every real launch configuration (below)
    python -m benchmarks.aot --arch 90 --json -       # one arch, the JSON on stdout (and no other file)
    python -m benchmarks.aot --out benchmarks/results/aot-ci --overwrite   # refresh the committed results

Results: ``out/benchmarks/aot-<set>.json`` and ``.md`` (``--out STEM``; a default name that is
taken becomes ``aot-<set>-2``), or only the ``--json`` file when that is given without ``--out``; an
existing file is replaced only with ``--overwrite`` (``maskformer.reporting``).

How. A stand-in triton driver (``AOTDriver``) reports ``GPUTarget("cuda", arch, 32)`` as the
current device, so triton's JIT specialises and compiles exactly as it would on that GPU (the
bundled ptxas makes the cubin). The launches are declared by each op next to its kernel
(``aot_launches`` in ``kernels/<op>.py``, read through ``maskformer.kernels.registry``): each calls
the kernel's own launch function (``window_attention.launch``, ``mask_einsum.launch``,
``upsample_argmax.launch_one``, ``ms_deform_attn.launch``) with meta tensors of a real call's
shapes, dtypes and strides and ``compile_only=True``: it picks its blocks, warps, stages
and constexprs as for a real call and hands them to ``kernel.warmup`` instead of launching, so the
checked binary is the launched one (integer arguments are the real ones, so triton's
divisibility-by-16 specialisation is the real one; a meta tensor's pointer is its storage offset,
i.e. a 16-byte aligned base, as CUDA allocations are). fp32 launches are compiled under both of
torch's TF32 settings, which the kernels follow.

Reported per binary (distinct compiled kernel; several launches can share one): registers,
spill stores/loads and stack frame (ptxas -v), shared memory, num_warps/num_stages, occupancy
(resident warps per SM from registers, shared memory and warps against the A100/H100 limits in
``ARCHS``), tensor-core instructions in the PTX (``wgmma.mma_async``, ``mma.sync``) and in the
SASS (HGMMA, HMMA), FFMA and all SASS instructions (static counts, from the bundled nvdisasm).

Rules (exit status 1, and ``tests/test_aot.py`` fails, when any is broken):
- every launch compiles;
- no binary spills (0 bytes of spill stores and loads);
- every binary of a launch declared with ``tensor_cores=True`` (the window_attention and
  mask_einsum dots on fp16/bf16 operands, or fp32 ones with TF32 allowed) has tensor-core
  instructions (``wgmma`` or ``mma.sync`` in its PTX).

Sets (each op's ``aot_launches`` docstring says what its own are). ``--full``: every real launch
configuration: Swin-T, Swin-B, Swin-L and the default model at the ADE20K input sizes of
``registry.IMAGES``, every stage, shift, batch 1 and 8, dtype, TF32 setting and table dtype;
post-processing at each head of ``registry.POSTPROCESS_HEADS``; Mask2Former's deformable
attention at each input size. The CI set takes one launch per distinct (constexprs, dtypes,
shift, table dtype, TF32 setting) combination and both divisibility cases of the image-dependent
integers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

from maskformer._ext import tf32_matmul  # noqa: F401  (the policy the fp32 launches compile under; scripts use it)
from maskformer.kernels import registry
from maskformer.kernels.registry import AOTLaunch

from maskformer import reporting

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Per-SM limits (CUDA occupancy calculator, compute capability 8.0 and 9.0): 64K 32-bit registers
# in 4 sub-partitions, allocated per warp in units of 256; at most 64 resident warps and 32 blocks;
# shared memory per SM and the most one block may use; the runtime reserves 1 KiB per block.
ARCHS = {
    80: dict(gpu="A100", registers=65536, max_warps=64, max_blocks=32, smem_per_sm=164 * 1024,
             smem_per_block=163 * 1024, smem_reserved=1024),
    90: dict(gpu="H100", registers=65536, max_warps=64, max_blocks=32, smem_per_sm=228 * 1024,
             smem_per_block=227 * 1024, smem_reserved=1024),
}


# ---------------------------------------------------------------------------------------------
# launches: declared by each op next to its kernel (maskformer.kernels.registry)
# ---------------------------------------------------------------------------------------------


def kernels() -> List[str]:
    """The ops whose Triton kernels are checked: every registered op that declares AOT launches."""
    return registry.aot_kernels()


def launches(full: bool, names: Optional[List[str]] = None) -> List[AOTLaunch]:
    """The launch configurations of the chosen set, as each op declares them (its
    ``aot_launches(full)``, next to its kernel), for the ops ``names`` (default: all)."""
    return registry.aot_launches(full, names)


# ---------------------------------------------------------------------------------------------
# the stand-in driver and the analysis of one binary
# ---------------------------------------------------------------------------------------------


def _aot_driver(arch: int):
    """A triton driver for a GPU that is not there: the target is sm_<arch>, nothing can launch."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class AOTDriver(DriverBase):
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("ahead-of-time compilation: there is no GPU to time on")

        def get_current_device(self):
            return arch  # a device id per arch keeps the JIT's per-device caches apart

        def get_current_stream(self, device=None):
            return 0

    return AOTDriver()


@contextlib.contextmanager
def target(arch: int):
    """Inside the block triton's active driver is ``_aot_driver(arch)``; the previous one after."""
    import triton

    config = triton.runtime.driver
    previous = config._active  # None until something asked for it (there is no GPU driver to ask)
    config.set_active(_aot_driver(arch))
    try:
        yield
    finally:
        config._active = previous


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> Dict:
    """Resident blocks and warps per SM and their limiter, as the CUDA occupancy calculator."""
    lim = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_by_regs = (lim["registers"] // 4 // regs_per_warp) * 4  # 4 sub-partitions of 16K registers
    by = {
        "registers": warps_by_regs // num_warps,
        "warps": lim["max_warps"] // num_warps,
        "blocks": lim["max_blocks"],
        "shared": lim["smem_per_sm"] // (shared + lim["smem_reserved"]) if shared else lim["max_blocks"],
    }
    if shared > lim["smem_per_block"]:
        by["shared"] = 0
    blocks = min(by.values())
    limiter = min(by, key=lambda k: by[k])
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                occupancy=round(blocks * num_warps / lim["max_warps"], 4), limited_by=limiter)


def sass_counts(cubin: bytes) -> Dict[str, int]:
    """Static SASS instruction counts of a cubin (bundled nvdisasm): all, HGMMA, HMMA, FFMA, MUFU
    (exp2 and reciprocal), global loads (LDG) and shared loads (LDS, LDSM)."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    counts = dict(sass=0, hgmma=0, hmma=0, ffma=0, mufu=0, ldg=0, lds=0)
    for op, _ in _SASS_OP.findall(text):
        if op == "NOP":
            continue
        counts["sass"] += 1
        key = {"HGMMA": "hgmma", "HMMA": "hmma", "FFMA": "ffma", "MUFU": "mufu", "LDG": "ldg", "LDS": "lds",
               "LDSM": "lds"}.get(op)
        if key:
            counts[key] += 1
    counts["loops"] = loop_profile(text)
    return counts


def loop_profile(sass: str) -> List[Dict]:
    """Loops of a SASS listing (a backward branch to a label): for each, outermost first, its
    nesting depth and its own instructions (not counting the loops nested in it: ``own``, of which
    ``global_loads`` LDG/LDGSTS, ``mma`` HGMMA/HMMA, ``mufu``); the code outside every loop is the
    entry with depth 0. With the trip counts of a launch this gives the dynamic instruction count
    per warp: sum(own * product of the trips of the loop and its parents). ``skippable``: how many
    of ``own`` lie in a block that a conditional forward branch (``@P BRA``) can jump over, i.e.
    code that runs only for some programs (a kernel's border-window fix-ups); ``own - skippable``
    is the path that skips them all. Code after the last EXIT (the trap, out-of-line divergence
    stubs) is not counted."""
    labels, body = {}, []  # label -> index of the next instruction; [(op, branch target label)]
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(body)
            continue
        m = _SASS_OP.search(line)
        if m and m.group(1) != "NOP":
            target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line) if m.group(1) == "BRA" else None
            conditional = bool(re.search(r"@!?U?P\d\s+(?:BRA|EXIT)\b", line))
            body.append((m.group(1), target.group(1) if target else None, conditional))
    # Code after the last EXIT is out-of-line stubs (e.g. BRA.DIV fallbacks) that jump back into the
    # body: their backward branches are not loops.
    last_exit = max((i for i, (op, _, conditional) in enumerate(body) if op == "EXIT" and not conditional),
                    default=len(body))
    loops = sorted((labels[t], i) for i, (_, t, _) in enumerate(body)
                   if t in labels and labels[t] < i < last_exit)
    skippable = [False] * len(body)
    for i, (_, t, conditional) in enumerate(body):
        if conditional and t in labels and labels[t] > i + 1:
            for j in range(i + 1, labels[t]):
                skippable[j] = True
    depth = [0] * len(body)
    owner = [-1] * (last_exit + 1) + [-2] * (len(body) - last_exit - 1)  # -2: stubs, not counted
    for n, (start, end) in enumerate(loops):  # sorted by start: an inner loop overwrites its parent
        for i in range(start, end + 1):
            depth[i] += 1
            owner[i] = n

    def counts(n):
        mine = [i for i, o in enumerate(owner) if o == n]
        ops = [body[i][0] for i in mine]
        return dict(own=len(ops), skippable=sum(skippable[i] for i in mine),
                    global_loads=sum(op in ("LDG", "LDGSTS") for op in ops),
                    mma=sum(op in ("HGMMA", "HMMA") for op in ops), mufu=ops.count("MUFU"))

    return [dict(depth=0, **counts(-1))] + [dict(depth=depth[start], **counts(n)) for n, (start, _) in enumerate(loops)]


def _ptxas_verbose(ptx: str, arch: int, metadata) -> str:
    """ptxas -v of a compiled kernel's PTX, with the options triton used (its fp fusion setting)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(tmp, "kernel.cubin")]
        if not metadata.enable_fp_fusion:
            cmd.insert(1, "--fmad=false")
        return subprocess.run(cmd, capture_output=True, text=True).stderr


def analyse(compiled, ptxas_log: str, arch: int) -> Dict:
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    row = dict(num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared,
               wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
               fp_fusion=md.enable_fp_fusion)
    regs = _REGS.search(ptxas_log)
    stack = _PTXAS.search(ptxas_log)
    if regs is None or stack is None:  # a cache hit ran no ptxas: run it again on the PTX for its -v
        ptxas_log = _ptxas_verbose(ptx, arch, md)
        regs = _REGS.search(ptxas_log)
        stack = _PTXAS.search(ptxas_log)
    if regs is None or stack is None:
        raise RuntimeError("ptxas -v output not found: " + ptxas_log[-500:])
    row.update(registers=int(regs.group(1)), stack_bytes=int(stack.group(1)), spill_store_bytes=int(stack.group(2)),
               spill_load_bytes=int(stack.group(3)))
    row.update(occupancy(arch, row["registers"], row["shared_bytes"], row["num_warps"]))
    row.update(sass_counts(compiled.asm["cubin"]))
    return row


def rule_failures(row: Dict, tensor_cores: bool) -> List[str]:
    """The rules a binary breaks (module docstring), as sentences."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    problems = []
    if row["spill_store_bytes"] or row["spill_load_bytes"]:
        problems.append(f"spills {row['spill_store_bytes']} B stores / {row['spill_load_bytes']} B loads "
                        f"({row['registers']} registers)")
    if tensor_cores and not (row["wgmma"] or row["mma_sync"]):
        problems.append("no tensor-core instruction (wgmma / mma.sync) in a dot on half or TF32 operands")
    return problems


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def compile_all(archs: List[int], plan: List[AOTLaunch], log=print) -> Dict:
    """Compile every launch for every arch -> {"binaries": [...], "launches": [...]}. Launches that
    produce the same binary (triton's hash) share one entry."""
    import triton

    binaries: Dict[str, Dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskformer-aot-") as cache:
        # A fresh cache: every binary goes through ptxas, whose -v output is where registers and
        # spills come from (triton prints it with dump_ptxas_log).
        with triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
            triton.knobs.cache.dir = cache
            triton.knobs.nvidia.dump_ptxas_log = True
            for arch in archs:
                with target(arch):
                    for launch in plan:
                        t0 = time.perf_counter()
                        buf = io.StringIO()
                        entry = dict(kernel=launch.kernel, arch=f"sm_{arch}", **launch.config)
                        try:
                            with contextlib.redirect_stdout(buf):
                                compiled = launch.compile()
                            key = f"sm_{arch}:{compiled.hash}"
                            if key not in binaries:
                                row = dict(kernel=launch.kernel, arch=f"sm_{arch}", binary=compiled.hash[:12],
                                           example=launch.label, launches=0,
                                           constexprs=_constexprs(compiled), tensor_cores_required=launch.tensor_cores)
                                row.update(analyse(compiled, buf.getvalue(), arch))
                                row["compile_s"] = round(time.perf_counter() - t0, 2)
                                binaries[key] = row
                            binaries[key]["launches"] += 1
                            if launch.tensor_cores and "tensor_cores_required_by" not in binaries[key]:
                                # the first launch that needs them (two launches may share a binary)
                                binaries[key]["tensor_cores_required"] = True
                                binaries[key]["tensor_cores_required_by"] = launch.label
                            entry["binary"] = compiled.hash[:12]
                        except Exception as exc:  # a compile error is a result, not a crash
                            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                            key = f"sm_{arch}:error:{launch.kernel}:{launch.label}"
                            binaries[key] = dict(kernel=launch.kernel, arch=f"sm_{arch}", binary="-",
                                                 example=launch.label, launches=1, error=msg,
                                                 tensor_cores_required=launch.tensor_cores,
                                                 traceback=traceback.format_exc()[-2000:])
                            entry["error"] = msg
                        rows.append(entry)
                        log(f"  sm_{arch} {launch.kernel:16s} {launch.label}: "
                            + (entry.get("error") or _short(binaries[f"sm_{arch}:{compiled.hash}"])))
    for row in binaries.values():
        row["failures"] = rule_failures(row, row["tensor_cores_required"])
    return dict(binaries=list(binaries.values()), launches=rows)


def _constexprs(compiled) -> Dict:
    src = getattr(compiled, "src", None)
    consts = getattr(src, "constants", None) or {}
    out = {}
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    for k, v in consts.items():
        name = names[k[0]] if names and isinstance(k, tuple) and len(k) == 1 else str(k)
        out[name] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _short(row: Dict) -> str:
    return (f"{row['registers']} regs, spill {row['spill_store_bytes']}/{row['spill_load_bytes']} B, smem "
            f"{row['shared_bytes']} B, warps {row['num_warps']}x{row['num_stages']} stages, occ "
            f"{row['occupancy']:.0%}, wgmma {row['wgmma']} mma.sync {row['mma_sync']}")


def environment(archs: List[int]) -> Dict:
    """``maskformer.reporting.environment`` plus the ptxas that compiles for each arch."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = {}
    for arch in archs:  # triton 3.9 runs its bundled CUDA 12.9 ptxas below sm_90, the 13.x one from sm_90
        try:
            tool = get_ptxas(arch)
            ptxas[f"sm_{arch}"] = f"{os.path.basename(tool.path)} {tool.version}"
        except Exception as exc:
            ptxas[f"sm_{arch}"] = f"unavailable ({type(exc).__name__}: {exc})"
    return dict(reporting.environment("cpu"), ptxas=ptxas)


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [f"# Ahead-of-time compile check ({report['set']} set)", "",
             f"triton {env['versions']['triton']}, ptxas " + ", ".join(f"{v} ({k})" for k, v in env["ptxas"].items())
             + f", torch {env['versions']['torch']}, commit {reporting.commit_text(env)}, {env['date']}; "
             f"{env['device_name']}, {env['threads']} threads; {len(report['launches'])} launches, "
             f"{len(report['binaries'])} binaries, {report['seconds']:.0f} s. Compiled without a GPU "
             "(`python -m benchmarks.aot`); occupancy against the "
             + ", ".join(f"{v['gpu']} (sm_{k})" for k, v in ARCHS.items()) + " limits; SASS counts are static.", "",
             "**" + ("PASS" if not report["failures"] else f"FAIL: {len(report['failures'])} binaries") + "**", ""]
    for f in report["failures"]:
        lines.append(f"- {f}")
    if report["failures"]:
        lines.append("")
    lines += ["| kernel | arch | example launch | launches | regs | spill st/ld B | stack B | smem B | warps | stages "
              "| occupancy | wgmma | mma.sync | HGMMA | HMMA | FFMA | SASS | rules |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["binaries"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['example']} | {r['launches']} | compile error: "
                         f"{r['error'][:80]} |||||||||||||")
            continue
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['example']} | {r['launches']} | {r['registers']} | "
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['stack_bytes']} | {r['shared_bytes']} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['occupancy']:.1%} ({r['limited_by']}) | {r['wgmma']} | "
            f"{r['mma_sync']} | {r['hgmma']} | {r['hmma']} | {r['ffma']} | {r['sass']} | "
            f"{'; '.join(r['failures']) or 'ok'} |")
    return "\n".join(lines) + "\n"


def run(archs: List[int], full: bool, log=print, names: Optional[List[str]] = None) -> Dict:
    """Compile the set's launches of the ops ``names`` (default: every op that declares launches)."""
    names = kernels() if names is None else list(names)
    plan = launches(full, names)
    covered = sorted({launch.kernel for launch in plan})
    if covered != sorted(names):
        raise RuntimeError(f"the plan covers {covered}, not every kernel asked for {sorted(names)}: an op's "
                           "aot_launches returned none (or launches named for another kernel)")
    t0 = time.perf_counter()
    result = compile_all(archs, plan, log)
    report = dict(set="full" if full else "ci", archs=[f"sm_{a}" for a in archs], kernels=sorted(names),
                  environment=environment(archs),
                  rules=["every launch compiles", "no spill stores or loads",
                         "tensor-core instructions in every window_attention/mask_einsum binary on fp16/bf16 "
                         "operands or fp32 with TF32 allowed"],
                  seconds=round(time.perf_counter() - t0, 1), **result)
    report["failures"] = [f"{r['kernel']} {r['arch']} binary {r['binary']} [{r['example']}"
                          + (f"; tensor cores required by {r['tensor_cores_required_by']}"
                             if r.get("tensor_cores_required_by", r["example"]) != r["example"] else "")
                          + f"]: {'; '.join(r['failures'])}" for r in report["binaries"] if r["failures"]]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="80,90", help="comma list of compute capabilities: 80, 90 (default both)")
    parser.add_argument("--full", action="store_true", help="every real launch configuration (default: the CI set)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the JSON report here ('-': stdout) instead of the results files (unless --out)")
    parser.add_argument("--out", default=None, metavar="STEM",
                        help="results file stem, .json and .md added (default out/benchmarks/aot-<set>, or the next "
                             "free -2, -3 when taken; not written when --json is given without --out; 'none' writes "
                             "no results file)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results files (and --json) if they exist")
    available = kernels()
    parser.add_argument("--kernels", default=",".join(available),
                        help="comma list, a subset of: " + ", ".join(available) + " (default all; a subset is for "
                             "iterating on one kernel, the check is complete only with all)")
    parser.add_argument("--quiet", action="store_true", help="no line per launch")
    args = parser.parse_args(argv)
    try:
        archs = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch {args.arch!r}: expected e.g. 80,90")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        parser.error(f"--arch: unsupported {unknown}; choose from {sorted(ARCHS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the check compiles the kernels, the interpreter would not")
    to_stdout = args.json == "-"
    log = (lambda *a: None) if args.quiet or to_stdout else (lambda *a: print(*a, flush=True))
    names = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not names or any(k not in available for k in names):
        parser.error(f"--kernels {args.kernels!r}: choose from {', '.join(available)}")
    # Claimed before compiling (minutes): a taken --out or --json is refused now, not afterwards.
    out = sys.stderr if to_stdout else sys.stdout
    stem = None
    if args.out != "none" and (args.out or not args.json):
        try:
            stem = reporting.results_stem(args.out, f"aot-{'full' if args.full else 'ci'}", overwrite=args.overwrite,
                                          log=lambda text: print(text, file=out))
        except reporting.ResultsExistError as exc:
            parser.error(str(exc))
    if args.json and not to_stdout:
        try:
            reporting.claim_file(args.json, overwrite=args.overwrite)
        except reporting.ResultsExistError as exc:
            parser.error(str(exc))
    report = run(archs, args.full, log, names)
    if stem:
        reporting.write_report(stem, report, markdown(report), overwrite=args.overwrite)
    if args.json:
        text = json.dumps(report, indent=1)
        if to_stdout:
            print(text)
        else:
            reporting.write_text(args.json, text + "\n", overwrite=args.overwrite)
    print(f"{len(report['launches'])} launches, {len(report['binaries'])} binaries for "
          f"{', '.join(report['archs'])} in {report['seconds']:.0f} s", file=out)
    if stem:
        print(f"wrote {stem}.json and {stem}.md", file=out)
    for failure in report["failures"]:
        print("FAIL " + failure, file=out)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
