"""kernels/upsample_argmax.py: the reference against transformers' loop, the rounding model
(emulation + calibration) against F.interpolate, and the Triton kernel against the reference
(TRITON_INTERPRET=1 on CPU: programs of 1024 pixels loop over classes in numpy, so K * H * W stays
below ~2M per case). The C++ kernel is tested in test_cpp_semantic.py."""
import pytest
import torch
import torch.nn.functional as F

from maskformer.kernels import upsample_argmax as ua
from hf_oracle import assert_labels_equal, realistic_scores


def transformers_labels(scores, target_sizes):
    """transformers 5.23 post_process_semantic_segmentation, resize + argmax part, verbatim."""
    if target_sizes is None:
        return list(scores.argmax(dim=1).unbind(0))
    out = []
    for idx in range(scores.shape[0]):
        resized = F.interpolate(scores[idx].unsqueeze(dim=0), size=target_sizes[idx], mode="bilinear", align_corners=False)
        out.append(resized[0].argmax(dim=0))
    return out


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[(61, 47), (20, 9)], None, [(13, 17), (13, 17)], [(1, 1), (200, 3)]])
def test_ref_is_transformers(sizes):
    scores = realistic_scores(150, 13, 17, batch=2)
    ours = ua.upsample_argmax_ref(scores, sizes)
    for i, (o, t) in enumerate(zip(ours, transformers_labels(scores, sizes))):
        assert o.dtype == torch.int64
        assert_labels_equal(o, t, f"image {i}")


