"""The engine cache under damage, concurrency, sharing and read-only folders (issue #24, items
7-13 and 15): what is served is checked by content, a damaged entry is rebuilt and said, one
process builds while the others wait, killed builds leave nothing behind for good, entries keep
the umask, labels do not re-export, OpenVINO's compiled shapes are bounded and checked, a
read-only cache is named before the work; and the engines package imports one way.

Exports cost tens of seconds on this machine: the tests reuse the session's entries (copied into
a private cache folder where they are damaged) and export only where a build is the point."""
import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from maskformer import MaskFormerForInstanceSegmentation
from maskformer.engines import cache, engine_module, engine_unavailable
from maskformer.engines import export as engine_export
from maskformer.export import REL_ERROR_BAR

from hf_oracle import make_hf_model

HAVE = {name: engine_unavailable(name) is None for name in ("onnxruntime", "openvino")}
needs_ort = pytest.mark.skipif(not HAVE["onnxruntime"], reason=str(engine_unavailable("onnxruntime")))
needs_ov = pytest.mark.skipif(not HAVE["openvino"], reason=str(engine_unavailable("openvino")))


def load(checkpoint, engine, root, **kwargs):
    return MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, engine=engine, engine_cache_dir=str(root),
                                                             **kwargs)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture
def session_entries(engine_checkpoint, engine_cache):
    """{engine: entry folder} of the session's cache (built once per session)."""
    return {e: load(engine_checkpoint, e, engine_cache).cache_entry for e in ("onnxruntime", "openvino") if HAVE[e]}


def copy_entries(entries, root):
    os.makedirs(root, exist_ok=True)
    for path in entries.values():
        shutil.copytree(path, os.path.join(root, os.path.basename(path)), ignore=shutil.ignore_patterns("compiled"))
    return {e: os.path.join(root, os.path.basename(p)) for e, p in entries.items()}


