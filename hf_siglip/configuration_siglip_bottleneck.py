"""Configuration for SigLIP with bottleneck token embeddings.

This file imports only `transformers` (and the standard library): `register_for_auto_class` copies it
beside a saved checkpoint so the model also loads with `trust_remote_code=True` where `hf_siglip`
is not installed.
"""

import math

from transformers import AutoConfig, SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

SIGLIP_VISION_MODEL_TYPE = SiglipVisionConfig.model_type
# Checkpoints whose top-level config this class can read: native SigLIP and our own.
LOADABLE_MODEL_TYPES = ("siglip", "siglip_bottleneck")


class SiglipBottleneckTextConfig(SiglipTextConfig):
    r"""
    [`SiglipTextConfig`] plus an optional bottleneck for the token embedding (SigLIP paper, section 4.3).

    Args:
        bottleneck_dim (`int`, *optional*):
            When set to K, the `vocab_size x hidden_size` token table is replaced by a `vocab_size x K`
            table followed by a `K x hidden_size` linear projection (the paper uses K=96 for a width of
            768, at about 0.5% ImageNet zero-shot cost). Must satisfy `0 < K < hidden_size`. When unset
            the text tower is exactly native SigLIP's.
        All other arguments are those of [`SiglipTextConfig`].

    Example:

    ```python
    >>> from hf_siglip import SiglipBottleneckTextConfig
    >>> config = SiglipBottleneckTextConfig(vocab_size=250_000, hidden_size=768, bottleneck_dim=96)
    ```
    """

    model_type = "siglip_bottleneck_text_model"
    base_config_key = "text_config"

    bottleneck_dim: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.bottleneck_dim is not None and not 0 < self.bottleneck_dim < self.hidden_size:
            raise ValueError(
                f"text_config.bottleneck_dim must satisfy 0 < bottleneck_dim < hidden_size "
                f"(= {self.hidden_size}), got {self.bottleneck_dim}. Unset it for a plain embedding table."
            )


class SiglipBottleneckConfig(SiglipConfig):
    r"""
    Configuration of [`SiglipBottleneckModel`]: a SigLIP dual encoder whose text tower may use bottleneck
    token embeddings and whose vision tower is SigLIP's or any Hugging Face vision backbone.

    It reads the `config.json` of native `transformers` SigLIP checkpoints (model type `siglip`) unchanged,
    and with `text_config.bottleneck_dim` unset, what it writes is read by `transformers.SiglipConfig`.

    Args:
        text_config (`dict` or [`SiglipBottleneckTextConfig`], *optional*):
            The text tower. Its `projection_size` is the size of the shared embedding space.
        vision_config (`dict` or [`PreTrainedConfig`], *optional*):
            The vision tower: a [`SiglipVisionConfig`] (default) or the config of any vision backbone
            (e.g. `ViTConfig`). A SigLIP vision tower's pooled output is used as the image embedding and
            its `hidden_size` must equal `text_config.projection_size`; any other backbone gets a linear
            projection to that size (the `VisionTextDualEncoderModel` pattern).
        logit_scale_init_value (`float`, *optional*, defaults to `log(10)`):
            Initial value of the learnable log-temperature `t'` (`t = exp(t')`), as in the SigLIP paper.
        logit_bias_init_value (`float`, *optional*, defaults to -10.0):
            Initial value of the learnable logit bias `b`, as in the SigLIP paper.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            As in [`SiglipConfig`].

    Example:

    ```python
    >>> from hf_siglip import SiglipBottleneckConfig, SiglipBottleneckModel
    >>> config = SiglipBottleneckConfig(text_config={"bottleneck_dim": 96})
    >>> model = SiglipBottleneckModel(config)
    ```
    """

    model_type = "siglip_bottleneck"
    sub_configs_defaults = {
        "text_config": SiglipBottleneckTextConfig,
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type=SIGLIP_VISION_MODEL_TYPE),
    }

    logit_scale_init_value: float = math.log(10.0)
    logit_bias_init_value: float = -10.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        embed_dim = self.text_config.projection_size
        if self.uses_siglip_vision_tower and self.vision_config.hidden_size != embed_dim:
            raise ValueError(
                f"Mismatched projection sizes between towers: the SigLIP vision tower's hidden_size "
                f"({self.vision_config.hidden_size}) must equal text_config.projection_size ({embed_dim}), "
                f"since SigLIP compares the two pooled outputs directly."
            )

    @property
    def native_compatible(self) -> bool:
        """True when `transformers.SiglipModel` can hold this model: no bottleneck, SigLIP's own vision tower."""
        return self.text_config.bottleneck_dim is None and self.uses_siglip_vision_tower

    def to_siglip_config(self) -> SiglipConfig:
        """The same model as a plain `transformers.SiglipConfig` (requires `native_compatible`)."""
        if not self.native_compatible:
            raise ValueError("only a model without bottleneck embeddings and with a SigLIP vision tower is a "
                             "SiglipModel")
        text = {key: value for key, value in self.text_config.to_dict().items()
                if key not in ("bottleneck_dim", "model_type", "transformers_version")}
        vision = {key: value for key, value in self.vision_config.to_dict().items()
                  if key not in ("model_type", "transformers_version")}
        outer = {key: value for key, value in self.to_dict().items()
                 if key not in ("text_config", "vision_config", "model_type", "architectures", "auto_map",
                                "transformers_version", "logit_scale_init_value", "logit_bias_init_value")}
        return SiglipConfig(text_config=SiglipTextConfig(**text), vision_config=SiglipVisionConfig(**vision), **outer)

    @property
    def uses_siglip_vision_tower(self) -> bool:
        """True when the vision tower is SigLIP's own (no extra projection, native weight layout)."""
        return self.vision_config.model_type == SIGLIP_VISION_MODEL_TYPE

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space."""
        return self.text_config.projection_size

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        # Refuse checkpoints of other families instead of building a random model from their config.
        if model_type is not None and model_type not in LOADABLE_MODEL_TYPES:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a checkpoint of model type '{model_type}'; "
                f"{cls.__name__} reads only {LOADABLE_MODEL_TYPES}. To use another vision backbone, "
                f"build the model with SiglipBottleneckModel.from_vision_text_pretrained(...)."
            )
        if model_type == "siglip":
            # A native SigLIP config is ours with the bottleneck unset: read it without a type-mismatch warning.
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


__all__ = ["SiglipBottleneckConfig", "SiglipBottleneckTextConfig"]
