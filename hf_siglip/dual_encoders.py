"""Native `transformers` dual encoders as `SiglipTrainer` trains them: SigLIP, SigLIP 2 (NaFlex), CLIP and
VisionTextDualEncoder (any pretrained text encoder, BERT-like, beside any vision backbone).

The trainer needs one thing from a model: a forward pass that takes image inputs (`pixel_values`, plus
`pixel_attention_mask` / `spatial_shapes` for NaFlex, or precomputed `image_embeds` from a locked, cached
tower: SigLiT) and `input_ids` [+ `attention_mask`], and returns L2-normalised `image_embeds` / `text_embeds`,
`t = exp(logit_scale)` and `b = logit_bias` (a [`SiglipBottleneckOutput`]). t and b come out of the forward
pass, not from the parameters directly, because under FSDP parameters are whole only inside forward.

Each adapter class here is the native class plus that forward and the names of its towers' modules; its
weights, config and weight names are the native ones, and `save_pretrained` writes the folder under the
native class name, so plain `transformers.AutoModel.from_pretrained` gives back a `SiglipModel`,
`Siglip2Model`, `CLIPModel` or `VisionTextDualEncoderModel`. `as_dual_encoder` turns a native model object into its
adapter in place (it switches the object's class, as FSDP2's `fully_shard` does: parameters, device and references
stay the same);
`load_dual_encoder` loads any supported checkpoint folder or Hub id by its `config.json` model type.

SigLIP 2 FixRes checkpoints (google/siglip2-*-patch16-224 and the like) are `SiglipModel`s in transformers;
`Siglip2Model` is the NaFlex variant. Our own `siglip_bottleneck` checkpoints (and `siglip` ones, which it
reads unchanged) load as [`SiglipBottleneckModel`], which has this forward already.
"""

import json

import torch
from torch import nn
from transformers import AutoConfig, CLIPModel, PreTrainedModel, Siglip2Model, SiglipModel, VisionTextDualEncoderModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_siglip_bottleneck import LOADABLE_MODEL_TYPES
from .errors import UsageError
from .loss import sigmoid_loss
from .modeling_siglip_bottleneck import SiglipBottleneckModel, SiglipBottleneckOutput
from .training.finite import check_finite_weights

# The two towers of a dual encoder, as settings name them (pretrained_towers, learning-rate multipliers).
TOWERS = ("text", "vision")
# The modules of each tower, by attribute name. The default fits SigLIP (its heads live inside the towers) and
# SiglipBottleneckModel (whose `visual_projection`, when it has one, is a new head for a foreign backbone).
DEFAULT_TOWER_MODULES = {"text": ("text_model",), "vision": ("vision_model",)}
# Text towers `SiglipBottleneckModel` takes (`from_vision_text_pretrained`); others go into a VisionTextDualEncoder.
SIGLIP_TEXT_MODEL_TYPES = ("siglip", "siglip_bottleneck", "siglip_text_model")
# SigLIP paper's initial bias, for a model that has none (CLIP).
LOGIT_BIAS_INIT = -10.0


