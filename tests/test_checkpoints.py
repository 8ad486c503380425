"""Conversion to bottleneck embeddings, trust_remote_code loading, processors, and offline Hub pushes."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModel, AutoProcessor, SiglipConfig, SiglipModel

from conftest import random_batch, tiny_text_config, tiny_vision_config
from hf_siglip import SiglipBottleneckConfig, SiglipBottleneckModel
from hf_siglip.cli.main import main as cli_main
from hf_siglip.convert import convert_to_bottleneck
from hf_siglip.hub import push_to_hub
from hf_siglip.processing import build_processor, train_caption_tokenizer

CAPTIONS = [f"a {size} {color} {shape} on the {side}" for size in ("small", "big") for color in ("red", "green", "blue")
            for shape in ("circle", "square", "triangle") for side in ("left", "right")]


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_caption_tokenizer(CAPTIONS, vocab_size=99, model_max_length=16), image_size=30)


def test_convert_reports_the_true_reconstruction_error(native_checkpoint, tmp_path, capsys):
    assert cli_main(["convert", str(native_checkpoint), str(tmp_path / "k8"), "--bottleneck-dim", "8"]) == 0
    printed = capsys.readouterr().out
    reported = float(printed.split("||E||_F = ")[1].split()[0])

    table = SiglipModel.from_pretrained(native_checkpoint).get_input_embeddings().weight.detach()
    converted = AutoModel.from_pretrained(tmp_path / "k8")
    assert isinstance(converted, SiglipBottleneckModel) and converted.config.text_config.bottleneck_dim == 8
    embedding = converted.text_model.embeddings.token_embedding
    rebuilt = embedding.table.weight @ embedding.projection.weight.T
    actual = ((table - rebuilt).norm() / table.norm()).item()
    assert reported == pytest.approx(actual, abs=1e-5)
    # A random 99 x 32 table keeps well under all its energy in 8 of 32 directions, but SVD beats chance.
    assert 0.0 < actual < 1.0 and actual < (1 - 8 / 32) ** 0.5
    assert "parameters:" in printed


def test_convert_of_a_low_rank_table_keeps_outputs(tmp_path):
    torch.manual_seed(1)
    native = SiglipModel(SiglipConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config())).eval()
    with torch.no_grad():  # make the token table exactly rank 6
        native.get_input_embeddings().weight.copy_(torch.randn(99, 6) @ torch.randn(6, 32) / 4)
    native.save_pretrained(tmp_path / "native")
    model, result = convert_to_bottleneck(tmp_path / "native", tmp_path / "k6", 6)
    assert result.relative_error < 1e-5
    assert result.parameters_before - result.parameters_after == 99 * 32 - (99 * 6 + 6 * 32)
    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        expected = native(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
        reloaded = AutoModel.from_pretrained(tmp_path / "k6")
        got = reloaded(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
    assert torch.allclose(expected, got, atol=1e-4)


def test_convert_refuses_bad_dims(native_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="bottleneck-dim"):
        convert_to_bottleneck(native_checkpoint, tmp_path / "bad", 32)
    convert_to_bottleneck(native_checkpoint, tmp_path / "k4", 4)
    with pytest.raises(ValueError, match="already uses bottleneck"):
        convert_to_bottleneck(tmp_path / "k4", tmp_path / "again", 2)


def test_checkpoint_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = SiglipBottleneckModel(SiglipBottleneckConfig(
        text_config=tiny_text_config(bottleneck_dim=8), vision_config=tiny_vision_config())).eval()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("SiglipBottleneckModel")
    input_ids, pixel_values = random_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
    torch.save({"input_ids": input_ids, "pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")

    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_siglip"] = None  # any `import hf_siglip` now fails: the package is not importable
        import torch
        from transformers import AutoModel
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("hf_siglip"), type(model).__module__
        with torch.no_grad():
            got = model(input_ids=io["input_ids"], pixel_values=io["pixel_values"]).logits_per_image
        print("MAXDIFF", (got - io["expected"]).abs().max().item(), type(model).__module__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         # the parent's thread count: another count sums in another order (1e-6 apart)
                         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("MAXDIFF"))
    assert float(line.split()[1]) == 0.0
    assert "transformers_modules" in line


def test_trained_tokenizer_and_processor_round_trip(processor, tmp_path):
    tokenizer = processor.tokenizer
    encoded = tokenizer(["a small red circle"], padding="max_length", max_length=16)["input_ids"][0]
    assert len(encoded) == 16 and tokenizer.eos_token_id in encoded and encoded[-1] == tokenizer.pad_token_id
    assert tokenizer.unk_token_id not in encoded
    assert len(tokenizer) <= 99
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    from PIL import Image

    image = Image.new("RGB", (50, 40), (255, 0, 0))
    batch = reloaded(text=["a big blue square"], images=[image], padding="max_length", max_length=16,
                     return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 30, 30) and batch["input_ids"].shape == (1, 16)
    assert reloaded.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "a big blue square"


def test_push_to_hub_uploads_weights_processor_and_card_offline(processor):
    model = SiglipBottleneckModel(SiglipBottleneckConfig(
        text_config=tiny_text_config(), vision_config=tiny_vision_config()))
    uploaded = {}  # the upload folder is temporary: read each file while the commit is being made

    def fake_commit(*args, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as file:
                uploaded[op.path_in_repo] = file.read()

    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch("hf_siglip.hub.check_hub_access"), \
            mock.patch.object(HfApi, "create_commit", side_effect=fake_commit) as commit:
        push_to_hub(model, "someone/tiny-siglip", processor, base_model="google/siglip-base-patch16-224",
                    datasets=["someone/captions"], metrics={"zero_shot_top1": 0.42}, eval_dataset="someone/captions")
    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "someone/tiny-siglip"
    commit.assert_called_once()
    files = set(uploaded)
    # no bottleneck: uploaded as a plain SiglipModel, which needs no code of ours
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "processor_config.json"} <= files
    assert json.loads(uploaded["config.json"])["model_type"] == "siglip" and not any(n.endswith(".py") for n in files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)

    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == "google/siglip-base-patch16-224"
    assert card.data.datasets == ["someone/captions"]
    assert {"siglip", "hf_siglip"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.metrics == ["accuracy"]
    assert card.data.eval_results[0].metric_value == pytest.approx(0.42)
    assert "SiglipModel.from_pretrained" in card.text and "trust_remote_code" not in card.text


def test_push_command_uploads_a_checkpoint_folder(processor, tmp_path, capsys):
    model = SiglipBottleneckModel(SiglipBottleneckConfig(
        text_config=tiny_text_config(), vision_config=tiny_vision_config()))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "create_commit") as commit, \
            mock.patch("hf_siglip.hub.check_hub_access"):
        assert cli_main(["push", str(tmp_path), "someone/pushed", "--base-model", "google/siglip-base-patch16-224",
                         "--dataset", "someone/data"]) == 0
    files = {op.path_in_repo for op in commit.call_args.kwargs["operations"]}
    assert {"model.safetensors", "README.md", "tokenizer.json", "processor_config.json"} <= files
    assert "Pushed" in capsys.readouterr().out


def _push_command(folder, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_siglip", "push", str(folder), "someone/repo"], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("situation, env, message", [
    ("offline", {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}, "offline mode is on (HF_HUB_OFFLINE=1)"),
    ("no token", {"HF_HUB_OFFLINE": "0"}, "not logged in. Run `hf auth login` or set HF_TOKEN"),
    # a closed port on this machine stands for a network without the Hub
    ("no connection", {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "no connection to http://127.0.0.1:9"),
])
def test_push_that_cannot_work_says_so_in_one_line(tmp_path, situation, env, message):
    base = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    run = _push_command(tmp_path / "does-not-matter", {**base, "HF_HOME": str(tmp_path / "home"), **env})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-siglip push: error: cannot push to the Hub: ")
    assert message in lines[0]


def test_training_with_push_to_hub_offline_stops_before_any_work(tmp_path, capsys):
    assert cli_main(["train", "--push_to_hub", "true", "--output_dir", str(tmp_path / "out"), "--hub_model_id",
                     "someone/repo"]) == 2
    assert "offline mode is on" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
