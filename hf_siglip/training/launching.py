"""Launchers and the world of processes: the trainer's idea of it must be torch.distributed's.

The ring loss runs over torch.distributed's default group. If a launcher started several processes but the
Trainer believes it is alone (`torchrun` on a CPU machine without `use_cpu`, where accelerate picks no
backend), each process would train its own model on all the data while the loss spans them all: silently
wrong. `check_process_world` turns that into an error at start; `prepare_cpu_torchrun` makes the common
case (torchrun on a machine without GPUs) work the way `ACCELERATE_USE_CPU=1 accelerate launch` does.
"""

import os

LAUNCH_HELP = (
    "launch with `accelerate launch --num_processes N -m hf_siglip train ...` (on CPU: "
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...), with `torchrun --nproc_per_node N "
    "-m hf_siglip train ...`, or with plain `python -m hf_siglip train` / `hf-siglip train` for one process"
)


def _launcher_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def prepare_cpu_torchrun() -> None:
    """Under torchrun (or any launcher setting WORLD_SIZE > 1) on a machine without an accelerator, ask
    accelerate for its CPU (gloo) multi-process mode, read by `TrainingArguments` from ACCELERATE_USE_CPU."""
    import torch

    if _launcher_world_size() > 1 and "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def start_cpu_process_group(timeout_seconds: float, backend: str | None = None) -> bool:
    """Join the launcher's CPU (gloo) process group with `timeout_seconds` as its timeout, before accelerate does
    (the caller knows the processes run on CPU).

    accelerate passes `--ddp_timeout` to the process group on GPUs but not on CPU, where gloo's default (30 minutes)
    then holds: a frozen or stopped peer leaves the others waiting that long in a collective. Joined here, accelerate
    finds the group and keeps it. True when this call started it."""
    import torch.distributed as dist

    launched = _launcher_world_size() > 1 and "MASTER_ADDR" in os.environ
    if not (launched and dist.is_available()) or dist.is_initialized():
        return False
    from datetime import timedelta

    dist.init_process_group(backend=backend or "gloo", timeout=timedelta(seconds=timeout_seconds))
    return True


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` is torch.distributed giving up on a peer that did not answer within the group's timeout."""
    text = str(error).lower()
    return type(error).__name__ in ("DistBackendError", "DistError", "RuntimeError") and (
        "timed out" in text or "timeout" in text) and ("gloo" in text or "recv" in text or "send" in text
                                                       or type(error).__name__.startswith("Dist"))


def process_world_mismatch(trainer_world_size: int) -> str | None:
    """A message when torch.distributed or the launcher's WORLD_SIZE disagree with the trainer's world size."""
    import torch.distributed as dist

    worlds = {"the launcher (WORLD_SIZE)": _launcher_world_size()}
    if dist.is_available() and dist.is_initialized():
        worlds["torch.distributed"] = dist.get_world_size()
    for who, size in worlds.items():
        if size != trainer_world_size:
            return (f"{who} has {size} processes but the trainer sees {trainer_world_size}: each process would "
                    f"train its own model while the loss spans them all. Stop and {LAUNCH_HELP}.")
    return None


def check_process_world(trainer_world_size: int) -> None:
    problem = process_world_mismatch(trainer_world_size)
    if problem is not None:
        raise RuntimeError(problem)


def fsdp_request_ignored(distributed_type) -> str | None:
    """A message when the launcher asked for FSDP (`ACCELERATE_USE_FSDP=true`, set by an accelerate config with
    `distributed_type: FSDP`) but accelerate runs something else: accelerate 1.15 switches FSDP on only for
    accelerator processes (GPU, XPU, NPU...), so CPU processes train with DDP, each holding the full weights."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or str(distributed_type).endswith("FSDP"):
        return None
    return (f"the accelerate config asks for FSDP but these processes run {distributed_type} (accelerate enables "
            "FSDP only on GPUs and other accelerators): every process holds the full weights")


__all__ = ["check_process_world", "fsdp_request_ignored", "is_collective_timeout", "prepare_cpu_torchrun",
           "process_world_mismatch", "start_cpu_process_group"]
