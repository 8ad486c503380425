"""Bad rows, bad files and bad settings met through `hf-siglip train` / `eval`: each is dropped and counted, or
stops the run with a message naming the row, file or field (before any data is read, for settings). A user error is
`hf-siglip <command>: error: ...` on stderr and exit status 2; several problems are reported together."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

import hf_siglip as hs
from cli_helpers import TINY, cli_env, flags
from conftest import tiny_training_setup
from data_fixtures import write_image_folder
from hf_siglip.cli.main import main as cli_main
from hf_siglip.errors import UsageError

# Seconds a usage error may take as a subprocess: the imports (~5 s alone, ~15 s on a loaded 2-core machine), no data,
# no Hub: asking the Hub about a missing folder took 75 s of retries.
QUICK = 45
# A new model on a user's image folder (16 px images), tiny.
FOLDER = {key: value for key, value in TINY.items() if not key.startswith("demo_")}


def train(dataset, output_dir, **overrides) -> dict:
    assert cli_main(["train", *flags({**FOLDER, "dataset": dataset, "output_dir": output_dir, **overrides})]) == 0
    return json.loads((output_dir / "eval_results.json").read_text())


def good_rows(n, prefix="a red square"):
    return [("good", [f"{prefix} {i}", f"picture {i}"]) for i in range(n)]


def test_a_batch_whose_rows_all_drop_is_skipped_and_counted(tmp_path):
    # 2 good images among 16: of the 4 batches of 4 in an epoch, at least 2 hold no decodable image
    write_image_folder(tmp_path / "data" / "train", good_rows(2) + [("garbage", ["broken"])] * 14)
    write_image_folder(tmp_path / "data" / "test", good_rows(4), seed=1)
    results = train(tmp_path / "data", tmp_path / "out", per_device_train_batch_size=4, max_steps=8)
    report = results["data"]
    assert report["train/rows_with_undecodable_image"] == 28  # every broken row of both epochs, once each
    assert report["train/empty_batches_skipped"] >= 4
    assert 0.0 <= results["metrics"]["eval_i2t_recall@1"] <= 1.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| train/empty_batches_skipped |" in card and "| train/rows_with_undecodable_image | 28 |" in card


def test_a_skipped_step_changes_no_weight(tmp_path):
    """AdamW with weight decay would move every weight on a zero gradient: a skipped step must not."""
    model, processor, collator, _ = tiny_training_setup()
    broken = [{"image": {"bytes": b"not an image", "path": None}, "caption": ["a cat"], "image_id": i}
              for i in range(8)]
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = hs.SiglipTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                      weight_decay=0.1, learning_rate=1e-2, report_to=[], save_strategy="no",
                                      use_cpu=True)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=broken)
    trainer.train()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert trainer.data_report() == {"train/empty_batches_skipped": 2, "train/rows_with_undecodable_image": 8}


def test_none_captions_are_dropped_and_counted_on_the_tokenizer_path(tmp_path):
    rows = good_rows(6) + [("good", None), ("good", [None, "  "])]
    write_image_folder(tmp_path / "data", rows)
    report = train(tmp_path / "data", tmp_path / "out", per_device_train_batch_size=8, max_steps=2)["data"]
    assert report["tokenizer_training"] == {"captions_dropped": 3}
    assert report["train/rows_without_caption"] == 4  # 2 rows x 2 epochs
    assert report["train/empty_captions_dropped"] == 6


def test_a_malformed_metadata_line_names_the_file_and_line(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "data", good_rows(4))
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]  # cut the closing quote and braces
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    report = usage_error(["train", *flags({**FOLDER, "dataset": folder, "output_dir": tmp_path / "out"})], capsys)
    assert re.fullmatch(rf"hf-siglip train: error: {re.escape(str(folder))}/metadata\.jsonl line 3: not valid JSON "
                        r"\(.*", report), report


def test_eval_split_auto_none_and_missing(tmp_path, capsys):
    write_image_folder(tmp_path / "data", good_rows(8))  # one split: train
    results = train(tmp_path / "data", tmp_path / "auto")  # default 'auto': no test split, no evaluation
    assert results["metrics"] == {}
    assert train(tmp_path / "data", tmp_path / "none", eval_split="None")["metrics"] == {}
    report = usage_error(["train", *flags({**FOLDER, "dataset": tmp_path / "data", "eval_split": "test",
                                           "output_dir": tmp_path / "missing"})], capsys)
    assert report == f"hf-siglip train: error: eval_split 'test': {tmp_path / 'data'} has no such split; its splits " \
                     "are ['train']"


def test_split_folders_load_and_an_unset_image_size_is_siglips(tmp_path):
    for split, seed in (("train", 0), ("dev", 1), ("test", 2)):
        write_image_folder(tmp_path / "data" / split, good_rows(8, prefix=split), seed=seed)
    settings = {key: value for key, value in FOLDER.items() if key != "image_size"}
    assert cli_main(["train", *flags({**settings, "dataset": tmp_path / "data", "output_dir": tmp_path / "out",
                                      "patch_size": 32, "eval_split": "dev"})]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 224
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())["metrics"]
    assert metrics["eval_i2t_chance_recall@1"] == pytest.approx(2 / 16)  # the 8 dev images, 2 captions each


def usage_error(argv, capsys) -> str:
    """Run `hf-siglip ARGV` in-process: it must stop with a usage error (exit status 2) whose report is the last thing
    on stderr; returns the report (one line per problem after the first line, for several)."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    start = err.rindex(f"hf-siglip {argv[0]}: error: ")
    return err[start:].rstrip("\n")


