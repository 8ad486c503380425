"""A few AdamW steps of the tiny SigLIP with the ring loss on 2 gloo processes, its weights sharded by FSDP2
(`torch.distributed.fsdp.fully_shard`, per encoder layer and at the root, as the `fsdp` accelerate config
wraps them) or replicated by DDP; the full weights are then gathered and saved with `save_pretrained`.

    torchrun --nproc_per_node 2 fsdp_steps.py fsdp|ddp OUT_DIR

accelerate 1.15 does not switch FSDP on for CPU processes (see tests/test_fsdp.py), so this drives torch's FSDP2
directly: what it proves is that the model's forward and the loss outside it train correctly on sharded weights.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for conftest's tiny setup
import hf_siglip as hs  # noqa: E402
from conftest import tiny_training_setup  # noqa: E402

PER_PROCESS, STEPS = 8, 3


def main(mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _, collator, dataset = tiny_training_setup(n_train=PER_PROCESS * world * STEPS, seed=0)
    config = model.config
    if mode == "fsdp":
        for module in list(model.modules()):
            if isinstance(module, SiglipEncoderLayer):
                fully_shard(module)
        fully_shard(model)
        sharded = sum(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
        assert sharded == len(list(model.parameters())), "every parameter is a sharded DTensor"
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    rows = dataset["train"]  # its image_id column gives the ids
    for step in range(STEPS):
        start = (step * world + rank) * PER_PROCESS
        batch = collator([rows[i] for i in range(start, start + PER_PROCESS)])
        outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
        loss = hs.sigmoid_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias,
                               batch["image_ids"], batch["text_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        weights = {name.removeprefix("module."): value for name, value in weights.items()}
        saved = hs.SiglipBottleneckModel(config)
        saved.load_state_dict(weights)
        saved.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "losses.json"), "w") as handle:
            json.dump(losses, handle)
    dist.barrier()
    del model, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
