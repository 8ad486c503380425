"""Train a tiny SigLIP with DiHT concept distillation (global batch 16, 3 SGD steps) and write the logged losses and
the final parameters, the concept head's included, to a JSON file. Under `accelerate launch` each process takes its
share of the batch, in micro-batches of 16 / processes / ACCUMULATION images.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_concept_tiny.py OUT.json TEACHER 2
"""

import json
import os
import sys
import tempfile

import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for conftest's tiny setup
import hf_siglip as hs  # noqa: E402
from conftest import tiny_training_setup  # noqa: E402
from hf_siglip.data.steps import DataContext, parse_data_steps, run_data_steps  # noqa: E402

SETTINGS = {"max_steps": 3, "optim": "sgd", "learning_rate": 0.05, "lr_scheduler_type": "constant",
            "weight_decay": 0.0, "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True,
            "seed": 0, "dataloader_drop_last": True, "max_grad_norm": 0.0, "concept_distillation_weight": 2.0}


def main(out_path, teacher, accumulation):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, _, collator, dataset = tiny_training_setup()
    context = DataContext()
    train = run_data_steps(dataset["train"], parse_data_steps([{"concept_targets": {"model": teacher}}]), context)
    args = hs.SiglipTrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16 // world //
                                      accumulation, gradient_accumulation_steps=accumulation, **SETTINGS)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=train)
    trainer.data_steps_report = context.report  # 'auto' takes kl from the step's output (a classifier's logits)
    trainer.train()
    if trainer.accelerator.is_main_process:
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(out_path, "w") as file:
            json.dump({"losses": [entry["loss"] for entry in history],
                       "concept": [entry["concept_distillation_loss"] for entry in history],
                       "parameters": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}},
                      file)
    del trainer, model  # release before tearing the group down (gloo exit crashes otherwise)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
