"""How much a mixed-size batch changes semantic maps (README, "Command line"): 8 generated images
of mixed sizes through the shipped default model in batches of 4, against each image alone,
post-processed the transformers way (padded logits resized whole) and with `pixel_mask` (each
image's region cropped first). The rest that the crop leaves is the network seeing the padding:
why `maskformer segment` only batches images of the same padded size.

    python scripts/measure_batch_padding.py
"""
import torch, numpy as np
from maskformer.loading import load_default_model, DEFAULT_MODEL_DIR
from maskformer import MaskFormerImageProcessor
from maskformer.synthetic import make_sample
m = load_default_model(); p = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
sizes = [(150, 200), (101, 333), (480, 640), (96, 96), (213, 160), (300, 400), (64, 300), (240, 180)]
imgs = [make_sample(100 + i, height=h, width=w)[0] for i, (h, w) in enumerate(sizes)]
def maps(batch, pixel_mask):
    inp = p(batch, return_tensors="pt")
    with torch.inference_mode():
        out = m(inp["pixel_values"])
    kw = {"pixel_mask": inp["pixel_mask"]} if pixel_mask else {}
    return p.post_process_semantic_segmentation(out, target_sizes=[(im.height, im.width) for im in batch], **kw)
alone = [maps([im], False)[0] for im in imgs]
for crop in (False, True):
    fr = []
    for i in range(0, len(imgs), 4):
        got = maps(imgs[i:i + 4], crop)
        fr += [float((g != a).float().mean()) for g, a in zip(got, alone[i:i + 4])]
    print("crop" if crop else "transformers-style", "fraction of pixels differing from batch 1:", [round(f, 3) for f in fr])
