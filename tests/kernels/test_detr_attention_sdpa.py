"""maskformer/transformer_decoder.py: on the Triton path (CUDA under ``auto``, or ``triton`` forced),
in inference and without attention weights, the DETR decoder's attention is one
``F.scaled_dot_product_attention``; elsewhere the written-out ops, as transformers' eager path. SDPA
runs on any device, so these run on the CPU with ``triton`` forced (no interpreter needed)."""
import pytest
import torch

from maskformer import dispatch
from maskformer.transformer_decoder import DetrAttention


def _attention_and_inputs(seed=0):
    torch.manual_seed(seed)
    attn = DetrAttention(hidden_size=64, num_heads=4, dropout=0.1).eval()
    # 10 queries against 37 keys (not a multiple of anything), batch 2; confident scores (x 3).
    q, k, v = torch.randn(2, 10, 64) * 3, torch.randn(2, 37, 64) * 3, torch.randn(2, 37, 64)
    return attn, q, k, v


def test_sdpa_path_matches_the_written_out_attention():
    attn, q, k, v = _attention_and_inputs()
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref, weights = attn(q, k, v, need_weights=False)
        assert weights is not None and weights.shape == (2, 4, 10, 37)  # the written-out path ran
        with dispatch.backend("triton"):
            fused, none = attn(q, k, v, need_weights=False)
    assert none is None
    # Against the written-out ops in fp64 on the same weights: the fp32 SDPA within twice the fp32
    # written-out path's own error plus one ulp of the largest output (as the kernels' budgets).
    attn64 = attn.double()
    with torch.no_grad(), dispatch.backend("reference"):
        gold, _ = attn64(q.double(), k.double(), v.double())
    err, base = (fused.double() - gold).abs().max().item(), (ref.double() - gold).abs().max().item()
    assert err <= 2 * base + torch.finfo(torch.float32).eps * gold.abs().max().item(), (err, base)


def test_weights_asked_for_or_training_keep_the_written_out_ops():
    attn, q, k, v = _attention_and_inputs()
    with torch.no_grad(), dispatch.backend("triton"):
        out, weights = attn(q, k, v)  # need_weights defaults to True: transformers' output_attentions
        assert weights is not None and torch.allclose(weights.sum(-1), torch.ones(2, 4, 10))
        attn.train()  # dropout on the weights: only the written-out path applies it as transformers does
        _, weights = attn(q, k, v, need_weights=False)
        assert weights is not None


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_cpu_auto_and_cpp_keep_the_written_out_ops(backend):
    attn, q, k, v = _attention_and_inputs()
    with torch.no_grad(), dispatch.backend(backend):
        _, weights = attn(q, k, v, need_weights=False)
    assert weights is not None  # the CPU path is unchanged
