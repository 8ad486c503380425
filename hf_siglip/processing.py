"""Processors: SigLIP's PIL image processor plus a tokenizer, and training a small tokenizer from captions.

Pretrained SigLIP checkpoints come with their own processor (`AutoProcessor.from_pretrained`). Users who
train from scratch need a tokenizer of their own: `train_caption_tokenizer` fits one with the `tokenizers`
library (no sentencepiece or protobuf needed) and returns a `PreTrainedTokenizerFast` that saves and loads
like any transformers tokenizer.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, SiglipImageProcessorPil, SiglipProcessor

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"


def train_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 8000, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """Train a lower-cased BPE tokenizer on `captions` and wrap it as a `PreTrainedTokenizerFast`.

    Like SigLIP's own tokenizer it appends `</s>` to every text; pad with `padding="max_length"` (SigLIP
    pools the last position and was trained on fixed-length, padded texts). Ids: `<pad>`=0, `</s>`=1,
    `<unk>`=2. `vocab_size` is an upper bound; small corpora give fewer tokens.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    tokenizer.train_from_iterator(captions, trainer=trainer)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
    )


def build_processor(tokenizer, image_size: int = 224) -> SiglipProcessor:
    """A `SiglipProcessor` with the PIL image processor (no torchvision needed) resizing to `image_size`."""
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


__all__ = ["build_processor", "train_caption_tokenizer"]
