"""Micro-benchmarks of every fast op against its pure-PyTorch reference (and transformers where it
has an equivalent): pytest-benchmark entries, one per (op, implementation, device), each verified
against the reference at the same inputs before it is timed.

Run::

    python -m pytest benchmarks/bench_ops.py --benchmark-only          # ~1 min on 2 CPU cores
    python -m pytest benchmarks/bench_ops.py --benchmark-only -k cpp   # one implementation

What is measured
----------------
Wall clock of one call (CUDA synchronised inside the timed call), ``benchmark.pedantic`` with one
warm-up round and a few rounds (5 for the calls that take ~0.5 s on a 2-core CPU, 10 otherwise),
all the threads torch uses. ``benchmark.extra_info`` holds the shapes, the minimum FLOPs / bytes of
the op and, after timing, GFLOP/s or GB/s at the median next to the device's measured copy
bandwidth (``bench_postprocess.copy_bandwidth_gbs``) for the memory-bound ops.

Ops, shapes (CPU-sized but realistic: ADE20k at its 512 short side, MaskFormer-like logits from
``make_realistic_logits``) and implementations:

* ``mask_einsum``: softmax + sigmoid + query contraction, (2, 100, 151) x (2, 100, 128, 171) ->
  (2, 150, 128, 171) fp32 scores. ``ref`` (``mask_einsum_ref``, transformers' three lines),
  ``cpp`` (``mask_einsum_cpp``), ``triton`` (``mask_einsum``).
* ``upsample_argmax``: those reference scores -> two 512x683 label maps. ``ref``, ``cpp``, ``triton``.
* ``semantic_segmentation``: the two composed, logits -> label maps, i.e. the whole of
  transformers' ``post_process_semantic_segmentation``. ``ref``, ``cpp`` (``dispatch`` forced to
  ``cpp``: torch's scores, the C++ upsample_argmax), ``triton`` (forced ``triton``) and
  ``transformers`` (the processor, via ``bench_postprocess.implementations``). The same pipeline at
  640x853 is ``bench_postprocess.py::test_postprocess``.
* ``query_argmax``: the panoptic per-pixel step on one image's kept queries (COCO-panoptic logits
  from ``bench_panoptic.make_inputs`` at 128x171 -> 512x683), ``q12`` (12 objects: 12 kept queries)
  and ``q100`` (every query kept). ``ref`` and ``cpp``; there is no Triton kernel (on CUDA the
  reference is the fast path, timed as ``ref-cuda``), and transformers' equivalent is the reference
  itself (the processor's torch ops); the whole panoptic post-processing against transformers is
  ``bench_panoptic.py::test_panoptic``.
* ``window_attention``: one shifted Swin-L block at 640x853, stage 2 (80x107x384, 12 heads, window
  12, shift 6, fp32, batch 1; padded to 84x108). ``ref`` on CPU and ``triton`` on CUDA. The GPU
  comparison at every Swin-L stage in bf16/fp16 against eager and SDPA is
  ``bench_window_attention.py::test_bench_gpu``; it is not repeated here.
* ``ms_deform_attn``: one multi-scale deformable attention of Mask2Former's pixel decoder, Swin-T
  ADE20K at 512x512 (levels 16x16, 32x32, 64x64: 5376 tokens, every token a query; 8 heads of 32,
  4 points per level, fp32, batch 1; locations = each token's centre plus N(0, 2)-pixel offsets,
  ``make_msda_inputs``). ``ref`` (``ms_deform_attn_ref``), ``transformers`` (transformers'
  ``multi_scale_deformable_attention``) and ``cpp`` (``ms_deform_attn_cpp``) on CPU, ``ref`` and
  ``triton`` on CUDA. The interleaved CPU comparison at the 512x683 shape (reference and C++
  alternating, paired ratios) is ``bench_ms_deform_attn.py``.

* ``fused_linear``: the Swin-T block's fc1 with its GELU at 512x683, stage 1 (x (1, 21888, 96),
  weight (384, 96), bias, exact GELU; fp32), and fc2 with the residual (x (1, 21888, 384), weight
  (96, 384), bias, residual (1, 21888, 96)). ``ref`` (``fused_linear_ref``: for fp32 exactly the
  modules' ``F.linear`` + ``F.gelu`` + add) on CPU and CUDA, ``triton`` on CUDA.
* ``nan_inf_flags``: the post-processing's output check of both logits (the ``SEMANTIC`` class and
  mask logits, fp32, all finite: the common case, where the kernel makes no atomic). ``ref``
  (``nan_inf_flags_ref``: one sum per tensor, the exact tests only when a sum is not finite) on CPU
  and CUDA, ``triton`` on CUDA (one launch, one read).

Every semantic/panoptic op also has a ``ref-cuda`` entry (the reference on CUDA tensors), the
baseline its ``triton`` entry should be read against.

Verification (before timing; a failure names the op, implementation, device, error and bound)
---------------------------------------------------------------------------------------------
* Label maps, query indices and areas: identical to the reference's (``torch.equal``).
* ``mask_einsum`` (fp32 scores): elementwise ``|out - ref64| <= 2 |ref32 - ref64| + atol`` with
  ref64 the reference in fp64 and ref32 the fp32 reference on the same device, ``atol`` = (Q + 8)
  fp32 ulps of the largest score, as ``tests/kernels/test_mask_einsum.py``.
* ``window_attention`` (fp32): ``max |out - gold| <= 2 max |ref32 - gold| + eps32 * max |gold|`` and
  the same on the mean with a tenth of the atol, gold the reference in fp64, as
  ``tests/kernels/test_window_attention.py``.
* ``fused_linear`` (fp32): ``max |out - gold| <= 2 max |ref32 - gold| + eps32 * max |gold|`` and the
  same on the mean with a tenth of the atol, gold the reference in fp64, as
  ``tests/kernels/test_fused_linear.py``.
* ``nan_inf_flags``: the flags equal the reference's (``(0, 0)``).
* ``ms_deform_attn`` (fp32): elementwise ``|out - ref64| <= 2 |ref32 - ref64| + atol``, atol =
  u * (4*L*P + 2*max side + 8) * sum |terms| as ``tests/kernels/test_ms_deform_attn.py`` (the
  kernel's coordinate and summation rounding); ``transformers`` must equal ``ref`` bit for bit.
* ``ref`` entries are the reference: their check is that a second call returns the first call's
  output bit for bit (determinism); ``transformers`` must equal ``ref``.

Skipped without a GPU (this is a CPU machine's normal result, not a failure)
---------------------------------------------------------------------------
* every ``triton`` entry: the Triton kernels run on CUDA (on CPU only under ``TRITON_INTERPRET=1``,
  a numpy interpreter for tests, meaningless to time), so they skip with "no CUDA device" (or
  "TRITON_INTERPRET is set", or triton's import error);
* every ``ref-cuda`` entry: "no CUDA device".
``cpp`` entries skip with the import error when the C++ extension was not built.
"""
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from benchmarks import bench_panoptic as bpan
from benchmarks import bench_postprocess as bpost
from benchmarks import bench_window_attention as bwa
from maskformer import _ext, dispatch
from maskformer.kernels import fused_linear as fl
from maskformer.kernels import mask_einsum as me
from maskformer.kernels import nan_inf_flags as nif
from maskformer.kernels import ms_deform_attn as msda
from maskformer.kernels import query_argmax as qa
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels import window_attention as wa

