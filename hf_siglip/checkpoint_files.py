"""Files the trainer's helpers (momentum teacher, concept-distillation head) keep beside a checkpoint's weights."""

import os
from pathlib import Path

import torch


def match_umask(folder: str, pattern: str) -> None:
    """safetensors writes weights with mode 0600 while every other saved file follows the umask (0644 usually):
    give the weights the same mode, so a checkpoint shared on a team disk is readable as a whole."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).glob(pattern):
        path.chmod(0o666 & ~umask)


def save_beside_checkpoint(tensors: dict[str, torch.Tensor], args, state, file_name: str) -> None:
    """Write `tensors` as `file_name` into the checkpoint folder of this step (process 0 only)."""
    if not state.is_world_process_zero:
        return
    from safetensors.torch import save_file

    folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    save_file({name: value.contiguous() for name, value in tensors.items()}, os.path.join(folder, file_name))
    match_umask(folder, file_name)


__all__ = ["match_umask", "save_beside_checkpoint"]
