"""``maskformer.segment_folder`` on folders of real-world-like and hostile files, called as a user
would from Python (the command line's wiring is tested in ``test_segment_cli.py``).

Each test names the promise it checks (``maskformer/segment.py``, ``segment_inputs.py`` and
``segment_outputs.py`` list them). Images are generated here (``maskformer.synthetic``: the shipped
default model knows these shapes, so maps have several labels and can be compared with truth).
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

import maskformer
from maskformer.segment import SegmentSummary
from maskformer.segment_outputs import LOCK_NAME, OutputError, OutputLock, atomic_write
from hf_oracle import label, outputs_of
from maskformer.synthetic import make_sample, mean_iou

TASKS = ("semantic", "panoptic", "instance")


def segment(inputs, out, **options):
    options.setdefault("progress", False)
    summary = maskformer.segment_folder(inputs, out, **options)
    assert isinstance(summary, SegmentSummary)
    return summary


def counts(summary):
    return len(summary.done), len(summary.skipped), len(summary.failed)


def reasons(summary):
    """{input's file name: reason} of the failures."""
    return {os.path.basename(o.input): o.reason for o in summary.failed}


def skip_reasons(summary):
    """{input's file name: reason} of the skips."""
    return {os.path.basename(o.input): o.reason for o in summary.skipped}


# ---------------------------------------------------------------------------------------------
# The function and its summary
# ---------------------------------------------------------------------------------------------
def test_segment_folder_writes_then_skips_what_is_complete(tmp_path, mixed_folder):
    """The README's example: done, then skipped; each outcome names its input and files."""
    folder, _ = mixed_folder
    first = segment([folder], tmp_path / "seg", task="panoptic")
    assert counts(first) == (8, 0, 0) and first.exit_status == 0
    assert [os.path.basename(o.input) for o in first.done] == sorted(f"img{i}.png" for i in range(8))
    for outcome in first.done:
        assert outcome.reason == "" and len(outcome.outputs) == 4
        assert all(os.path.isfile(p) for p in outcome.outputs)
    second = segment(str(folder), tmp_path / "seg", task="panoptic")  # one path, not a list, works too
    assert counts(second) == (0, 8, 0)
    assert {o.reason for o in second.skipped} == {"complete result exists"}
    assert "0 done, 8 skipped, 0 failed" in str(second)


@pytest.mark.parametrize("bad, match", [
    (dict(task="depth"), "task='depth' is not one of semantic, panoptic, instance"),
    (dict(batch_size=0), "batch_size=0: must be a whole number >= 1"),
    (dict(max_pixels=-5), "max_pixels=-5"),
    (dict(threads=0), "threads=0"),
    (dict(dtype="float64"), "dtype='float64' is not one of"),
    (dict(engine="tensorrt"), "engine='tensorrt' is not one of torch, onnxruntime, openvino"),
    (dict(engine="onnxruntime", dtype="bfloat16"), "engine='onnxruntime' computes in float32 only, not dtype='bfloat16'"),
    (dict(engine="openvino", device="cuda"), "engine='openvino' runs on the CPU"),
    (dict(backend="fast"), "backend='fast' is not one of"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, mixed_folder, bad, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        segment(mixed_folder[0], tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Right maps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_mixed_sizes_give_byte_identical_outputs_at_any_batch_size(tmp_path, mixed_folder, task):
    folder, _ = mixed_folder
    runs = {}
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}"
        assert counts(segment(folder, out, task=task, batch_size=batch)) == (8, 0, 0)
        runs[batch] = outputs_of(out)
    assert len(runs[1]) == 8 * 4
    for batch in (3, 8):
        assert runs[batch].keys() == runs[1].keys()
        differ = [name for name in runs[1] if runs[batch][name] != runs[1][name]]
        assert not differ, f"batch_size={batch} changed {differ}"


def test_maps_match_the_ground_truth_at_every_size(tmp_path, mixed_folder):
    """The shipped model's held-out mIoU is 0.925 (README); a map squashed by padding or shifted
    by a wrong resize scores far lower at the sizes that are not multiples of 32."""
    folder, truths = mixed_folder
    out = tmp_path / "out"
    assert segment(folder, out, batch_size=8).exit_status == 0
    for name, truth in truths.items():
        pred = label(out / f"{name}.label.png").astype(np.int64)
        assert pred.shape == truth.shape
        miou, _ = mean_iou(pred, truth, 4)
        assert miou >= 0.75, f"{name} {truth.shape}: mIoU {miou:.3f}"


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG stored sideways with orientation 6 is segmented the way a viewer shows it: the same
    maps as the upright pixels saved without a tag."""
    from PIL import ImageOps

    upright, _ = make_sample(7, height=180, width=120)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera stored (tag 6 turns it back)
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "in"
    src.mkdir()
    stored.save(src / "phone.jpg", exif=exif, quality=95)
    with Image.open(src / "phone.jpg") as im:
        ImageOps.exif_transpose(im).save(src / "viewer.png")  # the decoded JPEG, upright, lossless
    out = tmp_path / "out"
    assert segment(src, out).exit_status == 0
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
    assert segment(src, out).exit_status == 0
    eight = label(out / "eight.png.label.png")
    assert len(np.unique(eight)) >= 2  # a real map, not one flat class
    for name in ("deep.png", "deep.tif"):
        assert np.array_equal(label(out / f"{name}.label.png"), eight), name
        assert json.loads((out / f"{name}.json").read_text())["source_mode"] == "I;16"


# ---------------------------------------------------------------------------------------------
# One bad input never stops the others (issue 24, item 1)
# ---------------------------------------------------------------------------------------------
def _mode_files(folder, height, width):
    """{file name: the Pillow mode it opens in}: every mode Pillow reads from a file, at one size."""
    image, _ = make_sample(9, height=height, width=width)
    gray = np.asarray(image.convert("L"))
    files = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        files[name] = img.mode

    save("palette.png", image.convert("P"))
    save("palette.gif", image.convert("P"))
    save("bilevel.png", image.convert("1"))
    save("bilevel.tif", image.convert("1"), compression="group4")
    save("gray.png", image.convert("L"))
    save("gray_alpha.png", image.convert("LA"))
    save("palette_alpha.tif", image.convert("PA"))
    save("palette_transparent.png", image.convert("P"), transparency=0)
    save("bilevel.bmp", image.convert("1"))
    save("rgb.png", image)
    save("rgba.png", image.convert("RGBA"))
    save("cmyk.jpg", image.convert("CMYK"))
    save("cmyk.tif", image.convert("CMYK"))
    save("ycbcr.tif", image.convert("YCbCr"))
    save("lab.tif", image.convert("LAB"))
    save("deep.png", Image.fromarray(gray.astype(np.uint16) * 257))  # I;16
    save("deep_big_endian.tif", Image.fromarray(gray.astype(np.uint16) * 257).convert("I;16B"))
    save("int32.tif", Image.fromarray(gray.astype(np.int32) * 257))  # I, 16-bit values
    save("float.tif", Image.fromarray(gray.astype(np.float32) / 255))  # F in [0, 1]
    save("gray.pgm", image.convert("L"))
    save("gray.webp", image, lossless=True)
    frames = [make_sample(10 + k, height=height, width=width)[0].convert("P") for k in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    files["anim.gif"] = "P"
    return files


@pytest.mark.parametrize("height, width", [(90, 120), (900, 1200)], ids=["small", "big: reduced after decoding"])
def test_every_pillow_mode_at_every_size(tmp_path, height, width):
    """Each mode Pillow opens is segmented. At 900x1200 the default model (input 128x192) has the
    image ``reduce``d 3x after decoding, which Pillow refuses for modes 1 and P ("image has wrong
    mode": before the fix that error escaped and ended the whole run)."""
    src = tmp_path / "in"
    src.mkdir()
    files = _mode_files(src, height, width)
    opened = {}
    for name in files:
        with Image.open(src / name) as im:
            opened[name] = im.mode
    assert opened == files  # each file really is in the mode it is named for
    assert {"1", "P", "L", "LA", "PA", "I;16", "I;16B", "I", "F", "RGB", "CMYK", "RGBA", "YCbCr", "LAB"} <= set(opened.values())
    summary = segment(src, tmp_path / "out")
    assert summary.failed == [] and counts(summary) == (len(files), 0, 0)
    record = json.loads((tmp_path / "out" / "anim.gif.json").read_text())
    assert record["frames"] == 3 and record["frame_used"] == 0
    assert ("decoded_size" in record) == (height == 900)
    assert "frames" not in json.loads((tmp_path / "out" / "palette.gif.json").read_text())
    reference = label(tmp_path / "out" / "rgb.png.label.png")
    assert len(np.unique(reference)) >= 2
    for name in ("palette.png", "rgba.png", "cmyk.tif", "lab.tif", "gray.png"):
        agree = (label(tmp_path / "out" / f"{name}.label.png") == reference).mean()
        assert agree > 0.9, f"{name}: {agree:.2f} of its map agrees with the RGB original's"


def test_the_reported_folder_a_palette_gif_and_a_one_bit_tiff_among_photos(tmp_path):
    """The report: a 1200x900 GIF in mode P and a 4000x3000 1-bit TIFF among good images made the
    whole run exit 1 with "image has wrong mode" and write none of the good images."""
    src = tmp_path / "in"
    src.mkdir()
    image, _ = make_sample(30, height=900, width=1200)
    image.convert("P").save(src / "chart.gif")
    make_sample(31, height=3000, width=4000)[0].convert("1").save(src / "scan.tif", compression="group4")
    for i in range(3):
        make_sample(40 + i, height=120, width=160)[0].save(src / f"photo{i}.jpg", quality=92)
    summary = segment(src, tmp_path / "out")
    assert counts(summary) == (5, 0, 0), summary.failed
    assert label(tmp_path / "out" / "scan.tif.label.png").shape == (3000, 4000)


def test_any_decode_or_conversion_error_names_the_file_and_the_run_goes_on(tmp_path, monkeypatch):
    """Not only Pillow's usual OSError: whatever a decoder or a conversion raises (here a
    RuntimeError from ``reduce``, a MemoryError from ``convert``, a float image without a range)
    fails that file, by name, and the other images are done."""
    src = tmp_path / "in"
    src.mkdir()
    make_sample(50, height=900, width=1200)[0].save(src / "big.png")  # reduced: meets the patched reduce
    make_sample(51, height=90, width=120)[0].convert("CMYK").save(src / "cmyk.tif")  # converted: meets convert
    Image.fromarray(np.full((90, 120), -3.5, dtype=np.float32)).save(src / "negative.tif")
    for i in range(2):
        make_sample(52 + i, height=90, width=120)[0].save(src / f"good{i}.png")

    def reduce(self, factor, box=None):
        raise RuntimeError("decoder exploded")

    original_convert = Image.Image.convert

    def convert(self, mode=None, *args, **kwargs):
        if self.mode == "CMYK":
            raise MemoryError()
        return original_convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "reduce", reduce)
    monkeypatch.setattr(Image.Image, "convert", convert)
    summary = segment(src, tmp_path / "out")
    assert counts(summary) == (2, 0, 3)
    why = reasons(summary)
    assert why["big.png"] == "cannot decode or convert image (RuntimeError: decoder exploded)"
    assert why["cmyk.tif"].startswith("not enough memory to decode it")
    assert "floating-point image (Pillow mode 'F') with values in [-3.5, -3.5]" in why["negative.tif"]
    assert summary.exit_status == 1


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
    import time

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
    summary = segment(src, out)
    assert time.monotonic() - start < 120  # the FIFO did not hang it
    assert counts(summary) == (1, 0, 5) and summary.exit_status == 1
    why = reasons(summary)
    assert why["bomb.png"].startswith("is 30000x30000 = 900,000,000 pixels, over max_pixels=178956970")
    assert why["fifo.png"].startswith("is a FIFO")
    assert why["empty.jpg"].startswith("is empty")
    assert why["corrupt.png"].startswith("is not an image")
    assert why["truncated.jpg"].startswith("cannot decode image")
    assert (out / "good.png.label.png").exists()
    # a trusted big image gets through when the limit is raised (then fails on its missing data)
    raised = segment(src / "bomb.png", tmp_path / "o2", max_pixels=10**9)
    assert reasons(raised)["bomb.png"].startswith("cannot decode image")


def test_out_that_is_a_file_fails_before_the_model_loads(tmp_path, mixed_folder, monkeypatch):
    from maskformer import segment as run_module

    target = tmp_path / "results.txt"
    target.write_text("keep me")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "_load_model", no_loading)
    with pytest.raises(OutputError, match=f"out_dir='{target}' exists and is not a folder"):
        segment(mixed_folder[0], target)
    assert target.read_text() == "keep me"


def test_big_photo_is_decoded_small_and_mapped_full_size(tmp_path):
    """A 27 MP JPEG: decoded with Pillow's draft (>= 2x the model input), label map at full size."""
    image, truth = make_sample(13, height=600, width=800)
    big = image.resize((6000, 4500), Image.Resampling.NEAREST)
    src = tmp_path / "in"
    src.mkdir()
    big.save(src / "big.jpg", quality=90)
    out = tmp_path / "out"
    assert segment(src, out, task="panoptic").exit_status == 0
    record = json.loads((out / "big.jpg.json").read_text())
    assert record["size"] == [4500, 6000]
    assert record["decoded_size"][0] < 4500  # draft decoded it at 1/2 .. 1/8 scale
    assert label(out / "big.jpg.label.png").shape == (4500, 6000)
    overlay = Image.open(out / "big.jpg.overlay.png")
    assert overlay.height <= 4096 and overlay.width <= 4096 + 2000


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
    assert segment(src, out, recursive=True).exit_status == 0
    literal = tmp_path / "odd[1].png"  # a file whose name looks like a glob
    make_sample(26, height=64, width=64)[0].save(literal)
    assert segment(literal, tmp_path / "o_lit").exit_status == 0
    assert (tmp_path / "o_lit" / "odd[1].png.label.png").exists()
    for name in ("a.jpg", "a.png", "trip/a.png", "other/a.png"):
        assert json.loads((out / f"{name}.json").read_text())["source"] == os.path.realpath(src / name)
    # Two inputs with one output name in one run: both refused, up front, the rest done.
    clash = segment([src / "trip", src / "other", src / "a.jpg"], tmp_path / "o2")
    assert counts(clash) == (1, 0, 2)
    assert all("would collide with those of" in o.reason for o in clash.failed)
    # Across runs: another image never overwrites a result that records a different source.
    assert segment(src / "trip", tmp_path / "o3").exit_status == 0
    before = outputs_of(tmp_path / "o3")
    for overwrite in (False, True):
        second = segment(src / "other", tmp_path / "o3", overwrite=overwrite)
        assert counts(second) == (0, 1, 0) and second.exit_status == 0  # reported and skipped (issue 24)
        assert "holds the result of another image" in second.skipped[0].reason
        assert outputs_of(tmp_path / "o3") == before


def test_rerun_skips_complete_sets_and_redoes_torn_ones(tmp_path, mixed_folder):
    folder, _ = mixed_folder
    out = tmp_path / "out"
    assert segment(folder, out).exit_status == 0
    complete = outputs_of(out)
    assert counts(segment(folder, out)) == (0, 8, 0)
    # What a hard kill mid-write leaves: a record still "writing", a torn PNG and a temporary.
    record = json.loads((out / "img1.png.json").read_text())
    record["status"] = "writing"
    (out / "img1.png.json").write_text(json.dumps(record))
    (out / "img1.png.label.png").write_bytes(complete["img1.png.label.png"][:50])
    (out / ".img1.png.overlay.png.tmp-1234-abcd").write_bytes(b"partial")
    # ...and a complete record whose PNG was truncated afterwards
    (out / "img2.png.color.png").write_bytes(complete["img2.png.color.png"][:30])
    assert counts(segment(folder, out)) == (2, 6, 0)
    assert outputs_of(out) == complete
    assert counts(segment(folder, out, overwrite=True)) == (8, 0, 0)
    other_task = segment(folder, out, task="panoptic")
    assert counts(other_task) == (0, 0, 8) and "already holds a semantic result" in other_task.failed[0].reason
    assert outputs_of(out) == complete


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
    for overwrite in (False, True):
        summary = segment(src, out, overwrite=overwrite)
        assert counts(summary) == (0, 0, 2)
        assert all("is a symbolic link" in o.reason for o in summary.failed), summary.failed
        assert (outside / "precious.png").read_bytes() == b"precious"
        assert not (outside / "new.png").exists()
        assert os.path.islink(out / "a.png.label.png") and os.path.islink(out / "b.png.overlay.png")
    # a symlinked folder inside the output folder is not written through either
    (src / "sub").mkdir()
    make_sample(20, height=64, width=80)[0].save(src / "sub" / "c.png")
    os.symlink(outside, out / "sub")
    summary = segment(src, out, recursive=True)
    assert any(o.reason.endswith("sub is a symbolic link; refusing to write through it (remove it or choose another "
                                 "out_dir)") for o in summary.failed), summary.failed
    assert sorted(os.listdir(outside)) == ["precious.png"]


# ---------------------------------------------------------------------------------------------
# No file this command did not write is replaced (issue 24, item 2)
# ---------------------------------------------------------------------------------------------
def test_user_files_with_result_names_are_never_replaced_when_out_is_the_input_folder(tmp_path):
    """The report: with the output folder equal to the input folder, an input named
    ``a.png.label.png`` was replaced by a.png's label map (exit 0, "3 done"), and a foreign
    ``g0.png.overlay.png`` by g0.png's overlay. Now a.png and g0.png are reported and skipped,
    naming the file in their way; the user's files are inputs like any other, and unchanged,
    overwrite or not."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, seed in (("a.png", 60), ("a.png.label.png", 61), ("g0.png", 62), ("g0.png.overlay.png", 63),
                       ("b.png", 64)):
        make_sample(seed, height=64, width=80)[0].save(folder / name)
    users = {n: (folder / n).read_bytes() for n in ("a.png.label.png", "g0.png.overlay.png")}
    for overwrite in (False, True):
        summary = segment(folder, folder, overwrite=overwrite)
        why = skip_reasons(summary)
        assert not summary.failed and summary.exit_status == 0, summary.failed
        assert why["a.png"].startswith(f"{folder / 'a.png.label.png'} exists and was not written by maskformer segment")
        assert "even with overwrite=True" in why["g0.png"]
        done = {os.path.basename(o.input) for o in summary.done} | {n for n, r in why.items() if "complete" in r}
        assert done == {"a.png.label.png", "g0.png.overlay.png", "b.png"}
        for name, data in users.items():
            assert (folder / name).read_bytes() == data, f"{name} was replaced"
        assert not (folder / "a.png.json").exists() and not (folder / "g0.png.json").exists()  # nothing of theirs


def test_a_foreign_file_in_the_output_folder_is_reported_and_kept(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_sample(65, height=64, width=80)[0].save(src / "g0.png")
    make_sample(66, height=64, width=80)[0].save(src / "g1.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "g0.png.overlay.png").write_bytes(b"the user's own overlay")
    summary = segment(src, out, overwrite=True)
    assert counts(summary) == (1, 1, 0) and skip_reasons(summary).keys() == {"g0.png"}
    assert (out / "g0.png.overlay.png").read_bytes() == b"the user's own overlay"
    assert sorted(os.listdir(out)) == ["g0.png.overlay.png"] + [f"g1.png.{k}" for k in
                                                                  ("color.png", "json", "label.png", "overlay.png")]
    # A file our record does not claim: a run without colour maps, then the user's own colour map,
    # then a run that wants colour maps.
    assert segment(src / "g1.png", tmp_path / "o2", color_map=False).exit_status == 0
    (tmp_path / "o2" / "g1.png.color.png").write_bytes(b"mine")
    again = segment(src / "g1.png", tmp_path / "o2", overwrite=True)
    assert counts(again) == (0, 1, 0) and "g1.png.color.png exists and was not written" in again.skipped[0].reason
    assert (tmp_path / "o2" / "g1.png.color.png").read_bytes() == b"mine"


def test_our_own_files_are_replaced_and_dropped_ones_removed(tmp_path):
    """overwrite=True replaces our files; a colour map of ours that the new set no longer has is
    removed (it would otherwise be a file no record claims)."""
    src = tmp_path / "in"
    src.mkdir()
    make_sample(67, height=64, width=80)[0].save(src / "a.png")
    out = tmp_path / "out"
    assert segment(src, out).exit_status == 0
    assert counts(segment(src, out, color_map=False, overwrite=True)) == (1, 0, 0)
    assert sorted(os.listdir(out)) == ["a.png.json", "a.png.label.png", "a.png.overlay.png"]
    assert set(json.loads((out / "a.png.json").read_text())["files"]) == {"label", "overlay"}


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    """Creating a file that was absent links it into place, which fails when something appeared
    there since the check (a rename would replace it)."""
    target = tmp_path / "x.label.png"

    def write(f):
        target.write_bytes(b"appeared meanwhile")  # another program, between the check and the link
        f.write(b"ours")

    with pytest.raises(OutputError, match="exists and was not written by maskformer segment"):
        atomic_write(str(target), write, replace=False)
    assert target.read_bytes() == b"appeared meanwhile"
    assert os.listdir(tmp_path) == ["x.label.png"]  # no temporary left
    assert atomic_write(str(target), lambda f: f.write(b"ours"), replace=True) == 4
    assert target.read_bytes() == b"ours"


# ---------------------------------------------------------------------------------------------
# Results are never inputs (issue 24, item 3)
# ---------------------------------------------------------------------------------------------
def test_results_never_nest_when_out_is_inside_the_input_folder(tmp_path):
    """The report: ``segment nest --recursive --out nest/seg`` three times made 2, 6, then 18
    result sets."""
    nest = tmp_path / "nest"
    (nest / "sub").mkdir(parents=True)
    make_sample(70, height=64, width=80)[0].save(nest / "a.png")
    make_sample(71, height=64, width=80)[0].save(nest / "sub" / "b.png")
    sets = []
    for run in range(3):
        summary = segment(nest, nest / "seg", recursive=True)
        assert summary.failed == []
        sets.append(sum(f.endswith(".json") for _, _, files in os.walk(nest / "seg") for f in files))
        if run:
            assert counts(summary) == (0, 2, 0)
            assert any("left out the output folder" in n for n in summary.notes), summary.notes
    assert sets == [2, 2, 2]
    glob_run = segment(str(nest / "**" / "*.png"), nest / "seg")  # a recursive glob does not enter it either
    assert counts(glob_run) == (0, 2, 0), glob_run
    segment(nest, nest / "seg2")
    flat = segment(nest, nest / "seg2")  # without recursive, the note on subfolders does not name the output
    assert counts(flat) == (0, 1, 0)
    assert any(n.startswith("skipped 2 subfolder(s)") for n in flat.notes), flat.notes  # sub and seg
    assert not any("seg2" in n for n in flat.notes), flat.notes


def test_results_are_never_inputs_when_out_is_the_input_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        make_sample(72 + i, height=64, width=80)[0].save(folder / f"p{i}.jpg")
    assert counts(segment(folder, folder)) == (3, 0, 0)
    again = segment(folder, folder, overwrite=True)
    assert counts(again) == (3, 0, 0)  # not 12: the 9 images of ours are not inputs
    assert any("left out 9 result file(s) written by maskformer segment" in n for n in again.notes), again.notes
    assert len(os.listdir(folder)) == 3 * 5
    explicit = segment(folder / "p0.jpg.overlay.png", tmp_path / "o")  # named on its own: still ours, left out
    assert counts(explicit) == (0, 0, 0) and explicit.notes


# ---------------------------------------------------------------------------------------------
# Unreadable folders are reported (issue 24, item 4)
# ---------------------------------------------------------------------------------------------
def test_an_unreadable_subfolder_is_reported_as_a_skip(tmp_path, monkeypatch):
    """Listing a folder fails (EACCES; simulated: this suite may run as root, which reads any
    folder) -> under recursive, a skip naming the folder; an input folder itself -> a failure."""
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "open").mkdir()
    make_sample(80, height=64, width=80)[0].save(src / "top.png")
    make_sample(81, height=64, width=80)[0].save(src / "locked" / "hidden.png")
    make_sample(82, height=64, width=80)[0].save(src / "open" / "seen.png")
    real_scandir = os.scandir
    locked = {str(src / "locked"), str(tmp_path / "alone")}

    def scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = segment(src, tmp_path / "out", recursive=True)
    assert counts(summary) == (2, 1, 0)
    assert summary.skipped[0].input == str(src / "locked")
    assert summary.skipped[0].reason == "cannot list folder (Permission denied); its images were not segmented"
    assert summary.exit_status == 0
    (tmp_path / "alone").mkdir()
    alone = segment(tmp_path / "alone", tmp_path / "out2")
    assert [(o.input, o.reason) for o in alone.failed] == [
        (str(tmp_path / "alone"), "cannot list folder (Permission denied); check its permissions")]


def test_an_unreadable_subfolder_for_real(tmp_path):
    """The same with real permissions, where they apply (not for root)."""
    if os.geteuid() == 0:
        pytest.skip("root reads every folder; test_an_unreadable_subfolder_is_reported_as_a_skip covers it")
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    make_sample(83, height=64, width=80)[0].save(src / "top.png")
    os.chmod(src / "locked", 0)
    try:
        summary = segment(src, tmp_path / "out", recursive=True)
    finally:
        os.chmod(src / "locked", 0o755)
    assert counts(summary) == (1, 1, 0) and "Permission denied" in summary.skipped[0].reason


# ---------------------------------------------------------------------------------------------
# The lock (issue 24, item 5)
# ---------------------------------------------------------------------------------------------
def test_the_lock_file_is_removed_after_a_run(tmp_path, mixed_folder):
    out = tmp_path / "out"
    assert segment(mixed_folder[0] / "img0.png", out).exit_status == 0
    assert not (out / LOCK_NAME).exists()
    failed = segment([mixed_folder[0] / "img0.png", tmp_path / "missing.png"], out)
    assert failed.exit_status == 1 and not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text("pid 1, started by a run that was killed")  # no one holds it
    assert segment(mixed_folder[0] / "img0.png", out).exit_status == 0
    assert not (out / LOCK_NAME).exists()


def test_a_lock_that_is_released_while_another_run_waits_is_taken_again(tmp_path):
    """The file is unlinked on release, so a run that opened the old file must not go on holding
    a lock nobody else can see."""
    first, second, third = OutputLock(str(tmp_path)), OutputLock(str(tmp_path)), OutputLock(str(tmp_path))
    first.acquire()
    with pytest.raises(OutputError, match=f"another maskformer segment run \\(pid {os.getpid()}"):
        second.acquire()
    # what the second run sees when the first releases between its open() and its flock()
    stale_fd = os.open(first.path, os.O_RDWR)
    first.release()
    assert not os.path.exists(first.path)
    import fcntl

    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an unlinked file: locking it proves nothing
    third.acquire()  # a new file at the path
    with pytest.raises(OutputError):
        second.acquire()
    os.close(stale_fd)
    third.release()
    second.acquire()
    second.release()
    assert not os.path.exists(first.path)


# ---------------------------------------------------------------------------------------------
# Overlays (issue 24, item 6)
# ---------------------------------------------------------------------------------------------
def _legend_colours(overlay, label_map):
    """RGB colours present in the overlay's legend panel (right of the drawing)."""
    from maskformer.overlay import _display_size

    dh, dw = _display_size(*label_map.shape)
    panel = np.asarray(overlay.convert("RGB"))[:, dw:].reshape(-1, 3)
    return {tuple(int(c) for c in p) for p in np.unique(panel, axis=0)}


def _color_map_colours(color_png):
    """{map value: RGB} of the values present in a palette colour map."""
    values = np.unique(np.asarray(color_png))
    palette = np.asarray(color_png.getpalette(), dtype=np.uint8).reshape(-1, 3)
    return {int(v): tuple(int(c) for c in palette[v]) for v in values}


def test_panoptic_legend_shows_every_colour_drawn_as_the_colour_map_has_it():
    """The report: six segments of one class drawn in seven colours with one legend entry, and
    "no segment" grey in the legend while black in the colour map."""
    from maskformer.overlay import FILL_ALPHA, color_map_image, colour_table, legend_entries, render_overlay

    label_map = np.zeros((120, 180), dtype=np.int64)
    for k in range(6):  # six touching segments of class "c3" in a row, no-segment border around
        label_map[20:100, 10 + 26 * k: 36 + 26 * k] = k + 1
    names = {0: "no segment", **{k + 1: "c3" for k in range(6)}}
    photo = Image.new("RGB", (180, 120), (200, 200, 200))
    table = colour_table(label_map, names)
    color = _color_map_colours(color_map_image(label_map, table))
    assert len(set(color.values())) == 7  # the drawing's colours: six shades and no-segment's
    entries = legend_entries(label_map, names, table, per_segment=True)
    assert {c for _, c, _ in entries} == set(color.values())
    assert sorted(t for t, _, _ in entries) == sorted(["no segment"] + [f"c3 #{k + 1}" for k in range(6)])
    overlay = render_overlay(photo, label_map, names, table, per_segment=True)
    assert set(color.values()) <= _legend_colours(overlay, label_map)
    # "no segment" pixels: the colour map's colour over the photo, as every other segment is drawn
    drawn = np.asarray(overlay)[2, 2]  # the no-segment border (the drawing is 256x384: enlarged 2.13x)
    expected = (np.array(color[0]) * FILL_ALPHA + 200 * (256 - FILL_ALPHA)) >> 8
    assert np.array_equal(drawn, expected), (drawn, expected)
    semantic = legend_entries(label_map, names, table, per_segment=False)  # per class: one entry per colour
    assert {c for _, c, _ in semantic} == set(color.values())


def test_panoptic_overlays_of_a_mask2former_checkpoint_explain_every_colour(tmp_path):
    """Through segment_folder, with a small random transformers Mask2Former checkpoint whose class
    head is sharpened so that panoptic maps have several segments of the same classes."""
    import torch
    import transformers

    backbone = transformers.SwinConfig(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 3], window_size=7,
                                       out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0)
    id2label = {i: f"class_{i}" for i in range(5)}
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=2, decoder_layers=4, num_attention_heads=4, num_queries=10,
        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    hf_model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():  # transformers' init leaves many zeros: a livelier random model
            p.add_(0.2 * torch.randn_like(p))
        hf_model.class_predictor.weight.mul_(30)
    hf_model.save_pretrained(tmp_path / "ckpt")
    transformers.Mask2FormerImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(
        tmp_path / "ckpt")
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(90, 130), (150, 101), (120, 120)]):
        make_sample(90 + i, height=h, width=w)[0].save(src / f"img{i}.png")
    out = tmp_path / "out"
    summary = segment(src, out, model=tmp_path / "ckpt", task="panoptic")
    assert counts(summary) == (3, 0, 0), summary.failed
    most = 0
    for i in range(3):
        label_map = label(out / f"img{i}.png.label.png")
        color = _color_map_colours(Image.open(out / f"img{i}.png.color.png"))
        record = json.loads((out / f"img{i}.png.json").read_text())
        assert set(color) == set(np.unique(label_map).tolist())
        most = max(most, len(record["segments"]))
        missing = set(color.values()) - _legend_colours(Image.open(out / f"img{i}.png.overlay.png"), label_map)
        assert not missing, f"img{i}: colours drawn but not in the legend: {missing}"
    assert most >= 2, "the sharpened model should give several segments"


