"""The model card names the Hub only with Hub ids: its usage snippet loads the pushed repository (a placeholder it
explains before a push), and its metadata leaves local paths out (the text names them)."""

import ast
import subprocess
import sys
from unittest import mock

from huggingface_hub import HfApi, ModelCard

from cli_helpers import TINY, cli_env, flags
from data_fixtures import write_photo_folder
from hf_siglip import SiglipBottleneckConfig, SiglipBottleneckModel
from hf_siglip.cli.main import main as cli_main
from hf_siglip.hub import REPO_ID_PLACEHOLDER, build_model_card, is_hub_id, usage_code


def tiny_model():
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=None, eos_token_id=None)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    return SiglipBottleneckModel(SiglipBottleneckConfig(text_config=text, vision_config=vision))


def test_local_paths_stay_out_of_the_metadata_and_hub_ids_stay_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "skimg").mkdir(parents=True)
    (tmp_path / "ckpts" / "base").mkdir(parents=True)
    assert not is_hub_id("data/skimg") and not is_hub_id(str(tmp_path)) and not is_hub_id("../x")
    assert is_hub_id("google/siglip-base-patch16-224") and is_hub_id("someone/captions") and not is_hub_id(None)
    card = build_model_card(tiny_model(), model_name="out", base_model="ckpts/base",
                            datasets=["data/skimg", "someone/captions"], metrics={"zero_shot_top1": 0.5},
                            eval_dataset=str(tmp_path / "data" / "skimg"))
    card = ModelCard(str(card))  # as the Hub reads it back
    assert card.data.base_model is None and card.data.datasets == ["someone/captions"]
    assert [(r.dataset_type, r.dataset_name) for r in card.data.eval_results] == [("skimg", "skimg")]
    assert str(tmp_path) not in card.content.split("---")[1]  # the YAML header
    assert "Fine-tuned from: `ckpts/base` (a local checkpoint, not a Hub repository)" in card.text
    assert "Data: data/skimg, someone/captions" in card.text
    assert f'from_pretrained("{REPO_ID_PLACEHOLDER}")' in usage_code(card.text)
    assert f"`{REPO_ID_PLACEHOLDER}` stands for the Hub repository" in card.text
    assert 'AutoModel.from_pretrained("path/to/out")' in card.text

    hub = ModelCard(str(build_model_card(tiny_model(), "someone/model", base_model="google/siglip-base-patch16-224",
                                         datasets="someone/captions")))
    assert hub.data.base_model == "google/siglip-base-patch16-224" and hub.data.datasets == ["someone/captions"]
    assert 'from_pretrained("someone/model")' in usage_code(hub.text) and "stands for" not in hub.text
    assert "# model\n" in hub.text and "(a local checkpoint" not in hub.text


def test_trained_card_then_push_loads_the_pushed_repo_and_keeps_the_run(tmp_path, monkeypatch):
    """`hf-siglip train` on a local folder saves a card with the placeholder and Hub-only metadata; `hf-siglip push`
    uploads that card (metrics and settings kept) with the snippet loading the pushed id; both snippets run."""
    monkeypatch.chdir(tmp_path)
    write_photo_folder(tmp_path / "data" / "photos", n_train=8, n_test=8)
    tiny = {key: value for key, value in TINY.items() if not key.startswith("demo_")}
    assert cli_main(["train", "--dataset", "data/photos", *flags({**tiny, "output_dir": "out"})]) == 0
    saved = ModelCard.load(tmp_path / "out" / "README.md")
    assert saved.data.datasets is None and saved.data.base_model is None
    assert {r.dataset_name for r in saved.data.eval_results} == {"photos"}
    assert "- Data: data/photos" in saved.text
    snippet = usage_code(saved.text)
    assert f'from_pretrained("{REPO_ID_PLACEHOLDER}")' in snippet
    run = subprocess.run([sys.executable, "-c", usage_code(saved.text, load_from=tmp_path / "out")], cwd="/",
                         env=cli_env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(ast.literal_eval(run.stdout.strip().splitlines()[-1])) == {"a red square", "a blue circle"}

    uploaded = {}

    def fake_commit(*args, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as file:
                uploaded[op.path_in_repo] = file.read()

    url = mock.Mock(repo_id="someone/photo-siglip")  # a name alone is created under the token's user
    with mock.patch.object(HfApi, "create_repo", return_value=url), mock.patch("hf_siglip.hub.check_hub_access"), \
            mock.patch.object(HfApi, "create_commit", side_effect=fake_commit):
        assert cli_main(["push", "out", "photo-siglip", "--dataset", "someone/photos"]) == 0
    pushed = ModelCard(uploaded["README.md"].decode())
    assert 'from_pretrained("someone/photo-siglip")' in usage_code(pushed.text)
    assert REPO_ID_PLACEHOLDER not in str(pushed) and "stands for" not in pushed.text
    assert pushed.data.datasets == ["someone/photos"] and pushed.data.eval_results == saved.data.eval_results
    assert "- Data: data/photos" in pushed.text and "| global batch | 16 |" in pushed.text