@pytest.fixture
def no_data_read(monkeypatch):
    """Reading the data (the demo's included) fails the test: a configuration problem must stop the run first."""
    import hf_siglip.cli.train as train_script

    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the configuration was checked")

    monkeypatch.setattr(train_script, "load_named_splits", refuse)
    monkeypatch.setattr(train_script, "make_demo_dataset", refuse)


# (flags over TINY, the one line the command prints after "hf-siglip train: error: ")
CONFIGURATION_MISTAKES = [
    ({"loss_config": '{"negativ_ratio": 2}'}, "negativ_ratio"),
    ({"loss_config": '{"loss_type": "softmax", "negative_ratio": 2}'},
     r"\['negative_ratio'\] do not apply to loss_type='softmax'"),
    ({"loss_options": '{"normalize": "row"}'}, "loss_options is now loss_config"),
    ({"bottleneck_dim": 64}, r"bottleneck_dim must satisfy 0 < bottleneck_dim < hidden_size \(= 32\)"),
    ({"max_length": 0}, "max_length must be a positive integer, got 0"),
    ({"patch_size": 32}, "patch_size 32 is larger than image_size 16"),
    ({"patch_size": 7, "image_size": 48}, "image_size 48 is not a multiple of patch_size 7: the tower would see only "
                                          "42 x 42 pixels"),
    ({"num_attention_heads": 3}, r"hidden_size \(32\) must be divisible by num_attention_heads \(3\)"),
    ({"data_steps": '[{"label_noise": {"text": 1.5}}]'}, r"entry 1 \(label_noise\): text is a fraction of rows"),
    ({"data_steps": '[{"image_embedding_cache": {}}]'}, "the image_embedding_cache data step needs lock_vision_tower"),
    ({"label_noise": 0.2}, r"\['label_noise'\] are data steps now.*label_noise -> data_steps entry"),
    ({"image_fast_path": "cv2"}, r"image_fast_path is one of \('torch', 'pil'\) or None, got 'cv2'"),
    ({"loss_config": '{"mine_with": "teacher", "mine_text_text": 0.99}'}, "set teacher_momentum"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive integer, got 0$"),
    ({"per_device_train_batch_size": 16.5}, "per_device_train_batch_size must be an integer, got 16.5$"),
    ({"per_device_eval_batch_size": -2}, "per_device_eval_batch_size must be a positive integer, got -2$"),
    ({"learning_rate": -0.001}, "learning_rate must be a number >= 0, got -0.001$"),
    ({"learning_rate": "fast"}, "learning_rate must be a number, got fast$"),
    ({"num_train_epochs": 0, "max_steps": -1}, "nothing to train: num_train_epochs is 0.0 and max_steps is unset"),
    ({"lr_scheduler_type": "cosin"}, r"lr_scheduler_type must be one of .* got cosin \(did you mean cosine\?\)$"),
    ({"learnin_rate": 0.1}, r"^unknown flag --learnin_rate \(did you mean --learning_rate\?\)$"),
    ({"eval_split": "validation"}, r"eval_split 'validation': demo has no such split; its splits are \['test', "
                                   r"'train'\]$"),
    ({"dataset": "./no-such-folder"}, r"^dataset \./no-such-folder: no such file or folder$"),
    ({"model_name_or_path": "./no-such-model"}, r"^model_name_or_path \./no-such-model: no such file or folder$"),
    ({"config": "no-such-recipe.yaml"},
     r"^--config no-such-recipe\.yaml: no such file, and no packaged recipe of that name \(they are: "),
]


@pytest.mark.parametrize("mistake, message", CONFIGURATION_MISTAKES,
                         ids=[next(iter(m)) + str(i) for i, (m, _) in enumerate(CONFIGURATION_MISTAKES)])
def test_each_configuration_mistake_is_one_line_before_any_data_is_read(tmp_path, capsys, no_data_read, mistake,
                                                                        message):
    report = usage_error(["train", *flags({**TINY, "output_dir": tmp_path / "out", **mistake})], capsys)
    assert "\n" not in report, report  # one problem, one line
    assert re.search(message, report.removeprefix("hf-siglip train: error: ")), report
    assert not (tmp_path / "out").exists()


def test_a_recipe_with_four_mistakes_reports_all_four_in_one_run(tmp_path, capsys, no_data_read):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learnig_rate: 0.001\n"  # a misspelt key
                      "per_device_train_batch_size: 16.5\n"  # a value of the wrong type
                      "patch_size: 7\nimage_size: 48\n"  # sizes that do not divide
                      "num_train_epochs: -1\n")  # a value out of range
    report = usage_error(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "out")], capsys)
    assert report.splitlines() == [
        "hf-siglip train: error: 4 problems in the configuration:",
        f"  - --config {recipe}: unknown field learnig_rate (did you mean learning_rate?)",
        f"  - --config {recipe}: per_device_train_batch_size must be an integer, got 16.5",
        "  - num_train_epochs must be a number >= 0, got -1",
        "  - image_size 48 is not a multiple of patch_size 7: the tower would see only 42 x 42 pixels of each image; "
        "choose an image_size that patch_size divides",
    ]
    assert not (tmp_path / "out").exists()


