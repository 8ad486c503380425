"""Captioning beside the sigmoid loss: CoCa (Yu et al. 2022, arXiv 2205.01917) and SigLIP 2's LocCa decoder
(Tschannen et al. 2025, arXiv 2502.14786, section 2.2; Wan et al. 2024, LocCa).

A text decoder (transformers' `BertLMHeadModel`: causal self-attention plus cross-attention to the vision tower's
un-pooled patch tokens, `hf_siglip.captioner`) is trained with teacher-forced next-token cross-entropy on the batch's
captions, the same caption ids the text tower reads. The term is the mean over the global batch's target tokens,
times `weight` (CoCa: 2 beside a contrastive weight of 1). After training, `output_dir/captioner/` holds a
`VisionEncoderDecoderModel` (the trained vision tower and decoder) with the tokenizer, image processor and generation
config: plain transformers loads it and `.generate()`s captions. The dual encoder is saved as before.

Needs patch tokens: dual encoders whose vision tower is a ViT (SigLIP, SigLIP 2 FixRes, CLIP, our bottleneck model
with a SigLIP or ViT tower). Refused at start-up, in one line: rows carrying cached `image_embeds` (SigLiT's
image_embedding_cache: no tower runs), SigLIP 2 NaFlex (padded, variable grids: the saved captioner could not mask
the padding), towers without a token sequence (convnets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..captioner import (
    CAPTIONER_FOLDER,
    CaptionDecoder,
    CaptionTokens,
    caption_image_index,
    caption_loss_sum,
    caption_token_count,
    patch_tokens_of,
    save_captioner,
)
from ..errors import UsageError
from . import register_objective
from .base import Objective, ObjectiveConfig, attach_module, full_state, load_into

HEAD_NAME = "caption_decoder"
WEIGHTS_NAME = "caption_decoder.safetensors"


@dataclass
class CaptioningConfig(ObjectiveConfig):
    """Settings of the captioning decoder (`objectives: {captioning: {...}}`)."""

    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the next-token cross-entropy."})
    max_caption_length: int = field(default=64, metadata={
        "help": "Caption tokens (EOS included) the decoder is trained on and generates at most; longer captions are "
                "truncated (the collator's max_length truncates first)."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers (self-attention, cross-attention, MLP)."})
    hidden_size: int | None = field(default=None, metadata={
        "help": "Decoder width; None: the vision tower's (otherwise its patch tokens are projected to it)."})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "Decoder heads; None: the vision tower's with its width, else hidden_size // 64 (at least 1)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Decoder MLP width; None: 4 x hidden_size."})
    dropout: float = field(default=0.0, metadata={"help": "Decoder dropout (hidden and attention probabilities)."})
    seed: int = field(default=42, metadata={"help": "Seed of the decoder's initialisation."})

    def validate(self, name: str) -> None:
        super().validate(name)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"objectives.{name}.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not (isinstance(self.max_caption_length, int) and self.max_caption_length >= 2):
            raise ValueError(f"objectives.{name}.max_caption_length must be an integer >= 2, got "
                             f"{self.max_caption_length!r}")
        for setting in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, setting)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"objectives.{name}.{setting} must be a positive integer, got {value!r}")
        if self.hidden_size is not None and self.num_attention_heads is not None and \
                self.hidden_size % self.num_attention_heads:
            raise ValueError(f"objectives.{name}.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"objectives.{name}.dropout must be in [0, 1), got {self.dropout!r}")


@register_objective
class Captioning(Objective):
    """An image-grounded text decoder `caption_decoder` on the vision tower's patch tokens; units are target tokens.
    Its weights are written beside each checkpoint and, after training, as `captioner/`."""

    name = "captioning"
    config_class = CaptioningConfig
    side_file = WEIGHTS_NAME

    def __init__(self, config: CaptioningConfig, model, args, processing_class=None, train_dataset=None):
        super().__init__(config, model, args)
        self.problem = _unsupported(model, train_dataset)
        if self.problem is not None:  # check() refuses the run: nothing to build
            return
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        text_config = model.config.text_config
        if tokenizer is not None:
            self.tokens = CaptionTokens.from_tokenizer(tokenizer)
            vocab_size = len(tokenizer)
        elif getattr(text_config, "pad_token_id", None) is not None:
            self.tokens = CaptionTokens(text_config.pad_token_id, getattr(text_config, "eos_token_id", None))
            vocab_size = text_config.vocab_size
        else:
            raise UsageError("the captioning objective needs the tokenizer (processing_class) or a text config with a "
                             "pad_token_id: its pad/EOS ids start and stop captions")
        vision = model.vision_model.config
        hidden = config.hidden_size or vision.hidden_size
        heads = config.num_attention_heads or (vision.num_attention_heads if config.hidden_size is None
                                               else max(1, hidden // 64))
        if hidden % heads:
            raise UsageError(f"objectives.captioning: the decoder width {hidden} is not a multiple of its "
                             f"{heads} attention heads: set hidden_size / num_attention_heads")
        self.max_length = config.max_caption_length
        self.decoder = attach_module(model, HEAD_NAME, lambda: CaptionDecoder(
            vision.hidden_size, vocab_size, hidden, config.num_layers, heads, config.intermediate_size or 4 * hidden,
            config.max_caption_length, self.tokens.pad, config.dropout), seed=config.seed)

    def check(self, model) -> None:
        if self.problem is not None:
            raise UsageError(f"the captioning objective {self.problem}")

    def before_training(self, trainer) -> None:
        trainer.card_info["captioner"] = CAPTIONER_FOLDER  # the card shows how to caption with it

    def count(self, batch) -> int:
        return caption_token_count(batch["input_ids"], self.max_length, self.tokens)

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        patches = patch_tokens_of(outputs.vision_model_output)
        if patches is None:
            raise UsageError("the captioning objective needs the vision tower's patch tokens, and this batch's forward "
                             "gave none (cached image_embeds?)")
        if "image_ids" in batch and "text_ids" in batch:
            index = caption_image_index(batch["image_ids"], batch["text_ids"])
        else:
            index = torch.arange(len(batch["input_ids"]), device=patches.device)
        loss, _ = caption_loss_sum(self.decoder, patches, batch["input_ids"], index, self.tokens, self.max_length,
                                   self.config.label_smoothing)
        return loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        # copies: BERT's output layer shares its weights with the token table, and safetensors refuses shared memory
        return {name: value.clone() for name, value in full_state(self.decoder).items()}

    def load_state_dict(self, state) -> None:
        load_into(self.decoder, state)

    def card(self) -> dict:
        decoder = self.decoder.decoder.config
        return {"weight": self.weight, "label_smoothing": self.config.label_smoothing,
                "max_caption_length": self.max_length,
                "decoder": f"BertLMHeadModel with cross-attention: {decoder.num_hidden_layers} layers, width "
                           f"{decoder.hidden_size}, {decoder.num_attention_heads} heads",
                "captioner": "captioner/ (VisionEncoderDecoderModel)"}

    def save_pretrained(self, model, output_dir: str, processing_class=None) -> None:
        save_captioner(model.vision_model, self.decoder, self.tokens, self.max_length, output_dir, processing_class)


def _unsupported(model, train_dataset) -> str | None:
    """Why `model` (with this training data) cannot feed the decoder patch tokens, or None."""
    from ..dual_encoders import Siglip2DualEncoder

    columns = getattr(train_dataset, "column_names", None) or ()
    if "image_embeds" in columns:
        return ("needs the vision tower's patch tokens, but the training rows carry cached image_embeds (the "
                "image_embedding_cache data step / SigLiT): train without the cache")
    if isinstance(model, Siglip2DualEncoder):
        return ("does not support SigLIP 2 NaFlex (Siglip2Model): its padded, variable patch grids cannot be masked "
                "in the saved VisionEncoderDecoderModel; use a fixed-resolution SigLIP 2 checkpoint (SiglipModel)")
    vision = getattr(model, "vision_model", None)
    width = getattr(getattr(vision, "config", None), "hidden_size", None)
    if vision is None or not isinstance(width, int):
        kind = getattr(getattr(vision, "config", None), "model_type", type(vision).__name__)
        return (f"needs a vision tower that gives patch tokens (a ViT: SigLIP, CLIP, ViT backbones); this model's "
                f"'{kind}' tower gives none")
    return None


__all__ = ["HEAD_NAME", "WEIGHTS_NAME", "Captioning", "CaptioningConfig"]