U32 = 2.0**-24  # fp32 unit roundoff

# ADE20k at its 512 short side: 4:3 image 512x683, mask logits at 1/4 (128x171), 150 classes, 100
# queries, batch 2 (bench_postprocess's CONFIG at the Swin-T input size).
SEMANTIC = {**bpost.CONFIG, "batch": 2, "mask": (128, 171), "target": (512, 683)}
# COCO-panoptic logits (133 classes) at the same sizes, one image: bench_panoptic's CONFIG.
PANOPTIC = {**bpan.CONFIG, "batch": 1, "mask": (128, 171), "target": (512, 683)}
QUERY_ARGMAX_OBJECTS = {"q12": 12, "q100": 100}
# Swin-L at 640x853, stage 2: (H, W, C, heads); window 12 (bwa.WINDOW), shifted block.
WINDOW_STAGE = (80, 107, 384, 12)
WINDOW_SHIFT = bwa.WINDOW // 2

# Mask2Former's pixel decoder, Swin-T ADE20K at 512x512: levels at strides 32, 16, 8 (lowest
# resolution first, as transformers orders them), 8 heads x 32 dims, 4 points per level.
MSDA_LEVELS = [(16, 16), (32, 32), (64, 64)]
MSDA_HEADS, MSDA_HEAD_DIM, MSDA_POINTS = 8, 32, 4
# Swin-T at 512x683, stage 1: 128x171 tokens of 96 channels, MLP 384 wide.
FUSED_LINEAR_TOKENS, FUSED_LINEAR_C = 128 * 171, 96

