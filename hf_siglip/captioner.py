"""An image-grounded caption decoder beside a dual encoder (CoCa, SigLIP 2's LocCa), and the captioner it saves.

The decoder is transformers' own `BertLMHeadModel` built as a decoder (`is_decoder=True`, causal self-attention)
with `add_cross_attention=True` (every layer attends to the vision tower's patch tokens, the un-pooled
`last_hidden_state`). Between the towers sits the projection `VisionEncoderDecoderModel` itself puts there when the
widths differ (`enc_to_dec_proj`), so the trained pieces are exactly a `VisionEncoderDecoderModel`'s: `save_captioner`
writes one (encoder = the trained vision tower in its native class, decoder = the trained decoder) that plain
transformers loads and `.generate()`s from, with the dual encoder's tokenizer and image processor.

Tokens. The decoder reads the text tower's caption ids (`input_ids`, padded to a fixed length, as SigLIP trains),
with the same vocabulary. SigLIP's tokenizers have no BOS, so the decoder starts from the pad token (T5's convention:
`decoder_start_token_id = pad_token_id`; for CLIP, whose ids begin with BOS, the first target is that BOS).
Targets (`caption_labels`): the first `max_caption_length` ids, up to and including the first stop token (EOS or
pad; SigLIP's pad is its EOS), so that generation learns to stop; every later position is -100 (ignored). The
decoder's input is the targets shifted right behind the start token (`shift_tokens_right`, as
`VisionEncoderDecoderModel` makes it from labels). Self-attention is causal, so positions after the stop never
reach a target and no attention mask is needed.

Loss: teacher-forced next-token cross-entropy (optionally label-smoothed) summed over the target tokens
(`caption_loss_sum`); the caller divides by the global count of target tokens.
"""

import copy
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertLMHeadModel,
    GenerationConfig,
    VisionEncoderDecoderModel,
)
from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import (
    shift_tokens_right,
)

CAPTIONER_FOLDER = "captioner"  # beside the dual encoder in output_dir
IGNORE = -100


class CaptionTokens:
    """The decoder's special ids, from the dual encoder's tokenizer: start (= pad), pad and the stop ids."""

    def __init__(self, pad_token_id: int, eos_token_id: int | None = None):
        self.pad = int(pad_token_id)
        self.start = self.pad
        self.stops = tuple(dict.fromkeys(i for i in (eos_token_id, pad_token_id) if i is not None))

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CaptionTokens":
        if tokenizer.pad_token_id is None:
            raise ValueError("the captioning decoder needs a tokenizer with a pad token (its start and stop token): "
                             f"{type(tokenizer).__name__} has none")
        return cls(tokenizer.pad_token_id, tokenizer.eos_token_id)


class CaptionDecoder(nn.Module):
    """`BertLMHeadModel` (causal, cross-attending) plus `VisionEncoderDecoderModel`'s projection of the patch tokens
    to the decoder's width (present only when the widths differ, as there)."""

    def __init__(self, encoder_hidden_size: int, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_positions: int, pad_token_id: int, dropout: float = 0.0):
        super().__init__()
        config = BertConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, intermediate_size=intermediate_size, max_position_embeddings=max_positions,
            type_vocab_size=1, pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, is_decoder=True,
            add_cross_attention=True)
        self.decoder = BertLMHeadModel(config)
        self.enc_to_dec_proj = (nn.Linear(encoder_hidden_size, hidden_size) if encoder_hidden_size != hidden_size
                                else None)

    def forward(self, patch_tokens: torch.Tensor, decoder_input_ids: torch.LongTensor) -> torch.Tensor:
        """Next-token logits `(T, L, vocab)` of `decoder_input_ids` `(T, L)` attending to `patch_tokens` (T, N, D)."""
        memory = patch_tokens if self.enc_to_dec_proj is None else self.enc_to_dec_proj(patch_tokens)
        return self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=memory, use_cache=False).logits


def caption_labels(input_ids: torch.LongTensor, max_length: int, tokens: CaptionTokens) -> torch.LongTensor:
    """The targets of each caption: its first `max_length` ids up to and including the first stop id; -100 after."""
    ids = input_ids[:, :max_length]
    stop = torch.isin(ids, torch.tensor(tokens.stops, device=ids.device))
    after_first_stop = (stop.long().cumsum(1) - stop.long()) > 0  # strictly after the first stop
    return ids.masked_fill(after_first_stop, IGNORE)


