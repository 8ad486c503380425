"""The fusion encoder that ITM and MLM share (ALBEF, Li et al. 2021, arXiv 2107.07651; BLIP, Li et al. 2022,
arXiv 2201.12086): an image-grounded text encoder beside the dual encoder.

It is transformers' own `BlipTextModel` (BLIP's "MED" text encoder, a BERT whose layers add cross-attention),
called with `is_decoder=False`: bidirectional self-attention over the caption, then in every layer cross-attention to
the vision tower's un-pooled patch tokens (`vision_model_output.last_hidden_state`, keys and values read at the
tower's width, `encoder_hidden_size`, so no projection sits between them). transformers' `BertModel` cannot be that
encoder: its cross-attention layers exist only with `is_decoder=True`, which also makes self-attention causal.

Tokens. The encoder embeds the caption ids the text tower reads (`input_ids`, the dual encoder's tokenizer, padded to
a fixed length as SigLIP trains; attention mask = ids != pad id) in a table of its own, two ids larger than the
tokenizer: `[CLS]` (= vocabulary size), prepended to every caption, whose output ITM classifies, and `[MASK]`
(= vocabulary size + 1), which MLM writes over masked tokens (SigLIP's tokenizers have neither). Both ids are in the
saved config (`itm_cls_token_id`, `mlm_mask_token_id`).

One module, `fusion_encoder`, is attached to the model when the first of ITM / MLM is built; each adds its own head
(`itm_head`: a 2-way linear layer on the [CLS] output; `mlm_head`: BLIP's `BlipTextOnlyMLMHead`). Its sizes are the
`FusionSettings` fields of both objectives: a field set on either applies, set on both it must agree.

Saved (`save_fusion`, after training): `output_dir/fusion_encoder/` holds a `BlipTextLMHeadModel` (encoder and MLM
head) when MLM ran, else a `BlipTextModel`; `BlipTextModel.from_pretrained(folder, add_pooling_layer=False)` loads the
encoder from either, and `itm_head.safetensors` (`weight` (2, width), `bias` (2,)) the ITM head. README.md there shows
how plain transformers scores a pair with them and the dual encoder's vision tower; `load_itm_scorer` does it here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import BlipTextConfig, BlipTextLMHeadModel, BlipTextModel
from transformers.models.blip.modeling_blip_text import BlipTextOnlyMLMHead

from ..errors import UsageError
from .base import attach_module, full_state, load_into

MODULE_NAME = "fusion_encoder"
FOLDER = "fusion_encoder"  # beside the dual encoder in output_dir
ITM_HEAD_FILE = "itm_head.safetensors"
DEFAULT_LAYERS = 2


@dataclass
class FusionSettings:
    """The fusion encoder's sizes, settable on `itm` and `mlm` alike (None: set on the other, else the default)."""

    num_layers: int | None = field(default=None, metadata={"help": f"Fusion encoder layers (default {DEFAULT_LAYERS};"
                                                                   " each: self-, cross-attention, MLP)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Fusion encoder width; None: the vision tower's."})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "Fusion encoder heads; None: the vision tower's with its width, else hidden_size // 64 (at least 1)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width; None: 4 x hidden_size."})
    dropout: float | None = field(default=None, metadata={
        "help": "Dropout of the fusion encoder (default 0: accumulation then equals the large batch exactly)."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the fusion encoder's and heads' initialisation and of the objective's draws (negatives, "
                "masks); None: the run's seed."})
    train_vision_tower: bool | None = field(default=None, metadata={
        "help": "Whether the itm / mlm losses reach the vision tower through its patch tokens (None or true: yes, as "
                "ALBEF and BLIP train; false: the fusion encoder reads detached patch tokens, as BLIP-2's Q-Former "
                "reads a frozen image encoder, and the dual encoder learns from its own loss alone)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak learning rate of the fusion encoder and the itm / mlm heads (the run's schedule); None: the "
                "run's learning_rate. A from-scratch post-LN fusion encoder stalls at a from-scratch dual encoder's "
                "rate (2e-3 in docs/EXPERIMENTS.md); ALBEF and BLIP train it at 1e-4 from BERT."})

    def validate_fusion(self, name: str) -> None:
        for setting in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, setting)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"objectives.{name}.{setting} must be a positive integer, got {value!r}")
        if self.hidden_size is not None and self.num_attention_heads is not None and \
                self.hidden_size % self.num_attention_heads:
            raise ValueError(f"objectives.{name}.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"objectives.{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"objectives.{name}.seed must be an integer, got {self.seed!r}")
        if self.train_vision_tower is not None and not isinstance(self.train_vision_tower, bool):
            raise ValueError(f"objectives.{name}.train_vision_tower must be true or false, got "
                             f"{self.train_vision_tower!r}")
        if self.learning_rate is not None and not (isinstance(self.learning_rate, (int, float))
                                                   and 0 < self.learning_rate < float("inf")):
            raise ValueError(f"objectives.{name}.learning_rate must be a number > 0, got {self.learning_rate!r}")


def fusion_settings(config, args) -> dict:
    """The shared settings, merged over the run's objectives that have them (`args.objectives`) and `config`."""
    configs = {name: value for name, value in (getattr(args, "objectives", None) or {}).items()
               if isinstance(value, FusionSettings)}
    if not any(value is config for value in configs.values()):
        configs["this objective"] = config
    merged = {}
    for setting in (f.name for f in fields(FusionSettings)):
        given = {name: getattr(value, setting) for name, value in configs.items()
                 if getattr(value, setting) is not None}
        if len(set(given.values())) > 1:
            raise UsageError(f"the itm and mlm objectives share one fusion encoder, but its {setting} differs "
                             f"between them ({given}): set it once, or to the same value")
        merged[setting] = next(iter(given.values()), None)
    if merged["seed"] is None:
        merged["seed"] = getattr(args, "seed", 42) if args is not None else 42
    return merged


class CaptionVocabulary:
    """The fusion encoder's ids: the dual encoder's vocabulary, its pad and special ids, plus [CLS] and [MASK]."""

    def __init__(self, size: int, pad: int, special: tuple[int, ...] = ()):
        self.size, self.pad = int(size), int(pad)
        self.special = tuple(sorted({int(i) for i in special} | {self.pad}))
        self.cls, self.mask = self.size, self.size + 1

    @classmethod
    def of(cls, model, processing_class=None) -> CaptionVocabulary:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None:
            if tokenizer.pad_token_id is None:
                raise UsageError(f"the itm / mlm objectives need a tokenizer with a pad token (captions are padded "
                                 f"and masked by it): {type(tokenizer).__name__} has none")
            return cls(len(tokenizer), tokenizer.pad_token_id, tuple(tokenizer.all_special_ids))
        text = model.config.text_config
        if getattr(text, "pad_token_id", None) is None:
            raise UsageError("the itm / mlm objectives need the tokenizer (processing_class) or a text config with a "
                             "pad_token_id")
        special = tuple(i for i in (getattr(text, "bos_token_id", None), getattr(text, "eos_token_id", None))
                        if isinstance(i, int))
        return cls(text.vocab_size, text.pad_token_id, special)


class FusionEncoder(nn.Module):
    """`BlipTextModel` (cross-attending, called as an encoder) reading [CLS] + caption ids."""

    def __init__(self, vision_width: int, vocabulary: CaptionVocabulary, hidden_size: int, num_layers: int,
                 num_heads: int, intermediate_size: int, max_positions: int, dropout: float = 0.0,
                 train_vision_tower: bool = True):
        super().__init__()
        self.vocabulary = vocabulary
        self.train_vision_tower = train_vision_tower  # False: the losses read detached patch tokens
        config = BlipTextConfig(
            vocab_size=vocabulary.size + 2, hidden_size=hidden_size, encoder_hidden_size=vision_width,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_positions + 1, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, pad_token_id=vocabulary.pad, bos_token_id=None, eos_token_id=None,
            sep_token_id=None, is_decoder=True,  # builds the cross-attention layers; forward passes is_decoder=False
            tie_word_embeddings=False, use_cache=False)
        config.itm_cls_token_id, config.mlm_mask_token_id = vocabulary.cls, vocabulary.mask
        self.config = config
        self.bert = BlipTextModel(config, add_pooling_layer=False)

    def forward(self, patch_tokens: torch.Tensor, input_ids: torch.LongTensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states `(P, 1 + L, width)` of [CLS] + `input_ids` `(P, L)` attending to `patch_tokens` `(P, N, D)`.
        `text_mask` (default: ids != pad) marks the caption's tokens (MLM passes the unmasked caption's)."""
        if not self.train_vision_tower:
            patch_tokens = patch_tokens.detach()
        if text_mask is None:
            text_mask = input_ids != self.vocabulary.pad
        start = torch.full((len(input_ids), 1), self.vocabulary.cls, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([start, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(start), text_mask.to(start.dtype)], dim=1)
        return self.bert(input_ids=ids, attention_mask=mask, encoder_hidden_states=patch_tokens,
                         is_decoder=False).last_hidden_state


def unsupported(model, train_dataset) -> str | None:
    """Why `model` cannot feed the fusion encoder patch tokens (the captioning decoder's conditions), or None."""
    from .captioning import _unsupported

    return _unsupported(model, train_dataset)


def attach_fusion_encoder(model, config, args, processing_class=None) -> FusionEncoder:
    """The model's `fusion_encoder`, attached now (sizes from both objectives' settings) unless already there."""
    existing = getattr(model, MODULE_NAME, None)
    if existing is not None:
        fusion_settings(config, args)  # the other objective built it: its settings must agree with these
        return existing
    settings = fusion_settings(config, args)
    vision = model.vision_model.config
    hidden = settings["hidden_size"] or vision.hidden_size
    heads = settings["num_attention_heads"] or (vision.num_attention_heads if settings["hidden_size"] is None
                                                else max(1, hidden // 64))
    if hidden % heads:
        raise UsageError(f"the fusion encoder's width {hidden} is not a multiple of its {heads} attention heads: set "
                         "hidden_size / num_attention_heads under objectives.itm or objectives.mlm")
    vocabulary = CaptionVocabulary.of(model, processing_class)
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None) or 512
    return attach_module(model, MODULE_NAME, lambda: FusionEncoder(
        vision.hidden_size, vocabulary, hidden, settings["num_layers"] or DEFAULT_LAYERS, heads,
        settings["intermediate_size"] or 4 * hidden, max_positions, settings["dropout"] or 0.0,
        settings["train_vision_tower"] is not False),
        seed=settings["seed"], learning_rate=settings["learning_rate"])


def new_mlm_head(fusion: FusionEncoder) -> nn.Module:
    head = BlipTextOnlyMLMHead(fusion.config)
    # one output bias, as BlipTextLMHeadModel ties them (`_tied_weights_keys`): the other would never be used (DDP)
    head.predictions.decoder.bias = head.predictions.bias
    return head


def fusion_and_head_state(fusion: nn.Module, head: nn.Module, head_name: str) -> dict[str, torch.Tensor]:
    """An objective's side file: the shared fusion encoder and its own head, by prefix. Copies: tied weights (the MLM
    head's biases) share memory, which safetensors refuses."""
    state = {f"{MODULE_NAME}.{k}": v.clone() for k, v in full_state(fusion).items()}
    return state | {f"{head_name}.{k}": v.clone() for k, v in full_state(head).items()}


def load_fusion_and_head_state(fusion: nn.Module, head: nn.Module, head_name: str, state) -> None:
    for module, prefix in ((fusion, f"{MODULE_NAME}."), (head, f"{head_name}.")):
        load_into(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def describe(fusion: FusionEncoder) -> str:
    config = fusion.config
    return (f"{config.num_hidden_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads "
            "(BlipTextModel with cross-attention to the patch tokens)")


def save_fusion(model, output_dir: str) -> str:
    """Write `output_dir/fusion_encoder/` (see the module docstring) from the model's attached modules."""
    from safetensors.torch import save_file

    fusion = getattr(model, MODULE_NAME)
    folder = os.path.join(output_dir, FOLDER)
    mlm_head = getattr(model, "mlm_head", None)
    if mlm_head is not None:
        saved = BlipTextLMHeadModel(fusion.config)
        saved.bert.load_state_dict(fusion.bert.state_dict())
        saved.cls.load_state_dict(mlm_head.state_dict())
    else:
        saved = BlipTextModel(fusion.config, add_pooling_layer=False)
        saved.load_state_dict(fusion.bert.state_dict())
    saved.save_pretrained(folder)
    itm_head = getattr(model, "itm_head", None)
    if itm_head is not None:
        save_file({name: value.detach().cpu().contiguous() for name, value in itm_head.state_dict().items()},
                  os.path.join(folder, ITM_HEAD_FILE))
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write(SCORING_README.format(cls=fusion.vocabulary.cls, pad=fusion.vocabulary.pad,
                                           mlm="a `BlipTextLMHeadModel` (encoder and MLM head)" if mlm_head is not None
                                           else "a `BlipTextModel`"))
    return folder


SCORING_README = """# Fusion encoder (ITM / MLM), trained beside the dual encoder one folder up

{mlm}, in plain transformers, with cross-attention to the dual encoder's vision tower's patch tokens; and
`itm_head.safetensors`, a 2-way linear layer on the output at the [CLS] position (class 1: the caption matches the
image). The encoder reads [CLS] (id {cls}) followed by the dual encoder's tokens of the caption; the attention mask is
ids != pad id ({pad}). Scoring pairs with plain transformers:

```python
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, BlipTextModel

folder = "path/to/output_dir"  # the dual encoder's folder
model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
fusion = BlipTextModel.from_pretrained(f"{{folder}}/fusion_encoder", add_pooling_layer=False)
itm = torch.nn.Linear(fusion.config.hidden_size, 2)
itm.load_state_dict(load_file(f"{{folder}}/fusion_encoder/itm_head.safetensors"))
images = [Image.new("RGB", (224, 224), "red")] * 2  # your images, one per caption
captions = ["a red square", "a blue circle"]
inputs = processor(text=captions, images=images, padding="max_length", return_tensors="pt")
with torch.no_grad():
    patches = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    ids = inputs["input_ids"]
    start = torch.full((len(ids), 1), fusion.config.itm_cls_token_id)
    mask = torch.cat([torch.ones_like(start), (ids != {pad}).long()], dim=1)
    hidden = fusion(input_ids=torch.cat([start, ids], dim=1), attention_mask=mask, encoder_hidden_states=patches,
                    is_decoder=False).last_hidden_state
    match_probability = itm(hidden[:, 0]).softmax(-1)[:, 1]
```

`hf_siglip.objectives.fusion.load_itm_scorer(folder)` returns the same scorer as a function of pixel values and ids.
"""


class ItmScorer(nn.Module):
    """The saved pieces put together: `scorer(pixel_values, input_ids)` -> match probability per (image, caption)."""

    def __init__(self, vision_model, fusion: BlipTextModel, itm_head: nn.Linear):
        super().__init__()
        self.vision_model, self.fusion, self.itm_head = vision_model, fusion, itm_head

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        config = self.fusion.config
        patches = self.vision_model(pixel_values=pixel_values).last_hidden_state
        start = torch.full((len(input_ids), 1), config.itm_cls_token_id, dtype=input_ids.dtype,
                           device=input_ids.device)
        mask = torch.cat([torch.ones_like(start), (input_ids != config.pad_token_id).long()], dim=1)
        hidden = self.fusion(input_ids=torch.cat([start, input_ids], dim=1), attention_mask=mask,
                             encoder_hidden_states=patches, is_decoder=False).last_hidden_state
        return self.itm_head(hidden[:, 0]).float().softmax(-1)[:, 1]


def load_itm_scorer(folder: str) -> ItmScorer:
    """The ITM scorer of a folder `hf-siglip train` wrote with the itm objective on (plain transformers classes)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    head_file = os.path.join(folder, FOLDER, ITM_HEAD_FILE)
    if not os.path.exists(head_file):
        raise UsageError(f"{folder} has no {FOLDER}/{ITM_HEAD_FILE}: it was not trained with the itm objective")
    model = AutoModel.from_pretrained(folder)
    fusion = BlipTextModel.from_pretrained(os.path.join(folder, FOLDER), add_pooling_layer=False)
    head = nn.Linear(fusion.config.hidden_size, 2)
    head.load_state_dict(load_file(head_file))
    return ItmScorer(model.vision_model, fusion, head).eval()


__all__ = ["FOLDER", "ITM_HEAD_FILE", "MODULE_NAME", "CaptionVocabulary", "FusionEncoder", "FusionSettings",
           "ItmScorer", "attach_fusion_encoder", "describe", "fusion_and_head_state", "fusion_settings",
           "load_fusion_and_head_state", "load_itm_scorer", "new_mlm_head", "save_fusion", "unsupported"]
