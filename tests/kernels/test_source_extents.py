"""source_extents / source_extent: resizing only each image's valid region of padded logits.

An extent (eh, ew) says the image occupies source rows [0, eh) and columns [0, ew) (fractional:
logits have stride 4). The reference crops to the view [:, :ceil(eh), :ceil(ew)] and calls
aten.upsample_bilinear2d with scales H / eh (None for an integer extent), per axis. Checked here:
the reference's semantics (padding never read, integer extents = F.interpolate of the crop, full
extents = no extents), the arithmetic (the C++ hook and the PyTorch emulation equal aten's values
bit for bit with explicit scales), which aten kernel a crop view takes (pinned: a 1x1 crop view is
not channels-last contiguous, its contiguous copy is), and the C++ and Triton kernels and the C++
query_argmax against the references: identical labels (and areas) for fractional, integer, mixed,
sub-pixel, channels-last-kernel, down- and upscaled crops, fp32/fp16/bf16 scores and every label
dtype, into sentinel-filled outputs. Triton runs under TRITON_INTERPRET=1 on CPU tensors, so its
cases stay below ~1M class-pixel evaluations each."""
import pytest
import torch
import torch.nn.functional as F

from maskformer.kernels import query_argmax as qa
from maskformer.kernels import upsample_argmax as ua
from hf_oracle import assert_labels_equal, realistic_scores

