"""Engines: from_pretrained(path, engine="onnxruntime" | "openvino") behind the torch model's call
signature and outputs; the cache (built once, reused, rebuilt when stale or torn); threads;
refusals; no copies between the engine and our post-processing; the extras pull no torch."""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil

import pytest
import torch

from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, dispatch
from maskformer.engines import EngineModel, EngineUnavailableError, cache, describe, engine_unavailable
from maskformer.export import OUTPUT_FIELDS, REL_ERROR_BAR

from hf_oracle import make_hf_model

HAVE = {name: engine_unavailable(name) is None for name in ("onnxruntime", "openvino")}
ENGINE_PARAMS = [pytest.param(name, marks=pytest.mark.skipif(not HAVE[name], reason=str(engine_unavailable(name))))
                 for name in ("onnxruntime", "openvino")]


@pytest.fixture
def checkpoint(engine_checkpoint):
    return engine_checkpoint


def load(checkpoint, engine, engine_cache, **kwargs):
    return MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine=engine, engine_cache_dir=engine_cache,
                                                             **kwargs)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_engine_model_is_a_drop_in_for_the_torch_model(checkpoint, engine_cache, engine):
    model = load(checkpoint, engine, engine_cache)
    torch_model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint)
    assert isinstance(model, EngineModel) and model.eval() is model and model.engine == engine
    assert model.config.to_dict() == torch_model.config.to_dict()
    processor = MaskFormerImageProcessor(size={"shortest_edge": 96, "longest_edge": 200})
    images = [torch.randint(0, 256, (3, 90, 130), dtype=torch.uint8) for _ in range(2)]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = torch_model(**inputs)
    out = model(**inputs)
    assert list(out.keys()) == list(ref.keys()) == list(OUTPUT_FIELDS)
    for name in OUTPUT_FIELDS:
        assert out[name].dtype == torch.float32 and out[name].shape == ref[name].shape, name
        assert rel_err(out[name], ref[name]) <= REL_ERROR_BAR, name
    as_tuple = model(inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(OUTPUT_FIELDS)
    sizes = [(90, 130)] * 2
    # the processor's three post-processings take the engine's output unchanged
    maps = processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    ref_maps = processor.post_process_semantic_segmentation(ref, target_sizes=sizes)
    agree = sum(int((a == b).sum()) for a, b in zip(maps, ref_maps)) / sum(m.numel() for m in ref_maps)
    assert agree >= 0.999
    assert dispatch.last_dispatch("semantic_segmentation").backend in ("cpp", "reference")
    for task in ("panoptic", "instance"):
        got = getattr(processor, f"post_process_{task}_segmentation")(out, target_sizes=sizes)
        assert len(got) == 2 and got[0]["segmentation"].shape == (90, 130)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_engine_checks_inputs_and_refuses_what_it_cannot_do(checkpoint, engine_cache, engine):
    model = load(checkpoint, engine, engine_cache)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="loss needs engine='torch'"):
        model(x, mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.zeros(1, dtype=torch.long)])
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{flag}=True needs engine='torch'"):
            model(x, **{flag: True})
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="4 dimensions"):
        model(x[0])
    with pytest.raises(ValueError, match="smaller than"):
        model(torch.randn(1, 3, 20, 64))
    with pytest.raises(ValueError, match="an engine computes in one of float32, bfloat16, float16"):
        load(checkpoint, engine, engine_cache, dtype=torch.int8)
    with pytest.raises(ValueError, match="runs on the CPU"):
        load(checkpoint, engine, engine_cache, device="cuda")
    with pytest.raises(ValueError, match="train with engine='torch'"):
        model.train()
    with pytest.raises(ValueError, match="MaskFormerForInstanceSegmentation"):
        from maskformer import MaskFormerModel

        MaskFormerModel.from_pretrained(checkpoint, engine=engine, engine_cache_dir=engine_cache)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_engine_threads_default_to_torch_and_are_applied(checkpoint, engine_cache, engine):
    model = load(checkpoint, engine, engine_cache)
    assert model.threads == torch.get_num_threads()
    one = load(checkpoint, engine, engine_cache, threads=1)
    assert one.threads == 1
    if engine == "onnxruntime":
        assert one.runner.session.get_session_options().intra_op_num_threads == 1
        assert model.runner.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    else:
        compiled = one.runner.compiled_for((1, 3, 64, 64))
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        # float32 set explicitly: OpenVINO's own default is bf16 on a CPU with avx512_bf16/AMX
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    with pytest.raises(ValueError, match="positive integer"):
        load(checkpoint, engine, engine_cache, threads=0)
    with pytest.raises(ValueError, match="torch.set_num_threads"):
        MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, threads=1)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_outputs_are_the_engines_buffers_not_copies(checkpoint, engine_cache, engine, monkeypatch):
    """The tensors handed to post-processing are the memory the engine wrote its outputs into."""
    model = load(checkpoint, engine, engine_cache)
    x = torch.randn(1, 3, 80, 96)
    if engine == "onnxruntime":
        bindings = []
        session = model.runner.session
        real = session.io_binding
        monkeypatch.setattr(session, "io_binding", lambda: bindings.append(real()) or bindings[-1])
        outs = model.runner.run(x)
        engine_ptrs = [v.data_ptr() for v in bindings[-1].get_outputs()]
    else:
        request = model.runner.compiled_for(tuple(x.shape)).create_infer_request()
        outs = model.runner.infer(request, x)
        engine_ptrs = [request.get_output_tensor(i).data.ctypes.data for i in range(len(outs))]
    assert [t.data_ptr() for t in outs] == engine_ptrs
    out = model(x)
    assert all(out[name].is_contiguous() for name in OUTPUT_FIELDS)
    # consecutive calls return distinct tensors (no buffer of one call is overwritten by the next)
    again = model(x)
    assert again.masks_queries_logits.data_ptr() != out.masks_queries_logits.data_ptr()
    assert torch.equal(again.masks_queries_logits, out.masks_queries_logits)


