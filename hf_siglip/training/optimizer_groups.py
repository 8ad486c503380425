"""The optimizer's parameter groups: weight decay or not, pretrained tower or new weight, layer-wise lr decay.

Each trainable parameter gets a learning rate and a weight decay from three independent choices:

- decay or not: biases, norms, t and b, position embeddings, probes and class tokens never decay (ViT practice);
- origin: a pretrained tower's weights (SigLIP 4.5: `pretrained_learning_rate_multiplier`, `pretrained_weight_decay`)
  or new ones (full rate, `weight_decay`). LoRA adapters (`lora_` in the name) are new weights inside a tower;
- depth (`layer_lr_decay`, BEiT / timm fine-tuning): in a pretrained tower with N blocks, the embeddings are layer 0,
  block i is layer i + 1 and what follows the blocks (final norm, pooling head, projection) is layer N + 1; a
  parameter of layer l trains at `decay ** (N + 1 - l)` times its rate. The heads outside the towers (t, b, a new
  backbone's projection) and new weights are not decayed. Each tower counts its own blocks.

A module an objective attached with its own `learning_rate` (the fusion encoder of ITM / MLM: a post-LN BERT that
does not train at a from-scratch dual encoder's rate) is a group of its own at that rate ("fusion_encoder/decay").

The learning rate of a group is `learning_rate * multiplier * decay ** depth`; each group carries a `name`
("pretrained/decay/vision/layer3", "new/no_decay") so tests and logs can find it.
"""

import re
from collections import defaultdict

from torch import nn

from ..dual_encoders import tower_prefixes

# Parameters SigLIP/ViT practice never decays: biases (nn.MultiheadAttention's `in_proj_bias` too), norms (matched
# by module type below), the learnable temperature and bias, position embeddings, the attention-pooling probe,
# class tokens (CLIP's `class_embedding`).
NO_DECAY_NAME_PATTERN = re.compile(
    r"([._]bias$|^logit_scale$|position_embedding|\.probe$|cls_token|class_embedding|mask_token|register_tokens)"
)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
# A block's index inside a tower: SigLIP/CLIP `encoder.layers.3.`, BERT `encoder.layer.3.`, timm `blocks.3.`
BLOCK_PATTERN = re.compile(r"\.(?:layers|layer|blocks|h)\.(\d+)\.")
# What comes before the first block: embeddings (patch, token, position, class token) and CLIP's pre-norm
EMBEDDING_PATTERN = re.compile(r"(embed|pre_layrnorm|pre_layernorm|norm_pre|cls_token|register_tokens)")
# peft's adapter weights (lora_A / lora_B / lora_embedding_*): new weights, whatever tower holds them
ADAPTER_PATTERN = re.compile(r"\.lora_")


def tower_of(name: str, prefixes_by_tower: dict[str, tuple[str, ...]]) -> str | None:
    for tower, prefixes in prefixes_by_tower.items():
        if name.startswith(prefixes):
            return tower
    return None  # heads: logit_scale, logit_bias, a new backbone's visual_projection


def layer_ids(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """For each parameter name inside a tower: (tower, layer id, N + 1), as the module docstring numbers them."""
    prefixes = tower_prefixes(model)
    found = {}
    for name, _ in model.named_parameters():
        tower = tower_of(name, prefixes)
        if tower is None:
            continue
        block = BLOCK_PATTERN.search(name)
        found[name] = (tower, int(block.group(1)) + 1 if block else (0 if EMBEDDING_PATTERN.search(name) else None))
    blocks = defaultdict(int)  # N per tower: the highest block index + 1
    for tower, layer in found.values():
        if layer is not None:
            blocks[tower] = max(blocks[tower], layer)
    return {name: (tower, blocks[tower] + 1 if layer is None else layer, blocks[tower] + 1)
            for name, (tower, layer) in found.items()}


def _group_order(item) -> tuple:
    (origin, decay, layer), _ = item
    # an objective's module groups last: the Trainer logs the first group's rate as the run's `learning_rate`
    return origin not in ("new", "pretrained"), origin, decay, layer or ("", -1, 0)


def siglip_parameter_groups(model: nn.Module, args, pretrained_towers) -> list[dict]:
    """Optimizer parameter groups (see the module docstring) for `args`' learning_rate, weight_decay,
    pretrained_learning_rate_multiplier, pretrained_weight_decay and layer_lr_decay (None or 1: off)."""
    norm_parameters = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, NORM_MODULES)
        for parameter in module.parameters(recurse=False)
    }
    prefixes = tower_prefixes(model)  # CLIP's projections belong to their towers
    layer_decay = getattr(args, "layer_lr_decay", None)
    depths = layer_ids(model) if layer_decay not in (None, 1.0) else {}
    module_rates = getattr(model, "_module_learning_rates", {})
    groups = defaultdict(list)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = id(parameter) not in norm_parameters and not NO_DECAY_NAME_PATTERN.search(name)
        module = name.split(".", 1)[0]
        if module in module_rates:
            groups[(module, decay, None)].append(parameter)
            continue
        tower = tower_of(name, prefixes)
        pretrained = tower in pretrained_towers and not ADAPTER_PATTERN.search(name)
        layer = None
        if pretrained and name in depths:
            _, layer_id, top = depths[name]
            layer = (tower, layer_id, top)
        groups[("pretrained" if pretrained else "new", decay, layer)].append(parameter)

    result = []
    for (origin, decay, layer), parameters in sorted(groups.items(), key=_group_order):
        pretrained = origin == "pretrained"
        weight_decay = (args.pretrained_weight_decay if pretrained else args.weight_decay) if decay else 0.0
        learning_rate = args.learning_rate * (args.pretrained_learning_rate_multiplier if pretrained else 1.0)
        learning_rate = module_rates.get(origin, learning_rate)
        name = f"{origin}/{'decay' if decay else 'no_decay'}"
        if layer is not None:
            tower, layer_id, top = layer
            learning_rate *= layer_decay ** (top - layer_id)
            name += f"/{tower}/layer{layer_id}"
        result.append({"params": parameters, "weight_decay": weight_decay, "lr": learning_rate, "name": name})
    return result


__all__ = ["NORM_MODULES", "NO_DECAY_NAME_PATTERN", "layer_ids", "siglip_parameter_groups", "tower_of"]
