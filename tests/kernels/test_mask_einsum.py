"""kernels/mask_einsum.py: the reference against transformers' three lines, the Triton kernel
against the reference (under TRITON_INTERPRET=1 on CPU: shapes stay small, ~0.1 s per program).
The C++ kernel is tested in test_cpp_semantic.py."""
import pytest
import torch

from maskformer.kernels import mask_einsum as me
from hf_oracle import assert_within_budget

U32 = 2.0**-24  # fp32 unit roundoff


def transformers_scores(class_queries_logits, masks_queries_logits):
    """transformers 5.23 post_process_semantic_segmentation, first three lines, verbatim."""
    masks_classes = class_queries_logits.softmax(dim=-1)[..., :-1]
    masks_probs = masks_queries_logits.sigmoid()
    return torch.einsum("bqc, bqhw -> bchw", masks_classes, masks_probs)


@pytest.mark.parametrize("b,q,k,h,w", [(1, 5, 1, 7, 9), (2, 100, 150, 20, 27), (3, 30, 171, 13, 11), (2, 16, 300, 5, 33)])
def test_ref_is_transformers_bitwise(b, q, k, h, w):
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=b)
    ref = me.mask_einsum_ref(cl, ml)
    assert ref.dtype == torch.float32 and tuple(ref.shape) == (b, k, h, w)
    assert torch.equal(ref, transformers_scores(cl, ml))


@pytest.mark.parametrize("b,q,k,h,w", [(2, 100, 150, 40, 53), (3, 7, 1, 9, 8), (3, 50, 171, 17, 29), (2, 33, 300, 11, 13)])
def test_ref_per_image_equals_batched(b, q, k, h, w):
    """The cpp path of dispatch.semantic_segmentation contracts one image at a time to bound
    memory (factors over the whole batch, see ref_factors); that must give transformers' batched
    einsum bit for bit."""
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=7)
    batched = me.mask_einsum_ref(cl, ml)
    classes, probs = me.ref_factors(cl, ml)
    for i in range(b):
        one = me.ref_contract(classes[i : i + 1], probs[i : i + 1])[0]
        assert torch.equal(one, batched[i]), f"image {i}: max diff {(one - batched[i]).abs().max().item():.3g}"


def test_ref_upcasts_low_precision():
    cl, ml = me.make_realistic_logits(2, 6, 5, 4, 7)
    for dt in (torch.float16, torch.bfloat16):
        ref = me.mask_einsum_ref(cl.to(dt), ml.to(dt))
        assert ref.dtype == torch.float32
        assert torch.equal(ref, transformers_scores(cl.to(dt).float(), ml.to(dt).float()))


def test_shape_errors():
    cl, ml = me.make_realistic_logits(2, 6, 5, 4, 7)
    with pytest.raises(ValueError, match="batch/queries differ"):
        me.mask_einsum_ref(cl, ml[:1])
    with pytest.raises(ValueError, match="K\\+1 >= 2"):
        me.mask_einsum_ref(cl[..., :1], ml)
    with pytest.raises(ValueError, match="expected class logits"):
        me.mask_einsum_ref(cl[0], ml)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

# Interpreter-sized: (B, Q, K, h, w) with K = 1, 2, 150, 171, 300, queries above and below the
# 16/32 query block, pixel counts not divisible by the 64-pixel block.
TRITON_SHAPES = [(1, 3, 1, 5, 7), (2, 10, 2, 9, 13), (2, 37, 150, 6, 11), (1, 20, 171, 4, 5), (1, 8, 300, 3, 7)]


def _fp32_budget_check(fast, cl, ml, name):
    """fp32: judged against fp64 with the fp32 reference's own error as budget. atol covers the
    elements where the reference happens to be exact: a sum of Q products in [0, 1] accumulated
    in fp32 is within (Q + 8) ulps of the largest score (Q adds, the product, softmax and sigmoid
    each a few ulps)."""
    ref64 = me.mask_einsum_ref(cl.double(), ml.double())
    ref32 = me.mask_einsum_ref(cl, ml)
    atol = (cl.shape[1] + 8) * U32 * max(ref64.abs().max().item(), 1e-30)
    assert_within_budget(fast, ref64, ref32, atol, name)


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_fp32(triton_device, shape):
    b, q, k, h, w = shape
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=k, device=triton_device)
    assert not me.not_supported_reasons(cl, ml)
    fast = me.mask_einsum(cl, ml)
    assert fast.dtype == torch.float32 and tuple(fast.shape) == (b, k, h, w)
    _fp32_budget_check(fast, cl.cpu(), ml.cpu(), f"triton fp32 {shape}")


