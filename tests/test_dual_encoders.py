"""Native transformers dual encoders (SiglipModel, Siglip2Model with NaFlex inputs, CLIPModel) through SiglipTrainer,
the command line and evaluation, checked against the native models themselves. Tiny random models and processors
are built and saved locally; nothing is downloaded."""

import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2Processor,
    SiglipConfig,
    SiglipModel,
)

import hf_siglip as hs
from cli_helpers import TINY, cli_env, flags, run_train, warning_lines
from hf_siglip.cli.main import main as cli_main
from hf_siglip.data.embedding import add_image_embeddings
from hf_siglip.dual_encoders import (
    CLIPDualEncoder,
    Siglip2DualEncoder,
    SiglipDualEncoder,
    as_dual_encoder,
    load_dual_encoder,
    tower_modules,
)
from hf_siglip.hub import usage_code
from hf_siglip.training.trainer import MODEL_INPUTS

KINDS = ("siglip", "siglip2", "clip")
NATIVE_CLASSES = {"siglip": SiglipModel, "siglip2": Siglip2Model, "clip": CLIPModel}
ADAPTER_CLASSES = {"siglip": SiglipDualEncoder, "siglip2": Siglip2DualEncoder, "clip": CLIPDualEncoder}
MAX_LENGTH = 12
IMAGE_SIZE = 16  # the tiny demo's images
# NaFlex at Siglip2Processor's own defaults (released checkpoints' values): called as `processor(images=...)` it
# imposes them over whatever its image processor holds
NAFLEX_PATCH_SIZE, NAFLEX_PATCHES = 16, 256
TOWER_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
# fp32 on CPU; the adapter runs the very same tower code (measured: bit-identical, 0.0 on every kind)
EMBEDDING_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def demo():
    return hs.make_demo_dataset(n_train=32, n_test=16, n_captions=2, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def tokenizer(demo):
    captions = [caption for row in demo["train"]["caption"] for caption in row]
    return hs.train_caption_tokenizer(captions, vocab_size=200, model_max_length=MAX_LENGTH)


def build_processor(kind: str, tokenizer):
    """`kind`'s processor with its PIL image processor."""
    if kind == "clip":
        return CLIPProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}))
    if kind == "siglip2":
        return Siglip2Processor(tokenizer=tokenizer, image_processor=Siglip2ImageProcessorPil(
            patch_size=NAFLEX_PATCH_SIZE, max_num_patches=NAFLEX_PATCHES))
    return hs.build_processor(tokenizer, image_size=IMAGE_SIZE)


def build_native(kind: str, tokenizer, seed: int = 0):
    """A random native model of `kind` whose vocabulary and special tokens are `tokenizer`'s."""
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TOWER_SIZES)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=IMAGE_SIZE, patch_size=8,
                                                                          **TOWER_SIZES), projection_dim=24))
    if kind == "siglip2":
        vision = dict(num_patches=NAFLEX_PATCHES, patch_size=NAFLEX_PATCH_SIZE, **TOWER_SIZES)
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(image_size=IMAGE_SIZE, patch_size=8,
                                                                               **TOWER_SIZES)))
    with torch.no_grad():  # native init leaves t' = b = 0; released checkpoints hold trained values
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """kind -> a folder holding a tiny random native model and its processor, as released checkpoints come.

    A processor loads back as the folder's model type (config.json) says: in a Siglip2 folder the tokenizer becomes a
    Siglip2Tokenizer, which pads on the left and adds <bos> and <mask>. So the model is sized for the tokenizer as it
    loads from the folder."""
    folders = {}
    for kind in KINDS:
        folders[kind] = tmp_path_factory.mktemp(kind)
        build_native(kind, tokenizer).config.save_pretrained(folders[kind])
        build_processor(kind, tokenizer).save_pretrained(folders[kind])
        build_native(kind, load_processor(folders[kind]).tokenizer).save_pretrained(folders[kind])
    return folders


def load_native(folder):
    return AutoModel.from_pretrained(folder).eval()


def load_processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def collated(processor, demo, rows=6):
    """A training batch of demo rows plus a wide and a tall image (NaFlex gives them other patch grids)."""
    examples = [demo["train"][index] for index in range(rows)]
    examples += [
        {"image": Image.new("RGB", (40, 16), (200, 30, 30)), "caption": ["a wide red image"], "image_id": 900},
        {"image": Image.new("RGB", (16, 40), (30, 30, 200)), "caption": ["a tall blue image"], "image_id": 901}]
    return hs.SiglipDataCollator(processor=processor, max_length=MAX_LENGTH)(examples)


