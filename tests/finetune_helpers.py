"""A tiny native SigLIP checkpoint (SiglipModel + processor, 16 x 16 images, 1 layer per tower) for the fine-tuning
tests: resolution change, LoRA and layer-wise lr decay start from it as users start from a released model."""

from pathlib import Path

import pytest
from transformers import SiglipModel

from conftest import tiny_training_setup

# TINY's new-model sizes: a checkpoint brings its own
NEW_MODEL_FLAGS = ("image_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "patch_size")


def save_native_tiny(path: Path) -> Path:
    model, processor, _, _ = tiny_training_setup(image_size=16)
    model.save_pretrained(path / "ours")
    SiglipModel.from_pretrained(path / "ours").save_pretrained(path / "native")
    processor.save_pretrained(path / "native")
    return path / "native"


@pytest.fixture(scope="module")
def native_tiny_checkpoint_16(tmp_path_factory):
    return save_native_tiny(tmp_path_factory.mktemp("native_tiny"))


def checkpoint_flags(values: dict, checkpoint) -> dict:
    """`values` (TINY and overrides) for fine-tuning `checkpoint`: the new-model sizes dropped."""
    return {**{name: value for name, value in values.items() if name not in NEW_MODEL_FLAGS},
            "model_name_or_path": checkpoint}