# One output ulp of the low-precision dtype at the largest score: transformers computing in that
# dtype cannot be closer than that, so neither is our budget's floor.
LOWP_ATOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(triton_device, dtype):
    b, q, k, h, w = 2, 19, 40, 7, 9
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=3)
    ref32 = me.mask_einsum_ref(cl, ml)  # fp32 inputs, fp32 math
    ref_lowp = transformers_scores(cl.to(dtype), ml.to(dtype))  # transformers run in the low dtype
    fast = me.mask_einsum(cl.to(dtype).to(triton_device), ml.to(dtype).to(triton_device))
    assert fast.dtype == torch.float32
    assert_within_budget(fast, ref32, ref_lowp, LOWP_ATOL[dtype] * ref32.abs().max().item(), f"triton {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_every_block_boundary(triton_device, dtype):
    """Queries over several BLOCK_Q steps (37 = 32 + 5), classes over two BLOCK_K blocks (70),
    pixels over two BLOCK_P blocks (13 x 11 = 143 > 128), two images; fp16/bf16 on the tensor-core
    path (operands rounded to the input dtype), fp32 exact."""
    b, q, k, h, w = 2, 37, 70, 13, 11
    cl, ml = me.make_realistic_logits(b, q, k, h, w, seed=11)
    fast = me.mask_einsum(cl.to(dtype).to(triton_device), ml.to(dtype).to(triton_device))
    if dtype == torch.float32:
        _fp32_budget_check(fast, cl, ml, "fp32 blocks")
    else:
        ref32 = me.mask_einsum_ref(cl, ml)
        ref_lowp = transformers_scores(cl.to(dtype), ml.to(dtype))
        assert_within_budget(fast, ref32, ref_lowp, LOWP_ATOL[dtype] * ref32.abs().max().item(), f"blocks {dtype}")


def test_dot_follows_torch_tf32_policy():
    """fp32 operands: exact FFMA dot under torch's default, TF32 tensor cores when torch's fp32
    matmuls may use TF32 (either API); fp16/bf16 operands always take the tensor cores."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert me.dot_precision(torch.float32) == "ieee"
        assert me.dot_precision(torch.bfloat16) == "tf32"
        matmul.fp32_precision = "tf32"
        assert me.dot_precision(torch.float32) == "tf32"
        assert me.default_blocks(150, torch.float32, "tf32") != me.default_blocks(150, torch.float32, "ieee")
    finally:
        matmul.fp32_precision = previous
    assert me.dot_dtype(torch.float16) == torch.float16 and me.dot_dtype(torch.float32) == torch.float32


def test_triton_writes_every_element(triton_device):
    """Sentinel: a NaN-filled output must come back fully overwritten with the right values."""
    cl, ml = me.make_realistic_logits(2, 17, 70, 9, 8, seed=5, device=triton_device)
    out = torch.full((2, 70, 9, 8), float("nan"), device=triton_device)
    me.launch(cl, ml, out)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} elements never written"
    _fp32_budget_check(out, cl.cpu(), ml.cpu(), "sentinel")


def test_triton_non_contiguous_and_extreme_logits(triton_device):
    """Strided inputs, saturated sigmoids (+-100) and a dominant softmax logit (+80)."""
    cl, ml = me.make_realistic_logits(2, 12, 20, 6, 10, seed=9)
    ml = ml.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (h, w) strides swapped
    ml[:, 0, :2] = 100.0
    ml[:, 1, :2] = -100.0
    cl[:, 2, 3] = 80.0
    assert not ml.is_contiguous()
    fast = me.mask_einsum(cl.to(triton_device), ml.to(triton_device))
    _fp32_budget_check(fast, cl, ml, "strided/extreme")


def test_triton_not_supported_reasons(monkeypatch):
    cl, ml = me.make_realistic_logits(1, 4, 3, 5, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = " ".join(me.not_supported_reasons(cl, ml))
    if "triton is not importable" not in reasons:
        assert "TRITON_INTERPRET=1" in reasons, reasons
    reasons = " ".join(me.not_supported_reasons(cl.double(), ml.double()))
    assert "float64 is not supported" in reasons, reasons
    with pytest.raises(ValueError, match="cannot run"):
        me.mask_einsum(cl.double(), ml.double())


def test_triton_opcheck(triton_device):
    """torch.library contract of the custom op (schema, fake tensor, no aliasing)."""
    cl, ml = me.make_realistic_logits(1, 5, 3, 4, 6, device=triton_device)
    torch.library.opcheck(
        torch.ops.maskformer.mask_einsum_triton.default, (cl, ml),
        test_utils=("test_schema", "test_faketensor"),
    )
