"""kernels/ms_deform_attn.py: the reference against transformers' function (bit for bit), the Triton
kernel against the reference (under TRITON_INTERPRET=1 on CPU: small shapes, ~10 ms of numpy per
program, level and point), the C++ kernel against the reference (same shapes and budgets, skipped
with the import error when the extension is not built), the support checks, the ops' contracts and
``dispatch.ms_deform_attn``.

Budgets (flash-attention style): ``|fast - ref64| <= 2 |ref_lowp - ref64| + atol`` elementwise,
ref64 the reference in fp64 on the same inputs, ref_lowp the reference in the inputs' dtype (its
own rounding error). ``atol`` (``_atol``) covers the elements where the reference happens to be
exact; it is derived from the kernel's arithmetic, not fitted:
- fp32: the pixel coordinate ``x * w - 0.5`` and the fraction ``fx`` carry up to ~u * max(h, w)
  absolute error each (u = 2**-24), which moves a bilinear weight by as much; the 4*L*P products
  are then summed in fp32 (<= 4*L*P * u relative to the sum of |terms|). With ``absref`` = the
  exact sum of |attention weight| * bilinear weight * |value| (the reference in fp64 on |value|
  and |weights|; bilinear weights are >= 0), atol = u * (4*L*P + 2*max(h, w) + 8) * absref.
- fp16/bf16: that, twice (the inputs are exact in fp32), plus the final rounding to the output
  dtype, half an ulp: u_lowp * |ref64| (and fp16's smallest subnormal).
"""
import os
import re

import numpy as np
import pytest
import torch

from maskformer import _ext, dispatch
from maskformer.kernels import ms_deform_attn as msda

from hf_oracle import assert_within_budget, msda_onnx_graph

