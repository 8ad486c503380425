"""The start-up summary of `hf-siglip train` (hf_siglip.cli.startup): what the run is about to do, printed once
before the first step, with a warning when the text length cuts many captions or a new vision tower's image size is
far above the data's; eval_results.json records every data step's settings; no warning about transformers' own
default config when a saved model loads."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from cli_helpers import TINY, cli_env, flags, warning_lines
from data_fixtures import make_tokenizer, write_image_folder
from hf_siglip.cli.main import main as cli_main
from hf_siglip.cli.startup import truncation
from hf_siglip.data.steps import parse_data_steps

FOLDER = {key: value for key, value in TINY.items() if key not in ("demo_train_size", "demo_test_size",
                                                                     "demo_image_size", "image_size", "max_length")}
LONG = " ".join(["a red square beside a blue circle"] * 5)  # 35 words: longer than 16 tokens however they split
SHORT = "a red square"  # 3 words: at most 16 tokens with the end token, however they split


def write_captioned_folder(root: Path) -> Path:
    """10 training rows of 16 px images with 2 captions each, 5 of the 20 captions long; 4 test rows."""
    rows = [("good", [LONG if i % 2 == 0 else SHORT, SHORT]) for i in range(10)]
    write_image_folder(root / "train", rows)
    write_image_folder(root / "test", [("good", [SHORT, LONG]) for _ in range(4)], seed=1)
    return root


def summary(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("Training on "))
    return lines[start:start + 7]


def our_warnings(stderr: str) -> list[str]:
    return [line for line in warning_lines(stderr) if line.startswith("hf-siglip train: warning: ")]


def test_truncation_counts_what_the_collator_cuts_end_token_included():
    from tokenizers import processors

    tokenizer = make_tokenizer(["red", "square"])
    eos = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                                        special_tokens=[("</s>", eos)])
    # 7 words + end token = 8 tokens fits max_length 8; 8 words + end token = 9 does not
    captions = ["red " * 7] * 3 + ["red " * 8] * 2 + ["square"] * 5
    result = truncation(tokenizer, captions, max_length=8)
    assert result == {"sampled": 10, "cut": 2, "share": 0.2, "fits_95": 9}
    # the same captions as the collator's tokenizer call sees them: exactly the counted ones lose tokens
    whole = tokenizer(captions)["input_ids"]
    cut = tokenizer(captions, truncation=True, max_length=8)["input_ids"]
    assert sum(len(a) != len(b) for a, b in zip(whole, cut)) == 2


def test_summary_and_warnings_as_users_see_them(tmp_path):
    data = write_captioned_folder(tmp_path / "data")
    values = {**FOLDER, "dataset": data, "output_dir": tmp_path / "out", "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2, "max_steps": 3, "patch_size": 32, "lock_vision_tower": "true",
              "disable_tqdm": "true"}
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "train", *flags(values)], env=cli_env(),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = summary(run.stdout)
    assert run.stdout.count("Training on ") == 1
    assert lines[0] == f"Training on {data}: 10 training rows (split 'train'), 4 evaluation rows (split 'test')"
    assert lines[1] == ("  images: 224 x 224 (SigLIP's 224 for a new vision tower: --image_size unset); the data's: "
                        "16 x 16 px (8 sampled)")
    assert lines[2] == ("  text: 16 tokens; 5 of 20 sampled captions (25.0%) are longer and get cut (end token "
                        "included)")
    assert lines[3] == ("  batch: 8 global = 4 per device x 1 process(es) x 2 accumulation step(s); 3 step(s), 2.4 "
                        "epoch(s)")
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    frozen = sum(tensor.numel() for name, tensor in weights.items() if name.startswith("vision_model."))
    total = sum(tensor.numel() for tensor in weights.values())
    assert lines[4] == f"  parameters: {total - frozen:,} trainable, {frozen:,} frozen" and frozen > 0
    assert lines[5] == "  processes: 1 on cpu"
    assert lines[6] == "  data steps: none"
    # the summary comes before the first step's log
    assert run.stdout.index("Training on ") < run.stdout.index("{'train_runtime'")
    warnings = our_warnings(run.stderr)
    assert len(warnings) == 2, run.stderr[-3000:]
    assert re.fullmatch(r"hf-siglip train: warning: 25% of 20 sampled captions are longer than max_length 16 tokens "
                        r"\(end token included\) and are cut; --max_length (\d+) would hold 95% of them whole",
                        warnings[0]), warnings[0]
    assert int(re.search(r"--max_length (\d+)", warnings[0]).group(1)) > 16
    assert warnings[1].startswith("hf-siglip train: warning: the new vision tower takes 224 x 224 images (SigLIP's "
                                  "224 for a new vision tower: --image_size unset) but the data's are at most 16 px "
                                  "on a side (8 sampled)")
    # a local folder: no datasets progress bars ("Downloading data", "Generating train split")
    assert "Generating train split" not in run.stderr and "Downloading data" not in run.stderr


def test_no_warning_when_captions_fit_and_sizes_match(tmp_path, caplog):
    data = write_captioned_folder(tmp_path / "data")
    caplog.set_level("WARNING")
    assert cli_main(["train", *flags({**FOLDER, "dataset": data, "output_dir": tmp_path / "out", "max_length": 64,
                                      "image_size": 16, "patch_size": 8, "max_steps": 1, "eval_split": "None"})]) == 0
    assert [r.getMessage() for r in caplog.records if "hf-siglip train: warning" in r.getMessage()] == []


def test_a_stream_has_unknown_rows_and_epochs(tmp_path, capsys):
    data = write_captioned_folder(tmp_path / "data")
    assert cli_main(["shards", str(data), str(tmp_path / "shards"), "--rows-per-shard", "4"]) == 0
    capsys.readouterr()
    assert cli_main(["train", *flags({**FOLDER, "dataset": tmp_path / "shards", "output_dir": tmp_path / "out",
                                      "image_size": 16, "max_length": 64, "max_steps": 2,
                                      "per_device_train_batch_size": 4, "disable_tqdm": "true"})]) == 0
    lines = summary(capsys.readouterr().out)
    assert lines[0] == (f"Training on {tmp_path / 'shards'}: unknown (a stream) training rows (split 'train'), "
                        "4 evaluation rows (split 'test')")
    assert lines[2] == "  text: 64 tokens; 0 of 20 sampled captions (0.0%) are longer and get cut (end token included)"
    assert lines[3].endswith("; 2 step(s), epochs unknown (a stream: max_steps decides)")


def test_eval_results_record_every_data_steps_settings(tmp_path, capsys):
    steps = [{"label_noise": {"text": 0.25}}, {"caption_sampling": {"k": 2}}, {"image_augmentation": {}}]
    assert cli_main(["train", *flags({**TINY, "output_dir": tmp_path / "out", "data_steps": json.dumps(steps)})]) == 0
    line = summary(capsys.readouterr().out)[6]
    settings = [dataclasses.asdict(config) for _, config in parse_data_steps(steps)]
    assert line == (f"  data steps: label_noise {json.dumps(settings[0])} (32 -> 32 rows), caption_sampling "
                    f"{json.dumps(settings[1])}, image_augmentation {json.dumps(settings[2])}")
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    expected = [{name: json.loads(json.dumps(dataclasses.asdict(config))) for name, config in [step]}
                for step in parse_data_steps(steps)]
    assert results["data_steps"] == expected
    augmentation = results["data_steps"][2]["image_augmentation"]
    assert augmentation["crop_scale"] == [0.9, 1.0] and augmentation["horizontal_flip"] == 0.5  # defaults, spelt out


def test_a_saved_model_loads_in_plain_transformers_without_the_default_config_notice(tmp_path):
    """transformers warns about its *default* SiglipTextConfig (bos 49406 / eos 49407 in a 32,000-token vocabulary)
    whenever it formats a SiglipConfig; hf_siglip silences exactly that notice, and a model's own bad ids still
    warn."""
    assert cli_main(["train", *flags({**TINY, "output_dir": tmp_path / "out", "eval_split": "None"})]) == 0
    script = ("import hf_siglip\nfrom transformers import AutoModel, SiglipTextConfig\n"
              f"AutoModel.from_pretrained({str(tmp_path / 'out')!r})\n"
              "SiglipTextConfig(vocab_size=10, bos_token_id=12, eos_token_id=None)\n")
    run = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "49406" not in run.stderr and "49407" not in run.stderr
    assert "between 0 and 9), got 12" in run.stderr  # a real problem is still said
