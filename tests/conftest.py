"""Shared fixtures: tiny random SigLIP models saved locally (nothing is downloaded)."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental download fails fast instead of hanging

TINY_TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
)


def tiny_text_config(**overrides) -> dict:
    return {**TINY_TEXT, **overrides}


def tiny_vision_config(**overrides) -> dict:
    return {**TINY_VISION, **overrides}


def random_batch(batch_size=3, seq_len=16, vocab_size=99, image_size=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return input_ids, pixel_values


@pytest.fixture(scope="session")
def native_checkpoint(tmp_path_factory):
    """A tiny random native `transformers.SiglipModel` saved the way google/siglip-* checkpoints are."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config()))
    with torch.no_grad():  # native init leaves t'=b=0; give them released-checkpoint-like values
        model.logit_scale.fill_(4.7)
        model.logit_bias.fill_(-12.0)
    path = tmp_path_factory.mktemp("native_siglip")
    model.save_pretrained(path)
    return path


def tiny_training_setup(n_train=64, n_test=32, image_size=16, seed=0, **config_overrides):
    """(model, processor, collator, dataset) for trainer tests: a 1-layer SigLIP on the demo data."""
    import hf_siglip as hs

    torch.manual_seed(seed)
    dataset = hs.make_demo_dataset(n_train=n_train, n_test=n_test, n_captions=2, image_size=image_size, seed=seed)
    captions = [caption for row in dataset["train"]["caption"] for caption in row]
    tokenizer = hs.train_caption_tokenizer(captions, vocab_size=200, model_max_length=12)
    processor = hs.build_processor(tokenizer, image_size=image_size)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    config = hs.SiglipBottleneckConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=12, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, **common),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
        **config_overrides,
    )
    model = hs.SiglipBottleneckModel(config)
    collator = hs.SiglipDataCollator(processor=processor, max_length=12, caption_column="caption")
    return model, processor, collator, dataset


def open_clip_siglip_loss_class():
    """open_clip's SigLipLoss (the test oracle), loaded from its loss.py: `import open_clip` needs torchvision,
    which is not installed beside CPU torch. None when open_clip_torch is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SigLipLoss
