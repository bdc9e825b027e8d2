"""mask2former_semantic: the fused Mask2Former semantic post-processing (384x384 resize, sigmoid,
class sum, resize + argmax) against its reference (today's composition of torch ops, which is
transformers' computation; tests/test_mask2former_processing.py checks it against transformers
itself), the C++ kernels on CPU and the Triton kernels under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

from maskformer import dispatch
from maskformer.kernels import mask2former_semantic as m2
from maskformer.kernels import mask_einsum as me
from tests.hf_oracle import assert_labels_up_to_ties, assert_within_budget

U32 = 2.0**-24

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ref_scores(cl, ml, extents=None):
    """(B, K, 384, 384) fp32 (fp64 for fp64 inputs) scores of the reference: resize, then transformers' einsum."""
    return me.mask_einsum_ref(cl, m2.resize_mask_logits_ref(ml, extents))


def at_target(scores, size):
    """One image's (K, 384, 384) scores resized as the reference resizes them (None: unchanged)."""
    if size is None:
        return scores
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def check_against_reference(fn, cl, ml, sizes, extents=None, name="", out_dtype=torch.int64):
    ref = m2.mask2former_semantic_ref(cl, ml, sizes, out_dtype, extents)
    kwargs = {} if extents is None else {"source_extents": extents}
    ours = fn(cl, ml, sizes, out_dtype, **kwargs)
    scores = ref_scores(cl.cpu().float(), ml.cpu().float() if ml.dtype == torch.float32 else ml.cpu(), extents)
    assert len(ours) == len(ref) == cl.shape[0]
    for i, (a, b) in enumerate(zip(ours, ref)):
        size = None if sizes is None else sizes[i]
        assert a.shape == (b.shape if size is None else size)
        assert_labels_up_to_ties(a.cpu(), b, at_target(scores[i], size), f"{name} image {i}")
    return ours, ref


# (B, Q, K, h, w), targets: smaller than 384, odd, larger, none, mixed per image.
SHAPES = [
    ((2, 7, 5, 13, 17), [(100, 77), (385, 211)]),
    ((1, 12, 150, 32, 43), [(512, 683)]),
    ((2, 5, 1, 9, 11), None),
    ((3, 10, 300, 16, 21), [(1, 1), (383, 2), (97, 600)]),
]


def _cpp():
    from maskformer import _ext

    return _ext.load_cpp()


needs_cpp = pytest.mark.skipif(_cpp() is None, reason="C++ extension not built")


@needs_cpp
@pytest.mark.parametrize("shape,sizes", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_cpp_matches_reference(shape, sizes, kind):
    b, q, k, h, w = shape
    if kind == "random":
        cl, ml = torch.randn(b, q, k + 1) * 3, torch.randn(b, q, h, w) * 4
    else:
        cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=k)
    assert not m2.cpp_reasons(cl, ml, sizes)
    ours, _ = check_against_reference(m2.mask2former_semantic_cpp, cl, ml, sizes, name=f"cpp {kind} {shape}")
    if kind == "realistic" and k > 1:
        assert len(torch.unique(ours[-1])) > 1, "the logits should produce several classes"


@needs_cpp
def test_cpp_scores_within_fp32_budget():
    """The C++ (K, 384, 384) scores against fp64, the fp32 reference's own error as budget; atol:
    a sum of Q products in [0, 1] is within (Q + 8) ulps of the largest score (mask_einsum's bar).
    Every element is compared, so an unwritten one (uninitialised memory) fails."""
    from maskformer.kernels.upsample_argmax import torch_cpu_bilinear_rounding

    q, k = 37, 70
    cl, ml = me.make_realistic_logits(1, q, k, 20, 27, seed=5)
    probs = cl.softmax(-1)[0, :, :-1].contiguous()
    fast = torch.ops.maskformer.mask2former_scores(probs, ml[0], 384, 384, torch_cpu_bilinear_rounding().fma)
    gold = ref_scores(cl.double(), ml.double())[0]
    ref32 = ref_scores(cl, ml)[0]
    assert_within_budget(fast, gold, ref32, (q + 8) * U32 * gold.abs().max().item(), "cpp scores")


