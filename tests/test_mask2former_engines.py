"""Mask2Former on the CPU engines: the strict, dynamic-shape export of our reference verified by an
engine at three sizes (``maskformer export`` on a Mask2Former checkpoint), and
``Mask2FormerForUniversalSegmentation.from_pretrained(ckpt, engine="onnxruntime" | "openvino")``
behind the torch model's call and outputs, through ``maskformer segment --engine`` and the
processor's three post-processings; the refusals name the fix.

One export per engine cache entry: the session's checkpoint is exported once by ``maskformer
export`` (the verification test, portable) and once per engine by the engine cache (where the
engine can run our deformable-attention operation, its export writes it, so the engines do not
share a file), each 1-3 minutes on a shared 2-core CPU."""
import importlib.util
import json
import os
import re

import pytest
import torch

from maskformer import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, Mask2FormerModel
from maskformer.engines import EngineModel, EngineUnavailableError, engine_unavailable
from maskformer.export import OUTPUT_FIELDS, REL_ERROR_BAR, export_onnx
from maskformer.outputs import Mask2FormerForUniversalSegmentationOutput

from hf_oracle import make_hf_mask2former, msda_onnx_graph

HAVE = {name: engine_unavailable(name) is None for name in ("onnxruntime", "openvino")}
ENGINE_PARAMS = [pytest.param(name, marks=pytest.mark.skipif(not HAVE[name], reason=str(engine_unavailable(name))))
                 for name in ("onnxruntime", "openvino")]
needs_an_engine = pytest.mark.skipif(not any(HAVE.values()), reason="neither onnxruntime nor openvino is installed")


@pytest.fixture(scope="session")
def m2f_checkpoint(tmp_path_factory):
    """A small perturbed Mask2Former: window 7 (the default verification sizes pad every stage),
    one Swin block per stage but two in stage 2 (the second one shifted, with its window mask), 2
    deformable encoder layers, 3 masked-attention layers (every scale once), 6 queries, 5 classes."""
    folder = tmp_path_factory.mktemp("m2f_engine_ckpt")
    make_hf_mask2former(window_size=7, depths=(1, 2, 1, 1), num_queries=6).save_pretrained(folder)
    return str(folder)


def load(checkpoint, engine, engine_cache, cls=Mask2FormerForUniversalSegmentation, **kwargs):
    return cls.from_pretrained(checkpoint, engine=engine, engine_cache_dir=engine_cache, **kwargs)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@needs_an_engine
