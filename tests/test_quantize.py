"""maskformer quantize: int8 OpenVINO (NNCF), written only when it keeps >= 99% of the fp32 maps'
pixels on held-out images and is faster than the other precisions; otherwise nothing is written."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from maskformer.engines import engine_unavailable

pytestmark = [
    pytest.mark.skipif(engine_unavailable("openvino") is not None, reason=str(engine_unavailable("openvino"))),
    pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="NNCF not installed: pip install maskformer[quantize] (it is in the test extras: CI runs these)"),
]


@pytest.fixture
def small_checkpoint(engine_checkpoint, tmp_path):
    """The engine checkpoint with a processor that keeps inputs small (same weights and config, so
    the same engine cache entry)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(engine_checkpoint, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MaskFormerImageProcessor", "size": {"shortest_edge": 96, "longest_edge": 160}}))
    return str(folder)


@pytest.fixture
def images(tmp_path):
    from maskformer.synthetic import make_sample

    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(4):
        make_sample(400 + i, 96, 128)[0].save(folder / f"{i}.png")
    return str(folder)


def _fake_timing(monkeypatch, ratio):
    """The timing's verdict, fixed: int8 ``ratio``x faster than each other precision."""
    from maskformer import measure

    monkeypatch.setattr(measure, "paired_ratios", lambda times, pairs: [
        {"faster": a, "slower": b, "median": ratio, "min": ratio, "max": ratio, "rounds": 1} for a, b in pairs])


def test_accepted_int8_is_written_complete_and_runs(small_checkpoint, images, engine_cache, tmp_path, monkeypatch):
    from maskformer.engines import openvino_engine
    from maskformer.quantize import quantize_openvino

    _fake_timing(monkeypatch, 1.5)
    out = tmp_path / "int8"
    result = quantize_openvino(small_checkpoint, images, str(out), threads=1, rounds=1, min_agree=0.01,
                               engine_cache_dir=engine_cache)
    assert (result.calibration_images, result.held_out_images) == (3, 1)
    assert 0.01 <= result.agree <= 1 and len(result.agree_per_image) == 1
    assert {"float32", "int8"} <= set(result.forward_ms) and result.accepted and result.out == str(out)
    assert sorted(os.listdir(out)) == ["model.bin", "model.xml", "quantize.json"]
    assert json.load(open(out / "quantize.json"))["agree"] == result.agree
    import openvino as ov

    xml = ov.Core().read_model(str(out / "model.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in xml.get_ops())  # really quantized
    import torch

    runner = openvino_engine.Runner(str(out / "model.xml"), 1)
    assert runner.run(torch.randn(1, 3, 96, 128))[0].shape[0] == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".quantize-")]  # no staging left behind


def test_int8_that_is_not_faster_or_loses_the_maps_writes_nothing(small_checkpoint, images, engine_cache, tmp_path,
                                                                  monkeypatch):
    from maskformer.quantize import quantize_openvino

    _fake_timing(monkeypatch, 0.9)
    out = tmp_path / "int8"
    result = quantize_openvino(small_checkpoint, images, str(out), threads=1, rounds=1, min_agree=1.0,
                               engine_cache_dir=engine_cache)
    assert not result.accepted and result.out is None and not out.exists()
    assert "not faster than float32 (0.900x)" in result.reason
    if result.agree < 1.0:
        assert "under the 100% bar" in result.reason
    assert "nothing written" in str(result) and "maps equal to float32" in str(result)


def test_quantize_refuses_bad_arguments_before_quantizing(tmp_path, images):
    from maskformer.quantize import quantize_openvino

    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="never replaces anything"):
        quantize_openvino(None, images, str(tmp_path / "taken"))
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(os.path.join(images, "0.png"), few / "0.png")
    with pytest.raises(ValueError, match="at least 4 images"):
        quantize_openvino(None, str(few), str(tmp_path / "new"))
    with pytest.raises(ValueError, match="is not a folder"):
        quantize_openvino(None, str(tmp_path / "missing"), str(tmp_path / "new"))
    # the command's wiring: one line naming the problem, exit 1
    result = subprocess.run([sys.executable, "-m", "maskformer", "quantize", "default", str(tmp_path / "taken"),
                             "--calibration", images], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "never replaces anything" in result.stderr, result.stderr[-2000:]
