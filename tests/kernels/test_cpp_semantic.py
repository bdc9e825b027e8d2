"""csrc/semantic.cpp (torch.ops.maskformer.*): the interpolation arithmetic against F.interpolate
bit for bit, upsample_argmax_cpp against the reference (identical labels on realistic, random,
near-tie and non-finite scores; a 4000x3000 target with bounded memory), mask_einsum_cpp within the
fp32 / low-precision budgets. Skipped with the import error when the extension was not built."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from maskformer.kernels import mask_einsum as me
from maskformer.kernels import upsample_argmax as ua
from hf_oracle import assert_labels_equal, assert_within_budget, realistic_scores

U32 = 2.0**-24


# ---------------------------------------------------------------------------------------------
# Interpolation arithmetic
# ---------------------------------------------------------------------------------------------

ROUNDING_CASES = [
    (5, 160, 213, 640, 853), (5, 13, 17, 97, 31), (5, 13, 17, 97, 32), (21, 13, 17, 64, 64),
    (21, 13, 17, 64, 65), (3, 50, 60, 20, 30), (3, 50, 60, 200, 300), (1, 1, 1, 200, 100),
    (6, 1, 1, 300, 200), (2, 7, 9, 7, 9), (2, 7, 9, 700, 9), (17, 8, 8, 100, 28), (33, 160, 213, 97, 130),
    (5, 1, 7, 200, 100), (5, 7, 1, 200, 100), (9, 6, 5, 1, 1), (9, 6, 5, 1, 300),
]


@pytest.mark.parametrize("case", ROUNDING_CASES, ids=lambda c: "x".join(map(str, c)))
def test_values_are_f_interpolate_bitwise(cpp_ops, case):
    """bilinear_resize runs the kernels' per-pixel arithmetic with the calibrated rounding and
    the kernel choice aten makes: every value equals F.interpolate's."""
    k, h, w, hh, ww = case
    x = torch.rand(k, h, w, generator=torch.Generator().manual_seed(sum(case)))
    r = ua.torch_cpu_bilinear_rounding()
    vec = r.channels_last_vec if ua.torch_cpu_uses_channels_last(k, h, w, hh, ww) else 0
    got = cpp_ops.bilinear_resize(x, hh, ww, r.fma, vec)
    ref = F.interpolate(x[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
    bad = int((got != ref).sum())
    assert bad == 0, f"{bad} of {ref.numel()} values differ (fma {r.fma}, channels-last width {vec})"


@pytest.mark.parametrize("vec", [0, 8, 16])
def test_plain_rounding_is_the_uncontracted_formula(cpp_ops, vec):
    """use_fma=False must be the plain formula (torch's DEFAULT-capability build), not something
    the compiler contracted: compared with the PyTorch emulation, where every op rounds."""
    x = torch.rand(21, 9, 11, generator=torch.Generator().manual_seed(vec))
    for size in ((97, 130), (40, 33)):
        got = cpp_ops.bilinear_resize(x, size[0], size[1], False, vec)
        emu = ua.bilinear_resize_emulated(x, size, False, vec)
        assert torch.equal(got, emu), f"{int((got != emu).sum())} values differ at {size}"


@pytest.mark.parametrize("vec", [0, 8])
def test_plain_rounding_labels(cpp_ops, vec):
    """upsample_argmax_out with use_fma=False (the baseline-ISA build, sparse and dense paths)
    labels by the plain formula's values."""
    for name, x in (("realistic", realistic_scores(40, 9, 11, seed=vec)[0]), ("uniform", torch.rand(40, 9, 11))):
        size = (97, 130)
        out = torch.full(size, -1, dtype=torch.int64)
        cpp_ops.upsample_argmax_out(x, out, True, False, vec)
        expected = ua.bilinear_resize_emulated(x, size, False, vec).argmax(0)
        assert_labels_equal(out, expected, f"plain {name} width {vec}")


_DEFAULT_CAPABILITY_PROBE = r"""
import torch
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels.mask_einsum import make_realistic_logits, mask_einsum_ref
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
r = ua.torch_cpu_bilinear_rounding()
assert r.verified and not r.fma, r
x = mask_einsum_ref(*make_realistic_logits(2, 30, 150, 20, 27))
for sizes in ([(97, 130), (40, 33)], [(20, 27), (1, 300)]):
    for got, ref in zip(ua.upsample_argmax_cpp(x, sizes), ua.upsample_argmax_ref(x, sizes)):
        assert torch.equal(got, ref), int((got != ref).sum())
print("ok")
"""


def test_default_capability_build(cpp_ops):
    """With ATEN_CPU_CAPABILITY=default torch runs its uncontracted (no fma) kernels: calibration
    must notice and the labels stay identical."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", _DEFAULT_CAPABILITY_PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# upsample_argmax
# ---------------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 197), (3, 4), (40, 53), (127, 211), (160, 213), (481, 640), (64, 64), None]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 16, 17, 150, 171, 300])
def test_labels_match_ref_realistic(cpp_ops, k):
    """Realistic MaskFormer scores (sparse candidates) at smaller, odd, identity, larger and
    channels-last-kernel (64x64) targets and without resize; sentinel-filled outputs."""
    scores = realistic_scores(k, 40, 53, seed=k, batch=2, queries=30)
    out_dtype = torch.int16 if k > 255 else torch.uint8 if k > 100 else torch.int64
    for size in SIZES:
        sizes = None if size is None else [size, (size[1], size[0])]
        shapes = sizes or [(40, 53)] * 2
        out = [torch.full(s, 123, dtype=out_dtype) for s in shapes]
        got = ua.upsample_argmax_cpp(scores, sizes, out_dtype=out_dtype, out=out)
        ref = ua.upsample_argmax_ref(scores, sizes, out_dtype=out_dtype)
        for i in range(2):
            assert got[i] is out[i]
            assert_labels_equal(got[i], ref[i], f"K={k} size={shapes[i]} image {i}")


@pytest.mark.parametrize("kind", ["uniform", "near_ties", "flat_cells", "negative"])
def test_labels_match_ref_adversarial(cpp_ops, kind):
    """Scores the pruning must not get wrong: uniform noise (every class a candidate: dense path),
    classes within a few ulps of each other (ties broken by rounding alone), cells where all
    classes are equal (exact ties), and negative scores (the margin uses max |tap|)."""
    g = torch.Generator().manual_seed(11)
    k, h, w = 40, 23, 31
    if kind == "uniform":
        x = torch.rand(k, h, w, generator=g)
    elif kind == "near_ties":
        base = torch.rand(1, h, w, generator=g)
        x = base * (1 + torch.randint(-3, 4, (k, h, w), generator=g) * U32)
    elif kind == "flat_cells":
        x = realistic_scores(k, h, w, seed=2)[0]
        x[:, 5:12, 7:20] = 0.5
    else:
        x = -realistic_scores(k, h, w, seed=3)[0] * 1e3 + torch.rand(k, h, w, generator=g)
    for size in ((97, 130), (240, 311), (40, 33), (h, w)):
        assert_labels_equal(ua.upsample_argmax_cpp(x, size), ua.upsample_argmax_ref(x, size), f"{kind} {size}")


def test_ties_and_non_finite(cpp_ops):
    """First index wins exact ties through the generic kernel; NaN / +-inf taps behave as in torch
    (inf * 0 = NaN weights included), through both aten kernels."""
    x = realistic_scores(24, 9, 12, seed=5)[0]
    x[20] = x[3]  # exact duplicate: 20 must never win through the generic kernel
    got = ua.upsample_argmax_cpp(x, (200, 150))
    assert_labels_equal(got, ua.upsample_argmax_ref(x, (200, 150)), "dup")
    assert not (got == 20).any()
    y = x.clone()
    y[7, 2, 3] = float("nan")
    y[9, 5, 5] = float("inf")
    y[11, 6, 0] = float("-inf")
    y[13, 8, 11] = float("inf")
    for size in ((200, 150), (40, 33), (9, 12), None):
        assert_labels_equal(ua.upsample_argmax_cpp(y, size), ua.upsample_argmax_ref(y, size), f"non-finite {size}")


def _flat_scores(k, h, w, seed, batch=1, queries=100):
    """(batch, K, h, w) scores of random logits (torch.randn class and mask logits): every class
    scores about the same everywhere, ~8 candidates per cell survive the pruning (the worst case
    of the leader test and of the vectorised sparse labelling)."""
    g = torch.Generator().manual_seed(seed)
    cl = torch.randn(batch, queries, k + 1, generator=g)
    ml = torch.randn(batch, queries, h, w, generator=g)
    return me.mask_einsum_ref(cl, ml)


@pytest.mark.parametrize("k", [17, 40, 150])
def test_labels_match_ref_flat_scores(cpp_ops, k):
    """Random logits: many candidates per cell (leader-dominance pruning, sparse_cells over cell
    columns, dense cells inside sparse tiles), upscales by 4 and by non-integer factors, a
    downscale, the channels-last kernel's sizes (H + W <= 128) and the identity; contiguous scores
    and a strided crop of them."""
    x = _flat_scores(k, 40, 54, seed=k)[0]
    crop = x[:, :37, :50]
    for name, scores in (("contiguous", x), ("crop view", crop)):
        for size in ((160, 216), (128, 171), (97, 301), (20, 27), (40, 33), tuple(scores.shape[1:])):
            out = torch.full(size, -1, dtype=torch.int64)
            got = ua.upsample_argmax_cpp(scores, size, out=out)
            assert_labels_equal(got, ua.upsample_argmax_ref(scores, size), f"flat K={k} {name} {size}")


def test_flat_scores_ties_and_non_finite(cpp_ops):
    """On flat scores: a class equal to another everywhere (the first index wins even where it is
    the cell's leader), a class one ulp below the best class at every tap (kept: the leader test
    has a margin, the labels are decided by the exact values), NaN and +-inf taps."""
    x = _flat_scores(30, 24, 32, seed=7)[0]
    x[25] = x[4]
    top = x.max(0).values
    x[26] = torch.nextafter(top, torch.tensor(-1.0))  # one ulp below the best class everywhere
    x[2] = top  # an exact tie with the best class, from a lower index: class 2 wins all ties
    for size in ((96, 128), (37, 50), (40, 33)):
        got = ua.upsample_argmax_cpp(x, size)
        assert_labels_equal(got, ua.upsample_argmax_ref(x, size), f"ties {size}")
        assert not (got == 25).any()
    y = x.clone()
    y[7, 2, 3] = float("nan")
    y[9, 5, 5] = float("inf")
    y[11, 6, 0] = float("-inf")
    y[13, 23, 31] = float("inf")
    for size in ((96, 128), (40, 33), None):
        assert_labels_equal(ua.upsample_argmax_cpp(y, size), ua.upsample_argmax_ref(y, size), f"non-finite {size}")


def test_issue_13_worst_case_matches_transformers_ops(cpp_ops):
    """The benchmark's worst case at full size: random logits, batch 2, 150 classes, 100 queries,
    160x216 masks to 640x853 and 512x683; dispatch's cpp path labels as transformers' ops do."""
    from maskformer import dispatch

    g = torch.Generator().manual_seed(0)
    cl = torch.randn(2, 100, 151, generator=g)
    ml = torch.randn(2, 100, 160, 216, generator=g)
    sizes = [(640, 853), (512, 683)]
    with dispatch.backend("cpp"):
        got = dispatch.semantic_segmentation(cl, ml, sizes)
    scores = me.mask_einsum_ref(cl, ml)
    for i, size in enumerate(sizes):
        assert_labels_equal(got[i], ua.upsample_argmax_ref(scores[i], size), f"image {i} {size}")


def test_threads_and_concurrent_callers(cpp_ops):
    """The tasks are shared with helpers from torch's inter-op pool: 1 and 2 intra-op threads give
    the same labels, and so do 4 Python threads calling at once (each call waits only for the
    tasks its helpers claimed)."""
    import concurrent.futures

    x = _flat_scores(60, 30, 41, seed=9)[0]
    r = realistic_scores(60, 30, 41, seed=9)[0]
    size = (120, 163)
    expected = [ua.upsample_argmax_ref(v, size) for v in (x, r)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for v, e in zip((x, r), expected):
                assert_labels_equal(ua.upsample_argmax_cpp(v, size), e, f"{n} threads")
    finally:
        torch.set_num_threads(threads)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: ua.upsample_argmax_cpp((x, r)[i % 2], size), range(16)))
    for i, got in enumerate(results):
        assert_labels_equal(got, expected[i % 2], f"concurrent call {i}")


def test_one_thread_rgb_rule(cpp_ops):
    x = realistic_scores(3, 30, 40, seed=6)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for size in ((150, 211), (61, 61)):
            assert_labels_equal(ua.upsample_argmax_cpp(x, size), ua.upsample_argmax_ref(x, size), f"1 thread {size}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores(cpp_ops, dtype):
    """fp16/bf16 scores: upcast like the reference, so labels are identical."""
    x = realistic_scores(150, 20, 27, seed=8)[0].to(dtype)
    for size in ((80, 107), (19, 13), None):
        assert_labels_equal(ua.upsample_argmax_cpp(x, size), ua.upsample_argmax_ref(x, size), f"{dtype} {size}")


def _chunked_ref_labels(x, size, chunk=5):
    """Reference labels without materialising (K, H, W): F.interpolate a few classes at a time
    (aten's generic kernel is per channel, so the values are the full call's) and keep the first
    maximum across chunks."""
    best = labels = None
    for k0 in range(0, x.shape[0], chunk):
        r = F.interpolate(x[None, k0 : k0 + chunk], size=size, mode="bilinear", align_corners=False)[0]
        idx = r.argmax(0)
        val = r.gather(0, idx[None])[0]
        del r
        if best is None:
            best, labels = val, idx
        else:
            take = val > best
            best = torch.where(take, val, best)
            labels = torch.where(take, idx + k0, labels)
    return labels


def test_very_large_target(cpp_ops):
    """4000 x 3000 from a 100 x 75 mask (scale 40): identical labels to the reference (chunked
    over classes: the full reference would need K x 48 MB)."""
    x = realistic_scores(20, 100, 75, seed=9, queries=30)[0]
    assert not ua.torch_cpu_uses_channels_last(20, 100, 75, 4000, 3000)
    got = ua.upsample_argmax_cpp(x, (4000, 3000))
    assert_labels_equal(got, _chunked_ref_labels(x, (4000, 3000)), "4000x3000")


_MEMORY_PROBE = r"""
import torch
from maskformer.kernels.upsample_argmax import upsample_argmax_cpp
from maskformer.kernels.mask_einsum import make_realistic_logits, mask_einsum_ref

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

cl, ml = make_realistic_logits(1, 30, 150, 100, 75)
x = mask_einsum_ref(cl, ml)[0]
out = torch.zeros(4000, 3000, dtype=torch.int64)  # touched: its pages are not the kernel's
upsample_argmax_cpp(x[:, :9, :9], (200, 300))  # warm-up: thread pool, extension, calibration
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = kib("VmRSS")
upsample_argmax_cpp(x, (4000, 3000), out=out)
print(kib("VmHWM") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs /proc/self/clear_refs")
def test_very_large_target_memory(cpp_ops):
    """K=150 at 4000 x 3000: the reference would allocate 150 x 4000 x 3000 fp32 = 7.2 GB. The
    kernel's peak extra resident memory (subprocess, peak RSS reset just before the call) must stay
    under 64 MiB: candidate tables O(h*w*K/16), per-thread scratch O(K * 208 columns), staging
    16 rows x W."""
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    extra_kib = int(res.stdout.split()[-1])
    assert extra_kib < 64 * 1024, f"peak extra RSS {extra_kib / 1024:.1f} MiB during a 4000x3000, K=150 call"


def _step(scale):
    """aten's source step for an explicit scale factor: static_cast<float>(1.0 / scale); -1: none."""
    return -1.0 if scale is None else torch.tensor(1.0 / scale, dtype=torch.float64).float().item()


def test_strided_views_and_explicit_scales(cpp_ops):
    """The op reads a (K, h', w') view with unit column stride in place (a crop of padded scores:
    plane and row strides of the larger map) and takes aten's source step for explicit scale
    factors: the values equal aten.upsample_bilinear2d on the view with those scales, bit for bit,
    and the labels equal those of a contiguous copy (resize, no resize, pruned and dense paths)."""
    g = torch.Generator().manual_seed(12)
    base = torch.rand(1, 20, 30, generator=g)
    x = base * (1 + torch.randint(-3, 4, (40, 20, 30), generator=g) * U32)  # near ties: rounding decides
    view = x[:, :13, :17]
    r = ua.torch_cpu_bilinear_rounding()
    for size, scales in (((97, 131), (97 / 12.5, 131 / 16.25)), ((40, 33), (40 / 12.75, None)), ((9, 11), (None, None))):
        vec = r.channels_last_vec if sum(size) <= 128 else 0
        steps = [_step(s) for s in scales]
        ref = torch.ops.aten.upsample_bilinear2d(view[None], list(size), False, *scales)[0]
        got = cpp_ops.bilinear_resize(view, size[0], size[1], r.fma, vec, *steps)
        assert torch.equal(got, ref), f"{size} {scales}: {int((got != ref).sum())} values differ from aten"
        labels = torch.full(size, -1, dtype=torch.int64)
        cpp_ops.upsample_argmax_out(view, labels, True, r.fma, vec, *steps)
        assert_labels_equal(labels, ref.argmax(0), f"view {size}")
        copy = torch.full(size, -1, dtype=torch.int64)
        cpp_ops.upsample_argmax_out(view.contiguous(), copy, True, r.fma, vec, *steps)
        assert_labels_equal(labels, copy, f"view vs copy {size}")
    labels = torch.full((13, 17), -1, dtype=torch.int64)
    cpp_ops.upsample_argmax_out(view, labels, False, r.fma, 0)
    assert_labels_equal(labels, view.argmax(0), "no resize")


def test_argument_errors(cpp_ops):
    x = torch.rand(5, 4, 4)
    with pytest.raises(ValueError, match="cannot hold class index"):
        ua.upsample_argmax_cpp(torch.rand(300, 2, 2), (4, 4), out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="float64 is not supported"):
        ua.upsample_argmax_cpp(x.double(), (8, 8))
    with pytest.raises(ValueError, match="out map must be"):
        ua.upsample_argmax_cpp(x, (8, 8), out=torch.empty(8, 9, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="without resize"):
        cpp_ops.upsample_argmax_out(x, torch.empty(8, 8, dtype=torch.int64), False, True, 0)


# ---------------------------------------------------------------------------------------------
# mask_einsum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,q,k,h,w", [(2, 100, 150, 40, 53), (1, 1, 1, 9, 7), (3, 17, 2, 13, 29), (2, 50, 300, 11, 13)])
def test_mask_einsum_fp32(cpp_ops, b, q, k, h, w):
    """Against fp64 with the fp32 reference's own error as budget; atol (Q + 8) ulps of the largest
    score: Q fp32 adds of products in [0, 1] plus a few ulps from exp, sigmoid and the divide."""
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=q)
    ml[:, 0, :1] = 120.0  # beyond the kernel's |x| <= 87 sigmoid clamp, both signs
    ml[:, -1, -1:] = -120.0
    fast = me.mask_einsum_cpp(cl, ml)
    assert fast.dtype == torch.float32 and tuple(fast.shape) == (b, k, h, w)
    ref64 = me.mask_einsum_ref(cl.double(), ml.double())
    atol = (q + 8) * U32 * max(ref64.abs().max().item(), 1e-30)
    assert_within_budget(fast, ref64, me.mask_einsum_ref(cl, ml), atol, f"cpp fp32 {(b, q, k, h, w)}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_einsum_low_precision(cpp_ops, dtype):
    """|fast - ref32| <= 2 |ref_lowp - ref32| + one output ulp of the low dtype (transformers run in
    that dtype cannot be closer)."""
    cl, ml = me.make_realistic_logits(2, 100, 150, 20, 27, seed=1)
    ref32 = me.mask_einsum_ref(cl, ml)
    cl16, ml16 = cl.to(dtype), ml.to(dtype)
    ref_lowp = torch.einsum("bqc, bqhw -> bchw", cl16.softmax(-1)[..., :-1], ml16.sigmoid())
    fast = me.mask_einsum_cpp(cl16, ml16)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert_within_budget(fast, ref32, ref_lowp, ulp * ref32.abs().max().item(), f"cpp {dtype}")


def test_mask_einsum_strided_input(cpp_ops):
    cl, ml = me.make_realistic_logits(2, 20, 30, 12, 14, seed=4)
    mlt = ml.transpose(2, 3).contiguous().transpose(2, 3)
    assert not mlt.is_contiguous()
    ref64 = me.mask_einsum_ref(cl.double(), ml.double())
    atol = 28 * U32 * ref64.abs().max().item()
    assert_within_budget(me.mask_einsum_cpp(cl, mlt), ref64, me.mask_einsum_ref(cl, ml), atol, "strided")


def test_opcheck(cpp_ops):
    """torch.library contract (schema, fake tensor) of the registered C++ ops."""
    cl, ml = me.make_realistic_logits(1, 5, 3, 4, 6)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(cpp_ops.mask_einsum.default, (cl, ml), test_utils=tests)
    torch.library.opcheck(cpp_ops.bilinear_resize.default, (torch.rand(3, 4, 5), 9, 7, True, 0), test_utils=tests)
    out = torch.empty(9, 7, dtype=torch.int64)
    torch.library.opcheck(cpp_ops.upsample_argmax_out.default, (torch.rand(3, 4, 5), out, True, True, 0),
                          test_utils=tests)
    # A crop view with explicit source steps (source_extents; -1: no scale factor on that axis).
    crop = torch.rand(3, 6, 8)[:, :4, :5]
    torch.library.opcheck(cpp_ops.upsample_argmax_out.default, (crop, out, True, True, 0, 0.4375, -1.0),
                          test_utils=tests)
    torch.library.opcheck(cpp_ops.bilinear_resize.default, (crop, 9, 7, True, 0, 0.4375, 0.625), test_utils=tests)
