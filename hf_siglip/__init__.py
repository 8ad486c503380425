"""hf_siglip: train SigLIP-style image-text dual encoders with transformers, datasets and accelerate."""

from transformers import AutoConfig, AutoModel

from .configuration_siglip_bottleneck import SiglipBottleneckConfig, SiglipBottleneckTextConfig
from .loss import sigmoid_loss
from .modeling_siglip_bottleneck import (
    BottleneckTokenEmbedding,
    SiglipBottleneckModel,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)

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
    "sigmoid_loss",
]