class DualEncoderMixin:
    """The trainer's forward for a native dual encoder; mixed in before the native class (see the module docstring)."""

    native_class: type[PreTrainedModel]  # the transformers class adapted; what save_pretrained writes
    tower_modules: dict[str, tuple[str, ...]] = DEFAULT_TOWER_MODULES

    @property
    def pretrained_towers(self) -> frozenset[str]:
        """Both towers when the weights came from a checkpoint (`from_pretrained` records where in `name_or_path`),
        none for a model built from a config (one read from a checkpoint also holds its path: pass
        `SiglipTrainingArguments.pretrained_towers=[]` for such a random model; that field overrides this)."""
        return frozenset(TOWERS) if self.name_or_path else frozenset()

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, as for the native class (see `modeling_siglip_bottleneck._initialised_as_transformers_code`):
        transformers' custom-code shortcut would skip SigLIP's attention and MLP inits."""
        return False

    @classmethod
    def adapt(cls, model: PreTrainedModel) -> "DualEncoderMixin":
        """`model` (a `cls.native_class`) as this adapter, in place."""
        model.__class__ = cls
        return model

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        return_loss: bool | None = None,
        image_ids: torch.LongTensor | None = None,
        text_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SiglipBottleneckOutput | tuple:
        r"""Normalised embeddings, t, b and the logits `t * x_i . y_j + b`, from the native towers.

        image_embeds (`torch.Tensor` of shape `(batch, dim)`, *optional*):
            What `get_image_features(...).pooler_output` gave (not normalised): used instead of running the
            vision tower (SigLiT's cache, see `hf_siglip.data.add_image_embeddings`).
        pixel_attention_mask, spatial_shapes: NaFlex inputs (Siglip2Model), as its image processor makes them.
        image_ids, text_ids, return_loss: as in [`SiglipBottleneckModel.forward`].
        """
        vision_outputs = None
        if image_embeds is None:
            image_inputs = {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask,
                            "spatial_shapes": spatial_shapes}
            vision_outputs = self.get_image_features(
                **{name: value for name, value in image_inputs.items() if value is not None}, return_dict=True,
                **kwargs)
            image_embeds = vision_outputs.pooler_output
        text_outputs = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, return_dict=True, **kwargs)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        image_embeds = nn.functional.normalize(image_embeds, dim=-1).to(text_embeds.device, text_embeds.dtype)

        logit_scale = self.logit_scale.to(text_embeds.device).exp().reshape(1)  # CLIP's is a 0-d tensor
        logit_bias = self.logit_bias.to(text_embeds.device)
        logits_per_text = text_embeds @ image_embeds.t() * logit_scale + logit_bias
        loss = sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids) if return_loss \
            else None
        return SiglipBottleneckOutput(
            loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text, text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=text_outputs, vision_model_output=vision_outputs,
            logit_scale=logit_scale, logit_bias=logit_bias,
        )

    def save_pretrained(self, *args, **kwargs):
        """`native_class.save_pretrained`, under the native class: config.json's `architectures` names it (transformers
        writes the class name it finds on the object), so nothing of hf_siglip is needed to load the folder."""
        adapter_class, self.__class__ = self.__class__, self.native_class
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = adapter_class


class SiglipDualEncoder(DualEncoderMixin, SiglipModel):
    """`transformers.SiglipModel` (SigLIP, and SigLIP 2 FixRes checkpoints) with the trainer's forward."""

    native_class = SiglipModel


class Siglip2DualEncoder(DualEncoderMixin, Siglip2Model):
    """`transformers.Siglip2Model` (SigLIP 2 NaFlex) with the trainer's forward: images come as patches with
    `pixel_attention_mask` and `spatial_shapes`, as `Siglip2ImageProcessor` makes them."""

    native_class = Siglip2Model


class BiasInConfigMixin:
    """The sigmoid loss's bias b for a native class that has none (CLIP, VisionTextDualEncoder); mixed in first.

    Where b lives: a parameter of the adapter (so it trains, and t and b leave forward together), stored as the
    `logit_bias` entry of config.json rather than as a weight. Plain transformers then loads the folder with no
    unexpected-weight report (an extra weight would be listed as UNEXPECTED on every load) and a user still finds b,
    to turn logits into sigmoid probabilities: `(logits_per_image + config.logit_bias).sigmoid()`.
    `save_pretrained` writes the current b into config.json; loading reads it back (`_init_weights`), and
    `SiglipTrainer` restores it when resuming (`restore_config_parameters`). A checkpoint without the entry starts
    at b = -10 (SigLIP paper) or the value `load_dual_encoder` is given.
    """

    bias_in_config = True  # the model card tells plain-transformers users where b is
    _keys_to_ignore_on_save = ["logit_bias"]  # kept in config.json (see above)
    _keys_to_ignore_on_load_missing = ["logit_bias"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.logit_bias = nn.Parameter(torch.full((1,), _config_logit_bias(config)))

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # from_pretrained: b is never in the weights file; Adapter(config): the native post_init runs before
        # __init__ creates b (with the config's value)
        if isinstance(module, BiasInConfigMixin) and "logit_bias" in module._parameters:
            init.constant_(module.logit_bias, _config_logit_bias(module.config))

    @classmethod
    def adapt(cls, model: PreTrainedModel, logit_bias_init_value: float = LOGIT_BIAS_INIT):
        model = super().adapt(model)
        parameter = next(model.parameters())
        value = getattr(model.config, "logit_bias", logit_bias_init_value)
        model.logit_bias = nn.Parameter(torch.full((1,), value, dtype=parameter.dtype, device=parameter.device))
        model._keys_to_ignore_on_save = {*(model._keys_to_ignore_on_save or ()), "logit_bias"}
        return model

    def save_pretrained(self, *args, state_dict=None, **kwargs):
        bias = self.logit_bias if state_dict is None else state_dict["logit_bias"]  # FSDP/DeepSpeed gather it
        self.config.logit_bias = float(bias.float().item())
        return super().save_pretrained(*args, state_dict=state_dict, **kwargs)


class CLIPDualEncoder(BiasInConfigMixin, DualEncoderMixin, CLIPModel):
    """`transformers.CLIPModel` with the trainer's forward and the sigmoid loss's bias b, which CLIP lacks, kept in
    config.json (`BiasInConfigMixin`).

    CLIP's own processor resizes the shortest edge and centre-crops; the text tower is causal and pools the first
    EOS token, so with right padding the padded positions never reach the pooled embedding and the collator's
    fixed-length padding needs no attention mask.
    """

    native_class = CLIPModel
    tower_modules = {"text": ("text_model", "text_projection"), "vision": ("vision_model", "visual_projection")}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPModel):  # transformers' CLIP init leaves t' to __init__: missing weights need it too
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)


