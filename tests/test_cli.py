"""The command line, driven as a user would (subprocess)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "maskformer", *args], capture_output=True, text=True, timeout=300)


def test_demo_writes_outputs_and_never_overwrites(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "shipped default model" in result.stdout
    image = Image.open(out / "image.png")
    semantic = np.asarray(Image.open(out / "semantic.png"))
    assert semantic.shape == (image.height, image.width)
    overlay = Image.open(out / "overlay.png")
    assert overlay.height >= image.height and overlay.width > image.width  # drawing + legend panel
    assert Image.open(out / "semantic.color.png").size == image.size
    summary = json.load(open(out / "segments.json"))
    assert "default model" in summary["model"]
    assert summary["miou_vs_ground_truth"] >= 0.8  # the shipped model segments its own domain (see test_default_model)
    assert sum(s["area"] for s in summary["segments"]) == image.height * image.width
    ids = {s["label_id"] for s in summary["segments"]}
    assert ids == set(np.unique(semantic).tolist())

    before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
    again = run_cli("demo", "--out", str(out))
    assert again.returncode == 1
    assert "already exist" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
    assert run_cli("demo", "--out", str(out), "--overwrite").returncode == 0


def test_demo_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert run_cli("demo", "--out", str(tmp_path / name)).returncode == 0
    a = np.asarray(Image.open(tmp_path / "a" / "semantic.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "semantic.png"))
    assert np.array_equal(a, b)


def test_info_reports_versions():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] and "maskformer" in report


# ---------------------------------------------------------------------------------------------
# maskformer segment

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from maskformer.synthetic import make_sample

    folder = tmp_path_factory.mktemp("images")
    make_sample(1, width=96, height=80)[0].save(folder / "a.png")
    make_sample(2, width=70, height=101)[0].convert("L").save(folder / "b.jpg")  # grayscale, odd size
    make_sample(3, width=64, height=64)[0].convert("RGBA").save(folder / "c.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hf_oracle import make_hf_model

    folder = tmp_path_factory.mktemp("ckpt")
    make_hf_model(window_size=7).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_segment_folder_with_a_corrupt_image(tmp_path, image_folder, checkpoint, task):
    out = tmp_path / "out"
    result = run_cli("segment", str(image_folder), "--model", checkpoint, "--out", str(out), "--task", task,
                     "--batch-size", "2")
    assert result.returncode == 1, result.stderr  # one failure -> non-zero exit
    assert "3 done, 0 skipped, 1 failed" in result.stdout
    assert "corrupt.png: is not an image" in result.stderr and "Traceback" not in result.stderr
    for stem, (w, h) in {"a.png": (96, 80), "b.jpg": (70, 101), "c.png": (64, 64)}.items():
        label = np.asarray(Image.open(out / f"{stem}.label.png"))
        assert label.shape == (h, w)
        assert Image.open(out / f"{stem}.overlay.png").height >= h
        info = json.load(open(out / f"{stem}.json"))
        assert info["task"] == task and info["size"] == [h, w]
        if task == "semantic":
            assert sum(s["area"] for s in info["segments"]) == h * w
            assert {s["label_id"] for s in info["segments"]} == set(np.unique(label).tolist())
        else:
            for s in info["segments"]:
                assert s["area"] == int((label == s["png_value"]).sum())
                assert sum(s["rle"][1::2]) == s["area"]  # RLE run lengths of ones add up to the area


def test_segment_refuses_to_overwrite_and_names_missing_inputs(tmp_path, image_folder, checkpoint):
    out = tmp_path / "out"
    first = run_cli("segment", str(image_folder / "a.png"), "--model", checkpoint, "--out", str(out))
    assert first.returncode == 0, first.stderr
    stamp = os.path.getmtime(out / "a.png.label.png")
    again = run_cli("segment", str(image_folder / "a.png"), str(tmp_path / "missing.png"), "--model", checkpoint,
                    "--out", str(out))
    assert again.returncode == 1  # the missing input; the complete result is skipped, not redone
    assert "0 done, 1 skipped, 1 failed" in again.stdout and "missing.png: no such file" in again.stderr
    assert os.path.getmtime(out / "a.png.label.png") == stamp
    glob_run = run_cli("segment", str(image_folder / "*.png"), "--model", checkpoint, "--out", str(out), "--overwrite")
    assert "2 done, 0 skipped, 1 failed" in glob_run.stdout  # a.png and c.png; corrupt.png fails
    assert glob_run.returncode == 1


def test_segment_missing_model_is_one_clear_line(tmp_path, image_folder):
    result = run_cli("segment", str(image_folder / "a.png"), "--model", str(tmp_path / "no" / "model"),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr
    verbose = run_cli("--verbose", "segment", str(image_folder / "a.png"), "--model", str(tmp_path / "no" / "model"),
                      "--out", str(tmp_path / "out"))
    assert "Traceback" in verbose.stderr


def test_segment_under_torchrun_shards_inputs(tmp_path, image_folder, checkpoint):
    out = tmp_path / "dist"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "maskformer",
                             "segment", str(image_folder), "--model", checkpoint, "--out", str(out), "--batch-size", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert "3 done, 0 skipped, 1 failed" in result.stdout and "(2 ranks)" in result.stdout, result.stdout + result.stderr
    assert "corrupt.png" in result.stderr
    # same maps as a single-process run at another batch size: images are never padded to each
    # other, so neither the sharding nor the batches change a map.
    single = tmp_path / "single"
    run_cli("segment", str(image_folder), "--model", checkpoint, "--out", str(single), "--batch-size", "3")
    for stem in ("a.png", "b.jpg", "c.png"):
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}.label.png")),
                              np.asarray(Image.open(single / f"{stem}.label.png")))


def test_overlay_colours_follow_label_names():
    from maskformer.overlay import colour_table, label_colour

    # same name -> same colour whatever its id; instances of one label get distinct shades
    assert label_colour("person") == label_colour("person")
    assert label_colour("person") != label_colour("car")
    table = colour_table(np.array([[0, 1, 2, 3]]), {0: "background", 1: "person", 2: "car", 3: "person"})
    assert len(set(map(tuple, table[1:]))) == 3
    assert table[0][0] == table[0][1] == table[0][2]  # background is grey...
    assert tuple(label_colour("no segment")) != tuple(table[0])  # ...and not the colour of "no segment"
    # touching segments are kept apart even when their names would give close colours
    for a, b in zip(table[:-1], table[1:]):
        assert np.linalg.norm(a.astype(float) - b.astype(float)) >= 80
