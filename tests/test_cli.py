"""The command line, driven as a user would (subprocess)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "maskformer", *args], capture_output=True, text=True, timeout=300)


def test_demo_writes_outputs_and_never_overwrites(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stdout
    image = Image.open(out / "image.png")
    semantic = np.asarray(Image.open(out / "semantic.png"))
    assert semantic.shape == (image.height, image.width)
    assert Image.open(out / "overlay.png").size == image.size
    summary = json.load(open(out / "segments.json"))
    assert "NOT trained" in summary["model"]
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
