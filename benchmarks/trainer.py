"""Training throughput: SiglipTrainer vs a plain PyTorch loop over the same model, data, loss and optimizer;
SiglipTrainer with `torch_compile`; FLIP patch dropout on a vision-heavy model. All in one run.

    python benchmarks/trainer.py [--steps 30] [--batch-size 64] [--repeats 2] [--no-compile]

Both sides run the same number of optimizer steps on the embedded demo data with the same collator, the
same `hf_siglip.sigmoid_loss` and AdamW (beta2 0.95), single process. Images/s counts images per second of
steady-state training (the first `--warmup` steps are not timed: they hold torch.compile's compilation, shown
apart as "warmup s"); images/CPU-s the same per second of this process's CPU time, which other load on a shared
machine disturbs less (run with OMP_NUM_THREADS=1 there). The runs alternate so machine load hits all alike.
Target (issue 4): SiglipTrainer >= 0.9x the plain loop.

Captioning (issue 22): SiglipTrainer with the captioning decoder on (`objectives: {captioning: {}}`: 2
BertLMHeadModel layers at the towers' width, cross-attending to the patch tokens); against the SiglipTrainer row it
should cost the decoder's forward and backward over the caption tokens, nothing more.

Patch dropout (issue 25): SiglipTrainer at `patch_dropout` 0.5 vs 0.0 on a vision-heavy setting (`--flip-image-size`
64 px in `--flip-patch-size` 4 px patches: 256 patch tokens per image against 16 text tokens). Target: >= 1.6x.
"""

import argparse
import tempfile
import time

import torch
from transformers import TrainerCallback

import hf_siglip as hs


def build(batch_size: int, image_size: int, patch_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    dataset = hs.make_demo_dataset(n_train=batch_size * 80, n_test=16, image_size=image_size, seed=seed)["train"]
    captions = [caption for row in dataset["caption"] for caption in row]
    tokenizer = hs.train_caption_tokenizer(captions, vocab_size=1000, model_max_length=16)
    processor = hs.build_processor(tokenizer, image_size=image_size)
    towers = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    config = hs.SiglipBottleneckConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, **towers),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **towers))
    collator = hs.SiglipDataCollator(processor=processor, max_length=16)
    return hs.SiglipBottleneckModel(config), collator, dataset


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(images: int, start: tuple[float, float], began: tuple[float, float]) -> tuple[float, float, float]:
    """(images/s, images/CPU-s) since `start`, and the wall seconds from `began` to `start` (the warmup)."""
    now = clock()
    return images / (now[0] - start[0]), images / (now[1] - start[1]), start[0] - began[0]


class StepClock(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.began, self.start, self.steps = warmup, None, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == self.warmup:
            self.start = clock()


def run_trainer(batch_size, steps, warmup, image_size, patch_size=8, **options) -> tuple[float, float, float]:
    """`rates` of the steps after the warmup; `options`: SiglipTrainingArguments fields."""
    model, collator, dataset = build(batch_size, image_size, patch_size)
    args = hs.SiglipTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-3,
        weight_decay=1e-4, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_drop_last=True, seed=0, **options)
    step_clock = StepClock(warmup)
    hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset,
                     callbacks=[step_clock]).train()
    return rates(batch_size * (steps - warmup), step_clock.start, step_clock.began)


def run_plain_loop(batch_size, steps, warmup, image_size) -> tuple[float, float, float]:
    model, collator, dataset = build(batch_size, image_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator,
                                         drop_last=True, generator=generator)
    began, start = clock(), None
    for step, batch in enumerate(loader):
        if step == steps:
            break
        if step == warmup:
            start = clock()
        outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = hs.sigmoid_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias,
                               batch["image_ids"], batch["text_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return rates(batch_size * (steps - warmup), start, began)


def print_table(title: str, results: dict, reference: str, column: str) -> None:
    print(f"\n{title}")
    print(f"| {'run':<40} | {'images/s':>9} | {column:>9} | {'images/CPU-s':>12} | {column:>9} | {'warmup s':>8} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 14}|{'-' * 11}|{'-' * 10}|")
    wall, cpu = (max(run[index] for run in results[reference]) for index in (0, 1))
    for name, runs in results.items():
        if runs:  # the best repeat of each measure
            speed, cpu_speed = (max(run[index] for run in runs) for index in (0, 1))
            warmup_seconds = runs[0][2]  # the first repeat's: compilation with a cold inductor cache
            print(f"| {name:<40} | {speed:>9.1f} | {speed / wall:>8.2f}x | {cpu_speed:>12.1f} | "
                  f"{cpu_speed / cpu:>8.2f}x | {warmup_seconds:>8.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch_compile row (inductor compiles for minutes on a small shared CPU)")
    parser.add_argument("--flip-steps", type=int, default=15)
    parser.add_argument("--flip-batch-size", type=int, default=32)
    parser.add_argument("--flip-image-size", type=int, default=64)
    parser.add_argument("--flip-patch-size", type=int, default=4)
    args = parser.parse_args()

    compiled = "SiglipTrainer, torch_compile (inductor)"
    captioning = "SiglipTrainer + captioning decoder"  # objectives: {captioning: {}} (2 layers, the tower's width)
    results = {"plain PyTorch loop": [], "SiglipTrainer": [], compiled: [], captioning: []}
    flip = {"SiglipTrainer, patch_dropout 0.0": [], "SiglipTrainer, patch_dropout 0.5": []}
    for _ in range(args.repeats):
        results["plain PyTorch loop"].append(run_plain_loop(args.batch_size, args.steps, args.warmup, args.image_size))
        results["SiglipTrainer"].append(run_trainer(args.batch_size, args.steps, args.warmup, args.image_size))
        results[captioning].append(run_trainer(args.batch_size, args.steps, args.warmup, args.image_size,
                                               objectives={"captioning": {}}))
        if not args.no_compile:
            results[compiled].append(run_trainer(args.batch_size, args.steps, args.warmup, args.image_size,
                                                 torch_compile=True))
        for ratio in (0.0, 0.5):
            flip[f"SiglipTrainer, patch_dropout {ratio}"].append(run_trainer(
                args.flip_batch_size, args.flip_steps, args.warmup, args.flip_image_size, args.flip_patch_size,
                patch_dropout=ratio))
    print(f"\n{torch.get_num_threads()} threads, best of {args.repeats}; warmup s: the first {args.warmup} steps of "
          f"the first repeat, untimed (torch_compile compiles there; later repeats find inductor's cache)")
    print_table(f"batch {args.batch_size}, {args.image_size} px in 8 px patches, {args.steps - args.warmup} timed "
                f"steps", results, "plain PyTorch loop", "vs plain")
    patches = (args.flip_image_size // args.flip_patch_size) ** 2
    print_table(f"vision-heavy: batch {args.flip_batch_size}, {args.flip_image_size} px in {args.flip_patch_size} px "
                f"patches ({patches} per image), 16 text tokens, {args.flip_steps - args.warmup} timed steps", flip,
                "SiglipTrainer, patch_dropout 0.0", "vs 0.0")


if __name__ == "__main__":
    main()
