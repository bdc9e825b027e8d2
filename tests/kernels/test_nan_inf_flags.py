"""kernels/nan_inf_flags.py: the reference against the exact torch tests, the Triton kernel against the
reference (under TRITON_INTERPRET=1 on CPU), the flag word's life, the callers (the model's input
check, the post-processing's output check) and, on a GPU, the CUDA graph runner's captured check."""
import pytest
import torch

from maskformer import dispatch
from maskformer.inputs import INF, NAN, InputError, check_finite, nan_inf_flags
from maskformer.kernels import nan_inf_flags as nif

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def truth(*tensors):
    """The flags by definition, with torch's exact tests."""
    return tuple((NAN if bool(torch.isnan(t).any()) else 0) | (INF if bool(torch.isinf(t).any()) else 0)
                 for t in tensors)


def planted(shape, dtype, where, value, device="cpu"):
    """N(0, 3) values with ``value`` written at flat positions ``where`` (negative from the end)."""
    t = (torch.randn(shape) * 3).to(dtype)
    flat = t.view(-1)
    for i in where:
        flat[i] = value
    return t.to(device)


# Sizes around the kernel's 4096-element block and program count (1, primes, exact and one-over
# multiples) and positions at the first, last and a block-boundary element.
SIZES = [(1,), (7,), (4096,), (4097,), (3, 1361), (2, 3, 37, 41)]
SPECIAL = {"nan": float("nan"), "-nan": -float("nan"), "inf": float("inf"), "-inf": -float("inf")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIZES)
def test_ref_is_the_exact_tests(dtype, shape):
    n = torch.Size(shape).numel()
    clean = planted(shape, dtype, [], 0.0)
    assert nif.nan_inf_flags_ref(clean) == (0,)
    for name, value in SPECIAL.items():
        for where in ([0], [n - 1], [min(4095, n - 1)]):
            t = planted(shape, dtype, where, value)
            assert nif.nan_inf_flags_ref(t) == truth(t), (name, where)
            assert nif.nan_inf_flags_ref(clean, t) == (0,) + truth(t), (name, where)
    both = planted(shape, dtype, [0, n - 1], float("nan"))
    both.view(-1)[n // 2] = float("inf")
    assert nif.nan_inf_flags_ref(both) == truth(both)


def test_ref_overflowing_sum_is_not_a_flag():
    # 20000 x 60000 overflows an fp16 sum (max 65504) and 1e38 x 10 an fp32 one: finite tensors all
    big16 = torch.full((20000,), 60000.0, dtype=torch.float16)
    big32 = torch.full((10,), 1e38)
    assert nif.nan_inf_flags_ref(big16, big32) == (0, 0)
    assert nif.nan_inf_flags_ref(torch.tensor([1e38, -1e38, float("inf")])) == (INF,)


def test_refusals():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="only float tensors"):
        nif.check_args(torch.arange(4))
    with pytest.raises(ValueError, match="y is torch.int64"):
        nif.nan_inf_flags_ref(x, torch.arange(4))
    with pytest.raises(ValueError, match="different devices"):
        nif.nan_inf_flags_ref(x, torch.empty(4, device="meta"))
    assert any("only float tensors" in r for r in nif.not_supported_reasons(torch.arange(3)))


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, or CUDA)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (4096,), (4097,), (3, 1361)])
def test_triton_matches_ref(triton_device, dtype, shape):
    n = torch.Size(shape).numel()
    clean = planted(shape, dtype, [], 0.0, triton_device)
    assert nif.nan_inf_flags(clean) == (0,)
    for name, value in SPECIAL.items():
        for where in ([0], [n - 1], [min(4096, n - 1)]):
            t = planted(shape, dtype, where, value, triton_device)
            expected = truth(t)
            assert nif.nan_inf_flags(t) == expected == nif.nan_inf_flags_ref(t), (name, where)
            assert nif.nan_inf_flags(clean, t) == (0,) + expected, (name, where)
            assert nif.nan_inf_flags(t, clean) == expected + (0,), (name, where)


def test_triton_bit_patterns(triton_device):
    """Every NaN payload and sign, both infinities; the largest finite, the smallest subnormal and
    -0 are finite. Built from raw bits so nothing rounds them."""
    cases = {
        torch.float16: ([0x7C01, 0xFE00, 0x7FFF], [0x7C00, 0xFC00], [0x7BFF, 0x0001, 0x8000, 0xFBFF]),
        torch.bfloat16: ([0x7F81, 0xFFC0, 0x7FFF], [0x7F80, 0xFF80], [0x7F7F, 0x0001, 0x8000, 0xFF7F]),
        torch.float32: ([0x7F800001, -0x00400000, 0x7FFFFFFF], [0x7F800000, -0x00800000],
                        [0x7F7FFFFF, 0x00000001, -0x80000000]),
    }
    bits_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    for dtype, (nans, infs, finite) in cases.items():
        def make(patterns):
            wrapped = [p - (1 << 16) if dtype != torch.float32 and p >= 1 << 15 else p for p in patterns]
            base = torch.zeros(5000, dtype=bits_dtype[dtype])
            base[[17, 4095, 4096, 4999][: len(wrapped)]] = torch.tensor(wrapped, dtype=bits_dtype[dtype])
            return base.view(dtype).to(triton_device)

        assert nif.nan_inf_flags(make(finite)) == (0,), dtype
        for p in nans:
            assert nif.nan_inf_flags(make([p])) == (NAN,), (dtype, hex(p))
        for p in infs:
            assert nif.nan_inf_flags(make([p])) == (INF,), (dtype, hex(p))
        assert nif.nan_inf_flags(make(finite), make(nans[:1] + infs[:1])) == (0, NAN | INF), dtype


