"""SiglipBottleneckModel against native transformers.SiglipModel: loading, parity, round trips, bottleneck."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, SiglipModel

from conftest import random_batch, tiny_text_config, tiny_vision_config
from hf_siglip import (
    BottleneckTokenEmbedding,
    SiglipBottleneckConfig,
    SiglipBottleneckModel,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)


def tiny_config(**text_overrides) -> SiglipBottleneckConfig:
    return SiglipBottleneckConfig(text_config=tiny_text_config(**text_overrides), vision_config=tiny_vision_config())


@torch.no_grad()
def assert_same_outputs(model_a, model_b, atol=1e-5):
    input_ids, pixel_values = random_batch()
    a = model_a(input_ids=input_ids, pixel_values=pixel_values)
    b = model_b(input_ids=input_ids, pixel_values=pixel_values)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        diff = (getattr(a, name) - getattr(b, name)).abs().max().item()
        assert diff <= atol, f"{name} differs by {diff}"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_native_checkpoint_loads_with_identical_outputs(native_checkpoint, attn_implementation):
    native = SiglipModel.from_pretrained(native_checkpoint, attn_implementation=attn_implementation).eval()
    ours, info = SiglipBottleneckModel.from_pretrained(
        native_checkpoint, attn_implementation=attn_implementation, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ours.pretrained_towers == {"text", "vision"}
    assert_same_outputs(native, ours.eval())

    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        text_native = native.get_text_features(input_ids=input_ids).pooler_output
        text_ours = ours.get_text_features(input_ids=input_ids).pooler_output
        image_native = native.get_image_features(pixel_values=pixel_values).pooler_output
        image_ours = ours.get_image_features(pixel_values=pixel_values).pooler_output
    assert torch.allclose(text_native, text_ours, atol=1e-5, rtol=0)
    assert torch.allclose(image_native, image_ours, atol=1e-5, rtol=0)
    normalized = ours.get_image_features(pixel_values=pixel_values, normalize=True).pooler_output
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(len(pixel_values)))


def test_loss_matches_native_siglip_loss(native_checkpoint):
    native = SiglipModel.from_pretrained(native_checkpoint).eval()
    ours = SiglipBottleneckModel.from_pretrained(native_checkpoint).eval()
    input_ids, pixel_values = random_batch(batch_size=5)
    with torch.no_grad():
        expected = native(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
        got = ours(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_save_without_bottleneck_loads_in_plain_transformers(native_checkpoint, tmp_path):
    ours = SiglipBottleneckModel.from_pretrained(native_checkpoint).eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    plain, info = SiglipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_outputs(ours, plain.eval(), atol=0.0)


def test_new_heads_start_at_paper_values_and_are_configurable():
    model = SiglipBottleneckModel(tiny_config())
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == pytest.approx(-10.0)
    config = SiglipBottleneckConfig(
        text_config=tiny_text_config(), vision_config=tiny_vision_config(),
        logit_scale_init_value=0.5, logit_bias_init_value=-3.0,
    )
    model = SiglipBottleneckModel(config)
    assert (model.logit_scale.item(), model.logit_bias.item()) == (pytest.approx(0.5), pytest.approx(-3.0))


def test_bottleneck_never_allocates_full_table_and_round_trips(tmp_path):
    vocab, width, k = 99, 32, 8
    model = SiglipBottleneckModel(tiny_config(bottleneck_dim=k)).eval()
    assert isinstance(model.text_model.embeddings.token_embedding, BottleneckTokenEmbedding)
    # the id-indexed part is the input embedding (what resize_token_embeddings resizes); the projection stays apart
    assert model.get_input_embeddings() is model.text_model.embeddings.token_embedding.table
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert (vocab, width) not in shapes and (vocab, k) in shapes and (width, k) in shapes
    plain = SiglipBottleneckModel(tiny_config())
    assert plain.num_parameters() - model.num_parameters() == vocab * width - (vocab * k + k * width)

    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, SiglipBottleneckModel)
    assert reloaded.config.text_config.bottleneck_dim == k
    assert_same_outputs(model, reloaded.eval(), atol=0.0)


def test_bottleneck_embedding_is_table_times_projection():
    model = SiglipBottleneckModel(tiny_config(bottleneck_dim=8))
    embedding = model.text_model.embeddings.token_embedding
    ids = torch.tensor([[0, 5, 98]])
    expected = embedding.table.weight[ids] @ embedding.projection.weight.T
    assert torch.allclose(embedding(ids), expected)


def test_towers_alone_load_from_full_checkpoint(native_checkpoint):
    full = SiglipBottleneckModel.from_pretrained(native_checkpoint).eval()
    text = SiglipBottleneckTextModel.from_pretrained(native_checkpoint).eval()
    vision = SiglipBottleneckVisionModel.from_pretrained(native_checkpoint).eval()
    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        assert torch.equal(text(input_ids=input_ids).pooler_output, full.get_text_features(input_ids).pooler_output)
        assert torch.equal(
            vision(pixel_values=pixel_values).pooler_output, full.get_image_features(pixel_values).pooler_output
        )


def test_vision_backbone_from_any_pretrained_hf_model(native_checkpoint, tmp_path):
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=30,
                             image_size=30, patch_size=6)).eval()
    vit.save_pretrained(tmp_path / "vit")
    model = SiglipBottleneckModel.from_vision_text_pretrained(tmp_path / "vit", native_checkpoint).eval()
    assert model.pretrained_towers == {"vision", "text"}
    assert model.visual_projection.weight.shape == (32, 24)
    assert torch.equal(model.vision_model.embeddings.cls_token, vit.embeddings.cls_token)

    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values)
        expected = model.visual_projection(vit(pixel_values=pixel_values).pooler_output)
    assert out.logits_per_image.shape == (3, 3)
    assert torch.allclose(out.image_embeds, torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)

    model.save_pretrained(tmp_path / "dual")
    reloaded = AutoModel.from_pretrained(tmp_path / "dual").eval()
    assert reloaded.config.vision_config.model_type == "vit"
    assert_same_outputs(model, reloaded, atol=0.0)
    tower = SiglipBottleneckVisionModel.from_pretrained(tmp_path / "dual").eval()  # the ViT tower alone, projected
    assert tower.config.model_type == "vit" and tower.config.projection_size == 32
    with torch.no_grad():
        assert torch.equal(tower(pixel_values).pooler_output, model.get_image_features(pixel_values).pooler_output)

    fresh_text = SiglipBottleneckModel.from_vision_text_pretrained(
        tmp_path / "vit", text_config=tiny_text_config(bottleneck_dim=4)
    )
    assert fresh_text.pretrained_towers == {"vision"}


def test_gradient_checkpointing_gives_same_gradients(native_checkpoint):
    input_ids, pixel_values = random_batch(batch_size=4)
    grads = []
    for checkpointing in (False, True):
        model = SiglipBottleneckModel.from_pretrained(native_checkpoint)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.text_model.encoder.layers[0].gradient_checkpointing
        model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dtype_is_respected(native_checkpoint):
    model = SiglipBottleneckModel.from_pretrained(native_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values.bfloat16(), return_loss=True)
    assert torch.isfinite(out.loss)


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bottleneck_dim", [0, -4, 32, 64])
def test_bad_bottleneck_dim_is_refused(bottleneck_dim):
    with pytest.raises(ValueError, match="bottleneck_dim"):
        tiny_config(bottleneck_dim=bottleneck_dim)


def test_mismatched_projection_sizes_are_refused():
    with pytest.raises(ValueError, match="Mismatched projection sizes"):
        SiglipBottleneckConfig(
            text_config=tiny_text_config(projection_size=16), vision_config=tiny_vision_config()
        )


@pytest.mark.parametrize(
    "shape, message",
    [((3, 30, 30), "shape"), ((2, 1, 30, 30), "shape"), ((2, 3, 32, 32), "pixels")],
)
def test_wrong_pixel_values_shape_is_refused(shape, message):
    model = SiglipBottleneckModel(tiny_config())
    with pytest.raises(ValueError, match=message):
        model.get_image_features(torch.zeros(shape))


def test_input_ids_outside_vocabulary_are_refused():
    model = SiglipBottleneckModel(tiny_config(bottleneck_dim=8))
    input_ids, pixel_values = random_batch()
    input_ids[1, 3] = 99
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 99\)"):
        model(input_ids=input_ids, pixel_values=pixel_values)


def test_checkpoint_of_unknown_model_type_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'bert'"):
        SiglipBottleneckModel.from_pretrained(tmp_path)


def test_auto_classes_know_the_model():
    config = AutoConfig.for_model("siglip_bottleneck", text_config=tiny_text_config(),
                                  vision_config=tiny_vision_config())
    assert isinstance(AutoModel.from_config(config), SiglipBottleneckModel)