def _entries(root, engine):
    return sorted(n for n in os.listdir(root) if n.startswith(engine + "-"))


def test_cache_is_reused_rebuilt_when_torn_and_replaced_when_stale(tmp_path, monkeypatch):
    """First use builds (one export), the next load reuses it (none), a torn entry is rebuilt, and a
    changed checkpoint builds a new entry and deletes the stale one. ONNX Runtime entries; the
    OpenVINO part (when installed) rebuilds its torn entry from the ONNX Runtime entry's export."""
    if not HAVE["onnxruntime"]:
        pytest.skip(engine_unavailable("onnxruntime"))
    from maskformer.engines import export  # what the cache calls (maskformer.export is its public path)

    ckpt = tmp_path / "ckpt"
    make_hf_model(window_size=3, depths=(1, 1, 1, 1), num_queries=4).save_pretrained(ckpt)
    root = str(tmp_path / "cache")
    exports = []
    real_export = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))

    first = load(str(ckpt), "onnxruntime", root)
    [entry] = _entries(root, "onnxruntime")
    manifest = json.load(open(os.path.join(root, entry, "manifest.json")))
    assert manifest["source"] == os.path.realpath(ckpt) and manifest["engine"] == "onnxruntime"
    assert len(manifest["verification"]) >= 3
    assert max(r["max_rel_error"] for r in manifest["verification"]) <= REL_ERROR_BAR
    assert {"maskformer", "torch", "onnx", "onnxscript", "onnxruntime"} <= set(manifest["versions"])
    assert len(exports) == 1

    second = load(str(ckpt), "onnxruntime", root)
    assert len(exports) == 1 and second.cache_entry == first.cache_entry
    x = torch.randn(1, 3, 64, 72)
    assert torch.equal(second(x).masks_queries_logits, first(x).masks_queries_logits)

    if HAVE["openvino"]:  # torn: a file of the entry is missing -> rebuilt (from the ONNX Runtime entry's export)
        ov_model = load(str(ckpt), "openvino", root)
        [ov_entry] = _entries(root, "openvino")
        os.remove(os.path.join(root, ov_entry, "model.bin"))
        rebuilt = load(str(ckpt), "openvino", root)
        assert rebuilt.cache_entry == ov_model.cache_entry and os.path.isfile(os.path.join(root, ov_entry, "model.bin"))
        assert len(exports) == 1
        assert rel_err(rebuilt(x).masks_queries_logits, first(x).masks_queries_logits) <= REL_ERROR_BAR

    # stale: new weights in the same folder -> a new key; the old entry is removed
    make_hf_model(window_size=3, depths=(1, 1, 1, 1), num_queries=4, seed=5).save_pretrained(ckpt)
    third = load(str(ckpt), "onnxruntime", root)
    assert len(exports) == 2 and len(_entries(root, "onnxruntime")) == 1 and _entries(root, "onnxruntime") != [entry]
    torch_model = MaskFormerForInstanceSegmentation.from_pretrained(str(ckpt))
    with torch.no_grad():
        assert rel_err(third(x).masks_queries_logits, torch_model(x).masks_queries_logits) <= REL_ERROR_BAR


def test_cache_key_covers_weights_config_overrides_engine_and_versions(checkpoint, tmp_path, monkeypatch):
    from maskformer.engines import engine_module

    def key(engine="onnxruntime", **kwargs):
        return cache.compute_key(checkpoint, engine, engine_module(engine) if HAVE[engine] else FakeEngine, str(tmp_path),
                                 **kwargs)[0]

    class FakeEngine:
        @staticmethod
        def versions():
            return {"fake": "1"}

    base = key()
    assert key() == base  # deterministic (the remembered hashes: tests/test_engine_cache.py)
    assert key(mask_feature_size=64) != base  # a config override that shapes the graph (the checkpoint has 32)
    assert key(id2label={i: f"x{i}" for i in range(4)}) == base  # labels only: applied at load, same graph
    assert key("openvino") != base
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert key() != base


