"""BLIP's bootstrapping with this package's own models (issue 24 item 3): the `pseudo_captions` step samples captions
from a captioner `hf-siglip train` wrote (as plain transformers' generate does with the same seed), `capfilt` with
`filter: itm` keeps what the trained ITM head calls a match (against probabilities computed with plain transformers),
and the blip_bootstrap recipe runs the loop through the command line, its card counting what was written and kept."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoProcessor, VisionEncoderDecoderModel

import hf_siglip as hs
from cli_helpers import RECIPES, REPO, TINY, cli_env, flags
from hf_siglip.data.steps import DataContext, parse_data_steps, run_data_steps
from hf_siglip.data.text import normalize_captions
from hf_siglip.errors import UsageError
from test_itm_rerank import plain_itm_probability

SEED = 7


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    """Step 1 of the loop: the blip_pretrain recipe (contrast + ITM + captioning) at a tiny scale."""
    out = tmp_path_factory.mktemp("round0") / "out"
    command = [sys.executable, "-m", "hf_siglip", "train", "--config", str(RECIPES / "blip_pretrain.yaml"),
               *flags({**TINY, "output_dir": out, "max_steps": 3, "eval_split": "None", "disable_tqdm": "true"})]
    run = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "captioner" / "config.json").exists() and (out / "fusion_encoder" / "itm_head.safetensors").exists()
    return out


def rows(n=6):
    return hs.make_demo_dataset(n_train=n, n_test=1, image_size=16, seed=3)["train"]


@torch.no_grad()
def plain_sampled_captions(folder, images, num_captions, seed, first_row=0):
    """What the step should write for one batch starting at `first_row`: plain transformers' generate with nucleus
    sampling under the step's seed, decoded, whitespace-normalised, empty ones dropped."""
    model, processor = VisionEncoderDecoderModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    torch.manual_seed(seed * 1_000_003 + first_row)
    ids = model.generate(pixel_values=pixel_values, do_sample=True, top_p=0.9, num_return_sequences=num_captions)
    texts = [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]
    return [[text for text in texts[i * num_captions:(i + 1) * num_captions] if text] for i in range(len(images))]


def test_pseudo_captions_from_a_trained_captioner_sample_as_plain_transformers(round0):
    data = rows()
    expected = plain_sampled_captions(round0 / "captioner", list(data["image"]), 2, SEED)
    assert len({text for captions in expected for text in captions}) > 3  # sampled, not one caption repeated
    for model in (round0, round0 / "captioner"):  # the training output folder, or its captioner folder
        context = DataContext(seed=SEED)
        result = run_data_steps(data, parse_data_steps([{"pseudo_captions": {"model": str(model),
                                                                             "num_captions": 2}}]), context)
        assert list(result["pseudo_captions"]) == expected
        report = context.report["pseudo_captions"]
        assert report["captions"] == sum(map(len, expected)) and report["rows"] == len(data)
    with pytest.raises(ValueError, match="takes none"):  # a prompt means nothing to it
        run_data_steps(data, parse_data_steps([{"pseudo_captions": {"model": str(round0), "prompt": "a photo"}}]),
                       DataContext(seed=SEED))
    longer = {"model": str(round0), "generate_kwargs": {"max_new_tokens": 40}}  # blip_pretrain's decoder: 16
    with pytest.raises(UsageError, match="max_new_tokens 40: .* at most 16 tokens"):
        run_data_steps(data, parse_data_steps([{"pseudo_captions": longer}]), DataContext(seed=SEED))


def test_capfilt_with_the_trained_itm_head_keeps_what_it_calls_a_match(round0):
    data = rows().add_column("pseudo_captions", [["a red square"], [], ["x"], ["a blue circle", "cat"], ["y"], []])
    candidates = [normalize_captions(row["caption"], i)[0] + row["pseudo_captions"] for i, row in enumerate(data)]
    images = list(data["image"])
    probability = plain_itm_probability(round0, [images[i] for i, c in enumerate(candidates) for _ in c],
                                        [text for c in candidates for text in c], TINY["max_length"])
    # a threshold in the widest gap between neighbouring probabilities near the median: some kept, some not
    ordered = probability.sort().values
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    gap = max(middle, key=lambda i: ordered[i + 1] - ordered[i])
    threshold = float(ordered[gap] + ordered[gap + 1]) / 2
    per_row = probability.split([len(c) for c in candidates])
    kept = [[text for text, p in zip(c, ps) if p >= threshold] for c, ps in zip(candidates, per_row)]

    context = DataContext(seed=SEED)
    steps = [{"capfilt": {"filter": "itm", "model": str(round0), "threshold": threshold, "min_keep": 0,
                          "batch_size": 4}}]
    result = run_data_steps(data, parse_data_steps(steps), context)
    assert list(result["caption"]) == [k for k in kept if k]  # rows left with none are dropped
    assert "pseudo_captions" not in result.column_names
    report = context.report["capfilt"]
    assert report["captions"] == sum(map(len, candidates)) and report["captions_kept"] == sum(map(len, kept))
    assert report["rows_removed"] == sum(not k for k in kept)

    for settings, message in (({"filter": "itm"}, "needs model"), ({"filter": "itm", "model": str(round0),
                                                                     "threshold": 2.0}, "match probability"),
                              ({"filter": "itm", "model": str(round0 / "captioner")}, "itm_head.safetensors"),
                              ({"filter": "bleu"}, "filter must be one of")):
        with pytest.raises(ValueError, match=message):
            parse_data_steps([{"capfilt": settings}])


def test_the_bootstrap_recipe_runs_the_loop_through_the_command_line(round0, tmp_path):
    steps = yaml.safe_load((RECIPES / "blip_bootstrap.yaml").read_text())["data_steps"]
    for entry in steps:  # the recipe's steps, reading round 0 instead of outputs/blip-pretrain
        ((_, settings),) = entry.items()
        if "model" in settings:
            settings["model"] = str(round0)
    out = tmp_path / "round1"
    command = [sys.executable, "-m", "hf_siglip", "train", "--config", str(RECIPES / "blip_bootstrap.yaml"),
               *flags({**TINY, "output_dir": out, "disable_tqdm": "true", "data_steps": json.dumps(steps)})]
    run = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]

    data = json.loads((out / "eval_results.json").read_text())["data"]
    written, judged = data["pseudo_captions"], data["capfilt"]
    n_rows = TINY["demo_train_size"]
    assert written["rows"] == n_rows and written["captions"] + written.get("empty_generations", 0) == n_rows
    demo_captions = sum(len(normalize_captions(cell, i)[0])
                        for i, cell in enumerate(hs.make_demo_dataset(n_train=n_rows, n_test=1, image_size=16)
                                                 ["train"]["caption"]))
    assert judged["captions"] == demo_captions + written["captions"]
    assert 1 <= judged["captions_kept"] <= judged["captions"] and judged["rows_out"] == n_rows  # min_keep: 1
    card = (out / "README.md").read_text()
    assert f"| pseudo_captions/captions | {written['captions']:,} |" in card
    assert f"| capfilt/captions_kept | {judged['captions_kept']:,} |" in card
    assert f"| capfilt/captions | {judged['captions']:,} |" in card
    # the round's result can caption and filter the next round
    assert (out / "captioner" / "config.json").exists() and (out / "fusion_encoder" / "itm_head.safetensors").exists()
