"""Bad rows, bad files and bad settings met through `hf-siglip train` / `eval`: each is dropped and counted, or
stops the run with a message naming the row, file or field (before any data is read, for settings)."""

import json

import pytest
import torch
from cli_helpers import TINY, flags
from conftest import tiny_training_setup
from data_fixtures import write_image_folder

import hf_siglip as hs
from hf_siglip.cli import main as cli_main

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


def test_a_malformed_metadata_line_names_the_file_and_line(tmp_path):
    folder = write_image_folder(tmp_path / "data", good_rows(4))
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]  # cut the closing quote and braces
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 3: not valid JSON"):
        train(folder, tmp_path / "out")


def test_eval_split_auto_none_and_missing(tmp_path):
    write_image_folder(tmp_path / "data", good_rows(8))  # one split: train
    results = train(tmp_path / "data", tmp_path / "auto")  # default 'auto': no test split, no evaluation
    assert results["metrics"] == {}
    assert train(tmp_path / "data", tmp_path / "none", eval_split="None")["metrics"] == {}
    with pytest.raises(KeyError, match=r"has no split 'test'; its splits are \['train'\]"):
        train(tmp_path / "data", tmp_path / "missing", eval_split="test")


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


CONFIGURATION_MISTAKES = [
    ({"loss_config": '{"negativ_ratio": 2}'}, TypeError, "negativ_ratio"),
    ({"loss_config": '{"loss_type": "softmax", "negative_ratio": 2}'}, ValueError,
     r"\['negative_ratio'\] do not apply to loss_type='softmax'"),
    ({"loss_options": '{"normalize": "row"}'}, ValueError, "loss_options is now loss_config"),
    ({"bottleneck_dim": 64}, ValueError, r"bottleneck_dim must satisfy 0 < bottleneck_dim < hidden_size \(= 32\)"),
    ({"max_length": 0}, ValueError, "max_length must be a positive integer, got 0"),
    ({"patch_size": 32}, ValueError, "patch_size 32 is larger than image_size 16"),
    ({"num_attention_heads": 3}, ValueError, r"hidden_size \(32\) must be divisible by num_attention_heads \(3\)"),
    ({"data_steps": '[{"label_noise": {"text": 1.5}}]'}, ValueError,
     r"entry 1 \(label_noise\): text is a fraction of rows in \[0, 1\]"),
    ({"data_steps": '[{"image_embedding_cache": {}}]'}, ValueError,
     "the image_embedding_cache data step needs lock_vision_tower"),
    ({"label_noise": 0.2}, ValueError, r"\['label_noise'\] are data steps now.*label_noise -> data_steps entry"),
    ({"image_fast_path": "cv2"}, ValueError, r"image_fast_path is one of \('torch', 'pil'\) or None, got 'cv2'"),
    ({"loss_config": '{"mine_with": "teacher", "mine_text_text": 0.99}'}, ValueError, "set teacher_momentum"),
]


@pytest.mark.parametrize("mistake, error, message", CONFIGURATION_MISTAKES,
                         ids=[next(iter(m)) + str(i) for i, (m, _, _) in enumerate(CONFIGURATION_MISTAKES)])
def test_configuration_mistakes_stop_before_any_data_is_read(tmp_path, mistake, error, message):
    # the dataset does not exist: the configuration error has to come first
    values = {**FOLDER, "dataset": tmp_path / "no-such-folder", "output_dir": tmp_path / "out", **mistake}
    with pytest.raises(error, match=message):
        cli_main(["train", *flags(values)])
    assert not (tmp_path / "out").exists()


def test_abbreviated_flags_are_refused():
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--learning_rat', '0.1'\]"):
        cli_main(["train", "--learning_rat", "0.1"])


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
