"""The README's Python snippet ("Training in ten lines") runs as written, at tiny sizes: it trains with the recipe's
settings (the same as `hf-siglip train --config siglip_from_scratch`), saves model, processor and card before it
pushes, and its push (offline here) fails without losing the run; with the Hub mocked, the pushed card loads the
pushed repository."""

import re
from unittest import mock

import pytest
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModel, AutoProcessor

from cli_helpers import REPO, TINY, flags
from hf_siglip.cli.arguments import DEMO_TRAINING_DEFAULTS, SiglipModelArguments, SiglipScriptArguments
from hf_siglip.cli.main import parse_with_config
from hf_siglip.hub import HubAccessError, usage_code
from hf_siglip.training.training_args import SiglipTrainingArguments

MARKER = "<!-- tests/test_readme_python.py runs this snippet"
CALL = 'hs.recipe_arguments("siglip_from_scratch", output_dir="my-siglip")'
OVERRIDES = {key: value for key, value in TINY.items() if key not in ("use_cpu", "bf16", "logging_steps")}


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(MARKER) == 1, "the README's Python snippet lost its marker"
    return usage_code(text[text.index(MARKER):])  # the first ```python block after the marker


def test_the_readme_snippet_trains_with_the_recipe_saves_then_pushes(tmp_path, monkeypatch):
    code = readme_snippet()
    assert code.count(CALL) == 1 and "push_to_hub()" in code and code.index("save_model()") < code.index("push_to")
    # the only change: tiny sizes, passed as more keywords of the same call
    tiny = code.replace(CALL, CALL[:-1] + ", **tiny)")
    monkeypatch.chdir(tmp_path)
    namespace = {"tiny": {**OVERRIDES, "use_cpu": True}}
    with pytest.raises(HubAccessError, match="offline mode is on"):  # tests run with HF_HUB_OFFLINE=1
        exec(compile(tiny, "README.md", "exec"), namespace)

    # what `hf-siglip train --config siglip_from_scratch` with the same flags would use
    data, model, training = parse_with_config(
        (SiglipScriptArguments, SiglipModelArguments, SiglipTrainingArguments),
        ["--config", "siglip_from_scratch", *flags({**OVERRIDES, "output_dir": "my-siglip"})],
        defaults=DEMO_TRAINING_DEFAULTS)
    trainer = namespace["trainer"]
    for name in ("learning_rate", "adam_beta2", "weight_decay", "warmup_steps", "lr_scheduler_type", "max_steps",
                 "num_train_epochs", "per_device_train_batch_size", "seed"):
        assert getattr(trainer.args, name) == getattr(training, name), name
    assert trainer.args.adam_beta2 == 0.95 and trainer.args.lr_scheduler_type == "cosine"
    assert namespace["data_args"].max_length == 12 and namespace["model_args"].image_size == 16
    config = trainer.model.config
    assert (config.text_config.hidden_size, config.vision_config.patch_size) == (model.hidden_size, model.patch_size)
    assert trainer.model.logit_bias.item() == pytest.approx(-10.0, abs=0.1) and trainer.state.global_step == 2

    # the failed push lost nothing: model, processor and card were saved first
    saved = tmp_path / "my-siglip"
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md"} <= {
        path.name for path in saved.iterdir()}
    AutoModel.from_pretrained(saved), AutoProcessor.from_pretrained(saved)
    assert 'from_pretrained("your-username/your-model")' in usage_code((saved / "README.md").read_text())

    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[repo_id] = {path.name for path in (tmp_path / folder_path).iterdir()}
        uploaded["README.md"] = (tmp_path / folder_path / "README.md").read_text()

    with mock.patch("hf_siglip.training.trainer.check_hub_access"), \
            mock.patch.object(HfApi, "create_repo", return_value=mock.Mock(repo_id="someone/my-siglip")), \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        trainer.push_to_hub()
    assert {"model.safetensors", "processor_config.json", "tokenizer.json"} <= uploaded["someone/my-siglip"]
    pushed = ModelCard(uploaded["README.md"])
    assert re.findall(r'from_pretrained\("([^"]+)"\)', usage_code(pushed.text)) == ["someone/my-siglip"] * 2