# How a VisionTextDualEncoder text tower's outputs become one vector (config.json's `text_pooling`): "pooler" is the
# tower's own pooler output (BERT's tanh layer on [CLS]; what plain VisionTextDualEncoderModel uses, and the value for
# a checkpoint without the entry), "cls" the [CLS] state, "mean" the mean of the states the attention mask keeps
# (sentence-transformers' mean pooling).
TEXT_POOLINGS = ("pooler", "cls", "mean")


def pool_text(outputs, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per text from a text tower's `outputs`, pooled as `pooling` (see `TEXT_POOLINGS`) under the mask."""
    if pooling == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # as sentence-transformers' Pooling


class VisionTextDualEncoder(BiasInConfigMixin, DualEncoderMixin, VisionTextDualEncoderModel):
    """`transformers.VisionTextDualEncoderModel` (any vision backbone + any `AutoModel` text encoder: BERT, RoBERTa,
    XLM-R, MiniLM, each with a linear projection to `projection_dim`) with the trainer's forward, b in config.json
    (`BiasInConfigMixin`) and the text pooling config.json's `text_pooling` names (`TEXT_POOLINGS`).

    Such text towers attend to every position they are given, so they get the attention mask (the collator, the
    trainer and `embed_texts` send one: `text_uses_attention_mask`) and pool with it: a caption embeds the same
    whatever its padding. Saved as `VisionTextDualEncoderModel`; plain transformers loads it, and its
    `get_text_features` equals ours for `text_pooling="pooler"`; for "mean" / "cls" pool `text_model`'s states that
    way and apply `text_projection` (`pool_text`). The projections are heads, not tower modules: they train when a
    tower is locked (LiT) and at the full learning rate.
    """

    native_class = VisionTextDualEncoderModel
    text_uses_attention_mask = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._freeze_unused_pooler()

    @classmethod
    def adapt(cls, model: VisionTextDualEncoderModel, logit_bias_init_value: float = LOGIT_BIAS_INIT):
        model = super().adapt(model, logit_bias_init_value)
        model._freeze_unused_pooler()
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze_unused_pooler()  # loading re-creates parameters
        return loaded

    @property
    def text_pooling(self) -> str:
        return getattr(self.config, "text_pooling", "pooler")

    def _freeze_unused_pooler(self) -> None:
        """A text pooler that `text_pooling` does not use gets no gradient (DDP would wait for one); it is saved as
        loaded, so plain transformers finds every weight."""
        pooler = getattr(self.text_model, "pooler", None)
        if isinstance(pooler, nn.Module) and self.text_pooling != "pooler":
            pooler.requires_grad_(False)

    @property
    def pretrained_towers(self) -> frozenset[str]:
        """The towers `build_vision_text_dual_encoder` loaded, else as `DualEncoderMixin.pretrained_towers`."""
        towers = self.__dict__.get("_pretrained_towers")
        return towers if towers is not None else super().pretrained_towers

    @can_return_tuple
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                          **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling | tuple:
        """As `VisionTextDualEncoderModel.get_text_features`, pooled as `text_pooling` says."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  token_type_ids=token_type_ids, return_dict=True, **kwargs)
        pooled = pool_text(outputs, attention_mask, self.text_pooling)
        return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                          pooler_output=self.text_projection(pooled),
                                          hidden_states=getattr(outputs, "hidden_states", None),
                                          attentions=getattr(outputs, "attentions", None))

    @can_return_tuple
    def get_locked_image_features(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]):
        """The vision tower's pooled output before `visual_projection` (SigLiT's cache; the projection trains)."""
        return self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)

    def forward(self, *args, image_embeds: torch.Tensor | None = None, **kwargs):
        if image_embeds is not None:  # the cache holds `get_locked_image_features`: apply the head here
            image_embeds = self.visual_projection(image_embeds.to(self.visual_projection.weight.dtype))
        return super().forward(*args, image_embeds=image_embeds, **kwargs)


def sentence_transformers_pooling(name_or_path: str) -> str | None:
    """"mean" or "cls" as sentence-transformers' Pooling module beside the weights says (modules.json names its
    folder, usually 1_Pooling/config.json), None when there is none; another mode (max, weighted) is refused."""
    from transformers.utils import cached_file

    def read(filename):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is None:
            return None
        with open(path) as file:
            return json.load(file)

    modules = read("modules.json") or []
    folders = [module.get("path", "") for module in modules if str(module.get("type", "")).endswith("Pooling")]
    settings = read(f"{folders[0]}/config.json" if folders else "1_Pooling/config.json")
    if settings is None:
        return None
    modes = [key[len("pooling_mode_"):] for key, value in settings.items() if key.startswith("pooling_mode_") and value]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise UsageError(f"text_model_name_or_path {name_or_path}: its sentence-transformers pooling is {modes}; hf-siglip "
                     f"pools by {TEXT_POOLINGS[1:]} or the tower's pooler: choose one with --text_pooling")


def build_vision_text_dual_encoder(text_model_name_or_path: str, vision_model_name_or_path: str | None = None,
                                   vision_config=None, text_pooling: str = "auto", projection_dim: int | None = None,
                                   logit_bias_init_value: float = LOGIT_BIAS_INIT) -> VisionTextDualEncoder:
    """A [`VisionTextDualEncoder`] from a pretrained text encoder (any `AutoModel`) and a pretrained vision backbone
    (`vision_model_name_or_path`: SigLIP's or CLIP's vision tower from a whole checkpoint, else the `AutoModel`
    backbone) or a new one (`vision_config`), with new projections to `projection_dim` (default: the text width).

    `text_pooling` "auto": as the sentence-transformers Pooling config beside the text weights says (mean or CLS),
    else mean (what sentence-transformers does for a plain encoder). `model.pretrained_towers` names the loaded towers.
    """
    from transformers import AutoModel, CLIPVisionModel, VisionTextDualEncoderConfig

    from .modeling_siglip_bottleneck import _load_vision_backbone

    if (vision_model_name_or_path is None) == (vision_config is None):
        raise ValueError("Pass exactly one of vision_model_name_or_path and vision_config.")
    if text_pooling == "auto":
        text_pooling = sentence_transformers_pooling(text_model_name_or_path) or "mean"
    if text_pooling not in TEXT_POOLINGS:
        raise UsageError(f"text_pooling is 'auto' or one of {TEXT_POOLINGS}, got {text_pooling!r}")
    text_model = AutoModel.from_pretrained(text_model_name_or_path)
    if text_pooling == "pooler" and getattr(text_model, "pooler", None) is None:
        raise UsageError(f"text_pooling pooler: the text tower {type(text_model).__name__} has no pooler; choose "
                         f"'mean' or 'cls'")
    if vision_model_name_or_path is None:
        vision_model = AutoModel.from_config(vision_config)
    elif AutoConfig.from_pretrained(vision_model_name_or_path).model_type == "clip":
        vision_model = CLIPVisionModel.from_pretrained(vision_model_name_or_path)  # CLIPModel has no pooler_output
    else:
        vision_model = _load_vision_backbone(vision_model_name_or_path)
    for role, tower in (("vision", vision_model), ("text", text_model)):
        if not isinstance(getattr(tower.config, "hidden_size", None), int):
            raise UsageError(f"{role} tower {type(tower).__name__}: VisionTextDualEncoderModel needs a backbone with "
                             f"config.hidden_size (a transformer), this one has none")
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config, text_model.config, projection_dim=projection_dim or text_model.config.hidden_size,
        logit_bias=logit_bias_init_value, text_pooling=text_pooling)
    model = VisionTextDualEncoder(config, vision_model=vision_model, text_model=text_model)
    model._pretrained_towers = frozenset({"text"} | ({"vision"} if vision_model_name_or_path else set()))
    return model


ADAPTERS = {adapter.native_class: adapter for adapter in (SiglipDualEncoder, Siglip2DualEncoder, CLIPDualEncoder,
                                                      VisionTextDualEncoder)}
ADAPTERS_BY_MODEL_TYPE = {adapter.native_class.config_class.model_type: adapter for adapter in ADAPTERS.values()}
# what `load_dual_encoder` (and `hf-siglip train --model_name_or_path`) loads
LOADABLE_DUAL_ENCODER_TYPES = tuple(sorted({*LOADABLE_MODEL_TYPES, *ADAPTERS_BY_MODEL_TYPE}))


def _config_logit_bias(config) -> float:
    return float(getattr(config, "logit_bias", LOGIT_BIAS_INIT))


def as_dual_encoder(model: nn.Module, logit_bias_init_value: float = LOGIT_BIAS_INIT) -> nn.Module:
    """`model` ready for `SiglipTrainer`: a native `SiglipModel` / `Siglip2Model` / `CLIPModel` becomes its adapter in
    place (CLIP gains b = `logit_bias_init_value` unless its config holds one); any other model (an adapter already,
    `SiglipBottleneckModel`, a custom one with the same forward contract) is returned as it is."""
    adapter = ADAPTERS.get(type(model))
    if adapter is None:
        return model
    if issubclass(adapter, BiasInConfigMixin):
        return adapter.adapt(model, logit_bias_init_value)
    return adapter.adapt(model)


def load_dual_encoder(name_or_path: str, logit_bias_init_value: float = LOGIT_BIAS_INIT, **kwargs) -> nn.Module:
    """The checkpoint at `name_or_path` as a trainable dual encoder, chosen by its config.json model type: `siglip` and
    `siglip_bottleneck` as [`SiglipBottleneckModel`], `siglip2`, `clip` and `vision-text-dual-encoder` as their
    adapters. `kwargs` go to `from_pretrained`. Weights holding NaN or infinity are refused
    (`hf_siglip.training.finite.NonFiniteError`, naming the safetensors file and tensor)."""
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type in LOADABLE_MODEL_TYPES:
        model = SiglipBottleneckModel.from_pretrained(name_or_path, **kwargs)
    else:
        adapter = ADAPTERS_BY_MODEL_TYPE.get(config.model_type)
        if adapter is None:
            raise ValueError(f"{name_or_path} holds a checkpoint of model type '{config.model_type}'; hf-siglip "
                             f"trains the dual encoders {list(LOADABLE_DUAL_ENCODER_TYPES)}.")
        if issubclass(adapter, BiasInConfigMixin) and not hasattr(config, "logit_bias"):
            config.logit_bias = logit_bias_init_value
        model = adapter.from_pretrained(name_or_path, config=config, **kwargs)
    check_finite_weights(model, name_or_path)
    return model


def tower_modules(model: nn.Module, tower: str) -> list[nn.Module]:
    """The modules of `tower` ("text" or "vision"): what locking freezes and the optimizer treats as pretrained."""
    return [getattr(model, name) for name in getattr(model, "tower_modules", DEFAULT_TOWER_MODULES)[tower]]


def tower_prefixes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter-name prefixes of each tower (`{"text": ("text_model.",), ...}`)."""
    names = getattr(model, "tower_modules", DEFAULT_TOWER_MODULES)
    return {tower: tuple(f"{name}." for name in modules) for tower, modules in names.items()}


