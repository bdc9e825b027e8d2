"""Hostile checkpoint files and absurd configs fail fast, with the field or file named.

transformers is the reference for what a well-formed checkpoint looks like (its save_pretrained
writes the fixtures); for these inputs it either runs out of time or memory, or reads files outside
the checkpoint, so the tests pin our error and its speed instead of a transformers result.
"""
import json
import os
import shutil
import sys
import time

import pytest

import torch

from maskformer import CheckpointError, ConfigError, MaskFormerConfig, MaskFormerForInstanceSegmentation

FAST = 1.0  # seconds: every refusal below happens before any model or large tensor is built


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(folder, edit):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))


# ------------------------------------------------------------------------------------------------
# 9. absurd sizes and wrong types in config.json
# ------------------------------------------------------------------------------------------------
ABSURD = {
    # field: (edit of config.json, the field name the error must carry)
    "num_labels=1e9": (lambda c: (c.pop("id2label"), c.pop("label2id"), c.update(num_labels=10**9)), "num_labels"),
    "decoder_layers=1e6": (lambda c: c["decoder_config"].update(decoder_layers=10**6), "decoder_config.decoder_layers"),
    "depths=[1000]*4": (lambda c: c["backbone_config"].update(depths=[1000] * 4), "backbone_config.depths"),
    "window_size=300": (lambda c: c["backbone_config"].update(window_size=300), "backbone_config.window_size"),
    "depths='abc'": (lambda c: c["backbone_config"].update(depths="abc"), "backbone_config.depths"),
    "num_queries='8'": (lambda c: c["decoder_config"].update(num_queries="8"), "decoder_config.num_queries"),
    "embed_dim=-32": (lambda c: c["backbone_config"].update(embed_dim=-32), "backbone_config.embed_dim"),
    "id2label key 'cat'": (lambda c: c.update(id2label={"cat": "x"}), "id2label"),
    "num_heads=[1e9]": (lambda c: c["backbone_config"].update(num_heads=[10**9] * 4), "backbone_config.num_heads"),
    "mlp_ratio=nan": (lambda c: c["backbone_config"].update(mlp_ratio=float("nan")), "backbone_config.mlp_ratio"),
    "d_model=2**40": (lambda c: c["decoder_config"].update(d_model=2**40), "decoder_config.d_model"),
    "qkv_bias='yes'": (lambda c: c["backbone_config"].update(qkv_bias="yes"), "backbone_config.qkv_bias"),
    "huge model": (lambda c: c["backbone_config"].update(embed_dim=4096, num_heads=[1, 1, 1, 1]), "embed_dim"),
}


@pytest.mark.parametrize("case", list(ABSURD), ids=list(ABSURD))
def test_absurd_config_fails_fast_naming_the_field(tmp_path, hf_tiny_checkpoint, case):
    edit, field = ABSURD[case]
    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    edit_config(folder, edit)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert time.perf_counter() - start < FAST
    assert field in str(info.value)


