"""SigLIP dual encoder with bottleneck token embeddings and a pluggable vision backbone.

Weight names follow native `transformers.SiglipModel` (`text_model.*`, `vision_model.*`, `logit_scale`,
`logit_bias`), so native checkpoints load unchanged and, with the bottleneck unset, what this model saves
loads in `transformers.SiglipModel`.

This file imports only `transformers`, torch and its sibling files: `register_for_auto_class` copies them
beside a saved checkpoint for `trust_remote_code=True` loading.
"""

import copy
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    PreTrainedConfig,
    SiglipPreTrainedModel,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipOutput, SiglipTextEmbeddings
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_siglip_bottleneck import SiglipBottleneckConfig, SiglipBottleneckTextConfig
from .loss import sigmoid_loss


@dataclass
class SiglipBottleneckOutput(SiglipOutput):
    r"""[`SiglipOutput`] plus the temperature and bias the logits used, so a loss computed outside the model
    (the trainer's distributed loss) takes them from the forward pass, as FSDP requires.

    logit_scale (`torch.FloatTensor` of shape `(1,)`): `t = exp(model.logit_scale)`, already exponentiated.
    logit_bias (`torch.FloatTensor` of shape `(1,)`): `b`.
    """

    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None


class BottleneckTokenEmbedding(nn.Module):
    """Token embedding factorised as an `N x K` table followed by a `K x W` projection (SigLIP section 4.3).

    Holds `N*K + K*W` parameters instead of `N*W`; the full `N x W` table is never allocated. The model's
    `get_input_embeddings()` is `table`, the part indexed by token id: `resize_token_embeddings` grows or shrinks it
    (new rows initialised as transformers initialises added rows) and keeps `projection`.
    """

    def __init__(self, vocab_size: int, bottleneck_dim: int, hidden_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, bottleneck_dim)
        self.projection = nn.Linear(bottleneck_dim, hidden_size, bias=False)

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.projection(self.table(input_ids))


class SiglipBottleneckTextEmbeddings(SiglipTextEmbeddings):
    """SigLIP's text embeddings with an optional bottleneck token table (same forward, same weight names)."""

    def __init__(self, config: SiglipBottleneckTextConfig):
        # Skip SiglipTextEmbeddings.__init__: it would allocate the full N x W table we are avoiding.
        nn.Module.__init__(self)
        if config.bottleneck_dim is None:
            self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.token_embedding = BottleneckTokenEmbedding(config.vocab_size, config.bottleneck_dim,
                                                            config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)


def _initialised_as_transformers_code(cls) -> bool:
    """`is_custom_code` of our model classes: False, so weights are initialised as for transformers' own classes.
    transformers' shortcut for custom code (meant for code that writes weights in place) treats a module without
    parameters of its own (SiglipAttention, SiglipMLP) as initialised, so a new model's text tower, and any weights
    `from_pretrained` fills in, would keep the plain Linear init instead of SigLIP's there. Our `_init_weights` uses
    `transformers.initialization`, which leaves loaded weights alone, and no module is shared between two places
    (the flag's other use)."""
    return False


