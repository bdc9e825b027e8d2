"""kernels/window_attention.py: the Triton kernel against ``window_attention_ref``, the reference
against our model's ``SwinLayer.window_attention``, the support checks and the torch.library op.

Without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (numpy, ~10-15 ms per
program and key tile, so shapes are small). On a GPU machine, ``TRITON_INTERPRET=0 pytest ...``
runs the same kernel tests on CUDA with the compiled kernel.
"""
import os

# TRITON_INTERPRET=1 is set by tests/kernels/conftest.py (setdefault) before this module is imported;
# its ``triton_device`` fixture says where the kernel tests run (CPU under the interpreter, else CUDA).
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskformer.config import MaskFormerSwinConfig
from maskformer.kernels import window_attention as wa
from maskformer.swin import SwinLayer

from hf_oracle import assert_within_budget


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_inputs(b, h, w, c, heads, window, qkv_bias=True, seed=0):
    """fp32 inputs that exercise the math, never zeros:
    - x is layernormed (as the block's input) with a random affine, so rows have mean ~0, std ~1;
    - W_qkv gives q/k/v entries of std ~1.5, so scores q.k/sqrt(d) have std ~2: softmax rows range
      from flat to confident;
    - the q/k/v bias has std 1, comparable to the projections: a padded token (which reads the bias)
      gets scores as large as a real one, so getting padding wrong is visible;
    - the bias table has std 2 plus a few +8 outliers: some rows put ~all their mass on one key.
    """
    g = torch.Generator().manual_seed(seed)
    x = F.layer_norm(torch.randn(b, h, w, c, generator=g), (c,))
    x = x * (1 + 0.3 * torch.randn(c, generator=g)) + 0.2 * torch.randn(c, generator=g)
    weight = torch.randn(3 * c, c, generator=g) * (1.5 / c**0.5)
    bias = torch.randn(3 * c, generator=g) if qkv_bias else None
    table = 2.0 * torch.randn((2 * window - 1) ** 2, heads, generator=g)
    outliers = torch.randint(0, table.numel(), (max(1, table.numel() // 50),), generator=g)
    table.view(-1)[outliers] = 8.0
    return x, weight, bias, table


def cast(args, dtype, device):
    """The fp32 inputs rounded to ``dtype`` on ``device``, bias table included (``model.to(dtype)``)."""
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in args)


def first_bad(mask):
    idx = mask.nonzero()[0].tolist()
    return tuple(idx), int(mask.sum()), mask.numel()


# Every comparison here: max |fast - gold| <= 2 max |baseline - gold| + atol and the mean within
# 2 mean |baseline - gold| + atol / 10 (hf_oracle.assert_within_budget, reduce="max_and_mean").
# gold: the reference in fp64 on the same (already rounded) inputs. baseline: the reference's own
# error at fast's dtype: for fp32, ``window_attention_ref`` in fp32; for fp16/bf16, the
# transformers-style eager attention run in that dtype (what the model computes today in
# fp16/bf16: q/k/v, scores and probabilities rounded to it). A kernel within 2x of that error is
# as accurate as the path it replaces. atol = eps(dtype) * max|gold| (the helper's default), 1-2
# ulps of the largest outputs: it keeps a case where the baseline happens to be nearly exact from
# demanding more than the output dtype can represent (the mean bound takes a tenth of it: mean
# errors run ~10x below max errors here). Measured margins (interpreter, these shapes): fast's max
# error is 0.3-0.65x its bound in fp32 and 0.15-0.35x in fp16/bf16; a 0.2% scale error on P @ V
# already fails the fp16 mean bound. An output left at the NaN sentinel fails.


def run_kernel_with_guards(x, weight, bias, table, window, shift, heads, **blocks):
    """Run the op body into a NaN-filled buffer with guard bands of ``window`` rows/columns and 8
    channels on every side: a write to a padded position (y in [H, H + window)) or past a head's
    channels lands in a guard and is caught; an element never written stays NaN."""
    b, h, w, c = x.shape
    g, gc = window, 8
    buf = torch.full((b, h + 2 * g, w + 2 * g, c + 2 * gc), float("nan"), dtype=x.dtype, device=x.device)
    out = buf[:, g : g + h, g : g + w, gc : gc + c]
    result = wa.window_attention_impl(x, weight, bias, table, window, shift, heads, out=out, **blocks)
    assert result.data_ptr() == out.data_ptr()
    guard = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
    guard[:, g : g + h, g : g + w, gc : gc + c] = False
    written = ~torch.isnan(buf) & guard
    if written.any():
        idx, count, _ = first_bad(written.cpu())
        raise AssertionError(
            f"kernel wrote {count} elements outside the (B, H, W, C) output, first at buffer index {idx} "
            f"(output origin at (0, {g}, {g}, {gc}))"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the reference is the model
# ---------------------------------------------------------------------------------------------

MODEL_CASES = [
    # (B, H, W, C, heads, window, qkv_bias)
    (2, 5, 7, 16, 2, 2, True),  # padding on both axes
    (1, 13, 20, 24, 3, 3, True),  # head_dim 8, 5 x 7 windows
    (2, 9, 9, 32, 2, 7, True),  # 9 -> 14: 2 x 2 windows, 5 padded rows/columns
    (1, 2, 3, 32, 1, 7, False),  # map smaller than one window, no q/k/v bias
    (1, 13, 20, 64, 2, 12, True),  # N = 144, 13 x 20 -> 24 x 24
    (1, 24, 12, 32, 1, 12, True),  # no padding
]


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "B{}_{}x{}_C{}_h{}_w{}_bias{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_ref_equals_model(case, shifted, dtype):
    """window_attention_ref == SwinLayer.window_attention without the output projection, on random
    weights (transformers' init would leave the biases and the table at zero)."""
    b, h, w, c, heads, window, qkv_bias = case
    shift = window // 2 if shifted else 0
    config = MaskFormerSwinConfig(embed_dim=c, depths=[1], num_heads=[heads], window_size=window, qkv_bias=qkv_bias)
    layer = SwinLayer(config, c, heads, drop_path=0.0, shift_size=shift).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # default init + noise, as tests/conftest.py's perturb_; table std 2
        for name, p in layer.named_parameters():
            scale = 2.0 if name.endswith("relative_position_bias_table") else 0.2
            p.add_(scale * torch.randn(p.shape, generator=gen))
    layer.attention.output.dense = torch.nn.Identity()  # the op stops before the output projection
    layer = layer.to(dtype)
    x = make_inputs(b, h, w, c, heads, window)[0].to(dtype)
    attn = layer.attention.self
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
    bias = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]) if qkv_bias else None
    with torch.no_grad():
        expected = layer.window_attention(x)
        ours = wa.window_attention_ref(x, weight, bias, attn.relative_position_bias_table, window, shift, heads)
    assert ours.dtype == dtype and ours.shape == x.shape
    # The only difference is one (3C, C) GEMM instead of three (C, C) ones: the same dot products,
    # possibly summed in another order by the BLAS. Measured here (x86 CPU, torch 2.13): fp32
    # bit-identical, fp64 <= 6.3e-16 relative. Bounds: ~10x one fp32 ulp, ~150x the fp64 figure.
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    diff = (ours - expected).abs()
    idx = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(diff.shape)))
    assert diff.max() <= tol * expected.abs().max(), (
        f"max |ref - model| {diff.max().item():.3e} > {tol:.0e} * {expected.abs().max().item():.3g} at {idx}: "
        f"ref {ours[idx].item():.10g}, model {expected[idx].item():.10g}"
    )


