"""The captioning objective (hf_siglip.objectives.captioning): its loss against transformers' own
`VisionEncoderDecoderModel`, on every dual encoder the trainer adapts; the captioner it saves, loaded and run by plain
transformers in a process that cannot import hf_siglip; and `hf-siglip train` runs with it on: accumulation, two
processes and a killed run resumed from a folder outside output_dir."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    VisionEncoderDecoderModel,
)

import hf_siglip as hs
from cli_helpers import (
    RECIPES,
    TINY,
    cli_env,
    launcher_binary,
    logged_losses,
    run_train,
    train_command,
)
from conftest import tiny_text_config, tiny_vision_config
from hf_siglip.captioner import (
    CaptionTokens,
    build_captioner,
    caption_image_index,
    caption_labels,
    greedy_captions,
)
from hf_siglip.dual_encoders import as_dual_encoder
from hf_siglip.errors import UsageError
from hf_siglip.objectives.captioning import WEIGHTS_NAME, Captioning, CaptioningConfig

TOKENS = CaptionTokens(pad_token_id=0, eos_token_id=1)


def dual_encoder(kind: str):
    torch.manual_seed(0)
    text = tiny_text_config(pad_token_id=0, eos_token_id=1, num_hidden_layers=1)
    if kind == "siglip":
        return as_dual_encoder(SiglipModel(SiglipConfig(text_config=text, vision_config=tiny_vision_config())))
    if kind == "clip":  # its patch tokens include the class token
        text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                "num_attention_heads": 4, "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 2,
                "eos_token_id": 1}
        return as_dual_encoder(CLIPModel(CLIPConfig(text_config=text, vision_config=tiny_vision_config(),
                                                    projection_dim=16)))
    if kind == "bottleneck_vit":  # a foreign ViT tower, narrower than the decoder: projected to its width
        vit = {"model_type": "vit", "hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 1,
               "num_attention_heads": 4, "image_size": 30, "patch_size": 6}
        return hs.SiglipBottleneckModel(hs.SiglipBottleneckConfig(text_config=text, vision_config=vit))
    return hs.SiglipBottleneckModel(hs.SiglipBottleneckConfig(text_config=text, vision_config=tiny_vision_config()))


def caption_batch(seed=0):
    """3 images with 2 captions each: random tokens, EOS (1) at varied places, then padding (0); one caption has no
    stop at all (truncated)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 99, (6, 16), generator=generator)
    for row, eos in enumerate((3, 7, 15, None, 1, 10)):
        if eos is not None:
            input_ids[row, eos] = 1
            input_ids[row, eos + 1:] = 0
    return {"input_ids": input_ids, "pixel_values": torch.randn(3, 3, 30, 30, generator=generator),
            "image_ids": torch.tensor([5, 9, 2]), "text_ids": torch.tensor([5, 5, 9, 9, 2, 2])}


def independent_count(input_ids, max_length) -> int:
    count = 0
    for row in input_ids[:, :max_length].tolist():
        stops = [i for i, token in enumerate(row) if token in (0, 1)]
        count += stops[0] + 1 if stops else len(row)
    return count


def test_labels_keep_the_first_stop_and_ignore_the_rest():
    ids = torch.tensor([[7, 8, 1, 0, 0], [7, 0, 0, 0, 0], [7, 8, 9, 10, 11], [1, 0, 0, 0, 0]])
    assert caption_labels(ids, 5, TOKENS).tolist() == [[7, 8, 1, -100, -100], [7, 0, -100, -100, -100],
                                                      [7, 8, 9, 10, 11], [1, -100, -100, -100, -100]]
    assert caption_labels(ids, 2, TOKENS).tolist() == [[7, 8], [7, 0], [7, 8], [1, -100]]  # truncated
    same = CaptionTokens(pad_token_id=1, eos_token_id=1)  # SigLIP's tokenizer pads with its EOS
    assert same.start == 1 and same.stops == (1,)
    assert caption_labels(torch.tensor([[7, 1, 1, 1]]), 4, same).tolist() == [[7, 1, -100, -100]]
    # each row's captions follow one another in row order; neighbouring rows may share an id
    assert caption_image_index(torch.tensor([4, 4, 6]), torch.tensor([4, 4, 4, 6])).tolist() == [0, 0, 0, 2]
    assert caption_image_index(torch.tensor([3, 8]), torch.tensor([3, 3, 8, 8])).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["siglip", "clip", "bottleneck_siglip", "bottleneck_vit"])
