"""kernels/query_argmax.py + csrc/panoptic.cpp: the panoptic per-pixel step (bilinear resize of the
kept queries' mask probabilities, score-weighted argmax over queries, per-query own-mask areas)
against ``query_argmax_ref`` (the processor's torch ops): identical labels and areas on realistic,
tied, thresholded, adversarial and non-finite inputs, through both the pruned and the dense path,
at odd, identity, channels-last, small and very large targets; bounded memory at 3000x4000.
Skipped with the import error when the C++ extension was not built."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from maskformer.kernels import query_argmax as qa
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels.mask_einsum import make_realistic_logits
from hf_oracle import assert_labels_equal

U32 = 2.0**-24


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def realistic_probs(q: int, h: int, w: int, seed: int = 0):
    """(Q, h, w) sigmoid mask probabilities and (Q,) class scores of Q confident queries of a
    MaskFormer-like output (one Voronoi region each, noisy logits +-6, sharp borders), i.e. what the
    panoptic processor passes on after dropping the "no object" queries."""
    cl, ml = make_realistic_logits(1, q, 133, h, w, seed=seed, n_objects=q)
    scores = cl[0].softmax(-1)[:, :-1].max(-1).values
    return ml[0].sigmoid(), scores


def smooth_probs(q: int, h: int, w: int, seed: int = 0):
    """Overlapping soft blobs (Gaussian bumps of random width and height): many queries straddle
    the threshold over wide areas and several compete for most cells."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    c = torch.rand(q, 2, generator=g) * torch.tensor([h, w])
    r = 1 + torch.rand(q, 2, generator=g) * torch.tensor([h, w]) / 3
    amp = 0.3 + 0.7 * torch.rand(q, generator=g)
    d = ((yy - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((xx - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
    probs = (amp[:, None, None] * torch.exp(-d)).contiguous()
    return probs, 0.5 + 0.5 * torch.rand(q, generator=g)


def run_both(probs, weights, size, thr=0.5, prune=True):
    """C++ into sentinel-filled outputs and the reference; returns ((labels, area), (labels, area))."""
    shape = tuple(probs.shape[1:]) if size is None else size
    out = (torch.full(shape, -7, dtype=torch.int64), torch.full((probs.shape[0],), -7, dtype=torch.int64))
    got = qa.query_argmax_cpp(probs, weights, size, thr, out=out, prune=prune)
    assert got[0] is out[0] and got[1] is out[1]
    return got, qa.query_argmax_ref(probs, weights, size, thr)


def assert_same(got, ref, name):
    assert_labels_equal(got[0], ref[0], f"{name} labels")
    a, b = got[1], ref[1]
    assert a.dtype == b.dtype == torch.int64, f"{name}: area dtype {a.dtype} vs {b.dtype}"
    bad = (a != b).nonzero().flatten()
    if len(bad):
        shown = ", ".join(f"q{int(i)}: ours {int(a[i])} vs ref {int(b[i])}" for i in bad[:5])
        raise AssertionError(f"{name}: {len(bad)} of {len(b)} own areas differ; {shown}")


def _processor_ops(mask_probs, scores, size, mask_threshold):
    """The panoptic processor's per-image ops before they moved to query_argmax (out-of-place)."""
    if size is not None:
        mask_probs = F.interpolate(mask_probs.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    weighted = mask_probs * scores.view(-1, 1, 1)
    return weighted.argmax(0), (mask_probs >= mask_threshold).flatten(1).sum(1)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)])
def test_ref_is_the_processor_ops(dtypes):
    """query_argmax_ref (in-place weighting) gives the former processor code's results exactly,
    also for mixed dtypes (where an in-place multiply would round differently, it does not use one)."""
    probs, scores = realistic_probs(14, 20, 27, seed=1)
    probs, scores = probs.to(dtypes[0]), scores.to(dtypes[1])
    for size in ((80, 108), (33, 21), None):
        before = probs.clone()
        got = qa.query_argmax_ref(probs, scores, size, 0.5)
        assert torch.equal(probs, before), "the input was modified"
        assert_same(got, _processor_ops(probs, scores, size, 0.5), f"{dtypes} {size}")


# Targets: larger (pruned path from Q >= 12), 4x (the panoptic case), odd, identity with resize,
# smaller, one row / column, aten's channels-last kernel (H + W <= 128), no resize.
TARGETS = [(160, 213), (97, 131), (40, 53), (13, 19), (1, 300), (300, 1), (64, 64), (31, 20), None]


@pytest.mark.parametrize("q", [1, 2, 3, 11, 12, 33, 100])
def test_matches_ref_realistic(cpp_ops, q):
    """Realistic probabilities, every target, both paths; Q around the pruning threshold (12) and
    33 = 4 full SIMD vectors + a tail in aten's channels-last kernel."""
    probs, scores = realistic_probs(q, 40, 53, seed=q)
    for size in TARGETS:
        for prune in (True, False):
            got, ref = run_both(probs, scores, size, prune=prune)
            assert_same(got, ref, f"Q={q} target {size} prune={prune}")


@pytest.mark.parametrize("q", [5, 24])
def test_matches_ref_smooth_overlapping(cpp_ops, q):
    """Overlapping soft blobs: wide threshold crossings and many candidates per cell."""
    probs, scores = smooth_probs(q, 23, 31, seed=q)
    for size in ((97, 130), (240, 311), (23, 31), (40, 33), None):
        for thr in (0.5, 0.2):
            for prune in (True, False):
                got, ref = run_both(probs, scores, size, thr, prune)
                assert_same(got, ref, f"Q={q} {size} thr {thr} prune={prune}")


def test_exact_ties_first_query_wins(cpp_ops):
    """Duplicated queries with equal weights tie exactly (generic kernel): the first index must win
    (torch.argmax), through both paths; flat regions where every query is equal go to query 0."""
    probs, scores = realistic_probs(20, 12, 15, seed=3)
    scores = torch.where(torch.arange(20) % 2 == 0, scores, scores[0])  # equal weights: more ties
    probs[17], scores[17] = probs[4], scores[4]
    probs[19], scores[19] = probs[2], scores[2]
    probs[:, 3:7, 5:11] = 0.5
    for size in ((97, 120), (40, 33), (12, 15), None):
        for prune in (True, False):
            got, ref = run_both(probs, scores, size, prune=prune)
            assert_same(got, ref, f"ties {size} prune={prune}")
            if not ua.torch_cpu_uses_channels_last(20, 12, 15, *(size or (12, 15))):
                # (aten's channels-last kernel rounds tail channels 16.. differently: no exact tie)
                assert not ((got[0] == 17) | (got[0] == 19)).any(), "a later duplicate won a tie"
    # Equal weights: every query ties inside the flat block (its pixels whose 4 taps are in it).
    scores = torch.full_like(scores, 0.75)
    got, ref = run_both(probs, scores, (48, 60))
    assert_same(got, ref, "flat equal weights")
    assert (got[0][14:26, 22:42] == 0).all(), "flat region must go to query 0"


@pytest.mark.parametrize("thr", [0.5, 0.0, 0.25, 0.9, 1.0, 1.5, -1.0, 0.5000000001, float("nan")])
def test_thresholds(cpp_ops, thr):
    """Areas at thresholds inside, at and beyond [0, 1], one torch rounds to 0.5 in float32, NaN;
    probabilities of exactly 0.5 and 1.0 sit on the threshold."""
    probs, scores = realistic_probs(14, 30, 40, seed=5)
    probs[2, 5:9, 5:9] = 0.5
    probs[3, 10:14, 20:30] = 1.0
    probs[4, :, :6] = 0.0
    for size in ((120, 160), (30, 40), (61, 43), None):
        for prune in (True, False):
            got, ref = run_both(probs, scores, size, thr, prune)
            assert_same(got, ref, f"thr {thr} {size} prune={prune}")


@pytest.mark.parametrize("kind", ["uniform", "near_ties", "negative_weights", "zero_weights", "large_values"])
def test_adversarial(cpp_ops, kind):
    """Inputs the pruning must not get wrong or must refuse: uniform noise (every query a candidate
    everywhere: the dense fallback), values within a few ulps of each other (ties broken by
    rounding alone), negative and zero weights (no monotone bound: dense), and values far outside
    [0, 1] (the margin is relative to max |tap|)."""
    g = torch.Generator().manual_seed(7)
    q, h, w = 16, 23, 31
    probs, scores = realistic_probs(q, h, w, seed=6)
    if kind == "uniform":
        probs = torch.rand(q, h, w, generator=g)
    elif kind == "near_ties":
        base = torch.rand(1, h, w, generator=g)
        probs = base * (1 + torch.randint(-3, 4, (q, h, w), generator=g) * U32)
        scores = torch.ones(q)
    elif kind == "negative_weights":
        scores = scores * torch.where(torch.arange(q) % 3 == 0, -1.0, 1.0)
    elif kind == "zero_weights":
        scores[::2] = 0.0
    else:
        probs = (probs - 0.5) * 3e4 + torch.rand(q, h, w, generator=g)
    for size in ((97, 130), (240, 311), (40, 33), (h, w), None):
        for prune in (True, False):
            thr = 0.5 if kind != "large_values" else 100.0
            got, ref = run_both(probs, scores, size, thr, prune)
            assert_same(got, ref, f"{kind} {size} prune={prune}")


def test_non_finite(cpp_ops):
    """NaN / +-inf probabilities behave as in torch (NaN wins the argmax, inf * 0 weights give NaN,
    comparisons with NaN are false), through the generic and channels-last kernels."""
    probs, scores = realistic_probs(16, 9, 12, seed=8)
    probs[7, 2, 3] = float("nan")
    probs[9, 5, 5] = float("inf")
    probs[11, 6, 0] = float("-inf")
    probs[13, 8, 11] = float("inf")
    for size in ((200, 150), (40, 33), (9, 12), None):
        for prune in (True, False):
            got, ref = run_both(probs, scores, size, prune=prune)
            assert_same(got, ref, f"non-finite {size} prune={prune}")
    weights = scores.clone()
    weights[5] = float("inf")
    got, ref = run_both(realistic_probs(16, 9, 12, seed=8)[0], weights, (50, 60))
    assert_same(got, ref, "inf weight")


def test_one_thread_rgb_rule(cpp_ops):
    """Three queries on one thread: aten takes the channels-last kernel (rounding_for follows)."""
    probs, scores = realistic_probs(3, 30, 40, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for size in ((150, 211), (61, 61)):
            got, ref = run_both(probs, scores, size)
            assert_same(got, ref, f"1 thread {size}")
    finally:
        torch.set_num_threads(threads)


def _chunked_ref(probs, weights, size, thr, chunk=6):
    """The reference without materialising (Q, H, W): F.interpolate a few queries at a time
    (aten's generic kernel is per channel, so the values are the full call's), then one query at a
    time keep the first maximum of the weighted values (torch.argmax over dim 0 of a (Q, 12 M) tensor
    is 10x slower than these elementwise passes) and count its area. Finite inputs only."""
    best = labels = None
    areas = []
    for k0 in range(0, probs.shape[0], chunk):
        r = F.interpolate(probs[None, k0 : k0 + chunk], size=size, mode="bilinear", align_corners=False)[0]
        for k in range(r.shape[0]):
            areas.append(int((r[k] >= thr).sum()))
            val = r[k] * weights[k0 + k]
            if best is None:
                best, labels = val, torch.zeros(size, dtype=torch.int64)
            else:
                take = val > best
                best = torch.where(take, val, best)
                labels.masked_fill_(take, k0 + k)
        del r
    return labels, torch.tensor(areas, dtype=torch.int64)


def test_very_large_target(cpp_ops):
    """3000 x 4000 from a 100 x 75 mask (scale 40): identical to the reference at Q=16 (chunked over
    queries, ~2 s; all 100 would take ~8 s), and at Q=100 the pruned path equals the dense sweep."""
    probs, scores = realistic_probs(16, 100, 75, seed=9)
    assert not ua.torch_cpu_uses_channels_last(6, 100, 75, 3000, 4000)  # the reference's chunks
    got = qa.query_argmax_cpp(probs, scores, (3000, 4000))
    assert_same(got, _chunked_ref(probs, scores, (3000, 4000), 0.5), "3000x4000 Q=16")
    probs, scores = realistic_probs(100, 100, 75, seed=10)
    pruned = qa.query_argmax_cpp(probs, scores, (3000, 4000))
    assert_same(pruned, qa.query_argmax_cpp(probs, scores, (3000, 4000), prune=False), "3000x4000 Q=100 pruned vs dense")


_MEMORY_PROBE = r"""
import torch
from maskformer.kernels.query_argmax import query_argmax_cpp
from maskformer.kernels.mask_einsum import make_realistic_logits

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

cl, ml = make_realistic_logits(1, 100, 133, 100, 75, n_objects=100)
probs, scores = ml[0].sigmoid(), cl[0].softmax(-1)[:, :-1].max(-1).values
out = (torch.zeros(3000, 4000, dtype=torch.int64), torch.zeros(100, dtype=torch.int64))  # touched
query_argmax_cpp(probs[:, :9, :9], scores, (200, 300))  # warm-up: thread pool, extension, calibration
peaks = []
for prune in (True, False):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = kib("VmRSS")
    query_argmax_cpp(probs, scores, (3000, 4000), out=out, prune=prune)
    peaks.append(kib("VmHWM") - base)
print(*peaks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs /proc/self/clear_refs")
def test_very_large_target_memory(cpp_ops):
    """Q=100 at 3000 x 4000: the reference would allocate 100 x 12 M x (4 + 1) bytes = 6 GB.
    The kernel's peak extra resident memory (subprocess, peak RSS reset just before each call) must
    stay under 64 MiB on both paths: cell tables O(h*w*Q/8) int32, per-thread cached rows 2*Q*W
    floats (3.2 MB), per-band counts."""
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    pruned_kib, dense_kib = (int(v) for v in res.stdout.split()[-2:])
    for name, kib in (("pruned", pruned_kib), ("dense", dense_kib)):
        assert kib < 64 * 1024, f"{name}: peak extra RSS {kib / 1024:.1f} MiB during a 3000x4000, Q=100 call"


_DEFAULT_CAPABILITY_PROBE = r"""
import torch
from maskformer.kernels import query_argmax as qa, upsample_argmax as ua
from maskformer.kernels.mask_einsum import make_realistic_logits
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
r = ua.torch_cpu_bilinear_rounding()
assert r.verified and not r.fma, r
cl, ml = make_realistic_logits(1, 30, 133, 20, 27, n_objects=30)
probs, scores = ml[0].sigmoid(), cl[0].softmax(-1)[:, :-1].max(-1).values
for size in ((97, 130), (40, 33), (80, 108), None):
    ref = qa.query_argmax_ref(probs, scores, size)
    for prune in (True, False):
        got = qa.query_argmax_cpp(probs, scores, size, prune=prune)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (size, prune)
print("ok")
"""


def test_default_capability_build(cpp_ops):
    """With ATEN_CPU_CAPABILITY=default torch interpolates without fma: the kernel's plain rounding
    (baseline build) must give the reference's results too."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", _DEFAULT_CAPABILITY_PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_strided_view_and_explicit_scales(cpp_ops):
    """query_argmax_out reads a (Q, h', w') view with unit column stride in place (a crop of
    padded probabilities) and takes aten's source steps for explicit scale factors: results equal
    the processor's ops on aten.upsample_bilinear2d of the view with those scales, on both paths."""
    probs, scores = realistic_probs(24, 40, 53, seed=12)
    view = probs[:, :31, :45]
    r = ua.torch_cpu_bilinear_rounding()
    for size, scales in (((121, 178), (121 / 30.25, 178 / 44.5)), ((40, 33), (None, 33 / 44.75)), (None, None)):
        if size is None:
            p = view
        else:
            p = torch.ops.aten.upsample_bilinear2d(view[None], list(size), False, *scales)[0]
        want = ((p * scores[:, None, None]).argmax(0), torch.stack([(v >= 0.5).sum() for v in p]))
        steps = [-1.0 if s is None else torch.tensor(1.0 / s, dtype=torch.float64).float().item() for s in scales or (None, None)]
        vec = r.channels_last_vec if size is not None and sum(size) <= 128 else 0
        for prune in (True, False):
            shape = size or (31, 45)
            got = (torch.full(shape, -7, dtype=torch.int64), torch.full((24,), -7, dtype=torch.int64))
            cpp_ops.query_argmax_out(view, scores, 0.5, size is not None, r.fma, vec, prune, got[0], got[1], *steps)
            assert_same(got, want, f"view {size} prune={prune}")


def test_argument_errors(cpp_ops):
    probs, scores = torch.rand(5, 4, 4), torch.rand(5)
    with pytest.raises(ValueError, match=r"weights must be a \(5,\) tensor"):
        qa.query_argmax_cpp(probs, torch.rand(4), (8, 8))
    with pytest.raises(ValueError, match=r"mask_probs must be a \(Q, h, w\) tensor"):
        qa.query_argmax_ref(probs[0], scores, (8, 8))
    with pytest.raises(ValueError, match="Q, h, w >= 1"):
        qa.query_argmax_cpp(probs[:0], scores[:0], (8, 8))
    with pytest.raises(ValueError, match="target_size must be positive"):
        qa.query_argmax_cpp(probs, scores, (0, 8))
    with pytest.raises(ValueError, match="float64 is not supported"):
        qa.query_argmax_cpp(probs.double(), scores, (8, 8))
    with pytest.raises(ValueError, match="weights dtype torch.float16 is not supported"):
        qa.query_argmax_cpp(probs, scores.half(), (8, 8))
    with pytest.raises(ValueError, match="out labels must be"):
        qa.query_argmax_cpp(probs, scores, (8, 8), out=(torch.empty(8, 9, dtype=torch.int64), torch.empty(5, dtype=torch.int64)))
    with pytest.raises(ValueError, match="out own_area must be"):
        qa.query_argmax_cpp(probs, scores, (8, 8), out=(torch.empty(8, 8, dtype=torch.int64), torch.empty(5, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="without resize"):
        cpp_ops.query_argmax_out(probs, scores, 0.5, False, True, 0, True, torch.empty(8, 8, dtype=torch.int64),
                                 torch.empty(5, dtype=torch.int64))
    transposed = probs.transpose(1, 2).contiguous().transpose(1, 2)  # strided, but aten's generic kernel
    assert_same(qa.query_argmax_cpp(transposed, scores, (9, 7)), qa.query_argmax_ref(transposed, scores, (9, 7)),
                "transposed strides")
    assert any("no Triton kernel" in r for r in qa.not_supported_reasons(probs, scores, (8, 8)))
    assert qa.cpp_not_supported_reasons(probs, scores, (8, 8)) == []


def test_opcheck(cpp_ops):
    """torch.library contract (schema, fake tensor) of the registered C++ op."""
    probs, scores = realistic_probs(5, 4, 6)
    args = (probs, scores, 0.5, True, True, 0, True, torch.empty(9, 7, dtype=torch.int64),
            torch.empty(5, dtype=torch.int64))
    torch.library.opcheck(cpp_ops.query_argmax_out.default, args, test_utils=("test_schema", "test_faketensor"))
    # A crop view with explicit source steps (source_extent; -1: no scale factor on that axis).
    crop_args = (probs[:, :3, :5], scores, 0.5, True, True, 0, True, torch.empty(9, 7, dtype=torch.int64),
                 torch.empty(5, dtype=torch.int64), 0.3125, -1.0)
    torch.library.opcheck(cpp_ops.query_argmax_out.default, crop_args, test_utils=("test_schema", "test_faketensor"))
