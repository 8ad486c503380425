"""Shared fixtures: tiny random SigLIP models saved locally (nothing is downloaded)."""

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