def test_ref_unbatched_out_and_dtypes():
    scores = realistic_scores(20, 9, 11)[0]
    ref = ua.upsample_argmax_ref(scores, (30, 31))
    assert tuple(ref.shape) == (30, 31)
    for dt in ua.OUT_DTYPES:
        out = torch.full((30, 31), 77, dtype=dt)
        got = ua.upsample_argmax_ref(scores, (30, 31), out_dtype=dt, out=out)
        assert got is out
        assert_labels_equal(out, ref.to(dt), str(dt))
    with pytest.raises(ValueError, match="cannot hold class index 299"):
        ua.upsample_argmax_ref(torch.rand(300, 2, 2), (4, 4), out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        ua.upsample_argmax_ref(torch.rand(1, 3, 2, 2), [(4, 4), (4, 4)])
    with pytest.raises(ValueError, match="out map must be"):
        ua.upsample_argmax_ref(scores, (30, 31), out=torch.empty(30, 30, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Rounding model: what the kernels reproduce
# ---------------------------------------------------------------------------------------------


def test_calibration_matches_this_torch():
    r = ua.torch_cpu_bilinear_rounding()
    assert r.verified, f"no emulated variant matches F.interpolate bit for bit here: {r.detail}"


# (K, h, w, H, W): generic kernel (H + W > 128) and channels-last kernel (H + W <= 128, 1x1 masks
# with K > 3), around both switches, up- and downscaling, identity, odd sizes.
ROUNDING_CASES = [
    (5, 13, 17, 97, 31), (5, 13, 17, 97, 32), (21, 13, 17, 64, 64), (21, 13, 17, 64, 65),
    (3, 50, 60, 20, 30), (3, 50, 60, 200, 300), (1, 1, 1, 200, 100), (3, 1, 1, 200, 100),
    (4, 1, 1, 200, 100), (2, 7, 9, 7, 9), (2, 7, 9, 700, 9), (17, 8, 8, 100, 28), (33, 160, 213, 97, 130),
    (5, 1, 7, 200, 100), (5, 7, 1, 200, 100), (9, 6, 5, 1, 1), (9, 6, 5, 1, 300),
]


@pytest.mark.parametrize("case", ROUNDING_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulation_is_f_interpolate_bitwise(case):
    """The arithmetic the kernels implement, emulated in PyTorch, with the kernel choice predicted
    by torch_cpu_uses_channels_last, equals F.interpolate bit for bit."""
    k, h, w, hh, ww = case
    x = torch.rand(k, h, w, generator=torch.Generator().manual_seed(sum(case)))
    r = ua.torch_cpu_bilinear_rounding()
    vec = r.channels_last_vec if ua.torch_cpu_uses_channels_last(k, h, w, hh, ww) else 0
    ref = F.interpolate(x[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
    emu = ua.bilinear_resize_emulated(x, (hh, ww), r.fma, vec)
    bad = int((emu != ref).sum())
    assert bad == 0, f"{bad} of {ref.numel()} values differ (channels-last width {vec}, fma {r.fma})"


def test_one_thread_rgb_rule():
    """aten also takes the channels-last kernel for K == 3 on one thread."""
    x = torch.rand(3, 50, 60, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ua.torch_cpu_uses_channels_last(3, 50, 60, 200, 300)
        r = ua.torch_cpu_bilinear_rounding()
        ref = F.interpolate(x[None], size=(200, 300), mode="bilinear", align_corners=False)[0]
        assert torch.equal(ua.bilinear_resize_emulated(x, (200, 300), r.fma, r.channels_last_vec), ref)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

# (K, h, w, target sizes of 2 images): K = 1, 2, 150, 171, 300; targets smaller, larger, odd,
# identity, None, and H + W <= 128 (CPU reference takes aten's channels-last kernel there).
TRITON_CASES = [
    (1, 5, 7, [(11, 13), (3, 2)]),
    (2, 6, 5, [(17, 29), (6, 5)]),
    (150, 9, 11, [(37, 41), (5, 4)]),
    (150, 9, 11, None),
    (171, 7, 6, [(61, 75), (13, 9)]),
    (300, 4, 5, [(19, 23), (7, 3)]),
    (40, 8, 10, [(101, 67), (64, 64)]),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"K{c[0]}-{c[1]}x{c[2]}-{c[3]}")
def test_triton_matches_ref(triton_device, case):
    k, h, w, sizes = case
    scores = realistic_scores(k, h, w, seed=k, batch=2).to(triton_device)
    assert not ua.not_supported_reasons(scores, sizes)
    out_dtype = torch.int16 if k > 255 else torch.uint8 if k > 100 else torch.int64
    out = [torch.full(s if s else (h, w), 99, dtype=out_dtype, device=triton_device) for s in sizes or [None, None]]
    got = ua.upsample_argmax(scores, sizes, out_dtype=out_dtype, out=out)  # sentinel-filled outputs
    ref = ua.upsample_argmax_ref(scores, sizes, out_dtype=out_dtype)  # aten on the kernel's device
    for i in range(2):
        assert got[i] is out[i]
        assert_labels_equal(got[i].cpu(), ref[i], f"image {i}")


@pytest.mark.parametrize("size", [(101, 67), (37, 41), (16, 16)])
def test_triton_values_are_f_interpolate_bitwise(triton_device, size):
    """The winning value itself, not just its index, is aten's (generic and channels-last)."""
    x = torch.rand(28, 7, 9, generator=torch.Generator().manual_seed(size[0]))
    fma, vec = ua.rounding_for(x, size)
    assert (vec > 0) == (sum(size) <= 128)
    out = torch.empty(size, dtype=torch.int64, device=triton_device)
    best = torch.full(size, float("nan"), device=triton_device)
    ua.launch_one(x.to(triton_device), out, True, fma, vec, best)
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    bad = int((best.cpu() != ref.max(0).values).sum())
    assert bad == 0, f"{bad} of {best.numel()} winning values differ from F.interpolate"
    assert_labels_equal(out.cpu(), ref.argmax(0), "labels")


def test_triton_ties_and_nan(triton_device):
    """Exact ties go to the first class (duplicated classes, all-equal maps); NaN wins.

    Only through aten's generic kernel (H + W > 128): its channels-last kernel rounds a class in a
    full SIMD vector differently from one in the scalar tail, so a duplicate of class 2 placed at
    index 11 (tail, K = 12, width 8) can beat it there, and torch.argmax picks 11. The "dup-cl"
    case checks that we reproduce even that (on CPU tensors; on CUDA the reference is aten's CUDA
    kernel, on the same tensors: what transformers computes on that device)."""
    scores = realistic_scores(12, 6, 7, seed=1)[0]
    scores[9] = scores[4]  # class 9 ties class 4 everywhere: 9 must never win
    scores[11] = scores[2]
    flat = torch.full((3, 6, 7), 0.25)
    with_nan = scores.clone()
    with_nan[7, 2, 3] = float("nan")
    cases = (("dup", scores, (90, 70)), ("dup-cl", scores, (40, 33)), ("flat", flat, (100, 30)),
             ("nan", with_nan, (90, 70)), ("nan-cl", with_nan, (40, 33)), ("dup-noresize", scores, None))
    for name, x, size in cases:
        got = ua.upsample_argmax(x.to(triton_device), size)
        ref = ua.upsample_argmax_ref(x.to(triton_device), size)
        assert_labels_equal(got.cpu(), ref.cpu(), name)
        if name in ("dup", "dup-noresize"):
            assert not (got == 9).any() and not (got == 11).any(), f"{name}: a later duplicate won a tie"
        if name == "flat":
            assert (got == 0).all()
        if name.startswith("nan"):
            assert (got == 7).any(), "NaN must win where it is interpolated"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_scores(triton_device, dtype):
    """fp16/bf16 scores are upcast like the reference's (which interpolates the fp32 upcast):
    labels must be identical, not merely close."""
    scores = realistic_scores(30, 8, 9, seed=4)[0].to(dtype)
    for size in ((33, 35), (70, 71)):
        got = ua.upsample_argmax(scores.to(triton_device), size)
        ref = ua.upsample_argmax_ref(scores.to(triton_device), size)
        assert_labels_equal(got.cpu(), ref.cpu(), f"{dtype} {size}")


def test_triton_not_supported_reasons(monkeypatch):
    scores = torch.rand(3, 4, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = " ".join(ua.not_supported_reasons(scores, (8, 8)))
    if "triton is not importable" not in reasons:
        assert "TRITON_INTERPRET=1" in reasons, reasons
    reasons = " ".join(ua.not_supported_reasons(scores.double(), (8, 8), torch.float32))
    assert "float64 is not supported" in reasons and "out_dtype must be one of" in reasons, reasons