def test_loss_sum_is_the_vision_encoder_decoder_token_loss(kind):
    """loss_sum / count = transformers' VisionEncoderDecoderModel loss (mean token CE) on the same vision tower and
    decoder, each caption paired with its own image; label smoothing against the formula on its logits."""
    model = dual_encoder(kind)
    batch = caption_batch()
    plain = Captioning(CaptioningConfig(hidden_size=32, num_attention_heads=2, max_caption_length=12, seed=3), model,
                       None)
    plain.check(model)
    smoothing = 0.1
    smoothed = Captioning(CaptioningConfig(hidden_size=32, num_attention_heads=2, max_caption_length=12, seed=3,
                                           label_smoothing=smoothing), dual_encoder(kind), None)
    smoothed.decoder.load_state_dict(plain.decoder.state_dict())
    assert (plain.decoder.enc_to_dec_proj is not None) == (kind == "bottleneck_vit")
    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    loss_sum, count = plain.loss_sum(outputs, batch), plain.count(batch)
    assert count == independent_count(batch["input_ids"], 12) == 4 + 8 + 12 + 12 + 2 + 11  # EOS at 15 lies beyond 12

    captioner = build_captioner(model.vision_model, plain.decoder, TOKENS, 12)
    own_image = batch["pixel_values"][[0, 0, 1, 1, 2, 2]]
    labels = caption_labels(batch["input_ids"], 12, TOKENS)
    reference = captioner(pixel_values=own_image, labels=labels)
    torch.testing.assert_close(loss_sum / count, reference.loss, rtol=1e-5, atol=1e-6)

    log_probs = reference.logits.float().log_softmax(-1)
    kept = labels != -100
    nll = -log_probs[kept].gather(-1, labels[kept][:, None]).squeeze(-1)
    want = ((1 - smoothing) * nll + smoothing * -log_probs[kept].mean(-1)).sum()
    torch.testing.assert_close(smoothed.loss_sum(outputs, batch), want, rtol=1e-5, atol=1e-5)
    loss_sum.backward()  # the decoder and the vision tower both learn from it
    assert plain.decoder.decoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_model.parameters())


@pytest.mark.parametrize("kind", ["clip", "bottleneck_vit"])  # SigLIP's: the command-line test below
def test_generate_of_the_built_captioner_is_our_greedy_decoding(kind):
    model = dual_encoder(kind)
    objective = Captioning(CaptioningConfig(hidden_size=32, num_attention_heads=2, max_caption_length=6), model, None)
    pixel_values = caption_batch()["pixel_values"]
    ours = greedy_captions(model.vision_model, objective.decoder, pixel_values, TOKENS, 6)
    generated = build_captioner(model.vision_model, objective.decoder, TOKENS, 6).generate(pixel_values)
    assert ours.shape[1] == 7  # a random decoder never stops: start + 6 new tokens
    assert torch.equal(generated, ours)


