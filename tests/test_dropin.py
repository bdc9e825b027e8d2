"""Drop-in API: what a transformers user does with the model, done side by side with transformers.

Each test builds the same thing with transformers (the oracle) and with maskformer, runs the same
calls on both and compares; where we differ on purpose, the test pins transformers' behaviour
next to ours so the difference cannot drift unnoticed.
"""
import json
import pickle
import shutil

import pytest
import torch

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation
from maskformer.checkpoint import load_model_state

from hf_oracle import assert_close_rel, hf_maskformer_config, make_hf_model

TOL = 1e-5  # see test_parity_transformers.py


def ours_like(hf_model):
    ours = MaskFormerForInstanceSegmentation(MaskFormerConfig.from_dict(hf_model.config.to_dict()))
    load_model_state(ours, dict(hf_model.state_dict()))
    return ours.train(hf_model.training)


def stacked_labels(batch=2, n=3, h=64, w=48, num_labels=4, seed=0):
    """(B, N, H, W) binary masks, each image's masks a partition of its pixels, and (B, N) int64 ids."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, n, (batch, h // 8, w // 8), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
    masks = torch.stack([(owner == k).float() for k in range(n)], dim=1)
    classes = torch.randint(0, num_labels, (batch, n), generator=gen)
    return masks, classes


# ------------------------------------------------------------------------------------------------
# 1. mask_labels / class_labels as stacked tensors
# ------------------------------------------------------------------------------------------------
def test_stacked_label_tensors_as_transformers():
    hf_model = make_hf_model(window_size=3)
    ours = ours_like(hf_model)
    x = torch.randn(2, 3, 64, 48)
    masks, classes = stacked_labels()
    ref = hf_model(x, mask_labels=masks, class_labels=classes).loss
    out = ours(x, mask_labels=masks, class_labels=classes).loss
    assert out.shape == ref.shape == torch.Size([])
    assert_close_rel(out.detach(), ref.detach(), TOL, "loss (stacked)")
    # the same labels as lists give the same loss
    as_lists = ours(x, mask_labels=list(masks), class_labels=list(classes)).loss
    assert torch.equal(as_lists, out)


@pytest.mark.parametrize(
    "masks, classes, match",
    [
        (torch.zeros(2, 64, 48), torch.zeros(2, 3, dtype=torch.long), r"\(batch, N, height, width\)"),
        (torch.zeros(2, 3, 64, 48), torch.zeros(2, 3, 1, dtype=torch.long), r"\(batch, N\)"),
        (torch.zeros(2, 3, 64, 48), torch.zeros(2, 3), "integer tensor"),
        (torch.zeros(3, 3, 64, 48), torch.zeros(3, 3, dtype=torch.long), "for a batch of 2"),
        ("masks", torch.zeros(2, 3, dtype=torch.long), "stacked tensors"),
    ],
)
def test_bad_label_tensors_say_what_is_wrong(masks, classes, match):
    ours = ours_like(make_hf_model(window_size=3))
    with pytest.raises(ValueError, match=match):
        ours(torch.randn(2, 3, 64, 48), mask_labels=masks, class_labels=classes)


# ------------------------------------------------------------------------------------------------
# 2. the decoder's zero input requires grad in training
# ------------------------------------------------------------------------------------------------
def test_retain_grad_on_every_output_in_training_as_transformers():
    hf_model = make_hf_model(window_size=3)
    ours = ours_like(hf_model)
    x = torch.randn(2, 3, 64, 48)
    masks, classes = stacked_labels()
    for model in (hf_model, ours):
        model.train()
        out = model(x, mask_labels=masks, class_labels=classes, output_hidden_states=True, output_attentions=True)
        kept = [out.encoder_hidden_states[0], out.pixel_decoder_hidden_states[0],
                out.transformer_decoder_hidden_states[0], out.attentions[0]]
        for t in kept:
            t.retain_grad()
        out.loss.backward()
        name = type(model).__module__
        assert all(t.grad is not None for t in kept), name
        zero_input = out.transformer_decoder_hidden_states[0]
        assert zero_input.requires_grad and zero_input.is_leaf and not zero_input.any(), name
        model.eval()
        with torch.no_grad():
            out = model(x, output_hidden_states=True)
        assert not out.transformer_decoder_hidden_states[0].requires_grad, name


# ------------------------------------------------------------------------------------------------
# 3. outputs: an ordered dict with attribute access, assignable
# ------------------------------------------------------------------------------------------------
def _output_pair():
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput as HFOut

    from maskformer import MaskFormerForInstanceSegmentationOutput as Out

    c, m = torch.randn(1, 2, 3), torch.randn(1, 2, 4, 4)
    return HFOut(class_queries_logits=c, masks_queries_logits=m), Out(class_queries_logits=c, masks_queries_logits=m)


def _same_view(theirs, ours):
    assert list(ours.keys()) == list(theirs.keys())
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == len(ours)
    for a, b in zip(ours.to_tuple(), theirs.to_tuple()):
        assert a is b
    for i in range(len(ours)):
        assert ours[i] is theirs[i]


def test_outputs_assign_like_transformers():
    theirs, ours = _output_pair()
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    _same_view(theirs, ours)
    loss = torch.tensor(1.5)
    for o in (theirs, ours):
        o.loss = loss  # a None field set later: appended to the keys
    _same_view(theirs, ours)
    assert list(ours)[-1] == "loss" and ours["loss"] is ours.loss is loss
    new_logits = torch.zeros(1, 2, 3)
    for o in (theirs, ours):
        o["class_queries_logits"] = new_logits  # by key: the attribute follows
    assert ours.class_queries_logits is new_logits and theirs.class_queries_logits is new_logits
    for o in (theirs, ours):
        o["extra"] = 7  # a key that is not a field
    _same_view(theirs, ours)
    assert ours.extra == theirs.extra == 7
    for o in (theirs, ours):
        o.note = "attribute only"  # not a field: an attribute, not a key
    _same_view(theirs, ours)
    for op in (lambda o: o.pop("extra"), lambda o: o.update(a=1), lambda o: o.setdefault("a", 1),
               lambda o: o.__delitem__("extra")):
        for o in (theirs, ours):
            with pytest.raises(Exception, match="cannot"):
                op(o)
    _same_view(theirs, ours)
    for o in (theirs, ours):
        with pytest.raises(KeyError):
            o["auxiliary_logits"]
        assert o.auxiliary_logits is None


def test_output_field_set_to_none_leaves_keys_and_tuple():
    """Deliberate difference: transformers keeps a stale key (attribute route) or a None in the
    tuple (key route); here a field set to None is simply absent, wherever it is set from."""
    theirs, ours = _output_pair()
    theirs.masks_queries_logits = None
    assert "masks_queries_logits" in theirs.keys() and theirs["masks_queries_logits"] is not None  # stale
    ours.masks_queries_logits = None
    assert list(ours.keys()) == ["class_queries_logits"] and len(ours.to_tuple()) == 1
    theirs, ours = _output_pair()
    theirs["masks_queries_logits"] = None
    assert theirs.to_tuple()[1] is None  # a None inside the tuple
    ours["masks_queries_logits"] = None
    assert list(ours.keys()) == ["class_queries_logits"] and ours.masks_queries_logits is None


def test_model_outputs_are_assignable_and_round_trip():
    hf_model = make_hf_model(window_size=3)
    ours = ours_like(hf_model)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ref, out = hf_model(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert list(out.keys()) == list(ref.keys())
    out["class_queries_logits"] = out.class_queries_logits.softmax(-1)
    out.loss = torch.tensor(0.0)
    assert list(out.keys())[-1] == "loss" and len(out.to_tuple()) == len(ref.to_tuple()) + 1
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is type(out) and list(again.keys()) == list(out.keys())
    assert torch.equal(again.class_queries_logits, out.class_queries_logits)
    # a pytree node, as transformers' outputs: export, DDP and tree utilities see the tensors
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(out) and list(rebuilt.keys()) == list(out.keys())


# ------------------------------------------------------------------------------------------------
# 5. configs: to_dict / to_json_string / to_json_file, subfolder=, transformers' constructors
# ------------------------------------------------------------------------------------------------
def _checked_fields(data):
    """The fields both libraries model, from a config dict (ours or transformers')."""
    keys = ("fpn_feature_size", "mask_feature_size", "no_object_weight", "dice_weight", "mask_weight",
            "cross_entropy_weight", "use_auxiliary_loss", "init_std", "init_xavier_std")
    out = {k: data[k] for k in keys}
    out["id2label"] = {int(k): v for k, v in data["id2label"].items()}
    out["backbone"] = {k: data["backbone_config"][k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    out["decoder"] = {k: data["decoder_config"][k] for k in ("d_model", "decoder_layers", "num_queries", "decoder_ffn_dim")}
    return out


@pytest.mark.parametrize("use_diff", [True, False])
def test_config_json_both_ways_with_transformers(tmp_path, use_diff):
    """transformers' diff JSON leaves out its defaults: reading it back here checks our defaults are its."""
    from transformers import MaskFormerConfig as HFConfig

    theirs = hf_maskformer_config(window_size=7, num_labels=5, use_auxiliary_loss=True)
    theirs.to_json_file(tmp_path / "theirs.json", use_diff=use_diff)
    ours = MaskFormerConfig.from_json_file(str(tmp_path / "theirs.json"))
    assert _checked_fields(ours.to_dict()) == _checked_fields(theirs.to_dict())
    ours.to_json_file(tmp_path / "ours.json", use_diff=use_diff)
    assert _checked_fields(HFConfig.from_json_file(tmp_path / "ours.json").to_dict()) == _checked_fields(theirs.to_dict())
    text = ours.to_json_string(use_diff=use_diff)
    assert json.loads(text) == json.load(open(tmp_path / "ours.json"))
    assert MaskFormerConfig.from_dict(json.loads(text)) == ours
    assert isinstance(ours.to_dict(), dict) and ours.to_dict()["model_type"] == "maskformer"


def test_num_labels_disagreeing_with_id2label():
    """Deliberate difference: transformers warns and lets num_labels replace the names; we refuse."""
    from transformers import MaskFormerConfig as HFConfig

    assert HFConfig(num_labels=3, id2label={0: "a", 1: "b"}).num_labels == 3
    with pytest.raises(ValueError, match="num_labels=3 disagrees with id2label, which has 2 entries"):
        MaskFormerConfig(num_labels=3, id2label={0: "a", 1: "b"})


def test_config_diff_json_leaves_defaults_out():
    config = MaskFormerConfig(num_labels=3)
    diff = json.loads(config.to_json_string())
    assert "fpn_feature_size" not in diff and diff["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert "fpn_feature_size" in json.loads(config.to_json_string(use_diff=False))


def test_from_backbone_and_decoder_configs_as_transformers():
    """transformers 4.x's classmethod (5.x dropped it; its own tests still call it): the same config as
    transformers' constructor builds from transformers' sub-configs."""
    from transformers import DetrConfig, SwinConfig
    from transformers import MaskFormerConfig as HFConfig

    kwargs = dict(backbone_config=SwinConfig(depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2]),
                  decoder_config=DetrConfig(decoder_layers=2, d_model=32, decoder_attention_heads=2, num_queries=10),
                  mask_feature_size=32, fpn_feature_size=32, num_labels=4)
    theirs = HFConfig(**kwargs)
    ours = MaskFormerConfig.from_backbone_and_decoder_configs(**kwargs)
    assert _checked_fields(ours.to_dict()) == _checked_fields(theirs.to_dict())


def test_subfolder_everywhere(tmp_path, hf_tiny_checkpoint):
    from transformers import MaskFormerForInstanceSegmentation as HF

    from maskformer import MaskFormerImageProcessor

    folder, _ = hf_tiny_checkpoint
    shutil.copytree(folder, tmp_path / "repo" / "sub")
    MaskFormerImageProcessor().save_pretrained(tmp_path / "repo" / "sub")
    root = str(tmp_path / "repo")
    theirs = HF.from_pretrained(root, subfolder="sub")
    ours = MaskFormerForInstanceSegmentation.from_pretrained(root, subfolder="sub")
    assert ours.config.num_labels == theirs.config.num_labels == 4
    assert MaskFormerConfig.from_pretrained(root, subfolder="sub").num_labels == 4
    assert MaskFormerImageProcessor.from_pretrained(root, subfolder="sub").size == {"shortest_edge": 800, "longest_edge": 1333}
    for bad in ("../repo/sub", "/etc"):
        with pytest.raises(Exception, match="not a plain file name"):
            MaskFormerConfig.from_pretrained(root, subfolder=bad)


# ------------------------------------------------------------------------------------------------
# 6. from_pretrained keyword arguments
# ------------------------------------------------------------------------------------------------
def _hf_from_pretrained(*args, **kwargs):
    from transformers import MaskFormerForInstanceSegmentation as HF

    return HF.from_pretrained(*args, **kwargs)


def _encoder_states_match(ours, theirs, x):
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    for name in ("encoder_last_hidden_state", "pixel_decoder_last_hidden_state", "transformer_decoder_last_hidden_state",
                 "masks_queries_logits"):
        assert_close_rel(a[name], b[name], TOL, name)
    return a, b


def test_fine_tuning_with_new_num_labels_as_transformers(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    theirs, their_info = _hf_from_pretrained(folder, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True)
    with pytest.warns(UserWarning, match=r"re-initialised.*class_predictor\.weight: checkpoint \(5, 32\) -> model \(8, 32\)"):
        ours, info = MaskFormerForInstanceSegmentation.from_pretrained(
            folder, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True)
    assert ours.config.num_labels == theirs.config.num_labels == 7
    assert ours.config.id2label == theirs.config.id2label
    assert info == their_info  # sets of keys, and (key, checkpoint shape, model shape) for the resized ones
    assert {k for k, _, _ in info["mismatched_keys"]} == {"class_predictor.weight", "class_predictor.bias",
                                                         "criterion.empty_weight"}
    a, b = _encoder_states_match(ours, theirs, torch.randn(1, 3, 64, 48))  # everything but the class head loaded
    assert a.class_queries_logits.shape == b.class_queries_logits.shape == (1, 5, 8)
    assert torch.isfinite(a.class_queries_logits).all()
    assert ours.criterion.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])


def test_new_num_labels_without_ignore_mismatched_sizes_raises_as_transformers(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _hf_from_pretrained(folder, num_labels=7)
    with pytest.raises(RuntimeError, match=r"num_labels=7 but the checkpoint's class head has 4 classes.*"
                                           r"ignore_mismatched_sizes=True"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, num_labels=7)


def test_id2label_override(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    names = {0: "road", 1: "car"}
    theirs = _hf_from_pretrained(folder, id2label=names, ignore_mismatched_sizes=True)
    with pytest.warns(UserWarning, match="re-initialised"):
        ours = MaskFormerForInstanceSegmentation.from_pretrained(folder, id2label=names, ignore_mismatched_sizes=True)
    assert ours.config.id2label == theirs.config.id2label == names
    assert ours.class_predictor.weight.shape == theirs.class_predictor.weight.shape == (3, 32)
    # Deliberate difference: transformers keeps the checkpoint's label2id (class_0..class_3), which then
    # names classes the model no longer has; ours is derived from the new id2label.
    assert theirs.config.label2id == {f"class_{i}": i for i in range(4)}
    assert ours.config.label2id == {"road": 0, "car": 1}


def test_loading_info_and_config_overrides_as_transformers(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    theirs, their_info = _hf_from_pretrained(folder, output_loading_info=True, output_hidden_states=True)
    ours, info = MaskFormerForInstanceSegmentation.from_pretrained(folder, output_loading_info=True,
                                                                   output_hidden_states=True)
    assert info == their_info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                                  "error_msgs": []}
    assert ours.config.output_hidden_states is theirs.config.output_hidden_states is True


def test_dtype_alias_device_map_and_ignored_arguments(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    assert _hf_from_pretrained(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert MaskFormerForInstanceSegmentation.from_pretrained(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    for device_map in ("cpu", "auto", {"": "cpu"}, {"model": "cpu", "class_predictor": "cpu"}, torch.device("cpu")):
        # (transformers needs accelerate for any device_map; not installed here)
        model = MaskFormerForInstanceSegmentation.from_pretrained(folder, device_map=device_map)
        assert model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, device_map={"model": "cpu", "class_predictor": "cuda:0"})
    with pytest.raises(ValueError, match="disagree"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, dtype="float16", torch_dtype="bfloat16")
    model = MaskFormerForInstanceSegmentation.from_pretrained(
        folder, trust_remote_code=True, low_cpu_mem_usage=True, attn_implementation="eager", use_safetensors=True)
    assert model.config.num_labels == 4
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, use_safetensors=False)


def test_unknown_keyword_is_named(hf_tiny_checkpoint):
    folder, _ = hf_tiny_checkpoint
    with pytest.raises(TypeError, match="foo_bar"):
        _hf_from_pretrained(folder, foo_bar=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foo_bar'\]") as info:
        MaskFormerForInstanceSegmentation.from_pretrained(folder, foo_bar=3)
    assert "resolve_file" not in str(info.value)
    with pytest.raises(TypeError, match="revison"):
        MaskFormerConfig.from_pretrained(folder, revison="main")


# ------------------------------------------------------------------------------------------------
# 7. a MaskFormerModel checkpoint (no heads) into MaskFormerForInstanceSegmentation, and back
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_base_checkpoint(tmp_path_factory):
    from transformers import MaskFormerModel as HFBase

    hf_model = make_hf_model(window_size=3)
    base = HFBase(hf_model.config)
    base.load_state_dict(hf_model.model.state_dict())
    folder = tmp_path_factory.mktemp("hf_base")
    base.save_pretrained(folder)
    return str(folder), base.eval()


def test_heads_initialised_from_a_base_checkpoint_as_transformers(hf_base_checkpoint):
    folder, hf_base = hf_base_checkpoint
    theirs, their_info = _hf_from_pretrained(folder, output_loading_info=True)
    with pytest.warns(UserWarning, match=r"no heads.*class_predictor\.weight.*strict=True"):
        ours, info = MaskFormerForInstanceSegmentation.from_pretrained(folder, output_loading_info=True)
    assert info == their_info
    assert "class_predictor.weight" in info["missing_keys"] and len(info["missing_keys"]) == 9
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        a, b = ours(x), hf_base(x)
    for name in ("encoder_last_hidden_state", "pixel_decoder_last_hidden_state", "transformer_decoder_last_hidden_state"):
        assert_close_rel(a[name], b[name], TOL, name)
    assert torch.isfinite(a.class_queries_logits).all() and torch.isfinite(a.masks_queries_logits).all()
    with pytest.raises(RuntimeError, match=r"strict=True.*class_predictor"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, strict=True)


def test_missing_backbone_weights_still_raise(tmp_path, hf_base_checkpoint):
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "ckpt")
    shutil.copytree(hf_base_checkpoint[0], folder)
    path = f"{folder}/model.safetensors"
    state = load_file(path)
    key = "pixel_level_module.encoder.model.encoder.layers.0.blocks.0.layernorm_before.weight"
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    # Deliberate difference: transformers initialises the missing backbone tensor at random (and warns)
    _, their_info = _hf_from_pretrained(folder, output_loading_info=True)
    assert "model." + key in their_info["missing_keys"]
    with pytest.raises(RuntimeError, match=r"1 missing: model\." + key.replace(".", r"\.")):
        MaskFormerForInstanceSegmentation.from_pretrained(folder)


def test_base_model_from_a_head_checkpoint_reports_the_heads_as_transformers(hf_tiny_checkpoint):
    from transformers import MaskFormerModel as HFBase

    from maskformer import MaskFormerModel

    folder, _ = hf_tiny_checkpoint
    _, their_info = HFBase.from_pretrained(folder, output_loading_info=True)
    _, info = MaskFormerModel.from_pretrained(folder, output_loading_info=True)
    assert info == their_info and "class_predictor.weight" in info["unexpected_keys"]


def test_config_built_from_transformers_sub_configs_survives_json(tmp_path):
    """Keys we keep untouched (transformers' extras, with int-keyed dicts) are held as JSON holds
    them, so the config equals itself after to_json_file / from_json_file."""
    from transformers import DetrConfig, SwinConfig

    config = MaskFormerConfig(backbone_config=SwinConfig(depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2]),
                              decoder_config=DetrConfig(d_model=32, decoder_attention_heads=2), mask_feature_size=32,
                              fpn_feature_size=32, num_labels=4)
    config.to_json_file(tmp_path / "c.json", use_diff=False)
    assert MaskFormerConfig.from_json_file(str(tmp_path / "c.json")) == config


def test_compile_fullgraph_and_export_as_transformers_models_do():
    """transformers' models compile into one graph and export; so do ours (outputs are pytree nodes,
    the NaN check is skipped while tracing)."""
    hf_model = make_hf_model(window_size=3)
    ours = ours_like(hf_model).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        eager = ours(x)
        compiled = torch.compile(ours, backend="eager", fullgraph=True)(x)
        exported = torch.export.export(ours, (x,), strict=False).module()(x)
    for out in (compiled, exported):
        assert type(out) is type(eager) and list(out.keys()) == list(eager.keys())
        assert torch.allclose(out.class_queries_logits, eager.class_queries_logits, atol=1e-6)
    with pytest.raises(Exception, match="NaN"):
        ours(torch.full_like(x, float("nan")))  # eager still checks


def test_config_from_pretrained_overrides_as_transformers(hf_tiny_checkpoint):
    from transformers import MaskFormerConfig as HFConfig

    folder, _ = hf_tiny_checkpoint
    theirs = HFConfig.from_pretrained(folder, num_labels=6, mask_weight=5.0)
    ours = MaskFormerConfig.from_pretrained(folder, num_labels=6, mask_weight=5.0)
    assert ours.id2label == theirs.id2label and ours.mask_weight == theirs.mask_weight == 5.0


def test_gradient_checkpointing():
    """transformers' API name; transformers 5.23 refuses it for MaskFormer (pinned). Ours gives the
    same loss and gradients as without it (dropout included: checkpointing replays the random state)."""
    hf_model = make_hf_model(window_size=3)
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        hf_model.activation_checkpointing_enable()
    ours = ours_like(hf_model).train()
    x = torch.randn(2, 3, 64, 48)
    masks, classes = stacked_labels()

    def loss_and_grads():
        ours.zero_grad()
        torch.manual_seed(1)
        loss = ours(x, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    ours.activation_checkpointing_enable()  # or gradient_checkpointing_enable(), its older name
    assert ours.is_gradient_checkpointing
    loss, grads = loss_and_grads()
    assert torch.equal(loss, plain_loss) and grads.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


# ------------------------------------------------------------------------------------------------
# Gaps found by running transformers' own MaskFormer / Mask2Former tests against these classes
# (scripts/run_transformers_tests.py; counts in docs/deviations.md)
# ------------------------------------------------------------------------------------------------
def _tiny_mask2former_config(cls):
    """What transformers' Mask2Former model tester does: construct with a feature_size no model can have
    (16: GroupNorm needs multiples of 32), then fix it and shrink the backbone by assignment."""
    config = cls(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, encoder_feedforward_dim=16,
                 dim_feedforward=32, num_queries=10, num_labels=4, decoder_layers=2, encoder_layers=2, feature_size=16)
    config.backbone_config.embed_dim = 16
    config.backbone_config.depths = [1, 1, 1, 1]
    config.backbone_config.hidden_size = 16
    config.backbone_config.num_heads = [1, 1, 2, 2]
    config.hidden_dim = config.mask_feature_size = config.feature_size = 64
    return config


def test_configs_are_checked_when_a_model_is_built_not_when_edited():
    """Item 20: as transformers, a config may pass through invalid states while it is edited; the model
    refuses one at once (milliseconds, before any module is built), naming the field."""
    import time

    from transformers import Mask2FormerConfig as HFConfig

    from maskformer import ConfigError, Mask2FormerConfig, Mask2FormerModel, MaskFormerModel

    assert HFConfig(feature_size=16).feature_size == 16
    config = Mask2FormerConfig(feature_size=16)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="feature_size=16 must be a positive multiple of 32"):
        Mask2FormerModel(config)
    assert time.perf_counter() - start < 0.5
    config.feature_size = 64
    config.backbone_config.depths = [1, 1, 1, 1]  # a small model: only that it builds matters here
    Mask2FormerModel(config)

    config = MaskFormerConfig(fpn_feature_size=48)
    with pytest.raises(ConfigError, match="fpn_feature_size=48 must be a positive multiple of 32"):
        MaskFormerModel(config)
    config.fpn_feature_size = 64
    config.backbone_config.depths = [1, 1, 1, 1]
    MaskFormerModel(config)


def test_transformers_tester_config_builds_the_same_model():
    """Items 20 and 26: transformers' own test config (feature_size=16 at first, backbone hidden_size
    assigned) builds, and builds the model transformers builds: the same parameter names and shapes."""
    from transformers import Mask2FormerConfig as HFConfig, Mask2FormerForUniversalSegmentation as HFModel

    from maskformer import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    ours, theirs = _tiny_mask2former_config(Mask2FormerConfig), _tiny_mask2former_config(HFConfig)
    assert ours.backbone_config.hidden_size == theirs.backbone_config.hidden_size == 16
    assert ours.backbone_config.to_dict()["hidden_size"] == theirs.backbone_config.to_dict()["hidden_size"] == 16
    ours_model = Mask2FormerForUniversalSegmentation(ours)
    their_state = dict(HFModel(theirs).state_dict())
    # transformers keeps the Swin's relative_position_index out of its state dict (ours too: derived)
    ours_shapes = {k: tuple(v.shape) for k, v in ours_model.state_dict().items() if not k.endswith("empty_weight")}
    their_shapes = {k: tuple(v.shape) for k, v in load_renamed(their_state).items() if not k.endswith("empty_weight")}
    assert ours_shapes == their_shapes
    assert ours_model.model.pixel_level_module.encoder.swin.layernorm.normalized_shape == (128,)  # not hidden_size


def load_renamed(state):
    from maskformer.checkpoint import normalize_keys

    return normalize_keys(state)


def test_backbone_hidden_size_is_settable_and_written_as_transformers(tmp_path):
    """Item 26: transformers' SwinConfig keeps an assigned hidden_size and writes it; it builds nothing."""
    from transformers import SwinConfig

    theirs = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1])
    config = MaskFormerConfig()
    for backbone in (theirs, config.backbone_config):
        backbone.hidden_size = 7
        assert backbone.hidden_size == 7 and backbone.to_dict()["hidden_size"] == 7
    config.to_json_file(tmp_path / "c.json")
    assert MaskFormerConfig.from_json_file(str(tmp_path / "c.json")).backbone_config.hidden_size == 7
    assert MaskFormerConfig().backbone_config.hidden_size == 1024  # derived when never assigned (Swin-B: 128 * 8)


def test_top_level_num_queries_is_kept_and_builds_what_transformers_builds(tmp_path):
    """Item 28: transformers keeps and writes a top-level num_queries, and its model has the decoder
    config's queries (100 by default); the same config and config.json give the same model here."""
    from transformers import MaskFormerConfig as HFConfig, MaskFormerForInstanceSegmentation as HFModel

    from maskformer import MaskFormerModel

    theirs, ours = HFConfig(num_queries=6), MaskFormerConfig(num_queries=6)
    assert json.loads(theirs.to_json_string())["num_queries"] == json.loads(ours.to_json_string())["num_queries"] == 6
    assert ours.decoder_config.num_queries == theirs.decoder_config.num_queries == 100
    # a config.json whose top-level and decoder values differ: the decoder's wins, on both sides
    small = hf_maskformer_config(num_queries=9)
    small.num_queries = 6
    small.save_pretrained(tmp_path)
    their_model = HFModel(HFConfig.from_pretrained(tmp_path))
    our_config = MaskFormerConfig.from_pretrained(str(tmp_path))
    ours_model = MaskFormerModel(our_config)
    assert their_model.model.transformer_module.queries_embedder.weight.shape[0] == 9
    assert ours_model.transformer_module.queries_embedder.weight.shape[0] == 9
    assert our_config.to_dict()["num_queries"] == 6
    # the keys round-trip: what ours writes, transformers reads back with the keys it wrote (less its version stamp)
    written = set(HFConfig.from_pretrained(tmp_path).to_dict()) - {"transformers_version"}
    our_config.save_pretrained(str(tmp_path / "ours"))
    rewritten = HFConfig.from_pretrained(tmp_path / "ours").to_dict()
    assert set(rewritten) - {"transformers_version"} == written == set(our_config.to_dict()) - {"transformers_version"}
    theirs_written = HFConfig.from_pretrained(tmp_path).to_dict()
    for name in ("backbone_config", "decoder_config"):
        assert set(rewritten[name]) == set(theirs_written[name]) == set(our_config.to_dict()[name]), name
    assert rewritten["num_queries"] == 6 and rewritten["decoder_config"]["num_queries"] == 9


def test_nested_backbone_config_as_transformers_writes_it(tmp_path):
    """Item 29: the default backbone is a generic "swin" config with transformers' generic keys; a
    "maskformer-swin" one stays so; both load both ways."""
    from transformers import MaskFormerConfig as HFConfig

    theirs, ours = HFConfig().to_dict(), MaskFormerConfig().to_dict()
    assert ours["backbone_config"]["model_type"] == theirs["backbone_config"]["model_type"] == "swin"
    assert set(ours["backbone_config"]) == set(theirs["backbone_config"])
    assert set(ours) == set(theirs) - {"transformers_version"}
    for key in ("_name_or_path", "chunk_size_feed_forward", "dtype", "is_encoder_decoder", "problem_type", "return_dict"):
        assert ours["backbone_config"][key] == theirs["backbone_config"][key], key
        assert ours["decoder_config"][key] == theirs["decoder_config"][key], key
    MaskFormerConfig().save_pretrained(str(tmp_path / "ours"))
    assert type(HFConfig.from_pretrained(tmp_path / "ours").backbone_config).__name__ == "SwinConfig"
    HFConfig().save_pretrained(tmp_path / "theirs")
    assert MaskFormerConfig.from_pretrained(str(tmp_path / "theirs")).to_dict()["backbone_config"]["model_type"] == "swin"
    legacy = MaskFormerConfig(backbone_config=dict(model_type="maskformer-swin", depths=[1, 1, 1, 1]))
    assert legacy.to_dict()["backbone_config"]["model_type"] == "maskformer-swin"
    legacy.save_pretrained(str(tmp_path / "legacy"))
    assert type(HFConfig.from_pretrained(tmp_path / "legacy").backbone_config).__name__ == "MaskFormerSwinConfig"


def test_from_pretrained_none_with_config_and_state_dict_as_transformers():
    """Item 23: transformers builds the model from config= and state_dict= when the path is None."""
    from maskformer import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    hf_model = make_hf_model(window_size=3)
    theirs = type(hf_model).from_pretrained(None, config=hf_model.config, state_dict=hf_model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(hf_model.parameters(), theirs.parameters()))
    model = ours_like(hf_model)
    state = model.state_dict()
    loaded = MaskFormerForInstanceSegmentation.from_pretrained(pretrained_model_name_or_path=None, config=model.config,
                                                               state_dict=state)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    next(loaded.parameters()).data.add_(1.0)  # the caller's tensors are copied, not shared
    assert torch.equal(next(model.parameters()), state[next(iter(state))])
    config = _tiny_mask2former_config(Mask2FormerConfig)
    m2f = Mask2FormerForUniversalSegmentation(config)
    again = Mask2FormerForUniversalSegmentation.from_pretrained(None, config=config, state_dict=m2f.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m2f.parameters(), again.parameters()))
    with pytest.raises(TypeError, match="config= and state_dict="):
        MaskFormerForInstanceSegmentation.from_pretrained(None, config=model.config)


def test_strict_false_initialises_missing_tensors_as_transformers(tmp_path, hf_base_checkpoint):
    """Item 24: our default refuses a checkpoint that lacks backbone tensors (test_missing_backbone_weights_
    still_raise); strict=False loads it as transformers does, listing the same missing keys."""
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "ckpt")
    shutil.copytree(hf_base_checkpoint[0], folder)
    path = f"{folder}/model.safetensors"
    state = load_file(path)
    gone = ["pixel_level_module.encoder.model.encoder.layers.0.blocks.0.layernorm_before.weight",
            "transformer_module.decoder.layers.1.fc1.weight"]
    for key in gone:
        del state[key]
    state["some.unknown.tensor"] = torch.zeros(3)
    save_file(state, path, metadata={"format": "pt"})
    _, their_info = _hf_from_pretrained(folder, output_loading_info=True)
    with pytest.warns(UserWarning, match=r"initialised at random \(strict=False"):
        ours, info = MaskFormerForInstanceSegmentation.from_pretrained(folder, strict=False, output_loading_info=True)
    # transformers lists its in-memory names (decoder layers' mlp.fc1); ours are the model's (and the files') names
    assert info["missing_keys"] == set(load_renamed(dict.fromkeys(their_info["missing_keys"])))
    assert {"model." + k for k in gone} <= info["missing_keys"]
    assert "some.unknown.tensor" in info["unexpected_keys"]
    norm = ours.model.pixel_level_module.encoder.model.encoder.layers[0].blocks[0].layernorm_before
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # a LayerNorm starts as the identity
    fc1 = ours.model.transformer_module.decoder.layers[1].fc1.weight
    assert 0.005 < fc1.std().item() < 0.05  # N(0, init_std=0.02)
    with torch.no_grad():
        assert torch.isfinite(ours(torch.randn(1, 3, 64, 48)).masks_queries_logits).all()
    with pytest.raises(TypeError, match="strict must be"):
        MaskFormerForInstanceSegmentation.from_pretrained(folder, strict="no")