@needs_cpp
@pytest.mark.parametrize("kind", ["realistic", "random", "nonfinite"])
def test_cpp_pruning_leaves_labels_unchanged(kind):
    """Pruned classes' scores are written as 0 (csrc/semantic.cpp): the labels must equal those of
    the unpruned scores exactly, at 384x384 and after every second resize (smaller, odd, larger),
    and a class the pruning kept has its exact scores."""
    from maskformer.kernels.upsample_argmax import torch_cpu_bilinear_rounding, upsample_argmax_cpp

    q, k = 30, 60
    if kind == "random":
        cl, ml = torch.randn(1, q, k + 1) * 2, torch.randn(1, q, 24, 31) * 3
    else:
        cl, ml = me.make_realistic_logits(1, q, k, 24, 31, seed=13, n_objects=9)
    if kind == "nonfinite":
        ml[0, 3, 5:7, 4:9] = float("inf")
        ml[0, 4, 20, 2] = -float("inf")
    probs = cl.softmax(-1)[0, :, :-1].contiguous()
    fma = torch_cpu_bilinear_rounding().fma
    full = torch.ops.maskformer.mask2former_scores(probs, ml[0], 384, 384, fma, -1.0, -1.0, False)
    pruned = torch.ops.maskformer.mask2former_scores(probs, ml[0], 384, 384, fma, -1.0, -1.0, True)
    written = pruned != 0
    if kind == "realistic":  # measured: 18% of the (class, pixel) scores computed
        assert written.float().mean() < 0.5, "realistic logits should leave most classes out of most tiles"
    assert torch.equal(pruned[written], full[written]), "a kept class's scores must be the unpruned ones"
    for size in (None, (100, 77), (385, 211), (1, 1), (997, 1213)):
        a, b = upsample_argmax_cpp(pruned, size), upsample_argmax_cpp(full, size)
        assert torch.equal(a, b), f"{kind} {size}: {int((a != b).sum())} labels differ"


@needs_cpp
def test_cpp_exact_ties_pick_the_first_class():
    """Classes 1 and 4 with equal logits in every query: equal scores everywhere, class 1 wins (torch.argmax)."""
    cl, ml = me.make_realistic_logits(2, 16, 9, 24, 37, seed=2)
    cl[:, :, 4] = cl[:, :, 1]
    cl[:, :, 1] += 6.0  # make the tied pair win somewhere
    cl[:, :, 4] += 6.0
    for sizes in (None, [(61, 43), (7, 300)]):
        ours, ref = check_against_reference(m2.mask2former_semantic_cpp, cl, ml, sizes, name="ties")
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
            labels = set(torch.unique(a).tolist())
            assert 1 in labels and 4 not in labels, labels


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision(dtype):
    """fp16/bf16 logits: the kernel interpolates their exact fp32 values, so its maps are its maps
    of the upcast logits, bit for bit; judged against the fp32 reference (gold) with the reference's
    own low-precision disagreement (it resizes in the low dtype) as budget."""
    cl, ml = me.make_realistic_logits(2, 24, 40, 20, 27, seed=7)
    cl, ml = cl.to(dtype), ml.to(dtype)
    sizes = [(97, 130), (384, 384)]
    ours = m2.mask2former_semantic_cpp(cl, ml, sizes)
    upcast = m2.mask2former_semantic_cpp(cl.float(), ml.float(), sizes)
    gold = m2.mask2former_semantic_ref(cl.float(), ml.float(), sizes)
    lowp = m2.mask2former_semantic_ref(cl, ml, sizes)
    scores = ref_scores(cl.float(), ml.float())
    for i in range(2):
        assert torch.equal(ours[i], upcast[i]), f"image {i}: fp32 interpolation of {dtype} values"
        assert_labels_up_to_ties(ours[i], gold[i], at_target(scores[i], sizes[i]), f"{dtype} image {i}")
        ties = (ours[i] != gold[i]).sum().item()
        assert ties <= 2 * (lowp[i] != gold[i]).sum().item() + 1, f"{dtype} image {i}: {ties} flips"


@needs_cpp
def test_cpp_source_extents():
    """Padded batch: each image's fractional valid region alone is resized to 384x384, read in place."""
    cl, ml = me.make_realistic_logits(3, 10, 20, 20, 30, seed=9)
    extents = [(14.25, 30.0), None, (20.0, 11.5)]
    for sizes in (None, [(57, 122), (80, 120), (80, 46)]):
        ours, _ = check_against_reference(m2.mask2former_semantic_cpp, cl, ml, sizes, extents, name=f"extents {sizes}")
        assert ours[0].shape == ((384, 384) if sizes is None else sizes[0])


@needs_cpp
def test_cpp_out_dtype_and_strided_logits():
    cl, ml = me.make_realistic_logits(1, 8, 12, 17, 19, seed=1)
    wide = torch.zeros(1, 8, 17, 40)
    wide[..., 3:22] = ml
    strided = wide[..., 3:22]  # unit column stride, rows 40 apart: read in place
    ours, _ = check_against_reference(m2.mask2former_semantic_cpp, cl, strided, [(50, 60)], out_dtype=torch.uint8,
                                      name="uint8 strided")
    assert ours[0].dtype == torch.uint8
    t = ml.transpose(2, 3).contiguous().transpose(2, 3)  # column stride != 1: copied
    check_against_reference(m2.mask2former_semantic_cpp, cl, t, None, name="transposed")