def model_inputs(batch):
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=1, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                  seed=0, dataloader_drop_last=True)
    return hs.SiglipTrainingArguments(**{**values, **overrides})


def trainer_for(model, processor, dataset, args):
    collator = hs.SiglipDataCollator(processor=processor, max_length=MAX_LENGTH)
    return hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset)


def losses_of(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# --- (a) the trainer's embeddings are the native model's ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_embeddings_equal_the_native_features(kind, checkpoints, demo):
    folder = checkpoints[kind]
    native, processor = load_native(folder), load_processor(folder)
    assert type(native) is NATIVE_CLASSES[kind]
    batch = collated(processor, demo)
    if kind == "siglip2":  # NaFlex for real: patch grids differ per image and padded patches are masked
        assert len({tuple(shape) for shape in batch["spatial_shapes"].tolist()}) == 3
        assert (batch["pixel_attention_mask"] == 0).any() and batch["pixel_values"].ndim == 3
    image_inputs = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")
                    if key in batch}
    texts = [caption for index in range(6) for caption in demo["train"][index]["caption"]]
    texts += ["a wide red image", "a tall blue image"]
    # the native models as their users call them: CLIP with the tokenizer's attention mask (the collator emits none:
    # CLIP's causal text tower pools the first EOS, which right padding never reaches), SigLIP without
    tokens = processor.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt")
    assert torch.equal(tokens["input_ids"], batch["input_ids"])
    text_inputs = {"input_ids": tokens["input_ids"]}
    if kind == "clip":
        text_inputs["attention_mask"] = tokens["attention_mask"]
        assert (tokens["attention_mask"] == 0).any()
    with torch.no_grad():
        expected_images = F.normalize(native.get_image_features(**image_inputs).pooler_output, dim=-1)
        expected_texts = F.normalize(native.get_text_features(**text_inputs).pooler_output, dim=-1)

    adapted = [as_dual_encoder(load_native(folder))]  # in place, as SiglipTrainer does with a model it is given
    if kind != "siglip":  # `hf-siglip train --model_name_or_path` (SigLIP checkpoints load as SiglipBottleneckModel)
        adapted.append(load_dual_encoder(folder).eval())
    for model in adapted:
        assert type(model) is ADAPTER_CLASSES[kind] and isinstance(model, NATIVE_CLASSES[kind])
        with torch.no_grad():
            outputs = model(**model_inputs(batch))
        assert (outputs.image_embeds - expected_images).abs().max().item() <= EMBEDDING_TOLERANCE
        assert (outputs.text_embeds - expected_texts).abs().max().item() <= EMBEDDING_TOLERANCE
        assert outputs.logit_scale.item() == pytest.approx(math.exp(native.logit_scale.item()), rel=1e-6)
        assert outputs.logit_bias.item() == pytest.approx(-10.0)  # CLIP's is new: SigLIP's initial value
        expected_logits = outputs.logit_scale * expected_images @ expected_texts.T + outputs.logit_bias
        assert torch.allclose(outputs.logits_per_image, expected_logits, atol=1e-5)

    if kind != "clip":  # one caption per image: the native sigmoid loss is defined there (CLIP's is a softmax)
        one_caption = {**model_inputs(batch), "input_ids": batch["input_ids"][0:12:2]}
        one_caption = {key: value[:6] if key != "input_ids" else value for key, value in one_caption.items()}
        with torch.no_grad():
            expected_loss = native(**one_caption, return_loss=True).loss
            loss = adapted[0](**one_caption, return_loss=True).loss
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