FAST_ROUNDS, SLOW_ROUNDS = 10, 5


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    impl: str  # ref, cpp, triton, transformers
    device: str  # cpu, cuda
    variant: str = ""  # query_argmax: q12 / q100
    rounds: int = FAST_ROUNDS

    @property
    def id(self) -> str:
        parts = [self.op] + ([self.variant] if self.variant else []) + [self.impl, self.device]
        return "-".join(parts)

    @property
    def label(self) -> str:
        return f"{self.op}{f' ({self.variant})' if self.variant else ''} / {self.impl} on {self.device}"


def _cases() -> List[Case]:
    s = SLOW_ROUNDS
    cases = [
        Case("mask_einsum", "ref", "cpu"),
        Case("mask_einsum", "cpp", "cpu"),
        Case("mask_einsum", "ref", "cuda"),
        Case("mask_einsum", "triton", "cuda"),
        Case("upsample_argmax", "ref", "cpu", rounds=s),
        Case("upsample_argmax", "cpp", "cpu"),
        Case("upsample_argmax", "ref", "cuda"),
        Case("upsample_argmax", "triton", "cuda"),
        Case("semantic_segmentation", "transformers", "cpu", rounds=s),
        Case("semantic_segmentation", "ref", "cpu", rounds=s),
        Case("semantic_segmentation", "cpp", "cpu"),
        Case("semantic_segmentation", "ref", "cuda"),
        Case("semantic_segmentation", "triton", "cuda"),
    ]
    for variant in QUERY_ARGMAX_OBJECTS:
        cases += [
            Case("query_argmax", "ref", "cpu", variant, rounds=s if variant == "q100" else FAST_ROUNDS),
            Case("query_argmax", "cpp", "cpu", variant),
            Case("query_argmax", "ref", "cuda", variant),
        ]
    cases += [
        Case("window_attention", "ref", "cpu", rounds=s),
        Case("window_attention", "triton", "cuda"),
        Case("ms_deform_attn", "ref", "cpu", rounds=s),
        Case("ms_deform_attn", "transformers", "cpu", rounds=s),
        Case("ms_deform_attn", "cpp", "cpu"),
        Case("ms_deform_attn", "ref", "cuda"),
        Case("ms_deform_attn", "triton", "cuda"),
    ]
    for variant in ("fc1-gelu", "fc2-residual"):
        cases += [Case("fused_linear", "ref", "cpu", variant), Case("fused_linear", "ref", "cuda", variant),
                  Case("fused_linear", "triton", "cuda", variant)]
    cases += [Case("nan_inf_flags", "ref", "cpu"), Case("nan_inf_flags", "ref", "cuda"),
              Case("nan_inf_flags", "triton", "cuda")]
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def _dispatched(backend_name: str) -> Callable:
    def run(cl, ml, sizes):
        with dispatch.backend(backend_name):
            return dispatch.semantic_segmentation(cl, ml, sizes)

    return run


@functools.lru_cache(maxsize=None)
def _transformers_semantic() -> Callable:
    impls, _ = bpost.implementations("cpu")
    return impls["transformers"]


