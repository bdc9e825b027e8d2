"""The reference path traces into one size-generic graph (strict torch.export, dynamic batch, height
and width) that equals eager bit for bit, and its ONNX export runs in the engines within the
stated bar at sizes with padding at every stage. The numerics of the eager path are pinned
against transformers bit for bit where they were exact before the export work."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from maskformer import MaskFormerForInstanceSegmentation, dispatch
from maskformer.export import (OUTPUT_FIELDS, REL_ERROR_BAR, default_verify_sizes, export_program, min_side,
                               padded_stages, tracing_context)

from hf_oracle import make_hf_model, ours_from_hf

HAVE_EXPORTER = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript"))
HAVE_ORT = HAVE_EXPORTER and importlib.util.find_spec("onnxruntime") is not None
HAVE_OV = HAVE_EXPORTER and importlib.util.find_spec("openvino") is not None
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnx, onnxscript and onnxruntime not installed: "
                                                    "pip install 'maskformer[onnx]'")
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="onnx, onnxscript and openvino not installed: "
                                                  "pip install 'maskformer[openvino]'")


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


@pytest.fixture(scope="module")
def exported(engine_checkpoint, tmp_path_factory):
    """(model, path, report dict, stdout, stderr): ``maskformer export`` of a small perturbed
    checkpoint, verified with ONNX Runtime, in a subprocess (the command and export_onnx in one
    export)."""
    if not HAVE_ORT:
        pytest.skip("onnx, onnxscript and onnxruntime not installed: pip install 'maskformer[onnx]'")
    folder = tmp_path_factory.mktemp("onnx")
    path, report = str(folder / "model.onnx"), str(folder / "report.json")
    result = subprocess.run([sys.executable, "-m", "maskformer", "export", engine_checkpoint, path, "--verify-sizes",
                             "1x97x131,2x64x80,1x40x300", "--verify-engine", "onnxruntime", "--threads", "1",
                             "--json", report], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    model = MaskFormerForInstanceSegmentation.from_pretrained(engine_checkpoint)
    return model, path, json.load(open(report)), result.stdout, result.stderr


@needs_ort
def test_onnx_export_is_verified_against_pytorch(exported):
    model, path, report, stdout, stderr = exported
    assert report["ok"] and report["verify_engine"] == "onnxruntime" and len(report["rows"]) == 3
    assert [row["size"] for row in report["rows"]] == [[1, 97, 131], [2, 64, 80], [1, 40, 300]]
    for row in report["rows"]:
        assert row["padded_stages"], row  # window padding at some stage
        assert 0 < row["max_rel_error"] <= REL_ERROR_BAR  # > 0: the engine really ran (not PyTorch again)
        assert row["maps_agree"] >= 0.999
    assert report["fields"] == list(OUTPUT_FIELDS) and os.path.getsize(path) > 0
    # the command printed the same table
    lines = [l for l in stdout.splitlines() if "x3x" in l]
    assert [l.split()[0] for l in lines] == ["1x3x97x131", "2x3x64x80", "1x3x40x300"], stdout
    assert "max rel error" in stdout and stdout.rstrip().endswith("OK")
    # each long step said on stderr as it runs: the export (with its expected time), then each size
    lines = [l for l in stderr.splitlines() if l.startswith("maskformer export: ")]
    assert "exporting to ONNX" in lines[0] and "roughly" in lines[0] and "exported in" in lines[1], stderr
    assert "verifying with onnxruntime against PyTorch at 3 sizes" in lines[2], stderr
    assert [l.split()[2] for l in lines[3:6]] == ["1x3x97x131:", "2x3x64x80:", "1x3x40x300:"], stderr
    assert not [n for n in os.listdir(os.path.dirname(path)) if ".partial-" in n]  # its work folder went


@needs_ort
def test_onnx_graph_has_dynamic_batch_height_width(exported):
    import onnx

    _, path, _, _, _ = exported
    proto = onnx.load(path, load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"], dims
    assert [o.name for o in proto.graph.output] == list(OUTPUT_FIELDS)


@pytest.mark.parametrize("engine", [pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)])
def test_export_runs_in_both_engines_at_new_sizes(exported, engine):
    """Sizes the export was neither traced nor verified at, in each engine."""
    from maskformer.export import verify_onnx

    model, path, _, _, _ = exported
    rows = verify_onnx(model, path, [(1, 57, 301), (2, 129, 129), (1, 230, 64)], engine=engine)
    for row in rows:
        assert row["max_rel_error"] <= REL_ERROR_BAR and row["maps_agree"] >= 0.999, row


@needs_ort
def test_verification_fails_loudly_on_a_wrong_export(exported, tmp_path):
    """A graph whose weights differ from the model's (a stale or wrong file) is caught by the bar."""
    from maskformer.export import verify_onnx

    model, path, _, _, _ = exported
    other = ours_from_hf(make_hf_model(window_size=7, depths=(1, 1, 1, 1), num_queries=6, seed=1))
    rows = verify_onnx(other, path, [(1, 64, 64)], engine="onnxruntime")
    assert rows[0]["max_rel_error"] > 100 * REL_ERROR_BAR
    # a well-conditioned model: PyTorch fp32 is close to float64, so the bar is not raised
    assert not rows[0]["ok"] and rows[0]["bar"] == REL_ERROR_BAR, rows[0]


class _Runner:
    """A stand-in engine: PyTorch's own outputs, each scaled by (1 + rel)."""

    def __init__(self, model, rel):
        self.model, self.rel = model, rel
        self.output_names = ("class_queries_logits", "masks_queries_logits")

    def run(self, x):
        with torch.no_grad():
            out = self.model(x)
        return [out[n] * (1 + self.rel) for n in self.output_names]