# --- (b) one training step, (e) locking and optimizer groups, SigLiT caching -------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_one_training_step_changes_the_embeddings(kind, checkpoints, demo, tmp_path):
    model, processor = load_native(checkpoints[kind]), load_processor(checkpoints[kind])
    batch = collated(processor, demo)
    trainer = trainer_for(model, processor, demo["train"], training_args(tmp_path))
    assert trainer.model is model and type(model) is ADAPTER_CLASSES[kind]

    def embed():
        with torch.no_grad():
            outputs = model.eval()(**model_inputs(batch))
        return outputs.image_embeds, outputs.text_embeds, outputs.logit_scale.item(), outputs.logit_bias.item()

    images_before, texts_before, t_before, b_before = embed()
    trainer.train()
    images_after, texts_after, t_after, b_after = embed()
    (loss,) = losses_of(trainer)
    assert math.isfinite(loss) and loss > 0
    assert (images_after - images_before).abs().max().item() > 1e-4
    assert (texts_after - texts_before).abs().max().item() > 1e-4
    assert t_after != t_before and b_after != b_before  # CLIP's new b trains too


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("locked", ["vision", "text"])
def test_a_locked_tower_stays_bit_identical(kind, locked, checkpoints, demo, tmp_path):
    model, processor = load_native(checkpoints[kind]), load_processor(checkpoints[kind])
    other = "text" if locked == "vision" else "vision"
    trainer = trainer_for(model, processor, demo["train"],
                          training_args(tmp_path, max_steps=2, **{f"lock_{locked}_tower": True}))

    def snapshot(tower):
        return {f"{index}.{name}": parameter.detach().clone() for index, module in
                enumerate(tower_modules(model, tower)) for name, parameter in module.named_parameters()}

    locked_before, other_before = snapshot(locked), snapshot(other)
    projection = getattr(model, "visual_projection" if locked == "vision" else "text_projection", None)
    projection_before = None if projection is None else projection.weight.detach().clone()
    modes = []
    for module in tower_modules(model, locked):
        module.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.train()
    assert all(torch.equal(parameter, locked_before[name]) for name, parameter in snapshot(locked).items())
    assert any(not torch.equal(parameter, other_before[name]) for name, parameter in snapshot(other).items())
    assert modes and not any(modes)  # locked towers run in eval mode although the Trainer sets train mode
    if kind == "clip":  # CLIP's projection belongs to its tower: the embedding a locked tower gives stays fixed
        assert torch.equal(projection.weight, projection_before)


