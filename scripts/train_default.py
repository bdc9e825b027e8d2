"""Train the small default model shipped in maskformer/default_model/ (CPU, reproducible).

    python scripts/train_default.py --steps 3000 --out maskformer/default_model

Data: maskformer.synthetic (discs, boxes, stripes on textured backgrounds), a fresh procedurally
generated batch every step (seeds 0, 1, 2, ... in order), 128x128. Model: maskformer.cli's
demo_config (Swin 32-d, depths 1-1-2-1, window 7, 8 queries, 64-d decoder, 4 classes). Loss:
MaskFormer's (Hungarian matching, focal + dice + cross-entropy). Evaluation: mIoU on held-out
seeds from 10**6 on. Deterministic for a given torch version and thread count.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor  # noqa: E402
from maskformer.cli import demo_config  # noqa: E402
from maskformer.synthetic import SYNTHETIC_LABELS, make_sample, mean_iou  # noqa: E402

HELD_OUT_SEED = 10**6


def processor():
    return MaskFormerImageProcessor(size={"shortest_edge": 128, "longest_edge": 512}, size_divisor=32,
                                    ignore_index=255, do_reduce_labels=False)


def evaluate(model, proc, n=64, size=128, seed0=HELD_OUT_SEED, batch=16):
    preds, targets = [], []
    model.eval()
    for start in range(0, n, batch):
        samples = [make_sample(seed0 + i, size, size) for i in range(start, min(n, start + batch))]
        inputs = proc(images=[s[0] for s in samples], return_tensors="pt")
        with torch.inference_mode():
            out = model(inputs["pixel_values"])
        maps = proc.post_process_semantic_segmentation(out, target_sizes=[(size, size)] * len(samples))
        preds += [m.numpy() for m in maps]
        targets += [s[1] for s in samples]
    return mean_iou(np.stack(preds), np.stack(targets), len(SYNTHETIC_LABELS))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="maskformer/default_model")
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = demo_config()
    config.id2label = dict(enumerate(SYNTHETIC_LABELS))
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = MaskFormerForInstanceSegmentation(config)
    proc = processor()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    log = []
    start = time.time()
    for step in range(args.steps):
        model.train()
        samples = [make_sample(step * args.batch + i) for i in range(args.batch)]
        inputs = proc(images=[s[0] for s in samples], segmentation_maps=[s[1] for s in samples], return_tensors="pt")
        out = model(inputs["pixel_values"], mask_labels=inputs["mask_labels"], class_labels=inputs["class_labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps} loss {out.loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            miou, per_class = evaluate(model, proc)
            log.append({"step": step + 1, "loss": out.loss.item(), "miou": miou, "per_class_iou": per_class.tolist(),
                        "seconds": time.time() - start})
            print(f"  eval step {step + 1}: mIoU {miou:.4f} per class {np.round(per_class, 3).tolist()}", flush=True)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "eval": log}, f, indent=2)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