U32 = 2.0**-24
U_LOWP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(batch, shapes, queries, heads, head_dim, points, seed=0, special=True):
    """(value (B, S, H, D), sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P)),
    fp32. Locations: most uniform in [-0.25, 1.25] (about a third of the corners fall outside),
    and with ``special`` a quarter of them replaced by border cases per level: 0 and 1 (the map's
    edges, pixel -0.5 and w - 0.5), the first and last pixel centres (fraction exactly 0: the far
    corners weigh 0), half a pixel outside (pixel -1 and w: one corner row inside with weight 0),
    pixel edges k/w (fraction 0.5), far outside (+-3, +-1e30). Values N(0, 1) with a few x30
    outliers; attention weights softmaxed over L*P with a dominant sample per query."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen)
    value[torch.rand(value.shape, generator=gen) < 0.02] *= 30.0
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.5 - 0.25
    if special:
        for level, (h, w) in enumerate(shapes):
            for axis, size in ((0, w), (1, h)):
                cases = torch.tensor([0.0, 1.0, 0.5 / size, (size - 0.5) / size, -0.5 / size, (size + 0.5) / size,
                                      1.0 / size, (size - 1.0) / size, 3.0, -3.0, 1e30, -1e30])
                sl = loc[:, :, :, level, :, axis]
                pick = torch.rand(sl.shape, generator=gen) < 0.25
                sl[pick] = cases[torch.randint(0, len(cases), (int(pick.sum()),), generator=gen)]
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen) * 2.0
    logits[..., 0] += 3.0
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, loc, weights


def _atol32(value, shapes, loc, weights):
    """u * (4*L*P + 2*max side + 8) * sum |terms|, elementwise (module docstring)."""
    absref = msda.ms_deform_attn_ref(value.double().abs(), shapes, loc.double(), weights.double().abs())
    levels, points = weights.shape[-2:]
    return U32 * (4 * levels * points + 2 * max(max(hw) for hw in shapes) + 8) * absref


def check_fp32(fast, value, shapes, loc, weights, name):
    ref64 = msda.ms_deform_attn_ref(value.double(), shapes, loc.double(), weights.double())
    ref32 = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    assert fast.dtype == torch.float32
    assert_within_budget(fast, ref64, ref32, _atol32(value, shapes, loc, weights), name)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

# (B, levels, Q, H, D, P)
REF_SHAPES = [
    (2, [(3, 5), (7, 2), (1, 1)], 13, 2, 8, 4),
    (1, [(16, 16), (8, 8), (4, 4)], 336, 8, 32, 4),
    (3, [(5, 6), (3, 3), (2, 2), (1, 1)], 7, 1, 24, 1),
]


@pytest.mark.parametrize("case", REF_SHAPES, ids=lambda c: f"B{c[0]}-L{len(c[1])}-H{c[3]}-D{c[4]}-P{c[5]}")
def test_ref_is_transformers_bitwise(case):
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q)
    ours = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    theirs = multi_scale_deformable_attention(value, shapes, loc, weights)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (b, q, h * d)
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num()) and torch.equal(ours.isnan(), theirs.isnan())


def test_malformed_shapes_raise_naming_the_problem():
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2)
    with pytest.raises(ValueError, match="cover 19 tokens but value has 18"):
        msda.ms_deform_attn_ref(value[:, :18], shapes, loc, weights)
    with pytest.raises(ValueError, match="must be \\(batch, tokens, heads, head_dim\\)"):
        msda.ms_deform_attn_ref(value[0], shapes, loc, weights)
    with pytest.raises(ValueError, match="batch, heads and levels must agree"):
        msda.ms_deform_attn_ref(value, shapes, loc[:, :, :1], weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        msda.ms_deform_attn_ref(value, shapes, loc, weights[..., :1])
    with pytest.raises(ValueError, match="height and width >= 1"):
        msda.ms_deform_attn_ref(value[:, :4], [(4, 1), (0, 7)], loc, weights)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, or CUDA with TRITON_INTERPRET=0)
# ---------------------------------------------------------------------------------------------

# (B, levels, Q, H, D, P): odd level sizes (1x1, 3x5, 7x2), 1, 3 and 4 levels, P = 1 and 4,
# H = 1, 2 and 8, D = 8, 32 and 24 (not a power of two), Q over two 64-query blocks (70).
TRITON_SHAPES = [
    (2, [(3, 5), (7, 2), (1, 1)], 13, 2, 8, 4),
    (1, [(1, 1)], 5, 1, 32, 1),
    (1, [(5, 6), (3, 3), (2, 2), (1, 1)], 9, 8, 8, 4),
    (1, [(4, 4), (2, 3), (1, 2)], 70, 2, 24, 1),
    (1, [(7, 2)], 3, 1, 32, 4),
]


def _shape_id(c):
    return f"B{c[0]}-{'+'.join(f'{h}x{w}' for h, w in c[1])}-Q{c[2]}-H{c[3]}-D{c[4]}-P{c[5]}"


@pytest.mark.parametrize("case", TRITON_SHAPES, ids=_shape_id)
def test_triton_fp32(triton_device, case):
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q + d)
    args = (value.to(triton_device), shapes, loc.to(triton_device), weights.to(triton_device))
    assert msda.not_supported_reasons(*args) == []
    fast = msda.ms_deform_attn(*args)
    assert tuple(fast.shape) == (b, q, h * d)
    check_fp32(fast, value, shapes, loc, weights, f"triton fp32 {_shape_id(case)}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [TRITON_SHAPES[0], TRITON_SHAPES[3]], ids=_shape_id)
def test_triton_low_precision(triton_device, case, dtype):
    """fp16/bf16 inputs, fp32 arithmetic, output rounded once: within twice the error of the
    reference run in that dtype (grid_sample and the weighted sum in fp16/bf16)."""
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=5)
    loc = loc.clamp(-1e4, 1e4)  # fp16's range; +-1e4 is as far outside
    value, loc, weights = value.to(dtype), loc.to(dtype), weights.to(dtype)
    fast = msda.ms_deform_attn(value.to(triton_device), shapes, loc.to(triton_device), weights.to(triton_device))
    assert fast.dtype == dtype
    ref64 = msda.ms_deform_attn_ref(value.double(), shapes, loc.double(), weights.double())
    ref_lowp = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    # the kernel's fp32 error (twice: it also moves the rounding), then half an ulp of the output
    atol = 2 * _atol32(value.float(), shapes, loc.float(), weights.float()) + U_LOWP[dtype] * ref64.abs() + 2.0**-24
    assert_within_budget(fast, ref64, ref_lowp, atol, f"triton {dtype} {_shape_id(case)}")


def border_inputs():
    """Every location a border case: map edges, first/last pixel centres, half a pixel outside,
    pixel edges, far outside (finite: exactly 0), NaN and +-inf (NaN, as grid_sample). Queries
    0-3 sample only far outside points; query 4 has a NaN x on head 0, query 5 an inf y on head 1,
    query 6 a -inf x on head 0."""
    shapes = [(3, 5), (1, 1), (4, 2)]
    value, loc, weights = make_inputs(1, shapes, 24, 2, 8, 2, seed=3)
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            cases = torch.tensor([0.0, 1.0, 0.5 / size, (size - 0.5) / size, -0.5 / size, (size + 0.5) / size,
                                  1.0 / size, 3.0, -3.0, 1e30, -1e30, 0.5])
            loc[0, :, :, level, :, axis] = cases[torch.randint(0, len(cases), loc.shape[1:3] + loc.shape[4:5])]
    far = loc[0, :4].clone()
    far[..., 0] = 1e30
    loc[0, :4] = far  # queries 0-3: every sample far outside -> exactly 0
    loc[0, 4, 0, 0, 0, 0] = float("nan")
    loc[0, 5, 1, 1, 1, 1] = float("inf")
    loc[0, 6, 0, 2, 0, 0] = -float("inf")
    return value, shapes, loc, weights


def check_borders(fast, value, shapes, loc, weights, name):
    fast = fast.cpu()
    assert torch.equal(fast[0, :4], torch.zeros(4, 16)), f"{name}: far outside points must give exactly 0"
    assert fast[0, 4, :8].isnan().all() and fast[0, 5, 8:].isnan().all() and fast[0, 6, :8].isnan().all(), (
        f"{name}: NaN / inf locations must give NaN on their head")
    check_fp32(fast, value, shapes, loc, weights, name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf, interpreted
def test_triton_borders_and_far_points(triton_device):
    value, shapes, loc, weights = border_inputs()
    fast = msda.ms_deform_attn(value.to(triton_device), shapes, loc.to(triton_device), weights.to(triton_device))
    check_borders(fast, value, shapes, loc, weights, "triton borders")


def test_triton_writes_every_element(triton_device):
    """Sentinel: a NaN-filled output passed through the launch comes back fully written, right."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(2, shapes, 67, 2, 24, 2, seed=11, special=False)
    args = [t.to(triton_device) for t in (value, loc, weights)]
    out = torch.full((2, 67, 48), float("nan"), device=triton_device)
    got = msda.launch(args[0], shapes, args[1], args[2], out)
    assert got is out
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} elements never written"
    check_fp32(out, value, shapes, loc, weights, "sentinel")