def test_triton_strided_mixed_dtypes_and_empty(triton_device):
    x = planted((40, 70), torch.float32, [69], float("nan"), triton_device)
    assert nif.nan_inf_flags(x.t()) == (NAN,)  # transposed: copied to a flat range first
    assert nif.nan_inf_flags(x[:, ::2]) == (0,)  # the NaN sits in an odd column
    y = planted((9, 9), torch.bfloat16, [80], -float("inf"), triton_device)
    assert nif.nan_inf_flags(x, y) == (NAN, INF)
    empty = torch.empty(0, 5, device=triton_device)
    assert nif.nan_inf_flags(empty) == (0,) and nif.nan_inf_flags(empty, y) == (0, INF)


def test_triton_programs_stride_over_long_tensors(triton_device, monkeypatch):
    """More blocks than programs: each program loops (3 programs of 4096 over 12 blocks + 1 element)."""
    monkeypatch.setattr(nif, "_MAX_PROGRAMS", 3)
    n = 12 * 4096 + 1
    for where in (0, 4096 * 5 + 7, n - 1):
        t = planted((n,), torch.float16, [where], float("nan"), triton_device)
        assert nif.nan_inf_flags(t) == (NAN,), where
        assert nif.nan_inf_flags(planted((n,), torch.float16, [], 0.0, triton_device), t) == (0, NAN), where


def test_kernel_only_ors_into_the_flag_word(triton_device):
    """A sentinel bit in the word survives; a clean tensor leaves the word exactly as it was."""
    sentinel = 0x100
    flags = torch.full((1,), sentinel, dtype=torch.int32, device=triton_device)
    clean = torch.randn(3000, device=triton_device)
    nif.launch(clean, clean, flags)
    assert flags.item() == sentinel
    bad = planted((3000,), torch.float32, [2999], -float("inf"), triton_device)
    nif.launch(clean, bad, flags)
    assert flags.item() == sentinel | (INF << 2)
    nif.launch(bad, None, flags)
    assert flags.item() == sentinel | (INF << 2) | INF


def test_flag_word_is_clear_after_a_hit(triton_device):
    bad = planted((100,), torch.float32, [3], float("nan"), triton_device)
    assert nif.nan_inf_flags(bad) == (NAN,)
    assert nif.nan_inf_flags(torch.zeros(100, device=triton_device)) == (0,)
    assert nif.flag_word(torch.device(triton_device)).item() == 0


def test_opcheck(triton_device):
    x = torch.randn(300, device=triton_device)
    y = planted((7, 7), torch.float16, [5], float("nan"), triton_device)
    torch.library.opcheck(torch.ops.maskformer.nan_inf_flags_triton,
                          (x, y, torch.zeros(1, dtype=torch.int32, device=triton_device)))


# ---------------------------------------------------------------------------------------------
# The callers
# ---------------------------------------------------------------------------------------------


def test_callers_use_the_kernel_where_triton_is_the_backend(triton_device):
    x = planted((2, 3, 20, 20), torch.float32, [5], float("inf"), triton_device)
    with dispatch.backend("triton"):
        assert nan_inf_flags(x) == (INF,)
        assert dispatch.last_dispatch("nan_inf_flags").backend == "triton"
        with pytest.raises(InputError, match="pixel_values contains infinite values"):
            check_finite(x)
    with dispatch.backend("reference"):
        assert nan_inf_flags(x) == (INF,)


def test_forced_cpp_runs_the_reference_check():
    """cpp has no such kernel; a check is not what forcing is about: the reference runs, no refusal."""
    x = planted((2, 3, 8, 8), torch.float32, [0], float("nan"))
    with dispatch.backend("cpp"):
        assert nan_inf_flags(x, x) == (NAN, NAN)
        with pytest.raises(InputError, match="contains NaN values"):
            check_finite(x)


def test_post_processing_check_names_the_tensor(triton_device):
    from maskformer import MaskFormerImageProcessor

    class Out:
        class_queries_logits = torch.randn(2, 5, 4, device=triton_device)
        masks_queries_logits = planted((2, 5, 6, 7), torch.float32, [100], float("nan"), triton_device)

    processor = MaskFormerImageProcessor()
    with dispatch.backend("triton"), pytest.raises(ValueError, match="masks_queries_logits contains NaN"):
        processor.post_process_semantic_segmentation(Out())
    Out.masks_queries_logits = torch.randn(2, 5, 6, 7, device=triton_device)
    Out.class_queries_logits = planted((2, 5, 4), torch.float32, [3], float("inf"), triton_device)
    with dispatch.backend("triton"):  # infinities pass the output check, as transformers lets them
        assert len(processor.post_process_semantic_segmentation(Out())) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU machines only)")
def test_cuda_graph_runner_checks_the_input_inside_the_graph():
    from maskformer import CUDAGraphRunner
    from maskformer.loading import load_default_model

    model = load_default_model().cuda().eval()
    x = torch.randn(1, 3, 128, 160, device="cuda")
    runner = CUDAGraphRunner(model, x)
    assert torch.isfinite(runner(x).masks_queries_logits).all()
    bad = x.clone()
    bad[0, 1, 100, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        runner(bad)
    model.check_finite = False  # no read: the replay returns its (garbage) static outputs
    try:
        runner(bad)
    finally:
        model.check_finite = True
    assert torch.isfinite(runner(x).masks_queries_logits).all()