def test_config_changed_after_construction_is_checked_when_the_model_is_built():
    config = MaskFormerConfig()
    config.decoder_config.decoder_layers = 10**6
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="decoder_config.decoder_layers"):
        MaskFormerForInstanceSegmentation(config)
    assert time.perf_counter() - start < FAST


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["decoder_config"].update(decoder_layers=90), "decoder_config.decoder_layers=90 but the checkpoint has 2"),
        (lambda c: c["backbone_config"].update(depths=[1, 1, 2, 2]), "backbone_config.depths=[1, 1, 2, 2] but the checkpoint has [1, 1, 2, 1]"),
        (lambda c: c["backbone_config"].update(depths=[1, 1, 2, 1, 1], num_heads=[1, 2, 4, 8, 16]), "has 5 stages but the checkpoint has 4"),
        (lambda c: c["backbone_config"].update(window_size=7), "backbone_config.window_size=7 but the checkpoint has window_size 3"),
        (lambda c: c["backbone_config"].update(num_heads=[2, 2, 4, 8]), "backbone_config.num_heads[0]=2 but the checkpoint has 1 heads"),
        (lambda c: c["backbone_config"].update(embed_dim=64), "backbone_config.embed_dim=64 but the checkpoint has 32"),
        (lambda c: c["backbone_config"].update(mlp_ratio=8.0), "backbone_config.mlp_ratio=8.0"),
        (lambda c: c["decoder_config"].update(num_queries=9000), "decoder_config.num_queries=9000 but the checkpoint has 5 queries"),
        (lambda c: c["decoder_config"].update(decoder_ffn_dim=4096), "decoder_config.decoder_ffn_dim=4096 but the checkpoint has 64"),
        (lambda c: c.update(fpn_feature_size=8192), "fpn_feature_size=8192 but the checkpoint has 32"),
        (lambda c: c.update(id2label={str(i): str(i) for i in range(90000)}, label2id={}), "num_labels=90000 but the checkpoint's class head has 4"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_config_that_does_not_describe_the_weights_fails_before_building(tmp_path, hf_tiny_checkpoint, edit, field):
    """In range, but not what the checkpoint holds: the field is named, compared with the tensors' shapes."""
    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    edit_config(folder, edit)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert time.perf_counter() - start < FAST
    assert field in str(info.value)


# ------------------------------------------------------------------------------------------------
# 8. a shard index may only name plain files inside the checkpoint folder
# ------------------------------------------------------------------------------------------------
def _sharded(tmp_path, hf_tiny_checkpoint):
    folder = str(tmp_path / "ckpt")
    model = MaskFormerForInstanceSegmentation.from_pretrained(hf_tiny_checkpoint[0])
    model.save_pretrained(folder, max_shard_size="100KB")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    return folder, index_path, json.load(open(index_path))


def _point_first_shard_at(folder, index_path, index, target):
    """Rewrite the index so the first shard's tensors come from ``target``; a real copy of the shard
    is put there, so following the path would load cleanly: only the path check can stop it."""
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    json.dump(index, open(index_path, "w"))
    return first


@pytest.mark.parametrize("target", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", "/etc/passwd",
                                    "", "./"])