def caption_image_index(image_ids: torch.LongTensor, text_ids: torch.LongTensor) -> torch.LongTensor:
    """For each text, the position of its image in the batch. The collator emits each row's captions together, in
    row order, with the row's id, so texts are matched to images in order (equal ids of two rows stay apart unless
    they are neighbours, where the captions go to the first: ids that equal declare the images the same anyway)."""
    if len(image_ids) == len(text_ids) and torch.equal(image_ids, text_ids):
        return torch.arange(len(text_ids), device=text_ids.device)
    images, index, position = image_ids.tolist(), [], 0
    for text_id in text_ids.tolist():
        while position < len(images) and images[position] != text_id:
            position += 1
        if position == len(images):
            raise ValueError(f"a caption with id {text_id} has no image of that id in its batch (or the captions are "
                             "not in the images' order): the captioning decoder needs SiglipDataCollator's batches")
        index.append(position)
    return torch.tensor(index, device=text_ids.device)


def caption_loss_sum(decoder: CaptionDecoder, patch_tokens: torch.Tensor, input_ids: torch.LongTensor,
                     image_index: torch.LongTensor, tokens: CaptionTokens, max_length: int,
                     label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum over target tokens of the next-token cross-entropy, number of target tokens) for captions `input_ids`
    `(T, L)` of the images whose patch tokens `(B, N, D)` are at `image_index` `(T,)`."""
    labels = caption_labels(input_ids, max_length, tokens)
    decoder_input_ids = shift_tokens_right(labels, tokens.pad, tokens.start)
    logits = decoder(patch_tokens[image_index], decoder_input_ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def caption_token_count(input_ids: torch.LongTensor, max_length: int, tokens: CaptionTokens) -> int:
    return int((caption_labels(input_ids, max_length, tokens) != IGNORE).sum())


def patch_tokens_of(vision_outputs) -> torch.Tensor | None:
    """The vision tower's un-pooled tokens `(B, N, D)`, or None where there are none (a cached embedding, a convnet's
    feature map)."""
    tokens = getattr(vision_outputs, "last_hidden_state", None) if vision_outputs is not None else None
    return tokens if tokens is not None and tokens.ndim == 3 else None


@torch.no_grad()
def greedy_captions(vision_model: nn.Module, decoder: CaptionDecoder, pixel_values: torch.Tensor,
                    tokens: CaptionTokens, max_length: int) -> torch.LongTensor:
    """Greedy decoding written out (full re-forward per token, no cache): `(B, 1 + n)` ids beginning with the start
    token, rows that stopped padded with the pad id, as `generate()` returns them; at most `max_length` new ids."""
    memory = vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
    ids = torch.full((len(pixel_values), 1), tokens.start, dtype=torch.long, device=pixel_values.device)
    done = torch.zeros(len(pixel_values), dtype=torch.bool, device=pixel_values.device)
    stops = torch.tensor(tokens.stops, device=ids.device)
    for _ in range(max_length):
        following = decoder(memory, ids)[:, -1].argmax(-1)
        following = following.masked_fill(done, tokens.pad)
        ids = torch.cat([ids, following[:, None]], dim=1)
        done |= torch.isin(following, stops)
        if done.all():
            break
    return ids


def build_captioner(vision_model: nn.Module, decoder: CaptionDecoder, tokens: CaptionTokens,
                    max_length: int) -> VisionEncoderDecoderModel:
    """A `VisionEncoderDecoderModel` holding copies of the trained vision tower (its native transformers class) and
    decoder, with the generation settings that reproduce `greedy_captions`."""
    encoder, text_decoder = copy.deepcopy(vision_model), copy.deepcopy(decoder.decoder)
    captioner = VisionEncoderDecoderModel(encoder=encoder, decoder=text_decoder)
    # the trained weights again: the composite's post_init may initialise what it takes for new weights
    captioner.encoder.load_state_dict(vision_model.state_dict())
    captioner.decoder.load_state_dict(decoder.decoder.state_dict())
    if decoder.enc_to_dec_proj is not None:
        captioner.enc_to_dec_proj.load_state_dict(decoder.enc_to_dec_proj.state_dict())
    captioner.config.decoder_start_token_id = tokens.start
    captioner.config.pad_token_id = tokens.pad
    captioner.config.eos_token_id = tokens.stops[0]
    captioner.generation_config = GenerationConfig(
        decoder_start_token_id=tokens.start, pad_token_id=tokens.pad, eos_token_id=list(tokens.stops),
        max_length=max_length + 1, do_sample=False, num_beams=1)
    return captioner.eval()


def save_captioner(vision_model: nn.Module, decoder: CaptionDecoder, tokens: CaptionTokens, max_length: int,
                   output_dir: str, processing_class=None) -> str:
    """Write `output_dir/captioner/`: the `VisionEncoderDecoderModel` with its generation config and the dual
    encoder's processor (tokenizer and image processor). Returns the folder."""
    folder = os.path.join(output_dir, CAPTIONER_FOLDER)
    build_captioner(vision_model, decoder, tokens, max_length).save_pretrained(folder)
    if processing_class is not None:
        processing_class.save_pretrained(folder)
    return folder


