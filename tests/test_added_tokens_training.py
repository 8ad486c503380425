"""Fine-tuning with added tokens, as a user does it: a tokenizer with 10 added tokens, `hf-siglip train
--model_name_or_path <bottleneck checkpoint> --tokenizer_name_or_path <that tokenizer>`; the command resizes the
N x K bottleneck table (`resize_token_embeddings`), trains (two steps: the first runs at warmup's zero learning
rate), and saves a model that reloads with the tokenizer."""

import torch
from transformers import AutoProcessor

from cli_helpers import TINY, run_train
from hf_siglip import SiglipBottleneckConfig, SiglipBottleneckModel
from hf_siglip.data.demo import COLOURS, SHAPES
from hf_siglip.processing import build_processor, train_caption_tokenizer

# words of the demo captions that the base tokenizer never saw: they become the added tokens
ADDED = [*SHAPES, *list(COLOURS)[:5]]
BASE_CORPUS = ["a small large on the left right at the top bottom in the centre on a black white grey background",
               "a photo of a drawing of a there is a plain background"] * 20


def bottleneck_checkpoint(folder):
    tokenizer = train_caption_tokenizer(BASE_CORPUS, vocab_size=60, model_max_length=12)
    width = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipBottleneckConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=12, bottleneck_dim=8,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **width),
        vision_config=dict(image_size=16, patch_size=8, **width))
    torch.manual_seed(0)
    SiglipBottleneckModel(config).save_pretrained(folder)
    processor = build_processor(tokenizer, image_size=16)
    processor.save_pretrained(folder)
    return processor


def test_ten_added_tokens_resize_the_bottleneck_table_train_and_reload(tmp_path):
    processor = bottleneck_checkpoint(tmp_path / "base")
    base_vocab = len(processor.tokenizer)
    assert processor.tokenizer.add_tokens(ADDED) == 10
    processor.save_pretrained(tmp_path / "tokenizer")
    base = SiglipBottleneckModel.from_pretrained(tmp_path / "base")

    values = {key: value for key, value in TINY.items()
              if key not in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "patch_size")}
    run = run_train({**values, "max_steps": 2, "model_name_or_path": tmp_path / "base",
                     "tokenizer_name_or_path": tmp_path / "tokenizer", "output_dir": tmp_path / "out"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"the token table now has {base_vocab + 10} rows" in run.stderr

    trained = SiglipBottleneckModel.from_pretrained(tmp_path / "out")
    assert trained.config.text_config.bottleneck_dim == 8
    assert trained.config.text_config.vocab_size == base_vocab + 10
    table = trained.get_input_embeddings().weight
    assert table.shape == (base_vocab + 10, 8) and torch.isfinite(table).all()
    projection = trained.text_model.embeddings.token_embedding.projection.weight
    assert projection.shape == (32, 8)  # kept, and trained:
    assert not torch.equal(projection, base.text_model.embeddings.token_embedding.projection.weight)

    saved = AutoProcessor.from_pretrained(tmp_path / "out")
    assert len(saved.tokenizer) == base_vocab + 10
    ids = saved(text=["a small red circle"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert (ids >= base_vocab).sum() == 2  # "red" and "circle" are added tokens
    with torch.no_grad():
        out = trained.eval()(input_ids=ids, pixel_values=torch.zeros(1, 3, 16, 16))
    assert torch.isfinite(out.logits_per_image).all()
