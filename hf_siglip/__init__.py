"""hf_siglip: train SigLIP-style image-text dual encoders with transformers, datasets and accelerate."""

import importlib

from transformers import AutoConfig, AutoModel

from ._quiet import quiet_default_config_notices
from .configuration_siglip_bottleneck import SiglipBottleneckConfig, SiglipBottleneckTextConfig
from .modeling_siglip_bottleneck import (
    BottleneckTokenEmbedding,
    SiglipBottleneckModel,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)

__version__ = "0.1.0"
quiet_default_config_notices()  # transformers' notice about its own default SiglipTextConfig (hf_siglip._quiet)

# The rest is imported on first use (PEP 562), so `import hf_siglip` (which registers the model type) and
# `hf-siglip train --help` stay quick; `from hf_siglip import SiglipTrainer` works as before.
_LAZY = {
    "SiglipDataCollator": ".data", "make_demo_dataset": ".data", "build_model_card": ".hub", "push_to_hub": ".hub",
    "SigmoidLoss": ".loss", "dense_sigmoid_loss": ".loss", "sigmoid_loss": ".loss", "SiglipLossConfig": ".loss_config",
    "positive_pairs": ".positives",
    "build_processor": ".processing", "train_caption_tokenizer": ".processing", "SiglipTrainer": ".training.trainer",
    "SiglipTrainingArguments": ".training.training_args", "as_dual_encoder": ".dual_encoders",
    "load_dual_encoder": ".dual_encoders",
    "load_recipe": ".recipes", "recipe_arguments": ".recipes", "build_model_and_processor": ".cli.train",
    "load_splits": ".cli.train",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# In-process Auto classes ...
AutoConfig.register(SiglipBottleneckConfig.model_type, SiglipBottleneckConfig, exist_ok=True)
AutoConfig.register(SiglipBottleneckTextConfig.model_type, SiglipBottleneckTextConfig, exist_ok=True)
AutoModel.register(SiglipBottleneckConfig, SiglipBottleneckModel, exist_ok=True)
AutoModel.register(SiglipBottleneckTextConfig, SiglipBottleneckTextModel, exist_ok=True)
# ... and `auto_map` + copied source files in saved checkpoints, for trust_remote_code=True elsewhere.
SiglipBottleneckConfig.register_for_auto_class()
SiglipBottleneckModel.register_for_auto_class("AutoModel")

__all__ = [
    "BottleneckTokenEmbedding",
    "SiglipBottleneckConfig",
    "SiglipBottleneckModel",
    "SiglipBottleneckTextConfig",
    "SiglipBottleneckTextModel",
    "SiglipBottleneckVisionModel",
    "SiglipDataCollator",
    "SiglipLossConfig",
    "SiglipTrainer",
    "SiglipTrainingArguments",
    "SigmoidLoss",
    "as_dual_encoder",
    "build_model_and_processor",
    "build_model_card",
    "build_processor",
    "dense_sigmoid_loss",
    "load_dual_encoder",
    "load_recipe",
    "load_splits",
    "make_demo_dataset",
    "positive_pairs",
    "push_to_hub",
    "recipe_arguments",
    "sigmoid_loss",
    "train_caption_tokenizer",
]
