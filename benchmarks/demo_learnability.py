"""Is the embedded demo dataset learnable on a CPU in a few minutes? (evidence for the demo, not a test)

    PYTHONPATH=. python benchmarks/demo_learnability.py --seconds 120

Trains a tiny random ``transformers.SiglipModel`` (width 64, 2 layers, 4x4 patches on 32x32 images,
word-level tokenizer) with its built-in sigmoid loss (t' = log 10, b = -10 at init, one caption per
image sampled per step by the collator's CaptionSampler hook), AdamW lr 1e-3 beta2 0.95, batch 128,
for a wall-clock budget; then reports zero-shot top-1 on the held-out split (DEMO_CLASSES averaged
over DEMO_TEMPLATES; chance 1/30) and image->text recall@1/5 over held-out captions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from data_fixtures import make_processor  # noqa: E402

from hf_siglip.data import DEMO_CLASSES, DEMO_TEMPLATES, CaptionSampler, SiglipDataCollator, make_demo_dataset  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    start = time.time()
    demo = make_demo_dataset(n_train=4000, n_test=500)
    processor = make_processor(32)
    common = dict(hidden_size=args.width, intermediate_size=2 * args.width, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), max_position_embeddings=16, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **common),
        vision_config=dict(image_size=32, patch_size=4, **common))
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10)))
        model.logit_bias.fill_(-10.0)
    collator = SiglipDataCollator(processor=processor, max_length=16, caption_sampler=CaptionSampler(["caption"], k=1))
    train, test = list(demo["train"]), list(demo["test"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    step = 0
    while time.time() - start < args.seconds:
        collator.set_epoch(step)
        batch = collator([train[i] for i in rng.choice(len(train), 128, replace=False)])
        loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        prompts = [t.format(c) for c in DEMO_CLASSES for t in DEMO_TEMPLATES]
        ids = torch.tensor(processor.tokenizer(prompts, padding="max_length", max_length=16, truncation=True)["input_ids"])
        prompt_embeds = normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        class_embeds = normalize(prompt_embeds.view(len(DEMO_CLASSES), len(DEMO_TEMPLATES), -1).mean(1), dim=-1)
        held_out = SiglipDataCollator(processor=processor, max_length=16)(test)
        image_embeds = normalize(model.get_image_features(pixel_values=held_out["pixel_values"]).pooler_output, dim=-1)
        text_embeds = normalize(model.get_text_features(input_ids=held_out["input_ids"]).pooler_output, dim=-1)
    labels = torch.tensor([r["label"] for r in test])
    zero_shot = ((image_embeds @ class_embeds.T).argmax(1) == labels).float().mean().item()
    ranks = (image_embeds @ text_embeds.T).argsort(dim=1, descending=True)
    hits = held_out["text_ids"][ranks] == held_out["image_ids"][:, None]
    recall = {k: hits[:, :k].any(1).float().mean().item() for k in (1, 5)}
    chance_r1 = 1 / len(test)
    print(f"steps {step} in {time.time() - start:.0f}s | final loss {loss.item():.3f} | zero-shot top-1 "
          f"{zero_shot:.3f} (chance {1 / len(DEMO_CLASSES):.3f}) | image->text R@1 {recall[1]:.3f} "
          f"R@5 {recall[5]:.3f} (chance R@1 {chance_r1:.3f})")


if __name__ == "__main__":
    main()