def test_refusals_say_why(monkeypatch):
    cl, ml = me.make_realistic_logits(1, 6, 4, 1, 1, seed=0)  # 1x1 logits: aten's channels-last kernel
    if _cpp() is not None:
        reasons = m2.cpp_reasons(cl, ml)
        assert any("channels-last" in r for r in reasons), reasons
    assert any("float64" in r for r in m2.cpp_reasons(cl.double(), ml.double()))
    assert any("CPU-only" in r for r in m2.cpp_reasons(cl.to("meta"), ml.to("meta")))
    with dispatch.backend("auto"):
        out = dispatch.mask2former_semantic(cl, ml, [(5, 7)])
    rec = dispatch.last_dispatch("mask2former_semantic")
    assert rec.backend == "reference"
    assert torch.equal(out[0], m2.mask2former_semantic_ref(cl, ml, [(5, 7)])[0])
    if _cpp() is not None:
        assert "channels-last" in str(rec)
        with dispatch.backend("cpp"), pytest.raises(dispatch.BackendNotSupportedError, match="channels-last"):
            dispatch.mask2former_semantic(cl, ml, [(5, 7)])
    with pytest.raises(ValueError, match="target sizes"):
        dispatch.mask2former_semantic(cl, ml, [(5, 7), (3, 3)])


@needs_cpp
def test_cpp_opcheck():
    from maskformer.kernels.upsample_argmax import torch_cpu_bilinear_rounding

    probs = torch.rand(5, 3)
    ml = torch.randn(5, 6, 7)
    torch.library.opcheck(torch.ops.maskformer.mask2former_scores.default,
                          (probs, ml, 9, 11, torch_cpu_bilinear_rounding().fma, -1.0, -1.0))


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU tensors; CUDA with TRITON_INTERPRET=0)
# ---------------------------------------------------------------------------------------------
# Q = 37 crosses the 16-query block; one image at 384x384 (no second resize)
TRITON_SHAPES = [((1, 3, 1, 5, 7), [(9, 4)]), ((2, 37, 20, 6, 11), [(40, 50), (384, 384)])]


@pytest.mark.parametrize("shape,sizes", TRITON_SHAPES, ids=[str(s[0]) for s in TRITON_SHAPES])
def test_triton_matches_reference(triton_device, shape, sizes):
    b, q, k, h, w = shape
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=k)
    assert not m2.triton_not_supported_reasons(cl.to(triton_device), ml.to(triton_device), sizes)
    check_against_reference(m2.mask2former_semantic_triton, cl.to(triton_device), ml.to(triton_device), sizes,
                            name=f"triton {shape}")


def test_triton_scores_within_budget(triton_device):
    """The Triton (K, 384, 384) scores: fp32 against fp64 (the fp32 reference's error as budget,
    mask_einsum's atol); bf16 against fp32 with transformers-in-bf16's error as budget (one bf16
    ulp at the largest score as floor)."""
    q, k = 37, 20
    cl, ml = me.make_realistic_logits(1, q, k, 6, 9, seed=4)
    probs = cl.softmax(-1)[0, :, :-1].t().contiguous()
    out = torch.full((k, 384, 384), float("nan"))
    m2.launch_scores(probs.to(triton_device), ml[0].to(triton_device), out.to(triton_device))
    out = out if triton_device.type == "cpu" else out.cpu()
    gold = ref_scores(cl.double(), ml.double())[0]
    assert_within_budget(out, gold, ref_scores(cl, ml)[0], (q + 8) * U32 * gold.abs().max().item(), "triton fp32")
    lowp = torch.bfloat16
    out16 = torch.full((k, 384, 384), float("nan"), device=triton_device)
    m2.launch_scores(probs.to(lowp).to(triton_device), ml[0].to(lowp).to(triton_device), out16)
    gold32 = ref_scores(cl, ml)[0]
    transformers_bf16 = torch.einsum("qc,qhw->chw", cl[0].to(lowp).softmax(-1)[:, :-1],
                                     m2.resize_mask_logits_ref(ml.to(lowp))[0].sigmoid())
    assert_within_budget(out16.cpu(), gold32, transformers_bf16, 2.0**-7 * gold32.abs().max().item(), "triton bf16")


def test_triton_extents(triton_device):
    cl, ml = me.make_realistic_logits(2, 6, 5, 10, 13, seed=6)
    check_against_reference(m2.mask2former_semantic_triton, cl.to(triton_device), ml.to(triton_device),
                            [(33, 20), (12, 50)], [(7.5, 13.0), (10.0, 6.25)], name="triton extents")


def test_triton_reasons():
    cl, ml = torch.randn(1, 3, 4), torch.randn(1, 3, 5, 5)
    assert any("float64" in r for r in m2.triton_not_supported_reasons(cl.double(), ml.double()))