def test_triton_non_contiguous_inputs(triton_device):
    """Strided views (as a caller slicing a bigger tensor would pass) give the same result."""
    shapes = [(3, 4), (2, 1)]
    value, loc, weights = make_inputs(1, shapes, 6, 2, 8, 2, seed=2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_t = loc.flip(-1).contiguous().flip(-1)
    weights_t = torch.cat([weights, weights], dim=-1)[..., :2]
    assert not (value_t.is_contiguous() or weights_t.is_contiguous())
    dev = triton_device
    fast = msda.ms_deform_attn(value_t.to(dev), shapes, loc_t.to(dev), weights_t.to(dev))
    check_fp32(fast, value, shapes, loc, weights, "strided")


def test_not_supported_reasons(monkeypatch):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)

    def reasons(*args):
        return " ".join(msda.not_supported_reasons(*args))

    assert "float64 is not supported" in reasons(value.double(), shapes, loc.double(), weights.double())
    assert "sampling_locations is torch.float16 but value is torch.float32" in reasons(value, shapes, loc.half(), weights)
    wide = torch.randn(1, 19, 1, 300)
    assert "head_dim=300 is outside [1, 256]" in reasons(wide, shapes, loc[:, :, :1], weights[:, :, :1])
    five = [(1, 1)] * 5
    assert "5 levels > 4" in reasons(torch.randn(1, 5, 2, 8), five, torch.rand(1, 3, 2, 5, 1, 2),
                                     torch.rand(1, 3, 2, 5, 1))
    assert "cover 19 tokens but value has 18" in reasons(value[:, :18], shapes, loc, weights)
    grad = value.clone().requires_grad_()
    assert "value require grad: the kernel is forward-only" in reasons(grad, shapes, loc, weights)
    with torch.no_grad():
        assert "require grad" not in reasons(grad, shapes, loc, weights)
    assert "meta" in reasons(value.to("meta"), shapes, loc.to("meta"), weights.to("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    text = reasons(value, shapes, loc, weights)
    assert "TRITON_INTERPRET=1" in text or "triton is not importable" in text, text
    with pytest.raises(ValueError, match="cannot run"):
        msda.ms_deform_attn(value, shapes, loc, weights)


def test_devices_and_meta():
    shapes = [(3, 5)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    with pytest.raises(ValueError, match="different devices"):
        msda.ms_deform_attn(value.to("meta"), shapes, loc, weights)
    out = msda.ms_deform_attn(value.to("meta"), shapes, loc.to("meta"), weights.to("meta"))  # the fake kernel
    assert out.device.type == "meta" and tuple(out.shape) == (1, 4, 16) and out.dtype == torch.float32


def test_triton_opcheck(triton_device):
    """torch.library contract of the custom op (schema, fake tensor, no aliasing)."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    flat = [v for hw in shapes for v in hw]
    args = (value.to(triton_device), flat, loc.to(triton_device), weights.to(triton_device))
    torch.library.opcheck(torch.ops.maskformer.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# C++ (csrc/ms_deform_attn.cpp; skipped with the import error when the extension is not built)
# ---------------------------------------------------------------------------------------------

# The Triton shapes, plus head dims on the other code paths (D = 16 and 64: other register
# widths; D = 12: the runtime-D loop) and Q over several 64-query tasks with the pixel decoder's
# 8 heads on 4:3 levels, batch 2.
CPP_SHAPES = TRITON_SHAPES + [
    (2, [(8, 11), (4, 6), (2, 3)], 150, 8, 32, 4),
    (1, [(5, 7), (3, 2)], 66, 2, 16, 3),
    (1, [(4, 3)], 9, 1, 64, 2),
    (2, [(3, 5), (2, 2)], 11, 3, 12, 2),
]


@pytest.mark.parametrize("case", CPP_SHAPES, ids=_shape_id)
def test_cpp_fp32(cpp_ops, case):
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q + d)
    assert msda.cpp_not_supported_reasons(value, shapes, loc, weights) == []
    fast = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    assert tuple(fast.shape) == (b, q, h * d) and fast.dtype == torch.float32
    check_fp32(fast, value, shapes, loc, weights, f"cpp fp32 {_shape_id(case)}")


@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_threads_agree(cpp_ops, threads):
    """Each (image, head, 64 queries) task is computed alone, whoever runs it: the result does
    not depend on the number of threads (bit for bit)."""
    shapes = [(8, 11), (4, 6), (2, 3)]
    value, loc, weights = make_inputs(2, shapes, 200, 4, 32, 4, seed=9)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
        torch.set_num_threads(threads)
        many = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one.nan_to_num(), many.nan_to_num()) and torch.equal(one.isnan(), many.isnan())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [TRITON_SHAPES[0], TRITON_SHAPES[3], CPP_SHAPES[5]], ids=_shape_id)
def test_cpp_low_precision(cpp_ops, case, dtype):
    """fp16/bf16 inputs, fp32 arithmetic, output rounded once: the Triton test's budget (twice
    the kernel's fp32 error, half an ulp of the output, on top of twice the error of the reference
    run in that dtype)."""
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=5)
    loc = loc.clamp(-1e4, 1e4)  # fp16's range; +-1e4 is as far outside
    value, loc, weights = value.to(dtype), loc.to(dtype), weights.to(dtype)
    fast = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    assert fast.dtype == dtype and tuple(fast.shape) == (b, q, h * d)
    ref64 = msda.ms_deform_attn_ref(value.double(), shapes, loc.double(), weights.double())
    ref_lowp = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    atol = 2 * _atol32(value.float(), shapes, loc.float(), weights.float()) + U_LOWP[dtype] * ref64.abs() + 2.0**-24
    assert_within_budget(fast, ref64, ref_lowp, atol, f"cpp {dtype} {_shape_id(case)}")


def test_cpp_borders_and_far_points(cpp_ops):
    value, shapes, loc, weights = border_inputs()
    check_borders(msda.ms_deform_attn_cpp(value, shapes, loc, weights), value, shapes, loc, weights, "cpp borders")


def test_cpp_nan_and_inf_weights(cpp_ops):
    """A NaN attention weight gives NaN on its head even when its point is far outside (the
    reference multiplies the zero sample by it); an infinite weight on a point whose corners are
    all outside gives NaN too (inf * 0), as the reference does."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 5, 2, 8, 2, seed=8, special=False)
    loc[0, 0, 0, 0, 0] = torch.tensor([5.0, 5.0])  # far outside, finite
    weights[0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1] = torch.tensor([-4.0, 0.5])
    weights[0, 1, 1, 1, 1] = float("inf")
    fast = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    ref = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    assert ref[0, 0, :8].isnan().all() and ref[0, 1, 8:].isnan().all()
    check_fp32(fast, value, shapes, loc, weights, "cpp NaN/inf weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_writes_every_element(cpp_ops, dtype):
    """Sentinel: a NaN-filled ``out`` comes back fully written (and is the tensor returned)."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(2, shapes, 67, 2, 24, 2, seed=11, special=False)
    value, loc, weights = value.to(dtype), loc.to(dtype), weights.to(dtype)
    out = torch.full((2, 67, 48), float("nan"), dtype=dtype)
    got = msda.ms_deform_attn_cpp(value, shapes, loc, weights, out=out)
    assert got is out
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} elements never written"
    assert torch.equal(out, msda.ms_deform_attn_cpp(value, shapes, loc, weights))


def test_cpp_non_contiguous_inputs(cpp_ops):
    """Strided views (as a caller slicing a bigger tensor would pass) give the same result."""
    shapes = [(3, 4), (2, 1)]
    value, loc, weights = make_inputs(1, shapes, 6, 2, 8, 2, seed=2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_t = torch.stack([loc, loc + 1], dim=2)[:, :, 0]  # every other (query, head) row
    weights_t = torch.cat([weights, weights], dim=-1)[..., :2]
    assert not (value_t.is_contiguous() or weights_t.is_contiguous() or loc_t.is_contiguous())
    fast = msda.ms_deform_attn_cpp(value_t, shapes, loc_t, weights_t)
    assert torch.equal(fast.nan_to_num(), msda.ms_deform_attn_cpp(value, shapes, loc, weights).nan_to_num())
    check_fp32(fast, value, shapes, loc, weights, "cpp strided")


def test_cpp_empty(cpp_ops):
    shapes = [(3, 5)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    out = msda.ms_deform_attn_cpp(value, shapes, loc[:, :0], weights[:, :0])
    assert tuple(out.shape) == (1, 0, 16)
    out = msda.ms_deform_attn_cpp(value[:0], shapes, loc[:0], weights[:0])
    assert tuple(out.shape) == (0, 4, 16)


def test_cpp_not_supported_reasons(monkeypatch):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)

    def reasons(*args):
        return " ".join(msda.cpp_not_supported_reasons(*args))

    assert "float64 is not supported" in reasons(value.double(), shapes, loc.double(), weights.double())
    assert "sampling_locations is torch.float16 but value is torch.float32" in reasons(value, shapes, loc.half(), weights)
    assert "cover 19 tokens but value has 18" in reasons(value[:, :18], shapes, loc, weights)
    grad = value.clone().requires_grad_()
    assert "value require grad: the kernel is forward-only" in reasons(grad, shapes, loc, weights)
    with torch.no_grad():
        assert "require grad" not in reasons(grad, shapes, loc, weights)
    assert "value is on meta: the C++ kernel is CPU-only" in reasons(value.to("meta"), shapes, loc.to("meta"),
                                                                      weights.to("meta"))
    # a level side of 2**24 (a stride-0 view: no memory behind the 16.7M tokens)
    tall = [(2**24, 1)]
    wide_value = torch.zeros(1, 1, 1, 8).expand(1, 2**24, 1, 8)
    assert "level sides must be < 2**24" in reasons(wide_value, tall, torch.rand(1, 3, 1, 1, 2, 2),
                                                    torch.rand(1, 3, 1, 1, 2))
    monkeypatch.setattr(_ext, "cpp_missing_ops", lambda *ops: ["maskformer._C could not be imported (simulated)"])
    assert "could not be imported (simulated)" in reasons(value, shapes, loc, weights)
    with pytest.raises(ValueError, match="C\\+\\+\\) cannot run: maskformer._C could not be imported"):
        msda.ms_deform_attn_cpp(value, shapes, loc, weights)


def test_cpp_op_checks_its_arguments(cpp_ops):
    """The C++ op validates on its own (TORCH_CHECK), for callers of torch.ops directly."""
    shapes = [(3, 5), (2, 2)]
    flat = [3, 5, 2, 2]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    op = cpp_ops.ms_deform_attn_cpu
    for args, message in [
        ((value.double(), flat, loc.double(), weights.double()), "value dtype must be float32, float16 or bfloat16"),
        ((value, flat, loc.half(), weights), "one dtype for all three tensors"),
        ((value[0], flat, loc, weights), "value must be \\(batch, tokens, heads, head_dim\\)"),
        ((value, [3, 5, 2], loc, weights), "spatial_shapes must be \\(h0, w0, h1, w1, ...\\)"),
        ((value, [3, 5, 2, 3], loc, weights), "cover 21 tokens but value has 19"),
        ((value[:, :4], [4, 1, 0, 7], loc, weights), "height and width >= 1"),
        ((value, flat, loc[:, :, :1], weights), "sampling_locations must be \\(1, queries, 2, 2, points, 2\\)"),
        ((value, flat, loc, weights[..., :1]), "attention_weights must be \\(1, 4, 2, 2, 2\\)"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    out = torch.empty(1, 4, 16)
    for bad, message in [(out.double(), "out must be a contiguous CPU Float tensor"), (out[:, :3], "of shape \\(1, 4, 16\\)"),
                         (torch.empty(1, 16, 4).transpose(1, 2), "not contiguous")]:
        with pytest.raises(RuntimeError, match=message):
            cpp_ops.ms_deform_attn_cpu_out(value, flat, loc, weights, bad)


def test_cpp_devices_and_meta(cpp_ops):
    shapes = [(3, 5)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    with pytest.raises(ValueError, match="different devices"):
        msda.ms_deform_attn_cpp(value.to("meta"), shapes, loc, weights)
    with pytest.raises(ValueError, match="CPU-only"):
        msda.ms_deform_attn_cpp(value.to("meta"), shapes, loc.to("meta"), weights.to("meta"))
    flat = [3, 5]
    out = cpp_ops.ms_deform_attn_cpu(value.to("meta"), flat, loc.to("meta"), weights.to("meta"))  # the fake kernel
    assert out.device.type == "meta" and tuple(out.shape) == (1, 4, 16)


def test_cpp_opcheck(cpp_ops):
    """torch.library contract of the C++ ops (schema, fake tensor, no aliasing)."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    flat = [v for hw in shapes for v in hw]
    torch.library.opcheck(cpp_ops.ms_deform_attn_cpu.default, (value, flat, loc, weights),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(cpp_ops.ms_deform_attn_cpu_out.default, (value, flat, loc, weights, torch.empty(1, 4, 16)),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


def test_dispatch_auto_on_cpu_without_the_extension_runs_reference_and_says_why(clean_backend, monkeypatch):
    """The extension missing (simulated: cpp_missing_ops reports the import error, as it does
    when maskformer._C cannot be imported): auto runs the reference and records the error; a
    forced cpp raises with it."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(2, shapes, 6, 2, 8, 2, seed=4)
    missing = "maskformer._C could not be imported (ImportError: simulated by the test)"
    monkeypatch.setattr(_ext, "cpp_missing_ops", lambda *ops: [missing])
    got = dispatch.ms_deform_attn(value, shapes, loc, weights)
    rec = dispatch.last_dispatch("ms_deform_attn")
    assert (rec.requested, rec.backend) == ("auto", "reference")
    assert rec.refused["cpp"] == [missing]
    ref = msda.ms_deform_attn_ref(value, shapes, loc, weights)
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and torch.equal(got.isnan(), ref.isnan())
    with dispatch.backend("cpp"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="simulated by the test"):
            dispatch.ms_deform_attn(value, shapes, loc, weights)
    assert dispatch.last_dispatch("ms_deform_attn").backend == "none (raised)"


def test_dispatch_auto_on_cpu_runs_cpp(clean_backend, cpp_ops):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(2, shapes, 6, 2, 8, 2, seed=4)
    got = dispatch.ms_deform_attn(value, shapes, loc, weights)
    rec = dispatch.last_dispatch("ms_deform_attn")
    assert (rec.requested, rec.backend, rec.refused) == ("auto", "cpp", {})
    check_fp32(got, value, shapes, loc, weights, "dispatch auto (cpp)")
    with dispatch.backend("cpp"):
        forced = dispatch.ms_deform_attn(value, shapes, loc, weights)
    assert dispatch.last_dispatch("ms_deform_attn").backend == "cpp"
    assert torch.equal(forced.nan_to_num(), got.nan_to_num())
    # float64 is not the kernel's: auto falls back to the reference and says so, forced cpp raises
    got64 = dispatch.ms_deform_attn(value.double(), shapes, loc.double(), weights.double())
    rec = dispatch.last_dispatch("ms_deform_attn")
    assert rec.backend == "reference" and "float64 is not supported" in " ".join(rec.refused["cpp"])
    assert got64.dtype == torch.float64
    with dispatch.backend("cpp"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="float64 is not supported"):
            dispatch.ms_deform_attn(value.double(), shapes, loc.double(), weights.double())
    # inputs that require grad under grad mode: the kernel is forward-only, auto takes the reference
    grad = value.clone().requires_grad_()
    dispatch.ms_deform_attn(grad, shapes, loc, weights)
    assert dispatch.last_dispatch("ms_deform_attn").backend == "reference"
    with torch.no_grad():
        dispatch.ms_deform_attn(grad, shapes, loc, weights)
    assert dispatch.last_dispatch("ms_deform_attn").backend == "cpp"


def test_dispatch_forced_triton_without_interpreter_raises(clean_backend, monkeypatch):
    shapes = [(3, 5)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dispatch.backend("triton"):
        with pytest.raises(dispatch.BackendNotSupportedError) as info:
            dispatch.ms_deform_attn(value, shapes, loc, weights)
    text = str(info.value)
    assert "backend 'triton' was forced (with backend())" in text
    assert "TRITON_INTERPRET=1" in text or "triton is not importable" in text, text
    assert dispatch.last_dispatch("ms_deform_attn").backend == "none (raised)"


def test_dispatch_forced_triton_runs_the_kernel(clean_backend, triton_device):
    shapes = [(3, 5), (1, 1)]
    value, loc, weights = make_inputs(1, shapes, 5, 1, 8, 2, seed=6)
    with dispatch.backend("triton"):
        fast = dispatch.ms_deform_attn(value.to(triton_device), shapes, loc.to(triton_device),
                                       weights.to(triton_device))
    assert dispatch.last_dispatch("ms_deform_attn").backend == "triton"
    check_fp32(fast, value, shapes, loc, weights, "dispatch triton")


def test_dispatch_malformed_arguments_raise_whatever_the_backend(clean_backend):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 4, 2, 8, 2, special=False)
    for name in ("auto", "reference", "triton", "cpp"):
        with dispatch.backend(name):
            with pytest.raises(ValueError, match="cover 19 tokens but value has 18"):
                dispatch.ms_deform_attn(value[:, :18], shapes, loc, weights)
            with pytest.raises(ValueError, match="attention_weights must be"):
                dispatch.ms_deform_attn(value, shapes, loc, weights[:, :3])
            with pytest.raises(ValueError, match="different devices"):
                dispatch.ms_deform_attn(value, shapes, loc.to("meta"), weights)
    assert _ext.triton_interpret_mode() in (True, False)  # the variable was never touched here


# ---------------------------------------------------------------------------------------------
# OpenVINO extension (csrc/openvino/msda_extension.cpp): the same core as the C++ op, run by
# OpenVINO as `com.maskformer::MultiScaleDeformableAttention` in an ONNX graph
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ov_msda():
    """(openvino module, path of the extension). Skips only when OpenVINO is not installed; with
    OpenVINO installed (CI installs it before building maskformer) a missing extension fails."""
    ov = pytest.importorskip("openvino")
    from maskformer.engines import openvino_engine

    path, why = openvino_engine.msda_extension()
    assert path is not None, f"OpenVINO is installed but maskformer's OpenVINO extension is not usable: {why}"
    return ov, path


def _ov_run(ov, path, value, shapes, loc, weights, spatial_dtype=torch.int64, threads=2):
    """Run the operation alone: a one-node ONNX graph with dynamic dims, read by OpenVINO's ONNX
    frontend through the extension's conversion, compiled for the CPU in f32."""
    from onnx import TensorProto

    model = msda_onnx_graph(TensorProto.INT64 if spatial_dtype == torch.int64 else TensorProto.INT32)
    core = ov.Core()
    core.add_extension(path)
    compiled = core.compile_model(core.read_model(model, b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=spatial_dtype)
    out = compiled([value.contiguous().numpy(), wh.numpy(), loc.contiguous().numpy(), weights.contiguous().numpy()])
    return torch.from_numpy(out[0].copy())


OV_SHAPES = [
    (2, [(8, 11), (4, 6), (2, 3)], 150, 8, 32, 4),  # Mask2Former's layout, D = 32 (the vector path)
    (1, [(5, 7), (3, 2)], 66, 2, 16, 3),
    (2, [(3, 5), (2, 2)], 11, 3, 12, 2),            # D = 12: the any-D loop
    (1, [(4, 3)], 9, 1, 64, 2),
]


@pytest.mark.parametrize("case", OV_SHAPES, ids=_shape_id)
def test_openvino_extension_fp32(ov_msda, case):
    ov, path = ov_msda
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q + d)
    fast = _ov_run(ov, path, value, shapes, loc, weights)
    assert tuple(fast.shape) == (b, q, h * d) and fast.dtype == torch.float32
    check_fp32(fast, value, shapes, loc, weights, f"openvino extension fp32 {_shape_id(case)}")


@pytest.mark.parametrize("case", OV_SHAPES[:3], ids=_shape_id)
def test_openvino_extension_equals_the_cpp_op_bitwise(ov_msda, cpp_ops, case):
    """One core (csrc/ms_deform_attn_core.h), one order of operations: an engine with the
    extension computes the torch path's numbers bit for bit, whatever the thread count."""
    ov, path = ov_msda
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q)
    expected = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    for threads in (1, 2):
        got = _ov_run(ov, path, value, shapes, loc, weights, threads=threads)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan()), (
            f"{_shape_id(case)}, {threads} threads: max |diff| {(got - expected).abs().nan_to_num().max():.3e}")


def test_openvino_extension_borders_nan_and_int32_sides(ov_msda):
    """Border cases, far points, NaN/inf locations as the reference; the level sides may come as
    i32 (OpenVINO's CPU plugin computes integer tensors in i32)."""
    ov, path = ov_msda
    value, shapes, loc, weights = border_inputs()
    for dtype in (torch.int64, torch.int32):
        check_borders(_ov_run(ov, path, value, shapes, loc, weights, spatial_dtype=dtype), value, shapes, loc,
                      weights, f"openvino extension borders ({dtype})")


def test_openvino_extension_refuses_sides_that_do_not_cover_value(ov_msda):
    ov, path = ov_msda
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 5, 2, 8, 2, seed=1)
    with pytest.raises(RuntimeError, match=r"the levels cover 19 tokens but value has 17"):
        _ov_run(ov, path, value[:, :17], shapes, loc, weights)
    with pytest.raises(RuntimeError, match=r"level 1 has sides \(w, h\) = \(0, 2\)"):
        _ov_run(ov, path, value, [(3, 5), (2, 0)], loc, weights)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: the same node, run by our C++ op as onnxruntime-extensions' Python custom op
# (maskformer/engines/onnxruntime_engine.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ort_msda():
    """(onnxruntime, onnxruntime_engine). Skips only when onnxruntime or onnxruntime-extensions is
    not installed (CI installs both); with them installed an unusable op fails."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    from maskformer.engines import onnxruntime_engine

    path, why = onnxruntime_engine.msda_custom_op()
    assert path is not None, f"onnxruntime-extensions is installed but our op cannot run in ONNX Runtime: {why}"
    return ort, onnxruntime_engine


def _ort_run(ort_msda, value, shapes, loc, weights, threads=2, consumer=False):
    ort, engine = ort_msda
    session = ort.InferenceSession(msda_onnx_graph(consumer=consumer), engine.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    wh = np.array([[w, h] for h, w in shapes], np.int64)
    feed = {"value": value.contiguous().numpy(), "wh": wh, "loc": loc.contiguous().numpy(),
            "attn": weights.contiguous().numpy()}
    return torch.from_numpy(engine.checked_run(lambda: session.run(None, feed))[0])


@pytest.mark.parametrize("case", OV_SHAPES, ids=_shape_id)
def test_onnxruntime_op_fp32(ort_msda, case):
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q + d)
    fast = _ort_run(ort_msda, value, shapes, loc, weights)
    assert tuple(fast.shape) == (b, q, h * d) and fast.dtype == torch.float32
    check_fp32(fast, value, shapes, loc, weights, f"onnxruntime op fp32 {_shape_id(case)}")


@pytest.mark.parametrize("case", OV_SHAPES[:3], ids=_shape_id)
def test_onnxruntime_op_equals_the_cpp_op_bitwise(ort_msda, cpp_ops, case):
    """The node runs the C++ op itself: ONNX Runtime's result is the torch path's, bit for bit."""
    b, shapes, q, h, d, p = case
    value, loc, weights = make_inputs(b, shapes, q, h, d, p, seed=q)
    expected = msda.ms_deform_attn_cpp(value, shapes, loc, weights)
    for threads in (1, 2):
        got = _ort_run(ort_msda, value, shapes, loc, weights, threads=threads)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan()), (
            f"{_shape_id(case)}, {threads} threads: max |diff| {(got - expected).abs().nan_to_num().max():.3e}")


def test_onnxruntime_op_borders_and_nan(ort_msda):
    value, shapes, loc, weights = border_inputs()
    check_borders(_ort_run(ort_msda, value, shapes, loc, weights), value, shapes, loc, weights,
                  "onnxruntime op borders")


def test_onnxruntime_op_hands_back_the_array_not_a_list(ort_msda, monkeypatch):
    """Our invoker returns the op's array (onnxruntime-extensions' own turns it into a Python list:
    150+ ms a call at Swin-T's shapes); the op ran through it, once per node run."""
    from onnxruntime_extensions import Opdef

    ort, engine = ort_msda
    calls = []
    [opdef] = [d for d in Opdef._odlist.values() if d.op_type == "com.maskformer::MultiScaleDeformableAttention"]
    body = opdef.body  # what onnxruntime-extensions' invoker calls; ours calls the kernel directly
    monkeypatch.setattr(opdef, "body", lambda *a: calls.append(a) or body(*a))
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = make_inputs(1, shapes, 7, 2, 8, 2, seed=3)
    got = _ort_run(ort_msda, value, shapes, loc, weights)
    assert not calls and torch.equal(got, msda.ms_deform_attn_cpp(value, shapes, loc, weights))


def test_onnxruntime_op_failure_raises_instead_of_ending_the_process(ort_msda):
    """An exception inside onnxruntime-extensions' Python op ends the process (std::terminate);
    ours keeps it and checked_run raises it after the next node stops the run. In a subprocess, so
    that a regression fails this test instead of killing pytest."""
    script = r'''
import numpy as np, torch, onnxruntime as ort, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from hf_oracle import msda_onnx_graph
from test_ms_deform_attn import make_inputs
from maskformer.engines import onnxruntime_engine as engine
shapes = [(3, 5), (2, 2)]
value, loc, weights = make_inputs(1, shapes, 5, 2, 8, 2, seed=1)
session = ort.InferenceSession(msda_onnx_graph(consumer=True), engine.session_options(1), providers=["CPUExecutionProvider"])
feed = {"value": value[:, :17].contiguous().numpy(), "wh": np.array([[w, h] for h, w in shapes], np.int64),
        "loc": loc.numpy(), "attn": weights.numpy()}
try:
    engine.checked_run(lambda: session.run(None, feed))
except RuntimeError as exc:
    print("RAISED", exc)
feed["value"] = value.numpy()
print("THEN", engine.checked_run(lambda: session.run(None, feed))[0].shape)
'''
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__),
                           os.path.dirname(os.path.dirname(os.path.abspath(__file__)))], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
    assert re.search(r"RAISED maskformer's deformable attention failed inside ONNX Runtime: RuntimeError: .*"
                     r"cover 19 tokens but value has 17", done.stdout), done.stdout + done.stderr[-2000:]
    assert "THEN (1, 5, 16)" in done.stdout, done.stdout  # the session still serves the next run