def test_models_and_data_without_patch_tokens_and_bad_settings_are_refused_in_one_line(tmp_path):
    import datasets
    from transformers import Siglip2Config, Siglip2Model

    naflex_tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_patches": 16, "patch_size": 6}
    nonflex = as_dual_encoder(Siglip2Model(Siglip2Config(text_config=tiny_text_config(), vision_config=naflex_tower)))
    with pytest.raises(UsageError, match="does not support SigLIP 2 NaFlex"):
        Captioning(CaptioningConfig(), nonflex, None).check(nonflex)
    cached = datasets.Dataset.from_dict({"image_embeds": [[0.0] * 32], "caption": ["a red circle"]})
    model = dual_encoder("siglip")
    with pytest.raises(UsageError, match="carry cached image_embeds"):
        Captioning(CaptioningConfig(), model, None, train_dataset=cached).check(model)
    for settings, field in (({"label_smoothing": 1.0}, "label_smoothing"), ({"max_caption_length": 1}, "max_caption"),
                            ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"), ({"weight": -1}, "weight")):
        with pytest.raises(ValueError, match=f"objectives.captioning.{field}"):
            hs.SiglipTrainingArguments(output_dir=str(tmp_path), objectives={"captioning": settings})


SETTINGS = {"hidden_size": 24, "num_attention_heads": 2, "max_caption_length": 10, "seed": 1}
CAPTIONING = {**TINY, "eval_split": "None", "disable_tqdm": "true", "seed": 3, "learning_rate": 3e-3,
              "objectives": json.dumps({"captioning": {"weight": 2.0, "label_smoothing": 0.1, **SETTINGS}})}


def _logged(output_dir, key):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and "train_loss" not in entry]


def _all_weights(output_dir):
    """The dual encoder's weights and the captioner's (its vision tower and decoder)."""
    weights = load_file(str(output_dir / "model.safetensors"))
    captioner = load_file(str(output_dir / "captioner" / "model.safetensors"))
    weights.update({f"captioner/{name}": value for name, value in captioner.items()})
    return weights


def _max_difference(a, b) -> tuple[float, str]:
    """(largest difference, the tensor it is in) between two runs' weights."""
    first, second = _all_weights(a), _all_weights(b)
    assert first.keys() == second.keys()
    return max(((first[name] - second[name]).abs().max().item(), name) for name in first)


BLOCK_HF_SIGLIP = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_siglip" or name.startswith("hf_siglip."):
            raise ImportError("hf_siglip is blocked in this process")
sys.meta_path.insert(0, Block())
"""
BLOCKED_GENERATE = BLOCK_HF_SIGLIP + r"""
import json
from PIL import Image
from transformers import AutoProcessor, VisionEncoderDecoderModel
folder, images = sys.argv[1], sys.argv[2:]
model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
pixel_values = processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"]
ids = model.generate(pixel_values)
print(json.dumps({"ids": ids.tolist(), "captions": processor.batch_decode(ids, skip_special_tokens=True),
                  "blocked": "hf_siglip" not in sys.modules}))