def implementation(case: Case) -> Callable:
    """The callable a case times; its arguments are ``inputs(case)``."""
    op, impl = case.op, case.impl
    if op == "mask_einsum":
        return {"ref": me.mask_einsum_ref, "cpp": me.mask_einsum_cpp, "triton": me.mask_einsum}[impl]
    if op == "upsample_argmax":
        return {"ref": ua.upsample_argmax_ref, "cpp": ua.upsample_argmax_cpp, "triton": ua.upsample_argmax}[impl]
    if op == "semantic_segmentation":
        if impl == "ref":
            return lambda cl, ml, sizes: ua.upsample_argmax_ref(me.mask_einsum_ref(cl, ml), sizes)
        if impl == "transformers":
            return _transformers_semantic()
        return _dispatched(impl)
    if op == "query_argmax":
        return {"ref": qa.query_argmax_ref, "cpp": qa.query_argmax_cpp}[impl]
    if op == "window_attention":
        return {"ref": wa.window_attention_ref, "triton": wa.window_attention}[impl]
    if op == "ms_deform_attn":
        if impl == "transformers":
            from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

            return multi_scale_deformable_attention
        return {"ref": msda.ms_deform_attn_ref, "cpp": msda.ms_deform_attn_cpp, "triton": msda.ms_deform_attn}[impl]
    if op == "fused_linear":
        return {"ref": fl.fused_linear_ref, "triton": fl.fused_linear}[impl]
    if op == "nan_inf_flags":
        return {"ref": nif.nan_inf_flags_ref, "triton": nif.nan_inf_flags}[impl]
    raise ValueError(f"unknown op {op!r}")