def restore_config_parameters(model: nn.Module, checkpoint: str) -> None:
    """Give parameters kept in config.json rather than in the weights (CLIP's b) their value from `checkpoint`, which
    the Trainer's weight loading does not read."""
    if not isinstance(model, BiasInConfigMixin):
        return
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.no_grad():
        model.logit_bias.fill_(_config_logit_bias(config))


# --- FLIP patch dropout ------------------------------------------------------------------------------------------

# Vision embedding modules patch dropout works on: their class name -> tokens in front of the patches, always kept
# (CLIP's and ViT's class token, which they pool). Siglip2VisionEmbeddings (NaFlex) is not here: its padding mask
# travels beside the tokens to the encoder and the head, so dropping tokens from the embeddings alone would break it.
PATCH_DROPOUT_PREFIX_TOKENS = {"SiglipVisionEmbeddings": 0, "CLIPVisionEmbeddings": 1, "ViTEmbeddings": 1}


class PatchDropout:
    """FLIP's patch dropout (Li et al. 2023), as open_clip's `PatchDropout`: a forward hook on a vision tower's
    embeddings module that, in training mode only, keeps `max(1, int(patches * (1 - ratio)))` randomly chosen patch
    tokens of each image (after the position embeddings, before the encoder layers) and the class token if any.
    The choice comes from torch's global RNG (so a resumed run and GradCache's replayed re-forward drop the same
    tokens); kept tokens stay in their original order. In eval mode (evaluation, a locked tower) it does nothing."""

    def __init__(self, ratio: float, prefix_tokens: int):
        self.ratio, self.prefix_tokens = ratio, prefix_tokens

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        prefix, patches = output[:, :self.prefix_tokens], output[:, self.prefix_tokens:]
        batch, count, width = patches.shape
        keep = max(1, int(count * (1.0 - self.ratio)))
        # uniform noise, drawn element by element on CPU: rows of a batch of 16 get the noise of two batches of 8
        noise = torch.rand(batch, count, device=output.device)
        indices = noise.topk(keep, dim=-1).indices.sort(dim=-1).values
        kept = patches.gather(1, indices.unsqueeze(-1).expand(batch, keep, width))
        return torch.cat([prefix, kept], dim=1) if self.prefix_tokens else kept


