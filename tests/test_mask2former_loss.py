"""Mask2Former training loss and gradients against transformers, on identical weights and labels.

The loss samples random points (torch.rand) in the matcher and the mask losses; both sides draw
them from the global generator in the same order, so each comparison seeds the generator with
the same value before each side.

Tolerances. On the same logits our loss is bit-identical to transformers' (measured 0 on every
term, 37 and 12544 points, torch 2.13 CPU): the same ops in the same order; SAME_LOGITS = 1e-6
relative only leaves room for another BLAS. End to end (each model on its own logits) the loss
inherits the logits' error: 1e-5 relative, the logits' own bar (test_mask2former_parity.py);
measured 1e-7 to 3e-6 on the inputs here, and up to 2e-5 on an input whose logits differ by
6e-5 (a masked-attention threshold flip; a property of the forward, not of the loss).
"""
import pytest
import torch

from maskformer.loss_mask2former import mask2former_loss

from hf_oracle import assert_close_rel, make_hf_mask2former, ours_from_hf

TOL = 1e-5
SAME_LOGITS = 1e-6
# Small point counts keep each loss cheap (transformers' default is 12544); 37 and 0.6 make
# int(37 * 3.0) = 111 oversampled, int(0.6 * 37) = 22 uncertain and 15 uniform points per mask.
SMALL = dict(window_size=3, train_num_points=37, importance_sample_ratio=0.6, decoder_layers=3)