def make_msda_inputs(batch: int, levels, heads: int, head_dim: int, points: int, seed: int = 0):
    """(value (B, S, H, D), spatial_shapes, sampling_locations (B, S, H, L, P, 2), attention_weights
    (B, S, H, L, P)) fp32, shaped like the pixel decoder's encoder self-attention: every token is a
    query, its reference point is its own pixel centre (transformers' ``get_reference_points``,
    valid ratios 1), each sample that point plus an N(0, 2)-pixel offset at its level (a few
    percent fall outside the map); weights softmaxed over the L*P samples."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    refs = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    ref = torch.cat(refs)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
    sizes = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)[None, None, None, :, None, :]
    offsets = torch.randn(batch, tokens, heads, len(levels), points, 2, generator=gen) * 2.0
    loc = ref + offsets / sizes
    weights = torch.randn(batch, tokens, heads, len(levels) * points, generator=gen).softmax(-1)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen)
    return value, [tuple(hw) for hw in levels], loc, weights.view(batch, tokens, heads, len(levels), points)


def skip_reason(case: Case) -> Optional[str]:
    """Why this case cannot run here (None: it can). Decided at test time, never at import."""
    if case.impl == "cpp" and _ext.load_cpp() is None:
        return f"C++ extension not built: {_ext.cpp_import_error()}"
    if case.device == "cuda":
        reasons = []
        if case.impl == "triton" and _ext.triton_interpret_mode():
            reasons.append("TRITON_INTERPRET is set (the interpreter runs the kernels in numpy; unset it to time "
                           "the compiled kernels)")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        if case.impl == "triton" and _ext.triton_import_error():
            reasons.append(_ext.triton_import_error())
        if reasons:
            return "; ".join(reasons)
    return None


# ---------------------------------------------------------------------------------------------
# Inputs, the reference's outputs, and what each call must move / compute
# ---------------------------------------------------------------------------------------------


class Data:
    """Inputs and reference outputs, built once per (op, variant, device) for the module."""

    def __init__(self):
        self._inputs: Dict[Tuple[str, str, str], tuple] = {}
        self._expected: Dict[Tuple[str, str, str], object] = {}

    def _cpu_inputs(self, op: str, variant: str) -> tuple:
        key = (op, variant, "cpu")
        if key in self._inputs:
            return self._inputs[key]
        if op in ("mask_einsum", "semantic_segmentation"):
            cl, ml, sizes = bpost.make_inputs("cpu", SEMANTIC)
            args = (cl, ml) if op == "mask_einsum" else (cl, ml, sizes)
        elif op == "upsample_argmax":
            cl, ml = self._cpu_inputs("mask_einsum", "")
            args = (me.mask_einsum_ref(cl, ml), [tuple(SEMANTIC["target"])] * SEMANTIC["batch"])
        elif op == "query_argmax":
            cl, ml, sizes = bpan.make_inputs(QUERY_ARGMAX_OBJECTS[variant], PANOPTIC)
            (probs, scores), = bpan.kept_queries(cl, ml)
            args = (probs.contiguous(), scores.contiguous(), sizes[0], PANOPTIC["mask_threshold"])
        elif op == "window_attention":
            h, w, c, heads = WINDOW_STAGE
            args = bwa.make_inputs(1, h, w, c, heads, torch.float32, "cpu") + (bwa.WINDOW, WINDOW_SHIFT, heads)
        elif op == "ms_deform_attn":
            args = make_msda_inputs(1, MSDA_LEVELS, MSDA_HEADS, MSDA_HEAD_DIM, MSDA_POINTS)
        elif op == "fused_linear":
            gen = torch.Generator().manual_seed(3)
            t, c = FUSED_LINEAR_TOKENS, FUSED_LINEAR_C
            k, n = (c, 4 * c) if variant == "fc1-gelu" else (4 * c, c)
            x = torch.randn(1, t, k, generator=gen)
            weight, bias = torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen) * 0.5
            residual = torch.randn(1, t, n, generator=gen) if variant == "fc2-residual" else None
            args = (x, weight, bias, "gelu" if variant == "fc1-gelu" else "none", residual)
        elif op == "nan_inf_flags":
            cl, ml, _ = bpost.make_inputs("cpu", SEMANTIC)
            args = (cl, ml)
        else:
            raise ValueError(op)
        self._inputs[key] = args
        return args

    def inputs(self, case: Case) -> tuple:
        key = (case.op, case.variant, case.device)
        if key not in self._inputs:
            cpu = self._cpu_inputs(case.op, case.variant)
            self._inputs[key] = tuple(a.to(case.device) if isinstance(a, torch.Tensor) else a for a in cpu)
        return self._inputs[key]

    def expected(self, case: Case):
        """The reference's output on the case's device and inputs (the ``ref`` implementation)."""
        key = (case.op, case.variant, case.device)
        if key not in self._expected:
            ref = implementation(dataclasses.replace(case, impl="ref"))
            self._expected[key] = ref(*self.inputs(case))
        return self._expected[key]


def work(case: Case, args: tuple) -> Dict[str, float]:
    """Shapes and the op's minimum work: FLOPs of its arithmetic core and bytes it must move (fp32
    inputs read once, outputs written once; the references move more)."""
    if case.op in ("mask_einsum", "semantic_segmentation"):
        cl, ml = args[:2]
        b, q, c = cl.shape
        h, w = ml.shape[2:]
        info = {"shape": f"B={b} Q={q} K={c - 1} mask {h}x{w}", "flops": 2 * b * q * (c - 1) * h * w}
        if case.op == "mask_einsum":
            info["bytes"] = 4 * (cl.numel() + ml.numel() + b * (c - 1) * h * w)
        else:
            hh, ww = args[2][0]
            info["shape"] += f" -> {hh}x{ww}"
            info["bytes"] = 4 * (cl.numel() + ml.numel()) + 8 * sum(s[0] * s[1] for s in args[2])
        return info
    if case.op == "upsample_argmax":
        scores, sizes = args
        b, k, h, w = scores.shape
        return {"shape": f"B={b} K={k} {h}x{w} -> {sizes[0][0]}x{sizes[0][1]}",
                "bytes": 4 * scores.numel() + 8 * sum(s[0] * s[1] for s in sizes)}
    if case.op == "query_argmax":
        probs, _, (hh, ww), _ = args
        q, h, w = probs.shape
        return {"shape": f"Q={q} {h}x{w} -> {hh}x{ww}", "bytes": 4 * probs.numel() + 4 * q + 8 * hh * ww + 8 * q}
    if case.op == "window_attention":
        x, _, _, _, window, shift, heads = args
        b, h, w, c = x.shape
        return {"shape": f"B={b} {h}x{w}x{c} heads={heads} window={window} shift={shift} fp32",
                "flops": bwa.flops(b, h, w, c, heads)}
    if case.op == "fused_linear":
        x, weight, _, activation, residual = args
        n, k = weight.shape
        m = x.numel() // k
        return {"shape": f"M={m} K={k} N={n} {activation}{' + residual' if residual is not None else ''} fp32",
                "flops": 2 * m * n * k, "bytes": 4 * (x.numel() + weight.numel() + n + m * n * (2 if residual is not None else 1))}
    if case.op == "nan_inf_flags":
        return {"shape": " + ".join("x".join(map(str, t.shape)) for t in args) + " fp32",
                "bytes": sum(4 * t.numel() for t in args)}
    if case.op == "ms_deform_attn":
        value, shapes, loc, weights = args
        b, s, heads, d = value.shape
        _, q, _, nl, p, _ = loc.shape
        # 4 corners x D multiply-adds per sample; bytes: value, locations and weights read once,
        # the output written once (the gathers re-read value through the caches)
        return {"shape": f"B={b} levels={'+'.join(f'{h}x{w}' for h, w in shapes)} Q={q} H={heads} D={d} P={p} fp32",
                "flops": 2 * 4 * b * q * heads * nl * p * d,
                "bytes": 4 * (value.numel() + loc.numel() + weights.numel() + b * q * heads * d)}
    raise ValueError(case.op)


@functools.lru_cache(maxsize=None)
def _copy_bandwidth_gbs(device: str) -> float:
    return bpost.copy_bandwidth_gbs(device)


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def _as_named_tensors(case: Case, out) -> List[Tuple[str, torch.Tensor]]:
    if case.op == "query_argmax":
        return [("labels", out[0]), ("own_area", out[1])]
    if isinstance(out, torch.Tensor):
        return [("labels", out)]
    return [(f"image {i} labels", t) for i, t in enumerate(out)]


def check_exact(case: Case, got, expected) -> str:
    """Integer outputs: identical shape, dtype and every element, else a message with the count and
    the first mismatches."""
    got_t, exp_t = _as_named_tensors(case, got), _as_named_tensors(case, expected)
    assert len(got_t) == len(exp_t), f"{case.label}: {len(got_t)} outputs, the reference gives {len(exp_t)}"
    for (name, g), (_, e) in zip(got_t, exp_t):
        g, e = g.cpu(), e.cpu()
        assert g.shape == e.shape and g.dtype == e.dtype, (
            f"{case.label}: {name} is {tuple(g.shape)} {g.dtype}, the reference's {tuple(e.shape)} {e.dtype}")
        bad = (g != e).nonzero()
        if len(bad):
            first = ", ".join(f"{tuple(int(i) for i in p)}: {int(g[tuple(p)])} vs ref {int(e[tuple(p)])}"
                              for p in bad[:3])
            raise AssertionError(f"{case.label}: {name}: {len(bad)} of {e.numel()} elements differ from the "
                                 f"reference (must be identical); first {first}")
    return "identical to the reference (torch.equal)"


def check_mask_einsum(case: Case, out: torch.Tensor, ref32: torch.Tensor, args: tuple) -> str:
    """Elementwise |out - ref64| <= 2 |ref32 - ref64| + atol: within twice the fp32 reference's own
    error. atol covers elements where the reference happens to be exact: a sum of Q products in
    [0, 1] accumulated in fp32 is within (Q + 8) ulps of the largest score (Q adds, the product,
    softmax and sigmoid a few ulps each); tests/kernels/test_mask_einsum.py uses the same budget."""
    cl, ml = (a.double().cpu() for a in args)
    ref64 = me.mask_einsum_ref(cl, ml)
    out64, ref32 = out.double().cpu(), ref32.double().cpu()
    assert out64.shape == ref64.shape, f"{case.label}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    atol = (cl.shape[1] + 8) * U32 * max(ref64.abs().max().item(), 1e-30)
    err = (out64 - ref64).abs()
    budget = 2 * (ref32 - ref64).abs() + atol
    over = (err > budget) | out64.isnan()
    if over.any():
        flat = int((err - budget).nan_to_num(float("inf")).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{case.label}: {int(over.sum())} of {err.numel()} scores over budget; worst at {idx}: "
            f"|out - ref64| = {err[idx].item():.3e} > bound {budget[idx].item():.3e} (= 2 |ref32 - ref64| + atol "
            f"{atol:.2e}); max error overall {err.max().item():.3e}")
    worst = int((err / budget).flatten().argmax())
    return (f"max |out - ref64| {err.max().item():.2e}; worst ratio error/bound {(err / budget).flatten()[worst].item():.2f} "
            f"(bound 2 |ref32 - ref64| + {atol:.2e})")


def _within_twice_the_fp32_error(case: Case, out: torch.Tensor, ref32: torch.Tensor, gold: torch.Tensor) -> str:
    """max |out - gold| <= 2 max |ref32 - gold| + eps32 * max |gold|, and the same on the mean with
    atol / 10 (gold: the reference in fp64, on the CPU) -> the line the benchmark prints."""
    out64, base = out.double().cpu(), ref32.double().cpu()
    assert out64.shape == gold.shape, f"{case.label}: shape {tuple(out64.shape)} != {tuple(gold.shape)}"
    atol = torch.finfo(torch.float32).eps * gold.abs().max().item()
    err, base_err = (out64 - gold).abs(), (base - gold).abs()
    max_bound, mean_bound = 2 * base_err.max().item() + atol, 2 * base_err.mean().item() + atol / 10
    max_err, mean_err = err.max().item(), err.mean().item()
    if not (max_err <= max_bound and mean_err <= mean_bound):  # also catches NaN
        raise AssertionError(f"{case.label}: max |out - gold| {max_err:.3e} (bound {max_bound:.3e}), mean "
                             f"{mean_err:.3e} (bound {mean_bound:.3e})")
    return f"max |out - gold| {max_err:.2e} (bound {max_bound:.2e}), mean {mean_err:.2e} (bound {mean_bound:.2e})"


def check_window_attention(case: Case, out: torch.Tensor, ref32: torch.Tensor, args: tuple) -> str:
    """max |out - gold| <= 2 max |ref32 - gold| + eps32 * max |gold| (one fp32 ulp of the largest
    output, so a nearly exact reference cannot demand more than fp32 holds), and the same on the
    mean with atol / 10; gold = the reference in fp64. As tests/kernels/test_window_attention.py."""
    x, weight, bias, table, window, shift, heads = args
    gold = wa.window_attention_ref(x.double(), weight.double(), bias.double(), table.double(), window, shift, heads)
    return _within_twice_the_fp32_error(case, out, ref32, gold.cpu())


def check_fused_linear(case: Case, out: torch.Tensor, ref32: torch.Tensor, args: tuple) -> str:
    """max |out - gold| <= 2 max |ref32 - gold| + eps32 * max |gold| and the same on the mean with
    atol / 10, gold the reference in fp64 (tests/kernels/test_fused_linear.py's budget)."""
    x, weight, bias, activation, residual = args
    dbl = [None if t is None else t.double().cpu() for t in (x, weight, bias, residual)]
    gold = fl.fused_linear_ref(dbl[0], dbl[1], dbl[2], activation, dbl[3])
    return _within_twice_the_fp32_error(case, out, ref32, gold)


def check_ms_deform_attn(case: Case, out: torch.Tensor, ref32: torch.Tensor, args: tuple) -> str:
    """|out - ref64| <= 2 |ref32 - ref64| + atol elementwise, atol = u * (4*L*P + 2*max side + 8) *
    sum |terms| (the kernel's coordinate and summation rounding; tests/kernels/test_ms_deform_attn.py)."""
    value, shapes, loc, weights = (a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    ref64 = msda.ms_deform_attn_ref(value.double(), shapes, loc.double(), weights.double())
    absref = msda.ms_deform_attn_ref(value.double().abs(), shapes, loc.double(), weights.double().abs())
    nl, p = weights.shape[-2:]
    atol = U32 * (4 * nl * p + 2 * max(max(hw) for hw in shapes) + 8) * absref
    out64, ref32 = out.double().cpu(), ref32.double().cpu()
    assert out64.shape == ref64.shape, f"{case.label}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    err = (out64 - ref64).abs()
    budget = 2 * (ref32 - ref64).abs() + atol
    over = (err > budget) | out64.isnan()
    if over.any():
        flat = int((err - budget).nan_to_num(float("inf")).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(f"{case.label}: {int(over.sum())} of {err.numel()} outputs over budget; worst at {idx}: "
                             f"|out - ref64| = {err[idx].item():.3e} > bound {budget[idx].item():.3e}")
    return f"max |out - ref64| {err.max().item():.2e}; worst ratio error/bound {(err / budget).max().item():.2f}"


def verify(case: Case, got, expected, args: tuple) -> str:
    """Raise AssertionError (op, impl, device, error, bound) unless ``got`` passes; else say how it passed."""
    if case.op == "nan_inf_flags":  # a tuple of ints, whatever the implementation
        if got != expected:
            raise AssertionError(f"{case.label}: flags {got}, the reference gives {expected}")
        return f"flags {got}, as the reference"
    if case.impl == "ref":
        # The reference itself: a second call must give the first call's output bit for bit.
        if case.op in ("mask_einsum", "window_attention", "ms_deform_attn", "fused_linear"):
            if not torch.equal(got, expected):
                diff = (got.double() - expected.double()).abs().max().item()
                raise AssertionError(f"{case.label}: not deterministic, two calls differ by up to {diff:.3e}")
            return "reference: a second call is bit-identical to the first"
        check_exact(case, got, expected)
        return "reference: a second call is identical to the first"
    if case.op == "mask_einsum":
        return check_mask_einsum(case, got, expected, args)
    if case.op == "window_attention":
        return check_window_attention(case, got, expected, args)
    if case.op == "fused_linear":
        return check_fused_linear(case, got, expected, args)
    if case.op == "ms_deform_attn":
        if case.impl == "transformers":  # the reference is transformers' function, bit for bit
            if not torch.equal(got, expected):
                diff = (got.double() - expected.double()).abs().max().item()
                raise AssertionError(f"{case.label}: differs from the reference by up to {diff:.3e} (must be equal)")
            return "bit-identical to the reference"
        return check_ms_deform_attn(case, got, expected, args)
    return check_exact(case, got, expected)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entries
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return Data()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(benchmark, data, case):
    reason = skip_reason(case)
    if reason:
        pytest.skip(reason)
    args = data.inputs(case)
    fn = implementation(case)
    expected = data.expected(case)
    verified = verify(case, fn(*args), expected, args)  # verify, then time

    cuda = case.device == "cuda"

    def call():
        fn(*args)
        if cuda:
            torch.cuda.synchronize()

    info = work(case, args)
    benchmark.extra_info.update(op=case.op, impl=case.impl, device=case.device, variant=case.variant,
                                torch_threads=torch.get_num_threads(), verified=verified, **info)
    benchmark.pedantic(call, rounds=case.rounds, warmup_rounds=1)

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median = stats.stats.median
        if "flops" in info:
            benchmark.extra_info["gflops_per_s_at_median"] = info["flops"] / median / 1e9
        if "bytes" in info:
            bandwidth = _copy_bandwidth_gbs(case.device)
            benchmark.extra_info["gb_per_s_at_median"] = info["bytes"] / median / 1e9
            benchmark.extra_info["copy_bandwidth_gb_per_s"] = bandwidth
            benchmark.extra_info["percent_of_copy_bandwidth"] = 100 * info["bytes"] / median / 1e9 / bandwidth