def test_other_engine_reuses_the_export(checkpoint, engine_cache, monkeypatch):
    """The second engine built for a checkpoint copies the first one's ONNX file, not a new export."""
    if not (HAVE["onnxruntime"] and HAVE["openvino"]):
        pytest.skip("needs both engines: pip install 'maskformer[onnx,openvino]'")
    from maskformer.engines import export

    load(checkpoint, "onnxruntime", engine_cache)
    for name in os.listdir(engine_cache):
        if name.startswith("openvino-"):
            shutil.rmtree(os.path.join(engine_cache, name))
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    model = load(checkpoint, "openvino", engine_cache)
    manifest = json.load(open(os.path.join(model.cache_entry, "manifest.json")))
    assert manifest["export_reused_from"].startswith(engine_cache)


def test_missing_engine_is_refused_with_the_install_command(monkeypatch, checkpoint, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    for engine, extra in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        with pytest.raises(EngineUnavailableError, match=re.escape(f"pip install 'maskformer[{extra}]'")):
            load(checkpoint, engine, str(tmp_path))
        assert describe()[engine].startswith("not usable:") and f"maskformer[{extra}]" in describe()[engine]
    assert os.listdir(tmp_path) == []  # refused before anything was built
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        load(checkpoint, "tensorrt", str(tmp_path))


def test_info_lists_the_engines():
    from maskformer.cli import info

    engines = info()["engines"]
    assert set(engines) == {"torch", "onnxruntime", "openvino"}
    for name, state in engines.items():
        assert state.startswith("usable (") == (name == "torch" or HAVE[name]), (name, state)


def _requirement_names(dist: str, extra=None):
    names = []
    for req in importlib.metadata.requires(dist) or []:
        name, _, marker = req.partition(";")
        if "extra ==" in marker and (extra is None or f'"{extra}"' not in marker):
            continue
        names.append(re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("extra", ["onnx", "openvino"])
def test_engine_extras_do_not_depend_on_torch(extra):
    """The packages of maskformer[onnx] / [openvino] and everything they require (installed here)
    never name torch: installing an extra cannot replace the CPU torch installed first."""
    todo = _requirement_names("maskformer", extra)
    todo = [n for n in todo if n not in _requirement_names("maskformer")]  # the extra's own packages
    assert todo, f"maskformer[{extra}] lists no packages"
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert not name.startswith("torch"), f"maskformer[{extra}] pulls {name}"
        try:
            todo.extend(_requirement_names(name))
        except importlib.metadata.PackageNotFoundError:
            if HAVE["onnxruntime"] or HAVE["openvino"]:
                pytest.fail(f"{name} (required by maskformer[{extra}]) is not installed")
            pytest.skip(f"{name} not installed: its requirements cannot be read")
    assert {"onnx", "onnxscript"} <= seen


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_segment_command_with_an_engine(checkpoint, engine_cache, engine, tmp_path):
    """``maskformer segment --engine`` gives the torch engine's maps (the post-processing is the
    same code; the logits agree within the export bar) and honours --threads."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from maskformer.synthetic import make_sample

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        make_sample(100 + i, 120, 160)[0].save(src / f"img{i}.png")
    env = dict(os.environ, MASKFORMER_ENGINE_CACHE=engine_cache)
    maps = {}
    for name in ("torch", engine):
        out = tmp_path / name
        result = subprocess.run([sys.executable, "-m", "maskformer", "segment", str(src), "--model", checkpoint, "--out",
                                 str(out), "--engine", name, "--threads", "1", "--quiet", "--no-color-map"],
                                capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        maps[name] = [np.asarray(Image.open(out / f"img{i}.png.label.png")) for i in range(2)]
    agree = np.mean([(a == b).mean() for a, b in zip(maps["torch"], maps[engine])])
    assert agree >= 0.999, agree
    # what the engine cannot compute in is refused before anything loads, naming the alternative
    # (--dtype bfloat16 with openvino: tests/test_engine_precision.py)
    refused, why = (("bfloat16", "--engine onnxruntime computes in float32 only, not --dtype bfloat16")
                   if engine == "onnxruntime" else ("float16", "--engine openvino cannot compute --dtype float16"))
    if engine == "openvino":
        from maskformer.engines.openvino_engine import cpu_capabilities

        if "FP16" in cpu_capabilities():
            return  # a CPU with native fp16 (AVX512-FP16/AMX-FP16): OpenVINO runs it
    bad = subprocess.run([sys.executable, "-m", "maskformer", "segment", str(src), "--model", checkpoint, "--out",
                          str(tmp_path / "refused"), "--engine", engine, "--dtype", refused],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 1 and why in bad.stderr, bad.stderr[-2000:]
