"""NaN and infinity: refused wherever a number would be reported or a model kept (decision 12 in docs/ARCHITECTURE.md).

- A training step whose loss, gradient norm, t or b is not finite stops the run, or with
  `SiglipTrainingArguments.on_nonfinite="skip"` is skipped and counted (`SiglipTrainer._check_finite_step`).
- Weights are checked after loading (`load_dual_encoder`, `hf-siglip eval`, resuming from a checkpoint), at the end
  of training and before a model card is written or a model pushed (`check_finite_weights`); the error names the
  safetensors file and tensor that hold the bad values (`nonfinite_in_checkpoint`).
- Embeddings are checked before any metric is computed from them (`hf_siglip.evaluation.check_finite_embeddings`).
- Metrics files hold `null` where a value is not finite (`hf_siglip.evaluation.to_json`): always valid JSON.

Every refusal raises `NonFiniteError`, which the `hf-siglip` command prints as one line.
"""

import json
import math
import os

import torch

from ..errors import HfSiglipError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class NonFiniteError(HfSiglipError, ValueError):
    """NaN or infinity where a finite number is needed: a diverged training step, corrupt or diverged weights,
    non-finite embeddings. A `ValueError` too, so code that caught bad values as `ValueError` still does."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (FSDP2's DTensor); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def nonfinite_tensors(named_tensors) -> list[tuple[str, int, int]]:
    """(name, non-finite values, values) of each floating-point tensor holding NaN or infinity, in the given order."""
    named = [(name, _local(tensor.detach())) for name, tensor in named_tensors]
    named = [(name, tensor) for name, tensor in named if tensor.is_floating_point() and tensor.numel()]
    if not named:
        return []
    flags = [torch.isfinite(tensor).all() for _, tensor in named]  # one flag per tensor, read back at once
    same_device = len({flag.device for flag in flags}) == 1
    finite = (torch.stack(flags) if same_device else torch.stack([flag.cpu() for flag in flags])).tolist()
    return [(name, int((~torch.isfinite(tensor)).sum()), tensor.numel())
            for (name, tensor), ok in zip(named, finite) if not ok]


def nonfinite_parameters(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """`nonfinite_tensors` of the model's parameters (buffers are left out: some models keep -inf masks)."""
    return nonfinite_tensors(model.named_parameters())


def checkpoint_weight_files(source: str | os.PathLike) -> list[str]:
    """The safetensors weight files of a checkpoint folder or an already downloaded Hub id: `model.safetensors`, or
    the shards its index lists; [] when there are none (e.g. a `pytorch_model.bin` checkpoint)."""
    source = str(source)
    if os.path.isdir(source):
        def find(name):
            path = os.path.join(source, name)
            return path if os.path.isfile(path) else None
    else:
        from huggingface_hub import try_to_load_from_cache

        def find(name):
            path = try_to_load_from_cache(source, name)  # no network: what from_pretrained has already fetched
            return path if isinstance(path, str) else None
    single = find(SAFE_WEIGHTS_NAME)
    if single:
        return [single]
    index = find(SAFE_WEIGHTS_INDEX_NAME)
    if not index:
        return []
    with open(index) as file:
        shards = sorted(set(json.load(file).get("weight_map", {}).values()))
    return [path for path in map(find, shards) if path]


def nonfinite_in_checkpoint(source: str | os.PathLike) -> list[tuple[str, str, int, int]]:
    """(file, tensor, non-finite values, values) for each tensor holding NaN or infinity in the checkpoint's
    safetensors weight files (`checkpoint_weight_files`)."""
    from safetensors import safe_open

    found = []
    for path in checkpoint_weight_files(source):
        with safe_open(path, framework="pt") as file:
            for name in file.keys():
                found += [(path, *entry) for entry in nonfinite_tensors([(name, file.get_tensor(name))])]
    return found


def describe_nonfinite_weights(bad: list[tuple[str, int, int]], source: str | os.PathLike | None = None,
                               consequence: str = "not loaded") -> str:
    """One line on weights holding NaN or infinity: the file and tensor when `source` (a checkpoint) holds them, else
    the model's first bad parameter (`bad`, from `nonfinite_parameters`; empty: another process found them)."""
    located = nonfinite_in_checkpoint(source) if source is not None else []
    if located:
        path, name, count, size = located[0]
        files = sorted({entry[0] for entry in located} - {path})
        also = f"; also in {', '.join(files)}" if files else ""
        return (f"{path} holds NaN or infinite values in {len(located)} tensor(s), first {name} ({count} of {size} "
                f"values){also}: the file is corrupt or was saved from a diverged run; {consequence}")
    where = f" loaded from {source}" if source is not None else ""
    if not bad:
        return f"the model{where} has NaN or infinite weights on another process; {consequence}"
    name, count, size = bad[0]
    return (f"the model{where} has NaN or infinite weights in {len(bad)} tensor(s), first {name} ({count} of {size} "
            f"values): it has diverged or its weights are corrupt; {consequence}")


def check_finite_weights(model: torch.nn.Module, source: str | os.PathLike | None = None,
                         consequence: str = "not loaded") -> None:
    """Raise `NonFiniteError` when a parameter of `model` holds NaN or infinity, naming the safetensors file and tensor
    of `source` (the checkpoint it was loaded from) that hold them. Local to this process: `SiglipTrainer` makes
    the same check collective."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(describe_nonfinite_weights(bad, source, consequence))


def finite_or_none(value):
    """`value` with every non-finite float (NaN, infinity) inside dicts, lists and tuples replaced by None."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["NonFiniteError", "check_finite_weights", "checkpoint_weight_files", "describe_nonfinite_weights",
           "finite_or_none", "nonfinite_in_checkpoint", "nonfinite_parameters", "nonfinite_tensors"]