def test_recipe_file_mistakes(tmp_path, capsys, no_data_read):
    bad_yaml, a_list = tmp_path / "bad.yaml", tmp_path / "list.yaml"
    bad_yaml.write_text("learning_rate: 0.001\ndata_steps: [{caption_sampling: {k: 2}}\n")
    a_list.write_text("- learning_rate: 0.001\n")
    report = usage_error(["train", "--config", str(bad_yaml)], capsys)
    assert re.fullmatch(rf"hf-siglip train: error: --config {re.escape(str(bad_yaml))}: line 3, column 1: not valid "
                        r"YAML \(.+\)", report), report
    report = usage_error(["train", "--config", str(a_list)], capsys)
    assert report.endswith(f"--config {a_list}: a recipe is a mapping of field: value, got list")


def test_an_unquoted_yaml_no_is_the_strategy_no(tmp_path):
    from hf_siglip.cli.arguments import SiglipModelArguments, SiglipScriptArguments
    from hf_siglip.cli.main import parse_with_config
    from hf_siglip.training.training_args import SiglipTrainingArguments

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("save_strategy: no\neval_strategy: no\n")  # YAML 1.1 reads both as false
    _, _, training = parse_with_config((SiglipScriptArguments, SiglipModelArguments, SiglipTrainingArguments),
                                       ["--config", str(recipe), "--use_cpu", "true", "--output_dir", "unused"])
    assert (training.save_strategy.value, training.eval_strategy.value) == ("no", "no")


def test_unknown_flags_suggest_the_close_match_and_abbreviations_are_refused(capsys):
    assert usage_error(["train", "--learning_rat", "0.1"], capsys) == (
        "hf-siglip train: error: unknown flag --learning_rat (did you mean --learning_rate?)")
    # reported with the problem it leads to: the default checkpoint folder does not exist here
    assert "  - unknown flag --chekpoint (did you mean --checkpoint?)" in usage_error(
        ["eval", "--chekpoint", "x", "--dataset", "demo"], capsys).splitlines()
    assert usage_error(["train", "--zzz_qqq", "1"], capsys) == "hf-siglip train: error: unknown flag --zzz_qqq"


def test_a_local_dataset_path_typo_names_the_close_match(tmp_path, capsys, no_data_read, monkeypatch):
    write_image_folder(tmp_path / "data" / "flickr8k", good_rows(2))
    monkeypatch.chdir(tmp_path)
    # `data/flikr8k` has the shape of a Hub id; `data/` being a folder here says it is meant locally
    report = usage_error(["train", "--dataset", "data/flikr8k", "--output_dir", str(tmp_path / "out")], capsys)
    assert report == ("hf-siglip train: error: dataset data/flikr8k: no such file or folder (did you mean "
                      "data/flickr8k?)")
    report = usage_error(["train", "--dataset", str(tmp_path / "shards" / "*.tar"), "--max_steps", "2"], capsys)
    assert report.endswith("shards/*.tar: the pattern matches no file")