"""


def test_trained_captioner_loads_without_hf_siglip_and_generates_our_greedy_captions(tmp_path):
    out = tmp_path / "out"
    run = run_train({**CAPTIONING, "output_dir": out, "save_strategy": "steps", "save_steps": 2})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not any("caption_decoder" in key for key in load_file(str(out / "model.safetensors")))  # native SigLIP
    assert json.loads((out / "config.json").read_text())["architectures"] == ["SiglipModel"]
    assert all(value > 0 for value in _logged(out, "captioning_loss"))
    assert (out / "checkpoint-2" / WEIGHTS_NAME).exists()

    images = []
    for index, row in enumerate(hs.make_demo_dataset(n_train=1, n_test=4, image_size=16, seed=5)["test"]):
        images.append(str(tmp_path / f"{index}.png"))
        row["image"].save(images[-1])
    result = subprocess.run([sys.executable, "-c", BLOCKED_GENERATE, str(out / "captioner"), *images], env=cli_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["blocked"] and len(plain["captions"]) == 4

    # ours: the dual encoder's vision tower as saved, the decoder from the last checkpoint's side file
    from PIL import Image
    from transformers import AutoProcessor

    model = hs.load_dual_encoder(str(out))
    processor = AutoProcessor.from_pretrained(out)
    objective = Captioning(CaptioningConfig(**SETTINGS), model, None, processing_class=processor)
    objective.load_from(str(out / "checkpoint-2"))
    pixel_values = processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"]
    ours = greedy_captions(model.eval().vision_model, objective.decoder.eval(), pixel_values, objective.tokens, 10)
    assert plain["ids"] == ours.tolist()


def test_accumulation_and_two_processes_equal_one_batch_of_16(tmp_path):
    """8 x 2 accumulated, and 2 gloo processes x 8, against one process x 16: the same losses (pair and captioning)
    and the same weights, the decoder's included (SGD: a weight's difference is the gradients', not Adam's
    normalised noise)."""
    settings = {**CAPTIONING, "max_steps": 3, "use_cpu": "false", "optim": "sgd", "learning_rate": 0.3,
                "lr_scheduler_type": "constant", "warmup_steps": 0}
    one = run_train({**settings, "per_device_train_batch_size": 16, "output_dir": tmp_path / "one"})
    assert one.returncode == 0, one.stderr[-3000:]
    accumulated = run_train({**settings, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                             "output_dir": tmp_path / "accumulated"})
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29661"]
    two = run_train({**settings, "per_device_train_batch_size": 8, "output_dir": tmp_path / "two"}, torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    for key in ("loss", "captioning_loss"):
        want = _logged(tmp_path / "one", key)
        assert len(want) == 3 and want[2] != pytest.approx(want[0], rel=1e-3)  # the steps changed the model
        assert _logged(tmp_path / "accumulated", key) == pytest.approx(want, rel=1e-5), key
        assert _logged(tmp_path / "two", key) == pytest.approx(want, rel=1e-5), key
    assert _max_difference(tmp_path / "accumulated", tmp_path / "one")[0] < 1e-5
    assert _max_difference(tmp_path / "two", tmp_path / "one")[0] < 1e-5


def test_killed_run_resumed_from_another_folder_ends_bit_for_bit(tmp_path):
    settings = {**CAPTIONING, "max_steps": 6, "save_strategy": "steps", "save_steps": 1, "demo_train_size": 48,
                "data_steps": '[{"caption_sampling": {"k": 2}}]'}  # two captions per image: texts != images
    straight = run_train({**settings, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command({**settings, "output_dir": killed}), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-4").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint-4"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    moved = tmp_path / "moved" / "checkpoint-3"  # complete: checkpoint-4 was being written
    shutil.copytree(killed / "checkpoint-3", moved)
    resumed = run_train({**settings, "output_dir": tmp_path / "elsewhere", "resume_from_checkpoint": moved})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the log holds the checkpoint's first 3 steps, then the resumed ones: bit for bit, all 6
    assert logged_losses(tmp_path / "elsewhere") == logged_losses(tmp_path / "straight")
    assert _logged(tmp_path / "elsewhere", "captioning_loss") == _logged(tmp_path / "straight", "captioning_loss")
    assert len(logged_losses(tmp_path / "straight")) == 6
    assert _max_difference(tmp_path / "elsewhere", tmp_path / "straight")[0] == 0.0


def test_a_cached_image_embedding_run_is_refused_before_training(tmp_path):
    run = run_train({**CAPTIONING, "output_dir": tmp_path / "out", "lock_vision_tower": "true",
                     "data_steps": '[{"image_embedding_cache": {}}]'})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "carry cached image_embeds" in run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["siglip2_captioning", "coca_captioning"])
def test_captioning_recipes(name, tmp_path):
    from test_recipes import run_recipe

    output_dir = run_recipe(name, tmp_path)
    assert (output_dir / "captioner" / "generation_config.json").exists()
    VisionEncoderDecoderModel.from_pretrained(output_dir / "captioner")
    # the card's captioning snippet, run as a reader would, without hf_siglip, on the saved folder
    from hf_siglip.hub import usage_code

    card = (output_dir / "README.md").read_text()
    snippet = usage_code(card[card.index("### Captioning"):], load_from=output_dir)
    result = subprocess.run([sys.executable, "-c", BLOCK_HF_SIGLIP + snippet], env=cli_env(), capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() != "", result.stderr[-3000:]
    weight = 2.0 if name == "coca_captioning" else 1.0
    assert f'{{"captioning": {{"weight": {weight}' in (output_dir / "README.md").read_text()
    recipe = (RECIPES / f"{name}.yaml").read_text()
    assert "objectives:" in recipe and "captioning:" in recipe
