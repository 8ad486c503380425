"""`hf-siglip train` with the ids of every trained batch recorded: `python train_recording_rows.py ROWS.jsonl
[train flags...]`, under any launcher. Each training step appends one line per process: its rank, the stream
epoch, the image ids of its batch, accelerate's distributed type and the class wrapping the model (FSDP or DDP).
Only `SiglipTrainer.training_step` is wrapped; the command is the real one."""

import json
import os
import sys

import hf_siglip.training.trainer as trainer_module
from hf_siglip.cli.main import main

rows_file = sys.argv[1]
original_step = trainer_module.SiglipTrainer.training_step


def recording_step(self, model, inputs, num_items_in_batch=None):
    position = self._stream_position() if trainer_module._is_stream(self.train_dataset) else None
    with open(rows_file, "a") as handle:
        handle.write(json.dumps({"rank": self.args.process_index, "epoch": position.epoch if position else None,
                                 "step": self.state.global_step, "ids": inputs["image_ids"].tolist(),
                                 "distributed_type": str(self.accelerator.distributed_type),
                                 "wrapper": type(model).__name__}) + "\n")
    return original_step(self, model, inputs, num_items_in_batch)


trainer_module.SiglipTrainer.training_step = recording_step
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.exit(main(["train", *sys.argv[2:]]))
