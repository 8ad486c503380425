"""hf_siglip: train SigLIP-style image-text dual encoders with transformers, datasets and accelerate."""

from transformers import AutoConfig, AutoModel

from .configuration_siglip_bottleneck import SiglipBottleneckConfig, SiglipBottleneckTextConfig
from .data import SiglipDataCollator, make_demo_dataset
from .hub import build_model_card, push_to_hub
from .loss import SigmoidLoss, dense_sigmoid_loss, sigmoid_loss
from .modeling_siglip_bottleneck import (
    BottleneckTokenEmbedding,
    SiglipBottleneckModel,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)
from .processing import build_processor, train_caption_tokenizer
from .trainer import SiglipTrainer
from .training_args import SiglipTrainingArguments

__version__ = "0.1.0"

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
    "SiglipTrainer",
    "SiglipTrainingArguments",
    "SigmoidLoss",
    "build_model_card",
    "build_processor",
    "dense_sigmoid_loss",
    "make_demo_dataset",
    "push_to_hub",
    "sigmoid_loss",
    "train_caption_tokenizer",
]