def test_ref_upcasts_half_precision():
    """fp16/bf16 inputs are computed in fp32 and rounded once: equal to the fp32 ref, rounded."""
    x, weight, bias, table = cast(make_inputs(1, 9, 9, 32, 2, 7), torch.bfloat16, "cpu")
    out = wa.window_attention_ref(x, weight, bias, table, 7, 3, 2)
    expected = wa.window_attention_ref(x.float(), weight.float(), bias.float(), table, 7, 3, 2).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected), f"{int((out != expected).sum())} elements differ"


# ---------------------------------------------------------------------------------------------
# the kernel against the reference
# ---------------------------------------------------------------------------------------------

# (B, H, W, C, heads, window, shift, qkv_bias, blocks): blocks None = the defaults the GPU uses.
KERNEL_CASES = [
    (2, 5, 7, 32, 2, 2, 0, True, None),  # head_dim 16; 5x7 -> 6x8
    (2, 5, 7, 32, 2, 2, 1, True, None),
    (1, 13, 20, 24, 1, 3, 0, True, None),  # head_dim 24 (not a power of two): 35 windows
    (1, 13, 20, 24, 1, 3, 1, True, None),
    (1, 6, 6, 16, 2, 3, 1, False, None),  # head_dim 8 (< the 16 of a dot), exact multiple, no bias
    (2, 9, 9, 64, 2, 7, 0, True, None),  # head_dim 32; 9x9 -> 14x14, window 7: one 64 x 64 tile
    (2, 9, 9, 64, 2, 7, 3, True, None),
    (1, 13, 20, 96, 3, 7, 3, True, None),  # 3 heads, 2 x 3 windows
    (1, 1, 1, 32, 1, 7, 0, True, None),  # one pixel + 48 padded tokens that read the bias
    (1, 1, 1, 32, 1, 7, 3, True, None),  # ... shifted: pixel rolled to (4, 4), region with 8 padded tokens
    (1, 9, 9, 64, 1, 7, 3, True, (16, 16, 1)),  # head_dim 64; 49 = 3 x 16 + 1: 4 key tiles, last ragged
    (1, 9, 9, 32, 1, 7, 0, True, (32, 16, 2)),
    (1, 10, 10, 32, 1, 12, 6, True, None),  # N = 144 with the default 64 x 16 tiles (3 x 9)
    (1, 13, 20, 64, 2, 12, 0, True, None),  # 13x20 -> 24x24: 4 windows
    (1, 13, 20, 64, 2, 12, 6, True, None),
    (1, 13, 11, 32, 1, 12, 6, True, (16, 16, 1)),  # 144 = 9 x 16 both ways, no padded row or key
    (1, 12, 24, 128, 1, 12, 6, False, (32, 32, 2)),  # head_dim 128, 144 = 4.5 x 32: ragged tiles
    (1, 9, 16, 96, 3, 7, 3, True, (64, 64, 4, 3)),  # 3 heads per program (the fp16/bf16 default), fp32
    (1, 20, 9, 128, 4, 12, 6, True, (64, 16, 4, 2)),  # 2 heads per program at N = 144, 4 heads
]


