"""`torch.export.export` and `torch.compile(fullgraph=True)` of each tower and of the dual encoder (CPU, tiny sizes),
bottleneck off and on; `resize_token_embeddings` of the bottleneck table.

`torch.compile` runs with the `aot_eager` backend: it traces forward and backward into one graph each (fullgraph=True
fails on any graph break) without the minutes a C++ inductor build takes on a 2-core CPU.
"""

import pytest
import torch
from transformers import SiglipVisionConfig

from conftest import random_batch, tiny_text_config, tiny_vision_config
from hf_siglip import (
    BottleneckTokenEmbedding,
    SiglipBottleneckConfig,
    SiglipBottleneckModel,
    SiglipBottleneckTextConfig,
    SiglipBottleneckTextModel,
    SiglipBottleneckVisionModel,
)

BOTTLENECK = [pytest.param(None, id="plain"), pytest.param(8, id="bottleneck")]


def dual_model(bottleneck_dim):
    torch.manual_seed(0)
    config = SiglipBottleneckConfig(text_config=tiny_text_config(bottleneck_dim=bottleneck_dim),
                                    vision_config=tiny_vision_config())
    return SiglipBottleneckModel(config).eval()


def assert_export_and_compile_match(model, inputs: dict, names: tuple[str, ...]):
    with torch.no_grad():
        expected = model(**inputs)
        exported = torch.export.export(model, args=(), kwargs=inputs)
        from_export = exported.module()(**inputs)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        from_compile = compiled(**inputs)
    for name in names:
        torch.testing.assert_close(getattr(from_export, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(from_compile, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    return exported


@pytest.mark.parametrize("bottleneck_dim", BOTTLENECK)
def test_text_tower_exports_and_compiles(bottleneck_dim):
    torch.manual_seed(0)
    model = SiglipBottleneckTextModel(SiglipBottleneckTextConfig(**tiny_text_config(bottleneck_dim=bottleneck_dim)))
    input_ids, _ = random_batch()
    exported = assert_export_and_compile_match(model.eval(), {"input_ids": input_ids},
                                               ("last_hidden_state", "pooler_output"))
    # the exported graph reads no token id back to the host (no data-dependent guard from the vocabulary check)
    assert "_local_scalar_dense" not in str(exported.graph)


def test_vision_tower_exports_and_compiles():
    torch.manual_seed(0)
    model = SiglipBottleneckVisionModel(SiglipVisionConfig(**tiny_vision_config())).eval()
    _, pixel_values = random_batch()
    assert_export_and_compile_match(model, {"pixel_values": pixel_values}, ("last_hidden_state", "pooler_output"))


@pytest.mark.parametrize("bottleneck_dim", BOTTLENECK)
def test_dual_encoder_exports_and_compiles(bottleneck_dim):
    input_ids, pixel_values = random_batch()
    exported = assert_export_and_compile_match(
        dual_model(bottleneck_dim), {"input_ids": input_ids, "pixel_values": pixel_values},
        ("logits_per_image", "text_embeds", "image_embeds", "logit_scale", "logit_bias"))
    assert "_local_scalar_dense" not in str(exported.graph)


def test_compiled_dual_encoder_gives_eager_gradients():
    """Forward and backward of the compiled model (the loss itself, hf_siglip.loss, is computed outside the graph:
    its term selection is Python the compiler does not trace in one piece)."""
    input_ids, pixel_values = random_batch(batch_size=4)
    gradients = []
    for compiled in (False, True):
        model = dual_model(8).train()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        logits = run(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
        labels = 2 * torch.eye(4) - 1
        (-torch.nn.functional.logsigmoid(labels * logits).sum() / 4).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-6)


def test_eager_forward_still_refuses_ids_outside_the_vocabulary():
    model = dual_model(8)
    input_ids, pixel_values = random_batch()
    input_ids[0, 0] = 99
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 99\).*resize_token_embeddings"):
        model(input_ids=input_ids, pixel_values=pixel_values)


def test_resize_token_embeddings_grows_the_bottleneck_table_and_keeps_the_projection(tmp_path):
    model = dual_model(8)
    embedding = model.text_model.embeddings.token_embedding
    projection, old_rows = embedding.projection.weight.detach().clone(), embedding.table.weight.detach().clone()
    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image

    table = model.resize_token_embeddings(109)  # ten added tokens
    assert table is model.get_input_embeddings() and table.weight.shape == (109, 8)
    assert isinstance(model.text_model.embeddings.token_embedding, BottleneckTokenEmbedding)
    assert torch.equal(model.text_model.embeddings.token_embedding.projection.weight, projection)
    assert torch.equal(table.weight[:99], old_rows)
    assert model.config.text_config.vocab_size == 109 and model.text_model.config.vocab_size == 109
    # transformers' default (mean_resizing): new rows drawn around the old rows' mean, so finite and near it
    new_rows = table.weight[99:].detach()
    assert torch.isfinite(new_rows).all() and not torch.equal(new_rows[0], new_rows[1])
    assert (new_rows.mean(0) - old_rows.mean(0)).abs().max() < 3 * old_rows.std(0).max()

    with torch.no_grad():  # old ids give the same outputs; the new ids are accepted
        assert torch.equal(model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image, before)
        input_ids[:, 0] = 108
        model(input_ids=input_ids, pixel_values=pixel_values)
    model.save_pretrained(tmp_path)
    reloaded = SiglipBottleneckModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.text_config.vocab_size == 109
    assert torch.equal(reloaded.get_input_embeddings().weight, table.weight)

    shrunk = model.resize_token_embeddings(90, mean_resizing=False)
    assert shrunk.weight.shape == (90, 8) and torch.equal(shrunk.weight, old_rows[:90])