def test_export_command_writes_a_mask2former_export_verified_at_three_sizes(m2f_checkpoint, tmp_path, capsys):
    """``maskformer export`` on a Mask2Former checkpoint: strict torch.export with dynamic batch,
    height and width, verified by an engine at the three default sizes (one a batch of 2, every
    Swin stage padded in each) against PyTorch, within the bar, maps equal."""
    import onnx

    from maskformer.cli import main

    out, report_file = tmp_path / "m2f.onnx", tmp_path / "report.json"
    assert main(["export", m2f_checkpoint, str(out), "--json", str(report_file)]) == 0, capsys.readouterr().err
    report = json.loads(report_file.read_text())
    assert report["ok"] and len(report["rows"]) >= 3
    assert any(r["size"][0] == 2 for r in report["rows"])
    for row in report["rows"]:
        assert row["padded_stages"] == [1, 2, 3, 4], row
        assert row["max_rel_error"] <= row["bar"] and row["maps_agree"] >= 0.999, row
    proto = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_FIELDS)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"], dims
    assert "verified with" in capsys.readouterr().out
    # The other engine runs the same file at sizes the verification did not use.
    other = [name for name in ("openvino", "onnxruntime") if HAVE[name] and name != report["verify_engine"]]
    if other:
        from maskformer.export import verify_onnx

        model = Mask2FormerForUniversalSegmentation.from_pretrained(m2f_checkpoint)
        rows = verify_onnx(model, str(out), [(1, 64, 64), (3, 45, 77), (1, 200, 33)], engine=other[0])
        assert all(r["ok"] and r["maps_agree"] >= 0.999 for r in rows), rows


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_engine_model_is_a_drop_in_for_the_torch_mask2former(m2f_checkpoint, engine_cache, engine):
    model = load(m2f_checkpoint, engine, engine_cache)
    torch_model = Mask2FormerForUniversalSegmentation.from_pretrained(m2f_checkpoint)
    assert isinstance(model, EngineModel) and model.engine == engine
    assert model.config.to_dict() == torch_model.config.to_dict()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 96, "longest_edge": 200})
    gen = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, 90, 130), dtype=torch.uint8, generator=gen) for _ in range(2)]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = torch_model(**inputs)
    out = model(**inputs)
    assert isinstance(out, Mask2FormerForUniversalSegmentationOutput)
    assert list(out.keys()) == list(ref.keys()) == list(OUTPUT_FIELDS)
    for name in OUTPUT_FIELDS:
        assert out[name].dtype == torch.float32 and out[name].shape == ref[name].shape, name
        assert rel_err(out[name], ref[name]) <= REL_ERROR_BAR, (name, rel_err(out[name], ref[name]))
    sizes = [(90, 130)] * 2
    maps = processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    ref_maps = processor.post_process_semantic_segmentation(ref, target_sizes=sizes)
    agree = sum(int((a == b).sum()) for a, b in zip(maps, ref_maps)) / sum(m.numel() for m in ref_maps)
    assert agree >= 0.999, agree
    # Random small decoders give every query the same class (one or two labels per semantic map),
    # so the per-query binary masks, which do vary, are compared too.
    binary, ref_binary = out.masks_queries_logits > 0, ref.masks_queries_logits > 0
    assert 0.01 < float(ref_binary.float().mean()) < 0.99  # both values, thousands of each
    assert float((binary == ref_binary).float().mean()) >= 0.999
    for task in ("panoptic", "instance"):
        got = getattr(processor, f"post_process_{task}_segmentation")(out, target_sizes=sizes)
        assert len(got) == 2 and got[0]["segmentation"].shape == (90, 130)
    if engine == "openvino":
        from maskformer.engines import openvino_engine

        # Where the extension loads (CI builds it), OpenVINO runs our deformable attention, and
        # the entry says so; the portable formulation (GridSample) is gone from its graph.
        path, why = openvino_engine.msda_extension()
        assert path is not None, why
        ops = {op.get_type_name() for op in model.runner.model.get_ops()}
        assert model.runner.deformable_attention == "openvino-extension"
        assert openvino_engine.MSDA_OP in ops and "GridSample" not in ops, sorted(ops)
        manifest = json.loads(open(os.path.join(model.cache_entry, "manifest.json")).read())
        assert manifest["export_options"]["deformable_attention"] == "openvino-extension"
    if engine == "onnxruntime":
        from maskformer.engines import onnxruntime_engine

        # Where onnxruntime-extensions is installed (CI installs it), ONNX Runtime runs our C++
        # kernel as the node, and the entry says so; no GridSample is left in its file.
        path, why = onnxruntime_engine.msda_custom_op()
        assert path is not None, why
        assert model.runner.deformable_attention == "onnxruntime-extensions"
        import onnx

        proto = onnx.load(model.runner.path, load_external_data=False)
        ops = {(n.domain, n.op_type) for n in proto.graph.node}
        assert ("com.maskformer", "MultiScaleDeformableAttention") in ops and ("", "GridSample") not in ops, sorted(ops)
        manifest = json.loads(open(os.path.join(model.cache_entry, "manifest.json")).read())
        assert manifest["export_options"]["deformable_attention"] == "onnxruntime-extensions"
    with pytest.raises(ValueError, match="output_auxiliary_logits=True needs engine='torch'"):
        model(inputs["pixel_values"], output_auxiliary_logits=True)
    with pytest.raises(ValueError, match="smaller than the 33x33"):
        model(torch.randn(1, 3, 32, 64))


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_segment_with_an_engine_gives_the_torch_maps_on_mask2former(m2f_checkpoint, engine_cache, engine, tmp_path,
                                                                    monkeypatch):
    """``segment_folder(..., engine=)`` (what ``maskformer segment --engine`` calls) on a
    Mask2Former checkpoint: the family's processor, the engine's logits, the torch engine's maps."""
    import numpy as np
    from PIL import Image

    from maskformer.segment import segment_folder
    from maskformer.synthetic import make_sample

    monkeypatch.setenv("MASKFORMER_ENGINE_CACHE", engine_cache)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        make_sample(200 + i, 120, 160)[0].save(src / f"img{i}.png")
    maps = {}
    for name in ("torch", engine):
        segment_folder([str(src)], out_dir=str(tmp_path / name), model=m2f_checkpoint, engine=name, progress=False,
                       color_map=False)
        maps[name] = [np.asarray(Image.open(tmp_path / name / f"img{i}.png.label.png")) for i in range(2)]
    agree = np.mean([(a == b).mean() for a, b in zip(maps["torch"], maps[engine])])
    assert agree >= 0.999, agree