def test_a_missing_split_of_a_folder_is_named_before_any_data_is_read(tmp_path, capsys, no_data_read):
    for split in ("train", "dev"):
        write_image_folder(tmp_path / "data" / split, good_rows(2))
    report = usage_error(["train", "--dataset", str(tmp_path / "data"), "--eval_split", "test", "--train_split",
                          "training_set", "--output_dir", str(tmp_path / "out")], capsys)
    assert report.splitlines()[1:] == [
        f"  - train_split 'training_set': {tmp_path / 'data'} has no such split; its splits are ['train', "
        "'validation']",
        f"  - eval_split 'test': {tmp_path / 'data'} has no such split; its splits are ['train', 'validation']"]


def test_user_errors_are_one_line_with_status_2_and_a_traceback_with_debug(tmp_path):
    """As users run it: a subprocess, nothing else on stderr, within seconds, and the traceback on request."""
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "train", "--per_device_train_batch_size", "0",
                          "--output_dir", str(tmp_path / "out")], env=cli_env(), capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert time.time() - started < QUICK and run.returncode == 2
    assert run.stderr.splitlines() == ["hf-siglip train: error: per_device_train_batch_size must be a positive "
                                       "integer, got 0"] and run.stdout == ""
    debug = subprocess.run([sys.executable, "-m", "hf_siglip", "train", "--per_device_train_batch_size", "0",
                            "--output_dir", str(tmp_path / "out")], env=cli_env(HF_SIGLIP_DEBUG="1"),
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError" in debug.stderr
    with pytest.raises(UsageError, match="per_device_train_batch_size must be a positive integer, got 0"):
        cli_main(["train", "--per_device_train_batch_size", "0", "--debug"])  # the flag: in-process, raised
    assert not (tmp_path / "out").exists()


def test_eval_on_a_missing_folder_fails_at_once_without_asking_the_hub(tmp_path):
    # HF_HUB_OFFLINE=0 and an endpoint nothing answers on: asking the Hub would take its retries
    env = cli_env(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://10.255.255.1:9", HF_HOME=str(tmp_path / "home"))
    for checkpoint, expected in ((str(tmp_path / "no-such-model"), f"checkpoint {tmp_path / 'no-such-model'}: "
                                  "no such file or folder"),
                                 (None, "checkpoint outputs/siglip-demo: no such folder (the default")):
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "hf_siglip", "eval",
                              *(["--checkpoint", checkpoint] if checkpoint else [])],
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert time.time() - started < QUICK and run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.splitlines() == [f"hf-siglip eval: error: {expected}"] or \
            run.stderr.startswith(f"hf-siglip eval: error: {expected}"), run.stderr


def test_other_commands_report_usage_errors_in_one_line(capsys):
    assert usage_error(["convert", "a"], capsys) == (
        "hf-siglip convert: error: the following arguments are required: dst, --bottleneck-dim")
    capsys.readouterr()
    assert cli_main([]) == 2
    assert capsys.readouterr().err == "hf-siglip: error: the following arguments are required: command\n"


def test_eval_reads_the_text_length_the_checkpoint_was_trained_with(tmp_path):
    assert cli_main(["train", *flags({**TINY, "max_length": 20, "output_dir": tmp_path / "model"})]) == 0
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["model_max_length"] == 20
    data = {key: TINY[key] for key in ("demo_train_size", "demo_test_size", "demo_image_size")}

    def evaluate(name, **extra):
        assert cli_main(["eval", "--checkpoint", str(tmp_path / "model"), "--output_file", str(tmp_path / name),
                         *flags({**data, **extra})]) == 0
        return json.loads((tmp_path / name).read_text())

    default, explicit = evaluate("default.json"), evaluate("explicit.json", max_length=20)
    assert default["max_length"] == 20 and default == explicit
    trained = json.loads((tmp_path / "model" / "eval_results.json").read_text())["metrics"]
    assert default["i2t_recall@5"] == pytest.approx(trained["eval_i2t_recall@5"])  # the training run's own eval


def test_eval_drops_and_counts_broken_rows(tmp_path):
    model, processor, _, _ = tiny_training_setup()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data" / "test", good_rows(5) + [("garbage", ["x"]), ("good", None)])
    write_image_folder(tmp_path / "data" / "train", good_rows(2))
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"),
                     "--output_file", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["dropped/rows_with_undecodable_image"] == 1 and metrics["dropped/rows_without_caption"] == 1
    assert metrics["max_length"] == 12


def test_weights_save_as_safetensors_and_a_legacy_bin_loads_with_weights_only(tmp_path):
    model, _, _, _ = tiny_training_setup()
    model.save_pretrained(tmp_path / "safe")
    assert (tmp_path / "safe" / "model.safetensors").exists()
    assert not list((tmp_path / "safe").glob("*.bin"))
    model.config.save_pretrained(tmp_path / "legacy")
    torch.save(model.state_dict(), tmp_path / "legacy" / "pytorch_model.bin")
    loaded = hs.SiglipBottleneckModel.from_pretrained(tmp_path / "legacy")
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_image_fast_path_flag_reaches_the_collator(tmp_path):
    """--image_fast_path pil / None / torch: the first step's loss (the initial weights on the same batch) is the
    processor's to float rounding with Pillow's resize, and a little further off with torch's uint8 resize (within
    2/255 of it). The demo's 24 px images are resized to the model's 16."""
    first_loss = {}
    for path in ("pil", "None", "torch"):
        output_dir = tmp_path / path
        assert cli_main(["train", *flags({**TINY, "demo_image_size": 24, "output_dir": output_dir,
                                          "eval_split": "None", "image_fast_path": path, "max_steps": 1})]) == 0
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        first_loss[path] = history[0]["loss"]
    assert first_loss["pil"] == pytest.approx(first_loss["None"], rel=1e-6)
    assert first_loss["torch"] != first_loss["None"]
    assert first_loss["torch"] == pytest.approx(first_loss["None"], rel=1e-2)


def test_hub_and_other_path_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    report = usage_error(["train", *flags({**FOLDER, "dataset": "someone/no-such-dataset",
                                           "output_dir": tmp_path / "out"})], capsys)
    assert report.startswith("hf-siglip train: error: Couldn't reach 'someone/no-such-dataset' on the Hub") and \
        "\n" not in report
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "photos", good_rows(2))
    assert usage_error(["shards", "./photo", "out"], capsys) == (
        "hf-siglip shards: error: src ./photo: no such file or folder (did you mean photos?)")
    assert usage_error(["convert", str(tmp_path / "nothing"), "dst", "--bottleneck-dim", "4"], capsys) == (
        f"hf-siglip convert: error: src {tmp_path / 'nothing'}: no such file or folder")
    assert not (tmp_path / "out").exists()


