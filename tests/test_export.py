"""The reference path traces into one size-generic graph (strict torch.export, dynamic batch, height
and width) that equals eager bit for bit. The numerics of the eager path are pinned against
transformers bit for bit where they were exact before the export work."""
import pytest
import torch

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation, dispatch
from maskformer.checkpoint import load_model_state
from maskformer.export import (OUTPUT_FIELDS, default_verify_sizes, export_program, min_side,
                               padded_stages, tracing_context)

from hf_oracle import make_hf_model



def ours_from_hf(hf_model):
    ours = MaskFormerForInstanceSegmentation(MaskFormerConfig.from_dict(hf_model.config.to_dict())).eval()
    load_model_state(ours, dict(hf_model.state_dict()))
    return ours


@pytest.mark.parametrize(
    "window_size, height, width, batch",
    [(7, 64, 64, 1), (7, 112, 224, 2), (12, 96, 96, 1), (12, 97, 131, 2), (3, 50, 70, 3), (2, 33, 17, 1)],
)
def test_reference_path_is_bit_identical_to_transformers(window_size, height, width, batch):
    """The sizes of test_parity_transformers.py, on the reference backend (the path that is
    exported): bit-identical to transformers, as before the export work made the padding
    branch-free and the window shuffles copy unconditionally. (The ``auto`` CPU path runs the
    pixel decoder channels-last and is within the parity tests' 1e-5 instead.)"""
    hf_model = make_hf_model(window_size=window_size)
    ours = ours_from_hf(hf_model)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad(), dispatch.backend("reference"):
        ref = hf_model(x)
        out = ours(x)
    for name in OUTPUT_FIELDS:
        assert torch.equal(out[name], ref[name]), (name, (out[name] - ref[name]).abs().max().item())


def test_strict_export_with_dynamic_shapes_equals_eager_bit_for_bit():
    """One strict trace (batch 2, a size with padding everywhere) serves other batches and sizes:
    batch 1 and 3, sides not multiples of the patch, odd merges, a last stage of one window, a
    first stage that is an exact multiple of the window; every output equals eager exactly."""
    hf_model = make_hf_model(window_size=7)
    ours = ours_from_hf(hf_model)
    program = export_program(ours, strict=True)
    sizes = [(1, 64, 64), (3, 97, 131), (1, 33, 200), (2, 224, 112), (1, 300, 45)]
    assert any(len(padded_stages(ours.config, h, w)) < 4 for _, h, w in sizes)  # an unpadded stage too
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width)
        with tracing_context():
            got = program.module()(x)
            want = ours(x)
        for i, name in enumerate(OUTPUT_FIELDS):
            assert torch.equal(got[i], want[name]), (batch, height, width, name)


def test_default_verify_sizes_pad_every_stage_and_include_a_batch():
    config = ours_from_hf(make_hf_model(window_size=7)).config
    sizes = default_verify_sizes(config)
    assert len(sizes) >= 3 and any(b > 1 for b, _, _ in sizes)
    for _, h, w in sizes:
        assert h >= min_side(config) and w >= min_side(config)
        assert padded_stages(config, h, w) == [1, 2, 3, 4], (h, w)
    assert padded_stages(config, 224, 224) == []  # 56, 28, 14, 7 tokens: multiples of the window
    assert padded_stages(config, 228, 224) == [1, 2, 3, 4]  # 57, 29, 15, 8


def test_torch_compile_one_graph_no_break_no_recompile():
    """torch.compile with default settings (backend eager here, for speed): one graph, no graph
    break, and no recompile on the next calls (the dispatch record written from a traced call
    used to fail its guard and recompile the whole model on the second call)."""
    import torch._dynamo

    ours = ours_from_hf(make_hf_model(window_size=7))
    x = torch.randn(1, 3, 96, 128)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ours, backend="eager")
    with torch.no_grad():
        outs = [compiled(x) for _ in range(3)]
        eager = ours(x)
    stats = torch._dynamo.utils.counters
    assert stats["stats"]["unique_graphs"] == 1, dict(stats["stats"])
    assert not stats["graph_break"], dict(stats["graph_break"])
    assert not stats["recompiles"], dict(stats["recompiles"])
    for out in outs:
        assert torch.equal(out.masks_queries_logits, eager.masks_queries_logits)
    # the dispatch record of eager calls still works
    assert dispatch.last_dispatch("window_attention") is not None
