"""`maskformer segment` on folders of real-world-like files, driven as a user would (subprocess).

Each test names the promise of ``maskformer.segment`` it checks. Images are generated here
(``maskformer.synthetic``: the shipped default model knows these shapes, so maps have several
labels and can be compared with ground truth).
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from maskformer.synthetic import make_sample, mean_iou

TASKS = ("semantic", "panoptic", "instance")


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskformer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def outputs_of(folder):
    """{relative path: bytes} of every file under ``folder`` (hidden lock file excluded)."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f == ".maskformer-segment.lock":
                continue
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found


def label(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Images of mixed sizes, some sharing a size (so groups of several images form), with truth."""
    folder = tmp_path_factory.mktemp("mixed")
    sizes = [(150, 200), (101, 333), (150, 200), (96, 96), (213, 160), (150, 200), (64, 300), (96, 96)]
    truths = {}
    for i, (h, w) in enumerate(sizes):
        image, truth = make_sample(100 + i, height=h, width=w)
        image.save(folder / f"img{i}.png")
        truths[f"img{i}.png"] = truth
    return folder, truths


# ---------------------------------------------------------------------------------------------
# Right maps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_mixed_sizes_give_byte_identical_outputs_at_any_batch_size(tmp_path, mixed_folder, task):
    folder, _ = mixed_folder
    runs = {}
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}"
        result = run_cli("segment", folder, "--out", out, "--task", task, "--batch-size", batch, "--quiet")
        assert result.returncode == 0, result.stderr
        assert "8 done, 0 skipped, 0 failed" in result.stdout
        runs[batch] = outputs_of(out)
    assert len(runs[1]) == 8 * 4
    for batch in (3, 8):
        assert runs[batch].keys() == runs[1].keys()
        differ = [name for name in runs[1] if runs[batch][name] != runs[1][name]]
        assert not differ, f"--batch-size {batch} changed {differ}"


def test_maps_match_the_ground_truth_at_every_size(tmp_path, mixed_folder):
    """The shipped model's held-out mIoU is 0.925 (README); a map squashed by padding or shifted
    by a wrong resize scores far lower at the sizes that are not multiples of 32."""
    folder, truths = mixed_folder
    out = tmp_path / "out"
    assert run_cli("segment", folder, "--out", out, "--batch-size", "8", "--quiet").returncode == 0
    for name, truth in truths.items():
        pred = label(out / f"{name}.label.png").astype(np.int64)
        assert pred.shape == truth.shape
        miou, _ = mean_iou(pred, truth, 4)
        assert miou >= 0.75, f"{name} {truth.shape}: mIoU {miou:.3f}"


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG stored sideways with orientation 6 is segmented the way a viewer shows it: the same
    maps as the upright pixels saved without a tag."""
    upright, _ = make_sample(7, height=180, width=120)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera stored (tag 6 turns it back)
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "in"
    src.mkdir()
    stored.save(src / "phone.jpg", exif=exif, quality=95)
    with Image.open(src / "phone.jpg") as im:
        from PIL import ImageOps

        ImageOps.exif_transpose(im).save(src / "viewer.png")  # the decoded JPEG, upright, lossless
    out = tmp_path / "out"
    result = run_cli("segment", src, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    phone, viewer = label(out / "phone.jpg.label.png"), label(out / "viewer.png.label.png")
    assert phone.shape == (180, 120)
    assert np.array_equal(phone, viewer)
    record = json.loads((out / "phone.jpg.json").read_text())
    assert record["exif_orientation"] == 6 and record["size"] == [180, 120]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    image, truth = make_sample(8, height=120, width=160)
    gray8 = np.asarray(image.convert("L"))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(src / "deep.png")  # 16-bit PNG, mode I;16
    Image.fromarray(gray8.astype(np.uint16) * 257).save(src / "deep.tif")  # 16-bit TIFF
    Image.fromarray(gray8).save(src / "eight.png")
    assert Image.open(src / "deep.png").mode == "I;16" and Image.open(src / "deep.tif").mode == "I;16"
    out = tmp_path / "out"
    result = run_cli("segment", src, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    eight = label(out / "eight.png.label.png")
    assert len(np.unique(eight)) >= 2  # a real map, not one flat class
    for name in ("deep.png", "deep.tif"):
        assert np.array_equal(label(out / f"{name}.label.png"), eight), name
        assert json.loads((out / f"{name}.json").read_text())["source_mode"] == "I;16"


def test_every_pillow_mode_and_animated_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    image, _ = make_sample(9, height=90, width=120)
    image.convert("P").save(src / "palette.png")
    image.convert("RGBA").save(src / "rgba.png")
    image.convert("LA").save(src / "la.png")
    image.convert("1").save(src / "bilevel.png")
    image.convert("CMYK").save(src / "cmyk.jpg")
    frames = [make_sample(10 + k, height=90, width=120)[0].convert("P") for k in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    out = tmp_path / "out"
    result = run_cli("segment", src, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "6 done, 0 skipped, 0 failed" in result.stdout
    record = json.loads((out / "anim.gif.json").read_text())
    assert record["frames"] == 3 and record["frame_used"] == 0
    assert "frames" not in json.loads((out / "palette.png.json").read_text())


# ---------------------------------------------------------------------------------------------
# One bad input never stops the others
# ---------------------------------------------------------------------------------------------
def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, with no pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_bad_inputs_are_reported_by_name_and_the_run_goes_on(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_sample(11, height=80, width=100)[0].save(src / "good.png")
    _png_header_only(src / "bomb.png", 30000, 30000)
    os.mkfifo(src / "fifo.png")
    (src / "empty.jpg").write_bytes(b"")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    make_sample(12, height=80, width=100)[0].save(src / "truncated.jpg")
    data = (src / "truncated.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_cli("segment", src, "--out", out, timeout=120)
    assert time.monotonic() - start < 120  # the FIFO did not hang it
    assert result.returncode == 1
    assert "1 done, 0 skipped, 5 failed" in result.stdout, result.stdout + result.stderr
    err = result.stderr
    assert "bomb.png: is 30000x30000 = 900,000,000 pixels, over --max-pixels" in err
    assert "fifo.png: is a FIFO" in err
    assert "empty.jpg: is empty" in err
    assert "corrupt.png: is not an image" in err
    assert "truncated.jpg: cannot decode image" in err
    assert "Traceback" not in err
    assert (out / "good.png.label.png").exists()
    # a trusted big image gets through when the limit is raised (then fails on its missing data)
    raised = run_cli("segment", src / "bomb.png", "--out", tmp_path / "o2", "--max-pixels", str(10**9))
    assert "over --max-pixels" not in raised.stderr and "bomb.png: cannot decode image" in raised.stderr


def test_out_that_is_a_file_fails_before_the_model_loads(tmp_path, mixed_folder):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = run_cli("segment", mixed_folder[0], "--out", target)
    assert result.returncode == 1
    assert f"--out {target} exists and is not a folder" in result.stderr
    assert "shipped default model" not in result.stderr  # refused before loading it
    assert target.read_text() == "keep me"


def test_big_photo_is_decoded_small_and_mapped_full_size(tmp_path):
    """A 24 MP JPEG: decoded with Pillow's draft (>= 2x the model input), label map at full size,
    memory bounded (the whole command's peak RSS is recorded by the kernel)."""
    import resource

    image, truth = make_sample(13, height=600, width=800)
    big = image.resize((6000, 4500), Image.Resampling.NEAREST)
    src = tmp_path / "in"
    src.mkdir()
    big.save(src / "big.jpg", quality=90)
    out = tmp_path / "out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_cli("segment", src, "--out", out, "--task", "panoptic", "--quiet")
    assert result.returncode == 0, result.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    record = json.loads((out / "big.jpg.json").read_text())
    assert record["size"] == [4500, 6000]
    assert record["decoded_size"][0] < 4500  # draft decoded it at 1/2 .. 1/8 scale
    assert label(out / "big.jpg.label.png").shape == (4500, 6000)
    overlay = Image.open(out / "big.jpg.overlay.png")
    assert overlay.height <= 4096 and overlay.width <= 4096 + 2000
    if peak_kib > before:  # ru_maxrss of children is the max over all of them so far
        assert peak_kib < 2_500_000, f"peak RSS {peak_kib / 1024:.0f} MiB for a 27 MP photo"


# ---------------------------------------------------------------------------------------------
# Nothing lost, nothing torn
# ---------------------------------------------------------------------------------------------
def test_outputs_mirror_paths_and_never_collide(tmp_path):
    src = tmp_path / "in"
    (src / "trip").mkdir(parents=True)
    (src / "other").mkdir()
    make_sample(14, height=64, width=64)[0].save(src / "a.jpg")
    make_sample(15, height=64, width=64)[0].save(src / "a.png")
    make_sample(16, height=64, width=64)[0].save(src / "trip" / "a.png")
    make_sample(17, height=64, width=64)[0].save(src / "other" / "a.png")
    out = tmp_path / "out"
    result = run_cli("segment", src, "--out", out, "--recursive", "--quiet")
    assert result.returncode == 0, result.stderr
    literal = tmp_path / "odd[1].png"  # a file whose name looks like a glob
    make_sample(26, height=64, width=64)[0].save(literal)
    assert run_cli("segment", literal, "--out", tmp_path / "o_lit", "--quiet").returncode == 0
    assert (tmp_path / "o_lit" / "odd[1].png.label.png").exists()
    for name in ("a.jpg", "a.png", "trip/a.png", "other/a.png"):
        assert json.loads((out / f"{name}.json").read_text())["source"] == os.path.realpath(src / name)
    # Two inputs with one output name in one run: both refused, up front, the rest done.
    clash = run_cli("segment", src / "trip", src / "other", src / "a.jpg", "--out", tmp_path / "o2", "--quiet")
    assert clash.returncode == 1
    assert clash.stderr.count("would collide with those of") == 2
    assert "1 done, 0 skipped, 2 failed" in clash.stdout
    # Across runs: another image never overwrites a result that records a different source.
    first = run_cli("segment", src / "trip", "--out", tmp_path / "o3", "--quiet")
    assert first.returncode == 0
    before = outputs_of(tmp_path / "o3")
    for extra in ((), ("--overwrite",)):
        second = run_cli("segment", src / "other", "--out", tmp_path / "o3", "--quiet", *extra)
        assert second.returncode == 1
        assert "holds the result of another image" in second.stderr
        assert outputs_of(tmp_path / "o3") == before


def test_rerun_skips_complete_sets_and_redoes_torn_ones(tmp_path, mixed_folder):
    folder, _ = mixed_folder
    out = tmp_path / "out"
    assert run_cli("segment", folder, "--out", out, "--quiet").returncode == 0
    complete = outputs_of(out)
    again = run_cli("segment", folder, "--out", out, "--quiet")
    assert again.returncode == 0 and "0 done, 8 skipped, 0 failed" in again.stdout
    # What a hard kill mid-write leaves: a record still "writing", a torn PNG and a temporary.
    record = json.loads((out / "img1.png.json").read_text())
    record["status"] = "writing"
    (out / "img1.png.json").write_text(json.dumps(record))
    (out / "img1.png.label.png").write_bytes(complete["img1.png.label.png"][:50])
    (out / ".img1.png.overlay.png.tmp-1234-abcd").write_bytes(b"partial")
    # ...and a complete record whose PNG was truncated afterwards
    (out / "img2.png.color.png").write_bytes(complete["img2.png.color.png"][:30])
    resumed = run_cli("segment", folder, "--out", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 done, 6 skipped, 0 failed" in resumed.stdout
    assert outputs_of(out) == complete
    redo = run_cli("segment", folder, "--out", out, "--quiet", "--overwrite")
    assert "8 done, 0 skipped" in redo.stdout
    other_task = run_cli("segment", folder, "--out", out, "--quiet", "--task", "panoptic")
    assert other_task.returncode == 1 and "already holds a semantic result" in other_task.stderr
    assert outputs_of(out) == complete


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
    resumed = run_cli("segment", src, "--out", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{40 - done} done, {done} skipped, 0 failed" in resumed.stdout


def test_never_writes_through_a_symlink(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_sample(18, height=64, width=80)[0].save(src / "a.png")
    make_sample(19, height=64, width=80)[0].save(src / "b.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.png").write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "precious.png", out / "a.png.label.png")  # existing file outside
    os.symlink(outside / "new.png", out / "b.png.overlay.png")  # dangling
    for extra in ((), ("--overwrite",)):
        result = run_cli("segment", src, "--out", out, "--quiet", *extra)
        assert result.returncode == 1
        assert result.stderr.count("is a symbolic link") == 2, result.stderr
        assert (outside / "precious.png").read_bytes() == b"precious"
        assert not (outside / "new.png").exists()
        assert os.path.islink(out / "a.png.label.png") and os.path.islink(out / "b.png.overlay.png")
    # a symlinked folder inside --out is not written through either
    (src / "sub").mkdir()
    make_sample(20, height=64, width=80)[0].save(src / "sub" / "c.png")
    os.symlink(outside, out / "sub")
    result = run_cli("segment", src, "--recursive", "--out", out, "--quiet")
    assert "sub is a symbolic link" in result.stderr
    assert sorted(os.listdir(outside)) == ["precious.png"]


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
    assert outputs_of(out) == {}
    assert run_cli("segment", mixed_folder[0], "--out", out, "--quiet").returncode == 0  # released: runs


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


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------
def test_overlays_are_legible_at_any_size(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_sample(24, height=10, width=10)[0].save(src / "tiny.png")
    make_sample(25, height=120, width=1200)[0].save(src / "wide.png")
    out = tmp_path / "out"
    assert run_cli("segment", src, "--out", out, "--quiet", "--task", "panoptic").returncode == 0
    tiny = Image.open(out / "tiny.png.overlay.png")
    assert tiny.height >= 256  # upscaled so that the legend is readable beside it
    color = Image.open(out / "wide.png.color.png")
    assert color.mode == "P" and color.size == (1200, 120)  # a viewer shows colours; values are ids
    assert np.array_equal(np.asarray(color), label(out / "wide.png.label.png"))
    no_map = run_cli("segment", src / "tiny.png", "--out", tmp_path / "o2", "--quiet", "--no-color-map")
    assert no_map.returncode == 0 and not (tmp_path / "o2" / "tiny.png.color.png").exists()
