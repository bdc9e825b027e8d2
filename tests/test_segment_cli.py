"""`maskformer segment`, driven as a user would (subprocess): the command is a thin layer over
``maskformer.segment_folder`` (whose promises ``test_segment_folder.py`` tests by calling it), so
these tests check the wiring: the same files, what it prints, its exit status, Ctrl-C, the lock,
its help, and messages in the command line's spelling.

Images are generated here (``maskformer.synthetic``: the shipped default model knows these shapes).
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hf_oracle import outputs_of
from maskformer.synthetic import make_sample

TASKS = ("semantic", "panoptic", "instance")


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskformer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_command_is_segment_folder_with_a_printed_summary(tmp_path, mixed_folder):
    """The same files as the function, a summary line, one line per failure in the command
    line's spelling, exit status 1 when an input failed."""
    import maskformer

    src = tmp_path / "in"
    src.mkdir()
    for name in ("img0.png", "img3.png"):
        (src / name).write_bytes((mixed_folder[0] / name).read_bytes())
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_cli("segment", src, "--out", tmp_path / "cli", "--task", "panoptic", "--max-pixels", "10000",
                     "--no-color-map", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "maskformer segment: 1 done, 0 skipped, 2 failed" in result.stdout
    assert f"  failed: {src / 'corrupt.png'}: is not an image Pillow can read" in result.stderr
    assert f"  failed: {src / 'img0.png'}: is 200x150 = 30,000 pixels, over --max-pixels 10000 " in result.stderr
    assert "raise --max-pixels if you trust it" in result.stderr and "max_pixels" not in result.stderr
    summary = maskformer.segment_folder([src], tmp_path / "api", task="panoptic", max_pixels=10000, color_map=False,
                                        progress=False)
    assert summary.exit_status == 1 and len(summary.done) == 1
    assert outputs_of(tmp_path / "cli").keys() == outputs_of(tmp_path / "api").keys() == {
        "img3.png.json", "img3.png.label.png", "img3.png.overlay.png"}
    assert outputs_of(tmp_path / "cli") == outputs_of(tmp_path / "api")  # record included, byte for byte
    again = run_cli("segment", src / "img3.png", "--out", tmp_path / "cli", "--task", "panoptic", "--no-color-map")
    assert again.returncode == 0 and "0 done, 1 skipped, 0 failed" in again.stdout


@pytest.mark.parametrize("args, message", [
    (("--engine", "onnxruntime", "--dtype", "bfloat16"),
     "--engine onnxruntime computes in float32 only, not --dtype bfloat16: its CPU execution provider has no "
     "bfloat16 kernels for MatMul, Gemm or Add."),
    (("--engine", "openvino", "--device", "cuda:1"), "--engine openvino runs on the CPU, not --device cuda:1"),
    (("--batch-size", "0"), "--batch-size 0: must be a whole number >= 1"),
    (("--threads", "-2"), "--threads -2: must be a whole number >= 1"),
    (("--device", "cuda"), "--device cuda: no CUDA device is available here"),
])
def test_command_line_errors_use_command_line_spelling(tmp_path, mixed_folder, args, message):
    """Issue 24, item 16: `--engine torch`, not `engine='torch'`."""
    import torch

    if args == ("--device", "cuda") and torch.cuda.is_available():
        args, message = ("--device", "cuda:99"), "--device cuda:99"
    result = run_cli("segment", mixed_folder[0] / "img0.png", "--out", tmp_path / "out", *args)
    assert result.returncode == 1
    assert f"maskformer segment: error: {message}" in result.stderr, result.stderr
    assert "='" not in result.stderr and "batch_size" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_spelling_rewrites_only_segment_folder_keywords():
    from maskformer.cli import cli_spelling

    assert cli_spelling("engine='onnxruntime' runs in float32, not dtype='bfloat16'") == \
        "--engine onnxruntime runs in float32, not --dtype bfloat16"
    assert cli_spelling("even with overwrite=True: move it away or choose another out_dir") == \
        "even with --overwrite: move it away or choose another --out"
    assert cli_spelling("over max_pixels=1000 (raise max_pixels if you trust it)") == \
        "over --max-pixels 1000 (raise --max-pixels if you trust it)"
    assert cli_spelling("color_map=False, progress=False, device='cuda:1'") == "--no-color-map, --quiet, --device cuda:1"
    assert cli_spelling("out_dir='/tmp/my seg' exists") == "--out '/tmp/my seg' exists"
    # words, paths and other keywords stay as they are
    for text in ("the model of this task", "/photos/task=1.png", "strict=True", "engine_cache_dir='x'"):
        assert cli_spelling(text) == text


def test_an_output_path_with_spaces_is_quoted_as_a_shell_would(tmp_path, mixed_folder):
    target = tmp_path / "my results.txt"
    target.write_text("keep me")
    result = run_cli("segment", mixed_folder[0], "--out", target)
    assert result.returncode == 1
    assert f"error: --out '{target}' exists and is not a folder" in result.stderr
    assert "shipped default model" not in result.stderr  # refused before loading it
    assert target.read_text() == "keep me"


def test_interrupted_run_leaves_no_torn_set_and_resumes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        make_sample(200 + i, height=96, width=128)[0].save(src / f"p{i:02d}.png")
    out = tmp_path / "out"
    # SIGINT back to its default in the child: a shell runs background jobs (`.ci/run &`, nohup) with
    # SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt (the
    # run finished all 40 images in two such CI runs).
    proc = subprocess.Popen([sys.executable, "-m", "maskformer", "segment", str(src), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and any(f.endswith(".json") for f in os.listdir(out))):
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "interrupted" in stdout
    done = 0
    for name in os.listdir(out):
        assert ".tmp-" not in name, f"temporary {name} left behind"
        if name.endswith(".json"):
            record = json.loads((out / name).read_text())  # every record parses: written atomically
            if record["status"] == "complete":
                done += 1
                for kind, size in record["files"].items():
                    assert (out / name.replace(".json", f".{kind}.png")).stat().st_size == size
    assert 0 < done < 40
    assert ".maskformer-segment.lock" not in os.listdir(out)  # removed on the way out (issue 24, item 5)
    resumed = run_cli("segment", src, "--out", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{40 - done} done, {done} skipped, 0 failed" in resumed.stdout


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, mixed_folder):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".maskformer-segment.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # what a running segment holds
        f.write("pid 424242, started earlier")
        f.flush()
        result = run_cli("segment", mixed_folder[0], "--out", out, "--quiet")
    assert result.returncode == 1
    assert "another maskformer segment run (pid 424242" in result.stderr
    assert outputs_of(out) == {".maskformer-segment.lock": b"pid 424242, started earlier"}  # the holder's, as it was
    assert run_cli("segment", mixed_folder[0], "--out", out, "--quiet").returncode == 0  # released: runs
    assert not (out / ".maskformer-segment.lock").exists()  # and removes the lock file when it ends


# ---------------------------------------------------------------------------------------------
# The command a person expects
# ---------------------------------------------------------------------------------------------
def test_help_explains_options_files_and_the_shipped_model():
    result = run_cli("segment", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for phrase in ("default: semantic", "default: 4", "default: float32", "default: off", "178,956,970",
                   "NAME.label.png", "NAME.color.png", "NAME.overlay.png", "NAME.json", "--no-color-map",
                   "trained on generated images of four classes", "Exit status"):
        assert phrase in text, phrase
    assert "untrained" not in text.lower()


def test_verbose_works_after_the_subcommand(tmp_path, mixed_folder):
    for args in (("--verbose", "segment"), ("segment", "--verbose")):
        result = run_cli(*args, mixed_folder[0], "--model", tmp_path / "no-model", "--out", tmp_path / "o")
        assert result.returncode == 1 and "Traceback" in result.stderr, args


def test_recursive_folders_and_symlink_loops(tmp_path):
    src = tmp_path / "in"
    (src / "deeper" / "deepest").mkdir(parents=True)
    make_sample(21, height=64, width=64)[0].save(src / "top.png")
    make_sample(22, height=64, width=64)[0].save(src / "deeper" / "mid.png")
    make_sample(23, height=64, width=64)[0].save(src / "deeper" / "deepest" / "low.png")
    os.symlink(src, src / "deeper" / "loop")  # a loop back to the top
    flat = run_cli("segment", src, "--out", tmp_path / "flat", "--quiet")
    assert "1 done" in flat.stdout
    assert "skipped 1 subfolder(s)" in flat.stderr and "--recursive" in flat.stderr
    deep = run_cli("segment", src, "--out", tmp_path / "deep", "--recursive", "--quiet", timeout=120)
    assert deep.returncode == 0, deep.stderr
    assert "3 done, 0 skipped, 0 failed" in deep.stdout
    assert (tmp_path / "deep" / "deeper" / "deepest" / "low.png.label.png").exists()


def test_progress_lines_without_a_terminal(tmp_path):
    import re

    src = tmp_path / "in"
    src.mkdir()
    for i in range(60):
        make_sample(300 + i, height=40, width=40)[0].save(src / f"s{i:02d}.png")
    result = run_cli("segment", src, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    # a line each time the count passes a multiple of 25 (groups of 4 same-size images: at 28 and 52)
    lines = re.findall(r"segment: (\d+)/60 inputs \((\d+) done, 0 skipped, 0 failed\), [\d.]+ inputs/s", result.stderr)
    counts = [int(n) for n, _ in lines]  # (plus a line every 30 s on a slow machine)
    assert {28, 52} <= set(counts) and counts == sorted(counts), result.stderr
    assert "60 done, 0 skipped, 0 failed" in result.stdout and "images/s" in result.stdout


def test_info_tells_the_truth_about_this_machine():
    import torch

    from maskformer.segment import cpu_features

    report = json.loads(run_cli("info").stdout)
    feats = cpu_features()
    assert report["cpu"]["features"] == feats
    if not torch.cuda.is_available() and "not usable" not in report["triton"]:
        assert "no CUDA device" in report["triton"] and "available (CUDA" not in json.dumps(report)
    native = feats["avx512_bf16"] or feats["amx_bf16"]
    assert ("native" in report["cpu"]["bfloat16"]) == native


def test_bfloat16_on_a_cpu_without_native_support_warns_once(tmp_path, mixed_folder):
    from maskformer.segment import native_cpu_bf16

    result = run_cli("segment", mixed_folder[0] / "img0.png", "--out", tmp_path / "o", "--dtype", "bfloat16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("avx512_bf16/AMX is emulated") == (0 if native_cpu_bf16() else 1)


def test_forced_backend_applies_where_it_has_kernels_or_is_refused_up_front(tmp_path, mixed_folder):
    from maskformer import _ext

    image = mixed_folder[0] / "img0.png"
    if _ext.cpp_import_error() is None:
        result = run_cli("segment", image, "--out", tmp_path / "cpp", "--backend", "cpp", "--task", "panoptic")
        assert result.returncode == 0, result.stderr
        assert "query_argmax (panoptic post-processing) on cpp" in result.stderr
        assert "no cpp kernel for window_attention (network): auto" in result.stderr
        assert "query_argmax: requested cpp, ran cpp" in result.stderr
        refused = run_cli("segment", image, "--out", tmp_path / "cpp2", "--backend", "cpp", "--task", "instance")
        assert refused.returncode == 1
        assert "--backend cpp has no kernel for anything --task instance runs" in refused.stderr
        assert not (tmp_path / "cpp2").exists()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    triton = run_cli("segment", image, "--out", tmp_path / "tr", "--backend", "triton", env=env)
    assert triton.returncode == 1 and "--backend triton cannot run here" in triton.stderr
