"""Devices at the op boundary (#12 item 12): a meta tensor mixed with CPU tensors used to reach an
op's fake kernel and come back as unwritten memory (or a CPU tensor from torch.einsum). Every public
entry - maskformer.dispatch and the kernel-level functions - and every fake kernel now raises a
ValueError naming each tensor and its device; tensors all on the meta device still propagate
shapes through the reference and the fake kernels, and the fast kernels refuse them with a reason.
Meta tensors stand in for "another device" here: there is no GPU on the test machine."""
import pytest
import torch

from maskformer import dispatch
from maskformer.kernels import mask_einsum as me
from maskformer.kernels import ms_deform_attn as msda
from maskformer.kernels import query_argmax as qa
from maskformer.kernels import upsample_argmax as ua
from maskformer.kernels import window_attention as wa

META = torch.device("meta")


def meta(t):
    return t.to(META)


def mixed_calls():
    """(name, call, tensor names the message must list with their devices)."""
    scores = torch.rand(5, 4, 4)
    out = torch.empty(8, 8, dtype=torch.int64)
    cl, ml = torch.rand(1, 5, 4), torch.rand(1, 5, 4, 4)
    probs, weights = torch.rand(5, 4, 4), torch.rand(5)
    x, w, b, t = torch.rand(1, 5, 5, 16), torch.rand(48, 16), torch.rand(48), torch.rand(25, 2)
    value, loc, aw = torch.rand(1, 17, 2, 8), torch.rand(1, 6, 2, 2, 3, 2), torch.rand(1, 6, 2, 2, 3)
    return [
        ("dispatch.upsample_argmax", lambda: dispatch.upsample_argmax(scores, (8, 8), out=meta(out)),
         ["scores on cpu", "out on meta"]),
        ("dispatch.semantic_segmentation", lambda: dispatch.semantic_segmentation(meta(cl), ml, [(8, 8)]),
         ["class_queries_logits on meta", "masks_queries_logits on cpu"]),
        ("dispatch.mask_einsum", lambda: dispatch.mask_einsum(cl, meta(ml)), ["masks_queries_logits on meta"]),
        ("dispatch.query_argmax", lambda: dispatch.query_argmax(probs, meta(weights), (8, 8)),
         ["mask_probs on cpu", "weights on meta"]),
        ("dispatch.select", lambda: dispatch.select("window_attention", x.device, x, meta(w), b, t, 3, 1, 2),
         ["x on cpu", "qkv_weight on meta", "qkv_bias on cpu"]),
        ("upsample_argmax_ref", lambda: ua.upsample_argmax_ref(meta(scores), (8, 8), out=out), ["scores on meta"]),
        ("upsample_argmax_ref batched", lambda: ua.upsample_argmax_ref(scores[None], [(8, 8)], out=[meta(out)]),
         ["out[0] on meta"]),
        ("upsample_argmax_cpp", lambda: ua.upsample_argmax_cpp(scores, (8, 8), out=meta(out)), ["out on meta"]),
        ("upsample_argmax (Triton)", lambda: ua.upsample_argmax(scores, (8, 8), out=meta(out)), ["out on meta"]),
        ("mask_einsum_ref", lambda: me.mask_einsum_ref(meta(cl), ml), ["class_queries_logits on meta"]),
        ("mask_einsum (Triton)", lambda: me.mask_einsum(cl, meta(ml)), ["masks_queries_logits on meta"]),
        ("mask_einsum_cpp", lambda: me.mask_einsum_cpp(meta(cl), ml), ["class_queries_logits on meta"]),
        ("query_argmax_ref", lambda: qa.query_argmax_ref(meta(probs), weights, (8, 8)), ["mask_probs on meta"]),
        ("query_argmax_cpp", lambda: qa.query_argmax_cpp(probs, meta(weights), (8, 8)), ["weights on meta"]),
        ("query_argmax_cpp out", lambda: qa.query_argmax_cpp(probs, weights, (8, 8), out=(meta(out), torch.empty(5, dtype=torch.int64))),
         ["out[0] on meta", "out[1] on cpu"]),
        ("window_attention_ref", lambda: wa.window_attention_ref(x, w, b, meta(t), 3, 1, 2), ["bias_table on meta"]),
        ("window_attention (Triton)", lambda: wa.window_attention(meta(x), w, None, t, 3, 1, 2), ["x on meta"]),
        ("dispatch.ms_deform_attn", lambda: dispatch.ms_deform_attn(value, [(4, 4), (1, 1)], meta(loc), aw),
         ["value on cpu", "sampling_locations on meta", "attention_weights on cpu"]),
        ("ms_deform_attn (Triton)", lambda: msda.ms_deform_attn(value, [(4, 4), (1, 1)], loc, meta(aw)),
         ["attention_weights on meta"]),
    ]


@pytest.mark.parametrize("case", mixed_calls(), ids=lambda c: c[0])
def test_public_entries_refuse_mixed_devices(case):
    name, call, expected = case
    with pytest.raises(ValueError, match="tensors on different devices") as info:
        call()
    for part in expected:
        assert part in str(info.value), f"{name}: {part!r} not in {info.value}"


