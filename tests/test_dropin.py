"""Drop-in API: what a transformers user does with the model, done side by side with transformers.

Each test builds the same thing with transformers (the oracle) and with maskformer, runs the same
calls on both and compares; where we differ on purpose, the test pins transformers' behaviour
next to ours so the difference cannot drift unnoticed.
"""
import pickle

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
