"""Non-finite values on ONE process of several: every process must take the same decision and none may hang.

Trains a tiny SigLIP twice; in both runs the images of this process's 2nd batch are NaN on the last process only.
First with `on_nonfinite="skip"` (3 steps), then with "stop". Writes what it saw to OUT_DIR/<rank>.json.

    torchrun --nproc_per_node 2 nonfinite_tiny.py OUT_DIR
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for conftest's tiny setup
import hf_siglip as hs  # noqa: E402
from conftest import tiny_training_setup  # noqa: E402
from hf_siglip.training.finite import NonFiniteError  # noqa: E402


@dataclass
class PoisonedCollator(hs.SiglipDataCollator):
    """The real collator; the batch of call number `poisoned_call` (1-based; 0: none) gets NaN images."""

    poisoned_call: int = 0
    calls: int = 0
    normalize_on_device: bool | None = False  # float pixels, which can hold the NaN (uint8 cannot)

    def __call__(self, rows):
        batch = super().__call__(rows)
        self.calls += 1
        if self.calls == self.poisoned_call:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch


class RecordParameters(TrainerCallback):
    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))


def train(mode: str, rank: int, world: int):
    model, processor, _, dataset = tiny_training_setup(n_train=64)
    collator = PoisonedCollator(processor=processor, max_length=12, caption_column="caption",
                                poisoned_call=2 if rank == world - 1 else 0)
    args = hs.SiglipTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16 // world, max_steps=3, optim="adamw_torch",
        learning_rate=0.01, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True, on_nonfinite=mode)
    recorder = RecordParameters()
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"],
                               callbacks=[recorder])
    result = {}
    try:
        trainer.train()
    except NonFiniteError as error:
        result["error"] = str(error)
    steps = recorder.after_step
    result.update(
        steps_done=len(steps),
        skipped=trainer.nonfinite_steps_skipped,
        report=trainer.data_report(),  # collective
        skipped_step_left_weights=len(steps) >= 2 and torch.equal(steps[0], steps[1]),
        later_step_trained=len(steps) >= 3 and not torch.equal(steps[1], steps[2]),
        finite=bool(torch.isfinite(steps[-1]).all()) if steps else None,
        checksum=float(steps[-1].double().sum()) if steps else None,
        logged_losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    )
    del trainer, model
    return result


def main(out_dir):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    results = {mode: train(mode, rank, world) for mode in ("skip", "stop")}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as file:
        json.dump(results, file)  # before the group is torn down: a teardown abort must not lose the results
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