@pytest.mark.parametrize("backend_name", ["reference", "auto", "cpp", "triton"])
def test_dispatch_refuses_mixed_devices_whatever_the_backend(backend_name):
    cl, ml = torch.rand(2, 5, 4), torch.rand(2, 5, 4, 4)
    with dispatch.backend(backend_name):
        with pytest.raises(ValueError, match="masks_queries_logits on meta"):
            dispatch.semantic_segmentation(cl, meta(ml), [(8, 8)] * 2, source_extents=[(3.5, 3.5), None])
        with pytest.raises(ValueError, match="weights on meta"):
            dispatch.query_argmax(torch.rand(5, 4, 4), torch.rand(5, device=META), (8, 8), source_extent=(3.5, 2.0))


def test_registered_ops_refuse_mixed_devices(cpp_ops):
    """Direct torch.ops calls: a meta tensor selects the Meta (fake) kernel, which now raises
    instead of returning the CPU output unwritten."""
    scores, out = torch.rand(5, 4, 4), torch.empty(8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="scores on meta, out on cpu"):
        cpp_ops.upsample_argmax_out(meta(scores), out, True, True, 0)
    with pytest.raises(ValueError, match="mask_probs on meta"):
        cpp_ops.query_argmax_out(meta(scores), torch.rand(5), 0.5, True, True, 0, True, out,
                                 torch.empty(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="class_queries_logits on meta"):
        cpp_ops.mask_einsum(torch.rand(1, 5, 4, device=META), torch.rand(1, 5, 4, 4))


def test_triton_ops_refuse_mixed_devices(triton_device):
    with pytest.raises(ValueError, match="scores on meta, out on cpu"):
        torch.ops.maskformer.upsample_argmax_triton(torch.rand(5, 4, 4, device=META), torch.empty(8, 8, dtype=torch.int64),
                                                    True, True, 0, ua.NO_SCALE, ua.NO_SCALE)
    with pytest.raises(ValueError, match="masks_queries_logits on meta"):
        torch.ops.maskformer.mask_einsum_triton(torch.rand(1, 5, 4), torch.rand(1, 5, 4, 4, device=META))
    x, w, t = torch.rand(1, 5, 5, 16), torch.rand(48, 16), torch.rand(25, 2)
    with pytest.raises(ValueError, match="qkv_weight on meta"):
        torch.ops.maskformer.window_attention(x, meta(w), None, t, 3, 1, 2)


def test_all_meta_propagates_shapes_through_the_reference():
    """Meta tensors alone: the reference (auto picks it for meta) returns meta results of the
    right shapes, extents included."""
    cl, ml = torch.rand(2, 5, 4, device=META), torch.rand(2, 5, 9, 11, device=META)
    labels = dispatch.semantic_segmentation(cl, ml, None, source_extents=[(7.5, 10.25), (3.5, 2.0)])
    assert [(tuple(m.shape), m.device.type) for m in labels] == [((8, 11), "meta"), ((4, 2), "meta")]
    labels = dispatch.semantic_segmentation(cl, ml, [(20, 30), (7, 5)], source_extents=[(7.5, 10.25), None])
    assert [(tuple(m.shape), m.device.type) for m in labels] == [((20, 30), "meta"), ((7, 5), "meta")]
    assert dispatch.last_dispatch("semantic_segmentation").backend == "reference"
    lab, area = dispatch.query_argmax(torch.rand(5, 9, 11, device=META), torch.rand(5, device=META), (20, 30),
                                      source_extent=(7.5, 10.25))
    assert (tuple(lab.shape), tuple(area.shape), lab.device.type) == ((20, 30), (5,), "meta")


def test_all_meta_is_refused_where_a_kernel_would_compute(monkeypatch):
    """The fast kernels cannot compute on meta tensors: their reasons say so (the Triton ones
    even under TRITON_INTERPRET=1, which serves CPU tensors only), and forced backends raise."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    scores = torch.rand(5, 4, 4, device=META)
    for reasons in (ua.not_supported_reasons(scores, (8, 8)), ua.cpp_not_supported_reasons(scores, (8, 8))):
        assert any("on meta" in r for r in reasons), reasons
    cl, ml = torch.rand(1, 5, 4, device=META), torch.rand(1, 5, 4, 4, device=META)
    assert any("on meta" in r for r in me.not_supported_reasons(cl, ml))
    x, w, t = torch.rand(1, 5, 5, 16, device=META), torch.rand(48, 16, device=META), torch.rand(25, 2, device=META)
    with torch.no_grad():
        assert any("on meta" in r for r in wa.not_supported_reasons(x, w, None, t, 3, 1, 2))
    with pytest.raises(ValueError, match="scores are on meta"):
        ua.upsample_argmax(scores, (8, 8))
    for name in ("cpp", "triton"):
        with dispatch.backend(name):
            with pytest.raises(dispatch.BackendNotSupportedError, match="meta"):
                dispatch.semantic_segmentation(cl, ml, [(8, 8)])