class SiglipBottleneckPreTrainedModel(SiglipPreTrainedModel):
    """Weight initialisation and loading conventions shared by the models of this file."""

    config: SiglipBottleneckConfig
    _no_split_modules = SiglipPreTrainedModel._no_split_modules + ["SiglipBottleneckTextEmbeddings"]

    is_custom_code = classmethod(_initialised_as_transformers_code)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, SiglipBottleneckModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)
        else:
            # SigLIP's scheme; it also covers the bottleneck's table (nn.Embedding) and projection (nn.Linear).
            super()._init_weights(module)


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary with a readable error. Reading the ids back is free only for CPU
    tensors in eager mode: on an accelerator it would be a device-to-host synchronisation every step (there the
    embedding lookup's own device-side bounds check stops the step), and `torch.compile` / `torch.export` would
    see a data-dependent branch, so both cases skip it."""
    if input_ids is None:
        raise ValueError("You have to specify input_ids")
    if input_ids.device.type != "cpu" or not input_ids.numel() or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids hold token ids outside the vocabulary [0, {vocab_size}): min {low}, max {high}. Was the "
            f"text tokenized with this model's tokenizer? (After adding tokens, call model.resize_token_embeddings.)"
        )


class SiglipBottleneckTextModel(SiglipTextModel):
    """SigLIP's text tower with optional bottleneck token embeddings.

    `forward` returns `last_hidden_state` and `pooler_output`: the last token's state through the `head`
    projection (the text embedding, not normalised), exactly as [`transformers.SiglipTextModel`].
    """

    config: SiglipBottleneckTextConfig
    config_class = SiglipBottleneckTextConfig
    is_custom_code = classmethod(_initialised_as_transformers_code)

    def __init__(self, config: SiglipBottleneckTextConfig):
        # Skip SiglipTextModel.__init__ (it builds the full token table); the layout below is identical.
        SiglipPreTrainedModel.__init__(self, config)
        self.config = config
        self.embeddings = SiglipBottleneckTextEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token table indexed by id: `vocab_size x hidden_size`, or with the bottleneck the `vocab_size x K`
        table (its `K x hidden_size` projection stays in `embeddings.token_embedding.projection`)."""
        return _token_table(self.embeddings.token_embedding)

    def set_input_embeddings(self, value: nn.Module):
        """Replace what `get_input_embeddings` returns (with the bottleneck, the table; the projection stays). A
        [`BottleneckTokenEmbedding`] replaces the whole token embedding (what `hf-siglip convert` does)."""
        current = self.embeddings.token_embedding
        if isinstance(current, BottleneckTokenEmbedding) and not isinstance(value, BottleneckTokenEmbedding):
            current.table = value
        else:
            self.embeddings.token_embedding = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        _check_input_ids(input_ids, self.config.vocab_size)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def _token_table(token_embedding: nn.Module) -> nn.Module:
    return token_embedding.table if isinstance(token_embedding, BottleneckTokenEmbedding) else token_embedding


def _build_vision_tower(
    vision_config: PreTrainedConfig, projection_size: int | None
) -> tuple[nn.Module, nn.Linear | None]:
    """The vision backbone and, for non-SigLIP backbones, its projection to the shared embedding size."""
    if vision_config.model_type == SiglipVisionConfig.model_type:
        return SiglipVisionModel._from_config(vision_config), None
    if projection_size is None:
        raise ValueError(f"A '{vision_config.model_type}' vision backbone needs a projection to the shared embedding "
                         f"size: set projection_size on its config (a SiglipBottleneckConfig does this itself).")
    backbone = AutoModel.from_config(vision_config)
    return backbone, nn.Linear(_backbone_width(vision_config), projection_size, bias=False)


def _vision_tower_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision tower's own config. A dual encoder's [`SiglipBottleneckConfig`] gives (a copy of) its
    `vision_config`; a non-SigLIP backbone's carries `projection_size`, the width of the shared embedding space."""
    if not isinstance(config, SiglipBottleneckConfig):
        return config
    vision_config = copy.deepcopy(config.vision_config)
    if not config.uses_siglip_vision_tower:
        vision_config.projection_size = config.embed_dim
    return vision_config


def _backbone_width(vision_config: PreTrainedConfig) -> int:
    for name in ("hidden_size", "embed_dim", "hidden_dim"):
        if isinstance(getattr(vision_config, name, None), int):
            return getattr(vision_config, name)
    hidden_sizes = getattr(vision_config, "hidden_sizes", None)  # convnets (ResNet, ConvNeXt)
    if hidden_sizes:
        return hidden_sizes[-1]
    raise ValueError(f"Cannot tell the output width of vision backbone '{vision_config.model_type}'.")


def _check_pixel_values(pixel_values: torch.Tensor, vision_config: PreTrainedConfig, interpolate: bool) -> None:
    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    channels = getattr(vision_config, "num_channels", 3)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}."
        )
    size = getattr(vision_config, "image_size", None)
    if size is not None and not interpolate:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(pixel_values.shape[-2:]) != (height, width):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but the vision tower expects "
                f"{(height, width)}; resize with the model's image processor or pass interpolate_pos_encoding=True."
            )


