"""Checkpoint loading and saving: transformers' files in, ours out, and every way a file can be wrong."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskformer import (CheckpointError, ConfigError, InputError, MaskFormerConfig, MaskFormerForInstanceSegmentation,
                        MaskFormerModel)

from hf_oracle import assert_close_rel, make_hf_model

TOL = 1e-5  # see test_parity_transformers.py


def outputs_match(ours, hf_model, x):
    with torch.no_grad():
        ref, out = hf_model(x), ours(x)
    for name in ("class_queries_logits", "masks_queries_logits"):
        assert_close_rel(out[name], ref[name], TOL, name)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("safe", [True, False])
def test_transformers_checkpoint_loads_and_reproduces_outputs(tmp_path, safe):
    hf_model = make_hf_model(window_size=7)
    hf_model.save_pretrained(tmp_path, safe_serialization=safe) if not safe else hf_model.save_pretrained(tmp_path)
    expected = "model.safetensors" if safe else "pytorch_model.bin"
    if not os.path.exists(tmp_path / expected):
        # transformers 5 may always write safetensors; write the .bin the way older versions did
        assert not safe
        sd = load_file(tmp_path / "model.safetensors")
        os.remove(tmp_path / "model.safetensors")
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = MaskFormerForInstanceSegmentation.from_pretrained(str(tmp_path))
    assert not ours.training
    outputs_match(ours, hf_model, torch.randn(2, 3, 70, 90))


def test_sharded_transformers_checkpoint_loads(tmp_path):
    hf_model = make_hf_model(window_size=7)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json"), os.listdir(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    outputs_match(MaskFormerForInstanceSegmentation.from_pretrained(tmp_path), hf_model, torch.randn(1, 3, 64, 64))


def test_state_dict_keys_are_the_file_keys(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    file_keys = set(load_file(os.path.join(folder, "model.safetensors")))
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert set(ours.state_dict()) == file_keys


def test_round_trip_through_our_save_pretrained(tmp_path, hf_tiny_checkpoint):
    folder, hf_model = hf_tiny_checkpoint
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "ours")
    again = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path / "ours")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        a, b = ours(x), again(x)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)
    assert again.config == ours.config
    # transformers reads what we wrote, and agrees
    from transformers import MaskFormerForInstanceSegmentation as HF

    hf_again = HF.from_pretrained(tmp_path / "ours").eval()
    outputs_match(again, hf_again, x)


def test_our_sharded_and_bin_saves_load(tmp_path, hf_tiny_checkpoint):
    folder, hf_model = hf_tiny_checkpoint
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    for sub in ("sharded", "bin"):
        outputs_match(MaskFormerForInstanceSegmentation.from_pretrained(tmp_path / sub), hf_model, torch.randn(1, 3, 48, 48))


def test_base_model_loads_from_segmentation_checkpoint(hf_tiny_checkpoint):
    folder, hf_model = hf_tiny_checkpoint
    base = MaskFormerModel.from_pretrained(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = hf_model.model(x)
        out = base(x)
    assert_close_rel(out.transformer_decoder_last_hidden_state, ref.transformer_decoder_last_hidden_state, TOL, "decoder")


def test_dtype_and_device_at_load(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    model = MaskFormerForInstanceSegmentation.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    index = model.model.pixel_level_module.encoder.model.encoder.layers[0].blocks[0].attention.self.relative_position_index
    assert index.dtype == torch.int64
    out = model(torch.randn(1, 3, 64, 64))  # float32 input is cast to the model's dtype
    assert out.class_queries_logits.dtype == torch.bfloat16
    assert MaskFormerForInstanceSegmentation.from_pretrained(folder, dtype="float16").dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, dtype="float17")


def _edit_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_listed(tmp_path, hf_tiny_checkpoint):
    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    key = "class_predictor.weight"

    def edit(state):
        del state[key]
        state["extra.thing"] = torch.zeros(1)
        state["mask_embedder.0.0.bias"] = torch.zeros(3)

    _edit_weights(folder, edit)
    with pytest.raises(CheckpointError) as info:
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    message = str(info.value)
    assert "1 missing: class_predictor.weight" in message
    assert "1 unexpected: extra.thing" in message
    assert "mask_embedder.0.0.bias: checkpoint (3,) vs model (32,)" in message


def test_optional_tensors_may_be_absent(tmp_path, hf_tiny_checkpoint):
    folder, hf_model = hf_tiny_checkpoint
    folder = copy_checkpoint(folder, tmp_path / "ckpt")

    def edit(state):
        for k in list(state):
            if k.endswith("relative_position_index") or ".encoder.model.layernorm." in k or k == "criterion.empty_weight":
                del state[k]

    _edit_weights(folder, edit)
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert torch.equal(ours.criterion.empty_weight, hf_model.criterion.empty_weight)
    outputs_match(ours, hf_model, torch.randn(1, 3, 64, 64))


def test_missing_corrupt_and_unsafe_files(tmp_path, hf_tiny_checkpoint):
    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        MaskFormerForInstanceSegmentation.from_pretrained(str(tmp_path / "nope" / "deeper"))
    # no weights at all
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), empty)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        MaskFormerForInstanceSegmentation.from_pretrained(empty)
    # truncated safetensors
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    # a .bin that would run code when unpickled is refused
    os.remove(path)
    torch.save({"x": torch.zeros(1), "payload": _Payload()}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickled code"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)
    # corrupt config.json
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _fake_hub_cache(cache, repo_id, files):
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", sha)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(sha)
    for src in files:
        shutil.copy(src, snap)


def test_hub_repo_id_resolves_from_the_local_cache(tmp_path, monkeypatch, hf_tiny_checkpoint):
    folder, hf_model = hf_tiny_checkpoint
    cache = str(tmp_path / "hub")
    _fake_hub_cache(cache, "someone/maskformer-tiny", [os.path.join(folder, f) for f in ("config.json", "model.safetensors")])
    import huggingface_hub.constants

    # offline as on this machine and CI: the cache must answer, with no network attempt
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours = MaskFormerForInstanceSegmentation.from_pretrained("someone/maskformer-tiny", cache_dir=cache)
    outputs_match(ours, hf_model, torch.randn(1, 3, 64, 64))
    assert MaskFormerConfig.from_pretrained("someone/maskformer-tiny", cache_dir=cache).num_labels == 4
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        MaskFormerForInstanceSegmentation.from_pretrained("someone/not-cached", cache_dir=cache)


def test_hub_id_without_huggingface_hub_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        MaskFormerForInstanceSegmentation.from_pretrained("facebook/maskformer-swin-base-ade")


def test_hub_style_legacy_config_parses():
    """A config.json as the original hub checkpoints store it: backbone model_type 'swin', derived keys, extras."""
    legacy = {
        "architectures": ["MaskFormerForInstanceSegmentation"],
        "backbone_config": {"model_type": "swin", "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                            "window_size": 12, "image_size": 384, "drop_path_rate": 0.3, "hidden_size": 1024,
                            "num_layers": 4, "out_features": ["stage1", "stage2", "stage3", "stage4"],
                            "path_norm": True, "encoder_stride": 32},
        "decoder_config": {"model_type": "detr", "d_model": 256, "decoder_layers": 6, "num_queries": 100,
                           "encoder_layers": 6, "max_position_embeddings": 1024},
        "id2label": {str(i): f"c{i}" for i in range(150)},
        "model_type": "maskformer",
        "torch_dtype": "float32",
        "transformers_version": "4.20.0.dev0",
        "mask_feature_size": 256,
        "fpn_feature_size": 256,
    }
    config = MaskFormerConfig.from_dict(legacy)
    assert config.num_labels == 150 and config.backbone_config.window_size == 12
    assert config.decoder_config.num_queries == 100
    again = config.to_dict()
    assert again["backbone_config"]["path_norm"] is True and again["transformers_version"] == "4.20.0.dev0"
    assert again["decoder_config"]["max_position_embeddings"] == 1024
    # and transformers accepts what we write
    from transformers import MaskFormerConfig as HFConfig

    hf_config = HFConfig.from_dict(again)
    assert hf_config.backbone_config.window_size == 12 and hf_config.num_labels == 150


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["backbone_config"].update(model_type="resnet"), "backbone model_type 'resnet' is not supported"),
        (lambda c: c["decoder_config"].update(model_type="deformable_detr"), "decoder model_type"),
        (lambda c: c["backbone_config"].update(use_absolute_embeddings=True), "use_absolute_embeddings"),
        (lambda c: c["backbone_config"].update(num_heads=[3, 2, 4, 8]), "heads do not divide"),
        (lambda c: c["backbone_config"].update(depths=[1, 1]), "same length"),
        (lambda c: c.update(fpn_feature_size=48), "multiple of 32"),
        (lambda c: c["backbone_config"].update(hidden_act="mish"), "not supported"),
        (lambda c: c.update(model_type="detr"), "not 'maskformer'"),
    ],
)
def test_unsupported_configs_raise_clear_errors(tmp_path, hf_tiny_checkpoint, edit, match):
    folder = copy_checkpoint(hf_tiny_checkpoint[0], tmp_path / "ckpt")
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))
    with pytest.raises(ConfigError, match=match):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(hf_tiny_checkpoint):
    return MaskFormerForInstanceSegmentation.from_pretrained(hf_tiny_checkpoint[0])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.randn(3, 64, 64), "4 dimensions"),
        (lambda: torch.randn(1, 4, 64, 64), "4 channels but the model expects 3"),
        (lambda: torch.randn(1, 64, 64, 3), "64 channels"),
        (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "integer dtype"),
        (lambda: torch.randn(0, 3, 64, 64), "empty batch"),
        (lambda: torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (lambda: [[0.0]], "must be a torch.Tensor"),
        (lambda: torch.randn(1, 3, 32, 20), "too small"),
    ],
)
def test_bad_pixel_values_raise(tiny_model, make, match):
    with pytest.raises(InputError, match=match):
        tiny_model(make())


def test_bad_pixel_mask_raises(tiny_model):
    with pytest.raises(InputError, match="pixel_mask must have shape"):
        tiny_model(torch.randn(2, 3, 64, 64), pixel_mask=torch.ones(2, 32, 32))



def test_import_is_lean():
    """Importing maskformer must not initialise CUDA nor import triton, the C++ extension or
    dispatch (which loads every op module named in MASKFORMER_OP_MODULES: a bad name there must
    not break ``import maskformer``)."""
    code = (
        "import sys, torch, maskformer\n"
        "from maskformer import MaskFormerForInstanceSegmentation, MaskFormerConfig\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "bad = [m for m in ('triton', 'maskformer._C', 'transformers', 'maskformer.dispatch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_id_fails_fast_when_the_hub_certainly_cannot_be_reached(tmp_path, monkeypatch, hf_tiny_checkpoint):
    """Item 17: with no network (the hub's name does not resolve, no proxy), huggingface_hub retried each
    file five times (1+2+4+8+8 s; 41 s measured for one config.json) before failing. Now: the cache
    answers at once (a cached repo loads), an uncached one fails at once, naming why."""
    import socket
    import time
    import urllib.parse

    import huggingface_hub.constants

    from maskformer import hub

    for name in hub._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_UNREACHABLE", {})
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    downloads = []
    real_download = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        downloads.append(kwargs["local_files_only"])
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    cache = str(tmp_path / "hub")
    folder, hf_model = hf_tiny_checkpoint
    _fake_hub_cache(cache, "someone/maskformer-tiny", [os.path.join(folder, f) for f in ("config.json", "model.safetensors")])
    start = time.perf_counter()
    ours = MaskFormerForInstanceSegmentation.from_pretrained("someone/maskformer-tiny", cache_dir=cache)
    outputs_match(ours, hf_model, torch.randn(1, 3, 64, 64))
    host = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT).hostname
    with pytest.raises(FileNotFoundError, match=rf"config.json of 'someone/not-cached' is not in the local hub cache and "
                                                rf"the hub cannot be reached \({host} does not resolve"):
        MaskFormerConfig.from_pretrained("someone/not-cached", cache_dir=cache)
    assert time.perf_counter() - start < 10.0  # the retries alone took 23 s per file
    assert host in lookups and downloads and all(downloads)  # the cache only, never the network
    assert "does not resolve" in hub._UNREACHABLE[host][1]  # remembered: looked up once a minute
    with pytest.raises(FileNotFoundError, match="force_download=True needs the hub"):
        MaskFormerConfig.from_pretrained("someone/maskformer-tiny", cache_dir=cache, force_download=True)