def _vision_embeddings(tower: nn.Module) -> nn.Module | None:
    """The embeddings module of a vision tower wherever it nests it (directly, as transformers 5's SiglipVisionModel,
    or levels down, as a wrapped or older tower's `vision_model.embeddings`): the first module of a class patch
    dropout knows, else the first one called `embeddings` (so an unsupported one is named in the refusal)."""
    modules = list(tower.named_modules())
    for _, module in modules:
        if type(module).__name__ in PATCH_DROPOUT_PREFIX_TOKENS:
            return module
    return next((module for name, module in modules if name.rpartition(".")[2] == "embeddings"), None)


def set_patch_dropout(model: nn.Module, ratio: float) -> nn.Module:
    """Give the vision tower of `model` (a `SiglipBottleneckModel`, an adapter or native SigLIP / CLIP model) FLIP
    patch dropout at `ratio` in [0, 1) (see `PatchDropout`); 0 removes it. A hook only: weights, config and the saved
    checkpoint are unchanged. `SiglipTrainer` calls it with `SiglipTrainingArguments.patch_dropout`."""
    from .errors import UsageError

    if not 0.0 <= ratio < 1.0:  # also refuses nan
        raise UsageError(f"patch_dropout must be in [0, 1) (the fraction of patch tokens dropped), got {ratio!r}")
    towers = tower_modules(model, "vision")
    # CLIP's visual_projection has no embeddings; a backbone without them (ResNet) cannot drop patches
    embedding_modules = list({id(module): module for module in map(_vision_embeddings, towers)
                              if module is not None}.values())
    if ratio and not embedding_modules:
        raise UsageError(f"patch_dropout: the vision tower ({', '.join(type(tower).__name__ for tower in towers)}) has "
                         f"no patch embeddings to drop tokens from")
    for embeddings in embedding_modules:
        for key, hook in list(embeddings._forward_hooks.items()):
            if isinstance(hook, PatchDropout):
                del embeddings._forward_hooks[key]
        if ratio == 0.0:
            continue
        prefix_tokens = PATCH_DROPOUT_PREFIX_TOKENS.get(type(embeddings).__name__)
        if prefix_tokens is None:
            raise UsageError(f"patch_dropout: the vision tower's embeddings ({type(embeddings).__name__}) are not "
                             f"supported; it works on {sorted(PATCH_DROPOUT_PREFIX_TOKENS)} (SigLIP, SigLIP 2 FixRes, "
                             f"CLIP, ViT backbones; not SigLIP 2 NaFlex)")
        embeddings.register_forward_hook(PatchDropout(ratio, prefix_tokens))
    return model


__all__ = ["BiasInConfigMixin", "CLIPDualEncoder", "PatchDropout", "SIGLIP_TEXT_MODEL_TYPES", "Siglip2DualEncoder",
           "SiglipDualEncoder", "TEXT_POOLINGS", "VisionTextDualEncoder", "as_dual_encoder",
           "build_vision_text_dual_encoder", "load_dual_encoder", "pool_text", "restore_config_parameters",
           "sentence_transformers_pooling", "set_patch_dropout", "tower_modules", "tower_prefixes"]
