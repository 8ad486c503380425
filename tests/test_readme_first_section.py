"""The README's first section, "Fine-tune on your own images", followed as written on a tiny folder: the folder is
built from its tree and its `metadata.jsonl` lines, and its train, eval and push commands run in subprocesses, with
only tiny-model flags added to `train` (a local tiny SigLIP stands in for google/siglip-base-patch16-224; nothing
is downloaded). Push is offline here: it refuses in one line."""

import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from transformers import SiglipModel

from cli_helpers import REPO, cli_env, flags
from conftest import tiny_training_setup
from hf_siglip.hub import usage_code

SECTION = "## Fine-tune on your own images"
METADATA_MARKER = "<!-- tests/test_readme_first_section.py builds its folder from these lines -->"
COMMANDS_MARKER = "<!-- tests/test_readme_first_section.py runs these commands"
# what stands in for the released model, and sizes a 2-core machine trains in seconds
TINY_TRAIN = dict(max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8, max_length=12,
                  logging_steps=1, use_cpu="true", bf16="false")


def first_section(readme: str) -> str:
    start = readme.index(SECTION)
    assert start == readme.index("\n## ") + 1, "the README opens with 'Fine-tune on your own images'"
    return readme[start:readme.index("\n## ", start + 1)]


def block_after(text: str, marker: str, language: str) -> str:
    """The first ```language block after `marker`."""
    start = text.index(f"```{language}\n", text.index(marker)) + len(f"```{language}\n")
    return text[start:text.index("```", start)]


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A tiny SigLIP in the native transformers format with its processor: google/siglip-base-patch16-224's
    stand-in."""
    path = tmp_path_factory.mktemp("tiny_pretrained")
    model, processor, _, _ = tiny_training_setup(image_size=16)
    model.save_pretrained(path / "ours")
    SiglipModel.from_pretrained(path / "ours").save_pretrained(path / "native")
    processor.save_pretrained(path / "native")
    return path / "native"


def write_folder(root, example_rows: list[dict], n_train: int = 13, n_test: int = 8) -> None:
    """`root/train/` and `root/test/` as the section's tree shows: the section's own metadata lines first, then more
    rows like them, each with a real image file of the named format."""
    rng = np.random.default_rng(0)
    classes = max(row["label"] for row in example_rows) + 1
    image_id = max(row["image_id"] for row in example_rows)
    for split, rows in (("train", list(example_rows)), ("test", [])):
        while len(rows) < (n_train if split == "train" else n_test):
            image_id += 1
            label = image_id % classes
            caption = ([f"picture {image_id}", f"a photo of class {label}"] if image_id % 2
                       else f"class {label} number {image_id}")
            rows.append({"file_name": f"{image_id:04d}.{'png' if image_id % 3 else 'jpg'}", "caption": caption,
                         "image_id": image_id, "label": label})
        folder = root / split
        folder.mkdir(parents=True)
        for row in rows:
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / row["file_name"])
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_first_section_trains_evaluates_and_refuses_an_offline_push(tmp_path, tiny_pretrained):
    section = first_section((REPO / "README.md").read_text())
    tree = block_after(section, SECTION, "")
    folder = re.match(r"(\w+)/\n", tree).group(1)
    assert all(name in tree for name in ("train/", "test/", "metadata.jsonl"))
    example_rows = [json.loads(line) for line in block_after(section, METADATA_MARKER, "json").splitlines()]
    assert {type(row["caption"]) for row in example_rows} == {str, list}
    assert all({"file_name", "caption", "image_id", "label"} <= set(row) for row in example_rows)
    write_folder(tmp_path / folder, example_rows)

    train, evaluate, push = commands(block_after(section, COMMANDS_MARKER, "bash"))
    assert [command[:2] for command in (train, evaluate, push)] == [["hf-siglip", "train"], ["hf-siglip", "eval"],
                                                                   ["hf-siglip", "push"]]
    for flag in ("--zero_shot_classes", "--zero_shot_templates", "--label_column"):
        assert f"`{flag}" in section, f"the section explains {flag}"
    assert train[train.index("--dataset") + 1] == folder  # the folder of the tree
    output = train[train.index("--output_dir") + 1]
    assert evaluate[evaluate.index("--checkpoint") + 1] == output == push[2]
    classes = train[train.index("--zero_shot_classes") + 1:train.index("--zero_shot_templates")]

    def run(command, extra=()):
        return subprocess.run([sys.executable, "-m", "hf_siglip", *command[1:], *extra], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=600)

    trained = run(train, flags({"model_name_or_path": tiny_pretrained, **TINY_TRAIN}))
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((tmp_path / output / "eval_results.json").read_text())["metrics"]
    assert results["eval_zero_shot_classes"] == len(classes) == 3 and 0.0 <= results["eval_zero_shot_top1"] <= 1.0
    assert results["eval_images"] == 8 and results["eval_texts"] == 8 + 4  # every caption of test/, lists included

    evaluated = run(evaluate)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    first_line = evaluated.stdout.splitlines()[0]
    assert str(tmp_path / folder) in first_line and "test" in first_line
    reported = dict(re.findall(r"^(\S+)\s+(-?[\d.]+)$", evaluated.stdout, re.M))
    for name in ("i2t_recall@1", "t2i_recall@5", "zero_shot_top1"):
        assert float(reported[name]) == pytest.approx(results[f"eval_{name}"], abs=1e-4), name

    card = ModelCard.load(tmp_path / output / "README.md")
    assert card.data.base_model is None and card.data.datasets is None  # local paths stay out of the metadata
    snippet = subprocess.run([sys.executable, "-c", usage_code(card.text, load_from=tmp_path / output)], cwd=tmp_path,
                             env=cli_env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert snippet.returncode == 0, snippet.stderr[-2000:]

    pushed = run(push)  # tests run offline (HF_HUB_OFFLINE=1)
    lines = pushed.stderr.strip().splitlines()
    assert pushed.returncode == 2 and len(lines) == 1, pushed.stderr[-2000:]
    assert lines[0].startswith("hf-siglip push: error: cannot push to the Hub: offline mode is on")