def case_id(c):
    b, h, w, ch, heads, window, shift, bias, blocks = c
    tiles = "default" if blocks is None else "{}x{}".format(*blocks[:2]) + (f"_hpp{blocks[3]}" if len(blocks) > 3 else "")
    return f"B{b}_{h}x{w}_C{ch}_h{heads}_w{window}_s{shift}_{'bias' if bias else 'nobias'}_{tiles}"


def check_kernel(case, dtype, device):
    b, h, w, c, heads, window, shift, qkv_bias, blocks = case
    args32 = make_inputs(b, h, w, c, heads, window, qkv_bias)
    x, weight, bias, table = cast(args32, dtype, device)
    kw = {} if blocks is None else dict(zip(("block_m", "block_n", "num_warps", "heads_per_program"), blocks))
    fast = run_kernel_with_guards(x, weight, bias, table, window, shift, heads, **kw)
    assert fast.dtype == dtype
    # gold: fp64 on the inputs as the kernel saw them (rounded to dtype)
    gold = wa.window_attention_ref(*(None if t is None else t.double() for t in (x, weight, bias, table)), window, shift, heads)
    if dtype == torch.float32:
        baseline = wa.window_attention_ref(x, weight, bias, table, window, shift, heads)
    else:
        baseline = wa.window_attention_eager(x, weight, bias, table, window, shift, heads)
    assert_within_budget(fast, gold, baseline, name=f"{case_id(case)} {dtype}", reduce="max_and_mean")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel_fp32(case, triton_device):
    check_kernel(case, torch.float32, triton_device)


LOWP_CASES = [
    (2, 9, 9, 64, 2, 7, 3, True, None),
    (1, 13, 20, 24, 1, 3, 1, True, None),
    (1, 13, 20, 64, 2, 12, 6, True, None),
    (1, 10, 10, 32, 1, 12, 0, False, (16, 16, 1)),
    (1, 20, 9, 96, 3, 7, 3, True, None),  # window 7: 3 heads per program by default
]