def captioner_folder(checkpoint: str, required: bool = True) -> str | None:
    """The captioner folder of a training output folder (`captioner/` in it), or `checkpoint` when it is one; None
    (or, when `required`, a one-line `UsageError`) when neither holds a `VisionEncoderDecoderModel`."""
    for folder in (os.path.join(checkpoint, CAPTIONER_FOLDER), checkpoint):
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            continue
        with open(config) as handle:
            if json.load(handle).get("model_type") == "vision-encoder-decoder":
                return folder
    if not required:
        return None
    from .errors import UsageError

    raise UsageError(f"checkpoint {checkpoint}: no captioner in it (a folder trained with the captioning objective "
                     f"has {CAPTIONER_FOLDER}/, a VisionEncoderDecoderModel)")


class TrainedCaptioner:
    """A captioner folder loaded with plain transformers only (`VisionEncoderDecoderModel`, its image processor and
    tokenizer): the one generation path of `hf-siglip caption` and of the `pseudo_captions` data step."""

    def __init__(self, folder: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.folder = folder
        self.model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # the decoder's position table holds this many ids after the start token: it cannot write longer captions
        self.max_tokens = self.model.generation_config.max_length - 1

    def to(self, device) -> "TrainedCaptioner":
        self.model.to(device)
        return self

    @torch.no_grad()
    def generate(self, images, batch_size: int = 32, num_return_sequences: int = 1, **options) -> list[str]:
        """Captions of `images` (PIL), `num_return_sequences` per image in image order, stripped; `options` go to
        `generate()` (`num_beams`, `do_sample`, `top_p`, `max_new_tokens`; default: the saved generation config)."""
        longest = options.get("max_new_tokens")
        if longest is not None and longest > self.max_tokens:
            from .errors import UsageError

            raise UsageError(f"max_new_tokens {longest}: the captioner in {self.folder} was trained on captions of "
                             f"at most {self.max_tokens} tokens (its decoder has no positions beyond): ask for fewer")
        if num_return_sequences > 1:
            options["num_return_sequences"] = num_return_sequences
        captions = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start:start + batch_size]]
            pixel_values = self.image_processor(images=batch, return_tensors="pt").pixel_values
            generated = self.model.generate(pixel_values=pixel_values.to(self.model.device), **options)
            captions += [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        return captions


def generate_captions(folder: str, images, num_beams: int = 1, max_new_tokens: int | None = None,
                      batch_size: int = 32) -> list[str]:
    """One caption per image, from the captioner saved in `folder`, with plain transformers only."""
    options = {"num_beams": num_beams, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
    return TrainedCaptioner(folder).generate(images, batch_size=batch_size, **options)


__all__ = ["CAPTIONER_FOLDER", "CaptionDecoder", "CaptionTokens", "TrainedCaptioner", "build_captioner",
           "caption_image_index", "caption_labels", "caption_loss_sum", "captioner_folder", "generate_captions",
           "greedy_captions", "patch_tokens_of", "save_captioner"]
