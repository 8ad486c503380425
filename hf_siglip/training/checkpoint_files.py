"""Checkpoint folders: the files the trainer's helpers (momentum teacher, concept-distillation head) keep beside a
checkpoint's weights, and the manifest that makes a checkpoint complete or absent.

A kill while a checkpoint is being written leaves a `checkpoint-N` folder with only some of its files (weights without
`trainer_state.json`, or everything but the teacher's file, which a callback writes last). The trainer therefore
writes `checkpoint_complete.json` (every file's name and size) once every process has written every file, side files
included; resuming takes the newest checkpoint whose manifest holds and names each newer one it skipped and why.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_complete.json"
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")


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


def write_manifest(folder: str) -> None:
    """Mark `folder` complete: list every file in it with its size, written atomically (temporary file, rename)."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*"))
             if path.is_file() and not path.name.startswith(MANIFEST_NAME)}
    temporary = folder / f"{MANIFEST_NAME}.tmp"
    temporary.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(temporary, folder / MANIFEST_NAME)


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (a missing or damaged file, named), or None when it is complete.

    A folder whose run wrote no manifest at all (saved by an earlier release, or by a plain `Trainer`) counts as
    complete when it holds `trainer_state.json`, as before."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a checkpoint folder (no such folder)"
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        if _run_writes_manifests(folder.parent):
            return f"{folder} is incomplete (no {MANIFEST_NAME}: the run stopped while writing it)"
        if not (folder / "trainer_state.json").is_file():
            return f"{folder} is incomplete or not a checkpoint (no trainer_state.json)"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is damaged"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is damaged: {path.stat().st_size:,} bytes, {size:,} when it was saved"
    return None


def _run_writes_manifests(output_dir: Path) -> bool:
    return any((folder / MANIFEST_NAME).exists() for folder in _checkpoint_folders(output_dir))


def _checkpoint_folders(output_dir) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in output_dir.iterdir()
             if path.is_dir() and (match := _CHECKPOINT_FOLDER.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir) -> tuple[str | None, list[str]]:
    """(the newest complete checkpoint of `output_dir` or None, why each newer one was skipped)."""
    skipped = []
    for folder in _checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder), skipped
        skipped.append(problem)
    return None, skipped


def resolve_checkpoint(output_dir, requested) -> str:
    """The checkpoint to resume from: `requested` True means the newest complete one of `output_dir` (each newer,
    incomplete one is named in a warning); a path must be complete. ValueError in one line otherwise."""
    if requested is True:
        found, skipped = last_complete_checkpoint(output_dir)
        for problem in skipped:
            logger.warning("not resuming from it: %s", problem)
        if found is None:
            reasons = f" ({'; '.join(skipped)})" if skipped else ""
            raise ValueError(f"--resume_from_checkpoint true: {output_dir} holds no checkpoint to resume from"
                             f"{reasons}; checkpoints are written with --save_strategy steps|epoch")
        return found
    problem = checkpoint_problem(requested)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {requested}: {problem}")
    return str(requested)


class CheckpointManifest(TrainerCallback):
    """Writes a checkpoint's manifest once every process has written its files. `SiglipTrainer` keeps this
    callback last, so the side files other callbacks write on save (teacher, concept head) are in the manifest."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_save(self, args, state, control, **kwargs):
        self.accelerator.wait_for_everyone()  # each process's own files (rng_state_<rank>.pth) are on disk
        if state.is_world_process_zero:
            write_manifest(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


__all__ = ["MANIFEST_NAME", "CheckpointManifest", "checkpoint_problem", "last_complete_checkpoint", "match_umask",
           "resolve_checkpoint", "save_beside_checkpoint", "write_manifest"]