@pytest.mark.parametrize("case", LOWP_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_half_precision(case, dtype, triton_device):
    check_kernel(case, dtype, triton_device)


def test_padded_tokens_read_the_bias(triton_device):
    """The budget above can fail on padding: the same q/k/v with padded tokens read as 0 instead of
    the bias (what a kernel that forgot the bias would do) misses it by orders of magnitude."""
    x, weight, bias, table = cast(make_inputs(1, 9, 9, 32, 1, 7), torch.float32, triton_device)
    qkv = F.linear(x, weight, bias)
    gold = wa.window_attention_ref(x.double(), weight.double(), bias.double(), table.double(), 7, 0, 1)
    baseline = wa.window_attention_ref(x, weight, bias, table, 7, 0, 1)
    right = wa.launch(qkv, bias, table, torch.full_like(x, float("nan")), 7, 0, 1)
    assert_within_budget(right, gold, baseline, name="bias for padded tokens", reduce="max_and_mean")
    wrong = wa.launch(qkv, None, table, torch.full_like(x, float("nan")), 7, 0, 1)
    with pytest.raises(AssertionError) as failure:
        assert_within_budget(wrong, gold, baseline, name="zeros for padded tokens", reduce="max_and_mean")
    err, bound = map(float, re.search(r"max \|fast - gold\| (\S+) \(bound (\S+)\)", str(failure.value)).groups())
    assert err > 1e4 * bound, str(failure.value)  # measured: 2.7 against a bound of 5.7e-6


def test_dense_bias_table_is_the_same_op(triton_device):
    """The (heads, N, N) form of the bias (what a Swin layer caches) gives the same result, bit for
    bit, as the ((2w-1)^2, heads) table it was gathered from; the reference takes both too."""
    x, weight, bias, table = cast(make_inputs(1, 9, 11, 64, 2, 7), torch.float32, triton_device)
    dense = wa.dense_relative_position_bias(table, 7)
    assert dense.shape == (2, 49, 49) and dense.is_contiguous() and dense.dtype == table.dtype
    index = wa.relative_position_index(7).to(table.device)
    assert torch.equal(dense[1], table[:, 1][index])
    assert torch.equal(wa.window_attention(x, weight, bias, dense, 7, 3, 2), wa.window_attention(x, weight, bias, table, 7, 3, 2))
    assert torch.equal(wa.window_attention_ref(x, weight, bias, dense, 7, 3, 2),
                       wa.window_attention_ref(x, weight, bias, table, 7, 3, 2))
    assert wa.not_supported_reasons(x, weight, bias, dense, 7, 3, 2) == []
    assert "bias_table must be" in " ".join(wa.not_supported_reasons(x, weight, bias, dense[:, :48], 7, 3, 2))


def test_swin_layer_caches_the_dense_bias():
    """The layer gathers (heads, N, N) once and again only after the table changed (in place,
    as an optimizer step does, or replaced)."""
    config = MaskFormerSwinConfig(embed_dim=32, depths=[1], num_heads=[2], window_size=3)
    attn = SwinLayer(config, 32, 2, drop_path=0.0, shift_size=1).attention.self
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    first = attn.dense_relative_position_bias()
    assert attn.dense_relative_position_bias() is first
    assert torch.equal(first, attn.relative_position_bias()) and not first.requires_grad
    with torch.no_grad():
        attn.relative_position_bias_table.add_(1.0)
    second = attn.dense_relative_position_bias()
    assert second is not first and torch.equal(second, first + 1.0)


def test_dot_follows_torch_tf32_policy():
    """fp32 operands: exact FFMA dots by default, TF32 tensor cores when torch's fp32 matmuls may
    use TF32; fp16/bf16 operands always on the tensor cores. Exact fp32 at window 7 takes 16-key
    tiles (64 x 64 spilled on sm_80); several heads per program only for 16-bit operands."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert wa.dot_precision(torch.float32) == "ieee" and wa.dot_precision(torch.float16) == "tf32"
        matmul.fp32_precision = "tf32"
        assert wa.dot_precision(torch.float32) == "tf32"
    finally:
        matmul.fp32_precision = previous
    assert wa.default_blocks(49, 32, 3, "ieee", 4) == (64, 16, 4, 1)
    assert wa.default_blocks(49, 32, 3, "tf32", 4) == (64, 64, 4, 1)
    assert wa.default_blocks(49, 32, 6, "tf32", 2) == (64, 64, 4, 3)
    assert wa.default_blocks(49, 256, 6, "tf32", 2)[3] == 1  # shared memory
    assert wa.default_blocks(144, 32, 6, "tf32", 2) == (64, 16, 4, 1)
    assert wa.default_blocks(144, 32, 6, "ieee", 4) == (64, 16, 8, 1)


def test_heads_per_program_must_divide(triton_device):
    x, weight, bias, table = cast(make_inputs(1, 5, 5, 96, 3, 3), torch.float32, triton_device)
    qkv = F.linear(x, weight, bias)
    with pytest.raises(ValueError, match="heads_per_program=2 must divide num_heads=3"):
        wa.launch(qkv, bias, table, torch.empty_like(x), 3, 1, 3, heads_per_program=2)


def test_public_op_matches_body(triton_device):
    """torch.ops.maskformer.window_attention runs the same body: bit-identical to the direct call."""
    x, weight, bias, table = cast(make_inputs(1, 9, 9, 32, 2, 7), torch.float32, triton_device)
    out = wa.window_attention(x, weight, bias, table, 7, 3, 2)
    direct = wa.window_attention_impl(x, weight, bias, table, 7, 3, 2)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, direct)


def test_empty_batch(triton_device):
    x, weight, bias, table = cast(make_inputs(1, 5, 5, 16, 1, 3), torch.float32, triton_device)
    out = wa.window_attention(x[:0], weight, bias, table, 3, 1, 1)
    assert out.shape == (0, 5, 5, 16)


# ---------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(qkv_bias, triton_device):
    """Schema, fake (meta) kernel, autograd registration, AOT dispatch with dynamic shapes."""
    x, weight, bias, table = cast(make_inputs(1, 3, 5, 32, 2, 2, qkv_bias), torch.float32, triton_device)
    torch.library.opcheck(torch.ops.maskformer.window_attention.default, (x, weight, bias, table, 2, 1, 2))


def test_torch_compile_fullgraph(triton_device):
    """No graph break around the op (aot_eager: inductor would need a C++ toolchain on CPU)."""
    x, weight, bias, table = cast(make_inputs(1, 5, 5, 32, 2, 3), torch.float32, triton_device)

    def block(x):
        return wa.window_attention(x, weight, bias, table, 3, 1, 2) * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), block(x))


# ---------------------------------------------------------------------------------------------
# support checks
# ---------------------------------------------------------------------------------------------


def test_not_supported_reasons(triton_device):
    x, weight, bias, table = cast(make_inputs(1, 5, 5, 32, 2, 3), torch.float32, triton_device)
    assert wa.not_supported_reasons(x, weight, bias, table, 3, 1, 2) == []

    def reasons(*args):
        return " | ".join(wa.not_supported_reasons(*args))

    assert "dtype torch.float64" in reasons(x.double(), weight.double(), bias.double(), table, 3, 1, 2)
    assert "qkv_weight is torch.float16" in reasons(x, weight.half(), bias, table, 3, 1, 2)
    big = torch.zeros(1, 2, 2, 512)
    assert "head_dim=512" in reasons(big, torch.zeros(1536, 512), None, torch.zeros(9, 1), 2, 0, 1)
    assert "shift_size=3" in reasons(x, weight, bias, table, 3, 3, 2)
    assert "num_heads=3" in reasons(x, weight, bias, torch.zeros(25, 3), 3, 1, 3)
    assert "bias_table must be" in reasons(x, weight, bias, table[:, :1], 3, 1, 2)
    assert "require grad" in reasons(x.requires_grad_(), weight, bias, table, 3, 1, 2)
    with torch.no_grad():
        assert reasons(x, weight, bias, table, 3, 1, 2) == ""  # inference under no_grad is fine


def test_op_raises_with_reasons(triton_device):
    x, weight, bias, table = cast(make_inputs(1, 5, 5, 32, 2, 3), torch.float64, triton_device)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        wa.window_attention(x, weight, bias, table, 3, 1, 2)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias, table = make_inputs(1, 5, 5, 32, 2, 3)
    assert any("runs on CUDA" in r for r in wa.not_supported_reasons(x, weight, bias, table, 3, 1, 2))


def test_import_is_lean_and_works_without_triton():
    """Importing the module imports neither triton nor CUDA; with triton unavailable the module
    still imports, the reference works and the reasons say why the kernel cannot run."""
    code = (
        "import sys, torch\n"
        "import maskformer.kernels.window_attention as wa\n"
        "assert 'triton' not in sys.modules, 'importing the module imported triton'\n"
        "assert not torch.cuda.is_initialized()\n"
        "sys.modules['triton'] = None  # from now on `import triton` raises ImportError\n"
        "x = torch.randn(1, 4, 4, 16); w = torch.randn(48, 16); t = torch.randn(9, 2)\n"
        "assert wa.window_attention_ref(x, w, None, t, 2, 1, 2).shape == x.shape\n"
        "print('|'.join(wa.not_supported_reasons(x, w, None, t, 2, 1, 2)))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton is not importable" in proc.stdout, proc.stdout