def test_activation_checkpointing_names_of_transformers_5():
    """Item 25: transformers 5's names and keywords; the same loss and gradients as without."""
    import inspect

    from transformers import PreTrainedModel

    theirs = inspect.signature(PreTrainedModel.activation_checkpointing_enable).parameters
    ours_sig = inspect.signature(MaskFormerForInstanceSegmentation.activation_checkpointing_enable).parameters
    assert list(theirs) == list(ours_sig)
    assert isinstance(PreTrainedModel.is_activation_checkpointing, property)
    model = ours_like(make_hf_model(window_size=3)).train()
    x = torch.randn(2, 3, 64, 48)
    masks, classes = stacked_labels()

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(x, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    assert not model.is_activation_checkpointing
    for kwargs in (dict(activation_checkpointing_kwargs={"use_reentrant": False}), dict(offload=True)):
        model.activation_checkpointing_enable(**kwargs)
        assert model.is_activation_checkpointing and model.is_gradient_checkpointing
        loss, grads = loss_and_grads()
        assert torch.equal(loss, plain_loss) and grads.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # 4.x's names
    assert model.is_activation_checkpointing
    with pytest.raises(NotImplementedError, match="every_n_layers=2"):
        model.activation_checkpointing_enable(every_n_layers=2)


def test_mask2former_attentions_are_on_the_loss_path_as_transformers():
    """Item 27: outputs.attentions[i].retain_grad(), then backward(), gives a .grad (transformers: too)."""
    from transformers import Mask2FormerForUniversalSegmentation as HFModel, Mask2FormerConfig as HFConfig

    from maskformer import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    masks = (torch.rand(2, 3, 64, 64) > 0.5).float()
    classes = torch.randint(0, 4, (2, 3))
    hf_config = _tiny_mask2former_config(HFConfig)
    hf_config._attn_implementation = "eager"
    for model in (HFModel(hf_config), Mask2FormerForUniversalSegmentation(_tiny_mask2former_config(Mask2FormerConfig))):
        model.train()
        out = model(x, mask_labels=masks, class_labels=classes, output_attentions=True, output_hidden_states=True)
        kept = [out.attentions[0], out.attentions[-1], out.encoder_hidden_states[0], out.pixel_decoder_hidden_states[0]]
        for t in kept:
            t.retain_grad()
        out.loss.backward()
        assert all(t.grad is not None for t in kept), type(model).__module__