@pytest.fixture
def count_exports(monkeypatch):
    calls = []
    real = engine_export.export_onnx
    monkeypatch.setattr(engine_export, "export_onnx", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    return calls


def zero_bytes(path, count):
    """Zero ``count`` bytes in the middle of ``path``: same size, other content."""
    size = os.path.getsize(path)
    count = min(count, size // 2)
    with open(path, "r+b") as f:
        f.seek((size - count) // 2)
        f.write(b"\0" * count)
    assert os.path.getsize(path) == size


def modes(folder):
    return {os.path.relpath(os.path.join(d, n), folder): os.stat(os.path.join(d, n)).st_mode & 0o777
            for d, dirs, files in os.walk(folder) for n in dirs + files}


@needs_ort
def test_damaged_entries_are_rebuilt_said_and_keep_the_umask(engine_checkpoint, session_entries, tmp_path,
                                                            count_exports, capfd):
    """Items 7, 8, 11: 1 MB zeroed in a cached model.onnx (InvalidProtobuf before, on every load)
    and 4 KiB zeroed in OpenVINO's model.bin (used as is before: same sizes) are found by their
    SHA-256, rebuilt (the OpenVINO one from the fresh ONNX Runtime export, no second export) and
    said; the rebuilt entries have the umask's permissions (0700 before: a shared cache failed)."""
    root = tmp_path / "cache"
    entries = copy_entries(session_entries, root)
    torch_model = MaskFormerForInstanceSegmentation.from_pretrained(engine_checkpoint)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        ref = torch_model(x).masks_queries_logits
    zero_bytes(os.path.join(entries["onnxruntime"], "model.onnx"), 1 << 20)
    if HAVE["openvino"]:
        zero_bytes(os.path.join(entries["openvino"], "model.bin"), 4096)
    old = os.umask(0o002)  # a cache shared by a group
    try:
        for engine in entries:
            model = load(engine_checkpoint, engine, root)
            assert model.cache_entry == entries[engine]
            assert rel_err(model(x).masks_queries_logits, ref) <= REL_ERROR_BAR, engine
    finally:
        os.umask(old)
    err = capfd.readouterr().err
    assert f"the cached onnxruntime engine {entries['onnxruntime']} is damaged (model.onnx differs from the file " \
           "built (SHA-256)); rebuilding it" in err, err
    if HAVE["openvino"]:
        assert f"the cached openvino engine {entries['openvino']} is damaged (model.bin differs" in err, err
    assert len(count_exports) == 1  # OpenVINO's rebuild copied the fresh ONNX Runtime export
    for engine, entry in entries.items():
        key = json.load(open(os.path.join(entry, cache.MANIFEST)))["key"]
        assert cache.check_entry(entry, key) is None
        perms = modes(entry)
        assert os.stat(entry).st_mode & 0o777 == 0o775
        assert perms and all(m in (0o664, 0o775) for m in perms.values()), perms
    assert not [n for n in os.listdir(root) if n.startswith((".build-", ".trash-")) or n.endswith(".lock")]


@needs_ort
def test_labels_override_reuses_the_plain_entry(engine_checkpoint, engine_cache, session_entries, monkeypatch):
    """Item 12: id2label= names the classes but shapes nothing: the same entry serves it (no
    export, the plain entry kept), and the model's config carries the labels asked for."""
    plain = load(engine_checkpoint, "onnxruntime", engine_cache)
    monkeypatch.setattr(engine_export, "export_onnx", lambda *a, **k: pytest.fail("exported again for new labels"))
    labels = {i: f"thing{i}" for i in range(plain.config.num_labels)}
    relabeled = load(engine_checkpoint, "onnxruntime", engine_cache, id2label=labels)
    assert relabeled.cache_entry == plain.cache_entry == session_entries["onnxruntime"]
    assert relabeled.config.id2label == labels and plain.config.id2label != labels
    assert relabeled.config.label2id == {v: k for k, v in labels.items()}
    again = load(engine_checkpoint, "onnxruntime", engine_cache)
    assert again.cache_entry == plain.cache_entry and again.config.id2label == plain.config.id2label
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(relabeled(x).class_queries_logits, plain(x).class_queries_logits)


def test_source_key_notices_a_rewrite_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    """Item 7: a checkpoint rewritten with other weights of the same size, its mtime put back
    (``touch -r``, ``cp -p``), gets a new key (it served the old export before); an untouched
    file's remembered hash is reused without reading it."""
    fake = type("FakeEngine", (), {"versions": staticmethod(lambda: {"fake": "1"})})
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    make_hf_model(window_size=3, depths=(1, 1, 1, 1), num_queries=4).save_pretrained(ckpt)
    make_hf_model(window_size=3, depths=(1, 1, 1, 1), num_queries=4, seed=3).save_pretrained(other)
    weights = ckpt / "model.safetensors"
    assert weights.stat().st_size == (other / "model.safetensors").stat().st_size
    root = tmp_path / "cache"
    root.mkdir()

    def key():
        return cache.compute_key(str(ckpt), "onnxruntime", fake, str(root))[0]

    time.sleep(cache._RACY_S + 0.1)  # past the window in which a hash is not remembered
    first = key()
    assert str(weights.resolve()) in json.load(open(root / cache.FILE_HASHES))
    before = weights.stat()
    shutil.copyfile(other / "model.safetensors", weights)  # in place: same inode
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    second = key()
    assert second != first
    time.sleep(cache._RACY_S + 0.1)
    assert key() == second  # remembered now
    monkeypatch.setattr(cache, "sha256_of", lambda path: pytest.fail(f"{path} read again"))
    assert key() == second


def _refuse_writes_under(monkeypatch, root):
    """Make ``root`` behave as a read-only file system (EROFS) for this process: the tests run as
    root here, for whom a chmod would not refuse anything."""
    root = os.path.abspath(root)

    def guard(real, write_flags=None):
        def wrapped(path, *args, **kwargs):
            inside = os.path.abspath(os.fspath(path)).startswith(root + os.sep) or os.path.abspath(os.fspath(path)) == root
            flags = args[0] if args else kwargs.get("flags", 0)
            if inside and (write_flags is None or flags & write_flags):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "open", guard(os.open, os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    for name in ("mkdir", "rename", "replace", "remove", "unlink", "utime"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


@needs_ort
def test_read_only_cache_is_named_before_the_work_and_serves_hits(engine_checkpoint, session_entries, tmp_path,
                                                                 monkeypatch):
    """Item 15: a miss in a cache that cannot be written to says which folder and how to choose
    another, before the model is loaded (a raw EROFS after the load before); a hit is served."""
    import maskformer.checkpoint as checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    copy_entries(session_entries, full)
    _refuse_writes_under(monkeypatch, str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
        with pytest.raises(cache.EngineCacheError) as info:
            load(engine_checkpoint, "onnxruntime", empty)
    message = str(info.value)
    assert str(empty) in message and "not writable" in message and "engine_cache_dir=" in message
    assert "MASKFORMER_ENGINE_CACHE" in message
    assert os.listdir(empty) == []
    for engine in session_entries:
        model = load(engine_checkpoint, engine, full)  # a hit: only read
        assert model(torch.randn(1, 3, 64, 64)).masks_queries_logits.shape == (1, 6, 16, 16)


_CHILD = r"""
import os, sys, time
from maskformer.engines import export
real = export.export_onnx
def gated(*args, **kwargs):
    open(os.environ["MF_STARTED"], "w").close()
    gate = os.environ.get("MF_GATE")
    while gate and not os.path.exists(gate):
        time.sleep(0.1)
    with open(os.environ["MF_COUNT"], "a") as f:
        f.write("x")
    return real(*args, **kwargs)
export.export_onnx = gated
from maskformer import MaskFormerForInstanceSegmentation
model = MaskFormerForInstanceSegmentation.from_pretrained(sys.argv[1], engine="onnxruntime", engine_cache_dir=sys.argv[2],
                                                          threads=1)
print(model.cache_entry)
"""


def _spawn(checkpoint, root, folder, name, gate=None):
    env = dict(os.environ, MF_STARTED=str(folder / f"{name}.started"), MF_GATE=str(gate or ""),
               MF_COUNT=str(folder / "exports"))
    err = open(folder / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, checkpoint, str(root)], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env)
    proc.err_path = folder / f"{name}.err"
    return proc


def _wait_for(what, predicate, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@needs_ort
def test_one_process_builds_the_others_wait_and_a_killed_builder_is_replaced(engine_checkpoint, tmp_path):
    """Items 9, 10 and 18: a second process that needs the entry being built says whom it waits
    for and loads what the first built (one export, not two); when the builder is killed
    (SIGKILL, mid-build) the waiter takes over: it removes the killed build's folder, builds, says
    each phase, and leaves no lock file or build folder behind."""
    # 1. wait, then reuse
    root = tmp_path / "cache"
    gate = tmp_path / "go"
    builder = _spawn(engine_checkpoint, root, tmp_path, "builder", gate=gate)
    _wait_for("the builder to start exporting", (tmp_path / "builder.started").exists)
    waiter = _spawn(engine_checkpoint, root, tmp_path, "waiter")
    _wait_for("the waiter to wait", lambda: "waiting for it" in waiter.err_path.read_text())
    assert f"another process (pid {builder.pid} on " in waiter.err_path.read_text()
    gate.touch()
    outs = [p.communicate(timeout=900)[0].strip() for p in (builder, waiter)]
    assert builder.returncode == waiter.returncode == 0, waiter.err_path.read_text()[-3000:]
    assert outs[0] == outs[1] and (tmp_path / "exports").read_text() == "x"  # one export
    assert "the other process finished after" in waiter.err_path.read_text()
    assert set(os.listdir(root)) - {cache.FILE_HASHES} == {os.path.basename(outs[0])}

    # 2. the builder is killed mid-build: the waiter builds, and what the killed one left goes
    shutil.rmtree(outs[0])
    (tmp_path / "exports").unlink()
    for name in ("builder", "waiter"):
        (tmp_path / f"{name}.started").unlink(missing_ok=True)
    builder = _spawn(engine_checkpoint, root, tmp_path, "builder", gate=tmp_path / "never")
    _wait_for("the builder to start exporting", (tmp_path / "builder.started").exists)
    assert [n for n in os.listdir(root) if n.startswith(".build-")]
    waiter = _spawn(engine_checkpoint, root, tmp_path, "waiter")
    _wait_for("the waiter to wait", lambda: "waiting for it" in waiter.err_path.read_text())
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait(timeout=60)
    out = waiter.communicate(timeout=900)[0].strip()
    err = waiter.err_path.read_text()
    assert waiter.returncode == 0, err[-3000:]
    assert set(os.listdir(root)) - {cache.FILE_HASHES} == {os.path.basename(out)}  # no .build-*, no lock
    # each phase of the build on its own line, with what it does and how long it took (item 18)
    lines = [line for line in err.splitlines() if line.startswith("maskformer: ")]
    expected = ["building the onnxruntime engine of", "exporting to ONNX", "exported in",
                "verifying with onnxruntime against PyTorch at 3 sizes", "1x3x", "2x3x", "1x3x",
                "the onnxruntime engine is ready"]
    position = -1
    for text in expected:
        matches = [i for i, line in enumerate(lines) if text in line and i > position]
        assert matches, f"no line with {text!r} after line {position}: {lines}"
        position = matches[0]
    assert "roughly" in next(line for line in lines if "exporting to ONNX" in line)


def test_abandoned_builds_and_stale_locks_are_removed_live_ones_kept(tmp_path):
    """Item 10 and the lock: the ``.build-*`` folder of a build whose lock nobody holds is removed,
    one whose lock is held is kept; an unheld lock file (a killed builder's, with its pid) does not
    block the next build and is removed; an older maskformer's build folder and a killed writer's
    temporary JSON go once an hour old, a folder renamed aside for deletion at once."""
    import fcntl

    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed, live, stale_lock = "onnxruntime-" + "a" * 24, "openvino-" + "b" * 24, "openvino-" + "c" * 24
    (root / f".build-{killed}-{dead.pid}-deadbeef").mkdir()
    (root / f".{killed}.lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "since": "then"}))
    (root / f".build-{live}-{os.getpid()}-cafebabe").mkdir()
    held = os.open(root / f".{live}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    (root / f".{stale_lock}.lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "since": "then"}))
    old, young = root / ".build-onnxruntime-x1y2z3ab", root / ".build-openvino-q9w8e7rt"
    old.mkdir()
    young.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    trash, old_tmp, young_tmp = root / f".trash-{live}-0123abcd", root / ".tmp-1-00000000", root / ".tmp-2-11111111"
    (trash / "compiled").mkdir(parents=True)
    old_tmp.write_text("{")
    young_tmp.write_text("{")
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    try:
        notes = []
        entry = str(root / killed)
        start = time.monotonic()
        with cache.build_lock(str(root), entry, what="a test entry", log=notes.append):
            assert time.monotonic() - start < 5 and notes == []  # the stale lock did not block
            assert json.loads((root / f".{killed}.lock").read_text())["pid"] == os.getpid()
            removed = cache.remove_abandoned_builds(str(root), holding=entry)
        assert sorted(os.path.basename(p) for p in removed) == sorted(
            [f".build-{killed}-{dead.pid}-deadbeef", f".{stale_lock}.lock", old.name, trash.name, old_tmp.name])
        assert sorted(os.listdir(root)) == sorted([f".build-{live}-{os.getpid()}-cafebabe", f".{live}.lock", young.name,
                                                   young_tmp.name])
    finally:
        os.close(held)


class CountingCore:
    """An OpenVINO Core that counts its compiles."""

    def __init__(self, core):
        self.core, self.compiles = core, 0

    def compile_model(self, *args, **kwargs):
        self.compiles += 1
        return self.core.compile_model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.core, name)


@needs_ov
def test_openvino_compiled_shapes_are_bounded_checked_and_reused(engine_checkpoint, session_entries, tmp_path):
    """Item 13: compiled shapes kept on disk stay within the runner's bound (least recently used
    first out; OpenVINO's own CACHE_DIR kept every shape before), a blob whose bytes no longer
    match its SHA-256 is deleted and compiled again, and a good one is read back, not compiled."""
    from maskformer.engines import openvino_engine

    root = tmp_path / "cache"
    entry = copy_entries({"openvino": session_entries["openvino"]}, root)["openvino"]
    folder = os.path.join(entry, openvino_engine.COMPILED_DIR)
    runner = load(engine_checkpoint, "openvino", root).runner
    shapes = [(1, 3, 64, 64 + 8 * i) for i in range(4)]
    runner.compiled_for(shapes[0])
    [first] = os.listdir(folder)
    blob = os.path.getsize(os.path.join(folder, first))
    runner.compiled_bytes_bound = int(2.5 * blob)  # room for two shapes
    for shape in shapes[1:]:
        runner.compiled_for(shape)
        time.sleep(0.01)  # distinct mtimes: the order of use
    kept = sorted(os.listdir(folder))
    assert len(kept) == 2 and sum(os.path.getsize(os.path.join(folder, n)) for n in kept) <= runner.compiled_bytes_bound
    assert [n.split("-")[0] for n in kept] == ["1x3x64x80", "1x3x64x88"]  # the two most recent
    bound = openvino_engine.Runner.from_entry(entry, 1).compiled_bytes_bound
    assert bound == max(openvino_engine.COMPILED_MODELS_KEPT * os.path.getsize(os.path.join(entry, "model.bin")),
                        openvino_engine.COMPILED_MIN_BYTES)

    x = torch.randn(*shapes[3])
    want = load(engine_checkpoint, "openvino", root)(x).masks_queries_logits
    zero_bytes(os.path.join(folder, kept[0]), 4096)  # the 1x3x64x80 blob
    fresh = load(engine_checkpoint, "openvino", root).runner
    fresh.core = CountingCore(fresh.core)
    fresh.compiled_for(shapes[2])
    assert fresh.core.compiles == 1 and kept[0] not in os.listdir(folder)  # damaged: deleted, compiled again
    fresh.compiled_for(shapes[3])
    assert fresh.core.compiles == 1  # read back from its blob
    assert torch.equal(fresh.infer(fresh.compiled_for(shapes[3]).create_infer_request(), x)[1], want)


def test_engines_package_imports_one_way():
    """Issue #20 item 3: within maskformer/engines the layers are registry and the engine modules
    (they import nothing of maskformer but its bottom, _ext) < export and precision (the dtype plan) < cache < model < the
    package __init__; nothing in
    it imports maskformer.export (the public path, which imports it) or takes a name from the
    package __init__ (``from .. import __version__`` was one: it now comes from maskformer._version)."""
    import maskformer.engines

    folder = os.path.dirname(maskformer.engines.__file__)
    layers = [{"registry", "onnxruntime_engine", "openvino_engine"}, {"export", "precision"}, {"cache"}, {"model"}, {"__init__"}]
    level = {name: i for i, group in enumerate(layers) for name in group}
    package_modules = {n[:-3] for n in os.listdir(os.path.dirname(folder)) if n.endswith(".py")}
    problems = []
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith(".py"):
            continue
        name = filename[:-3]
        assert name in level, f"engines/{filename} is not in the layer list of this test"
        tree = ast.parse(open(os.path.join(folder, filename), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level == 1:  # maskformer.engines.X
                    targets = [node.module] if node.module else [a.name for a in node.names]
                    for target in targets:
                        if level.get(target.split(".")[0], -1) >= level[name] and target != name:
                            problems.append(f"engines/{filename} imports .{target}, not below it")
                else:  # maskformer.X
                    targets = [node.module] if node.module else [a.name for a in node.names]
                    for target in targets:
                        if target.split(".")[0] not in package_modules or target == "export":
                            problems.append(f"engines/{filename} imports maskformer.{target} "
                                            "(the package __init__ or the export's public path)")
                    # but maskformer._ext, the package's bottom (it imports only torch), which loads the
                    # C++ kernel that ONNX Runtime's runner runs as Mask2Former's deformable attention
                    if level[name] == 0 and targets != ["_ext"]:
                        problems.append(f"engines/{filename} imports maskformer.{targets}: the runners import "
                                        "nothing of maskformer")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"engines/{filename} imports {n} by its absolute name" for n in names
                             if n.startswith("maskformer")]
    assert not problems, problems
    facade = ast.parse(open(os.path.join(os.path.dirname(folder), "export.py"), encoding="utf-8").read())
    assert {n.module for n in ast.walk(facade) if isinstance(n, ast.ImportFrom)} == {"engines.export"}