def test_a_model_neither_here_nor_reachable_on_the_hub_is_one_line(tmp_path, capsys):
    # offline (conftest): a Hub id that is not in the cache cannot be read
    for argv, field in ((["train", "--model_name_or_path", "someone/no-such-model", "--output_dir",
                          str(tmp_path / "out")], "model_name_or_path"),
                        (["eval", "--checkpoint", "someone/no-such-model", "--dataset", "demo"], "checkpoint")):
        report = usage_error(argv, capsys)
        assert report.startswith(f"hf-siglip {argv[0]}: error: {field}='someone/no-such-model' is not a model "
                                 "checkpoint folder or Hub id: ") and "\n" not in report, report
    assert not (tmp_path / "out").exists()


def test_eval_on_a_split_the_data_does_not_have_is_one_line(tmp_path, capsys):
    model, processor, _, _ = tiny_training_setup()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data" / "train", good_rows(2))
    report = usage_error(["eval", "--checkpoint", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"),
                          "--eval_split", "test"], capsys)
    assert report == f"hf-siglip eval: error: {tmp_path / 'data'} has no split 'test'; its splits are ['train']"


def test_a_column_the_data_does_not_have_is_one_line(tmp_path, capsys):
    write_image_folder(tmp_path / "data", good_rows(2))
    report = usage_error(["train", *flags({**FOLDER, "dataset": tmp_path / "data", "caption_column": "text",
                                           "output_dir": tmp_path / "out"})], capsys)
    assert re.fullmatch(r"hf-siglip train: error: column\(s\) \['text'\] not found; the dataset has columns .*",
                        report), report


def test_the_library_raises_every_problem_as_one_value_error():
    """`validate_arguments` (what run_train and recipe_arguments call) raises a UsageError, a ValueError too."""
    from hf_siglip.cli.arguments import SiglipModelArguments, SiglipScriptArguments, validate_arguments
    from hf_siglip.training.training_args import SiglipTrainingArguments

    training = SiglipTrainingArguments(output_dir="unused", per_device_train_batch_size=0, learning_rate=-1.0,
                                       use_cpu=True, report_to=[])
    with pytest.raises(ValueError) as raised:
        validate_arguments(SiglipScriptArguments(), SiglipModelArguments(patch_size=5), training)
    assert isinstance(raised.value, UsageError)
    assert raised.value.problems == [
        "per_device_train_batch_size must be a positive integer, got 0",
        "learning_rate must be a number >= 0, got -1.0",
        "image_size 32 is not a multiple of patch_size 5: the tower would see only 30 x 30 pixels of each image; "
        "choose an image_size that patch_size divides"]