def labels_for(shapes, num_labels, seed=0):
    """Image i gets n_i region masks of a random label map of its own (h, w) (8x8 blocks, so masks
    are big and some regions may be empty) and n_i class ids (repeats when n_i > num_labels)."""
    gen = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for n, h, w in shapes:
        owner = torch.randint(0, max(n, 1), (-(-h // 8), -(-w // 8)), generator=gen)
        owner = owner.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
        mask_labels.append(torch.stack([(owner == k).float() for k in range(n)]) if n else torch.zeros(0, h, w))
        class_labels.append(torch.randint(0, num_labels, (n,), generator=gen))
    return mask_labels, class_labels


@pytest.fixture(scope="module")
def models():
    hf_model = make_hf_mask2former(num_labels=5, num_queries=6, **SMALL)
    return hf_model, ours_from_hf(hf_model)


def hf_and_our_dicts(hf_model, ours, x, mask_labels, class_labels, seed):
    """Weighted loss dicts (main and auxiliary terms), each drawn after torch.manual_seed(seed):
    transformers' on its logits, ours on transformers' logits, ours on our logits."""
    with torch.no_grad():
        ref_out = hf_model(x, output_auxiliary_logits=True)
        our_out = ours(x, output_auxiliary_logits=True)
        dicts = []
        for model, out in ((hf_model, ref_out), (ours, ref_out), (ours, our_out)):
            torch.manual_seed(seed)
            dicts.append(model.get_loss_dict(out.masks_queries_logits, out.class_queries_logits, mask_labels,
                                             class_labels, out.auxiliary_logits))
    return dicts


@pytest.mark.parametrize("shapes", [
    [(3, 64, 64), (0, 64, 64)],  # one image without any target
    [(7, 64, 64), (2, 64, 64)],  # more targets than the 6 queries: 6 matched, one left out
    [(2, 64, 64), (4, 48, 56)],  # targets of different sizes: padded for the mask losses
    [(0, 64, 64), (0, 64, 64)],  # no target at all: only the cross-entropy against the null class
], ids=["one-empty", "more-targets-than-queries", "different-target-sizes", "all-empty"])
def test_every_loss_term_matches_transformers(models, shapes):
    hf_model, ours = models
    x = torch.randn(2, 3, 64, 64)
    mask_labels, class_labels = labels_for(shapes, num_labels=5, seed=len(shapes[0]) + shapes[0][0])
    ref, same_logits, out = hf_and_our_dicts(hf_model, ours, x, mask_labels, class_labels, seed=11)
    # the query embeddings' prediction and one per masked-attention layer: decoder_layers in all
    assert list(out) == list(ref) and len(ref) == 3 * ours.config.decoder_layers, (list(out), list(ref))
    for key in ref:
        assert_close_rel(same_logits[key], ref[key], SAME_LOGITS, f"{key} on transformers' logits")
        assert_close_rel(out[key], ref[key], TOL, key)
    if sum(len(c) for c in class_labels) == 0:
        assert all(out[k] == 0 for k in out if not k.startswith("loss_cross_entropy"))


def test_forward_loss_matches_transformers_and_depends_on_the_seed(models):
    hf_model, ours = models
    x = torch.randn(2, 3, 64, 64)
    mask_labels, class_labels = labels_for([(4, 64, 64), (1, 64, 64)], num_labels=5, seed=5)
    losses = {}
    for seed in (3, 4):
        with torch.no_grad():
            torch.manual_seed(seed)
            ref = hf_model(x, mask_labels=mask_labels, class_labels=class_labels).loss
            torch.manual_seed(seed)
            out = ours(x, mask_labels=mask_labels, class_labels=class_labels)
        assert out.loss.shape == () and list(out)[0] == "loss"
        assert_close_rel(out.loss, ref, TOL, f"loss, seed {seed}")
        losses[seed] = out.loss
    # the points are random: another seed gives another loss (else the parity above proves little)
    assert abs(losses[3] - losses[4]) > 1e-3 * losses[3]
    # an explicit generator draws the same points as the global one seeded alike
    with torch.no_grad():
        out = ours(x, output_auxiliary_logits=True)
        gen_dict = ours.get_loss_dict(out.masks_queries_logits, out.class_queries_logits, mask_labels, class_labels,
                                      out.auxiliary_logits, generator=torch.Generator().manual_seed(4))
    assert_close_rel(ours.get_loss(gen_dict), losses[4], 1e-6, "loss with a generator")


def grads(model):
    from maskformer.loading import normalize_keys

    return normalize_keys({n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def test_gradients_match_transformers():
    hf_model = make_hf_mask2former(num_labels=4, num_queries=5, **SMALL).train()
    ours = ours_from_hf(hf_model).train()
    x = torch.randn(2, 3, 64, 48)
    mask_labels, class_labels = labels_for([(3, 64, 48), (0, 64, 48)], num_labels=4, seed=2)
    torch.manual_seed(7)
    ref = hf_model(x, mask_labels=mask_labels, class_labels=class_labels).loss
    torch.manual_seed(7)
    out = ours(x, mask_labels=mask_labels, class_labels=class_labels).loss
    assert_close_rel(out, ref, TOL, "loss")
    ref.backward()
    out.backward()
    ref_grads, our_grads = grads(hf_model), grads(ours)
    assert set(our_grads) == set(ref_grads) and len(our_grads) > 100
    # Gradients with a real signal: max |ours - ref| <= 1e-4 * max |ref| per tensor (measured at most
    # 2.5e-5: the relative position tables). Some gradients are exactly 0 by invariance: the
    # Swin key biases (softmax ignores a constant per row of scores), the conv biases before the
    # per-channel GroupNorms of the pixel decoder, the Swin stage-norm biases feeding only such
    # convs; both sides hold rounding noise there (~1e-6 against a largest gradient of ~8), so
    # those (max |ref| <= 1e-5 * largest) only have to stay noise: max |ours - ref| <= 1e-5 * largest.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    signal = {n for n, g in ref_grads.items() if g.abs().max().item() > 1e-5 * scale}
    assert len(signal) > 0.8 * len(ref_grads)
    for name, g in our_grads.items():
        ref = ref_grads[name]
        err = (g - ref).abs().max().item()
        if name in signal:
            assert err <= 1e-4 * ref.abs().max().item(), f"grad {name}: relative error {err / ref.abs().max():.2e}"
        else:
            assert err <= 1e-5 * scale, f"grad {name} (0 up to rounding): error {err:.2e}, largest gradient {scale:.2e}"


def test_without_auxiliary_loss_only_the_last_prediction_counts():
    """use_auxiliary_loss=False: three terms, those of transformers' criterion without auxiliary
    predictions (transformers' forward adds the auxiliary terms whatever the flag says; we follow
    the flag's documentation, as our MaskFormer and transformers' MaskFormer do)."""
    hf_model = make_hf_mask2former(num_labels=5, num_queries=6, use_auxiliary_loss=False, **SMALL)
    ours = ours_from_hf(hf_model)
    assert ours.config.use_auxiliary_loss is False
    x = torch.randn(2, 3, 64, 64)
    mask_labels, class_labels = labels_for([(2, 64, 64), (3, 64, 64)], num_labels=5, seed=9)
    with torch.no_grad():
        ref_out = hf_model(x, output_hidden_states=True)  # transformers crashes without it here
        torch.manual_seed(5)
        ref = hf_model.get_loss_dict(ref_out.masks_queries_logits, ref_out.class_queries_logits, mask_labels,
                                     class_labels, None)
        torch.manual_seed(5)
        out = ours(x, mask_labels=mask_labels, class_labels=class_labels, output_auxiliary_logits=True)
    assert len(out.auxiliary_logits) == ours.config.decoder_layers - 1  # still returned when asked
    assert list(ref) == ["loss_mask", "loss_dice", "loss_cross_entropy"]
    assert_close_rel(out.loss, sum(ref.values()), TOL, "loss without auxiliary terms")


def test_stacked_label_tensors_give_the_same_loss_as_lists(models):
    _, ours = models
    x = torch.randn(2, 3, 64, 64)
    mask_labels, class_labels = labels_for([(3, 64, 64), (3, 64, 64)], num_labels=5, seed=4)
    with torch.no_grad():
        out = ours(x)
        torch.manual_seed(1)
        as_lists, _ = mask2former_loss(out.masks_queries_logits, out.class_queries_logits, mask_labels, class_labels,
                                       num_labels=5, empty_weight=ours.criterion.empty_weight, num_points=37)
        torch.manual_seed(1)
        stacked, _ = mask2former_loss(out.masks_queries_logits, out.class_queries_logits, torch.stack(mask_labels),
                                      torch.stack(class_labels), num_labels=5,
                                      empty_weight=ours.criterion.empty_weight, num_points=37)
    assert torch.equal(as_lists, stacked)


@pytest.mark.parametrize("labels, error, match", [
    (dict(mask_labels=[torch.zeros(1, 64, 64)]), ValueError, "both mask_labels and class_labels"),
    (dict(mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([5])]), ValueError, r"must lie in \[0, 5\)"),
    (dict(mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([-1])]), ValueError, r"must lie in \[0, 5\)"),
    (dict(mask_labels=[torch.zeros(1, 64, 64)] * 2, class_labels=[torch.tensor([0])] * 2), ValueError, "batch of 1"),
    (dict(mask_labels=[torch.zeros(64, 64)], class_labels=[torch.tensor([0])]), ValueError, r"\(N, H, W\)"),
    (dict(mask_labels=[torch.zeros(2, 64, 64)], class_labels=[torch.tensor([0])]), ValueError, r"\(N, H, W\)"),
    (dict(mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([0.0])]), ValueError, "integer"),
    (dict(mask_labels=torch.zeros(1, 64, 64), class_labels=torch.tensor([0])), ValueError, r"\(batch, N, height"),
    (dict(mask_labels="masks", class_labels="classes"), ValueError, "one tensor per image"),
])
def test_bad_labels_raise_clear_errors(models, labels, error, match):
    _, ours = models
    with pytest.raises(error, match=match):
        ours(torch.randn(1, 3, 64, 64), **labels)
