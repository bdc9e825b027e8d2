"""Hostile checkpoint files and absurd configs fail fast, with the field or file named.

transformers is the reference for what a well-formed checkpoint looks like (its save_pretrained
writes the fixtures); for these inputs it either runs out of time or memory, or reads files outside
the checkpoint, so the tests pin our error and its speed instead of a transformers result.
"""
import json
import os
import shutil
import time

import pytest

from maskformer import ConfigError, MaskFormerConfig, MaskFormerForInstanceSegmentation

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
