"""LoRA on a dual encoder's towers through `peft` (`hf-siglip train --use_peft`).

`add_lora` wraps the model with `peft.get_peft_model`: peft injects the adapters into the model object itself and
freezes every other weight. The trainer goes on training that same object (its class, attributes and tower names
are unchanged, so the ring loss, DDP, GradCache, locking and the optimizer groups work as without LoRA: adapters
are new weights there); the returned `PeftModel` is kept for saving in peft's own format.

Saving (`save_lora`): peft's `adapter_model.safetensors` + `adapter_config.json`, which
`peft.PeftModel.from_pretrained(<the native base model>, folder)` loads; with `merge` the adapters are folded into
the weights (`merge_and_unload`) and the result saved as the native model, which plain transformers loads. Both
never share a folder: transformers' `from_pretrained` would apply an adapter_config.json it finds on top of
already-merged weights.

Which layers: the linear layers named in `target_modules` inside the chosen towers, listed by their full names
(peft would also match a name inside `nn.MultiheadAttention`, SigLIP's pooling head, whose `out_proj` weight the
attention reads directly and must stay a plain Linear).
"""

import logging
import os

from torch import nn

from .dual_encoders import tower_modules

logger = logging.getLogger(__name__)

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_FOLDER = "adapter"  # where the adapter goes beside a merged model


def lora_target_names(model: nn.Module, towers, target_modules=None) -> list[str]:
    """Full names of the linear layers to adapt: in `towers`, last name part in `target_modules` (default: the
    attention projections; 'all-linear': any), never inside an `nn.MultiheadAttention`."""
    wanted = tuple(target_modules or ATTENTION_PROJECTIONS)
    every = wanted in (("all-linear",), ("all_linear",))
    roots = {id(module) for tower in towers for module in tower_modules(model, tower)}
    names, inside_tower, skipped = [], set(), set()
    for name, module in model.named_modules():
        if id(module) in roots:
            inside_tower.add(name)
        in_tower = any(name == root or name.startswith(f"{root}.") for root in inside_tower)
        if isinstance(module, nn.MultiheadAttention):
            skipped.add(name)
        if not in_tower or not isinstance(module, nn.Linear) or any(name.startswith(f"{s}.") for s in skipped):
            continue
        if every or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise ValueError(f"lora_target_modules {list(wanted)}: no linear layer of that name in the {list(towers)} "
                         f"tower(s)")
    return names


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules=None,
             towers=("text", "vision")):
    """Adapters on `model` in place (see the module docstring); returns the `peft.PeftModel` wrapping it."""
    from peft import LoraConfig, get_peft_model

    names = lora_target_names(model, towers, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    peft_model = get_peft_model(model, config)
    model.save_pretrained = _checkpoint_saver(model)  # the Trainer's checkpoints (see `_checkpoint_saver`)
    trainable, total = count_parameters(model)
    logger.info("LoRA (peft): r=%d, alpha=%s, dropout=%s on %d linear layers of the %s tower(s): %s trainable "
                "parameters of %s (%.2f%%)", r, alpha, dropout, len(names), "+".join(towers), f"{trainable:,}",
                f"{total:,}", 100.0 * trainable / total)
    return peft_model


def _checkpoint_saver(model: nn.Module):
    """`save_pretrained` for the Trainer's checkpoints of a model with adapters injected: every weight under its
    injected name (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`) in model.safetensors, beside the
    config, which `--resume_from_checkpoint` loads back into the same injected model. The native save would look for
    the plain names; the final save is `save_lora`'s."""
    from safetensors.torch import save_file

    def save_pretrained(save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        state = model.state_dict() if state_dict is None else state_dict
        save_file({name: tensor.detach().contiguous() for name, tensor in state.items()},
                  os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(save_directory)

    return save_pretrained


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def save_lora(peft_model, output_dir: str, processor=None, merge: bool = False) -> dict[str, str]:
    """peft's adapter files in `output_dir` (or, with `merge`, in `output_dir/adapter`, the merged native model in
    `output_dir`); `processor` beside the model. Returns {"adapter": folder, "merged": folder or absent}. After a
    merge the adapters are gone from the model (it is the merged one)."""
    os.makedirs(output_dir, exist_ok=True)
    adapter_dir = os.path.join(output_dir, ADAPTER_FOLDER) if merge else output_dir
    peft_model.save_pretrained(adapter_dir)
    folders = {"adapter": adapter_dir}
    if merge:
        vars(peft_model.get_base_model()).pop("save_pretrained", None)  # the native save again (`_checkpoint_saver`)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(output_dir)
        folders["merged"] = output_dir
    if processor is not None:
        processor.save_pretrained(output_dir)
    return folders


__all__ = ["add_lora", "count_parameters", "lora_target_names", "save_lora"]
