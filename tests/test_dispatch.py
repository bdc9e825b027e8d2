"""maskformer/dispatch.py: backend selection (env var read per call, setter, context manager),
forced backends raising with reasons, auto falling back with the reason recorded, the lean import,
and semantic_segmentation against transformers' post_process_semantic_segmentation on realistic
logits for every backend.

Triton runs here on CPU tensors through the interpreter: TRITON_INTERPRET is set before anything
imports triton (tests/kernels/conftest.py does the same for that folder; setdefault keeps a
caller's TRITON_INTERPRET=0 on a GPU machine)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from maskformer import _ext, dispatch  # noqa: E402
from maskformer.kernels.mask_einsum import make_realistic_logits, mask_einsum_ref  # noqa: E402
from maskformer.kernels.upsample_argmax import upsample_argmax_ref  # noqa: E402

from hf_oracle import assert_labels_equal  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    """Every test starts from auto with no MASKFORMER_BACKEND, and leaves no override behind."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


def _cpp_built():
    return _ext.load_cpp() is not None


needs_cpp = pytest.mark.skipif(not _cpp_built(), reason=f"C++ extension not built: {_ext.cpp_import_error()}")


def _triton_usable():
    return _ext.triton_import_error() is None and _ext.triton_interpret_mode()


@pytest.fixture(scope="module")
def hf_post_process():
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

    processor = MaskFormerImageProcessorPil()

    def run(class_queries_logits, masks_queries_logits, target_sizes):
        outputs = MaskFormerForInstanceSegmentationOutput(
            class_queries_logits=class_queries_logits, masks_queries_logits=masks_queries_logits
        )
        return processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)

    return run


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def test_import_is_lean():
    """Importing the package, dispatch and the kernel modules imports neither triton nor the C++
    extension and does not initialise CUDA."""
    code = (
        "import sys, torch, maskformer, maskformer.dispatch, maskformer._ext\n"
        "from maskformer.kernels import mask_einsum, ms_deform_attn, query_argmax, upsample_argmax\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'maskformer._C' not in sys.modules, 'extension loaded'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------


def _small():
    return make_realistic_logits(2, 8, 6, 9, 11, seed=1)


@needs_cpp
def test_env_var_is_read_at_call_time(monkeypatch):
    cl, ml = _small()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    dispatch.semantic_segmentation(cl, ml, [(20, 21), (5, 6)])
    assert dispatch.last_dispatch("semantic_segmentation").backend == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    dispatch.semantic_segmentation(cl, ml, [(20, 21), (5, 6)])
    assert dispatch.last_dispatch("semantic_segmentation").backend == "cpp"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    dispatch.semantic_segmentation(cl, ml, None)
    rec = dispatch.last_dispatch()
    assert (rec.op, rec.requested, rec.backend) == ("semantic_segmentation", "auto", "cpp")
    assert dispatch.last_dispatch_reason == str(rec)


@needs_cpp
def test_setter_wins_and_context_restores(monkeypatch):
    cl, ml = _small()
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    dispatch.set_backend("reference")
    assert dispatch.get_backend() == "reference"
    with dispatch.backend("cpp"):
        assert dispatch.get_backend() == "cpp"
        dispatch.semantic_segmentation(cl, ml)
        assert dispatch.last_dispatch("semantic_segmentation").backend == "cpp"
    assert dispatch.get_backend() == "reference"
    dispatch.set_backend(None)
    assert dispatch.get_backend() == "cpp"  # back to the variable


def test_invalid_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown maskformer backend 'cuda'"):
        dispatch.set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    cl, ml = _small()
    with pytest.raises(ValueError, match="MASKFORMER_BACKEND=fast"):
        dispatch.semantic_segmentation(cl, ml)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    cl, ml = _small()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.set_backend("triton")
    for call in (lambda: dispatch.semantic_segmentation(cl, ml), lambda: dispatch.mask_einsum(cl, ml),
                 lambda: dispatch.upsample_argmax(torch.rand(3, 4, 4), (8, 8))):
        with pytest.raises(dispatch.BackendNotSupportedError) as info:
            call()
        text = str(info.value)
        assert "backend 'triton' was forced (set_backend())" in text
        assert "TRITON_INTERPRET=1" in text or "triton is not importable" in text, text
        assert info.value.reasons


def test_forced_cpp_without_extension_raises_auto_falls_back(monkeypatch, caplog):
    """Simulate a missing extension: forced cpp raises with the import error, auto uses the
    reference and records why."""
    monkeypatch.setattr(_ext, "_cpp_tried", True)
    monkeypatch.setattr(_ext, "_cpp_module", None)
    monkeypatch.setattr(_ext, "_cpp_error", "maskformer._C could not be imported (ImportError: simulated)")
    cl, ml = _small()
    with dispatch.backend("cpp"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="simulated"):
            dispatch.semantic_segmentation(cl, ml, [(30, 31), (7, 8)])
    with caplog.at_level(logging.DEBUG, logger="maskformer.dispatch"):
        got = dispatch.semantic_segmentation(cl, ml, [(30, 31), (7, 8)])
    rec = dispatch.last_dispatch("semantic_segmentation")
    assert rec.backend == "reference" and "simulated" in " ".join(rec.refused["cpp"])
    assert "simulated" in dispatch.last_dispatch_reason and "simulated" in caplog.text
    ref = upsample_argmax_ref(mask_einsum_ref(cl, ml), [(30, 31), (7, 8)])
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


def test_unsupported_dtype_forced_raises_auto_falls_back():
    cl, ml = _small()
    cl, ml = cl.double(), ml.double()
    with dispatch.backend("cpp"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="float64 is not supported"):
            dispatch.semantic_segmentation(cl, ml)
    got = dispatch.semantic_segmentation(cl, ml, [(10, 12), (3, 3)])
    rec = dispatch.last_dispatch("semantic_segmentation")
    assert rec.backend == "reference"
    assert any("float64" in r for r in rec.refused.get("cpp", [])) or not _cpp_built()
    ref = upsample_argmax_ref(mask_einsum_ref(cl, ml), [(10, 12), (3, 3)])
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_argument_errors_raise_whatever_the_backend():
    cl, ml = _small()
    for name in ("reference", "auto", "cpp", "triton"):
        with dispatch.backend(name):
            with pytest.raises(ValueError, match="as many target sizes as the batch"):
                dispatch.semantic_segmentation(cl, ml, [(4, 4)])
            with pytest.raises(ValueError, match="cannot hold class index"):
                dispatch.semantic_segmentation(*make_realistic_logits(1, 3, 300, 4, 4), out_dtype=torch.uint8)


@needs_cpp
def test_single_ops_dispatch():
    cl, ml = make_realistic_logits(2, 20, 30, 12, 14, seed=2)
    scores = dispatch.mask_einsum(cl, ml)
    assert dispatch.last_dispatch("mask_einsum").backend == "cpp"
    ref = mask_einsum_ref(cl, ml)
    assert (scores - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()  # a few fp32 ulps, see test_cpp_semantic
    labels = dispatch.upsample_argmax(ref, [(50, 51), (20, 19)], out_dtype=torch.int32)
    assert dispatch.last_dispatch("upsample_argmax").backend == "cpp"
    for g, r in zip(labels, upsample_argmax_ref(ref, [(50, 51), (20, 19)], out_dtype=torch.int32)):
        assert torch.equal(g, r)


def _panoptic_inputs(dtype=torch.float32):
    """One image's kept queries: (Q, h, w) mask probabilities and (Q,) class scores."""
    cl, ml = make_realistic_logits(1, 14, 20, 12, 15, n_objects=14, seed=4)
    return ml[0].sigmoid().to(dtype), cl[0].softmax(-1)[:, :-1].max(-1).values.to(dtype)


def test_query_argmax_backends():
    """auto runs C++ on CPU when built; triton has no kernel for it: forced, it raises and says so;
    float64 is refused by cpp (forced: raises, auto: reference with the reason); every backend
    that runs gives the reference's labels and areas."""
    from maskformer.kernels.query_argmax import query_argmax_ref

    probs, scores = _panoptic_inputs()
    ref = query_argmax_ref(probs, scores, (40, 50), 0.5)
    labels, area = dispatch.query_argmax(probs, scores, (40, 50), 0.5)
    rec = dispatch.last_dispatch("query_argmax")
    assert rec.backend == ("cpp" if _cpp_built() else "reference"), str(rec)
    assert torch.equal(labels, ref[0]) and torch.equal(area, ref[1])
    with dispatch.backend("triton"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="query_argmax has no Triton kernel"):
            dispatch.query_argmax(probs, scores, (40, 50))
    assert dispatch.not_supported_reasons("query_argmax", "triton", probs, scores, (40, 50))
    p64, s64 = probs.double(), scores.double()
    if _cpp_built():
        with dispatch.backend("cpp"):
            with pytest.raises(dispatch.BackendNotSupportedError, match="float64 is not supported"):
                dispatch.query_argmax(p64, s64, (40, 50))
    labels, area = dispatch.query_argmax(p64, s64, (40, 50))
    rec = dispatch.last_dispatch("query_argmax")
    assert rec.backend == "reference" and any("float64" in r or "not be imported" in r for r in rec.refused["cpp"])
    ref64 = query_argmax_ref(p64, s64, (40, 50))
    assert torch.equal(labels, ref64[0]) and torch.equal(area, ref64[1])


def test_query_argmax_argument_errors_and_missing_extension(monkeypatch):
    probs, scores = _panoptic_inputs()
    for name in ("reference", "auto", "cpp", "triton"):
        with dispatch.backend(name):
            with pytest.raises(ValueError, match="weights must be"):
                dispatch.query_argmax(probs, scores[:3], (8, 8))
    monkeypatch.setattr(_ext, "_cpp_tried", True)
    monkeypatch.setattr(_ext, "_cpp_module", None)
    monkeypatch.setattr(_ext, "_cpp_error", "maskformer._C could not be imported (ImportError: simulated)")
    with dispatch.backend("cpp"):
        with pytest.raises(dispatch.BackendNotSupportedError, match="simulated"):
            dispatch.query_argmax(probs, scores, (30, 31))
    dispatch.query_argmax(probs, scores, (30, 31))
    rec = dispatch.last_dispatch("query_argmax")
    assert rec.backend == "reference" and "simulated" in " ".join(rec.refused["cpp"])


def test_describe():
    info = dispatch.describe()
    assert info["requested"] == "auto" and info["source"] == "default"
    assert "cpp" in info and "triton" in info


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------

# (B, Q, K, h, w, target sizes): K = 1, 2, 150, 171, 300; targets smaller, larger, odd, identity,
# None, and H + W <= 128 (aten's channels-last kernel).
CASES = [
    (1, 20, 1, 13, 17, [(50, 61)]),
    (2, 10, 2, 9, 11, None),
    (2, 100, 150, 40, 53, [(160, 213), (97, 131)]),
    (3, 50, 171, 17, 29, [(31, 20), (17, 29), (200, 101)]),
    (2, 30, 300, 20, 24, [(81, 95), (9, 7)]),
    (2, 40, 150, 20, 27, [(64, 64), (40, 33)]),
]
# The interpreter runs ~1 ms of numpy per class and 1024 pixels: Triton gets the small ones.
TRITON_CASES = [CASES[0], CASES[1], (2, 12, 150, 8, 9, [(29, 31), (10, 7)])]


def _case_id(c):
    return f"B{c[0]}-Q{c[1]}-K{c[2]}-{c[3]}x{c[4]}-{'none' if c[5] is None else len(c[5])}"


def _check_parity(backend_name, case, hf_post_process, dtype=torch.float32):
    b, q, k, h, w, sizes = case
    cl, ml = make_realistic_logits(b, q, k, h, w, seed=k + b, dtype=dtype)
    with dispatch.backend(backend_name):
        ours = dispatch.semantic_segmentation(cl, ml, sizes)
    assert dispatch.last_dispatch("semantic_segmentation").backend == backend_name
    # fp16/bf16: our semantics are fp32 math on the given values, i.e. transformers on the upcast.
    theirs = hf_post_process(cl.float(), ml.float(), sizes)
    assert len(ours) == len(theirs) == b
    for i in range(b):
        assert_labels_equal(ours[i], theirs[i], f"{backend_name} {dtype} image {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_transformers(case, hf_post_process):
    _check_parity("reference", case, hf_post_process)


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpp_matches_transformers(case, hf_post_process):
    _check_parity("cpp", case, hf_post_process)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_matches_transformers_on_upcast(dtype, hf_post_process):
    _check_parity("cpp", CASES[2], hf_post_process, dtype)
    _check_parity("reference", CASES[2], hf_post_process, dtype)


@pytest.mark.skipif(not _triton_usable(), reason="triton not importable or TRITON_INTERPRET not set")
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_transformers(case, hf_post_process):
    """Triton's fused scores differ from torch's einsum by a few ulps, so this holds on realistic
    logits (clear winners), not on adversarial near-ties."""
    _check_parity("triton", case, hf_post_process)


@needs_cpp
def test_out_dtype(hf_post_process):
    cl, ml = make_realistic_logits(2, 30, 150, 20, 27, seed=3)
    sizes = [(70, 90), (20, 27)]
    theirs = hf_post_process(cl, ml, sizes)
    for backend_name in ("reference", "cpp"):
        with dispatch.backend(backend_name):
            for dt in (torch.int32, torch.int16, torch.uint8):
                ours = dispatch.semantic_segmentation(cl, ml, sizes, out_dtype=dt)
                for o, t in zip(ours, theirs):
                    assert_labels_equal(o, t.to(dt), f"{backend_name} {dt}")


# ---------------------------------------------------------------------------------------------
# Padded batches: source_extents
# ---------------------------------------------------------------------------------------------


def _backend_available(name):
    if name == "cpp" and not _cpp_built():
        pytest.skip(f"C++ extension not built: {_ext.cpp_import_error()}")
    if name == "triton" and not _triton_usable():
        pytest.skip("triton not importable or TRITON_INTERPRET not set")


@pytest.mark.parametrize("backend_name", ["reference", "cpp", "triton"])
def test_semantic_segmentation_source_extents_on_every_backend(backend_name):
    """Identical maps on every backend: the reference crops the reference scores and resizes with
    the extent's scales; padding logits (changed at random here) never change a label; a full
    extent is the same as none."""
    _backend_available(backend_name)
    cl, ml = make_realistic_logits(3, 12, 30, 12, 14, seed=5)
    extents = [(8.25, 10.5), None, (0.75, 11.0)]
    sizes = [(33, 42), (36, 44), (30, 20)]
    ref = upsample_argmax_ref(mask_einsum_ref(cl, ml), sizes, source_extents=extents)
    padded = ml.clone()  # new logits beyond each crop [:ceil(eh), :ceil(ew)]
    padded[0, :, 9:, :] = torch.randn(12, 3, 14) * 10
    padded[0, :, :, 11:] = torch.randn(12, 12, 3) * 10
    padded[2, :, 1:, :] = torch.randn(12, 11, 14) * 10
    padded[2, :, :, 11:] = torch.randn(12, 12, 3) * 10
    with dispatch.backend(backend_name):
        for logits in (ml, padded):
            got = dispatch.semantic_segmentation(cl, logits, sizes, source_extents=extents)
            assert dispatch.last_dispatch("semantic_segmentation").backend == backend_name
            for i in range(3):
                assert_labels_equal(got[i], ref[i], f"{backend_name} image {i} extent {extents[i]}")
        full = dispatch.semantic_segmentation(cl, ml, sizes, source_extents=[(12, 14)] * 3)
        none = dispatch.semantic_segmentation(cl, ml, sizes)
        crop_sized = dispatch.semantic_segmentation(cl, ml, None, source_extents=extents)
    for i in range(3):
        assert_labels_equal(full[i], none[i], f"{backend_name} full extent image {i}")
    assert [tuple(m.shape) for m in crop_sized] == [(9, 11), (12, 14), (1, 11)]


@pytest.mark.parametrize("backend_name", ["reference", "cpp", "triton"])
def test_upsample_argmax_and_query_argmax_source_extents(backend_name):
    _backend_available(backend_name)
    from maskformer.kernels.query_argmax import query_argmax_ref

    scores = mask_einsum_ref(*make_realistic_logits(2, 12, 30, 9, 11, seed=6))
    extents = [(7.5, 10.25), None]
    ref = upsample_argmax_ref(scores, [(40, 45), (20, 21)], source_extents=extents)
    with dispatch.backend(backend_name):
        got = dispatch.upsample_argmax(scores, [(40, 45), (20, 21)], source_extents=extents)
        assert dispatch.last_dispatch("upsample_argmax").backend == backend_name
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    probs, weights = _panoptic_inputs()
    ref = query_argmax_ref(probs, weights, (40, 50), 0.5, source_extent=(10.75, 13.5))
    with dispatch.backend("auto" if backend_name == "triton" else backend_name):  # (no Triton kernel)
        labels, area = dispatch.query_argmax(probs, weights, (40, 50), 0.5, source_extent=(10.75, 13.5))
    assert torch.equal(labels, ref[0]) and torch.equal(area, ref[1])


def test_source_extents_argument_errors_whatever_the_backend():
    cl, ml = _small()
    for name in ("reference", "auto", "cpp", "triton"):
        with dispatch.backend(name):
            with pytest.raises(ValueError, match="source_extents has 1 entries for a batch of 2"):
                dispatch.semantic_segmentation(cl, ml, source_extents=[(4, 4)])
            with pytest.raises(ValueError, match=r"source_extents\[1\]: extent \(9.5, 4.0\) is outside"):
                dispatch.semantic_segmentation(cl, ml, source_extents=[None, (9.5, 4)])
            with pytest.raises(ValueError, match="source_extents"):
                dispatch.upsample_argmax(torch.rand(3, 4, 4), (8, 8), source_extents=(0, 2))
            with pytest.raises(ValueError, match="source_extent"):
                dispatch.query_argmax(torch.rand(3, 4, 4), torch.rand(3), (8, 8), source_extent=(float("nan"), 2))