@pytest.mark.parametrize("kind", KINDS)
def test_pretrained_towers_get_no_weight_decay_and_a_tenth_of_the_learning_rate(kind, checkpoints, demo, tmp_path):
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=1e-3, weight_decay=0.1)
    model, processor = load_native(checkpoints[kind]), load_processor(checkpoints[kind])
    optimizer = trainer_for(model, processor, demo["train"], args).create_optimizer()
    group_of = {id(parameter): group for group in optimizer.param_groups for parameter in group["params"]}
    tower_parameters = {id(parameter) for tower in ("text", "vision") for module in tower_modules(model, tower)
                        for parameter in module.parameters()}
    for name, parameter in model.named_parameters():
        group = group_of[id(parameter)]
        if id(parameter) in tower_parameters:  # CLIP's projections included
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(1e-4), 0.0), name
        else:  # t and b: full learning rate, never decayed
            assert name in ("logit_scale", "logit_bias")
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(1e-3), 0.0), name
    assert len(group_of) == len(list(model.parameters()))

    fresh = build_native(kind, processor.tokenizer)  # built from a config, not loaded: every weight is new
    optimizer = trainer_for(fresh, processor, demo["train"], args).create_optimizer()
    weight = dict(fresh.named_parameters())["vision_model.encoder.layers.0.mlp.fc1.weight"]
    group = next(group for group in optimizer.param_groups if any(p is weight for p in group["params"]))
    assert (group["lr"], group["weight_decay"]) == (pytest.approx(1e-3), 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_image_embeddings_train_exactly_like_the_locked_tower(kind, checkpoints, demo, tmp_path):
    """SigLiT: with the vision tower locked, precomputed image embeddings give the very same step without running it."""
    losses, text_weights = {}, {}
    for source in ("images", "cache"):
        model, processor = load_native(checkpoints[kind]), load_processor(checkpoints[kind])
        dataset = demo["train"]
        calls = []
        if source == "cache":
            dataset = add_image_embeddings(dataset, as_dual_encoder(model), processor).remove_columns("image")
            model.vision_model.register_forward_pre_hook(lambda module, args: calls.append(1))
        # SGD: its step is proportional to the gradient (Adam's first step is about its sign, which rounding can flip)
        trainer = trainer_for(model, processor, dataset,
                              training_args(tmp_path / source, lock_vision_tower=True, optim="sgd", learning_rate=0.1))
        trainer.train()
        assert not calls
        losses[source] = losses_of(trainer)[0]
        text_weights[source] = torch.cat([p.detach().flatten() for p in model.text_model.parameters()])
    assert losses["cache"] == pytest.approx(losses["images"], abs=1e-5)
    assert torch.allclose(text_weights["cache"], text_weights["images"], atol=1e-6)  # measured: <= 3e-8
    untrained = torch.cat([p.detach().flatten() for p in load_native(checkpoints[kind]).text_model.parameters()])
    assert not torch.allclose(text_weights["cache"], untrained, atol=1e-4)  # the step did move the text tower


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_equals_the_large_batch(kind, checkpoints, demo, tmp_path):
    """The embedding-cache path (t and b fed back into the graph) with each model's t and b (CLIP's t is 0-d)."""
    weights = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        model, processor = load_native(checkpoints[kind]), load_processor(checkpoints[kind])
        args = training_args(tmp_path / str(accumulation), optim="sgd", learning_rate=0.1, max_grad_norm=0.0,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        trainer_for(model, processor, demo["train"], args).train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (weights[0] - weights[1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_saves_the_native_checkpoint(kind, checkpoints, tmp_path):
    model = as_dual_encoder(load_native(checkpoints[kind]))
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(tmp_path)
    assert type(model) is ADAPTER_CLASSES[kind]  # still the adapter after saving as the native class
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [NATIVE_CLASSES[kind].__name__]
    plain, info = NATIVE_CLASSES[kind].from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    native_weights = dict(plain.named_parameters())
    assert all(torch.equal(parameter, native_weights[name]) for name, parameter in model.named_parameters()
               if name != "logit_bias" or kind != "clip")
    bias = plain.config.logit_bias if kind == "clip" else plain.logit_bias.item()  # CLIP: config.json holds b
    assert bias == pytest.approx(-7.5)


def test_clip_bias_lives_in_config_json_and_survives_a_resume(checkpoints, demo, tmp_path, caplog):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2)
    processor = load_processor(checkpoints["clip"])
    full_model = load_native(checkpoints["clip"])
    trainer_for(full_model, processor, demo["train"], training_args(tmp_path, **common)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved_bias = json.loads((checkpoint / "config.json").read_text())["logit_bias"]
    assert saved_bias != -10.0 and "logit_bias" not in load_file(str(checkpoint / "model.safetensors"))

    resumed_model = load_native(checkpoints["clip"])  # b = -10 until the checkpoint's is restored
    resumed = trainer_for(resumed_model, processor, demo["train"], training_args(tmp_path, **common))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "missing keys" not in caplog.text
    assert resumed_model.logit_bias.item() == pytest.approx(full_model.logit_bias.item(), abs=1e-6)
    assert resumed_model.logit_scale.item() == pytest.approx(full_model.logit_scale.item(), abs=1e-6)


# --- (c, d) the command line: train from a native checkpoint, load with plain transformers, evaluate ---------------

LOAD_SCRIPT = """
import json, sys, warnings
import torch
from transformers import AutoModel
trained, source = AutoModel.from_pretrained(sys.argv[1]), AutoModel.from_pretrained(sys.argv[2])
before = dict(source.named_parameters())
changed = [name for name, parameter in trained.named_parameters() if not torch.equal(parameter, before[name])]
print(json.dumps({"class": type(trained).__name__, "module": type(trained).__module__, "changed": changed,
                  "logit_bias": getattr(trained.config, "logit_bias", None)}))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_command_line_trains_a_native_checkpoint_that_plain_transformers_loads(kind, checkpoints, tmp_path):
    output_dir = tmp_path / "trained"
    run = run_train({**TINY, "model_name_or_path": checkpoints[kind], "output_dir": output_dir})
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == [NATIVE_CLASSES[kind].__name__]

    # a process without hf_siglip: AutoModel gives back the native class, with trained weights, and says nothing
    plain = subprocess.run([sys.executable, "-c", "import sys; sys.modules['hf_siglip'] = None\n" + LOAD_SCRIPT,
                            str(output_dir), str(checkpoints[kind])], capture_output=True, text=True, timeout=120,
                           env=cli_env(), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    loaded = json.loads(plain.stdout.strip().splitlines()[-1])
    assert loaded["class"] == NATIVE_CLASSES[kind].__name__ and loaded["module"].startswith("transformers.")
    assert len(loaded["changed"]) > 10 and "logit_scale" in loaded["changed"]
    # transformers' own notice about its default SiglipTextConfig (every SiglipModel checkpoint) is not about us
    assert [line for line in warning_lines(plain.stderr) if "(between 0 and 31999)" not in line] == []
    if kind == "clip":
        assert loaded["logit_bias"] is not None and loaded["logit_bias"] != -10.0  # b trained and saved

    card = (output_dir / "README.md").read_text()
    assert f"saved as `transformers.{NATIVE_CLASSES[kind].__name__}`" in card
    snippet = subprocess.run([sys.executable, "-c", usage_code(card, load_from=output_dir)], cwd=tmp_path, text=True,
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL, env=cli_env())
    assert snippet.returncode == 0, snippet.stderr[-2000:]

    data = {key: TINY[key] for key in ("demo_train_size", "demo_test_size", "demo_image_size")}
    assert cli_main(["eval", "--checkpoint", str(output_dir), "--few_shot", "1", "--output_file",
                     str(tmp_path / "eval.json"), *flags(data)]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["max_length"] == MAX_LENGTH  # the trained length, read back from the saved tokenizer
    for name in ("i2t_recall@1", "t2i_recall@5", "zero_shot_top1", "linear_probe_top1_1shot"):
        assert 0.0 <= metrics[name] <= 1.0, name
    trained_metrics = json.loads((output_dir / "eval_results.json").read_text())["metrics"]
    assert metrics["i2t_recall@1"] == pytest.approx(trained_metrics["eval_i2t_recall@1"])  # same model, same split


# --- the pieces around ---------------------------------------------------------------------------------------------


def test_naflex_collator_decodes_jpegs_in_full_and_keeps_empty_batches(checkpoints):
    processor = load_processor(checkpoints["siglip2"])
    collator = hs.SiglipDataCollator(processor=processor, max_length=MAX_LENGTH)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 200, 10)).save(jpeg, format="JPEG")
    batch = collator([{"image": {"bytes": jpeg.getvalue(), "path": None}, "caption": "a green image", "image_id": 1}])
    # NaFlex has no fixed output size to decode a JPEG down to (that divided by zero): it is decoded in full
    expected = processor.image_processor(images=[Image.open(jpeg).convert("RGB")], return_tensors="pt")
    assert batch["spatial_shapes"].tolist() == expected["spatial_shapes"].tolist() == [[11, 22]]
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], expected["pixel_attention_mask"])

    empty = collator([{"image": b"not an image", "caption": "broken", "image_id": 2}])
    patch_pixels = NAFLEX_PATCH_SIZE ** 2 * 3
    assert empty["pixel_values"].shape == (0, NAFLEX_PATCHES, patch_pixels)
    assert empty["pixel_values"].dtype == torch.float32
    assert empty["pixel_attention_mask"].shape == (0, NAFLEX_PATCHES) and empty["spatial_shapes"].shape == (0, 2)
    assert empty["image_ids"].shape == (0,) and empty["input_ids"].shape == (0, MAX_LENGTH)


@pytest.mark.parametrize("kind", ["siglip2", "clip"])
def test_push_uploads_the_native_format_offline(kind, checkpoints):
    from unittest import mock

    from huggingface_hub import HfApi

    uploaded = {}

    def fake_commit(*args, operations, **kwargs):  # the upload folder is temporary: read files while committing
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as file:
                uploaded[operation.path_in_repo] = file.read()

    with mock.patch.object(HfApi, "create_repo"), mock.patch("hf_siglip.hub.check_hub_access"), \
            mock.patch.object(HfApi, "create_commit", side_effect=fake_commit):
        assert cli_main(["push", str(checkpoints[kind]), "someone/tiny"]) == 0
    config = json.loads(uploaded["config.json"])
    assert config["architectures"] == [NATIVE_CLASSES[kind].__name__] and not any(n.endswith(".py") for n in uploaded)
    assert f"`{NATIVE_CLASSES[kind].__name__}.from_pretrained" in uploaded["README.md"].decode()
    assert {"model.safetensors", "processor_config.json", "tokenizer.json"} <= set(uploaded)
    if kind == "clip":
        assert config["logit_bias"] == -10.0


def test_only_dual_encoders_load(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path / "bert")
    message = ("model type 'bert'; hf-siglip trains the dual encoders ['clip', 'siglip', 'siglip2', "
               "'siglip_bottleneck', 'vision-text-dual-encoder']")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_dual_encoder(str(tmp_path / "bert"))
    # the command line: one line while checking its arguments, exit status 2
    assert cli_main(["train", "--model_name_or_path", str(tmp_path / "bert"),
                     "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