def test_overlays_are_legible_at_any_size(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_sample(24, height=10, width=10)[0].save(src / "tiny.png")
    make_sample(25, height=120, width=1200)[0].save(src / "wide.png")
    out = tmp_path / "out"
    assert segment(src, out, task="panoptic").exit_status == 0
    tiny = Image.open(out / "tiny.png.overlay.png")
    assert tiny.height >= 256  # upscaled so that the legend is readable beside it
    color = Image.open(out / "wide.png.color.png")
    assert color.mode == "P" and color.size == (1200, 120)  # a viewer shows colours; values are ids
    assert np.array_equal(np.asarray(color), label(out / "wide.png.label.png"))
    assert segment(src / "tiny.png", tmp_path / "o2", color_map=False).exit_status == 0
    assert not (tmp_path / "o2" / "tiny.png.color.png").exists()


def test_backend_plan_reads_the_op_registry_per_model_family(monkeypatch):
    """The forced-backend plan comes from the op registry: Mask2Former's deformable attention
    (which the old hand-written tables left out) is listed, and a phase is forced only when all of
    its ops have a kernel on that backend (dispatch forces one backend per block)."""
    from maskformer import _ext
    from maskformer.segment import backend_plan

    if _ext.cpp_import_error() is None:
        forward, post, line = backend_plan("cpp", "cpu", "semantic", "mask2former")
        assert (forward, post) == (None, "cpp")
        assert "mask2former_semantic (semantic post-processing) on cpp" in line
        assert "ms_deform_attn (network) on auto (its phase has ops without a cpp kernel)" in line
        assert "no cpp kernel for window_attention (network): auto" in line
        with pytest.raises(ValueError, match="cannot be forced on any phase of task='instance' for a mask2former"):
            backend_plan("cpp", "cpu", "instance", "mask2former")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _ext.triton_import_error() is None:
        forward, post, line = backend_plan("triton", "cpu", "semantic", "mask2former")
        assert (forward, post) == ("triton", "triton")
        assert line == ("backend triton: window_attention (network) on triton, ms_deform_attn (network) on triton, "
                        "mask2former_semantic (semantic post-processing) on triton")
        forward, post, line = backend_plan("triton", "cpu", "panoptic", "maskformer")
        assert (forward, post) == ("triton", None) and "no triton kernel for query_argmax" in line
