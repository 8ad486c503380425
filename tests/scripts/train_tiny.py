"""Train a tiny SigLIP with SiglipTrainer and write losses and parameters per step to a JSON file.

Run alone (one process) or under `accelerate launch` (several processes): the trainer, loss and data
order are the same code, so with the same global batch the two must agree.

    python train_tiny.py OUT.json GLOBAL_BATCH STEPS
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_tiny.py OUT.json GLOBAL_BATCH STEPS
"""

import json
import sys
import tempfile

import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for conftest's tiny setup
import hf_siglip as hs  # noqa: E402
from conftest import tiny_training_setup  # noqa: E402


class RecordParameters(TrainerCallback):
    """Parameters after the first optimizer step (to read the first gradient) and at the end."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({name: p.detach().flatten()[:64].tolist() for name, p in model.named_parameters()})


def main(out_path, global_batch, steps):
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    model, processor, collator, dataset = tiny_training_setup(n_train=64)
    initial = {name: p.detach().flatten()[:64].tolist() for name, p in model.named_parameters()}
    args = hs.SiglipTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=global_batch // world, max_steps=steps,
        optim="sgd", learning_rate=0.01, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True, max_grad_norm=0.0,
    )
    recorder = RecordParameters()
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"],
                               callbacks=[recorder])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.accelerator.is_main_process:
        positives = [entry["positives_per_image"] for entry in trainer.state.log_history if "loss" in entry]
        with open(out_path, "w") as file:
            json.dump({"losses": losses, "initial": initial, "after_step": recorder.after_step,
                       "lr": args.learning_rate, "positives_per_image": positives}, file)
    del trainer, model  # release before tearing the group down (gloo exit crashes otherwise)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
