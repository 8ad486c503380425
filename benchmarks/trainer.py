"""Training throughput: SiglipTrainer vs a plain PyTorch loop over the same model, data, loss and optimizer.

    python benchmarks/trainer.py [--steps 30] [--batch-size 64] [--repeats 2]

Both sides run the same number of optimizer steps on the embedded demo data with the same collator, the
same `hf_siglip.sigmoid_loss` and AdamW (beta2 0.95), single process. Images/s counts images per second of
steady-state training (the first `--warmup` steps are not timed); the runs alternate so machine load hits
both alike. Target (issue 4): SiglipTrainer >= 0.9x the plain loop.
"""

import argparse
import tempfile
import time

import torch
from transformers import TrainerCallback

import hf_siglip as hs


def build(batch_size: int, image_size: int, seed: int = 0):
    torch.manual_seed(seed)
    dataset = hs.make_demo_dataset(n_train=batch_size * 80, n_test=16, image_size=image_size, seed=seed)["train"]
    captions = [caption for row in dataset["caption"] for caption in row]
    tokenizer = hs.train_caption_tokenizer(captions, vocab_size=1000, model_max_length=16)
    processor = hs.build_processor(tokenizer, image_size=image_size)
    towers = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    config = hs.SiglipBottleneckConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, **towers),
        vision_config=dict(image_size=image_size, patch_size=8, **towers))
    collator = hs.SiglipDataCollator(processor=processor, max_length=16)
    return hs.SiglipBottleneckModel(config), collator, dataset


class StepClock(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()


def run_trainer(batch_size, steps, warmup, image_size) -> float:
    model, collator, dataset = build(batch_size, image_size)
    args = hs.SiglipTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-3,
        weight_decay=1e-4, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_drop_last=True, seed=0)
    clock = StepClock(warmup)
    hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset, callbacks=[clock]).train()
    return batch_size * (steps - warmup) / (time.perf_counter() - clock.start)


def run_plain_loop(batch_size, steps, warmup, image_size) -> float:
    model, collator, dataset = build(batch_size, image_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator,
                                         drop_last=True, generator=generator)
    start = None
    for step, batch in enumerate(loader):
        if step == steps:
            break
        if step == warmup:
            start = time.perf_counter()
        outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = hs.sigmoid_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias,
                               batch["image_ids"], batch["text_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch_size * (steps - warmup) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    results = {"plain PyTorch loop": [], "SiglipTrainer": []}
    for _ in range(args.repeats):
        results["plain PyTorch loop"].append(run_plain_loop(args.batch_size, args.steps, args.warmup, args.image_size))
        results["SiglipTrainer"].append(run_trainer(args.batch_size, args.steps, args.warmup, args.image_size))
    plain = max(results["plain PyTorch loop"])
    print(f"\nbatch {args.batch_size}, {args.steps - args.warmup} timed steps, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print(f"| {'loop':<20} | {'images/s':>9} | {'vs plain':>8} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 10}|")
    for name, values in results.items():
        print(f"| {name:<20} | {max(values):>9.1f} | {max(values) / plain:>7.2f}x |")


if __name__ == "__main__":
    main()