U32 = 2.0**-24


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def near_tie_scores(k: int, h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """(batch, K, h, w): every class within 3 ulps of a shared random map, so which class wins a
    pixel is decided by the interpolation's rounding alone (a wrong step or tap order shows)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 1, h, w, generator=g)
    return base * (1 + torch.randint(-3, 4, (batch, k, h, w), generator=g) * U32)


def pad_with_nan(x: torch.Tensor, extents) -> torch.Tensor:
    """x (B, K, h, w) with everything outside each image's crop [:ceil(eh), :ceil(ew)] set to NaN:
    NaN wins torch.argmax, so a kernel that reads padding shows it."""
    x = x.clone()
    for i, e in enumerate(extents):
        if e is None:
            continue
        ch, cw = ua.crop_size(e)
        x[i, :, ch:, :] = float("nan")
        x[i, :, :, cw:] = float("nan")
    return x


def aten_labels(crop: torch.Tensor, size, extent) -> torch.Tensor:
    """The definition, spelled out: argmax of aten.upsample_bilinear2d with the extent's scales."""
    sh, sw = (None if float(e).is_integer() else n / e for e, n in zip(extent, size))
    return torch.ops.aten.upsample_bilinear2d(crop[None].float(), list(size), False, sh, sw)[0].argmax(0)


# ---------------------------------------------------------------------------------------------
# Reference semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(97, 131), (40, 33), (13, 9), None], ids=str)
def test_ref_ignores_padding_and_equals_the_unpadded_crop(size):
    """Padding (NaN) beyond the crop never reaches the labels: the reference on the padded batch
    equals aten on an unpadded copy of each crop with the extent's scales (and, without a target
    size, the argmax of the crop)."""
    extents = [(20.75, 30.5), (17.0, 9.25)]
    x = pad_with_nan(realistic_scores(40, 23, 31, seed=1, batch=2), extents)
    got = ua.upsample_argmax_ref(x, None if size is None else [size, size], source_extents=extents)
    for i, e in enumerate(extents):
        ch, cw = ua.crop_size(e)
        crop = x[i, :, :ch, :cw].clone()
        assert not crop.isnan().any()
        want = crop.argmax(0) if size is None else aten_labels(crop, size, e)
        assert_labels_equal(got[i], want, f"image {i} extent {e}")


def test_ref_integer_extent_is_f_interpolate_of_the_crop():
    x = near_tie_scores(21, 19, 23, seed=2)[0]
    for extent, size in (((12, 17), (97, 130)), ((19, 5), (40, 33)), ((3, 23), (2, 2))):
        crop = x[:, : extent[0], : extent[1]]
        want = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        assert_labels_equal(ua.upsample_argmax_ref(x, size, source_extents=extent), want, f"{extent} -> {size}")
        # float-typed integers are integers too: no scale factor
        assert_labels_equal(ua.upsample_argmax_ref(x, size, source_extents=tuple(map(float, extent))), want, "floats")


@pytest.mark.parametrize("impl", ["ref", "cpp", "triton"])
def test_full_extent_is_no_extent_bitwise(impl, request):
    """(h, w) gives exactly the labels of source_extents=None, on every implementation (the scale
    factor h / h == H / h is not given for an integer extent)."""
    if impl == "cpp":
        request.getfixturevalue("cpp_ops")
    if impl == "triton":
        request.getfixturevalue("triton_device")
    fn = {"ref": ua.upsample_argmax_ref, "cpp": ua.upsample_argmax_cpp, "triton": ua.upsample_argmax}[impl]
    x = near_tie_scores(12, 9, 11, seed=3, batch=2)
    if impl == "triton":
        x = x.to(request.getfixturevalue("triton_device"))
    for sizes in ([(37, 41), (9, 11)], [(70, 61), (5, 4)], None):
        full = fn(x, sizes, source_extents=[(9, 11), (9.0, 11.0)])
        none = fn(x, sizes)
        for i in range(2):
            assert_labels_equal(full[i], none[i], f"{impl} {sizes} image {i}")


# ---------------------------------------------------------------------------------------------
# Arithmetic and aten's kernel choice
# ---------------------------------------------------------------------------------------------

# (K, h, w of the padded source, extent, target): fractional on both axes, one axis, sub-pixel
# extents (eh in (0, 1]), tiny steps, up- and downscales, identity rows (ceil(eh) == H), and
# targets with H + W <= 128 (aten's channels-last kernel for K > 3).
VALUE_CASES = [
    (5, 26, 33, (22.75, 30.5), (97, 131)),
    (5, 26, 33, (22.75, 33.0), (97, 131)),
    (28, 12, 13, (8.25, 10.6), (40, 33)),
    (28, 12, 13, (0.5, 0.25), (40, 33)),
    (6, 4, 9, (0.999, 7.001), (200, 100)),
    (5, 40, 50, (37.3, 41.9), (20, 17)),
    (5, 40, 50, (37.3, 41.9), (38, 42)),
    (9, 12, 13, (1e-3, 12.5), (300, 7)),
    (3, 10, 10, (7.5, 9.5), (97, 131)),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: f"K{c[0]}-{c[1]}x{c[2]}-{c[3]}-{c[4]}")
def test_values_with_scales_are_aten_bitwise(cpp_ops, case):
    """With explicit scales, the C++ per-pixel arithmetic (bilinear_resize on the strided crop,
    the steps from kernel_scales, the kernel from rounding_for) and the PyTorch emulation equal
    aten.upsample_bilinear2d on the crop view, bit for bit."""
    k, h, w, extent, size = case
    x = torch.rand(k, h, w, generator=torch.Generator().manual_seed(h * w))
    crop = x[:, : ua.crop_size(extent)[0], : ua.crop_size(extent)[1]]
    ref = torch.ops.aten.upsample_bilinear2d(crop[None], list(size), False, *ua.aten_scales(extent, size))[0]
    fma, vec = ua.rounding_for(x, size, extent)
    steps = ua.kernel_scales(extent, size)
    got = cpp_ops.bilinear_resize(crop, size[0], size[1], fma, vec, *steps)
    emu = ua.bilinear_resize_emulated(crop, size, fma, vec, steps)
    for name, v in (("C++", got), ("emulation", emu)):
        bad = int((v != ref).sum())
        assert bad == 0, f"{name}: {bad} of {ref.numel()} values differ (fma {fma}, channels-last width {vec})"


def test_kernel_scales_are_atens_float_step():
    """kernel_scales is aten's static_cast<float>(1.0 / (H / eh)) (a double quotient rounded to
    float32), NO_SCALE for integer extents and without a target."""
    s = ua.kernel_scales((200.75, 300.0), (803, 1201))
    assert s[1] == ua.NO_SCALE and ua.kernel_scales((3.5, 2.5), None) == (ua.NO_SCALE, ua.NO_SCALE)
    want = torch.tensor(1.0 / (803 / 200.75), dtype=torch.float64).float().item()
    assert s[0] == want
    assert ua.aten_scales((200.75, 300.0), (803, 1201)) == (803 / 200.75, None)


def test_which_aten_kernel_a_crop_view_takes():
    """Pinned (torch 2.13): aten decides generic vs channels-last kernel on the tensor it is
    handed. A crop view equals its contiguous copy except when the crop is 1x1 (K > 3,
    H + W > 128): the copy (1, K, 1, 1) is channels-last contiguous and takes the channels-last
    kernel, the view (strides of the larger map) is not and takes the generic one. rounding_for
    follows the view, which is what the reference interpolates."""
    r = ua.torch_cpu_bilinear_rounding()
    g = torch.Generator().manual_seed(5)
    x = near_tie_scores(12, 20, 30, seed=5)[0]
    for (ch, cw), size in (((13, 17), (97, 131)), ((13, 17), (40, 33)), ((1, 30), (200, 100)), ((20, 1), (200, 100)),
                           ((1, 1), (40, 30))):
        view = x[:, :ch, :cw]
        a = F.interpolate(view[None], size=size, mode="bilinear", align_corners=False)[0]
        b = F.interpolate(view.contiguous()[None], size=size, mode="bilinear", align_corners=False)[0]
        assert torch.equal(a, b), f"crop {ch}x{cw} -> {size}: the view and its copy differ"
    # The 1x1 crop: generic kernel for the view, channels-last for the copy.
    x = torch.rand(12, 20, 30, generator=g)
    view = x[:, :1, :1]
    size = (200, 100)
    assert not view[None].is_contiguous(memory_format=torch.channels_last)
    assert view.contiguous()[None].is_contiguous(memory_format=torch.channels_last)
    on_view = F.interpolate(view[None], size=size, mode="bilinear", align_corners=False)[0]
    on_copy = F.interpolate(view.contiguous()[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.equal(on_view, ua.bilinear_resize_emulated(view, size, r.fma, 0)), "view: not the generic kernel"
    assert torch.equal(on_copy, ua.bilinear_resize_emulated(view, size, r.fma, r.channels_last_vec)), \
        "copy: not the channels-last kernel"
    assert not torch.equal(on_view, on_copy)  # so the choice matters
    assert ua.rounding_for(x, size, (1, 1)) == (r.fma, 0)
    assert ua.rounding_for(x[:, :1, :1].contiguous(), size) == (r.fma, r.channels_last_vec)
    # fp16 scores are the labels of their fp32 upcast, cropped after the upcast: same choice.
    assert ua.rounding_for(x.half(), size, (1, 1)) == (r.fma, 0)


# ---------------------------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------------------------

# (K, h, w, extents of 2 images, target sizes): fractional and integer extents, an image with
# None, sub-pixel extents, targets where the crop is upscaled, downscaled, kept (ceil(eh) == H), of
# H + W <= 128 (channels-last kernel: K > 3), a 1x1 crop to a large target (generic kernel for
# the view), and no resize.
CPP_CASES = [
    (40, 23, 31, [(20.75, 30.5), None], [(97, 131), (97, 131)]),
    (40, 23, 31, [(17.0, 25.0), (22.25, 31.0)], [(61, 75), (30, 40)]),
    (40, 23, 31, [(0.75, 0.5), (1.0, 30.9)], [(40, 33), (200, 60)]),
    (40, 23, 31, [(20.75, 30.5), (5.5, 7.25)], [(40, 33), (64, 64)]),
    (40, 23, 31, [(20.75, 30.5), (12.6, 29.1)], [(9, 13), (21, 30)]),
    (40, 23, 31, [(1.0, 1.0), (0.3, 0.3)], [(200, 100), (200, 100)]),
    (40, 23, 31, [(20.75, 30.5), (3.0, 2.5)], None),
    (150, 17, 19, [(16.25, 18.5), (9.75, 19.0)], [(81, 95), (40, 79)]),
    (3, 17, 19, [(16.25, 18.5), None], [(81, 95), (40, 33)]),
]


@pytest.mark.parametrize("kind", ["near_ties", "realistic"])
@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: f"K{c[0]}-{c[3]}-{c[4]}")
def test_cpp_matches_ref(cpp_ops, case, kind):
    k, h, w, extents, sizes = case
    x = near_tie_scores(k, h, w, seed=k, batch=2) if kind == "near_ties" else realistic_scores(k, h, w, seed=k, batch=2)
    x = pad_with_nan(x, extents)
    out_dtype = torch.int64 if kind == "near_ties" else torch.uint8
    shapes = sizes or [ua.crop_size(e) if e else (h, w) for e in extents]
    out = [torch.full(s, 77, dtype=out_dtype) for s in shapes]
    got = ua.upsample_argmax_cpp(x, sizes, out_dtype=out_dtype, out=out, source_extents=extents)
    ref = ua.upsample_argmax_ref(x, sizes, out_dtype=out_dtype, source_extents=extents)
    for i in range(2):
        assert got[i] is out[i]
        assert_labels_equal(got[i], ref[i], f"{kind} image {i} extent {extents[i]}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_and_label_dtypes(cpp_ops, dtype):
    """fp16/bf16 scores: the crop is upcast (only the crop), labels equal the reference's (which
    interpolates the fp32 upcast) for int64, int32 and uint8 labels."""
    x = near_tie_scores(40, 23, 31, seed=8, batch=2).to(dtype)
    extents, sizes = [(20.75, 30.5), (0.5, 30.25)], [(97, 131), (40, 33)]
    for out_dtype in (torch.int64, torch.int32, torch.uint8):
        got = ua.upsample_argmax_cpp(x, sizes, out_dtype=out_dtype, source_extents=extents)
        ref = ua.upsample_argmax_ref(x, sizes, out_dtype=out_dtype, source_extents=extents)
        for i in range(2):
            assert_labels_equal(got[i], ref[i], f"{dtype} -> {out_dtype} image {i}")


def test_cpp_reads_the_crop_in_place(cpp_ops, monkeypatch):
    """fp32 crops are never copied: the op receives the strided view itself, and the kernel reads
    it through its strides (the padding, NaN, would win argmax otherwise)."""
    seen = []
    real = torch.ops.maskformer.upsample_argmax_out

    class Spy:
        def __call__(self, scores, *args):
            seen.append((scores.data_ptr(), scores.stride(), tuple(scores.shape)))
            return real(scores, *args)

    monkeypatch.setattr(torch.ops.maskformer, "upsample_argmax_out", Spy())
    x = pad_with_nan(near_tie_scores(20, 23, 31, seed=9, batch=2), [(20.75, 30.5), (7.5, 31.0)])
    ua.upsample_argmax_cpp(x, [(61, 75), (30, 40)], source_extents=[(20.75, 30.5), (7.5, 31.0)])
    assert seen == [(x[0].data_ptr(), x[0].stride(), (20, 21, 31)), (x[1].data_ptr(), x[1].stride(), (20, 8, 31))]


def test_cpp_channels_last_batch(cpp_ops):
    """A channels-last (B, K, h, w) batch: aten interpolates each image with its channels-last
    kernel, so must the kernel (rounding_for decides on the strides; the op copies the image
    contiguous). With and without extents."""
    x = near_tie_scores(40, 9, 11, seed=10, batch=2).contiguous(memory_format=torch.channels_last)
    for extents in (None, [(8.5, 10.25), None]):
        for sizes in ([(97, 130), (97, 130)], [(40, 33), (21, 17)]):
            got = ua.upsample_argmax_cpp(x, sizes, source_extents=extents)
            ref = ua.upsample_argmax_ref(x, sizes, source_extents=extents)
            for i in range(2):
                assert_labels_equal(got[i], ref[i], f"channels-last {extents} {sizes} image {i}")


# Interpreter-sized (K * H * W <= ~0.5M per image).
TRITON_CASES = [
    (12, 9, 11, [(8.25, 10.5), None], [(37, 41), (37, 41)]),
    (12, 9, 11, [(6.0, 11.0), (0.75, 0.5)], [(29, 31), (70, 20)]),
    (12, 9, 11, [(8.25, 10.5), (4.5, 3.25)], [(40, 33), (5, 4)]),
    (12, 9, 11, [(1.0, 1.0), (8.25, 10.5)], [(150, 100), (8, 10)]),
    (12, 9, 11, [(8.25, 10.5), (2.5, 2.0)], None),
    (150, 6, 7, [(5.5, 6.75), (3.25, 7.0)], [(23, 29), (11, 9)]),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"K{c[0]}-{c[3]}-{c[4]}")
def test_triton_matches_ref(triton_device, case):
    k, h, w, extents, sizes = case
    # The reference runs on the kernel's device: the labels to match are those aten (and so
    # transformers) computes there; CPU and CUDA aten round differently at near-ties.
    x = pad_with_nan(near_tie_scores(k, h, w, seed=k, batch=2), extents).to(triton_device)
    assert not ua.not_supported_reasons(x, sizes, source_extents=extents)
    out_dtype = torch.uint8 if k > 100 else torch.int64
    shapes = sizes or [ua.crop_size(e) if e else (h, w) for e in extents]
    out = [torch.full(s, 99, dtype=out_dtype, device=triton_device) for s in shapes]
    got = ua.upsample_argmax(x, sizes, out_dtype=out_dtype, out=out, source_extents=extents)
    ref = ua.upsample_argmax_ref(x, sizes, out_dtype=out_dtype, source_extents=extents)
    for i in range(2):
        assert got[i] is out[i]
        assert_labels_equal(got[i].cpu(), ref[i].cpu(), f"image {i} extent {extents[i]}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_dtypes_and_channels_last_batch(triton_device, dtype):
    x = near_tie_scores(12, 9, 11, seed=12, batch=2).to(dtype)
    extents, sizes = [(8.25, 10.5), (0.5, 11.0)], [(33, 35), (40, 20)]
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout).to(triton_device)  # reference on the same device
        for out_dtype in (torch.int64, torch.int32, torch.uint8):
            got = ua.upsample_argmax(xl, sizes, out_dtype=out_dtype, source_extents=extents)
            ref = ua.upsample_argmax_ref(xl, sizes, out_dtype=out_dtype, source_extents=extents)
            for i in range(2):
                assert_labels_equal(got[i].cpu(), ref[i].cpu(), f"{dtype} {layout} {out_dtype} image {i}")


# ---------------------------------------------------------------------------------------------
# query_argmax
# ---------------------------------------------------------------------------------------------


def realistic_probs(q: int, h: int, w: int, seed: int = 0):
    from maskformer.kernels.mask_einsum import make_realistic_logits

    cl, ml = make_realistic_logits(1, q, 133, h, w, seed=seed, n_objects=q)
    return ml[0].sigmoid(), cl[0].softmax(-1)[:, :-1].max(-1).values


def assert_same(got, ref, name):
    assert_labels_equal(got[0], ref[0], f"{name} labels")
    assert torch.equal(got[1], ref[1]), f"{name}: own areas {got[1].tolist()} vs {ref[1].tolist()}"


# (extent, target): fractional, integer, sub-pixel, 4x upscale (pruned path from Q >= 12),
# downscale, H + W <= 128 (channels-last kernel), no resize.
QA_CASES = [
    ((37.75, 50.5), (151, 202)), ((37.75, 50.5), (97, 131)), ((30.0, 53.0), (120, 212)),
    ((0.75, 0.5), (40, 60)), ((37.75, 50.5), (40, 33)), ((37.75, 50.5), (20, 23)), ((12.25, 7.5), None),
    ((1.0, 1.0), (200, 100)),
]


@pytest.mark.parametrize("q", [5, 24])
@pytest.mark.parametrize("case", QA_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_query_argmax_cpp_matches_ref(cpp_ops, case, q):
    """Padded (NaN) probabilities, both paths, sentinel-filled outputs; also equal to the
    reference on an unpadded copy of the crop (the padding is not read)."""
    extent, size = case
    probs, scores = realistic_probs(q, 40, 53, seed=q)
    padded = probs.clone()
    ch, cw = ua.crop_size(extent)
    padded[:, ch:, :] = float("nan")
    padded[:, :, cw:] = float("nan")
    ref = qa.query_argmax_ref(padded, scores, size, 0.5, source_extent=extent)
    shape = size or (ch, cw)
    for prune in (True, False):
        out = (torch.full(shape, -7, dtype=torch.int64), torch.full((q,), -7, dtype=torch.int64))
        got = qa.query_argmax_cpp(padded, scores, size, 0.5, out=out, prune=prune, source_extent=extent)
        assert got[0] is out[0] and got[1] is out[1]
        assert_same(got, ref, f"Q={q} {extent} -> {size} prune={prune}")
    if (ch, cw) != (1, 1):  # (a contiguous 1x1 copy takes aten's other kernel: see above)
        crop = probs[:, :ch, :cw].clone()
        if size is None:
            want = qa.query_argmax_ref(crop, scores, None, 0.5)
        else:
            p = torch.ops.aten.upsample_bilinear2d(crop[None], list(size), False, *ua.aten_scales(extent, size))[0]
            want = ((p * scores[:, None, None]).argmax(0), torch.stack([(v >= 0.5).sum() for v in p]))
        assert_same(ref, want, f"ref vs unpadded crop {extent} -> {size}")


def test_query_argmax_full_extent_and_near_ties(cpp_ops):
    """Full extent = no extent, bit for bit; values within ulps of each other across queries
    (rounding decides) and channels-last input strides, with a fractional extent."""
    probs, scores = realistic_probs(16, 23, 31, seed=3)
    for size in ((97, 130), (40, 33), None):
        for prune in (True, False):
            assert_same(qa.query_argmax_cpp(probs, scores, size, prune=prune, source_extent=(23, 31)),
                        qa.query_argmax_cpp(probs, scores, size, prune=prune), f"full extent {size}")
    g = torch.Generator().manual_seed(4)
    base = torch.rand(1, 23, 31, generator=g)
    near = base * (1 + torch.randint(-3, 4, (16, 23, 31), generator=g) * U32)
    for x in (near, near.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        for size in ((97, 130), (40, 33)):
            for prune in (True, False):
                assert_same(qa.query_argmax_cpp(x, torch.ones(16), size, prune=prune, source_extent=(20.75, 30.5)),
                            qa.query_argmax_ref(x, torch.ones(16), size, source_extent=(20.75, 30.5)),
                            f"near ties {size} prune={prune} contiguous={x.is_contiguous()}")


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [(0, 5), (-1.0, 5), (5, 0.0), (9.5, 5), (5, 11.01), (float("nan"), 5),
                                 (5, float("inf")), (5,), "ab", 3.0], ids=repr)
def test_bad_extents_raise(bad):
    x = torch.rand(4, 9, 11)
    for fn in (ua.upsample_argmax_ref, ua.upsample_argmax_cpp, ua.upsample_argmax):
        with pytest.raises(ValueError, match="source_extents"):
            fn(x, (20, 20), source_extents=bad)
        with pytest.raises(ValueError, match=r"source_extents\[1\]"):
            fn(x[None].expand(2, -1, -1, -1), [(20, 20)] * 2, source_extents=[None, bad])
    with pytest.raises(ValueError, match="source_extent"):
        qa.query_argmax_ref(x, torch.ones(4), (20, 20), source_extent=bad)
    assert any("source_extent" in r for r in qa.cpp_not_supported_reasons(x, torch.ones(4), (20, 20), 0.5, bad))
    assert any("source_extents" in r for r in ua.cpp_not_supported_reasons(x, (20, 20), source_extents=bad))


def test_wrong_extent_count_raises():
    x = torch.rand(2, 4, 9, 11)
    for fn in (ua.upsample_argmax_ref, ua.upsample_argmax_cpp, ua.upsample_argmax):
        with pytest.raises(ValueError, match="source_extents has 3 entries for a batch of 2"):
            fn(x, None, source_extents=[(3, 3)] * 3)
        with pytest.raises(ValueError, match="source_extents"):
            fn(x, None, source_extents=(3.5, 3.5))  # one pair for a batch: entries are not pairs


def test_triton_opcheck(triton_device):
    """torch.library contract (schema, fake tensor) of the Triton op with a crop view and steps."""
    crop = torch.rand(6, 7, 9, device=triton_device)[:, :4, :5]
    out = torch.empty(11, 13, dtype=torch.int64, device=triton_device)
    fma, vec = ua.rounding_for(crop, (11, 13))
    torch.library.opcheck(torch.ops.maskformer.upsample_argmax_triton.default,
                          (crop, out, True, fma, vec, 0.34375, ua.NO_SCALE),
                          test_utils=("test_schema", "test_faketensor"))