def _backbone_features(
    vision_model: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, projected: bool, **kwargs
) -> BaseModelOutputWithPooling:
    """Run a vision tower; `pooler_output` is its pooled output (for a foreign backbone, `projected`, before the
    projection to the shared embedding size)."""
    _check_pixel_values(pixel_values, vision_model.config, interpolate_pos_encoding)
    if not projected:
        return vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                            return_dict=True, **kwargs)
    outputs = vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:  # backbones without a pooler: use the first token (ViT's CLS)
        pooled = outputs.last_hidden_state[:, 0]
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=pooled.flatten(1),  # convnets pool to (batch, channels, 1, 1)
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def _image_features(
    vision_model: nn.Module,
    visual_projection: nn.Linear | None,
    pixel_values: torch.Tensor,
    interpolate_pos_encoding: bool,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """Run a vision tower and its projection, if any; `pooler_output` becomes the (unnormalised) image embedding."""
    outputs = _backbone_features(vision_model, pixel_values, interpolate_pos_encoding, visual_projection is not None,
                                 **kwargs)
    if visual_projection is not None:
        outputs.pooler_output = visual_projection(outputs.pooler_output)
    return outputs


def _normalize_pooled(outputs: BaseModelOutputWithPooling, normalize: bool) -> BaseModelOutputWithPooling:
    if normalize:
        outputs.pooler_output = nn.functional.normalize(outputs.pooler_output, dim=-1)
    return outputs


class SiglipBottleneckVisionModel(SiglipBottleneckPreTrainedModel):
    """The vision tower of [`SiglipBottleneckModel`] alone (with its projection, if any), built from its own config:
    a [`SiglipVisionConfig`] as `transformers.SiglipVisionModel`, or another backbone's config carrying
    `projection_size` (a whole [`SiglipBottleneckConfig`] is also taken: its vision tower's config is used).

    Loads from a full checkpoint of either model, ignoring the text tower and logit parameters.
    """

    config: SiglipVisionConfig
    config_class = SiglipVisionConfig
    base_model_prefix = "vision_model"  # as transformers.SiglipVisionModel: the attribute holding the backbone
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_(scale|bias)$"]

    def __init__(self, config: PreTrainedConfig):
        config = _vision_tower_config(config)
        super().__init__(config)
        self.vision_model, self.visual_projection = _build_vision_tower(config,
                                                                        getattr(config, "projection_size", None))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embedding (a SigLIP tower's `Conv2d`), as `transformers.SiglipVisionModel`."""
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        normalize: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """Image embeddings as `pooler_output` (L2-normalised if `normalize`)."""
        outputs = _image_features(self.vision_model, self.visual_projection, pixel_values, interpolate_pos_encoding,
                                  **kwargs)
        return _normalize_pooled(outputs, normalize)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also from a full dual-encoder checkpoint with a non-SigLIP backbone: its config is then read whole and
        turned into the tower's own (the default config class, `SiglipVisionConfig`, reads SigLIP towers only)."""
        if kwargs.get("config") is None and not args:
            options = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                       if k in kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **options)
            vision = config_dict.get("vision_config") or {}
            if config_dict.get("model_type") == SiglipBottleneckConfig.model_type and \
                    vision.get("model_type", SiglipVisionConfig.model_type) != SiglipVisionConfig.model_type:
                kwargs["config"] = _vision_tower_config(SiglipBottleneckConfig.from_dict(config_dict))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class SiglipBottleneckModel(SiglipBottleneckPreTrainedModel):
    r"""SigLIP image-text dual encoder: text tower with optional bottleneck token embeddings, SigLIP or any HF
    vision backbone, learnable temperature `t = exp(logit_scale)` and bias `b = logit_bias`.

    `forward` returns a [`transformers.models.siglip.modeling_siglip.SiglipOutput`]: `logits_per_image`
    (`t * x_i . y_j + b` for images x and texts y, L2-normalised), `logits_per_text`, the normalised
    `image_embeds` / `text_embeds`, and, with `return_loss=True`, the sigmoid loss of the batch computed by
    [`hf_siglip.sigmoid_loss`] (across processes when `torch.distributed` is initialised).

    Example:

    ```python
    >>> from hf_siglip import SiglipBottleneckModel
    >>> model = SiglipBottleneckModel.from_pretrained("google/siglip-base-patch16-224")  # native checkpoint
    >>> outputs = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    ```
    """

    config: SiglipBottleneckConfig
    config_class = SiglipBottleneckConfig
    # Which towers hold pretrained weights; set by from_pretrained and from_vision_text_pretrained.
    pretrained_towers: frozenset[str] = frozenset()

    def __init__(self, config: SiglipBottleneckConfig):
        super().__init__(config)
        self.text_model = SiglipBottleneckTextModel._from_config(config.text_config)
        self.vision_model, self.visual_projection = _build_vision_tower(config.vision_config, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The text tower's token table indexed by id (with the bottleneck, the `vocab_size x K` table: see
        [`SiglipBottleneckTextModel.get_input_embeddings`]); what `resize_token_embeddings` resizes."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        normalize: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """Text tower outputs; `pooler_output` is the text embedding (L2-normalised only if `normalize`)."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  return_dict=True, **kwargs)
        return _normalize_pooled(outputs, normalize)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        normalize: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """Vision tower outputs; `pooler_output` is the image embedding (L2-normalised only if `normalize`)."""
        outputs = _image_features(self.vision_model, self.visual_projection, pixel_values, interpolate_pos_encoding,
                                  **kwargs)
        return _normalize_pooled(outputs, normalize)

    @can_return_tuple
    def get_locked_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling | tuple:
        """What a locked vision tower computes (SigLiT): `pooler_output` is the tower's pooled output, before
        `visual_projection` (the new head of a foreign backbone, which trains even when the tower is locked). The
        image-embedding cache stores it; `forward(image_embeds=...)` takes it in place of `pixel_values`."""
        return _backbone_features(self.vision_model, pixel_values, interpolate_pos_encoding,
                                  self.visual_projection is not None, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        image_ids: torch.LongTensor | None = None,
        text_ids: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SiglipBottleneckOutput | tuple:
        r"""
        image_ids, text_ids (`torch.LongTensor`, *optional*):
            Image i and text j are a positive pair iff their ids are equal (several captions per image,
            duplicates, mined groups). Without them text j is the positive of image j only.
        return_loss (`bool`, *optional*):
            Whether to return the sigmoid loss.
        image_embeds (`torch.Tensor` of shape `(batch, width)`, *optional*):
            A locked vision tower's output, `get_locked_image_features(...).pooler_output` (SigLiT's cache), used
            instead of `pixel_values`; a foreign backbone's `visual_projection` still applies (and trains).
        """
        vision_outputs = None
        if image_embeds is None:
            vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                                     return_dict=True, **kwargs)
            image_embeds = vision_outputs.pooler_output
        else:
            width = self.config.embed_dim if self.visual_projection is None else self.visual_projection.in_features
            if image_embeds.ndim != 2 or image_embeds.shape[-1] != width:
                raise ValueError(f"image_embeds must have shape (batch, {width}) (get_locked_image_features), got "
                                 f"{tuple(image_embeds.shape)}.")
            if self.visual_projection is not None:
                image_embeds = self.visual_projection(image_embeds)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        image_embeds = nn.functional.normalize(image_embeds, dim=-1)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)

        logit_scale = self.logit_scale.to(text_embeds.device).exp()
        logit_bias = self.logit_bias.to(text_embeds.device)
        logits_per_text = (text_embeds @ image_embeds.t().to(text_embeds.device, text_embeds.dtype) * logit_scale
                           + logit_bias)

        loss = None
        if return_loss:
            loss = sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids)

        return SiglipBottleneckOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | os.PathLike | None = None,
        text_model_name_or_path: str | os.PathLike | None = None,
        text_config: SiglipBottleneckTextConfig | dict | None = None,
        vision_config: PreTrainedConfig | dict | None = None,
        **kwargs,
    ) -> "SiglipBottleneckModel":
        """Build a dual encoder from separately pretrained towers, as `VisionTextDualEncoderModel` does.

        Args:
            vision_model_name_or_path: any Hugging Face vision backbone (a local `save_pretrained` folder or a
                Hub id): a SigLIP checkpoint (its vision tower is used as is), or e.g. a ViT, which gets a new
                linear projection to the text tower's `projection_size`.
            text_model_name_or_path: a SigLIP (or SigLIP-bottleneck) checkpoint whose text tower is used.
            text_config / vision_config: configs for towers built from scratch instead.
            kwargs: top-level config fields (e.g. `logit_bias_init_value`) and `from_pretrained` options
                such as `dtype`.

        Towers loaded here are listed in `model.pretrained_towers` (the trainer gives them no weight decay
        and a reduced learning rate, SigLIP section 4.5).
        """
        load_kwargs = {k: kwargs.pop(k) for k in ("dtype", "revision", "token", "local_files_only") if k in kwargs}
        if (vision_model_name_or_path is None) == (vision_config is None):
            raise ValueError("Pass exactly one of vision_model_name_or_path and vision_config.")
        if (text_model_name_or_path is None) == (text_config is None):
            raise ValueError("Pass exactly one of text_model_name_or_path and text_config.")

        vision_tower = None
        if vision_model_name_or_path is not None:
            vision_tower = _load_vision_backbone(vision_model_name_or_path, **load_kwargs)
            vision_config = vision_tower.config
        text_tower = None
        if text_model_name_or_path is not None:
            text_tower = SiglipBottleneckTextModel.from_pretrained(text_model_name_or_path, **load_kwargs)
            text_config = text_tower.config

        config = SiglipBottleneckConfig(
            text_config=text_config if isinstance(text_config, dict) else text_config.to_dict(),
            vision_config=vision_config if isinstance(vision_config, dict) else vision_config.to_dict(),
            **kwargs,
        )
        model = cls(config)
        if vision_tower is not None:
            model.vision_model = vision_tower
        if text_tower is not None:
            model.text_model = text_tower
        model.pretrained_towers = frozenset(name for name, tower in (("vision", vision_tower), ("text", text_tower))
                                            if tower is not None)
        if "dtype" in load_kwargs:
            model.to(next(model.text_model.parameters()).dtype)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save; a model `transformers.SiglipModel` can hold (no bottleneck, SigLIP vision tower) is written in SigLIP's
        own format (model type `siglip`, `SiglipModel` weights layout), so plain transformers loads it without remote
        code or warnings. Other models are saved as `siglip_bottleneck` with their code (`trust_remote_code`)."""
        if not self.config.native_compatible:
            return super().save_pretrained(save_directory, *args, **kwargs)
        from transformers import SiglipModel

        with torch.device("meta"):
            native = SiglipModel(self.config.to_siglip_config())
        # what this object leaves out of its saves (a trainer's training-only head) stays out of the native save too
        ignored = set(self._keys_to_ignore_on_save or ())
        native._keys_to_ignore_on_save = {*(native._keys_to_ignore_on_save or ()), *ignored}
        # the same tensors, no copy: weight names are SiglipModel's already
        native.load_state_dict({key: value for key, value in self.state_dict().items() if key not in ignored},
                               strict=True, assign=True)
        native.to(next(self.parameters()).dtype)
        config_logger = logging.getLogger("transformers.configuration_utils")
        config_logger.addFilter(_default_siglip_token_id_notice)
        try:
            return native.save_pretrained(save_directory, *args, **kwargs)
        finally:
            config_logger.removeFilter(_default_siglip_token_id_notice)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.pretrained_towers = frozenset({"vision", "text"})
        return loaded


def _default_siglip_token_id_notice(record: logging.LogRecord) -> bool:
    """False for transformers' notice about its *own* default `SiglipTextConfig()` (vocabulary 32,000, bos/eos ids
    49406/49407 out of it), which `SiglipModel.save_pretrained` builds to diff the config against: it says nothing
    about the model being saved, so it is dropped while we save (every other message passes)."""
    message = record.getMessage()
    return not (message.startswith("Model config: ") and "_token_id must be" in message
                and "between 0 and 31999" in message)


def _load_vision_backbone(name_or_path, **load_kwargs) -> nn.Module:
    """A pretrained vision tower: SigLIP's own from a SigLIP checkpoint, else the `AutoModel` backbone."""
    backbone_config = AutoConfig.from_pretrained(name_or_path)
    if backbone_config.model_type in ("siglip", "siglip_bottleneck", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(name_or_path, **load_kwargs)
    return AutoModel.from_pretrained(name_or_path, **load_kwargs)


__all__ = [
    "BottleneckTokenEmbedding",
    "SiglipBottleneckOutput",
    "SiglipBottleneckModel",
    "SiglipBottleneckPreTrainedModel",
    "SiglipBottleneckTextModel",
    "SiglipBottleneckVisionModel",
]
