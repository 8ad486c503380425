"""Resolution change (hf_siglip.resolution, `hf-siglip train --model_name_or_path DIR --image_size N`): at the
checkpoint's size nothing changes; at a new size the resampled position table gives what transformers' own
`interpolate_pos_encoding=True` forward gives (the independent reference), and the trained model saves and reloads
at the new size in plain transformers."""

import json

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from cli_helpers import TINY, run_train
from finetune_helpers import checkpoint_flags
from hf_siglip.cli.arguments import SiglipModelArguments, SiglipScriptArguments, configuration_problems
from hf_siglip.dual_encoders import as_dual_encoder, load_dual_encoder
from hf_siglip.resolution import change_image_size
from test_dual_encoders import IMAGE_SIZE, checkpoints, demo, load_native, load_processor, tokenizer  # noqa: F401

NEW_SIZE = 2 * IMAGE_SIZE  # a 2 x 2 patch grid becomes 4 x 4
# how each kind loads for training: `hf-siglip train` loads SigLIP as our SiglipBottleneckModel, CLIP as its adapter;
# a native SiglipModel turned into its adapter is the Python route
LOADERS = {"siglip": lambda folder: load_dual_encoder(str(folder)),
           "siglip_adapter": lambda folder: as_dual_encoder(load_native(folder)),
           "clip": lambda folder: load_dual_encoder(str(folder))}


def image_features(model, pixel_values, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs).pooler_output


@pytest.mark.parametrize("route", list(LOADERS))
def test_old_size_is_unchanged_and_new_size_equals_transformers_interpolation(route, checkpoints, demo):
    folder = checkpoints[route.split("_")[0]]
    native, model, processor = load_native(folder), LOADERS[route](folder).eval(), load_processor(folder)
    images = demo["test"]["image"][:4]
    table = model.vision_model.embeddings.position_embedding.weight.detach().clone()

    assert change_image_size(model, IMAGE_SIZE, processor) == IMAGE_SIZE  # the checkpoint's own size: a no-op
    assert torch.equal(model.vision_model.embeddings.position_embedding.weight, table)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    assert torch.equal(image_features(model, pixels), image_features(native, pixels))

    change_image_size(model, NEW_SIZE, processor)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    assert pixels.shape[-2:] == (NEW_SIZE, NEW_SIZE)  # the processor makes the new size
    class_tokens = 1 if route == "clip" else 0
    assert model.vision_model.embeddings.position_embedding.weight.shape[0] == 4 * 4 + class_tokens
    reference = image_features(native, pixels, interpolate_pos_encoding=True)
    # fp32 on CPU: the same bicubic resampling (measured: max difference 0.0)
    assert torch.allclose(image_features(model, pixels), reference, atol=1e-6, rtol=0)
    assert model.config.vision_config.image_size == NEW_SIZE


def test_sizes_that_cannot_apply_are_refused_in_one_line_and_naflex_needs_none(checkpoints):
    def problems(kind, image_size):
        model_args = SiglipModelArguments(model_name_or_path=str(checkpoints[kind]), image_size=image_size)
        return configuration_problems(SiglipScriptArguments(max_length=12), model_args, None)

    assert problems("siglip", NEW_SIZE) == [] and problems("siglip", IMAGE_SIZE) == []
    # NaFlex takes every image at its own size already: the flag is ignored (logged), as before
    assert problems("siglip2", NEW_SIZE) == []
    with pytest.raises(ValueError, match="SigLIP 2 NaFlex .* max_num_patches"):
        change_image_size(load_dual_encoder(str(checkpoints["siglip2"])), NEW_SIZE)
    (odd,) = problems("clip", 20)
    assert "not a multiple of the checkpoint's patch_size 8" in odd and "16 or 24" in odd


def test_hf_siglip_train_at_a_new_size_saves_a_native_model_at_that_size(checkpoints, tmp_path):
    output_dir = tmp_path / "at32"
    run = run_train({**checkpoint_flags({**TINY, "output_dir": output_dir}, checkpoints["siglip"]),
                     "image_size": NEW_SIZE})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"images: {NEW_SIZE} x {NEW_SIZE} (set by --image_size; the checkpoint's 16 x 16 position embeddings " \
           "resampled)" in run.stdout
    model, loading = AutoModel.from_pretrained(output_dir, output_loading_info=True)  # plain transformers
    assert type(model).__name__ == "SiglipModel" and not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.config.vision_config.image_size == NEW_SIZE
    assert model.vision_model.embeddings.position_embedding.weight.shape[0] == (NEW_SIZE // 8) ** 2
    processor = AutoProcessor.from_pretrained(output_dir)
    assert json.loads((output_dir / "processor_config.json").read_text())["image_processor"]["size"] == {
        "height": NEW_SIZE, "width": NEW_SIZE}
    pixels = processor(images=[torch.zeros(3, 16, 16)], return_tensors="pt").pixel_values
    assert pixels.shape[-2:] == (NEW_SIZE, NEW_SIZE)
    assert torch.isfinite(image_features(model.eval(), pixels)).all()
    # it trained: the resampled table moved from where the interpolation put it
    start = load_dual_encoder(str(checkpoints["siglip"]))
    change_image_size(start, NEW_SIZE)
    assert not torch.equal(start.vision_model.embeddings.position_embedding.weight,
                           model.vision_model.embeddings.position_embedding.weight)
