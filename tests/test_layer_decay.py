"""Layer-wise learning-rate decay (`layer_lr_decay`, BEiT / timm): each parameter's learning rate and weight decay
against an independent, name-by-name computation for tiny 3-layer SigLIP and CLIP models, and the flag through
`hf-siglip train` (the embeddings of a pretrained tower barely move, its top does)."""

import re

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from cli_helpers import TINY, flags
from finetune_helpers import checkpoint_flags, native_tiny_checkpoint_16  # noqa: F401 (fixture)
from hf_siglip.cli.main import main as cli_main
from hf_siglip.dual_encoders import as_dual_encoder
from hf_siglip.training.optimizer_groups import siglip_parameter_groups
from hf_siglip.training.training_args import SiglipTrainingArguments

LAYERS = 3
TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2)
LR, MULTIPLIER, DECAY, WEIGHT_DECAY, PRETRAINED_WEIGHT_DECAY = 1e-3, 0.1, 0.5, 0.1, 0.05


def tiny(kind: str):
    text = dict(vocab_size=40, max_position_embeddings=8, **TOWER)
    vision = dict(image_size=16, patch_size=8, **TOWER)
    if kind == "siglip":
        return as_dual_encoder(SiglipModel(SiglipConfig(text_config=text, vision_config=vision)))
    return as_dual_encoder(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))


def expected(name: str, parameter: torch.Tensor) -> tuple[float, float]:
    """(lr, weight decay) of one parameter, written out from the BEiT rule rather than from the code's patterns."""
    if name in ("logit_scale", "logit_bias"):  # heads outside the towers: full rate, never decayed
        return LR, 0.0
    tower, rest = name.split(".", 1)
    assert tower in ("text_model", "vision_model", "text_projection", "visual_projection"), name
    block = re.match(r"encoder\.layers\.(\d)\.", rest)
    if block:
        depth = LAYERS - int(block.group(1))  # the last block: decay^1
    elif rest.startswith(("embeddings.", "pre_layrnorm.")):
        depth = LAYERS + 1  # below the first block: the most decayed
    else:  # final norms, SigLIP's pooling head, CLIP's projections
        assert rest.startswith(("post_layernorm.", "final_layer_norm.", "head.", "weight")), name
        depth = 0
    # no weight decay: biases, norms, class token (1-d), position embeddings, the attention-pooling probe
    no_decay = parameter.ndim == 1 or "position_embedding" in rest or rest.endswith("probe")
    return LR * MULTIPLIER * DECAY ** depth, 0.0 if no_decay else PRETRAINED_WEIGHT_DECAY


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_each_parameter_gets_the_beit_learning_rate(kind, tmp_path):
    model = tiny(kind)
    args = SiglipTrainingArguments(output_dir=str(tmp_path), learning_rate=LR, weight_decay=WEIGHT_DECAY,
                                   pretrained_learning_rate_multiplier=MULTIPLIER,
                                   pretrained_weight_decay=PRETRAINED_WEIGHT_DECAY, layer_lr_decay=DECAY,
                                   use_cpu=True, report_to="none")
    groups = siglip_parameter_groups(model, args, {"text", "vision"})
    group_of = {id(parameter): group for group in groups for parameter in group["params"]}
    assert len(group_of) == len(list(model.parameters()))
    depths = set()
    for name, parameter in model.named_parameters():
        lr, weight_decay = expected(name, parameter)
        group = group_of[id(parameter)]
        assert (group["lr"], group["weight_decay"]) == (pytest.approx(lr, rel=1e-12), weight_decay), name
        depths.add(round(lr / (LR * MULTIPLIER), 12))
    assert {DECAY ** depth for depth in range(LAYERS + 2)} <= depths  # every depth met

    # a new tower is not decayed (layer decay is a fine-tuning rule), nor is a tower's rate without the flag
    args.layer_lr_decay = None
    plain = {group["name"]: group["lr"] for group in siglip_parameter_groups(model, args, {"text", "vision"})}
    assert plain == {"pretrained/decay": LR * MULTIPLIER, "pretrained/no_decay": LR * MULTIPLIER,
                     "new/no_decay": LR}
    args.layer_lr_decay = DECAY
    text_new = siglip_parameter_groups(model, args, {"vision"})
    assert {group["lr"] for group in text_new if group["name"].startswith("new/")} == {LR}


def test_out_of_range_decay_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layer_lr_decay must be in"):
        SiglipTrainingArguments(output_dir=str(tmp_path), layer_lr_decay=1.5, use_cpu=True)


def test_the_flag_through_hf_siglip_train(tmp_path, native_tiny_checkpoint_16):
    """decay 0.01 over a 1-block tower: the embeddings train at 1e-4 of the head's rate; both move under Adam (whose
    step is about the learning rate), the embeddings by about that factor less."""
    output_dir = tmp_path / "decayed"
    settings = checkpoint_flags({**TINY, "output_dir": output_dir, "layer_lr_decay": 0.01, "learning_rate": 1e-2,
                                 "pretrained_learning_rate_multiplier": 1.0, "eval_split": "None",
                                 "optim": "adamw_torch", "warmup_steps": 0, "lr_scheduler_type": "constant"},
                                native_tiny_checkpoint_16)
    assert cli_main(["train", *flags(settings)]) == 0
    assert "| layer-wise lr decay | 0.01 |" in (output_dir / "README.md").read_text()  # the model card says so
    before = SiglipModel.from_pretrained(native_tiny_checkpoint_16).state_dict()
    after = SiglipModel.from_pretrained(output_dir).state_dict()
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    steps = TINY["max_steps"]
    embedding = moved["vision_model.embeddings.patch_embedding.weight"]
    head = moved["vision_model.head.mlp.fc1.weight"]
    # depth 2 of a 1-block tower: decay^2; an Adam step can exceed the rate a little (beta2 0.95)
    assert 0 < embedding <= 1e-2 * 0.01 ** 2 * steps * 1.5
    assert head > 1e-2 * 0.5  # the head's Adam steps: about the full rate each
