"""Training loss and gradients against transformers, on identical weights and labels."""
import pytest
import torch

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation
from maskformer.loading import load_model_state
from maskformer.loss import maskformer_loss

from hf_oracle import assert_close_rel, hf_maskformer_config, perturb_

# Loss and gradients go through the same ops as transformers', but the matcher's cost matrix
# and the scipy assignment are exact only up to fp32 summation order; 1e-5 relative as for logits.
TOL = 1e-5


def labels_for(batch_shapes, num_labels, seed=0):
    """Random but valid targets: image i has n_i non-overlapping region masks (a label map split)."""
    gen = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for n, h, w in batch_shapes:
        owner = torch.randint(0, n, (h // 8, w // 8), generator=gen).repeat_interleave(8, 0).repeat_interleave(8, 1)
        owner = torch.nn.functional.pad(owner, (0, w - owner.shape[1], 0, h - owner.shape[0]), value=0)
        mask_labels.append(torch.stack([(owner == k).float() for k in range(n)]))
        class_labels.append(torch.randperm(num_labels, generator=gen)[:n] if n <= num_labels
                            else torch.randint(0, num_labels, (n,), generator=gen))
    return mask_labels, class_labels


def pair(**config_kwargs):
    from transformers import MaskFormerForInstanceSegmentation as HF

    hf_model = perturb_(HF(hf_maskformer_config(**config_kwargs))).eval()
    ours = MaskFormerForInstanceSegmentation(MaskFormerConfig.from_dict(hf_model.config.to_dict())).eval()
    load_model_state(ours, dict(hf_model.state_dict()))
    return hf_model, ours


def grads(model):
    from maskformer.loading import normalize_keys

    return normalize_keys({n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("aux", [False, True])
def test_loss_and_gradients_match_transformers(aux):
    hf_model, ours = pair(window_size=3, num_labels=6, num_queries=7, decoder_layers=2, use_auxiliary_loss=aux)
    x = torch.randn(2, 3, 64, 48)
    # different numbers of segments per image, and one image with more targets than... classes repeat
    mask_labels, class_labels = labels_for([(3, 64, 48), (5, 64, 48)], num_labels=6)
    kwargs = dict(output_hidden_states=True) if aux else {}  # transformers needs it with aux (README)
    ref = hf_model(x, mask_labels=mask_labels, class_labels=class_labels, **kwargs)
    out = ours(x, mask_labels=mask_labels, class_labels=class_labels, **kwargs)
    assert_close_rel(out.loss, ref.loss, TOL, "loss")
    ref.loss.backward()
    out.loss.backward()
    ref_grads, our_grads = grads(hf_model), grads(ours)
    assert set(our_grads) == set(ref_grads) and len(our_grads) > 100
    # Per tensor: max |ours - ref| <= 1e-4 * max(max |ref|, 1e-3 * largest gradient anywhere).
    # The floor is for tensors whose exact gradient is 0 (the Swin key bias: softmax ignores a
    # constant added to a row of scores), where both sides hold only rounding noise (~1e-5).
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in our_grads.items():
        ref = ref_grads[name]
        err = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3 * scale)
        assert err <= 1e-4, f"grad {name}: relative error {err:.2e}"


def test_loss_dict_terms_match_transformers():
    hf_model, ours = pair(window_size=3, num_labels=4)
    x = torch.randn(1, 3, 40, 40)
    mask_labels, class_labels = labels_for([(2, 40, 40)], num_labels=4, seed=3)
    with torch.no_grad():
        hf_out = hf_model(x)
        ref = hf_model.get_loss_dict(hf_out.masks_queries_logits, hf_out.class_queries_logits, mask_labels,
                                     class_labels, None)
        out = ours(x)
    _, ours_dict = maskformer_loss(out.masks_queries_logits, out.class_queries_logits, mask_labels, class_labels,
                                   num_labels=4, empty_weight=ours.criterion.empty_weight, mask_weight=20.0,
                                   dice_weight=1.0, cross_entropy_weight=1.0)
    assert set(ours_dict) == set(ref)
    for k in ref:
        assert_close_rel(ours_dict[k], ref[k], TOL, k)


def test_bad_labels_raise():
    _, ours = pair(window_size=3, num_labels=4)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="both mask_labels and class_labels"):
        ours(x, mask_labels=[torch.zeros(1, 64, 64)])
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        ours(x, mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([7])])
    with pytest.raises(ValueError, match="for a batch of 1"):
        ours(x, mask_labels=[torch.zeros(1, 64, 64)] * 2, class_labels=[torch.tensor([0])] * 2)