def test_engines_refuse_the_model_without_heads_and_the_export_too(m2f_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="serves the models with heads.*load Mask2FormerModel with engine='torch'"):
        load(m2f_checkpoint, "onnxruntime", str(tmp_path), cls=Mask2FormerModel)
    base = Mask2FormerModel.from_pretrained(m2f_checkpoint)
    with pytest.raises(TypeError, match="Mask2FormerForUniversalSegmentation .the models with heads., got Mask2FormerModel"):
        export_onnx(base, tmp_path / "base.onnx")
    assert os.listdir(tmp_path) == []


def test_missing_engine_is_refused_with_the_install_command_for_mask2former(monkeypatch, m2f_checkpoint, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    for engine, extra in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        with pytest.raises(EngineUnavailableError, match=re.escape(f"pip install 'maskformer[{extra}]'")):
            load(m2f_checkpoint, engine, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_info_lists_the_engines_for_both_families():
    from maskformer.cli import info

    families = info()["model_families"]
    for family in ("maskformer", "mask2former"):
        assert "engines torch, onnxruntime, openvino" in families[family], families[family]


@pytest.mark.skipif(not HAVE["onnxruntime"], reason=str(engine_unavailable("onnxruntime")))
def test_bench_runs_mask2former_engine_rows_and_the_peer(tmp_path, engine_cache):
    """``maskformer bench --models m2f-toy``: our ONNX Runtime engine row, the peer (transformers'
    Mask2Former exported by torch.onnx, run by ONNX Runtime, transformers' post-processing) and the
    raw engine row, interleaved, maps compared with our fp32 reference, paired ratios."""
    import subprocess
    import sys

    impls = "maskformer-reference,maskformer-onnxruntime,transformers-onnx-onnxruntime,onnxruntime-raw"
    result = subprocess.run(
        [sys.executable, "-m", "maskformer", "bench", "--models", "m2f-toy", "--batches", "1", "--rounds", "2",
         "--dtypes", "float32", "--impls", impls, "--threads", "1", "--pause", "0", "--out", str(tmp_path),
         "--engine-cache", engine_cache],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    [json_name] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    report = json.load(open(tmp_path / json_name))
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == set(impls.split(",")), report["rows"]
    assert all(r["model"] == "mask2former-swin-toy" for r in rows.values())
    for impl in ("maskformer-onnxruntime", "transformers-onnx-onnxruntime"):
        assert rows[impl]["agree"] >= 0.999, rows[impl]
    assert rows["onnxruntime-raw"]["forward_only"]
    [group] = report["groups"]
    assert ("maskformer-onnxruntime", "transformers-onnx-onnxruntime") in {
        (p["faster"], p["slower"]) for p in group["paired_end_to_end"]}


def test_exported_sampling_formulation_equals_the_reference():
    """``ms_deform_attn_for_engines`` (what the export writes: each level weighted and summed on
    its own) computes the reference's sums in another order: equal in float64 to rounding, on odd
    level sizes, a batch of 2, points outside every map (zero padding) and unnormalised weights."""
    from maskformer.kernels.ms_deform_attn import ms_deform_attn_ref
    from maskformer.msda_pixel_decoder import ms_deform_attn_for_engines

    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (9, 13), (17, 25)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(2, s, 4, 8, generator=gen, dtype=torch.float64)
    locations = torch.rand(2, 11, 4, 3, 4, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 11, 4, 3, 4, generator=gen, dtype=torch.float64)
    got, want = ms_deform_attn_for_engines(value, shapes, locations, weights), ms_deform_attn_ref(value, shapes, locations,
                                                                                                   weights)
    assert got.shape == want.shape == (2, 11, 32)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    assert float(want.abs().max()) > 0.1  # not a trivially zero output


@pytest.mark.skipif(not HAVE["openvino"], reason=str(engine_unavailable("openvino")))
def test_openvino_extension_choice_is_in_the_cache_key_and_can_be_switched_off(m2f_checkpoint, monkeypatch, tmp_path):
    """The extension's export is another graph: another cache key than the portable one (which
    MASKFORMER_OPENVINO_MSDA=0 asks for); MaskFormer has no
    deformable attention, so its key does not depend on the extension."""
    from maskformer.engines import cache, openvino_engine, onnxruntime_engine
    from maskformer.config import Mask2FormerConfig

    def key(module):
        return cache.compute_key(m2f_checkpoint, module.NAME, module, str(tmp_path), config_class=Mask2FormerConfig)

    with_ext, parts, config = key(openvino_engine)
    assert parts["export_options"]["deformable_attention"] == "openvino-extension"
    monkeypatch.setenv("MASKFORMER_OPENVINO_MSDA", "0")
    assert openvino_engine.msda_extension() == (None, "MASKFORMER_OPENVINO_MSDA=0")
    without, parts_off, _ = key(openvino_engine)
    assert without != with_ext and "export_options" not in parts_off
    assert "the portable formulation" in openvino_engine.notes()


@pytest.mark.skipif(not HAVE["openvino"], reason=str(engine_unavailable("openvino")))
def test_export_with_the_extension_is_refused_where_it_cannot_run(m2f_checkpoint, monkeypatch, tmp_path):
    from maskformer import MaskFormerForInstanceSegmentation
    from maskformer.engines import openvino_engine

    from hf_oracle import make_hf_model

    model = Mask2FormerForUniversalSegmentation.from_pretrained(m2f_checkpoint)
    with pytest.raises(ValueError, match="deformable_attention must be one of 'portable', 'openvino-extension'"):
        export_onnx(model, tmp_path / "a.onnx", deformable_attention="fast")
    with pytest.raises(ValueError, match="cannot be verified with onnxruntime"):
        export_onnx(model, tmp_path / "a.onnx", deformable_attention="openvino-extension", verify_engine="onnxruntime")
    folder = tmp_path / "mf"
    make_hf_model().save_pretrained(folder)
    with pytest.raises(ValueError, match="for Mask2Former models"):
        export_onnx(MaskFormerForInstanceSegmentation.from_pretrained(folder), tmp_path / "b.onnx",
                    deformable_attention="openvino-extension")
    monkeypatch.setenv("MASKFORMER_OPENVINO_MSDA", "0")
    with pytest.raises(RuntimeError, match="needs maskformer's OpenVINO extension.*MASKFORMER_OPENVINO_MSDA=0.*"
                                           "deformable_attention='portable'"):
        export_onnx(model, tmp_path / "a.onnx", deformable_attention="openvino-extension")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


@pytest.mark.skipif(not HAVE["openvino"], reason=str(engine_unavailable("openvino")))
def test_a_graph_with_our_operation_without_the_extension_names_the_fix(monkeypatch, tmp_path):
    from maskformer.engines import openvino_engine

    path = tmp_path / "m.onnx"
    path.write_bytes(msda_onnx_graph())
    monkeypatch.setenv("MASKFORMER_OPENVINO_MSDA", "0")
    with pytest.raises(RuntimeError, match="needs maskformer's OpenVINO extension.*MASKFORMER_OPENVINO_MSDA=0"):
        openvino_engine.Runner.from_onnx(str(path), threads=1)


needs_ort_op = pytest.mark.skipif(not HAVE["onnxruntime"] or importlib.util.find_spec("onnxruntime_extensions") is None,
                                  reason="onnxruntime or onnxruntime-extensions is not installed")


@needs_ort_op
def test_onnxruntime_op_choice_is_in_the_cache_key_and_can_be_switched_off(m2f_checkpoint, monkeypatch, tmp_path):
    """ONNX Runtime's export with our operation is another graph than the portable one
    (MASKFORMER_ONNXRUNTIME_MSDA=0): another key; a rebuilt C++ kernel is part of it."""
    from maskformer.engines import cache, onnxruntime_engine
    from maskformer.config import Mask2FormerConfig

    def key():
        return cache.compute_key(m2f_checkpoint, "onnxruntime", onnxruntime_engine, str(tmp_path),
                                 config_class=Mask2FormerConfig)

    with_op, parts, _ = key()
    options = parts["export_options"]
    assert options["deformable_attention"] == "onnxruntime-extensions"
    assert re.fullmatch(r"[0-9a-f]{64}", options["cpp_extension_sha256"]) and options["onnxruntime_extensions"]
    assert "maskformer's C++ kernel as an onnxruntime-extensions Python op" in onnxruntime_engine.notes()
    monkeypatch.setenv("MASKFORMER_ONNXRUNTIME_MSDA", "0")
    assert onnxruntime_engine.msda_custom_op() == (None, "MASKFORMER_ONNXRUNTIME_MSDA=0")
    without, parts_off, _ = key()
    assert without != with_op and "export_options" not in parts_off
    assert "the portable formulation (maskformer's op: MASKFORMER_ONNXRUNTIME_MSDA=0)" in onnxruntime_engine.notes()


@needs_ort_op
def test_onnxruntime_op_export_is_refused_where_it_cannot_run(m2f_checkpoint, monkeypatch, tmp_path):
    model = Mask2FormerForUniversalSegmentation.from_pretrained(m2f_checkpoint)
    with pytest.raises(ValueError, match="runs only on onnxruntime .*cannot be verified with openvino"):
        export_onnx(model, tmp_path / "a.onnx", deformable_attention="onnxruntime-extensions", verify_engine="openvino")
    monkeypatch.setenv("MASKFORMER_ONNXRUNTIME_MSDA", "0")
    with pytest.raises(RuntimeError, match="needs onnxruntime-extensions and maskformer's C\\+\\+ extension.*"
                                           "MASKFORMER_ONNXRUNTIME_MSDA=0.*deformable_attention='portable'"):
        export_onnx(model, tmp_path / "a.onnx", deformable_attention="onnxruntime-extensions")
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.skipif(not HAVE["onnxruntime"], reason=str(engine_unavailable("onnxruntime")))
def test_onnxruntime_file_with_our_operation_without_the_op_names_the_fix(monkeypatch, tmp_path):
    from maskformer.engines import onnxruntime_engine

    path = tmp_path / "m.onnx"
    path.write_bytes(msda_onnx_graph(first_input="pixel_values"))
    monkeypatch.setenv("MASKFORMER_ONNXRUNTIME_MSDA", "0")
    with pytest.raises(RuntimeError, match="uses maskformer's deformable-attention operation.*onnxruntime-extensions.*"
                                           "MASKFORMER_ONNXRUNTIME_MSDA=0.*deformable_attention='portable'"):
        onnxruntime_engine.Runner.from_onnx(str(path), threads=1)
