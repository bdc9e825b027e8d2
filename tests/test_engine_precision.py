"""Precision on the CPU engines: ``from_pretrained(..., engine=, dtype=)``. OpenVINO computes in
bf16 where its CPU device lists BF16, float32 with a warning naming the missing flag elsewhere,
and always has its precision set (its own default is bf16 on such CPUs); ONNX Runtime refuses
what it cannot compute, naming the alternative; one export serves every precision; segment and
info say what runs."""
import os
import warnings

import pytest
import torch

from maskformer import MaskFormerForInstanceSegmentation
from maskformer.engines import PrecisionWarning, engine_unavailable, precision_plan
from maskformer.engines import precision as engine_precision

HAVE = {name: engine_unavailable(name) is None for name in ("onnxruntime", "openvino")}
needs_openvino = pytest.mark.skipif(not HAVE["openvino"], reason=str(engine_unavailable("openvino")))
needs_onnxruntime = pytest.mark.skipif(not HAVE["onnxruntime"], reason=str(engine_unavailable("onnxruntime")))


def load(checkpoint, engine, engine_cache, **kwargs):
    return MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine=engine, engine_cache_dir=engine_cache,
                                                             **kwargs)


def _hint(compiled):
    from maskformer.engines.openvino_engine import precision_of

    return precision_of(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _bf16_native_for_openvino():
    from maskformer.engines.openvino_engine import cpu_capabilities

    return "BF16" in cpu_capabilities()


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    """This process sees a CPU without avx512_bf16/AMX: OpenVINO's device lists no BF16 and
    /proc/cpuinfo's flags lack them."""
    from maskformer.engines import openvino_engine

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda: ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    real = engine_precision.cpu_lacks
    monkeypatch.setattr(engine_precision, "cpu_lacks",
                        lambda p: "needs avx512_bf16 or amx_bf16 (bf16 dot products)" if p == "bfloat16" else real(p))


@needs_openvino
def test_openvino_bf16_computes_in_bf16_from_the_same_export(engine_checkpoint, engine_cache, monkeypatch):
    if not _bf16_native_for_openvino():
        pytest.skip("this CPU has no native bf16 (no avx512_bf16/AMX): the fall-back is tested with no_bf16_cpu")
    from maskformer.engines import export

    f32 = load(engine_checkpoint, "openvino", engine_cache)
    # bf16 is a compile setting of the same entry: no second export, no second entry
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: pytest.fail("exported again for bf16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        bf16 = load(engine_checkpoint, "openvino", engine_cache, dtype=torch.bfloat16)
    assert bf16.cache_entry == f32.cache_entry
    assert bf16.precision == torch.bfloat16 and f32.precision == torch.float32
    assert "precision=bfloat16" in repr(bf16)
    x = torch.randn(1, 3, 96, 128)
    shape = tuple(x.shape)
    assert _hint(bf16.runner.compiled_for(shape)) == "bfloat16"
    assert _hint(f32.runner.compiled_for(shape)) == "float32"
    a, b = f32(x), bf16(x)
    for name in ("class_queries_logits", "masks_queries_logits"):
        assert b[name].dtype == torch.float32 and b[name].shape == a[name].shape
        err = float((b[name] - a[name]).abs().max() / a[name].abs().max())
        # really computed in bf16 (8-bit mantissa: a relative error well above float32's ~1e-6 on
        # this model), and still the same model (below 10%)
        assert 1e-4 < err < 0.1, (name, err)
    # each precision's compiled blob is its own file, named by it
    blobs = os.listdir(os.path.join(f32.cache_entry, "compiled"))
    prefix = "x".join(map(str, shape))
    assert any(n.startswith(f"{prefix}-bf16-") for n in blobs) and any(n.startswith(f"{prefix}-f32-") for n in blobs)
    # a fresh load reads its own precision's blob back, checked
    again = load(engine_checkpoint, "openvino", engine_cache, dtype="bfloat16")
    assert _hint(again.runner.compiled_for(shape)) == "bfloat16"
    assert torch.equal(again(x).masks_queries_logits, b.masks_queries_logits)
    # .to() accepts what it is and refuses another precision, naming how to get it
    assert bf16.to(torch.bfloat16) is bf16 and bf16.to(torch.float32) is bf16
    with pytest.raises(ValueError, match=r"computes in bfloat16.*dtype=torch.float16"):
        bf16.to(torch.float16)


@needs_openvino
def test_openvino_float32_is_set_explicitly_and_checked(engine_checkpoint, engine_cache):
    from maskformer.engines import openvino_engine

    assert openvino_engine.compile_config(2)["INFERENCE_PRECISION_HINT"] == "f32"
    assert openvino_engine.compile_config(2, "bfloat16")["INFERENCE_PRECISION_HINT"] == "bf16"
    model = load(engine_checkpoint, "openvino", engine_cache)
    compiled = model.runner.compiled_for((1, 3, 64, 64))
    assert _hint(compiled) == "float32"
    # OpenVINO silently replacing the hint (f16 became bf16 on a Zen 4) is caught, not served
    with pytest.raises(RuntimeError, match="compiled the model in float32, not the bfloat16 asked for"):
        openvino_engine.check_compiled_precision(compiled, "bfloat16")
    facts = openvino_engine.precision_facts()
    assert openvino_engine.default_precision() in facts["default_precision"]
    assert "FP32" in facts["cpu_capabilities"]


@needs_openvino
def test_openvino_without_native_bf16_runs_float32_and_says_why(engine_checkpoint, engine_cache, no_bf16_cpu):
    with pytest.warns(PrecisionWarning, match=r"avx512_bf16.*running float32 instead"):
        model = load(engine_checkpoint, "openvino", engine_cache, dtype=torch.bfloat16)
    assert model.precision == torch.float32
    assert _hint(model.runner.compiled_for((1, 3, 64, 64))) == "float32"
    plan = precision_plan("openvino", "bfloat16")
    assert (plan.requested, plan.runs) == ("bfloat16", "float32") and "lists no BF16" in plan.note


@needs_openvino
def test_openvino_float16_is_refused_where_the_cpu_lists_no_fp16(engine_checkpoint, engine_cache, tmp_path):
    from maskformer.engines.openvino_engine import cpu_capabilities

    if "FP16" in cpu_capabilities():
        assert precision_plan("openvino", torch.float16).runs == "float16"
        return
    with pytest.raises(ValueError, match=r"cannot compute dtype='float16' here.*lists no FP16.*dtype='float32'"):
        load(engine_checkpoint, "openvino", str(tmp_path), dtype=torch.float16)
    assert os.listdir(tmp_path) == []  # refused before the cache was touched


@needs_onnxruntime
def test_onnxruntime_refuses_reduced_precision_naming_the_alternative(engine_checkpoint, tmp_path):
    for dtype, why in ((torch.bfloat16, "no bfloat16 kernels"), (torch.float16, "float16 copy")):
        with pytest.raises(ValueError, match=rf"computes in float32 only, not dtype='{str(dtype)[6:]}'.*{why}.*engine='(openvino|torch)'"):
            load(engine_checkpoint, "onnxruntime", str(tmp_path), dtype=dtype)
    assert os.listdir(tmp_path) == []  # refused before the export
    from maskformer.engines import onnxruntime_engine

    with pytest.raises(ValueError, match="float32 only"):
        onnxruntime_engine.Runner.from_onnx("unused.onnx", 1, precision="bfloat16")


def test_precision_names():
    assert engine_precision.precision_name(None) == engine_precision.precision_name("auto") == "float32"
    assert engine_precision.precision_name(torch.bfloat16) == engine_precision.precision_name("torch.bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="one of float32, bfloat16, float16"):
        engine_precision.precision_name(torch.float64)
    assert precision_plan("torch", torch.float16).runs == "float16"


@needs_openvino
def test_segment_folder_with_openvino_bf16(engine_checkpoint, engine_cache, tmp_path, monkeypatch):
    from maskformer import segment_folder
    from maskformer.synthetic import make_sample

    monkeypatch.setenv("MASKFORMER_ENGINE_CACHE", engine_cache)
    src = tmp_path / "in"
    src.mkdir()
    make_sample(7, 120, 160)[0].save(src / "a.png")
    summary = segment_folder([str(src)], model=engine_checkpoint, out_dir=str(tmp_path / "out"), engine="openvino",
                             dtype="bfloat16", threads=1, progress=False)
    assert len(summary.done) == 1 and not summary.failed and (tmp_path / "out" / "a.png.label.png").exists()
    fell_back = [n for n in summary.notes if "running float32 instead" in n]
    assert bool(fell_back) != _bf16_native_for_openvino(), summary.notes


@needs_openvino
def test_segment_command_with_openvino_bf16(engine_checkpoint, engine_cache, tmp_path):
    """The command's wiring: --engine openvino --dtype bfloat16 runs, and says so where it falls back."""
    import subprocess
    import sys

    from maskformer.synthetic import make_sample

    src = tmp_path / "in"
    src.mkdir()
    make_sample(9, 120, 160)[0].save(src / "a.png")
    result = subprocess.run([sys.executable, "-m", "maskformer", "segment", str(src), "--model", engine_checkpoint,
                             "--out", str(tmp_path / "out"), "--engine", "openvino", "--dtype", "bfloat16", "--threads",
                             "1", "--quiet"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MASKFORMER_ENGINE_CACHE=engine_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "a.png.label.png").exists()
    assert ("running float32 instead" in result.stderr) != _bf16_native_for_openvino(), result.stderr[-2000:]


@needs_openvino
def test_segment_folder_notes_the_float32_fall_back(engine_checkpoint, engine_cache, tmp_path, monkeypatch,
                                                    no_bf16_cpu):
    from maskformer import segment_folder
    from maskformer.synthetic import make_sample

    monkeypatch.setenv("MASKFORMER_ENGINE_CACHE", engine_cache)
    src = tmp_path / "in"
    src.mkdir()
    make_sample(8, 120, 160)[0].save(src / "a.png")
    summary = segment_folder([str(src)], model=engine_checkpoint, out_dir=str(tmp_path / "out"), engine="openvino",
                             dtype="bfloat16", threads=1, progress=False)
    assert len(summary.done) == 1 and not summary.failed
    assert any("avx512_bf16" in n and "running float32 instead" in n for n in summary.notes), summary.notes


def test_info_reports_native_precisions_and_each_engines():
    from maskformer.cli import info

    report = info()
    native = report["cpu"]["native_precisions"]
    assert set(native) == {"float32", "bfloat16", "float16", "int8"}
    assert native["float32"].startswith("native")
    for line in native.values():
        assert line.startswith(("native (", "not native: ")), line
    engines = report["engine_precisions"]
    assert set(engines) == {"onnxruntime", "openvino"}
    for name, value in engines.items():
        if not HAVE[name]:
            assert isinstance(value, str)
            continue
        assert value["float32"] == "runs float32"
        assert set(engine_precision.PRECISIONS) <= set(value)
    if HAVE["onnxruntime"]:
        assert engines["onnxruntime"]["bfloat16"].startswith("refused: ")
    if HAVE["openvino"]:
        assert "default_precision" in engines["openvino"] and "cpu_capabilities" in engines["openvino"]
        expected = "runs bfloat16 natively" if _bf16_native_for_openvino() else "runs float32 instead, with a warning"
        assert engines["openvino"]["bfloat16"].startswith(expected), engines["openvino"]["bfloat16"]


def test_bench_rows_run_the_precisions_the_engines_compute_in(monkeypatch):
    """An engine row at bf16 runs only where the engine computes bf16 here; ONNX Runtime's is
    listed as not run with its reason; the default-precision peer is one row; reduced-precision
    rows are paired with the peers by their own names."""
    from maskformer import bench

    assert bench.row_dtypes("maskformer-fast", ["float32", "bfloat16"], "cpu") == (["float32", "bfloat16"], {})
    assert bench.row_dtypes(bench.PEER_DEFAULT, ["float32", "bfloat16"], "cpu") == (["default"], {})
    if HAVE["onnxruntime"]:
        runs, skipped = bench.row_dtypes("maskformer-onnxruntime", ["float32", "bfloat16"], "cpu")
        assert runs == ["float32"] and "float32 only" in skipped["maskformer-onnxruntime/bfloat16"]
    if HAVE["openvino"]:
        runs, skipped = bench.row_dtypes("maskformer-openvino", ["float32", "bfloat16"], "cpu")
        assert runs == (["float32", "bfloat16"] if _bf16_native_for_openvino() else ["float32"])
        from maskformer.engines import openvino_engine

        monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda: ("FP32", "INT8"))
        runs, skipped = bench.row_dtypes("openvino-raw", ["float32", "bfloat16"], "cpu")
        assert runs == ["float32"] and "running float32 instead" in skipped["openvino-raw/bfloat16"]
    labels = [bench.row_label(*k.split("/")) for k in ("maskformer-openvino/float32", "maskformer-openvino/bfloat16",
                                                       "openvino-raw/bfloat16", f"{bench.PEER_DEFAULT}/default")]
    assert labels == ["maskformer-openvino", "maskformer-openvino/bfloat16", "openvino-raw/bfloat16", bench.PEER_DEFAULT]
    e2e, forward = bench.comparison_pairs(labels)
    assert ("maskformer-openvino/bfloat16", bench.PEER_DEFAULT) in e2e
    assert ("maskformer-openvino/bfloat16", "openvino-raw/bfloat16") in forward
    assert ("maskformer-openvino", "openvino-raw/bfloat16") not in forward


@needs_openvino
def test_bench_command_with_bf16_engine_rows(tmp_path, engine_cache):
    """``maskformer bench --dtype float32,bfloat16`` runs OpenVINO at bf16 and the peer at
    OpenVINO's default precision, each with its agreement against our fp32 maps."""
    import json
    import subprocess
    import sys

    if not _bf16_native_for_openvino():
        pytest.skip("this CPU has no native bf16: the bf16 engine rows are not run (test_bench_rows_...)")
    impls = f"maskformer-openvino,{bench_peer()},openvino-raw"
    result = subprocess.run(
        [sys.executable, "-m", "maskformer", "bench", "--models", "toy", "--batches", "1", "--rounds", "1",
         "--dtype", "float32,bfloat16", "--impls", impls, "--threads", "1", "--pause", "0", "--out", str(tmp_path),
         "--name", "prec", "--engine-cache", engine_cache],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "prec.json"))
    rows = {(r["impl"], r["dtype"]): r for r in report["rows"]}
    assert set(rows) == {("maskformer-openvino", "float32"), ("maskformer-openvino", "bfloat16"),
                         (bench_peer(), "default"), ("openvino-raw", "float32"), ("openvino-raw", "bfloat16")}
    from maskformer.engines.openvino_engine import default_precision

    assert rows[(bench_peer(), "default")]["computes_in"] == default_precision()
    for (impl, dtype), row in rows.items():
        assert row["computes_in"] == (default_precision() if dtype == "default" else dtype), row
        if impl != "openvino-raw":
            assert row["agree_bar"] == (0.999 if dtype == "float32" else 0.995) and 0 < row["agree"] <= 1
    [group] = report["groups"]
    assert any(p["faster"] == "maskformer-openvino/bfloat16" and p["slower"] == bench_peer()
               for p in group["paired_end_to_end"])
    assert f"| {bench_peer()} | default ({default_precision()}) |" in open(tmp_path / "prec.md").read()


def bench_peer():
    from maskformer import bench

    return bench.PEER_DEFAULT
