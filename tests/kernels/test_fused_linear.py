"""kernels/fused_linear.py: the reference against the modules it replaces, the Triton kernel against
the reference (under TRITON_INTERPRET=1 on CPU: small shapes, ~0.1-1 s each), its refusals, and the
Swin block that calls it against the block's module code."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskformer import _ext, dispatch
from maskformer.kernels import fused_linear as fl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(lead, k, n, dtype=torch.float32, device="cpu", bias=True, residual=True):
    """x (*lead, K) ~ N(0, 1), weight (N, K) ~ N(0, 1/K) (unit-variance outputs: GELU's curved part),
    bias ~ N(0, 0.5), residual ~ N(0, 1), rounded to ``dtype``."""
    x = torch.randn(*lead, k)
    w = torch.randn(n, k) / k**0.5
    b = torch.randn(n) * 0.5 if bias else None
    r = torch.randn(*lead, n) if residual else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, r))


def eager(x, w, b, activation, r):
    """What the Swin block's modules compute, in the tensors' own dtype (each step rounded)."""
    y = F.linear(x, w, b)
    if activation == "gelu":
        y = F.gelu(y)
    return y if r is None else y + r


def assert_within_budget(fast, gold, baseline, name):
    """|fast - gold| <= 2 |baseline - gold| + atol, as max and as mean over all elements (as
    test_window_attention.py). gold: the reference in fp64 on the same rounded inputs; baseline:
    the modules' own result in fast's dtype (for fp32 the fp32 reference). atol = eps(dtype) *
    max|gold|: 1-2 ulps of the largest outputs, so a baseline that happens to be exact cannot demand
    more than the dtype holds; it also covers the interpreter's fp32 -> bf16 conversion, which
    truncates (the GPU rounds to nearest: up to 1 ulp apart). The mean bound takes a tenth of it."""
    fast64, gold, baseline = fast.double().cpu(), gold.double().cpu(), baseline.double().cpu()
    nan = torch.isnan(fast64)
    assert not nan.any(), f"{name}: {int(nan.sum())} of {nan.numel()} outputs never written (NaN sentinel)"
    atol = torch.finfo(fast.dtype).eps * gold.abs().max().item()
    err, base = (fast64 - gold).abs(), (baseline - gold).abs()
    max_bound, mean_bound = 2 * base.max().item() + atol, 2 * base.mean().item() + atol / 10
    if err.max().item() > max_bound or err.mean().item() > mean_bound:
        idx = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        raise AssertionError(
            f"{name}: max |fast - gold| {err.max().item():.3e} (bound {max_bound:.3e}), mean {err.mean().item():.3e} "
            f"(bound {mean_bound:.3e}); worst at {idx}: fast {fast64[idx].item():.7g}, gold {gold[idx].item():.7g}, "
            f"baseline {baseline[idx].item():.7g}; {int((err > max_bound).sum())} of {err.numel()} over the max bound")


def check(fast, x, w, b, activation, r, name):
    dbl = [None if t is None else t.double() for t in (x, w, b, r)]
    gold = fl.fused_linear_ref(dbl[0], dbl[1], dbl[2], activation, dbl[3])
    baseline = fl.fused_linear_ref(x, w, b, activation, r) if x.dtype == torch.float32 else eager(x, w, b, activation, r)
    assert fast.shape == gold.shape and fast.dtype == x.dtype, (name, fast.shape, fast.dtype)
    assert_within_budget(fast, gold, baseline, name)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_ref_is_the_modules_in_fp32(activation):
    x, w, b, r = make((2, 7), 24, 40)
    for bias, res in ((b, r), (None, r), (b, None), (None, None)):
        assert torch.equal(fl.fused_linear_ref(x, w, bias, activation, res), eager(x, w, bias, activation, res))


def test_ref_computes_half_precision_in_fp32():
    x, w, b, r = make((5,), 16, 8, torch.bfloat16)
    want = (F.gelu(F.linear(x.float(), w.float(), b.float())) + r.float()).to(torch.bfloat16)
    assert torch.equal(fl.fused_linear_ref(x, w, b, "gelu", r), want)


def test_refusals():
    x, w, b, r = make((3,), 8, 4)
    with pytest.raises(ValueError, match="activation 'relu' is not one of"):
        fl.check_args(x, w, b, "relu", r)
    with pytest.raises(ValueError, match="x's last dimension 8 is not weight's K=5"):
        fl.check_args(x, w[:, :5], b)
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(4,\)"):
        fl.check_args(x, w, b[:3])
    with pytest.raises(ValueError, match="residual must be x's shape with N=4 last"):
        fl.check_args(x, w, b, "none", r[:2])
    with pytest.raises(ValueError, match="every tensor must have x's dtype.*weight bfloat16"):
        fl.fused_linear_ref(x, w.bfloat16(), b)
    with pytest.raises(ValueError, match="different devices"):
        fl.fused_linear_ref(x, w.to("meta"), b)
    assert any("x is torch.int64" in r for r in fl.not_supported_reasons(torch.ones(3, 8, dtype=torch.long),
                                                                         w.long(), None))
    w.requires_grad_(True)
    with torch.enable_grad():
        assert any("require grad" in reason for reason in fl.not_supported_reasons(x, w, b))
    with torch.no_grad():
        assert not any("require grad" in reason for reason in fl.not_supported_reasons(x, w, b))


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, or CUDA)
# ---------------------------------------------------------------------------------------------

# (leading dims, K, N): a single row, sizes below every block, K not a multiple of the K step,
# primes, tiles with ragged edges on both M and N, and a Swin-like 4x fc1.
SHAPES = [((1,), 16, 16), ((5,), 3, 1), ((37,), 48, 80), ((2, 3, 11), 40, 29), ((131,), 96, 200), ((70,), 32, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_triton_matches_ref(triton_device, dtype, lead, k, n):
    x, w, b, r = make(lead, k, n, dtype, triton_device)
    for activation, bias, res in (("gelu", b, None), ("none", b, r), ("gelu", None, r), ("none", None, None)):
        fast = fl.fused_linear(x, w, bias, activation, res)
        check(fast, x, w, bias, activation, res, f"{dtype} {lead} K={k} N={n} {activation} bias={bias is not None} "
                                                 f"residual={res is not None}")


def test_every_output_written_and_nothing_else(triton_device):
    """Outputs start as NaN; the output is a column slice of a wider buffer whose other columns
    hold a sentinel that must survive (the kernel writes exactly (M, N) through out's row stride)."""
    x, w, b, r = make((45,), 40, 36, torch.float32, triton_device)
    buffer = torch.full((45, 50), float("nan"), device=triton_device)
    buffer[:, 36:] = 7.0
    out = buffer[:, :36]
    for blocks in (None, (16, 16, 16, 2, 2, 2), (32, 64, 32, 4, 4, 2)):
        out.fill_(float("nan"))
        fl.launch(x, w, b, "gelu", r, out, blocks=blocks)
        check(out, x, w, b, "gelu", r, f"blocks {blocks}")
        assert torch.equal(buffer[:, 36:], torch.full((45, 14), 7.0, device=triton_device)), blocks


def test_strided_operands(triton_device):
    """x and the residual as row-strided views, a transposed weight (K-contiguous columns), a
    column-strided x (copied first)."""
    x, w, b, r = make((30,), 48, 24, torch.float32, triton_device)
    wide_x = torch.randn(30, 64, device=triton_device)
    wide_x[:, :48] = x
    wide_r = torch.randn(30, 40, device=triton_device)
    wide_r[:, :24] = r
    w_t = w.t().contiguous().t()  # (N, K) with strides (1, N)
    fast = fl.fused_linear(wide_x[:, :48], w_t, b, "gelu", wide_r[:, :24])
    check(fast, x, w, b, "gelu", r, "row-strided x and residual, transposed weight")
    xs = torch.randn(30, 96, device=triton_device)[:, ::2]
    check(fl.fused_linear(xs, w, b, "none", r), xs.contiguous(), w, b, "none", r, "column-strided x")


def test_blocks_agree(triton_device):
    """K steps that divide K and that do not (the masked loop), tiles of every kind."""
    x, w, b, r = make((50,), 64, 48, torch.float32, triton_device)
    want = fl.fused_linear_ref(x, w, b, "gelu", r)
    for blocks in ((16, 16, 16, 1, 2, 2), (64, 16, 32, 2, 4, 2), (16, 64, 64, 8, 4, 3), (32, 32, 48 // 3 * 2, 4, 4, 2)):
        if blocks[2] & (blocks[2] - 1):
            continue  # tl.arange needs powers of two
        out = torch.full((50, 48), float("nan"), device=triton_device)
        fl.launch(x, w, b, "gelu", r, out, blocks=blocks)
        assert (out - want).abs().max().item() < 1e-5, blocks


def test_default_blocks():
    assert fl.default_blocks(25600, 768, 192, "tf32", 2) == (128, 128, 64, 8, 8, 3)
    assert fl.default_blocks(400, 6144, 1536, "tf32", 2)[:2] == (128, 128)  # 4 x 48 = 192 tiles
    assert fl.default_blocks(400, 1536, 6144, "tf32", 2)[:2] == (64, 128)  # 4 x 12 = 48 tiles: halve M
    assert fl.default_blocks(5, 3, 1, "tf32", 2)[:3] == (16, 16, 16)
    assert fl.default_blocks(1000, 1000, 1000, "tf32", 4)[2] == 32
    assert fl.default_blocks(1000, 1000, 1000, "ieee", 4)[:3] == (64, 64, 16)


def test_precision_follows_torchs_policy():
    with _ext.tf32_matmul(False):
        assert fl.dot_precision(torch.float32) == "ieee" and fl.dot_precision(torch.bfloat16) == "tf32"
    with _ext.tf32_matmul(True):
        assert fl.dot_precision(torch.float32) == "tf32"


def test_opcheck(triton_device):
    x, w, b, r = make((6, 5), 32, 16, torch.float32, triton_device)
    torch.library.opcheck(torch.ops.maskformer.fused_linear, (x, w, b, "gelu", r))
    torch.library.opcheck(torch.ops.maskformer.fused_linear, (x, w, None, "none", None))


def test_meta_tensors_give_meta_results():
    x, w, b, r = (t.to("meta") for t in make((3, 4), 8, 12))
    out = fl.fused_linear(x, w, b, "gelu", r)
    assert out.device.type == "meta" and out.shape == (3, 4, 12)


def test_forced_triton_refuses_with_reasons(triton_device):
    x, w, b, r = make((4,), 8, 8, torch.float32, triton_device)
    w.requires_grad_(True)
    with dispatch.backend("triton"), torch.enable_grad():
        with pytest.raises(dispatch.BackendNotSupportedError, match="forward-only"):
            dispatch.fused_linear(x, w, b, "gelu", r)


# ---------------------------------------------------------------------------------------------
# The Swin block that calls it
# ---------------------------------------------------------------------------------------------


def swin_layer(dim=32, heads=2, window=4, shift=2, act="gelu"):
    from maskformer.config import MaskFormerSwinConfig
    from maskformer.swin import SwinLayer

    config = MaskFormerSwinConfig(embed_dim=dim, depths=[2], num_heads=[heads], window_size=window, hidden_act=act)
    layer = SwinLayer(config, dim, heads, 0.0, shift).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
def test_swin_block_fused_tail_matches_its_modules(triton_device, dtype):
    layer = swin_layer().to(device=triton_device, dtype=dtype)
    h = torch.randn(2, 9 * 10, 32, device=triton_device, dtype=dtype)
    calls = []
    real = fl.fused_linear
    with torch.no_grad():
        with dispatch.backend("reference"):
            ref = layer(h, (9, 10))
        with dispatch.backend("triton"):
            import maskformer.kernels.fused_linear as module

            module.fused_linear = lambda *a: calls.append(a[3]) or real(*a)
            try:
                fast = layer(h, (9, 10))
            finally:
                module.fused_linear = real
            assert dispatch.last_dispatch("fused_linear").backend == "triton"
        gold = layer.double()(h.double(), (9, 10)) if dtype != torch.float32 else ref
    assert calls == ["none", "gelu", "none"]
    scale = gold.abs().max().item()
    err = ((fast.double() - gold.double()).abs().max() / scale).item()
    # fp32: the kernels change summation order only (~1e-7 relative per GEMM, measured ~5e-7 here);
    # fp16/bf16: judged against the module code's own error in that dtype (both vs fp64).
    bound = 1e-5 if dtype == torch.float32 else 2 * ((ref.double() - gold.double()).abs().max() / scale).item() + 1e-3
    assert err <= bound, f"{dtype}: relative error {err:.2e} > {bound:.2e}"


def test_swin_block_keeps_its_modules_where_the_kernel_cannot_serve(triton_device):
    h = torch.randn(1, 36, 32, device=triton_device)
    seen = []
    with torch.no_grad(), dispatch.backend("triton"):
        for layer in (swin_layer(act="gelu_new").to(triton_device), swin_layer().to(triton_device).train()):
            dispatch._records.by_op.pop("fused_linear", None)
            layer(h, (6, 6))
            seen.append(dispatch.last_dispatch("fused_linear"))
    assert seen == [None, None]  # neither asked: the tanh GELU; dropout in training