def test_verification_bar_follows_the_models_own_fp32_error(monkeypatch):
    """The bar per output is max(REL_ERROR_BAR, FP64_FACTOR x PyTorch's fp32-vs-fp64 error): a model
    that amplifies rounding (here simulated: the float64 reference differs by 1e-2) cannot be checked
    more closely than fp32 agrees with float64; a well-conditioned one keeps 1e-4."""
    from maskformer import export

    model = ours_from_hf(make_hf_model(window_size=7, depths=(1, 1, 1, 1), num_queries=6))
    rows = export.verify_rows(model, _Runner(model, 1e-3), [(1, 64, 64)])
    assert not rows[0]["ok"] and rows[0]["bar"] == REL_ERROR_BAR  # 1e-3 > 1e-4, fp32 ~ fp64 here
    assert max(rows[0]["torch_fp32_vs_fp64"].values()) < REL_ERROR_BAR / export.FP64_FACTOR

    real_forward = type(model).forward

    def ill_conditioned(self, pixel_values, *args, **kwargs):  # the float64 copy lands 1e-2 away
        out = real_forward(self, pixel_values, *args, **kwargs)
        if pixel_values.dtype == torch.float64:
            out.class_queries_logits = out.class_queries_logits * 1.01
            out.masks_queries_logits = out.masks_queries_logits * 1.01
        return out

    monkeypatch.setattr(type(model), "forward", ill_conditioned)
    rows = export.verify_rows(model, _Runner(model, 1e-3), [(1, 64, 64)])
    assert rows[0]["ok"] and abs(rows[0]["bar"] - export.FP64_FACTOR * 0.01 / 1.01) < 1e-4, rows[0]
    rows = export.verify_rows(model, _Runner(model, 0.5), [(1, 64, 64)])  # a real error still fails
    assert not rows[0]["ok"]


def test_export_requires_the_exporter_packages(monkeypatch, tmp_path):
    from maskformer import export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'maskformer\[onnx\]'"):
        export.export_onnx(ours_from_hf(make_hf_model(window_size=3)), tmp_path / "x.onnx")


def test_export_command_refuses_bad_sizes(engine_checkpoint, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "maskformer", "export", engine_checkpoint, str(tmp_path / "x.onnx"),
                          "--verify-sizes", "1x97"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "--verify-sizes must be BxHxW" in bad.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_export_command_never_replaces_a_file_unasked(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"someone's file")
    refused = subprocess.run([sys.executable, "-m", "maskformer", "export", "default", str(target)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "already exists: pass --overwrite" in refused.stderr, refused.stderr
    assert target.read_bytes() == b"someone's file"


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


# The export command with the export itself replaced by a copy of the module's verified file: what
# is tested below is how the file reaches its destination (the export is the fixture's).
_EXPORT_CHILD = r"""
import os, shutil, sys, time
from maskformer.engines import export
source = os.environ["MF_ONNX"]
def copy_export(model, path, fields, opset, log, deformable_attention="portable"):
    shutil.copyfile(source, path)
    return export.ExportReport(path=path, fields=tuple(fields), opset=None, seconds=0.0)
export._write_onnx = copy_export
if os.environ.get("MF_HANG"):
    real = export.verify_rows
    def hang(*args, **kwargs):
        open(os.environ["MF_HANG"], "w").close()
        time.sleep(600)
    export.verify_rows = hang
from maskformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_ort
def test_export_overwrite_never_writes_through_a_link_or_leaves_an_unverified_file(exported, engine_checkpoint,
                                                                                   tmp_path):
    """Item 14: ``--overwrite`` onto a symbolic link replaces the link, never its target; a kill
    during the verification leaves the old file (here the link) as it was, and the next export
    removes the killed one's work folder; the published file is the verified one."""
    import signal
    import time

    _, onnx_file, _, _, _ = exported
    target = tmp_path / "someone.onnx"
    target.write_bytes(b"someone's file")
    out = tmp_path / "model.onnx"
    out.symlink_to(target)
    args = [sys.executable, "-c", _EXPORT_CHILD, "export", engine_checkpoint, str(out), "--overwrite",
            "--verify-engine", "onnxruntime", "--threads", "1"]
    hang = tmp_path / "verifying"
    proc = subprocess.Popen(args, env=dict(os.environ, MF_ONNX=onnx_file, MF_HANG=str(hang)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not hang.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert out.is_symlink() and target.read_bytes() == b"someone's file"  # nothing published mid-verification
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.is_symlink() and target.read_bytes() == b"someone's file"
    [partial] = [n for n in os.listdir(tmp_path) if n.startswith(".model.onnx.partial-")]

    done = subprocess.run(args, env=dict(os.environ, MF_ONNX=onnx_file), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not out.is_symlink() and out.read_bytes() == open(onnx_file, "rb").read()
    assert target.read_bytes() == b"someone's file"
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert done.stdout.rstrip().endswith("OK")


@needs_ort
def test_failed_verification_leaves_the_destination_as_it_was(exported, tmp_path, monkeypatch):
    """A file that fails the verification is not published: the destination keeps what it had."""
    from maskformer.engines import export as engine_export

    model, onnx_file, _, _, _ = exported
    monkeypatch.setattr(engine_export, "_write_onnx", lambda m, path, fields, opset, log, deformable_attention="portable": (
        shutil.copyfile(onnx_file, path), engine_export.ExportReport(path, tuple(fields), None, 0.0))[1])
    monkeypatch.setattr(engine_export, "runner_for_file", lambda engine, path, threads=None: _Runner(model, 0.5))
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(RuntimeError, match="does not match PyTorch, so .* was not written"):
        engine_export.export_onnx(model, out, outputs="logits")
    assert out.read_bytes() == b"the previous export"
    assert os.listdir(tmp_path) == ["model.onnx"]