def test_shard_paths_outside_the_folder_are_refused(tmp_path, hf_tiny_checkpoint, target):
    folder, index_path, index = _sharded(tmp_path, hf_tiny_checkpoint)
    outside = str(tmp_path / "outside.safetensors")
    target = outside if target == "ABS" else target
    first = _point_first_shard_at(folder, index_path, index, target)
    shutil.copy(os.path.join(folder, first), outside)
    with pytest.raises(CheckpointError, match="not a plain file name inside the checkpoint folder"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


def test_shard_that_is_not_a_regular_file_is_refused(tmp_path, hf_tiny_checkpoint):
    folder, index_path, index = _sharded(tmp_path, hf_tiny_checkpoint)
    first = _point_first_shard_at(folder, index_path, index, "zeros.safetensors")
    os.symlink("/dev/zero", os.path.join(folder, "zeros.safetensors"))  # would be read forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    os.remove(os.path.join(folder, "zeros.safetensors"))
    os.mkdir(os.path.join(folder, "zeros.safetensors"))
    with pytest.raises(CheckpointError, match="not a regular file"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert first  # the index did point elsewhere


@pytest.mark.parametrize(
    "weight_map, match",
    [
        (["model-00001-of-00002.safetensors"], "weight_map must be an object"),
        ({"a": 3}, "must map names"),
        ("x", "weight_map must be an object"),
    ],
)
def test_malformed_index_names_the_field(tmp_path, hf_tiny_checkpoint, weight_map, match):
    folder, index_path, index = _sharded(tmp_path, hf_tiny_checkpoint)
    index["weight_map"] = weight_map
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match=match):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


def test_symlinked_shards_inside_a_hub_style_snapshot_still_load(tmp_path, hf_tiny_checkpoint):
    """The hub cache's snapshot folders hold links into ../../blobs: regular files behind links load."""
    folder, _, _ = _sharded(tmp_path, hf_tiny_checkpoint)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for name in os.listdir(folder):
        shutil.move(os.path.join(folder, name), blobs / name)
        os.symlink(os.path.join("..", "blobs", name), snapshot / name)
    assert MaskFormerForInstanceSegmentation.from_pretrained(str(snapshot)).config.num_labels == 4


# ------------------------------------------------------------------------------------------------
# 10. a stored relative_position_index must be the one the config defines
# ------------------------------------------------------------------------------------------------
def test_tampered_relative_position_index_is_refused(tmp_path, hf_tiny_checkpoint):
    from safetensors.torch import load_file, save_file
    from transformers import MaskFormerForInstanceSegmentation as HF

    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    key = "model.pixel_level_module.encoder.model.encoder.layers.1.blocks.0.attention.self.relative_position_index"
    state[key][0, 1] = -5
    save_file(state, path, metadata={"format": "pt"})
    # transformers uses it as stored: a finite output, silently different from the untouched checkpoint's
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        clean = HF.from_pretrained(hf_tiny_checkpoint[0]).eval()(x).class_queries_logits
        tampered = HF.from_pretrained(folder).eval()(x).class_queries_logits
    assert torch.isfinite(tampered).all() and not torch.allclose(clean, tampered)
    with pytest.raises(CheckpointError, match=r"layers\.1\.blocks\.0\.attention\.self\.relative_position_index differs "
                                              r"from .* window_size=3 defines \(first difference at \(0, 1\): stored -5"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------
# 16. files that are not what they claim to be: the error names the file
# ------------------------------------------------------------------------------------------------
UNREADABLE_JSON = {
    "invalid UTF-8": b'{"model_type": "maskformer", "id2label": {"0": "caf\xe9"}}',  # Latin-1, not UTF-8
    "100k-deep nesting": b"[" * 100_000 + b"]" * 100_000,  # json.load: RecursionError
}


@pytest.mark.parametrize("case", list(UNREADABLE_JSON), ids=list(UNREADABLE_JSON))
def test_unreadable_config_json_names_the_file(tmp_path, hf_tiny_checkpoint, case):
    from maskformer import MaskFormerImageProcessor
    from maskformer.loading import checkpoint_family

    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    path = os.path.join(folder, "config.json")
    with open(path, "wb") as f:
        f.write(UNREADABLE_JSON[case])
    for load in (MaskFormerForInstanceSegmentation.from_pretrained, MaskFormerConfig.from_pretrained, checkpoint_family):
        with pytest.raises(ConfigError) as info:
            load(folder)
        assert path in str(info.value) and "re-download" in str(info.value)
    processor_path = os.path.join(folder, "preprocessor_config.json")
    with open(processor_path, "wb") as f:
        f.write(UNREADABLE_JSON[case])
    with pytest.raises(ValueError) as info:
        MaskFormerImageProcessor.from_pretrained(folder)
    assert processor_path in str(info.value)


def test_safetensors_that_cannot_be_mapped_names_the_file(tmp_path, hf_tiny_checkpoint, monkeypatch):
    """safetensors maps the file; under a memory limit that fails with "Cannot allocate memory (os error
    12)", a MemoryError that names no file. Ours names it, its size and the fix (same exception type)."""
    from maskformer import checkpoint

    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")

    def no_memory(*args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(checkpoint, "safe_open", no_memory)  # safetensors' safe_open, as checkpoint.py calls it
    with pytest.raises(MemoryError, match=r"model\.safetensors \(\d+ MB\) could not be mapped into memory \(Cannot "
                                          r"allocate memory \(os error 12\)\).*raise the limit"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_safetensors_under_an_address_space_limit_names_the_file(tmp_path):
    """The same with a real limit: a child process whose address space has 32 MB left maps a 128 MB file."""
    import subprocess

    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(32 * 2**20)}, path)  # 128 MB of float32
    code = (
        "import re, resource\n"
        "from maskformer.checkpoint import _read_safetensors\n"
        "import safetensors.torch\n"
        "vm = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 32 * 2**20, resource.RLIM_INFINITY))\n"
        f"try:\n    _read_safetensors({path!r})\n    print('LOADED')\n"
        "except MemoryError as exc:\n    print('MEMORYERROR', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("MEMORYERROR"), (out.stdout, out.stderr[-2000:])
    assert path in out.stdout and "could not be mapped into memory" in out.stdout
